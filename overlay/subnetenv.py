"""subnet.env: the file the flannel CNI plugin reads, in flannel's exact format.

```
FLANNEL_NETWORK=10.5.0.0/16
FLANNEL_SUBNET=10.5.72.1/24
FLANNEL_MTU=1450
FLANNEL_IPMASQ=false
```
`FLANNEL_SUBNET` is the subnet's first host address with the subnet's prefix length. The file
is written atomically (temp file in the same directory, fsync, rename; mode 0644, parent 0755),
so a reader never sees half a file.

The one daemon-side codec of the format: the daemon writes it (`write_subnet_env`) and reads
its previous subnet back (`read_previous_subnet`); the lab and the tests read it
(`SubnetEnv.read`, `SubnetEnv.parse`). The CNI plugin keeps its own standard-library reader
(cni/flannel.py `parse_subnet_env`); tests/test_subnetenv.py pins the two together: whatever
`render` writes the plugin reads back as the same values, and on any text both readers accept
the same values or both refuse. An IPv6-only network (`EnableIPv4: false`) writes only the
IPv6 pair (no FLANNEL_NETWORK and FLANNEL_SUBNET), as flannel does; a file needs one pair at
least, and each pair whole.

Reading rules, shared with the plugin: lines split as `str.splitlines`, stripped; blank lines
and `#` comments skipped; every other line is KEY=VALUE (key and value stripped; the last of
a repeated key wins; unknown keys ignored). CIDRs are `a.b.c.d/n` with decimal octets without
leading zeros and a prefix length 0-32 without leading zeros (no netmask form); host bits are
cleared. IPv6 CIDRs are whatever `ipaddress.IPv6Network(text, strict=False)` accepts. The
MTU is 1-5 ASCII digits, 68-65535; IPMASQ one of Go's `strconv.ParseBool` words.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_SIZE = 64 << 10  # bytes: the plugin's limit too; a real file is about 100 bytes
MIN_MTU, MAX_MTU = 68, 65535
# Go's strconv.ParseBool, as flannel's plugin reads FLANNEL_IPMASQ.
BOOL_WORDS = {
    **dict.fromkeys(("1", "t", "T", "true", "TRUE", "True"), True),
    **dict.fromkeys(("0", "f", "F", "false", "FALSE", "False"), False),
}
TEMP_SUFFIX = ".tmp"


class SubnetEnvError(ValueError):
    """Text that is not a usable subnet.env, or values subnet.env cannot carry; the message
    names the file, the line or key and the value."""


@dataclass(frozen=True)
class SubnetEnv:
    network: IPv4Network | None
    """FLANNEL_NETWORK; None in an IPv6-only network (then `subnet` is None too)."""
    subnet: IPv4Network | None
    mtu: int
    ipmasq: bool
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Network | None = None

    @property
    def gateway(self) -> IPv4Interface | None:
        """FLANNEL_SUBNET as written: the subnet's first address with its prefix length."""
        if self.subnet is None:
            return None
        return IPv4Interface((int(self.subnet.network_address) + 1, self.subnet.prefixlen))

    def render(self) -> str:
        """The file's text. SubnetEnvError for values a reader would refuse or misread."""
        problems = []
        if isinstance(self.mtu, bool) or not MIN_MTU <= self.mtu <= MAX_MTU:
            problems.append(f"MTU {self.mtu!r} is not between {MIN_MTU} and {MAX_MTU}")
        for subnet in (self.subnet, self.ipv6_subnet):
            if subnet is not None and subnet.prefixlen >= subnet.max_prefixlen:
                problems.append(f"subnet {subnet} has no first host address")
        if (self.network is None) != (self.subnet is None):
            problems.append("network and subnet must be given together")
        if (self.ipv6_network is None) != (self.ipv6_subnet is None):
            problems.append("ipv6_network and ipv6_subnet must be given together")
        if self.subnet is None and self.ipv6_subnet is None:
            problems.append("no IPv4 and no IPv6 subnet")
        if problems:
            raise SubnetEnvError(f"cannot write subnet.env: {'; '.join(problems)}")
        lines = []
        if self.network is not None and self.subnet is not None:
            lines.append(f"FLANNEL_NETWORK={self.network}")
            lines.append(f"FLANNEL_SUBNET={first_host(self.subnet)}")
        if self.ipv6_network is not None and self.ipv6_subnet is not None:
            lines.append(f"FLANNEL_IPV6_NETWORK={self.ipv6_network}")
            lines.append(f"FLANNEL_IPV6_SUBNET={first_host(self.ipv6_subnet)}")
        lines.append(f"FLANNEL_MTU={self.mtu}")
        lines.append(f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}")
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str, origin: str = "subnet.env") -> SubnetEnv:
        """Parse subnet.env text (the rules in the module doc); SubnetEnvError names every
        missing key or bad value."""
        values = parse_lines(text, origin)
        missing = []
        if "FLANNEL_NETWORK" not in values and "FLANNEL_IPV6_NETWORK" not in values:
            missing.append("FLANNEL_NETWORK or FLANNEL_IPV6_NETWORK")
        if "FLANNEL_SUBNET" not in values and "FLANNEL_IPV6_SUBNET" not in values:
            missing.append("FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET")
        missing += [key for key in ("FLANNEL_MTU", "FLANNEL_IPMASQ") if key not in values]
        if missing:
            raise SubnetEnvError(f"{origin}: missing {', '.join(missing)}")
        bad: list[str] = []
        network = _value(values, "FLANNEL_NETWORK", parse_ipv4_cidr, bad)
        subnet = _value(values, "FLANNEL_SUBNET", parse_ipv4_cidr, bad)
        ipv6_network = _value(values, "FLANNEL_IPV6_NETWORK", parse_ipv6_cidr, bad)
        ipv6_subnet = _value(values, "FLANNEL_IPV6_SUBNET", parse_ipv6_cidr, bad)
        mtu = _value(values, "FLANNEL_MTU", parse_mtu, bad)
        ipmasq = _value(values, "FLANNEL_IPMASQ", parse_bool, bad)
        if not bad and (network is None) != (subnet is None):
            bad.append("FLANNEL_NETWORK and FLANNEL_SUBNET must be given together")
        if not bad and (ipv6_network is None) != (ipv6_subnet is None):
            bad.append("FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET must be given together")
        if bad or mtu is None or ipmasq is None:
            raise SubnetEnvError(f"{origin}: bad values: {'; '.join(bad)}")
        return cls(network, subnet, mtu, ipmasq, ipv6_network, ipv6_subnet)

    @classmethod
    def read(cls, path: Path) -> SubnetEnv:
        """Read and parse the file: OSError when it cannot be read (FileNotFoundError when
        it is absent), SubnetEnvError when it is not a usable subnet.env."""
        return cls.parse(read_text(path), str(path))


