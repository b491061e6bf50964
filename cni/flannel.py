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
"""

from __future__ import annotations

import posix
import sys

TYPE_CHECKING = False  # `import typing` alone costs ~10 ms of start-up: only for type checkers
if TYPE_CHECKING:
    from typing import IO, Any

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
    """os.makedirs(path, mode, exist_ok=True) without `os`; parents get 0o777 (umask applies)."""
    try:
        posix.mkdir(path, mode)
        return
    except FileExistsError:
        pass
    except FileNotFoundError:
        parent = path.rstrip("/").rpartition("/")[0]
        if not parent:
            raise
        make_dirs(parent, 0o777)
        try:
            posix.mkdir(path, mode)
            return
        except FileExistsError:
            pass
    if posix.stat(path).st_mode & 0o170000 != 0o040000:
        raise FileExistsError(f"{path} exists and is not a directory")


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


class _DecodeContext:
    """The attributes `_json.make_scanner` reads; NaN/Infinity are not JSON and are refused."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")


def json_loads(text: str) -> Any:
    """Parse one JSON document; ValueError on anything else."""
    if not _C_JSON:  # pragma: no cover
        import json

        return json.loads(text)
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

        return json.loads(text)
    if text[end:].strip(ws):
        raise ValueError(f"extra data after the JSON value at character {end}")
    return value


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
    elif len(ifname.encode()) > 15:
        problem = "it is longer than 15 bytes"
    elif ifname in (".", ".."):
        problem = "it is . or .."
    elif any(c in "/:" or c.isspace() or not c.isprintable() for c in ifname):
        problem = "it contains '/', ':', whitespace or a control character"
    if problem:
        raise CNIError(
            ERR_INVALID_ENV,
            f"invalid CNI_IFNAME {ifname!r}: {problem}",
            "use a kernel interface name of 1-15 characters without '/', ':' or whitespace",
        )


def parse_ipv4_cidr(text: str) -> tuple[int, int]:
    """'10.1.2.3/24' -> (address as int, prefix length); ValueError on anything else."""
    addr, slash, plen = text.partition("/")
    parts = addr.split(".")
    if not slash or len(parts) != 4 or not plen.isdigit() or not plen.isascii():
        raise ValueError(f"{text!r} is not an IPv4 CIDR like 10.1.0.0/16")
    value = 0
    for part in parts:
        if not part.isdigit() or not part.isascii() or (len(part) > 1 and part[0] == "0"):
            raise ValueError(f"{text!r} is not an IPv4 CIDR like 10.1.0.0/16")
        octet = int(part)
        if octet > 255:
            raise ValueError(f"{text!r} is not an IPv4 CIDR: octet {octet} > 255")
        value = value << 8 | octet
    prefix = int(plen)
    if prefix > 32 or (len(plen) > 1 and plen[0] == "0"):
        raise ValueError(f"{text!r} is not an IPv4 CIDR: bad prefix length {plen!r}")
    return value, prefix


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
        raise ValueError(f"{text!r} is not an IPv6 CIDR like fd00:1::/56") from None


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
                f"{path}: line {raw!r} is not KEY=VALUE",
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
    mtu = int(mtu_text) if mtu_text.isdigit() and mtu_text.isascii() else 0
    if not 68 <= mtu <= 65535:
        bad.append(f"FLANNEL_MTU: {mtu_text!r} is not an MTU between 68 and 65535")
    ipmasq = _BOOL_WORDS.get(values["FLANNEL_IPMASQ"])
    if ipmasq is None:
        bad.append(f"FLANNEL_IPMASQ: {values['FLANNEL_IPMASQ']!r} is not true or false")
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
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise CNIError(
            missing_code,
            f"{path} does not exist",
            "overlayd/flanneld writes it once it holds a subnet lease: check that it runs",
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CNIError(ERR_IO, f"cannot read {path}: {e}") from None
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
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        raw = json_loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CNIError(
            ERR_DECODE, f"cannot decode the network configuration on stdin: {e}"
        ) from None
    if not isinstance(raw, dict):
        raise CNIError(ERR_DECODE, "the network configuration on stdin must be a JSON object")
    version = raw.get("cniVersion")
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version!r}",
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
            f"invalid network name {name!r}",
            "name must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$, e.g. cbr0",
        )
    for key in ("subnetFile", "dataDir"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value.startswith("/")):
            raise _conf_error(f"invalid {key} {value!r}", f"{key} must be an absolute path")
    for key in ("delegate", "ipam"):
        value = raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise _conf_error(f"invalid {key} {value!r}", f"{key} must be a JSON object")
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
                f"invalid delegate type {dtype!r}",
                "delegate.type must be a plugin name such as bridge, found in CNI_PATH",
            )
    ipam = raw.get("ipam") or {}
    if "type" in ipam and (not isinstance(ipam["type"], str) or not valid_name(ipam["type"])):
        raise _conf_error(f"invalid ipam type {ipam['type']!r}", "ipam.type must be a plugin name")
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
                f"invalid ipam.routes {routes!r}",
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
        self.cni_args = parse_cni_args(environ.get("CNI_ARGS", ""))


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
                f"invalid CNI_ARGS item {item!r} in {text!r}",
                "CNI_ARGS must be KEY=VALUE pairs separated by ';'",
            )
        pairs.append((key, value))
    return pairs


