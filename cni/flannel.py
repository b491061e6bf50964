#!/usr/bin/python3 -IS
"""The `flannel` CNI meta-plugin: read subnet.env, build a delegate conf, exec the delegate.

A container runtime execs this file once per container attachment, so it must start in a few
milliseconds: standard library only, nothing from the rest of the project, no asyncio, not
even the `json` package (which pulls in `re` and `enum`, ~6 ms): the C accelerator `_json` is
used directly; and not `os` (~0.7 ms with `stat`, `posixpath`, `_collections_abc`): the
built-in `posix` module is, with three small helpers below. `overlayctl install-cni` installs
a launcher (`#!<real interpreter> -IS`: isolated, no site) that imports this module from the
bytecode compiled at install time.

Spec: flannel's CNI plugin (conf fields, subnet.env keys, delegate rules, saved delegate confs)
plus the CNI protocol (ADD, DEL, CHECK, VERSION, STATUS, GC; versions 0.3.0 to 1.1.0).
Differences from flannel: the saved delegate conf is keyed by container ID *and* ifname (the old
name is still read on DEL); CHECK, STATUS and GC do real work.

The error contract: whatever comes in (environment, stdin, subnet.env, saved confs, delegate
output), the plugin answers with a result or with CNI error JSON and a non-zero exit, never
a traceback (main() has a last resort, code 999, that the tests assert is never reached).
Everything from outside has an explicit limit (MAX_* below). A failed ADD leaves no saved
conf; DEL of an attachment ADD would refuse succeeds without touching a file.
"""

from __future__ import annotations

import posix
import sys

TYPE_CHECKING = False  # `import typing` alone costs ~10 ms of start-up: only for type checkers
if TYPE_CHECKING:
    from typing import Any, Protocol

    class Output(Protocol):
        """Where the reply goes: stdout (a file descriptor), or a BytesIO in tests."""

        def write(self, data: bytes, /) -> int: ...
        def flush(self) -> None: ...


try:  # the C accelerator: no `re`, no `enum`; plain `json` where it is missing
    import _json

    _C_JSON = True
except ImportError:  # pragma: no cover - CPython always has it
    _C_JSON = False

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"
DELEGATE_TIMEOUT = 60.0  # seconds one delegate exec may take
LOCK_TIMEOUT = 30.0  # seconds to wait for the data dir lock (GC holds it exclusively)
LOCK_NAME = ".lock"  # starts with ".", so it can never be a container ID
TMP_PREFIX = ".tmp-"
ATTACHMENT_KEY = "overlay.attachment"  # kept in the saved file only, never sent to a delegate
VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"
VERSIONS_CACHE = ".delegate-versions"  # in dataDir: what each delegate binary speaks

# Limits on what comes from outside (explicit, so that no input can exhaust memory or the stack).
MAX_STDIN = 1 << 20  # bytes of network configuration on stdin
MAX_JSON_DEPTH = 64  # nesting of JSON arrays/objects (stdin, saved confs, delegate output)
MAX_SUBNET_ENV = 64 << 10  # bytes of subnet.env
MAX_SAVED_CONF = 2 << 20  # bytes of one saved delegate conf (built from stdin + subnet.env)
MAX_DELEGATE_OUTPUT = 1 << 20  # bytes a delegate may print on stdout
MAX_CONTAINER_ID = 239  # so that "<containerID>-<ifname>" fits a 255-byte file name
MAX_PATH = 4095  # subnetFile, dataDir (PATH_MAX - 1)
SHOW = 120  # characters of an outside value quoted in an error message

# CNI error codes (spec) and this plugin's own (100+).
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_NOT_AVAILABLE = 50
ERR_NOT_AVAILABLE_LIMITED = 51
ERR_SUBNET_ENV = 100  # subnet.env exists but is unusable (missing keys, garbled values)
ERR_DELEGATE_NOT_FOUND = 101  # the delegate plugin is not in CNI_PATH
ERR_DELEGATE_FAILED = 102  # the delegate crashed, timed out or printed no CNI JSON
ERR_CHECK_MISMATCH = 103  # CHECK: the attachment no longer matches subnet.env
ERR_INTERNAL = 999  # the last resort: a bug in this plugin (never expected; tests assert it)

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_BOOL_WORDS = {
    "1": True,
    "t": True,
    "T": True,
    "true": True,
    "TRUE": True,
    "True": True,
    "0": False,
    "f": False,
    "F": False,
    "false": False,
    "FALSE": False,
    "False": False,
}


def path_join(directory: str, name: str) -> str:
    """os.path.join(directory, name) for a relative `name`, without `os`."""
    if not directory or directory.endswith("/"):
        return directory + name
    return f"{directory}/{name}"


def is_file(path: str) -> bool:
    """os.path.isfile without `os`."""
    try:
        return posix.stat(path).st_mode & 0o170000 == 0o100000
    except (OSError, ValueError):
        return False


def make_dirs(path: str, mode: int) -> None:
    """os.makedirs(path, mode, exist_ok=True) without `os`; parents get 0o777 (umask applies).

    A loop, not recursion: a path of thousands of components cannot exhaust the stack.
    """
    missing = []
    current = path
    while True:
        try:
            posix.mkdir(current, mode if current == path else 0o777)
            break
        except FileExistsError:
            if posix.stat(current).st_mode & 0o170000 != 0o040000:
                raise FileExistsError(f"{current} exists and is not a directory") from None
            break
        except FileNotFoundError:
            parent = current.rstrip("/").rpartition("/")[0]
            if not parent:
                raise
            missing.append(current)
            current = parent
    for directory in reversed(missing):
        try:
            posix.mkdir(directory, mode if directory == path else 0o777)
        except FileExistsError:
            if posix.stat(directory).st_mode & 0o170000 != 0o040000:
                raise FileExistsError(f"{directory} exists and is not a directory") from None


def show(value: object) -> str:
    """repr() of an outside value for a message, cut to SHOW characters (any length comes in)."""
    text = repr(value)
    if len(text) <= SHOW:
        return text
    size = f"{len(value)} characters" if isinstance(value, (str, bytes, list)) else "cut"
    return f"{text[:SHOW]}... ({size})"


def cut(text: str) -> str:
    """A message from elsewhere (an exception, a delegate), cut to 2 * SHOW characters."""
    return text if len(text) <= 2 * SHOW else f"{text[: 2 * SHOW]}..."


