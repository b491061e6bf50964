"""Which subnet a host gets: flannel's order of preference, as pure functions.

No etcd here: the manager lists the leases, asks `choose()` and then tries to claim the answer
with a transaction. Tested without root or etcd (tests/test_allocation.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal, TypeVar

from subnetmgr.model import NO_IPV4, Lease, NetworkConfig, Subnet, subnet_order

_Net = TypeVar("_Net", IPv4Network, IPv6Network)

MAX_CANDIDATES = 100
"""Flannel collects up to this many free subnets and picks one of them at random."""


def _span(net: IPv4Network | IPv6Network) -> tuple[int, int]:
    """The half-open integer range [first, last + 1) of the addresses in `net`."""
    start = int(net.network_address)
    # From the prefix length: `num_addresses` builds the broadcast address, and allocation
    # computes this for every lease on every attempt.
    return start, start + (1 << (net.max_prefixlen - net.prefixlen))


def _merged_spans(taken: Iterable[IPv4Network | IPv6Network]) -> list[tuple[int, int]]:
    spans = sorted(_span(n) for n in taken)
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _walk_free(
    low: _Net, high: _Net, taken: Iterable[IPv4Network | IPv6Network], limit: int
) -> list[int]:
    """The first addresses of up to `limit` subnets from `low` to `high` (inclusive, in steps of
    their size) that overlap none of `taken`, lowest first. O(len(taken) + walked subnets): the
    taken ranges are merged and swept once."""
    step = 1 << (low.max_prefixlen - low.prefixlen)
    addr = int(low.network_address)
    last = int(high.network_address)
    spans = _merged_spans(taken)
    n = len(spans)
    i = 0
    out: list[int] = []
    while addr <= last and len(out) < limit:
        while i < n and spans[i][1] <= addr:
            i += 1
        if i < n and spans[i][0] < addr + step:
            # Overlaps a taken range: jump to the first aligned subnet after it.
            end = spans[i][1]
            addr += ((end - addr + step - 1) // step) * step
            continue
        out.append(addr)
        addr += step
    return out


def _free_starts(config: NetworkConfig, taken: Iterable[IPv4Network], limit: int) -> list[int]:
    """The first addresses of up to `limit` free subnets, lowest first (see free_subnets); none
    in an IPv6-only network."""
    if config.subnet_min is None or config.subnet_max is None:
        return []
    return _walk_free(config.subnet_min, config.subnet_max, taken, limit)


def free_subnets(
    config: NetworkConfig, taken: Iterable[IPv4Network], limit: int = MAX_CANDIDATES
) -> list[Subnet]:
    """Walk SubnetMin..SubnetMax in SubnetLen steps and return up to `limit` subnets that
    overlap none of `taken` (leases and reservations of any size), lowest first.

    Runs in O(len(taken) + walked subnets): the taken ranges are merged and swept once.
    """
    return [IPv4Network((a, config.subnet_len)) for a in _free_starts(config, taken, limit)]


def blocks(config: NetworkConfig, subnet: IPv4Network) -> bool:
    """Whether an existing key for `subnet` makes the candidates it overlaps taken.

    Every key does, except one that no config for this Network could ever have handed out
    because it is too large: a prefix shorter than Network's + 2 (`0.0.0.0-0`, `10.0.0.0-8`,
    the Network itself or a half of it; such a key would otherwise block the whole range), or
    longer than /30. A key outside Network overlaps no candidate anyway. Everything else blocks,
    also when the data path ignores it (a wrong length, a bad PublicIP, a newer duplicate):
    its key exists, so creating it would fail, and a lease of another SubnetLen may belong to a
    host still running with the previous config (a config change applies at restart)."""
    net = config.network
    return net is not None and net.prefixlen + 2 <= subnet.prefixlen <= 30 and subnet.subnet_of(net)


def taken_subnets(config: NetworkConfig, leases: Iterable[Lease]) -> list[IPv4Network]:
    """The subnets of `leases` that block allocation (see `blocks`)."""
    return [lease.subnet for lease in leases if blocks(config, lease.subnet)]


def blocks_ipv6(config: NetworkConfig, subnet: IPv6Network) -> bool:
    """`blocks` for the IPv6 part of a dual-stack key: every IPv6 subnet a config for this
    IPv6Network could hand out (a prefix from IPv6Network's + 2 to /126, inside it) blocks."""
    net = config.ipv6_network
    return (
        net is not None and net.prefixlen + 2 <= subnet.prefixlen <= 126 and subnet.subnet_of(net)
    )


def taken_ipv6_subnets(config: NetworkConfig, leases: Iterable[Lease]) -> list[IPv6Network]:
    """The IPv6 parts of `leases` that block IPv6 allocation (see `blocks_ipv6`)."""
    return [
        lease.ipv6_subnet
        for lease in leases
        if lease.ipv6_subnet is not None and blocks_ipv6(config, lease.ipv6_subnet)
    ]


def free_ipv6_subnets(
    config: NetworkConfig, taken: Iterable[IPv6Network], limit: int = MAX_CANDIDATES
) -> list[IPv6Network]:
    """Walk IPv6SubnetMin..IPv6SubnetMax in IPv6SubnetLen steps and return up to `limit` IPv6
    subnets that overlap none of `taken`, lowest first ([] without EnableIPv6)."""
    low, high = config.ipv6_subnet_min, config.ipv6_subnet_max
    if not config.enable_ipv6 or low is None or high is None:
        return []
    return [IPv6Network((a, config.ipv6_subnet_len)) for a in _walk_free(low, high, taken, limit)]


def is_free(subnet: IPv4Network, taken: Iterable[IPv4Network]) -> bool:
    """Whether `subnet` overlaps none of `taken`."""
    return not any(subnet.overlaps(t) for t in taken)


def own_leases(
    config: NetworkConfig,
    leases: Iterable[Lease],
    public_ip: IPv4Address,
    public_ipv6: IPv6Address | None = None,
) -> list[Lease]:
    """Leases and reservations held by `public_ip` (in an IPv6-only network: by `public_ipv6`,
    every host's PublicIP being 0.0.0.0) that still fit the config.

    Reservations come first (an operator asked for them), then leases, each in subnet order,
    so that a host with several leases (a config change, a crash mid-acquire) is deterministic.
    """
    if config.ipv6_only and public_ipv6 is None:
        return []
    mine = [
        lease
        for lease in leases
        if (
            lease.attrs.public_ipv6 == public_ipv6
            if config.ipv6_only
            else lease.attrs.public_ip == public_ip
        )
        # The IPv4 part: a /SubnetLen in range, or NO_IPV4 in an IPv6-only network.
        and config.contains(lease.subnet)
        # With EnableIPv6 only a dual-stack key fits, without it only an IPv4 key (flannel's
        # isIPv6SubnetConfigCompat): the key names both subnets, so it cannot be updated in place.
        and config.contains_ipv6(lease.ipv6_subnet)
    ]
    return sorted(mine, key=lambda lease: (not lease.reserved, subnet_order(lease.ident)))


@dataclass(frozen=True)
class Choice:
    """The subnet to claim, and how it was found.

    `existing` is the lease or reservation already in etcd when `reason` is "own" or
    "reserved": the manager updates it in place instead of creating a new key.
    """

    subnet: IPv4Network
    """The IPv4 subnet; NO_IPV4 in an IPv6-only network."""
    reason: Literal["own", "reserved", "previous", "random"]
    existing: Lease | None = None
    ipv6_subnet: IPv6Network | None = None
    """With EnableIPv6: the IPv6 subnet claimed with it (one dual-stack key names both)."""


def choose(
    config: NetworkConfig,
    leases: Sequence[Lease],
    public_ip: IPv4Address,
    previous: IPv4Network | None = None,
    rng: random.Random | None = None,
    candidates: int = MAX_CANDIDATES,
    previous_ipv6: IPv6Network | None = None,
    public_ipv6: IPv6Address | None = None,
) -> Choice | None:
    """Flannel's order of preference; None means "out of subnets".

    1. a lease or reservation whose PublicIP is ours and that fits the config (with EnableIPv6:
       a dual-stack key whose IPv6 part fits too);
    2. `previous` (from subnet.env) when it fits the config and overlaps no other lease; with
       EnableIPv6 `previous_ipv6` must fit too and overlap no other lease's IPv6 part;
    3. a random one among the first `candidates` free subnets (flannel: 100) and, with
       EnableIPv6, independently a random one among the first `candidates` free IPv6 subnets
       (flannel's allocateSubnet). No free IPv4 or no free IPv6 subnet: out of subnets.

    "Overlaps" counts only the leases that `blocks` (`blocks_ipv6`) says block: a rogue
    `0.0.0.0-0` does not make every subnet taken.

    In an IPv6-only network (`EnableIPv4: false`) the same order applies to the IPv6 subnet
    alone, the host being known by `public_ipv6`, and the IPv4 part is NO_IPV4 (`0.0.0.0-0`).
    Flannel's own etcd manager cannot do that for a second host (it matches the PublicIP
    0.0.0.0 of the first one's lease, and counts `0.0.0.0/0` as taken): the key form is its.
    """
    if config.ipv6_only:
        return _choose_ipv6_only(config, leases, public_ipv6, previous_ipv6, rng, candidates)
    mine = own_leases(config, leases, public_ip)
    if mine:
        lease = mine[0]
        return Choice(
            lease.subnet, "reserved" if lease.reserved else "own", lease, lease.ipv6_subnet
        )
    taken = taken_subnets(config, leases)
    taken6 = taken_ipv6_subnets(config, leases) if config.enable_ipv6 else []
    if (
        previous is not None
        and config.contains(previous)
        and is_free(previous, taken)
        and config.contains_ipv6(previous_ipv6)
        and (previous_ipv6 is None or not any(previous_ipv6.overlaps(t) for t in taken6))
    ):
        return Choice(previous, "previous", None, previous_ipv6)
    free = _free_starts(config, taken, candidates)
    if not free:
        return None
    rng = rng or random.Random()
    subnet = IPv4Network((rng.choice(free), config.subnet_len))
    if not config.enable_ipv6:
        return Choice(subnet, "random")
    free6 = free_ipv6_subnets(config, taken6, candidates)
    if not free6:
        return None
    return Choice(subnet, "random", None, rng.choice(free6))


def _choose_ipv6_only(
    config: NetworkConfig,
    leases: Sequence[Lease],
    public_ipv6: IPv6Address | None,
    previous_ipv6: IPv6Network | None,
    rng: random.Random | None,
    candidates: int,
) -> Choice | None:
    mine = own_leases(config, leases, IPv4Address(0), public_ipv6)
    if mine:
        lease = mine[0]
        return Choice(NO_IPV4, "reserved" if lease.reserved else "own", lease, lease.ipv6_subnet)
    taken6 = taken_ipv6_subnets(config, leases)
    if (
        previous_ipv6 is not None
        and config.contains_ipv6(previous_ipv6)
        and not any(previous_ipv6.overlaps(t) for t in taken6)
    ):
        return Choice(NO_IPV4, "previous", None, previous_ipv6)
    free6 = free_ipv6_subnets(config, taken6, candidates)
    if not free6:
        return None
    return Choice(NO_IPV4, "random", None, (rng or random.Random()).choice(free6))
