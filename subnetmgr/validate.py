"""Which leases from etcd the data path may use: checked against the network config, as pure
functions, plus the record of what was ignored and why.

Every lease that decodes is checked before any backend sees it (`check_lease`):

- its subnet lies inside `Network` ("outside_network": `0.0.0.0-0`, `192.168.0.0-24`);
- its prefix length is `SubnetLen` ("wrong_prefix_len": a /25 inside a host's /24). Keys have
  no host bits (model.parse_subnet_key), so a lease of that length inside Network is aligned;
- its PublicIP is a usable unicast address ("unusable_public_ip": 0.0.0.0/8, loopback,
  multicast, link-local, 240.0.0.0/4 including 255.255.255.255);
- with EnableIPv6, the IPv6 part of a dual-stack key lies inside `IPv6Network`
  ("ipv6_outside_network") with the prefix length `IPv6SubnetLen` ("ipv6_wrong_prefix_len"),
  and a PublicIPv6, when given, is usable ("unusable_public_ipv6": unspecified, loopback,
  multicast, link-local, IPv4-mapped or reserved). A lease without an IPv6 part is an IPv4
  peer; without EnableIPv6 the IPv6 part is not used and not checked.

Two dual-stack leases with different IPv4 subnets may still name one IPv6 subnet; a backend's
IPv6 plan keeps one of them (`ipv6_owners`, same rule as `pick`).

Then, among the leases that pass, at most one per subnet (`select_leases`): our own lease always
keeps its subnet ("overlaps_own" for any other key naming it, e.g. a dual-stack key
`10.1.5.0-24&fd00::-56` next to our `10.1.5.0-24`), else the one with the oldest etcd creation
revision, then the smaller key ("overlaps_older"), so that every host picks the same one. Leases
that pass `check_lease` all have the same length and are aligned, so two of them overlap only
when they name the same subnet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from subnetmgr.model import NO_IPV4, Lease, NetworkConfig, Subnet, printable

__all__ = [
    "Ignored",
    "IgnoredLeases",
    "Selection",
    "check_ipv6",
    "check_lease",
    "ipv6_owners",
    "pick",
    "select_leases",
    "unusable_public_ip",
    "unusable_public_ipv6",
]

log = logging.getLogger("overlay.subnetmgr.validate")

_THIS_NETWORK = IPv4Network("0.0.0.0/8")


def unusable_public_ip(ip: IPv4Address) -> str | None:
    """Why `ip` cannot be a host's PublicIP (a VXLAN or UDP peer), or None when it can."""
    if ip in _THIS_NETWORK:
        return "unspecified (0.0.0.0/8)"
    if ip.is_loopback:
        return "loopback"
    if ip.is_multicast:
        return "multicast"
    if ip.is_link_local:
        return "link-local"
    if ip.is_reserved:  # 240.0.0.0/4, which holds the limited broadcast 255.255.255.255
        return "reserved or broadcast"
    return None


def unusable_public_ipv6(ip: IPv6Address) -> str | None:
    """Why `ip` cannot be a host's PublicIPv6 (a VXLAN or host-gw peer), or None when it can."""
    if ip.is_unspecified:
        return "unspecified (::)"
    if ip.is_loopback:
        return "loopback"
    if ip.is_multicast:
        return "multicast"
    if ip.is_link_local:
        return "link-local"
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped"
    if ip.is_reserved:  # ::/8 and the other IETF-reserved blocks
        return "reserved"
    return None


def check_ipv6(config: NetworkConfig, lease: Lease) -> tuple[str, str] | None:
    """(reason, detail) when the IPv6 part of `lease` cannot be used under `config`."""
    sub6 = lease.ipv6_subnet
    net6 = config.ipv6_network
    if not config.enable_ipv6 or net6 is None or sub6 is None:
        return None
    if not sub6.subnet_of(net6):
        return "ipv6_outside_network", f"{sub6} is not inside IPv6Network {net6}"
    if sub6.prefixlen != config.ipv6_subnet_len:
        return (
            "ipv6_wrong_prefix_len",
            f"{sub6} is a /{sub6.prefixlen}, the network config says IPv6SubnetLen "
            f"{config.ipv6_subnet_len}",
        )
    ip6 = lease.attrs.public_ipv6
    why = None if ip6 is None else unusable_public_ipv6(ip6)
    if why is not None:
        return "unusable_public_ipv6", f"PublicIPv6 {ip6} is {why}"
    return None