def first_host(net: IPv4Network | IPv6Network) -> IPv4Interface | IPv6Interface:
    """10.5.72.0/24 -> 10.5.72.1/24, flannel's FLANNEL_SUBNET form."""
    if isinstance(net, IPv4Network):
        return IPv4Interface((int(net.network_address) + 1, net.prefixlen))
    return IPv6Interface((int(net.network_address) + 1, net.prefixlen))


def _show(text: str) -> str:
    return repr(text) if len(text) <= 60 else f"{text[:60]!r}... ({len(text)} characters)"


def parse_lines(text: str, origin: str = "subnet.env") -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments skipped, the last of a key wins);
    SubnetEnvError naming the first line that is not of that form."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise SubnetEnvError(f"{origin}: line {n} is not KEY=VALUE: {_show(line)}")
        out[key.strip()] = value.strip()
    return out


def parse_ipv4_cidr(text: str) -> IPv4Network:
    """'10.1.17.1/24' -> 10.1.17.0/24 (host bits cleared); ValueError unless a.b.c.d/n."""
    _, slash, plen = text.partition("/")
    if (
        not slash
        or not (plen.isascii() and plen.isdigit())
        or len(plen) > 2
        or (len(plen) > 1 and plen[0] == "0")
        or int(plen) > 32
    ):
        raise ValueError(f"{_show(text)} is not an IPv4 CIDR like 10.1.0.0/16")
    try:
        return IPv4Interface(text).network
    except ValueError:
        raise ValueError(f"{_show(text)} is not an IPv4 CIDR like 10.1.0.0/16") from None


def parse_ipv6_cidr(text: str) -> IPv6Network:
    """An IPv6 CIDR, host bits cleared (as the plugin reads it)."""
    try:
        return IPv6Network(text, strict=False)
    except ValueError:
        raise ValueError(f"{_show(text)} is not an IPv6 CIDR like fd00:1::/56") from None


