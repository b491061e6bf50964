"""Pure unit tests of subnet choice: flannel's walk, overlap rules and order of preference."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

from subnetmgr.allocation import MAX_CANDIDATES, choose, free_subnets, is_free, own_leases
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig

ME = IPv4Address("192.168.0.10")
OTHER = IPv4Address("192.168.0.11")


def config(network: str = "10.1.0.0/16", **extra: object) -> NetworkConfig:
    return NetworkConfig.from_dict({"Network": network, **extra})


def lease(subnet: str, ip: IPv4Address = OTHER, reserved: bool = False) -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(ip), None, None if reserved else 1e12)


def nets(*texts: str) -> list[IPv4Network]:
    return [IPv4Network(t) for t in texts]


def test_free_subnets_walks_min_to_max_skipping_the_first() -> None:
    c = config("10.1.0.0/22")
    assert free_subnets(c, []) == nets("10.1.1.0/24", "10.1.2.0/24", "10.1.3.0/24")


def test_free_subnets_skips_taken_and_overlapping_of_any_size() -> None:
    c = config("10.1.0.0/20")
    taken = nets("10.1.2.0/24", "10.1.4.0/23", "10.1.7.128/25", "10.1.9.17/32", "10.0.0.0/8")
    assert free_subnets(c, taken) == []  # 10.0.0.0/8 covers the whole network
    taken = taken[:-1]
    assert free_subnets(c, taken) == nets(
        "10.1.1.0/24",
        "10.1.3.0/24",
        "10.1.6.0/24",
        "10.1.8.0/24",
        "10.1.10.0/24",
        "10.1.11.0/24",
        "10.1.12.0/24",
        "10.1.13.0/24",
        "10.1.14.0/24",
        "10.1.15.0/24",
    )
    for subnet in free_subnets(c, taken):
        assert is_free(subnet, taken)


def test_free_subnets_respects_min_max_and_limit() -> None:
    c = config(SubnetMin="10.1.10.0", SubnetMax="10.1.12.0")
    assert free_subnets(c, nets("10.1.11.0/24")) == nets("10.1.10.0/24", "10.1.12.0/24")
    big = config("10.0.0.0/8")
    got = free_subnets(big, [])
    assert len(got) == MAX_CANDIDATES
    assert got[0] == IPv4Network("10.0.1.0/24")
    assert got[-1] == IPv4Network("10.0.100.0/24")


def test_free_subnets_matches_brute_force() -> None:
    rng = random.Random(7)
    c = config("10.9.0.0/20", SubnetLen=26)
    for _ in range(50):
        taken = []
        for _ in range(rng.randrange(0, 40)):
            plen = rng.choice([24, 25, 26, 27, 30])
            base = int(IPv4Address("10.9.0.0")) + rng.randrange(0, 4096)
            taken.append(IPv4Network((base >> (32 - plen) << (32 - plen), plen)))
        step = 64
        brute = [
            IPv4Network((a, 26))
            for a in range(
                int(c.subnet_min.network_address), int(c.subnet_max.network_address) + 1, step
            )
            if is_free(IPv4Network((a, 26)), taken)
        ][:MAX_CANDIDATES]
        assert free_subnets(c, taken) == brute


def test_choose_prefers_our_existing_lease() -> None:
    leases = [lease("10.1.5.0/24"), lease("10.1.7.0/24", ME)]
    choice = choose(config(), leases, ME, previous=IPv4Network("10.1.9.0/24"))
    assert choice is not None
    assert (choice.subnet, choice.reason) == (IPv4Network("10.1.7.0/24"), "own")
    assert choice.existing == leases[1]


def test_choose_prefers_a_reservation_over_a_lease_of_ours() -> None:
    leases = [lease("10.1.3.0/24", ME), lease("10.1.8.0/24", ME, reserved=True)]
    choice = choose(config(), leases, ME)
    assert choice is not None
    assert (choice.subnet, choice.reason) == (IPv4Network("10.1.8.0/24"), "reserved")
    assert [x.subnet for x in own_leases(config(), leases, ME)] == nets(
        "10.1.8.0/24", "10.1.3.0/24"
    )


def test_choose_ignores_our_lease_that_no_longer_fits_the_config() -> None:
    leases = [lease("10.1.7.0/24", ME), lease("10.2.7.0/24", ME)]
    c = config(SubnetMin="10.1.10.0")
    choice = choose(c, leases, ME, rng=random.Random(1))
    assert choice is not None
    assert choice.reason == "random"
    assert c.contains(choice.subnet)


def test_choose_uses_previous_when_free_and_fitting() -> None:
    prev = IPv4Network("10.1.42.0/24")
    choice = choose(config(), [lease("10.1.5.0/24")], ME, previous=prev)
    assert choice is not None and (choice.subnet, choice.reason) == (prev, "previous")
    # Taken by another host, or overlapped by a bigger lease: not used.
    for blocker in ("10.1.42.0/24", "10.1.42.0/23", "10.1.42.64/26"):
        choice = choose(config(), [lease(blocker)], ME, previous=prev, rng=random.Random(2))
        assert choice is not None and choice.reason == "random"
        assert not choice.subnet.overlaps(IPv4Network(blocker))
    # Outside the config (wrong size, outside min..max, the skipped first subnet).
    for bad in ("10.1.42.0/25", "10.9.42.0/24", "10.1.0.0/24"):
        choice = choose(config(), [], ME, previous=IPv4Network(bad), rng=random.Random(3))
        assert choice is not None and choice.reason == "random"


def test_choose_never_hands_out_a_reservation_of_another_host() -> None:
    c = config("10.1.0.0/22")  # three subnets
    leases = [lease("10.1.1.0/24", reserved=True), lease("10.1.2.0/24")]
    for seed in range(20):
        choice = choose(c, leases, ME, previous=IPv4Network("10.1.1.0/24"), rng=random.Random(seed))
        assert choice is not None and choice.subnet == IPv4Network("10.1.3.0/24")


def test_choose_random_among_the_first_hundred_free() -> None:
    c = config("10.0.0.0/8")
    seen = {choose(c, [], ME, rng=random.Random(s)).subnet for s in range(200)}  # type: ignore[union-attr]
    assert len(seen) > 50
    assert all(IPv4Network("10.0.1.0/24") <= s <= IPv4Network("10.0.100.0/24") for s in seen)


def test_choose_out_of_subnets() -> None:
    c = config("10.1.0.0/22")
    full = [lease("10.1.1.0/24"), lease("10.1.2.0/24"), lease("10.1.3.0/24", reserved=True)]
    assert choose(c, full, ME) is None


def test_choose_skips_a_dual_stack_lease_of_ours() -> None:
    from ipaddress import IPv6Network

    dual = Lease(IPv4Network("10.1.7.0/24"), LeaseAttrs(ME), IPv6Network("fd00:1::/64"), 1e12)
    choice = choose(config(), [dual], ME, rng=random.Random(4))
    assert choice is not None and choice.reason == "random"
    assert not choice.subnet.overlaps(dual.subnet)


def test_choose_draws_from_a_wider_pool_when_asked() -> None:
    c = config("10.0.0.0/8")
    seen = {
        choose(c, [], ME, rng=random.Random(s), candidates=400).subnet  # type: ignore[union-attr]
        for s in range(200)
    }
    assert any(s > IPv4Network("10.0.100.0/24") for s in seen)  # beyond flannel's 100
    assert all(IPv4Network("10.0.1.0/24") <= s <= IPv4Network("10.1.144.0/24") for s in seen)
