"""The chaos tests' lease invariant (integration.etcdcluster.lease_conflicts), checked against
a plain pairwise comparison: no root, no etcd."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from itertools import combinations

from hypothesis import given
from hypothesis import strategies as st

from integration.etcdcluster import lease_conflicts

# Small spaces, so that overlaps and shared public IPs are common.
subnets = st.builds(
    lambda addr, length: IPv4Network(f"10.1.{addr}.0/{length}", strict=False),
    st.integers(0, 15),
    st.integers(20, 26),
)
ips = st.integers(1, 6).map(lambda i: IPv4Address(f"198.18.0.{i}"))
leases = st.lists(st.tuples(subnets, ips), max_size=12, unique_by=lambda x: x[0])


def pairwise(items: list[tuple[IPv4Network, IPv4Address]]) -> tuple[int, set[IPv4Address]]:
    """How many subnets overlap an earlier one (in start order), and which IPs hold two."""
    overlapping = {
        max(a, b, key=lambda s: (int(s.network_address), s.prefixlen))
        for (a, _), (b, _) in combinations(items, 2)
        if a.overlaps(b)
    }
    ips = [ip for _, ip in items]
    return len(overlapping), {ip for ip in ips if ips.count(ip) > 1}


@given(leases)
def test_conflicts_are_exactly_the_overlaps_and_shared_public_ips(
    items: list[tuple[IPv4Network, IPv4Address]],
) -> None:
    found = lease_conflicts(items)
    overlaps, shared = pairwise(items)
    assert len([f for f in found if " overlaps " in f]) == overlaps
    assert {f.split()[0] for f in found if " holds " in f} == {str(ip) for ip in shared}
    assert (found == []) == (overlaps == 0 and not shared)


@given(leases)
def test_disjoint_leases_of_distinct_hosts_are_fine(
    items: list[tuple[IPv4Network, IPv4Address]],
) -> None:
    kept: list[tuple[IPv4Network, IPv4Address]] = []
    for subnet, _ in items:
        if not any(subnet.overlaps(k) for k, _ in kept):
            kept.append((subnet, IPv4Address(f"198.18.1.{len(kept) + 1}")))
    assert lease_conflicts(kept) == []


def test_a_subnet_inside_a_wider_one_is_found_after_a_disjoint_one_between() -> None:
    wide = IPv4Network("10.1.0.0/20")
    found = lease_conflicts(
        [
            (IPv4Network("10.1.14.0/24"), IPv4Address("198.18.0.3")),
            (wide, IPv4Address("198.18.0.1")),
            (IPv4Network("10.1.2.0/24"), IPv4Address("198.18.0.2")),
        ]
    )
    assert found == [
        "10.1.2.0/24 (198.18.0.2) overlaps 10.1.0.0/20 (198.18.0.1)",
        "10.1.14.0/24 (198.18.0.3) overlaps 10.1.0.0/20 (198.18.0.1)",
    ]