def parse_mtu(text: str) -> int:
    if text.isascii() and text.isdigit() and len(text) <= 5 and MIN_MTU <= int(text) <= MAX_MTU:
        return int(text)
    raise ValueError(f"{_show(text)} is not an MTU between {MIN_MTU} and {MAX_MTU}")


def parse_bool(text: str) -> bool:
    if text in BOOL_WORDS:
        return BOOL_WORDS[text]
    raise ValueError(f"{_show(text)} is not true or false")


def _value(
    values: dict[str, str], key: str, parse: Callable[[str], _T], bad: list[str]
) -> _T | None:
    """values[key] parsed; None when absent, or when bad (then the problem is added to bad)."""
    if key not in values:
        return None
    try:
        return parse(values[key])
    except ValueError as e:
        bad.append(f"{key}: {e}")
        return None


def read_text(path: Path) -> str:
    """The file's text: opened non-blocking and checked to be a regular file (a FIFO cannot
    hang the daemon), at most MAX_SIZE bytes, UTF-8. OSError when it cannot be read,
    SubnetEnvError when it is too large, not a file or not UTF-8."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SubnetEnvError(f"{path}: not a regular file")
        chunks = []
        size = 0
        while size <= MAX_SIZE and (chunk := os.read(fd, MAX_SIZE + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > MAX_SIZE:
        raise SubnetEnvError(f"{path}: larger than {MAX_SIZE} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SubnetEnvError(f"{path}: not UTF-8 text ({e})") from None


def _make_dirs(directory: Path) -> None:
    """Create missing directories with mode 0755 whatever the umask; existing ones are kept."""
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
            os.chmod(d, 0o755)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_leftover_temps(path: Path) -> list[Path]:
    """Remove temp files a crashed write of `path` left beside it; return what was removed.

    Temp files are named .<name>.<pid>.<random>.tmp: one whose writer is still running (its
    pid exists, and it is not this process) is kept; older names without a pid are removed.
    """
    prefix = _temp_prefix(path)
    removed = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    for name in names:
        if not (name.startswith(prefix) and name.endswith(TEMP_SUFFIX)):
            continue
        pid = name[len(prefix) :].split(".", 1)[0]
        if pid.isascii() and pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        leftover = path.parent / name
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed.append(leftover)
            log.info("removed %s, left by an interrupted write of %s", leftover, path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or a number we cannot ask about): keep its file
    return True


def write_subnet_env(path: Path, env: SubnetEnv) -> None:
    """Write atomically: temp file beside the target, fsync, chmod 0644, rename, fsync dir.

    Temp files an earlier, crashed write left beside the file are removed first (the daemon's
    first write happens at start, once it holds a lease).
    """
    text = env.render()
    directory = path.parent
    _make_dirs(directory)
    remove_leftover_temps(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=TEMP_SUFFIX, dir=directory
    )
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_previous_ipv6_subnet(path: Path) -> IPv6Network | None:
    """FLANNEL_IPV6_SUBNET of an existing subnet.env, as a network; None when absent, and None
    (logged) when unusable. Flannel reads it as the previous IPv6 subnet to reuse."""
    try:
        text = read_text(path)
        raw = parse_lines(text, str(path)).get("FLANNEL_IPV6_SUBNET")
        return None if raw is None else parse_ipv6_cidr(raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # SubnetEnvError is a ValueError
        log.warning("ignoring FLANNEL_IPV6_SUBNET of %s: %s", path, e)
        return None


def read_previous_subnet(path: Path) -> IPv4Network | None:
    """FLANNEL_SUBNET of an existing subnet.env, as a network; None (logged) when unusable.

    As flannel does, only FLANNEL_SUBNET matters here: the other keys may be missing or bad.
    """
    try:
        text = read_text(path)
    except FileNotFoundError:
        return None
    except (OSError, SubnetEnvError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return None
    try:
        raw = parse_lines(text, str(path)).get("FLANNEL_SUBNET")
        if raw is None:
            raise SubnetEnvError("no FLANNEL_SUBNET line")
        return parse_ipv4_cidr(raw)
    except ValueError as e:
        log.warning("ignoring garbled %s (%s); a new subnet may be chosen", path, e)
        return None