def ipv6_owners(leases: Iterable[Lease], own: Lease | None = None) -> dict[IPv6Network, Lease]:
    """The one lease that may use each IPv6 subnet among `leases` (each passed check_lease):
    none when it is our own IPv6 subnet, else the oldest by etcd creation revision, then the
    smaller key, as `pick` does for IPv4 subnets, so that every host decides alike."""
    out: dict[IPv6Network, Lease] = {}
    own6 = own.ipv6_subnet if own is not None else None
    for lease in leases:
        sub6 = lease.ipv6_subnet
        if sub6 is None or sub6 == own6:
            continue
        kept = out.get(sub6)
        if kept is None or _age(lease) < _age(kept):
            out[sub6] = lease
    return out


def check_lease(config: NetworkConfig, lease: Lease) -> tuple[str, str] | None:
    """(reason, detail) when `lease` on its own cannot be a peer under `config`, else None."""
    subnet = lease.subnet
    net = config.network
    if net is None:
        return _check_ipv6_only(config, lease)
    # subnet_of, in integers: this runs for every lease of a fresh mirror.
    if subnet.prefixlen < net.prefixlen or (
        int(subnet.network_address) >> (32 - net.prefixlen)
        != int(net.network_address) >> (32 - net.prefixlen)
    ):
        return "outside_network", f"{subnet} is not inside Network {net}"
    if subnet.prefixlen != config.subnet_len:
        return (
            "wrong_prefix_len",
            f"{subnet} is a /{subnet.prefixlen}, the network config says SubnetLen "
            f"{config.subnet_len}",
        )
    why = unusable_public_ip(lease.attrs.public_ip)
    if why is not None:
        return "unusable_public_ip", f"PublicIP {lease.attrs.public_ip} is {why}"
    return check_ipv6(config, lease)


def _check_ipv6_only(config: NetworkConfig, lease: Lease) -> tuple[str, str] | None:
    """check_lease in an IPv6-only network: the key is `0.0.0.0-0&<IPv6 subnet>` (flannel's
    form), the PublicIP `0.0.0.0` or any (unused: there is no IPv4 underlay), a PublicIPv6."""
    if lease.subnet != NO_IPV4:
        return (
            "outside_network",
            f"{lease.key} names the IPv4 subnet {lease.subnet}, but the network is IPv6-only "
            "(EnableIPv4 false): its keys are 0.0.0.0-0&<IPv6 subnet>",
        )
    if lease.ipv6_subnet is None:
        return "no_ipv6_subnet", f"{lease.key} names no IPv6 subnet in an IPv6-only network"
    if lease.attrs.public_ipv6 is None:
        return "no_public_ipv6", "an IPv6-only lease without a PublicIPv6"
    return check_ipv6(config, lease)


def _age(lease: Lease) -> tuple[int, str]:
    return lease.create_revision, lease.key


def pick(
    subnet: Subnet, candidates: Iterable[Lease], own: Lease | None = None
) -> tuple[Lease | None, dict[str, tuple[str, str]]]:
    """The one lease kept for `subnet` among `candidates` (each passed check_lease, all for
    `subnet`), and the others by key with (reason, detail).

    With `own` for this subnet, the lease under own's key is kept whatever it holds (the daemon
    tells a takeover from that), even when absent: then nothing is kept for the subnet."""
    losers: dict[str, tuple[str, str]] = {}
    if own is not None and own.ident == subnet:
        kept = None
        for lease in candidates:
            if lease.key == own.key:
                kept = lease
            else:
                losers[lease.key] = (
                    "overlaps_own",
                    f"{lease.key} names our own subnet {subnet} ({own.key})",
                )
        return kept, losers
    ordered = sorted(candidates, key=_age)
    if not ordered:
        return None, losers
    kept = ordered[0]
    for lease in ordered[1:]:
        losers[lease.key] = (
            "overlaps_older",
            f"{lease.key} (created at revision {lease.create_revision}) names subnet {subnet} "
            f"of the older {kept.key} (revision {kept.create_revision}, {kept.attrs.public_ip})",
        )
    return kept, losers


@dataclass(frozen=True)
class Selection:
    """The result of select_leases: the kept lease per subnet, and the ignored keys."""

    valid: dict[Subnet, Lease]
    ignored: dict[str, tuple[str, str]]
    """lease key -> (reason, detail)."""