def read_file(path: str, limit: int) -> bytes | None:
    """Up to `limit` + 1 bytes of the regular file at `path` (more means: too large); None
    when it does not exist. OSError when it cannot be read or is not a regular file: opened
    non-blocking, so that a FIFO or a device cannot hang the plugin."""
    flags = posix.O_RDONLY | posix.O_CLOEXEC | posix.O_NONBLOCK
    try:
        fd = posix.open(path, flags)
    except FileNotFoundError:
        return None
    try:
        if posix.fstat(fd).st_mode & 0o170000 != 0o100000:
            raise OSError(22, "not a regular file")
        chunks = []
        size = 0
        while size <= limit:
            chunk = posix.read(fd, min(limit + 1 - size, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        posix.close(fd)


class FdOutput:
    """The reply written straight to a file descriptor (no `sys.stdout` buffering to flush at
    exit, no error when the runtime closed the pipe: the caller sees OSError)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            view = view[posix.write(self.fd, view) :]
        return len(data)

    def flush(self) -> None:
        pass


def process_environ() -> dict[str, str]:
    """os.environ as a dict, without `os` (decoded as os does: fs encoding, surrogateescape)."""
    encoding = sys.getfilesystemencoding()
    return {
        key.decode(encoding, "surrogateescape"): value.decode(encoding, "surrogateescape")
        for key, value in posix.environ.items()
    }


class CNIError(Exception):
    """An error reported to the runtime as CNI error JSON on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


# --------------------------------------------------------------------------------------------
# JSON through the C accelerator


_INFINITY = float("inf")


def _parse_float(text: str) -> float:
    """A JSON number with a fraction or exponent; one beyond float range (1e400) is refused,
    as Go refuses it, instead of becoming an infinity that cannot be written back as JSON."""
    value = float(text)
    if value in (_INFINITY, -_INFINITY):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


class _DecodeContext:
    """The attributes `_json.make_scanner` reads; NaN/Infinity are not JSON and are refused."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = staticmethod(_parse_float)
    parse_int = int  # more than 4300 digits: ValueError from int() itself

    @staticmethod
    def parse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")


def json_loads(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse one JSON document nested at most `max_depth` deep; ValueError on anything else."""
    try:
        value = _scan_json(text)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None
    if text.count("[") + text.count("{") > max_depth:  # else it cannot be that deep
        _check_depth(value, max_depth)
    return value


def _scan_json(text: str) -> Any:
    if not _C_JSON:  # pragma: no cover
        import json

        return json.loads(
            text, parse_float=_parse_float, parse_constant=_DecodeContext.parse_constant
        )
    ws = " \t\n\r"
    start = len(text) - len(text.lstrip(ws))
    scan = _json.make_scanner(_DecodeContext())  # type: ignore[arg-type]
    try:
        value, end = scan(text, start)
    except StopIteration as e:
        raise ValueError(f"expected a JSON value at character {e.value}") from None
    except SystemError:
        # _json raises its syntax errors through json.decoder, which it never imports itself:
        # on bad input, let the full json package produce the error message.
        import json

        return json.loads(
            text, parse_float=_parse_float, parse_constant=_DecodeContext.parse_constant
        )
    if text[end:].strip(ws):
        raise ValueError(f"extra data after the JSON value at character {end}")
    return value


def _check_depth(value: Any, max_depth: int) -> None:
    """ValueError when arrays/objects in `value` nest deeper than `max_depth` (a loop)."""
    level = [value]  # after k rounds: the arrays/objects at depth k + 1
    for _ in range(max_depth):
        inner: list[Any] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            if isinstance(item, (dict, list)):
                inner.extend(c for c in children if isinstance(c, (dict, list)))
        if not inner:
            return
        level = inner
    raise ValueError(f"JSON nested deeper than {max_depth} levels")


def json_dumps(value: Any) -> str:
    """Compact JSON with sorted keys and Go's HTML escaping, as flannel (Go) writes it."""
    if _C_JSON:
        encode = _json.make_encoder(
            None, _unserialisable, _json.encode_basestring, None, ":", ",", True, False, False
        )
        text = "".join(encode(value, 0))
    else:  # pragma: no cover
        import json

        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if "<" in text or ">" in text or "&" in text:
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text


def json_bytes(value: Any) -> bytes:
    """json_dumps as UTF-8. A lone surrogate (a "\\ud800" escape in the input) cannot be
    UTF-8: it becomes U+FFFD, as Go's encoder writes invalid text."""
    text = json_dumps(value)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text).encode()


def _unserialisable(value: Any) -> Any:
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


# --------------------------------------------------------------------------------------------
# Small parsers (no `re`, no `ipaddress` on the IPv4 path)


def version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def valid_name(value: str) -> bool:
    """CNI's container ID / network name pattern: ^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$."""
    return (
        bool(value)
        and value[0] not in "_.-"
        and value.isascii()
        and all(c in _NAME_CHARS for c in value)
    )


def check_ifname(ifname: str) -> None:
    """Raise CNIError(4) unless `ifname` is a usable kernel interface name."""
    problem = ""
    if not ifname:
        problem = "it is empty"
    elif any("\ud800" <= c <= "\udfff" for c in ifname):
        problem = "it is not valid UTF-8"  # undecodable bytes, kept by surrogateescape
    elif len(ifname) > 15 or len(ifname.encode()) > 15:
        problem = "it is longer than 15 bytes"
    elif ifname in (".", ".."):
        problem = "it is . or .."
    elif any(c in "/:" or c.isspace() or not c.isprintable() for c in ifname):
        problem = "it contains '/', ':', whitespace or a control character"
    if problem:
        raise CNIError(
            ERR_INVALID_ENV,
            f"invalid CNI_IFNAME {show(ifname)}: {problem}",
            "use a kernel interface name of 1-15 characters without '/', ':' or whitespace",
        )


def parse_ipv4_cidr(text: str) -> tuple[int, int]:
    """'10.1.2.3/24' -> (address as int, prefix length); ValueError on anything else."""
    addr, slash, plen = text.partition("/")
    parts = addr.split(".")
    if not slash or len(parts) != 4 or not plen.isdigit() or not plen.isascii():
        raise ValueError(f"{show(text)} is not an IPv4 CIDR like 10.1.0.0/16")
    value = 0
    for part in parts:
        if (
            not part.isdigit()
            or not part.isascii()
            or len(part) > 3
            or (len(part) > 1 and part[0] == "0")
        ):
            raise ValueError(f"{show(text)} is not an IPv4 CIDR like 10.1.0.0/16")
        octet = int(part)
        if octet > 255:
            raise ValueError(f"{show(text)} is not an IPv4 CIDR: octet {octet} > 255")
        value = value << 8 | octet
    if len(plen) > 2 or int(plen) > 32 or (len(plen) > 1 and plen[0] == "0"):
        raise ValueError(f"{show(text)} is not an IPv4 CIDR: bad prefix length {show(plen)}")
    return value, int(plen)


def ipv4_network(text: str) -> str:
    """The network of a CIDR with host bits cleared: '10.1.17.1/24' -> '10.1.17.0/24'."""
    value, prefix = parse_ipv4_cidr(text)
    mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    value &= mask
    dotted = ".".join(str(value >> shift & 0xFF) for shift in (24, 16, 8, 0))
    return f"{dotted}/{prefix}"


def ipv6_network(text: str) -> str:
    """The network of an IPv6 CIDR with host bits cleared (ipaddress imported only here)."""
    import ipaddress

    try:
        return str(ipaddress.IPv6Network(text, strict=False))
    except ValueError:
        raise ValueError(f"{show(text)} is not an IPv6 CIDR like fd00:1::/56") from None


def ipv4_in(address: str, network: str) -> bool:
    """Whether the address of CIDR `address` lies inside CIDR `network` (both IPv4)."""
    addr, _ = parse_ipv4_cidr(address if "/" in address else address + "/32")
    net, prefix = parse_ipv4_cidr(network)
    mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    return addr & mask == net & mask


# --------------------------------------------------------------------------------------------
# subnet.env


class SubnetEnv:
    """What flanneld/overlayd wrote to subnet.env, with subnets already reduced to networks."""

    def __init__(
        self,
        network: str | None,
        subnet: str | None,
        ipv6_network: str | None,
        ipv6_subnet: str | None,
        mtu: int,
        ipmasq: bool,
    ) -> None:
        self.network = network
        self.subnet = subnet
        self.ipv6_network = ipv6_network
        self.ipv6_subnet = ipv6_subnet
        self.mtu = mtu
        self.ipmasq = ipmasq


def parse_subnet_env(text: str, path: str = "subnet.env") -> SubnetEnv:
    """Parse subnet.env text. CNIError(100) names every missing key or bad value."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise CNIError(
                ERR_SUBNET_ENV,
                f"{path}: line {show(raw)} is not KEY=VALUE",
                "the file is written by overlayd/flanneld; restart it to rewrite the file",
            )
        values[key.strip()] = value.strip()
    missing = []
    if "FLANNEL_NETWORK" not in values and "FLANNEL_IPV6_NETWORK" not in values:
        missing.append("FLANNEL_NETWORK or FLANNEL_IPV6_NETWORK")
    if "FLANNEL_SUBNET" not in values and "FLANNEL_IPV6_SUBNET" not in values:
        missing.append("FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET")
    for key in ("FLANNEL_MTU", "FLANNEL_IPMASQ"):
        if key not in values:
            missing.append(key)
    if missing:
        raise CNIError(
            ERR_SUBNET_ENV,
            f"{path} is missing {', '.join(missing)}",
            "the file is written by overlayd/flanneld; check that it runs and has a lease",
        )
    bad: list[str] = []
    parsed: dict[str, str | None] = {}
    for key, reduce in (
        ("FLANNEL_NETWORK", ipv4_network),
        ("FLANNEL_SUBNET", ipv4_network),
        ("FLANNEL_IPV6_NETWORK", ipv6_network),
        ("FLANNEL_IPV6_SUBNET", ipv6_network),
    ):
        parsed[key] = None
        if key in values:
            try:
                parsed[key] = reduce(values[key])
            except ValueError as e:
                bad.append(f"{key}: {e}")
    mtu_text = values["FLANNEL_MTU"]
    # At most 5 digits: int() of thousands of digits is slow, and refused beyond 4300.
    ok = mtu_text.isdigit() and mtu_text.isascii() and len(mtu_text) <= 5
    mtu = int(mtu_text) if ok else 0
    if not 68 <= mtu <= 65535:
        bad.append(f"FLANNEL_MTU: {show(mtu_text)} is not an MTU between 68 and 65535")
    ipmasq = _BOOL_WORDS.get(values["FLANNEL_IPMASQ"])
    if ipmasq is None:
        bad.append(f"FLANNEL_IPMASQ: {show(values['FLANNEL_IPMASQ'])} is not true or false")
    if (parsed["FLANNEL_SUBNET"] is None) != (parsed["FLANNEL_NETWORK"] is None) and not bad:
        bad.append("FLANNEL_NETWORK and FLANNEL_SUBNET must be given together")
    if (parsed["FLANNEL_IPV6_SUBNET"] is None) != (parsed["FLANNEL_IPV6_NETWORK"] is None):
        if not bad:
            bad.append("FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET must be given together")
    if bad:
        raise CNIError(
            ERR_SUBNET_ENV,
            f"{path} has bad values: {'; '.join(bad)}",
            "the file is written by overlayd/flanneld; restart it to rewrite the file",
        )
    return SubnetEnv(
        parsed["FLANNEL_NETWORK"],
        parsed["FLANNEL_SUBNET"],
        parsed["FLANNEL_IPV6_NETWORK"],
        parsed["FLANNEL_IPV6_SUBNET"],
        mtu,
        bool(ipmasq),
    )


def load_subnet_env(path: str, missing_code: int = ERR_TRY_AGAIN_LATER) -> SubnetEnv:
    """Read and parse subnet.env: code `missing_code` when it is absent, 5 when it cannot be
    read (or is not a regular file), 100 when it is unusable (too large, not UTF-8, bad)."""
    try:
        data = read_file(path, MAX_SUBNET_ENV)
    except OSError as e:
        raise CNIError(ERR_IO, f"cannot read {path}: {e.strerror or e}") from None
    if data is None:
        raise CNIError(
            missing_code,
            f"{path} does not exist",
            "overlayd/flanneld writes it once it holds a subnet lease: check that it runs",
        )
    hint = "the file is written by overlayd/flanneld; restart it to rewrite the file"
    if len(data) > MAX_SUBNET_ENV:
        raise CNIError(ERR_SUBNET_ENV, f"{path} is larger than {MAX_SUBNET_ENV} bytes", hint)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CNIError(ERR_SUBNET_ENV, f"{path} is not UTF-8 text: {e}", hint) from None
    return parse_subnet_env(text, path)


# --------------------------------------------------------------------------------------------
# The network configuration and the delegate


class NetConf:
    """Our validated network configuration (the plugin's stdin)."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.cni_version: str = raw["cniVersion"]
        self.name: str = raw["name"]
        self.subnet_file: str = raw.get("subnetFile") or DEFAULT_SUBNET_FILE
        self.data_dir: str = raw.get("dataDir") or DEFAULT_DATA_DIR
        self.delegate: dict[str, Any] = dict(raw.get("delegate") or {})
        self.ipam: dict[str, Any] = dict(raw.get("ipam") or {})
        self.runtime_config: Any = raw.get("runtimeConfig")


def _conf_error(msg: str, details: str = "") -> CNIError:
    return CNIError(ERR_INVALID_CONFIG, msg, details)


def parse_conf(data: bytes | str, command: str = "ADD") -> NetConf:
    """Decode and validate the network configuration; CNIError(6/1/7) on bad input."""
    if len(data) > MAX_STDIN:
        raise CNIError(
            ERR_DECODE,
            f"the network configuration on stdin is larger than {MAX_STDIN} bytes",
        )
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        raw = json_loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CNIError(
            ERR_DECODE, f"cannot decode the network configuration on stdin: {cut(str(e))}"
        ) from None
    if not isinstance(raw, dict):
        raise CNIError(ERR_DECODE, "the network configuration on stdin must be a JSON object")
    if "plugins" in raw and "type" not in raw:  # a conflist run by hand (issue 12)
        raise _conf_error(
            'handed a network configuration list (it has a "plugins" key): a runtime gives '
            "each plugin one entry of the list, not the list",
            "to run the plugin by hand, give it one plugin conf: "
            "jq '{cniVersion, name} + (.plugins[] | select(.type == \"flannel\"))' "
            "/etc/cni/net.d/10-flannel.conflist (see docs/cni.md, running the plugin by hand)",
        )
    version = raw.get("cniVersion")
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            f"incompatible CNI version {show(version)}",
            f"set cniVersion to one of {', '.join(SUPPORTED_VERSIONS)}",
        )
    vt = version_tuple(version)
    if command == "CHECK" and vt < (0, 4, 0):
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            f"CHECK needs cniVersion 0.4.0 or later, the configuration has {version}",
        )
    if command in ("STATUS", "GC") and vt < (1, 1, 0):
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            f"{command} needs cniVersion 1.1.0 or later, the configuration has {version}",
        )
    name = raw.get("name")
    if not isinstance(name, str) or not valid_name(name):
        raise _conf_error(
            f"invalid network name {show(name)}",
            "name must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$, e.g. cbr0",
        )
    for key in ("subnetFile", "dataDir"):
        value = raw.get(key)
        if value is not None and (
            not isinstance(value, str)
            or not value.startswith("/")
            or "\x00" in value
            or len(value) > MAX_PATH
        ):
            raise _conf_error(
                f"invalid {key} {show(value)}",
                f"{key} must be an absolute path of at most {MAX_PATH} characters",
            )
    for key in ("delegate", "ipam"):
        value = raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise _conf_error(f"invalid {key} {show(value)}", f"{key} must be a JSON object")
    delegate = raw.get("delegate") or {}
    if "name" in delegate or "ipam" in delegate:
        raise _conf_error(
            "'delegate' dictionary, if present, may not contain 'name' or 'ipam' keys",
            "move 'ipam' settings to the top-level 'ipam' object; the name is the network's",
        )
    if "type" in delegate:
        dtype = delegate["type"]
        if not isinstance(dtype, str) or not valid_name(dtype):
            raise _conf_error(
                f"invalid delegate type {show(dtype)}",
                "delegate.type must be a plugin name such as bridge, found in CNI_PATH",
            )
    ipam = raw.get("ipam") or {}
    if "type" in ipam and (not isinstance(ipam["type"], str) or not valid_name(ipam["type"])):
        raise _conf_error(
            f"invalid ipam type {show(ipam['type'])}", "ipam.type must be a plugin name"
        )
    for key in ("subnet", "ranges", "rangeStart", "rangeEnd"):
        if key in ipam:
            raise _conf_error(
                f"ipam.{key} cannot be set for flannel",
                "the subnet comes from subnet.env: remove ipam." + key,
            )
    routes = ipam.get("routes")
    if routes is not None:
        if not isinstance(routes, list) or not all(
            isinstance(r, dict) and isinstance(r.get("dst"), str) for r in routes
        ):
            raise _conf_error(
                f"invalid ipam.routes {show(routes)}",
                'ipam.routes must be a list of objects like {"dst": "192.168.0.0/16"}',
            )
    return NetConf(raw)


