"""The nouns of the subnet manager and their flannel codecs.

Pure code: no etcd, no kernel. Everything here is byte-compatible with flannel
(see shared/FLANNEL-COMPAT.md): lease keys `<prefix>/subnets/10.5.52.0-24`, lease values
`{"PublicIP":...,"PublicIPv6":null,"BackendType":...,"BackendData":{...}}`, and the network
config JSON with case-insensitive keys.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from itertools import accumulate
from typing import Any, TypeVar

DEFAULT_PREFIX = "/coreos.com/network"
LEASE_TTL_SECONDS = 24 * 3600

Subnet = IPv4Network | IPv6Network
"""What the mirror and the backends key a lease by (`Lease.ident`): its IPv4 subnet, or for an
IPv6-only lease (`EnableIPv4: false`) its IPv6 subnet."""


def subnet_order(subnet: Subnet) -> tuple[int, int, int]:
    """A sort key for Subnets of both families (IPv4 first): `sorted()` cannot compare an
    IPv4Network with an IPv6Network."""
    return subnet.version, int(subnet.network_address), subnet.prefixlen


NO_IPV4 = IPv4Network("0.0.0.0/0")
"""The IPv4 part of an IPv6-only lease (`EnableIPv4: false`): flannel writes its zero IPv4
subnet, so the key is `0.0.0.0-0&fd00:1:0:5::-64`, and the value's PublicIP is `0.0.0.0`."""

MAX_VALUE_BYTES = 64 * 1024
"""The largest lease value or network config decoded (flannel's are about 150 bytes)."""
MAX_JSON_DEPTH = 32
"""The deepest JSON nesting decoded (flannel's lease values and configs nest 3 levels)."""
MAX_KEY_CHARS = 128
"""The longest lease key element parsed (`255.255.255.255-32&` + a full IPv6 key is 64)."""

# ASCII digits only (`\d` would take any Unicode digit), the whole text (`$` allows a final
# newline): a key that parses is exactly the one subnet_key writes (checked in parse_subnet_key).
_OCTET = r"(?:0|[1-9][0-9]{0,2})"  # no leading zero: one spelling per address
_KEY_V4 = rf"(?P<ip4>(?:{_OCTET}\.){{3}}{_OCTET})-(?P<len4>0|[1-9][0-9]?)"
_KEY_V6 = r"(?P<ip6>[0-9a-f:.]+)-(?P<len6>[0-9]{1,3})"
_SUBNET_KEY_RE = re.compile(rf"{_KEY_V4}(?:&{_KEY_V6})?")
_BACKEND_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")

KNOWN_BACKEND_TYPES: tuple[str, ...] = ("alloc", "host-gw", "udp", "vxlan")
"""Backend.Type values a config may name (matched case-insensitively); the same set as
backends.REGISTRY (a test pins them together: subnetmgr may not import backends)."""
CONFIG_KEYS: tuple[str, ...] = (
    "Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend", "EnableIPv4", "EnableIPv6",
    "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", "EnableNFTables",
)  # fmt: skip
"""Top-level config keys that flannel and overlay read (others draw a warning, not an error)."""
BACKEND_KEYS: Mapping[str, tuple[str, ...]] = {
    "alloc": ("Type",),
    "host-gw": ("Type",),
    "udp": ("Type", "Port"),
    "vxlan": ("Type", "VNI", "Port", "GBP", "Learning", "DirectRouting", "MTU", "MacPrefix",
              "DisableTxChecksumOffload", "FilterPeers"),
}  # fmt: skip
"""Backend keys per type (flannel's, and ours; vxlan's MacPrefix is flannel's and ignored)."""
MAX_WARNED_KEYS = 8
"""The most unknown keys one warning names (a config may hold thousands)."""