def check_args(args: Args) -> None:
    """Validate what the command needs from the environment, before any file is touched."""
    if args.command in ("ADD", "DEL", "CHECK"):
        cid = args.container_id
        if not cid:
            raise CNIError(ERR_INVALID_ENV, "CNI_CONTAINERID is not set")
        if not valid_name(cid):
            raise CNIError(
                ERR_INVALID_ENV,
                f"invalid CNI_CONTAINERID {cid!r}",
                "a container ID must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$",
            )
        check_ifname(args.ifname)
        if args.command != "DEL" and not args.netns:
            raise CNIError(ERR_INVALID_ENV, f"CNI_NETNS is not set for {args.command}")
    if args.command != "VERSION" and not args.path:
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
        try:
            fd = posix.open(path, posix.O_RDWR | posix.O_CLOEXEC | posix.O_CREAT, 0o600)
        except FileNotFoundError:
            return False  # the dataDir itself is missing
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

    def write(self, path: str, text: str) -> None:
        """Write atomically: a temp file in the same dir (0600), then rename over `path`."""
        name = path.rpartition("/")[2]
        tmp = path_join(self.path, f"{TMP_PREFIX}{name}.{posix.getpid()}")
        try:
            flags = posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC
            fd = posix.open(tmp, flags, 0o600)
            try:
                posix.write(fd, text.encode())
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
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise CNIError(ERR_IO, f"cannot read the saved delegate conf {path}: {e}") from None
        try:
            conf = json_loads(text)
        except ValueError as e:
            raise CNIError(
                ERR_DECODE,
                f"the saved delegate conf {path} is not JSON: {e}",
                "delete the file by hand after cleaning up the container's network",
            ) from None
        if not isinstance(conf, dict) or not isinstance(conf.get("type"), str):
            raise CNIError(ERR_DECODE, f"the saved delegate conf {path} has no plugin type")
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


