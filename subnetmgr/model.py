"""The nouns of the subnet manager and their flannel codecs.

Pure code: no etcd, no kernel. Everything here is byte-compatible with flannel
(see shared/FLANNEL-COMPAT.md): lease keys `<prefix>/subnets/10.5.52.0-24`, lease values
`{"PublicIP":...,"PublicIPv6":null,"BackendType":...,"BackendData":{...}}`, and the network
config JSON with case-insensitive keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any, TypeVar

DEFAULT_PREFIX = "/coreos.com/network"
LEASE_TTL_SECONDS = 24 * 3600

Subnet = IPv4Network
"""A host's slice of the cluster network (IPv4). The mirror and the backends key leases by it."""

_KEY_V4 = r"(?P<ip4>(?:\d{1,3}\.){3}\d{1,3})-(?P<len4>\d{1,2})"
_KEY_V6 = r"(?P<ip6>[0-9a-fA-F:]+)-(?P<len6>\d{1,3})"
_SUBNET_KEY_RE = re.compile(rf"^{_KEY_V4}(?:&{_KEY_V6})?$")


class MalformedLease(ValueError):
    """A lease key or value in etcd that does not follow flannel's format."""


class ConfigError(ValueError):
    """An invalid network config. The message names the field and the offending value."""

    def __init__(self, field_name: str, value: object, reason: str) -> None:
        self.field = field_name
        self.value = value
        self.reason = reason
        super().__init__(f"network config: {field_name}={value!r}: {reason}")


# --------------------------------------------------------------------------- lease keys


def subnet_key(subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
    """The last path element of a lease key: `10.5.52.0-24` or `10.5.52.0-24&fd00::-56`."""
    key = f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is not None:
        key += f"&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"
    return key


def parse_subnet_key(text: str) -> tuple[IPv4Network, IPv6Network | None]:
    """Parse the last path element of a lease key, rejecting anything not in flannel's form.

    Host bits must be zero (`10.5.52.1-24` is refused), as flannel never writes such keys.
    """
    m = _SUBNET_KEY_RE.match(text)
    if m is None:
        raise MalformedLease(f"lease key {text!r} is not of the form 10.5.52.0-24[&fd00::-56]")
    try:
        v4 = IPv4Network(f"{m['ip4']}/{int(m['len4'])}", strict=True)
        v6 = None
        if m["ip6"] is not None:
            v6 = IPv6Network(f"{m['ip6']}/{int(m['len6'])}", strict=True)
    except ValueError as e:
        raise MalformedLease(f"lease key {text!r}: {e}") from None
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
        """Decode a lease value; raise MalformedLease with the reason when it does not parse."""
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise MalformedLease(f"lease value is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise MalformedLease(f"lease value is not a JSON object: {text!r:.80}")
        ip_raw = doc.get("PublicIP")
        try:
            # A string only: ipaddress would also accept an integer, flannel never writes one.
            if not isinstance(ip_raw, str):
                raise TypeError(ip_raw)
            public_ip = IPv4Address(ip_raw)
        except (ValueError, TypeError):
            raise MalformedLease(f"lease value has no valid PublicIP: {ip_raw!r}") from None
        v6_raw = doc.get("PublicIPv6")
        try:
            if v6_raw is not None and not isinstance(v6_raw, str):
                raise TypeError(v6_raw)
            public_ipv6 = IPv6Address(v6_raw) if v6_raw else None
        except (ValueError, TypeError):
            raise MalformedLease(f"lease value has an invalid PublicIPv6: {v6_raw!r}") from None
        backend_type = doc.get("BackendType") or ""
        if not isinstance(backend_type, str):
            raise MalformedLease(f"lease value has a non-string BackendType: {backend_type!r}")
        data = doc.get("BackendData")
        v6_data = doc.get("BackendV6Data")
        for name, value in (("BackendData", data), ("BackendV6Data", v6_data)):
            if value is not None and not isinstance(value, dict):
                raise MalformedLease(f"lease value has a non-object {name}: {value!r}")
        return cls(public_ip, public_ipv6, backend_type, data or None, v6_data or None)


@dataclass(frozen=True)
class Lease:
    """One host's subnet as stored in etcd.

    `expiration` is a Unix time, or None for a reservation (a key put without an etcd lease).
    """

    subnet: IPv4Network
    attrs: LeaseAttrs
    ipv6_subnet: IPv6Network | None = None
    expiration: float | None = None

    @property
    def reserved(self) -> bool:
        return self.expiration is None

    @property
    def key(self) -> str:
        return subnet_key(self.subnet, self.ipv6_subnet)


# --------------------------------------------------------------------------- network config


def _lower_keys(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k.lower(): v for k, v in doc.items()}


@dataclass(frozen=True)
class NetworkConfig:
    """The cluster-wide config from `<prefix>/config`, with flannel's defaults applied."""

    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Network
    subnet_max: IPv4Network
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

    DEFAULT_BACKEND = "udp"

    def contains(self, subnet: IPv4Network) -> bool:
        """Whether `subnet` is a lease this config could hand out (right size, within min..max)."""
        return subnet.prefixlen == self.subnet_len and int(self.subnet_min.network_address) <= int(
            subnet.network_address
        ) <= int(self.subnet_max.network_address)

    @classmethod
    def from_json(cls, text: str | bytes) -> NetworkConfig:
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError("(document)", _short(text), f"not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ConfigError("(document)", _short(text), "must be a JSON object")
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NetworkConfig:
        doc = _lower_keys(raw)
        enable_ipv4 = _bool(doc, "enableipv4", "EnableIPv4", True)
        enable_ipv6 = _bool(doc, "enableipv6", "EnableIPv6", False)
        enable_nft = _bool(doc, "enablenftables", "EnableNFTables", False)
        if not enable_ipv4:
            raise ConfigError(
                "EnableIPv4", False, "IPv6-only networks are not supported by overlay yet"
            )
        net_raw = doc.get("network")
        if net_raw is None:
            raise ConfigError("Network", None, "required (an IPv4 CIDR such as 10.1.0.0/16)")
        try:
            network = IPv4Network(str(net_raw), strict=True)
        except ValueError as e:
            raise ConfigError("Network", net_raw, f"not an IPv4 network CIDR: {e}") from None
        if network.prefixlen > 28:
            raise ConfigError("Network", net_raw, "too small: the prefix must be /28 or shorter")

        subnet_len, subnet_min, subnet_max = _subnet_range(doc, network)

        ipv6_network = None
        v6_len = 0
        v6_min = v6_max = None
        if enable_ipv6:
            v6_raw = doc.get("ipv6network")
            try:
                ipv6_network = IPv6Network(str(v6_raw), strict=True)
            except ValueError as e:
                raise ConfigError("IPv6Network", v6_raw, f"not an IPv6 network CIDR: {e}") from None
            if ipv6_network.prefixlen > 124:
                raise ConfigError(
                    "IPv6Network", v6_raw, "too small: the prefix must be /124 or shorter"
                )
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
        )


def _short(text: str | bytes) -> str:
    s = text.decode(errors="replace") if isinstance(text, bytes) else text
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