def build_delegate(conf: NetConf, env: SubnetEnv) -> dict[str, Any]:
    """The delegate network configuration, by flannel's rules."""
    delegate = dict(conf.delegate)
    delegate["name"] = conf.name
    delegate.setdefault("type", "bridge")
    delegate.setdefault("ipMasq", not env.ipmasq)
    delegate.setdefault("mtu", env.mtu)
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
    delegate["cniVersion"] = conf.cni_version
    ipam = dict(conf.ipam)
    ipam.setdefault("type", "host-local")
    ranges = []
    if env.subnet:
        ranges.append([{"subnet": env.subnet}])
    if env.ipv6_subnet:
        ranges.append([{"subnet": env.ipv6_subnet}])
    ipam["ranges"] = ranges
    routes = [dict(r) for r in ipam.get("routes") or []]
    if env.network:
        routes.append({"dst": env.network})
    if env.ipv6_network:
        routes.append({"dst": env.ipv6_network})
    ipam["routes"] = routes
    delegate["ipam"] = ipam
    if conf.runtime_config is not None:
        delegate["runtimeConfig"] = conf.runtime_config
    return delegate


# --------------------------------------------------------------------------------------------
# Results between CNI versions


def convert_result(result: dict[str, Any], to_version: str) -> dict[str, Any]:
    """Convert a 0.3.0..1.1.0 result: 0.3.x/0.4.0 carry ips[].version, 1.0.0+ do not."""
    out = dict(result)
    out["cniVersion"] = to_version
    ips = result.get("ips")
    if isinstance(ips, list):
        modern = version_tuple(to_version) >= (1, 0, 0)
        converted = []
        for ip in ips:
            if isinstance(ip, dict):
                ip = dict(ip)
                if modern:
                    ip.pop("version", None)
                else:
                    ip["version"] = "6" if ":" in str(ip.get("address", "")) else "4"
            converted.append(ip)
        out["ips"] = converted
    return out


