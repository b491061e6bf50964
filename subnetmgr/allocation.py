"""Which subnet a host gets: flannel's order of preference, as pure functions.

No etcd here: the manager lists the leases, asks `choose()` and then tries to claim the answer
with a transaction. Tested without root or etcd (tests/test_allocation.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Literal

from subnetmgr.model import Lease, NetworkConfig, Subnet

MAX_CANDIDATES = 100
"""Flannel collects up to this many free subnets and picks one of them at random."""


def _span(net: IPv4Network) -> tuple[int, int]:
    """The half-open integer range [first, last + 1) of the addresses in `net`."""
    start = int(net.network_address)
    # From the prefix length: `num_addresses` builds the broadcast address, and allocation
    # computes this for every lease on every attempt.
    return start, start + (1 << (32 - net.prefixlen))


def _merged_spans(taken: Iterable[IPv4Network]) -> list[tuple[int, int]]:
    spans = sorted(_span(n) for n in taken)
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _free_starts(config: NetworkConfig, taken: Iterable[IPv4Network], limit: int) -> list[int]:
    """The first addresses of up to `limit` free subnets, lowest first (see free_subnets)."""
    step = 1 << (32 - config.subnet_len)
    addr = int(config.subnet_min.network_address)
    last = int(config.subnet_max.network_address)
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
    return net.prefixlen + 2 <= subnet.prefixlen <= 30 and subnet.subnet_of(net)


def taken_subnets(config: NetworkConfig, leases: Iterable[Lease]) -> list[IPv4Network]:
    """The subnets of `leases` that block allocation (see `blocks`)."""
    return [lease.subnet for lease in leases if blocks(config, lease.subnet)]


def is_free(subnet: IPv4Network, taken: Iterable[IPv4Network]) -> bool:
    """Whether `subnet` overlaps none of `taken`."""
    return not any(subnet.overlaps(t) for t in taken)


def own_leases(
    config: NetworkConfig, leases: Iterable[Lease], public_ip: IPv4Address
) -> list[Lease]:
    """Leases and reservations held by `public_ip` that still fit the config.

    Reservations come first (an operator asked for them), then leases, each in subnet order,
    so that a host with several leases (a config change, a crash mid-acquire) is deterministic.
    """
    mine = [
        lease
        for lease in leases
        if lease.attrs.public_ip == public_ip
        and config.contains(lease.subnet)
        and lease.ipv6_subnet is None  # a dual-stack lease does not fit: we acquire IPv4 only
    ]
    return sorted(mine, key=lambda lease: (not lease.reserved, int(lease.subnet.network_address)))


@dataclass(frozen=True)
class Choice:
    """The subnet to claim, and how it was found.

    `existing` is the lease or reservation already in etcd when `reason` is "own" or
    "reserved": the manager updates it in place instead of creating a new key.
    """

    subnet: Subnet
    reason: Literal["own", "reserved", "previous", "random"]
    existing: Lease | None = None


def choose(
    config: NetworkConfig,
    leases: Sequence[Lease],
    public_ip: IPv4Address,
    previous: IPv4Network | None = None,
    rng: random.Random | None = None,
    candidates: int = MAX_CANDIDATES,
) -> Choice | None:
    """Flannel's order of preference; None means "out of subnets".

    1. a lease or reservation whose PublicIP is ours and that fits the config;
    2. `previous` (from subnet.env) when it fits the config and overlaps no other lease;
    3. a random one among the first `candidates` free subnets (flannel: 100).

    "Overlaps" counts only the leases that `blocks` says block: a rogue `0.0.0.0-0` does not
    make every subnet taken.
    """
    mine = own_leases(config, leases, public_ip)
    if mine:
        lease = mine[0]
        return Choice(lease.subnet, "reserved" if lease.reserved else "own", lease)
    taken = taken_subnets(config, leases)
    if previous is not None and config.contains(previous) and is_free(previous, taken):
        return Choice(previous, "previous")
    free = _free_starts(config, taken, candidates)
    if not free:
        return None
    start = (rng or random.Random()).choice(free)
    return Choice(IPv4Network((start, config.subnet_len)), "random")