def brief(value: object, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters: for messages about values from outside."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str, limit: int = 200) -> str:
    """`text` with unprintable characters escaped (no terminal control sequences from etcd in
    a log or on a terminal), cut to `limit` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 3] + "..."


class MalformedLease(ValueError):
    """A lease key or value in etcd that does not follow flannel's format.

    `reason` is a short snake_case code for metrics and `overlayctl leases` (e.g. "not_json",
    "too_deep", "bad_key"); the message says what is wrong with which value."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class ConfigError(ValueError):
    """An invalid network config. The message names the field and the offending value."""

    def __init__(self, field_name: str, value: object, reason: str) -> None:
        self.field = field_name
        self.value = value
        self.reason = printable(reason)  # it may quote a library's message about the value
        super().__init__(f"network config: {field_name}={brief(value)}: {self.reason}")


# --------------------------------------------------------------------------- bounded JSON


class JsonRejected(ValueError):
    """A document refused before or while decoding; `reason` as in MalformedLease. The message
    says what is wrong without naming the document ("not valid JSON: ...")."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_JSON_ESCAPE = re.compile(r"\\.", re.DOTALL)
_JSON_STRING = re.compile(r'"[^"]*"')  # once escapes are gone: linear, no backtracking
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `text` nests arrays and objects deeper than `limit` (brackets inside strings do
    not count; unclosed ones do). Linear and done in C but for one pass over the brackets left
    outside strings; nearly free for ordinary documents (one count of the openers).

    Exact for valid JSON. For invalid JSON it never says less than the depth json.loads could
    reach before it stops at the error (only what follows a stray backslash or an unclosed
    string is read differently, and json.loads never gets that far)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    outside = _NOT_BRACKETS.sub("", _JSON_STRING.sub("", _JSON_ESCAPE.sub("", text)))
    if outside.count("[") + outside.count("{") <= limit:
        return False
    steps = outside.encode()
    head = steps[: 16 * (limit + 1)]  # `[[[[...`: decided by the first brackets
    if max(accumulate(map(_BRACKET_STEP.__getitem__, head))) > limit:
        return True
    return max(accumulate(map(_BRACKET_STEP.__getitem__, steps))) > limit


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json takes NaN and Infinity; Go does not


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: Python makes it inf, Go refuses it
        raise ValueError(f"number {brief(text)} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite)


def load_json(data: str | bytes) -> Any:
    """Decode a document from outside within explicit limits, or raise JsonRejected.

    Size first (MAX_VALUE_BYTES, before anything is decoded), then strict UTF-8, then the
    nesting depth (MAX_JSON_DEPTH, before json.loads), then json.loads without NaN/Infinity.
    RecursionError and MemoryError are caught as a last line."""
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
    if size > MAX_VALUE_BYTES:
        raise JsonRejected("too_large", f"too large: {size} bytes, the limit is {MAX_VALUE_BYTES}")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonRejected("not_utf8", f"not UTF-8: {e}") from None
    else:
        text = data
    if json_too_deep(text):
        raise JsonRejected("too_deep", f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise JsonRejected("too_deep", "nested too deeply to decode") from None
    except MemoryError:
        raise JsonRejected("too_large", "too large to decode") from None
    except ValueError as e:  # JSONDecodeError, NaN, integers beyond int_max_str_digits
        raise JsonRejected("not_json", f"not valid JSON: {brief(str(e), 120)}") from None


# --------------------------------------------------------------------------- lease keys


def subnet_key(subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
    """The last path element of a lease key: `10.5.52.0-24` or `10.5.52.0-24&fd00::-56`."""
    key = f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is not None:
        key += f"&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"
    return key


def parse_subnet_key(text: str) -> tuple[IPv4Network, IPv6Network | None]:
    """Parse the last path element of a lease key, rejecting anything not in flannel's form.

    Host bits must be zero (`10.5.52.1-24` is refused), as flannel never writes such keys. Only
    the canonical spelling parses (`subnet_key` of the result gives `text` back): `10.5.52.0-024`
    or `10.5.52.0-24\\n` would otherwise be a second key for the same subnet.
    """
    m = _SUBNET_KEY_RE.fullmatch(text) if len(text) <= MAX_KEY_CHARS else None
    if m is None:
        raise MalformedLease(
            f"lease key {brief(text)} is not of the form 10.5.52.0-24[&fd00::-56]", "bad_key"
        )
    try:
        v4 = IPv4Network(f"{m['ip4']}/{int(m['len4'])}", strict=True)
        v6 = None
        if m["ip6"] is not None:
            v6 = IPv6Network(f"{m['ip6']}/{int(m['len6'])}", strict=True)
    except ValueError as e:
        raise MalformedLease(f"lease key {brief(text)}: {e}", "bad_key") from None
    # An IPv4 key the pattern takes is canonical already (checked by the property tests);
    # an IPv6 part has many spellings (`fd00:0::`, `FD00::`).
    if v6 is not None and subnet_key(v4, v6) != text:
        raise MalformedLease(
            f"lease key {brief(text)} is not canonical (flannel writes {subnet_key(v4, v6)!r})",
            "bad_key",
        )
    return v4, v6


# --------------------------------------------------------------------------- lease values


@dataclass(frozen=True)
class LeaseAttrs:
    """A lease's value: who holds the subnet and how to reach it.

    `backend_type` is "" for flannel's udp backend, which writes no BackendType.
    `backend_data` is the backend's JSON object (vxlan: {"VNI": 1, "VtepMAC": "..."}).
    """

    public_ip: IPv4Address
    public_ipv6: IPv6Address | None = None
    backend_type: str = ""
    backend_data: Mapping[str, Any] | None = field(default=None, hash=False)
    backend_v6_data: Mapping[str, Any] | None = field(default=None, hash=False)

    @property
    def address(self) -> IPv4Address | IPv6Address:
        """The address that names the host: PublicIP, or the PublicIPv6 of an IPv6-only lease
        (whose PublicIP flannel writes as 0.0.0.0)."""
        if self.public_ipv6 is not None and int(self.public_ip) == 0:
            return self.public_ipv6
        return self.public_ip

    def to_json(self) -> str:
        """Flannel's exact bytes: field order as Go's encoder writes them, empty fields left out."""
        doc: dict[str, Any] = {
            "PublicIP": str(self.public_ip),
            "PublicIPv6": str(self.public_ipv6) if self.public_ipv6 is not None else None,
        }
        if self.backend_type:
            doc["BackendType"] = self.backend_type
        if self.backend_data:
            doc["BackendData"] = dict(self.backend_data)
        if self.backend_v6_data:
            doc["BackendV6Data"] = dict(self.backend_v6_data)
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> LeaseAttrs:
        """Decode a lease value; raise MalformedLease with the reason when it does not parse.

        Any input gives a LeaseAttrs or MalformedLease (limits: see load_json)."""
        try:
            doc = load_json(text)
        except JsonRejected as e:
            raise MalformedLease(f"lease value: {e}", e.reason) from None
        if not isinstance(doc, dict):
            raise MalformedLease(f"lease value is not a JSON object: {brief(doc)}", "not_object")
        ip_raw = doc.get("PublicIP")
        try:
            # A string only: ipaddress would also accept an integer, flannel never writes one.
            if not isinstance(ip_raw, str):
                raise TypeError(ip_raw)
            public_ip = IPv4Address(ip_raw)
        except (ValueError, TypeError):
            raise MalformedLease(
                f"lease value has no valid PublicIP: {brief(ip_raw)}", "bad_public_ip"
            ) from None
        v6_raw = doc.get("PublicIPv6")
        try:
            if v6_raw is not None and not isinstance(v6_raw, str):
                raise TypeError(v6_raw)
            public_ipv6 = IPv6Address(v6_raw) if v6_raw else None
        except (ValueError, TypeError):
            raise MalformedLease(
                f"lease value has an invalid PublicIPv6: {brief(v6_raw)}", "bad_public_ipv6"
            ) from None
        backend_type = doc.get("BackendType") or ""
        if not isinstance(backend_type, str) or (
            backend_type and not _BACKEND_TYPE_RE.fullmatch(backend_type)
        ):
            raise MalformedLease(
                f'lease value has a BackendType that is not a short name such as "vxlan": '
                f"{brief(backend_type)}",
                "bad_backend_type",
            )
        data = doc.get("BackendData")
        v6_data = doc.get("BackendV6Data")
        for name, value in (("BackendData", data), ("BackendV6Data", v6_data)):
            if value is not None and not isinstance(value, dict):
                raise MalformedLease(
                    f"lease value has a non-object {name}: {brief(value)}", "bad_backend_data"
                )
        return cls(public_ip, public_ipv6, backend_type, data or None, v6_data or None)


@dataclass(frozen=True)
class Lease:
    """One host's subnet as stored in etcd.

    `expiration` is a Unix time, or None for a reservation (a key put without an etcd lease).
    `create_revision` is the etcd revision that created the key (0 when not known): of two
    leases for one subnet, every host keeps the older (see subnetmgr.validate). It takes no part
    in comparisons: a lease is its subnet, value and expiry.
    """

    subnet: IPv4Network
    attrs: LeaseAttrs
    ipv6_subnet: IPv6Network | None = None
    expiration: float | None = None
    create_revision: int = field(default=0, compare=False)

    @property
    def reserved(self) -> bool:
        return self.expiration is None

    @cached_property
    def key(self) -> str:
        """The last element of its etcd key (`10.5.52.0-24`); computed once per lease."""
        return subnet_key(self.subnet, self.ipv6_subnet)

    @property
    def ipv6_only(self) -> bool:
        """Whether this is an IPv6-only lease (key `0.0.0.0-0&fd00:1:0:5::-64`)."""
        return self.subnet == NO_IPV4 and self.ipv6_subnet is not None

    @cached_property
    def ident(self) -> Subnet:
        """What the mirror and the backends key this lease by: its IPv4 subnet, or the IPv6
        subnet of an IPv6-only lease (all of which share the IPv4 part `0.0.0.0/0`)."""
        if self.ipv6_subnet is not None and self.subnet == NO_IPV4:
            return self.ipv6_subnet
        return self.subnet


# --------------------------------------------------------------------------- network config


def _lower_keys(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k.lower(): v for k, v in doc.items()}


@dataclass(frozen=True)
class NetworkConfig:
    """The cluster-wide config from `<prefix>/config`, with flannel's defaults applied."""

    network: IPv4Network | None
    """Network; None in an IPv6-only network (`EnableIPv4: false`), as are SubnetMin/Max."""
    subnet_len: int
    subnet_min: IPv4Network | None
    subnet_max: IPv4Network | None
    backend_type: str
    backend: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """The Backend object with its keys lower-cased (e.g. {"type": "vxlan", "vni": 1})."""
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    ipv6_network: IPv6Network | None = None
    enable_nftables: bool = False
    backend_defaulted: bool = False
    """True when the config had no Backend and `backend_type` is our default (udp, as flannel)."""
    ipv6_subnet_len: int = 0
    """With EnableIPv6: IPv6SubnetLen (64 for an IPv6Network of /62 or shorter, else prefix + 2)."""
    ipv6_subnet_min: IPv6Network | None = None
    ipv6_subnet_max: IPv6Network | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """Problems that do not stop the config (unknown keys): overlayctl prints them, overlayd
    logs them."""

    DEFAULT_BACKEND = "udp"

    def describe(self) -> str:
        """`network 10.1.0.0/16, /24 subnets, backend vxlan` (for log lines)."""
        parts = []
        if self.network is not None:
            parts.append(f"network {self.network}, /{self.subnet_len} subnets")
        if self.enable_ipv6:
            only = " (IPv6-only)" if self.network is None else ""
            parts.append(f"IPv6 network {self.ipv6_network}{only}, /{self.ipv6_subnet_len} subnets")
        return ", ".join([*parts, f"backend {self.backend_type}"])

    @property
    def ipv6_only(self) -> bool:
        """`EnableIPv4: false` (with EnableIPv6): leases are keyed `0.0.0.0-0&<IPv6 subnet>`."""
        return self.network is None

    def contains(self, subnet: IPv4Network) -> bool:
        """Whether `subnet` is the IPv4 part a lease under this config must have: a /SubnetLen
        within SubnetMin..SubnetMax, or in an IPv6-only network NO_IPV4 (`0.0.0.0-0`)."""
        if self.subnet_min is None or self.subnet_max is None:
            return subnet == NO_IPV4
        return subnet.prefixlen == self.subnet_len and int(self.subnet_min.network_address) <= int(
            subnet.network_address
        ) <= int(self.subnet_max.network_address)

    def contains_ipv6(self, subnet: IPv6Network | None) -> bool:
        """Whether `subnet` is the IPv6 part a lease under this config must have: None without
        EnableIPv6, else a /IPv6SubnetLen within IPv6SubnetMin..IPv6SubnetMax (flannel's
        isIPv6SubnetConfigCompat)."""
        if not self.enable_ipv6 or self.ipv6_subnet_min is None or self.ipv6_subnet_max is None:
            return subnet is None
        return (
            subnet is not None
            and subnet.prefixlen == self.ipv6_subnet_len
            and int(self.ipv6_subnet_min.network_address)
            <= int(subnet.network_address)
            <= int(self.ipv6_subnet_max.network_address)
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> NetworkConfig:
        """Parse and check a config; any input gives a NetworkConfig or ConfigError (limits: see
        load_json). overlayd and `overlayctl config set` both use this, so they agree."""
        try:
            doc = load_json(text)
        except JsonRejected as e:
            raise ConfigError("(document)", _short(text), str(e)) from None
        if not isinstance(doc, dict):
            raise ConfigError("(document)", _short(text), "must be a JSON object")
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NetworkConfig:
        doc = _lower_keys(raw)
        enable_ipv4 = _bool(doc, "enableipv4", "EnableIPv4", True)
        enable_ipv6 = _bool(doc, "enableipv6", "EnableIPv6", False)
        enable_nft = _bool(doc, "enablenftables", "EnableNFTables", False)
        warnings: list[str] = []
        network: IPv4Network | None = None
        subnet_len = 0
        subnet_min: IPv4Network | None = None
        subnet_max: IPv4Network | None = None
        if not enable_ipv4:
            if not enable_ipv6:
                raise ConfigError(
                    "EnableIPv4",
                    False,
                    "with EnableIPv6 false too there is no address family left: IPv6-only "
                    "needs EnableIPv6 true and IPv6Network",
                )
            unused = [k for k in ("Network", "SubnetLen", "SubnetMin", "SubnetMax")
                      if doc.get(k.lower()) is not None]  # fmt: skip
            if unused:
                warnings.append(
                    f"network config: {', '.join(unused)} ignored: EnableIPv4 is false "
                    "(an IPv6-only network)"
                )
        else:
            if doc.get("network") is None:
                raise ConfigError("Network", None, "required (an IPv4 CIDR such as 10.1.0.0/16)")
            network = _cluster_network(doc, "Network", IPv4Network, 28)
            subnet_len, subnet_min, subnet_max = _subnet_range(doc, network)

        ipv6_network = None
        v6_len = 0
        v6_min = v6_max = None
        if enable_ipv6:
            ipv6_network = _cluster_network(doc, "IPv6Network", IPv6Network, 124)
            v6_len, v6_min, v6_max = _subnet_range(doc, ipv6_network)

        backend_raw = doc.get("backend")
        defaulted = backend_raw is None
        if backend_raw is None:
            backend: dict[str, Any] = {"type": cls.DEFAULT_BACKEND}
        elif isinstance(backend_raw, dict):
            backend = _lower_keys(backend_raw)
        else:
            raise ConfigError("Backend", backend_raw, 'must be an object such as {"Type": "vxlan"}')
        btype = backend.get("type", cls.DEFAULT_BACKEND)
        if not isinstance(btype, str) or not btype:
            raise ConfigError("Backend.Type", btype, "must be a non-empty string")
        if btype.lower() not in KNOWN_BACKEND_TYPES:
            raise ConfigError(
                "Backend.Type",
                btype,
                f"unknown backend type{_did_you_mean(btype.lower()[:64], KNOWN_BACKEND_TYPES)}; "
                f"one of {', '.join(KNOWN_BACKEND_TYPES)}",
            )
        warnings += _unknown_keys("", raw, CONFIG_KEYS)
        if isinstance(backend_raw, dict):
            known = BACKEND_KEYS[btype.lower()]
            found = _unknown_keys("Backend.", backend_raw, known)
            if found and "type" not in backend:
                default = cls.DEFAULT_BACKEND
                found.append(
                    f"network config: Backend has no Type: the default {default!r} applies"
                )
            warnings += found
        return cls(
            network=network,
            subnet_len=subnet_len,
            subnet_min=subnet_min,
            subnet_max=subnet_max,
            backend_type=btype,
            backend=backend,
            enable_ipv4=enable_ipv4,
            enable_ipv6=enable_ipv6,
            ipv6_network=ipv6_network,
            enable_nftables=enable_nft,
            backend_defaulted=defaulted,
            ipv6_subnet_len=v6_len,
            ipv6_subnet_min=v6_min,
            ipv6_subnet_max=v6_max,
            warnings=tuple(warnings),
        )


def _did_you_mean(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, [c.lower() for c in choices], n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {next(c for c in choices if c.lower() == close[0])!r}?)"


def _unknown_keys(where: str, doc: Mapping[str, Any], known: tuple[str, ...]) -> list[str]:
    """One warning naming the keys of `doc` not in `known` (case-insensitively), or none."""
    lowered = {k.lower() for k in known}
    unknown = [k for k in doc if not isinstance(k, str) or k.lower() not in lowered]
    if not unknown:
        return []
    shown = []
    for key in unknown[:MAX_WARNED_KEYS]:
        text = printable(str(key), 40)
        hint = _did_you_mean(str(key).lower()[:64], known)
        shown.append(f"{where}{text!r}{hint}")
    more = len(unknown) - MAX_WARNED_KEYS
    tail = f" and {more} more" if more > 0 else ""
    scope = f"in {where[:-1]}" if where else "at the top level"
    return [
        f"network config: unknown key{'s' if len(unknown) > 1 else ''} {scope}, ignored: "
        f"{', '.join(shown)}{tail}; known: {', '.join(known)}"
    ]


def _short(text: str | bytes) -> str:
    s = text[:240].decode(errors="replace") if isinstance(text, bytes) else text[:240]
    return s if len(s) <= 60 else s[:57] + "..."


def _bool(doc: Mapping[str, Any], key: str, name: str, default: bool) -> bool:
    value = doc.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(name, value, "must be true or false")
    return value


def _int(doc: Mapping[str, Any], key: str, name: str) -> int:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, "must be an integer")
    return value


_Net = TypeVar("_Net", IPv4Network, IPv6Network)


def _cluster_network(doc: Mapping[str, Any], name: str, kind: type[_Net], longest: int) -> _Net:
    """Network (or IPv6Network): a CIDR of `kind` without host bits, /`longest` or shorter."""
    raw = doc.get(name.lower())
    try:
        network = kind(str(raw), strict=True)
    except ValueError as e:
        family = "IPv6" if kind is IPv6Network else "IPv4"
        raise ConfigError(name, raw, f"not an {family} network CIDR: {e}") from None
    if network.prefixlen > longest:
        raise ConfigError(name, raw, f"too small: the prefix must be /{longest} or shorter")
    return network


def _subnet_range(doc: Mapping[str, Any], network: _Net) -> tuple[int, _Net, _Net]:
    """SubnetLen, SubnetMin and SubnetMax (or their IPv6 twins) with flannel's defaults, checked.

    SubnetLen defaults to 24 (IPv6: 64) for a network of /22 (/62) or shorter, else the network
    prefix + 2; it must lie between prefix + 2 and 30 (126). Min defaults to the second subnet,
    Max to the last; both must lie inside the network, aligned to SubnetLen, Min <= Max.
    """
    tag = "IPv6" if network.version == 6 else ""
    bits = network.max_prefixlen
    default_len = 64 if network.version == 6 else 24
    len_key, len_name = f"{tag.lower()}subnetlen", f"{tag}SubnetLen"
    raw_len = doc.get(len_key)
    if raw_len is not None and not (type(raw_len) is int and raw_len == 0):
        subnet_len = _int(doc, len_key, len_name)
    elif network.prefixlen <= default_len - 2:
        subnet_len = default_len
    else:
        subnet_len = network.prefixlen + 2
    if subnet_len > bits - 2:
        raise ConfigError(len_name, subnet_len, f"must be {bits - 2} or less")
    if subnet_len < network.prefixlen + 2:
        raise ConfigError(
            len_name,
            subnet_len,
            f"must be at least the network prefix + 2 (/{network.prefixlen + 2} for {network})",
        )
    step = 1 << (bits - subnet_len)
    first = int(network.network_address)
    last = int(network.broadcast_address) + 1 - step
    bounds = []
    for bound, default in (("Min", first + step), ("Max", last)):
        name = f"{tag}Subnet{bound}"
        raw = doc.get(name.lower())
        if raw in (None, ""):
            bounds.append(type(network)((default, subnet_len)))
            continue
        try:
            addr = ip_address(str(raw).split("/")[0])
        except ValueError:
            addr = None
        if addr is None or addr.version != network.version:
            raise ConfigError(name, raw, f"not an IPv{network.version} address")
        if addr not in network:
            raise ConfigError(name, raw, f"is outside {tag}Network {network}")
        if (int(addr) - first) % step:
            raise ConfigError(name, raw, f"is not aligned to {len_name} /{subnet_len}")
        bounds.append(type(network)((int(addr), subnet_len)))
    low, high = bounds
    if int(low.network_address) > int(high.network_address):
        raise ConfigError(f"{tag}SubnetMin", str(low.network_address), f"is above {tag}SubnetMax")
    return subnet_len, low, high