def fill_route_gateways(result: dict[str, Any]) -> dict[str, Any]:
    """Give each gateway-less route the gateway of its family's address, as the kernel has it.

    The reference bridge plugin installs the routes host-local hands it via the address's
    gateway, but reports them without one; its own CHECK then looks for a gateway-less route and
    fails on a healthy container. Filling in what was really installed keeps CHECK meaningful.
    """
    ips = result.get("ips")
    routes = result.get("routes")
    if not isinstance(ips, list) or not isinstance(routes, list):
        return result
    gateways: dict[bool, str] = {}
    for ip in ips:
        if isinstance(ip, dict) and isinstance(ip.get("gateway"), str):
            gateways.setdefault(":" in ip["gateway"], ip["gateway"])
    filled = []
    for route in routes:
        if isinstance(route, dict) and not route.get("gw") and isinstance(route.get("dst"), str):
            gateway = gateways.get(":" in route["dst"])
            if gateway:
                route = dict(route, gw=gateway)
        filled.append(route)
    return dict(result, routes=filled)


# --------------------------------------------------------------------------------------------
# The CNI environment


class Args:
    """The validated CNI_* environment of one call."""

    def __init__(self, environ: dict[str, str], command: str) -> None:
        self.environ = environ
        self.command = command
        self.container_id = environ.get("CNI_CONTAINERID", "")
        self.netns = environ.get("CNI_NETNS", "")
        self.ifname = environ.get("CNI_IFNAME", "")
        self.path = [p for p in environ.get("CNI_PATH", "").split(":") if p]
        self.cni_args: list[tuple[str, str]] = []  # filled in by check_args


def parse_cni_args(text: str) -> list[tuple[str, str]]:
    """CNI_ARGS 'K=V;K=V' -> pairs; CNIError(4) on a malformed item."""
    pairs = []
    for item in text.split(";"):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CNIError(
                ERR_INVALID_ENV,
                f"invalid CNI_ARGS item {show(item)} in {show(text)}",
                "CNI_ARGS must be KEY=VALUE pairs separated by ';'",
            )
        pairs.append((key, value))
    return pairs