def select_leases(
    config: NetworkConfig | None, leases: Iterable[Lease], own: Lease | None = None
) -> Selection:
    """Check every lease against `config` (None: no checks but one lease per subnet) and keep
    at most one per subnet (see the module docstring). Our own lease is not checked: we hold it.

    The result does not depend on the order of `leases` (two leases with one key: the later
    one counts, as in a dict)."""
    by_key = {lease.key: lease for lease in leases}
    groups: dict[Subnet, list[Lease]] = {}
    ignored: dict[str, tuple[str, str]] = {}
    for key, lease in by_key.items():
        problem = None
        if config is not None and not (own is not None and key == own.key):
            problem = check_lease(config, lease)
        if problem is not None:
            ignored[key] = problem
        else:
            groups.setdefault(lease.ident, []).append(lease)
    valid: dict[Subnet, Lease] = {}
    for subnet, group in groups.items():
        kept, losers = pick(subnet, group, own)
        if kept is not None:
            valid[subnet] = kept
        ignored.update(losers)
    return Selection(valid, ignored)


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class Ignored:
    """One key in etcd that the daemon does not use, and why."""

    key: str
    """The key's last element (`10.1.5.0-25`); bytes that are not UTF-8 as backslash escapes."""
    reason: str
    """A short snake_case code: the label of overlay_leases_ignored_total."""
    detail: str
    revision: int
    """The etcd revision that last wrote the key (0 when not known)."""
    lease: Lease | None = None
    """The decoded lease, when it decoded (ignored by validation, not by the codec)."""
    subnet: IPv4Network | None = None
    """The subnet its key names, when the key parsed (its value did not decode): allocation
    treats it as taken, since creating that key would fail."""
    ipv6_subnet: IPv6Network | None = None
    """The IPv6 subnet its key names, likewise."""


class IgnoredLeases:
    """The keys ignored now (`current`), each logged at WARNING and counted once per distinct
    key, reason and value, however often lists and watches meet it again.

    `on_new(ignored)` is called at the same moment as the log line (overlayd counts it in
    /metrics). `quiet` logs at DEBUG instead (overlayctl shows them in its table)."""

    def __init__(self, on_new: Callable[[Ignored], None] | None = None) -> None:
        self.on_new = on_new
        self.quiet = False
        self.key_prefix = ""
        """Put before a key in log lines (the registry sets `<prefix>/subnets/`)."""
        self._current: dict[str, Ignored] = {}
        self.current: Mapping[str, Ignored] = self._current
        self._seen: dict[str, tuple[str, Hashable]] = {}
        self.changes = 0
        """Incremented whenever `current` changes (a key becomes ignored or usable again)."""

    def ignore(self, ignored: Ignored, fingerprint: Hashable) -> None:
        """Record `ignored`; `fingerprint` stands for the value (a digest, the decoded attrs)."""
        key = ignored.key
        old = self._current.get(key)
        if old is None or (old.reason, old.detail) != (ignored.reason, ignored.detail):
            self.changes += 1
        self._current[key] = ignored
        mark = (ignored.reason, fingerprint)
        if self._seen.get(key) == mark:
            return
        self._seen[key] = mark
        log.log(
            logging.DEBUG if self.quiet else logging.WARNING,
            "ignoring lease key %s%s (revision %d): %s [%s]",
            self.key_prefix,
            printable(key, 100),
            ignored.revision,
            printable(ignored.detail, 300),
            ignored.reason,
        )
        if self.on_new is not None:
            self.on_new(ignored)

    def clear(self, key: str, *, deleted: bool = False, checked: bool | None = None) -> None:
        """`key` is usable again (`deleted`: gone from etcd, so forget its value too).

        `checked` True clears only an entry of a lease that decoded (the mirror's checks), False
        only one that did not (the registry's codec): each clears only what it recorded."""
        old = self._current.get(key)
        if old is not None and checked is not None and (old.lease is not None) != checked:
            return
        self._current.pop(key, None)
        if deleted:
            self._seen.pop(key, None)
        if old is not None:
            self.changes += 1
            log.log(
                logging.DEBUG if self.quiet else logging.INFO,
                "lease key %s%s is no longer ignored (%s)",
                self.key_prefix,
                printable(key, 100),
                "deleted" if deleted else "now valid",
            )

    def retain(self, keys: set[str]) -> None:
        """After a full list: forget the keys that are no longer in etcd."""
        for key in [k for k in self._current if k not in keys]:
            self.clear(key, deleted=True)
        for key in [k for k in self._seen if k not in keys]:
            del self._seen[key]
