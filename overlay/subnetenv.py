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
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubnetEnv:
    network: IPv4Network
    subnet: IPv4Network
    mtu: int
    ipmasq: bool
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Network | None = None

    def render(self) -> str:
        lines = [
            f"FLANNEL_NETWORK={self.network}",
            f"FLANNEL_SUBNET={first_host(self.subnet)}",
        ]
        if self.ipv6_network is not None and self.ipv6_subnet is not None:
            lines.append(f"FLANNEL_IPV6_NETWORK={self.ipv6_network}")
            lines.append(f"FLANNEL_IPV6_SUBNET={first_host(self.ipv6_subnet)}")
        lines.append(f"FLANNEL_MTU={self.mtu}")
        lines.append(f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}")
        return "\n".join(lines) + "\n"


def first_host(net: IPv4Network | IPv6Network) -> IPv4Interface | IPv6Interface:
    """10.5.72.0/24 -> 10.5.72.1/24, flannel's FLANNEL_SUBNET form."""
    if isinstance(net, IPv4Network):
        return IPv4Interface((int(net.network_address) + 1, net.prefixlen))
    return IPv6Interface((int(net.network_address) + 1, net.prefixlen))


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


def write_subnet_env(path: Path, env: SubnetEnv) -> None:
    """Write atomically: temp file beside the target, fsync, chmod 0644, rename, fsync dir."""
    directory = path.parent
    _make_dirs(directory)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(env.render())
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


def parse_subnet_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines; raises ValueError naming the first line that is not of that form."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.replace("_", "").isalnum():
            raise ValueError(f"line {n} is not KEY=VALUE: {line!r:.60}")
        out[key] = value
    return out


def read_previous_subnet(path: Path) -> IPv4Network | None:
    """FLANNEL_SUBNET of an existing subnet.env, as a network; None (logged) when unusable."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return None
    try:
        raw = parse_subnet_env(text).get("FLANNEL_SUBNET")
        if raw is None:
            raise ValueError("no FLANNEL_SUBNET line")
        return IPv4Interface(raw).network
    except ValueError as e:
        log.warning("ignoring garbled %s (%s); a new subnet may be chosen", path, e)
        return None