def check_attachment(args: Args) -> None:
    """CNI_CONTAINERID and CNI_IFNAME name the saved conf file: CNIError(4) unless both are
    names ADD accepts (so no path traversal, and the file name fits in 255 bytes)."""
    cid = args.container_id
    if not cid:
        raise CNIError(ERR_INVALID_ENV, "CNI_CONTAINERID is not set")
    if not valid_name(cid):
        raise CNIError(
            ERR_INVALID_ENV,
            f"invalid CNI_CONTAINERID {show(cid)}",
            "a container ID must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$",
        )
    if len(cid) > MAX_CONTAINER_ID:
        raise CNIError(
            ERR_INVALID_ENV,
            f"invalid CNI_CONTAINERID {show(cid)}: longer than {MAX_CONTAINER_ID} characters",
            "the saved delegate conf is named <containerID>-<ifname>, at most 255 bytes",
        )
    check_ifname(args.ifname)


def check_args(args: Args) -> None:
    """Validate what ADD, CHECK, STATUS and GC need from the environment, before any file is
    touched. DEL is lenient: cmd_del checks what it needs itself (see there)."""
    if args.command in ("ADD", "CHECK"):
        check_attachment(args)
        if not args.netns:
            raise CNIError(ERR_INVALID_ENV, f"CNI_NETNS is not set for {args.command}")
    if args.command != "DEL":
        args.cni_args = parse_cni_args(args.environ.get("CNI_ARGS", ""))
        require_path(args)


def require_path(args: Args) -> None:
    if not args.path:
        raise CNIError(
            ERR_INVALID_ENV, "CNI_PATH is not set", "set it to the CNI plugin dirs, ':'-separated"
        )


# --------------------------------------------------------------------------------------------
# The data dir: saved delegate confs, a lock, atomic writes


class DataDir:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock_fd = -1

    def ensure(self) -> None:
        try:
            make_dirs(self.path, 0o700)
        except OSError as e:
            raise CNIError(ERR_IO, f"cannot create dataDir {self.path}: {e}") from None

    def lock(self, exclusive: bool) -> bool:
        """Take the data dir lock (GC exclusive, everyone else shared); False: no dataDir."""
        import fcntl
        import time

        path = path_join(self.path, LOCK_NAME)
        flags = posix.O_RDWR | posix.O_CLOEXEC | posix.O_CREAT | posix.O_NOFOLLOW
        try:
            fd = posix.open(path, flags, 0o600)
        except (FileNotFoundError, NotADirectoryError):
            return False  # the dataDir itself is missing (or a file): nothing is saved there
        except OSError as e:
            raise CNIError(ERR_IO, f"cannot open {path}: {e}") from None
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, op)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    posix.close(fd)
                    raise CNIError(
                        ERR_TRY_AGAIN_LATER,
                        f"timed out after {LOCK_TIMEOUT:.0f} s waiting for the lock {path}",
                    ) from None
                time.sleep(0.005)
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd >= 0:
            posix.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = -1

    def conf_path(self, container_id: str, ifname: str) -> str:
        return path_join(self.path, f"{container_id}-{ifname}")

    def old_conf_path(self, container_id: str) -> str:
        """Where flannel keeps it: by container ID alone."""
        return path_join(self.path, container_id)

    def write(self, path: str, data: bytes) -> None:
        """Write atomically: a temp file in the same dir (0600), then rename over `path`."""
        # Named by our pid alone: "<prefix><containerID>-<ifname>" would not fit 255 bytes.
        tmp = path_join(self.path, f"{TMP_PREFIX}{posix.getpid()}")
        try:
            flags = posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC
            fd = posix.open(tmp, flags, 0o600)
            try:
                FdOutput(fd).write(data)
            finally:
                posix.close(fd)
            posix.rename(tmp, path)
        except OSError as e:
            try:
                posix.unlink(tmp)
            except OSError:
                pass
            raise CNIError(ERR_IO, f"cannot write {path}: {e}") from None

    def read(self, path: str) -> dict[str, Any] | None:
        """The saved conf at `path`; None when there is none."""
        hint = "delete the file by hand after cleaning up the container's network"
        try:
            data = read_file(path, MAX_SAVED_CONF)
        except OSError as e:
            raise CNIError(
                ERR_IO, f"cannot read the saved delegate conf {path}: {e.strerror or e}", hint
            ) from None
        if data is None:
            return None
        if len(data) > MAX_SAVED_CONF:
            raise CNIError(
                ERR_DECODE,
                f"the saved delegate conf {path} is larger than {MAX_SAVED_CONF} bytes",
                hint,
            )
        try:
            conf = json_loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CNIError(
                ERR_DECODE, f"the saved delegate conf {path} is not JSON: {cut(str(e))}", hint
            ) from None
        if not isinstance(conf, dict) or not isinstance(conf.get("type"), str):
            raise CNIError(ERR_DECODE, f"the saved delegate conf {path} has no plugin type", hint)
        if not valid_name(conf["type"]):
            raise CNIError(
                ERR_DECODE,
                f"the saved delegate conf {path} names no plugin: type {show(conf['type'])}",
                hint,
            )
        return conf

    def remove(self, path: str) -> None:
        try:
            posix.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CNIError(ERR_IO, f"cannot remove {path}: {e}") from None

    def entries(self) -> list[str]:
        try:
            return sorted(posix.listdir(self.path))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise CNIError(ERR_IO, f"cannot list dataDir {self.path}: {e}") from None


def strip_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """The delegate conf as the delegate got it: our bookkeeping key removed."""
    conf = dict(saved)
    conf.pop(ATTACHMENT_KEY, None)
    return conf


# --------------------------------------------------------------------------------------------
# Running a delegate


def find_plugin(name: str, path: list[str]) -> str:
    for directory in path:
        candidate = path_join(directory, name)
        if is_file(candidate) and posix.access(candidate, posix.X_OK):
            return candidate
    raise CNIError(
        ERR_DELEGATE_NOT_FOUND,
        f"failed to find plugin {name!r} in path {path}",
        "install the reference CNI plugins (e.g. Debian's containernetworking-plugins) "
        "in a CNI_PATH dir",
    )


class SpawnError(CNIError):
    """The delegate could not be started at all (so it cannot have done anything)."""