def exec_plugin(
    exe: str, stdin: bytes, environ: dict[str, str], timeout: float = DELEGATE_TIMEOUT
) -> tuple[int, bytes]:
    """Run a plugin: conf on stdin, our stderr passed through. Returns (exit status, stdout)."""
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
    except OSError as e:
        for fd in (in_r, in_w, out_r, out_w):
            posix.close(fd)
        raise CNIError(ERR_DELEGATE_FAILED, f"cannot run {exe}: {e}") from None
    posix.close(in_r)
    posix.close(out_w)
    try:
        posix.write(in_w, stdin)  # confs are far below the pipe buffer
    except BrokenPipeError:
        pass
    finally:
        posix.close(in_w)
    deadline = time.monotonic() + timeout
    chunks = []
    poller = select.poll()
    poller.register(out_r, select.POLLIN)
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                timed_out = True
                break
            chunk = posix.read(out_r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        posix.close(out_r)
    while not timed_out:
        done, status = posix.waitpid(pid, posix.WNOHANG)
        if done:
            return posix.waitstatus_to_exitcode(status), b"".join(chunks)
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
        else:
            _wait_exit(pid, left)
    posix.kill(pid, 9)
    posix.waitpid(pid, 0)
    raise CNIError(
        ERR_TRY_AGAIN_LATER, f"plugin {exe} did not finish within {timeout:.0f} s and was killed"
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
        try:
            with open(path_join(self.cache_dir, VERSIONS_CACHE), encoding="utf-8") as f:
                cache = json_loads(f.read())
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
                posix.write(fd, json_dumps(cache).encode())
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
        status, out = exec_plugin(self.exe, json_dumps(conf).encode(), env)
        if status != 0:
            error = self._error(out, command, status)
            if error.get("code") != ERR_INCOMPATIBLE_VERSION:
                raise _DelegateError(out, error)
            # The delegate does not speak that version: use the newest older one it does.
            use = self._newest_older(self.supported_versions(fresh=True), want)
            if not use or use == conf.get("cniVersion"):
                raise _DelegateError(out, error)
            conf = self._at_version(use)
            status, out = exec_plugin(self.exe, json_dumps(conf).encode(), env)
            if status != 0:
                raise _DelegateError(out, self._error(out, command, status))
        if not out.strip() and command != "ADD":
            return b""  # DEL, CHECK, STATUS, GC print nothing on success
        try:
            result = json_loads(out.decode())
        except (ValueError, UnicodeDecodeError):
            raise CNIError(
                ERR_DELEGATE_FAILED,
                f"delegate {self.exe} {command} printed no JSON result",
                out.decode(errors="replace")[:500],
            ) from None
        if not isinstance(result, dict):
            raise CNIError(ERR_DELEGATE_FAILED, f"delegate {self.exe} {command}: bad result")
        if result.get("cniVersion") == want:
            return out
        return json_dumps(convert_result(result, want)).encode()

    def _error(self, out: bytes, command: str, status: int) -> dict[str, Any]:
        """The delegate's CNI error; a CNIError(102) when it printed none."""
        try:
            error = json_loads(out.decode())
            if isinstance(error, dict) and isinstance(error.get("code"), int):
                return error
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


def cmd_add(args: Args, conf: NetConf, out: IO[bytes]) -> None:
    env = load_subnet_env(conf.subnet_file)
    delegate_conf = build_delegate(conf, env)
    data = DataDir(conf.data_dir)
    data.ensure()
    if not data.lock(exclusive=False):
        raise CNIError(ERR_IO, f"the dataDir {data.path} vanished during ADD")
    try:
        path = data.conf_path(args.container_id, args.ifname)
        saved = dict(
            delegate_conf,
            **{ATTACHMENT_KEY: {"containerID": args.container_id, "ifname": args.ifname}},
        )
        data.write(path, json_dumps(saved))
        delegate = Delegate(args, delegate_conf, data.path)
        try:
            result = delegate.call("ADD")
        except (CNIError, _DelegateError):
            # Undo what the delegate may have done, so a failed ADD leaves nothing behind.
            try:
                delegate.call("DEL")
                data.remove(path)
            except (CNIError, _DelegateError):
                pass
            raise
    finally:
        data.unlock()
    out.write(result)


def cmd_del(args: Args, conf: NetConf) -> None:
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
    have_ranges = delegate_conf.get("ipam", {}).get("ranges")
    if have_ranges != want["ipam"]["ranges"]:
        raise CNIError(
            ERR_CHECK_MISMATCH,
            f"container {args.container_id} was attached to ranges {have_ranges}, "
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
                    attachment = saved.get(ATTACHMENT_KEY) or {}
                    cid = attachment.get("containerID") or name
                    ifname = attachment.get("ifname") or "eth0"  # flannel's files: eth0
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


def cmd_version(stdin: bytes, out: IO[bytes]) -> None:
    version = LATEST_VERSION
    try:
        conf = json_loads(stdin.decode()) if stdin.strip() else {}
        if isinstance(conf, dict) and isinstance(conf.get("cniVersion"), str):
            version = conf["cniVersion"]
    except (ValueError, UnicodeDecodeError):
        pass
    out.write(
        json_dumps({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}).encode()
    )


COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")


def main(
    environ: dict[str, str] | None = None,
    stdin: bytes | None = None,
    out: IO[bytes] | None = None,
) -> int:
    environ = process_environ() if environ is None else environ
    out = sys.stdout.buffer if out is None else out
    command = environ.get("CNI_COMMAND", "")
    version = LATEST_VERSION
    try:
        if command not in COMMANDS:
            if not command:
                sys.stderr.write(
                    "flannel: a CNI plugin (overlay), run by a container runtime.\n"
                    f"CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n"
                )
            raise CNIError(
                ERR_INVALID_ENV,
                f"invalid CNI_COMMAND {command!r}",
                f"it must be one of {', '.join(COMMANDS)}",
            )
        data = sys.stdin.buffer.read() if stdin is None else stdin
        if command == "VERSION":
            cmd_version(data, out)
            return 0
        conf = parse_conf(data, command)
        version = conf.cni_version
        args = Args(environ, command)
        check_args(args)
        if command == "ADD":
            cmd_add(args, conf, out)
        elif command == "DEL":
            cmd_del(args, conf)
        elif command == "CHECK":
            cmd_check(args, conf)
        elif command == "STATUS":
            cmd_status(args, conf)
        else:
            cmd_gc(args, conf)
        return 0
    except _DelegateError as e:
        out.write(e.out)
        return 1
    except CNIError as e:
        error: dict[str, Any] = {"cniVersion": version, "code": e.code, "msg": e.msg}
        if e.details:
            error["details"] = e.details
        out.write(json_dumps(error).encode())
        return 1
    finally:
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
