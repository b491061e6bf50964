"""IPv6-only networks (`EnableIPv4: false`), pure parts: lease checks, selection and allocation
in flannel's key form `0.0.0.0-0&<IPv6 subnet>`, the traffic rules without an IPv4 family, the
udp backend's refusal. No etcd, no kernel; property-based where a rule must hold for any set of
leases. The daemon, the backends and the lab with real traffic: tests/test_integration_ipv6.py.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.base import NO_ADDRESS, BackendError, ExternalInterface
from backends.udp import UdpBackend
from overlay.masq import IptablesRules
from overlay.nftrules import NftRules
from subnetmgr.allocation import choose, own_leases
from subnetmgr.model import NO_IPV4, Lease, LeaseAttrs, NetworkConfig, subnet_key
from subnetmgr.validate import check_lease, select_leases

ONLY6 = NetworkConfig.from_dict(
    {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:1::/60",
     "Backend": {"Type": "vxlan"}}
)  # fmt: skip
"""IPv6Network fd00:1::/60 in /64s: 15 subnets to hand out (the first is skipped)."""
ME6 = IPv6Address("fd99::10")


def only6(sub6: str, ip6: str | None = "fd99::11", rev: int = 5, ip: str = "0.0.0.0") -> Lease:
    return Lease(
        NO_IPV4,
        LeaseAttrs(IPv4Address(ip), IPv6Address(ip6) if ip6 else None, "vxlan"),
        IPv6Network(sub6),
        1e12,  # a lease (an etcd TTL), not a reservation
        rev,
    )


# --------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: only6("fd00:1:0:5::/64"), None),
        # flannel's IPv6-only leases say PublicIP 0.0.0.0; another value is not used either.
        (lambda: only6("fd00:1:0:5::/64", ip="192.0.2.7"), None),
        (lambda: only6("fd00:2:0:5::/64"), "ipv6_outside_network"),
        (lambda: only6("fd00:1:0:5::/65"), "ipv6_wrong_prefix_len"),
        (lambda: only6("fd00:1:0:5::/64", ip6="fe80::1"), "unusable_public_ipv6"),
        (lambda: only6("fd00:1:0:5::/64", ip6=None), "no_public_ipv6"),
        # An IPv4 (or dual-stack) key has no place in an IPv6-only network.
        (
            lambda: Lease(
                IPv4Network("10.1.5.0/24"),
                LeaseAttrs(IPv4Address("192.0.2.7")),
                IPv6Network("fd00:1:0:5::/64"),
            ),
            "outside_network",
        ),
        (lambda: Lease(NO_IPV4, LeaseAttrs(IPv4Address("192.0.2.7"))), "no_ipv6_subnet"),
    ],
)
def test_check_lease_in_an_ipv6_only_network(make: object, reason: str | None) -> None:
    assert callable(make)
    problem = check_lease(ONLY6, make())
    assert (problem[0] if problem else None) == reason


def test_ipv6_only_leases_are_told_apart_by_their_ipv6_subnet() -> None:
    """Every IPv6-only lease has the IPv4 part 0.0.0.0/0: keyed by it, all but one would be
    dropped as overlapping. They are keyed by their IPv6 subnet (Lease.ident)."""
    a, b, c = only6("fd00:1:0:1::/64"), only6("fd00:1:0:2::/64"), only6("fd00:1:0:3::/64")
    sel = select_leases(ONLY6, [a, b, c], own=b)
    assert sel.ignored == {}
    assert sel.valid == {a.ident: a, b.ident: b, c.ident: c}
    assert a.ident == IPv6Network("fd00:1:0:1::/64") and a.key == "0.0.0.0-0&fd00:1:0:1::-64"


ipv6_only_leases = st.builds(
    lambda n, ip6, rev, v4: Lease(
        v4, LeaseAttrs(IPv4Address(0), IPv6Address(ip6)), IPv6Network((n << 64, 64)), None, rev
    ),
    st.integers(0xFD000001_00000000, 0xFD000001_00000000 + 20),  # some outside fd00:1::/60
    st.sampled_from([0xFD990000 << 96 | i for i in range(1, 6)] + [1]),  # ::1 is unusable
    st.integers(0, 6),
    st.sampled_from([NO_IPV4, NO_IPV4, NO_IPV4, IPv4Network("10.1.5.0/24")]),
)


@given(st.lists(ipv6_only_leases, max_size=20), st.integers(0, 2**16))
def test_selection_and_allocation_in_an_ipv6_only_network(leases: list[Lease], seed: int) -> None:
    """What must hold for any set of leases: the kept ones are valid IPv6-only leases, no two
    name one IPv6 subnet, and a new host gets an IPv6 subnet no key names yet."""
    sel = select_leases(ONLY6, leases)
    kept = list(sel.valid.values())
    for x in kept:
        assert x.ipv6_only and check_lease(ONLY6, x) is None and sel.valid[x.ident] is x
    assert len({x.ipv6_subnet for x in kept}) == len(kept)
    assert {x.key for x in kept} | set(sel.ignored) == {x.key for x in leases}
    choice = choose(ONLY6, leases, NO_ADDRESS, rng=random.Random(seed), public_ipv6=ME6)
    taken = {x.ipv6_subnet for x in leases}
    if choice is None:  # out of subnets only when every one of the 15 is named by some key
        assert (
            len(taken & {IPv6Network((0xFD000001 << 96 | i << 64, 64)) for i in range(1, 16)}) == 15
        )
        return
    assert choice.subnet == NO_IPV4 and choice.reason == "random" and choice.existing is None
    assert choice.ipv6_subnet is not None and ONLY6.contains_ipv6(choice.ipv6_subnet)
    assert choice.ipv6_subnet not in taken


def test_a_host_finds_its_own_ipv6_only_lease_by_its_public_ipv6() -> None:
    """flannel's etcd manager looks a host's lease up by PublicIP, which is 0.0.0.0 for every
    IPv6-only host: it would hand the second host the first one's lease. overlay looks it up
    by PublicIPv6."""
    theirs = only6("fd00:1:0:3::/64", "fd99::11")
    mine = only6("fd00:1:0:7::/64", str(ME6))
    assert own_leases(ONLY6, [theirs, mine], NO_ADDRESS, ME6) == [mine]
    choice = choose(ONLY6, [theirs, mine], NO_ADDRESS, public_ipv6=ME6)
    assert choice is not None and choice.reason == "own" and choice.existing is mine
    # A host whose IPv6 address has no lease yet never takes another's.
    other = choose(ONLY6, [theirs, mine], NO_ADDRESS, public_ipv6=IPv6Address("fd99::77"))
    assert other is not None and other.reason == "random"
    assert other.ipv6_subnet not in (theirs.ipv6_subnet, mine.ipv6_subnet)


def test_previous_ipv6_subnet_is_reused_when_free() -> None:
    prev = IPv6Network("fd00:1:0:9::/64")
    got = choose(ONLY6, [], NO_ADDRESS, previous_ipv6=prev, public_ipv6=ME6)
    assert got is not None and (got.reason, got.subnet, got.ipv6_subnet) == (
        "previous",
        NO_IPV4,
        prev,
    )
    held = choose(ONLY6, [only6(str(prev))], NO_ADDRESS, previous_ipv6=prev, public_ipv6=ME6)
    assert held is not None and held.reason == "random" and held.ipv6_subnet != prev
    assert subnet_key(NO_IPV4, prev) == "0.0.0.0-0&fd00:1:0:9::-64"


def test_out_of_ipv6_subnets() -> None:
    full = [only6(f"fd00:1:0:{i:x}::/64", f"fd99::{i + 20:x}") for i in range(1, 16)]
    assert choose(ONLY6, full, NO_ADDRESS, public_ipv6=ME6) is None


# --------------------------------------------------------------------------- the other parts


def test_traffic_rules_have_no_ipv4_family() -> None:
    net6, own6 = IPv6Network("fd00:1::/48"), IPv6Network("fd00:1:0:5::/64")
    ipt = IptablesRules(None, None, ipv6=(net6, own6))
    assert [f.iptables for f in ipt.families] == ["ip6tables"]
    assert any(f"-s {net6}" in " ".join(r) for c in ipt.chains for r in c.rules)
    nft = NftRules(None, None, ipv6=(net6, own6))
    script = nft.script()
    assert "flannel-ipv6" in script and "flannel-ipv4" not in script and "10." not in script


def test_udp_backend_refuses_an_ipv6_only_network() -> None:
    config = NetworkConfig.from_dict(
        {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:1::/48"}
    )
    ext = ExternalInterface("eth0", 2, NO_ADDRESS, NO_ADDRESS, 1500, ME6, ME6)
    with pytest.raises(BackendError, match="IPv6-only"):
        UdpBackend(config, ext)