def exec_plugin(
    exe: str,
    stdin: bytes,
    environ: dict[str, str],
    timeout: float = DELEGATE_TIMEOUT,
    limit: int = MAX_DELEGATE_OUTPUT,
) -> tuple[int, bytes]:
    """Run a plugin: conf on stdin, our stderr passed through. Returns (exit status, stdout).

    stdin is fed and stdout read in one poll loop, so a delegate that does not read its stdin
    cannot block us; more than `limit` bytes of output, or no exit within `timeout`, and the
    delegate is killed (CNIError 102 / 11).
    """
    import select
    import time

    in_r, in_w = posix.pipe()
    out_r, out_w = posix.pipe()
    try:
        pid = posix.posix_spawn(
            exe,
            [exe],
            environ,
            file_actions=[(posix.POSIX_SPAWN_DUP2, in_r, 0), (posix.POSIX_SPAWN_DUP2, out_w, 1)],
        )
    except (OSError, ValueError) as e:
        for fd in (in_r, in_w, out_r, out_w):
            posix.close(fd)
        raise SpawnError(ERR_DELEGATE_FAILED, f"cannot run {exe}: {e}") from None
    posix.close(in_r)
    posix.close(out_w)
    posix.set_blocking(in_w, False)
    pending = memoryview(stdin)
    deadline = time.monotonic() + timeout
    chunks = []
    size = 0
    poller = select.poll()
    poller.register(out_r, select.POLLIN)
    poller.register(in_w, select.POLLOUT)
    problem = ""
    try:
        while in_w >= 0 or out_r >= 0:
            left = deadline - time.monotonic()
            events = poller.poll(left * 1000) if left > 0 else []
            if not events:
                problem = "timeout"
                break
            for fd, _ in events:
                if fd == in_w:
                    try:
                        pending = pending[posix.write(in_w, pending[: 1 << 16]) :]
                    except BlockingIOError:
                        continue
                    except OSError:  # it closed its stdin (EPIPE): it has all it wants
                        pending = pending[:0]
                    if not pending:
                        poller.unregister(in_w)
                        posix.close(in_w)
                        in_w = -1
                elif fd == out_r:
                    chunk = posix.read(out_r, 1 << 16)
                    if chunk:
                        chunks.append(chunk)
                        size += len(chunk)
                    if size > limit:
                        problem = "too much output"
                        break
                    if not chunk:  # EOF: whatever is left unread on stdin, it will not read
                        poller.unregister(out_r)
                        posix.close(out_r)
                        out_r = -1
                        if in_w >= 0:
                            poller.unregister(in_w)
                            posix.close(in_w)
                            in_w = -1
            if problem:
                break
    finally:
        for fd in (in_w, out_r):
            if fd >= 0:
                posix.close(fd)
    while not problem:
        done, status = posix.waitpid(pid, posix.WNOHANG)
        if done:
            return posix.waitstatus_to_exitcode(status), b"".join(chunks)
        left = deadline - time.monotonic()
        if left <= 0:
            problem = "timeout"
        else:
            _wait_exit(pid, left)
    posix.kill(pid, 9)
    posix.waitpid(pid, 0)
    if problem == "timeout":
        raise CNIError(
            ERR_TRY_AGAIN_LATER,
            f"plugin {exe} did not finish within {timeout:.0f} s and was killed",
        )
    raise CNIError(
        ERR_DELEGATE_FAILED, f"plugin {exe} printed more than {limit} bytes and was killed"
    )


def _wait_exit(pid: int, timeout: float) -> None:
    """Sleep until `pid` exits (a pidfd turns readable) or `timeout` passes; no reaping."""
    import select

    try:
        fd = posix.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): a short nap instead
        import time

        time.sleep(min(timeout, 0.0005))
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll(timeout * 1000)
    finally:
        posix.close(fd)


class Delegate:
    """Calls the delegate plugin named by a delegate conf, converting versions when needed.

    A delegate that refuses the conf's version is asked which versions it speaks (VERSION) and
    called again at the newest older one. With a `cache_dir` (the dataDir), that answer is
    remembered per delegate binary (path, inode, size, mtime), so later calls go straight to the
    right version: one exec instead of three (e.g. a 1.1.0 network with the 1.0.0 reference
    plugins).
    """

    def __init__(self, args: Args, conf: dict[str, Any], cache_dir: str | None = None) -> None:
        self.args = args
        self.conf = conf
        self.exe = find_plugin(str(conf["type"]), args.path)
        self.cache_dir = cache_dir
        self.ran = False  # whether a command (not VERSION) was exec'd: it may have done work

    def supported_versions(self, fresh: bool = False) -> list[str]:
        if not fresh:
            cached = self.cached_versions()
            if cached is not None:
                return cached
        env = dict(self.args.environ, CNI_COMMAND="VERSION")
        status, out = exec_plugin(self.exe, b'{"cniVersion":"0.3.0"}', env)
        try:
            reply = json_loads(out.decode())
            versions = reply["supportedVersions"]
            if status == 0 and isinstance(versions, list):
                supported = [str(v) for v in versions]
                self.remember_versions(supported)
                return supported
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            pass
        return []

    def _exe_key(self) -> list[int] | None:
        try:
            st = posix.stat(self.exe)
        except OSError:
            return None
        return [st.st_ino, st.st_size, st.st_mtime_ns]

    def _read_cache(self) -> dict[str, Any]:
        if not self.cache_dir:
            return {}
        try:  # a cache: anything wrong with it (even a FIFO or 1 GB) means "ask again"
            data = read_file(path_join(self.cache_dir, VERSIONS_CACHE), MAX_SAVED_CONF)
            if data is None or len(data) > MAX_SAVED_CONF:
                return {}
            cache = json_loads(data.decode("utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        return cache if isinstance(cache, dict) else {}

    def cached_versions(self) -> list[str] | None:
        """What this delegate binary said it speaks, if it was asked before and is unchanged."""
        entry = self._read_cache().get(self.exe)
        if not isinstance(entry, dict) or not isinstance(entry.get("versions"), list):
            return None
        if entry.get("stat") != self._exe_key():
            return None
        return [str(v) for v in entry["versions"]]

    def remember_versions(self, versions: list[str]) -> None:
        """Best effort (a cache): written atomically, errors ignored."""
        key = self._exe_key()
        if not self.cache_dir or key is None:
            return
        cache = self._read_cache()
        cache[self.exe] = {"stat": key, "versions": versions}
        path = path_join(self.cache_dir, VERSIONS_CACHE)
        tmp = path_join(self.cache_dir, f"{TMP_PREFIX}{VERSIONS_CACHE}.{posix.getpid()}")
        try:
            flags = posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC
            fd = posix.open(tmp, flags, 0o600)
            try:
                FdOutput(fd).write(json_bytes(cache))
            finally:
                posix.close(fd)
            posix.rename(tmp, path)
        except OSError:
            try:
                posix.unlink(tmp)
            except OSError:
                pass

    def _at_version(self, version: str) -> dict[str, Any]:
        conf = dict(self.conf, cniVersion=version)
        if isinstance(conf.get("prevResult"), dict):
            conf["prevResult"] = convert_result(conf["prevResult"], version)
        return conf

    @staticmethod
    def _newest_older(supported: list[str], want: str) -> str | None:
        older = [
            v
            for v in supported
            if v in SUPPORTED_VERSIONS and version_tuple(v) < version_tuple(want)
        ]
        return max(older, key=version_tuple) if older else None

    def call(self, command: str, extra_env: dict[str, str] | None = None) -> bytes:
        """Run `command`; the result as our conf's version (raw bytes when no conversion)."""
        env = dict(self.args.environ, CNI_COMMAND=command)
        if extra_env:
            env.update(extra_env)
        want = str(self.conf.get("cniVersion", "0.3.0"))
        conf = self.conf
        known = self.cached_versions()
        if known is not None and want not in known:
            use = self._newest_older(known, want)
            if use:
                conf = self._at_version(use)
        status, out = self._exec(json_bytes(conf), env)
        if status != 0:
            error = self._error(out, command, status)
            if error.get("code") != ERR_INCOMPATIBLE_VERSION:
                raise _DelegateError(out, error)
            # The delegate does not speak that version: use the newest older one it does.
            use = self._newest_older(self.supported_versions(fresh=True), want)
            if not use or use == conf.get("cniVersion"):
                raise _DelegateError(out, error)
            conf = self._at_version(use)
            status, out = self._exec(json_bytes(conf), env)
            if status != 0:
                raise _DelegateError(out, self._error(out, command, status))
        if not out.strip() and command != "ADD":
            return b""  # DEL, CHECK, STATUS, GC print nothing on success
        try:
            result = json_loads(out.decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise CNIError(
                ERR_DELEGATE_FAILED,
                f"delegate {self.exe} {command} printed no JSON result ({cut(str(e))})",
                out.decode(errors="replace")[:500],
            ) from None
        if not isinstance(result, dict):
            raise CNIError(ERR_DELEGATE_FAILED, f"delegate {self.exe} {command}: bad result")
        if result.get("cniVersion") == want:
            return out
        return json_bytes(convert_result(result, want))

    def _exec(self, stdin: bytes, env: dict[str, str]) -> tuple[int, bytes]:
        ran, self.ran = self.ran, True
        try:
            return exec_plugin(self.exe, stdin, env)
        except SpawnError:
            self.ran = ran  # it never started
            raise

    def _error(self, out: bytes, command: str, status: int) -> dict[str, Any]:
        """The delegate's CNI error; a CNIError(102) when it printed none."""
        try:
            error = json_loads(out.decode())
            code = error.get("code") if isinstance(error, dict) else None
            if isinstance(code, int) and not isinstance(code, bool) and code > 0:
                return error  # type: ignore[no-any-return]
        except (ValueError, UnicodeDecodeError):
            pass
        raise CNIError(
            ERR_DELEGATE_FAILED,
            f"delegate {self.exe} {command} failed with exit status {status}",
            out.decode(errors="replace")[:500],
        )


class _DelegateError(Exception):
    """A delegate's own CNI error, passed on to the runtime as it was printed."""

    def __init__(self, out: bytes, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('msg', '')} (code {error.get('code')})")
        self.out = out
        self.error = error


# --------------------------------------------------------------------------------------------
# Commands


def cmd_add(args: Args, conf: NetConf) -> bytes:
    """ADD; the delegate's result. Everything that can be checked is checked before the first
    write (subnet.env, the delegate conf, the delegate binary); after it, a failure undoes
    what was done: the delegate's DEL when it ran (it may have half-succeeded), and the
    saved conf is removed, whatever that DEL says."""
    env = load_subnet_env(conf.subnet_file)
    delegate_conf = build_delegate(conf, env)
    data = DataDir(conf.data_dir)
    delegate = Delegate(args, delegate_conf, data.path)  # 101 before anything is written
    saved = json_bytes(
        dict(
            delegate_conf,
            **{ATTACHMENT_KEY: {"containerID": args.container_id, "ifname": args.ifname}},
        )
    )
    data.ensure()
    if not data.lock(exclusive=False):
        raise CNIError(ERR_IO, f"the dataDir {data.path} vanished during ADD")
    try:
        path = data.conf_path(args.container_id, args.ifname)
        data.write(path, saved)
        try:
            return delegate.call("ADD")
        except BaseException as e:
            _undo_add(delegate, data, path, e)
            raise
    finally:
        data.unlock()


def _undo_add(delegate: Delegate, data: DataDir, path: str, error: BaseException) -> None:
    """After a failed ADD: the delegate's DEL if it ran, then the saved conf goes. A failure
    of either is added to the error's details; the ADD's own error is what the runtime gets."""
    notes = []
    if delegate.ran:
        try:
            delegate.call("DEL")
        except (CNIError, _DelegateError) as e:
            notes.append(f"the delegate's DEL after the failed ADD failed too: {e}")
    try:
        data.remove(path)
    except CNIError as e:
        notes.append(e.msg)
    if notes and isinstance(error, CNIError):
        error.details = "; ".join([error.details, *notes] if error.details else notes)


def cmd_del(args: Args, conf: NetConf) -> None:
    """DEL succeeds when there is nothing to delete: no dataDir, no saved conf, or an
    attachment ADD would refuse (a container ID or ifname that no saved file can be named
    after: nothing was ever saved for it, and no file is touched)."""
    try:
        check_attachment(args)
    except CNIError:
        return
    data = DataDir(conf.data_dir)
    if not data.lock(exclusive=False):
        return  # no dataDir: nothing was ever added here
    try:
        path = data.conf_path(args.container_id, args.ifname)
        saved = data.read(path)
        if saved is None:
            path = data.old_conf_path(args.container_id)
            saved = data.read(path)
        if saved is None:
            return  # already deleted, or never added: success
        require_path(args)
        Delegate(args, strip_saved(saved), data.path).call("DEL")
        data.remove(path)
    finally:
        data.unlock()


def cmd_check(args: Args, conf: NetConf) -> None:
    env = load_subnet_env(conf.subnet_file, missing_code=ERR_NOT_AVAILABLE)
    data = DataDir(conf.data_dir)
    if not data.lock(exclusive=False):
        saved = None
    else:
        try:
            saved = data.read(data.conf_path(args.container_id, args.ifname))
            if saved is None:
                saved = data.read(data.old_conf_path(args.container_id))
        finally:
            data.unlock()
    if saved is None:
        raise CNIError(
            ERR_UNKNOWN_CONTAINER,
            f"no saved delegate conf for container {args.container_id} "
            f"interface {args.ifname} in {conf.data_dir}",
            "the attachment was never added through this plugin, or was deleted",
        )
    delegate_conf = strip_saved(saved)
    want = build_delegate(conf, env)
    saved_ipam = delegate_conf.get("ipam")
    have_ranges = saved_ipam.get("ranges") if isinstance(saved_ipam, dict) else None
    if have_ranges != want["ipam"]["ranges"]:
        raise CNIError(
            ERR_CHECK_MISMATCH,
            f"container {args.container_id} was attached to ranges {show(have_ranges)}, "
            f"but {conf.subnet_file} now gives {want['ipam']['ranges']}",
            "the host's subnet lease changed: recreate the container",
        )
    prev = conf.raw.get("prevResult")
    if isinstance(prev, dict):
        delegate_conf["prevResult"] = fill_route_gateways(convert_result(prev, conf.cni_version))
    delegate_conf["cniVersion"] = conf.cni_version
    Delegate(args, delegate_conf, conf.data_dir).call("CHECK")


def cmd_status(args: Args, conf: NetConf) -> None:
    env = load_subnet_env(conf.subnet_file, missing_code=ERR_NOT_AVAILABLE)
    delegate = Delegate(args, build_delegate(conf, env), conf.data_dir)
    if conf.cni_version in delegate.supported_versions():
        delegate.call("STATUS")


def cmd_gc(args: Args, conf: NetConf) -> None:
    valid = conf.raw.get(VALID_ATTACHMENTS_KEY) or []
    if not isinstance(valid, list) or not all(
        isinstance(a, dict)
        and isinstance(a.get("containerID"), str)
        and isinstance(a.get("ifname"), str)
        for a in valid
    ):
        raise _conf_error(
            f"invalid {VALID_ATTACHMENTS_KEY} {valid!r}",
            'it must be a list of {"containerID": ..., "ifname": ...} objects',
        )
    keep_names = set()
    for a in valid:
        keep_names.add(f"{a['containerID']}-{a['ifname']}")
        keep_names.add(a["containerID"])  # flannel's old name
    failures: list[str] = []
    data = DataDir(conf.data_dir)
    if data.lock(exclusive=True):
        try:
            for name in data.entries():
                path = path_join(data.path, name)
                if name.startswith(TMP_PREFIX):  # a crashed ADD's leftover (no ADD runs now)
                    data.remove(path)
                    continue
                if name in keep_names or not valid_name(name) or not is_file(path):
                    continue
                try:
                    saved = data.read(path)
                    if saved is None:
                        continue
                    attachment = saved.get(ATTACHMENT_KEY)
                    if not isinstance(attachment, dict):
                        attachment = {}  # flannel's own files have none
                    cid = attachment.get("containerID")
                    cid = cid if isinstance(cid, str) and cid else name
                    ifname = attachment.get("ifname")
                    if not isinstance(ifname, str) or not ifname:
                        ifname = "eth0"  # flannel's files: eth0
                    env = {"CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_NETNS": ""}
                    Delegate(args, strip_saved(saved), data.path).call("DEL", env)
                    data.remove(path)
                except (CNIError, _DelegateError) as e:
                    failures.append(f"{name}: {e}")
        finally:
            data.unlock()
    # A delegate that speaks 1.1.0 also collects its own garbage.
    try:
        env_file = load_subnet_env(conf.subnet_file)
    except CNIError:
        env_file = None
    if env_file is not None:
        delegate_conf = build_delegate(conf, env_file)
        delegate_conf[VALID_ATTACHMENTS_KEY] = valid
        delegate = Delegate(args, delegate_conf, conf.data_dir)
        if conf.cni_version in delegate.supported_versions():
            delegate.call("GC")
    if failures:
        raise CNIError(
            ERR_DELEGATE_FAILED,
            f"GC could not release {len(failures)} attachment(s)",
            "; ".join(failures),
        )


def cmd_version(stdin: bytes) -> bytes:
    """VERSION always answers: with the conf's cniVersion when it names one, else ours."""
    version = LATEST_VERSION
    try:
        conf = json_loads(stdin.decode()) if stdin.strip() and len(stdin) <= MAX_STDIN else {}
        if isinstance(conf, dict) and isinstance(conf.get("cniVersion"), str):
            version = conf["cniVersion"][:64]
    except (ValueError, UnicodeDecodeError):
        pass
    return json_bytes({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})


COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")


def read_stdin(limit: int = MAX_STDIN) -> bytes:
    """stdin, up to `limit` + 1 bytes (more is refused by parse_conf; /dev/zero ends too)."""
    chunks = []
    size = 0
    while size <= limit:
        try:
            chunk = posix.read(0, min(limit + 1 - size, 1 << 16))
        except OSError as e:  # closed (EBADF), a directory (EISDIR), ...
            raise CNIError(ERR_IO, f"cannot read the network configuration on stdin: {e}") from None
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def error_reply(version: str, code: int, msg: str, details: str = "") -> bytes:
    error: dict[str, Any] = {"cniVersion": version, "code": code, "msg": msg}
    if details:
        error["details"] = details
    return json_bytes(error)


def run(environ: dict[str, str] | None, stdin: bytes | None, version: list[str]) -> bytes:
    """One CNI call: the reply to print on success; CNIError/_DelegateError on failure.
    `version` receives the conf's cniVersion as soon as it is known (for the error reply)."""
    environ = process_environ() if environ is None else environ
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        if not command:
            sys.stderr.write(
                "flannel: a CNI plugin (overlay), run by a container runtime.\n"
                f"CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n"
            )
        raise CNIError(
            ERR_INVALID_ENV,
            f"invalid CNI_COMMAND {show(command)}",
            f"it must be one of {', '.join(COMMANDS)}",
        )
    data = read_stdin() if stdin is None else stdin
    if command == "VERSION":
        return cmd_version(data)
    conf = parse_conf(data, command)
    version[0] = conf.cni_version
    args = Args(environ, command)
    check_args(args)
    if command == "ADD":
        return cmd_add(args, conf)
    if command == "DEL":
        cmd_del(args, conf)
    elif command == "CHECK":
        cmd_check(args, conf)
    elif command == "STATUS":
        cmd_status(args, conf)
    else:
        cmd_gc(args, conf)
    return b""


def main(
    environ: dict[str, str] | None = None,
    stdin: bytes | None = None,
    out: Output | None = None,
) -> int:
    """The plugin: 0 and the result on stdout, or non-zero and CNI error JSON on stdout.

    Whatever happens, no traceback: an exception that is not a CNIError is a bug, reported
    as code 999 with its type and place (and the tests assert it never happens)."""
    version = [LATEST_VERSION]
    try:
        reply, status = run(environ, stdin, version), 0
    except _DelegateError as e:
        reply, status = e.out, 1
    except CNIError as e:
        reply, status = error_reply(version[0], e.code, e.msg, e.details), 1
    except BaseException as e:  # the last resort
        reply, status = internal_error(version[0], e), 1
    try:
        output = FdOutput(1) if out is None else out
        output.write(reply)
        output.flush()
    except (OSError, ValueError):
        pass  # the runtime closed our stdout: nobody is left to tell
    return status


def internal_error(version: str, error: BaseException) -> bytes:
    try:
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" at {tb.tb_frame.f_code.co_name}:{tb.tb_lineno}" if tb is not None else ""
        msg = f"internal error in the flannel plugin: {type(error).__name__}{where}"
        details = f"{cut(str(error))}; please report this bug"
    except BaseException:
        msg, details = "internal error in the flannel plugin", "please report this bug"
    return error_reply(version, ERR_INTERNAL, msg, details)


if __name__ == "__main__":
    sys.exit(main())
