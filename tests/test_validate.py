"""Leases checked against the network config before any backend sees them (subnetmgr.validate),
and allocation next to hostile leases (subnetmgr.allocation). Pure, no etcd; property-based
with hypothesis where a rule must hold for any set of leases."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from subnetmgr.allocation import blocks, choose, free_subnets
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig
from subnetmgr.validate import Ignored, IgnoredLeases, check_lease, select_leases

CONFIG = NetworkConfig.from_json('{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}')


def lease(subnet: str, ip: str = "192.168.1.10", rev: int = 5, v6: str | None = None) -> Lease:
    return Lease(
        IPv4Network(subnet),
        LeaseAttrs(IPv4Address(ip), backend_type="vxlan"),
        IPv6Network(v6) if v6 else None,
        None,
        rev,
    )


@pytest.mark.parametrize(
    ("subnet", "ip", "reason"),
    [
        ("0.0.0.0/0", "192.168.1.10", "outside_network"),
        ("10.0.0.0/8", "192.168.1.10", "outside_network"),
        ("10.2.0.0/24", "192.168.1.10", "outside_network"),
        ("10.1.0.0/16", "192.168.1.10", "wrong_prefix_len"),
        ("10.1.5.0/25", "192.168.1.10", "wrong_prefix_len"),
        ("10.1.4.0/23", "192.168.1.10", "wrong_prefix_len"),
        ("10.1.5.0/24", "0.0.0.0", "unusable_public_ip"),
        ("10.1.5.0/24", "0.1.2.3", "unusable_public_ip"),
        ("10.1.5.0/24", "127.0.0.1", "unusable_public_ip"),
        ("10.1.5.0/24", "224.0.0.1", "unusable_public_ip"),
        ("10.1.5.0/24", "169.254.1.1", "unusable_public_ip"),
        ("10.1.5.0/24", "240.0.0.1", "unusable_public_ip"),
        ("10.1.5.0/24", "255.255.255.255", "unusable_public_ip"),
        ("10.1.5.0/24", "192.168.1.10", None),
        ("10.1.255.0/24", "10.9.9.9", None),
    ],
)
def test_check_lease(subnet: str, ip: str, reason: str | None) -> None:
    problem = check_lease(CONFIG, lease(subnet, ip))
    assert (problem[0] if problem else None) == reason
    if problem:
        assert subnet in problem[1] or ip in problem[1]


def test_the_older_of_two_keys_for_one_subnet_wins_everywhere() -> None:
    old = lease("10.1.5.0/24", "192.168.1.10", rev=7)
    dup = lease("10.1.5.0/24", "192.168.1.66", rev=9, v6="fd00::/56")
    for order in ([old, dup], [dup, old]):
        sel = select_leases(CONFIG, order)
        assert sel.valid == {old.subnet: old}
        assert sel.valid[old.subnet].attrs.public_ip == IPv4Address("192.168.1.10")
        assert sel.ignored[dup.key][0] == "overlaps_older"
        assert "192.168.1.10" in sel.ignored[dup.key][1]


def test_our_own_lease_is_never_dropped() -> None:
    own = lease("10.1.5.0/24", "192.168.1.10", rev=20)
    older_dup = lease("10.1.5.0/24", "192.168.1.66", rev=3, v6="fd00::/56")
    inside = lease("10.1.5.0/25", "192.168.1.67", rev=2)
    everything = lease("0.0.0.0/0", "192.168.1.68", rev=1)
    sel = select_leases(CONFIG, [everything, inside, older_dup, own], own=own)
    assert sel.valid == {own.subnet: own}
    assert sel.ignored == {
        older_dup.key: ("overlaps_own", sel.ignored[older_dup.key][1]),
        inside.key: ("wrong_prefix_len", sel.ignored[inside.key][1]),
        everything.key: ("outside_network", sel.ignored[everything.key][1]),
    }
    # Our own key is not checked (we hold it), even if its value looks odd to the checks, and
    # when it is absent nothing takes its subnet over.
    odd = lease("10.1.5.0/24", "127.0.0.1", rev=20)
    assert select_leases(CONFIG, [odd], own=own).valid == {own.subnet: odd}
    assert select_leases(CONFIG, [older_dup], own=own).valid == {}


def test_without_a_config_only_duplicates_are_resolved() -> None:
    weird = lease("10.9.0.0/25", "127.0.0.1")
    sel = select_leases(None, [weird])
    assert sel.valid == {weird.subnet: weird} and sel.ignored == {}


# --------------------------------------------------------------------------- properties

SMALL = NetworkConfig.from_json('{"Network":"10.1.0.0/22","SubnetLen":24}')
IPS = ["0.0.0.0", "0.1.2.3", "127.0.0.1", "224.0.0.1", "169.254.1.1", "255.255.255.255",
       "240.0.0.1", "192.168.1.10", "192.168.1.11", "10.200.0.1"]  # fmt: skip

hostile_leases = st.builds(
    lambda net, ip, rev, v6: Lease(
        net,
        LeaseAttrs(IPv4Address(ip)),
        IPv6Network((v6 << 64, 64)) if v6 is not None else None,
        None,
        rev,
    ),
    st.one_of(
        # Mostly SMALL's own four /24s, so that several keys name one subnet often.
        st.sampled_from([IPv4Network(f"10.1.{i}.0/24") for i in range(4)]),
        st.builds(
            lambda addr, length: IPv4Network((addr, length), strict=False),
            st.one_of(st.integers(0x0A010000 - 1024, 0x0A010000 + 2048), st.integers(0, 2**32 - 1)),
            st.one_of(st.integers(20, 26), st.integers(0, 32)),
        ),
    ),
    st.sampled_from(IPS),
    st.integers(0, 6),  # few revisions: ties are decided by the key
    st.none() | st.integers(0, 3),  # dual-stack keys: a second key for one IPv4 subnet
)


@given(st.lists(hostile_leases, max_size=25), st.randoms(use_true_random=False), st.booleans())
def test_selection_is_sound_and_independent_of_order(
    leases: list[Lease], rnd: random.Random, with_own: bool
) -> None:
    own = next((x for x in leases if SMALL.contains(x.subnet)), None) if with_own else None
    sel = select_leases(SMALL, leases, own=own)
    kept = list(sel.valid.values())
    # Nothing outside Network, of another length, with an unusable PublicIP (but our own).
    for x in kept:
        if own is not None and x.key == own.key:
            continue
        assert x.subnet.subnet_of(SMALL.network) and x.subnet.prefixlen == SMALL.subnet_len
        assert check_lease(SMALL, x) is None
    # No two kept leases overlap.
    for i, a in enumerate(kept):
        for b in kept[i + 1 :]:
            assert not a.subnet.overlaps(b.subnet)
    # Every key is either kept or ignored with a reason, never both.
    by_key = {x.key: x for x in leases}
    kept_keys = {x.key for x in kept}
    assert kept_keys.isdisjoint(sel.ignored) and kept_keys | set(sel.ignored) == set(by_key)
    # Our own lease keeps its subnet.
    if own is not None:
        assert sel.valid[own.subnet].key == own.key
    # Of several valid keys for one subnet, the oldest (then the smaller key) is kept.
    for x in kept:
        rivals = [y for y in by_key.values() if y.subnet == x.subnet and y.key in sel.ignored]
        if own is None:
            for y in rivals:
                if sel.ignored[y.key][0] == "overlaps_older":
                    assert (x.create_revision, x.key) < (y.create_revision, y.key)
    # The same answer in any order (one value per key, as etcd has).
    shuffled = list(by_key.values())
    rnd.shuffle(shuffled)
    again = select_leases(SMALL, shuffled, own=own)
    assert {s: x.key for s, x in again.valid.items()} == {s: x.key for s, x in sel.valid.items()}
    assert again.ignored == sel.ignored


@given(st.lists(hostile_leases, max_size=25), st.integers(0, 2**16))
def test_allocation_never_collides_with_a_valid_lease(leases: list[Lease], seed: int) -> None:
    valid = select_leases(SMALL, leases).valid
    choice = choose(SMALL, leases, IPv4Address("192.168.9.9"), rng=random.Random(seed))
    if choice is None:
        # Out of subnets only when every subnet is blocked by a key that could be a lease here.
        taken = [x.subnet for x in leases if blocks(SMALL, x.subnet)]
        assert free_subnets(SMALL, taken) == []
        return
    assert SMALL.contains(choice.subnet)
    for x in valid.values():
        assert not x.subnet.overlaps(choice.subnet)
    for x in leases:  # an existing key is never chosen again (its create would fail)
        assert x.subnet != choice.subnet


def test_a_rogue_key_over_the_whole_range_blocks_nothing() -> None:
    rogue = [lease("0.0.0.0/0", rev=1), lease("10.0.0.0/8", rev=2), lease("10.1.0.0/16", rev=3),
             lease("10.1.0.0/17", rev=4), lease("10.1.5.7/32", rev=5)]  # fmt: skip
    choice = choose(CONFIG, rogue, IPv4Address("192.168.9.9"), rng=random.Random(1))
    assert choice is not None and choice.reason == "random"
    # ... while a valid lease, and one of another SubnetLen that a host running the previous
    # config may hold, still make the subnets they overlap taken.
    one = NetworkConfig.from_json('{"Network":"10.1.0.0/22","SubnetLen":24,"SubnetMin":"10.1.1.0"}')
    held = [lease("10.1.1.0/24"), lease("10.1.2.0/25"), lease("10.1.3.128/25", "127.0.0.1")]
    assert choose(one, held + rogue, IPv4Address("192.168.9.9")) is None
    free = choose(one, held[:2] + rogue, IPv4Address("192.168.9.9"))
    assert free is not None and free.subnet == IPv4Network("10.1.3.0/24")


# --------------------------------------------------------------------------- the record


def test_ignored_keys_are_logged_and_counted_once_per_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counted: list[str] = []
    rec = IgnoredLeases(on_new=lambda ig: counted.append(ig.reason))
    bad = Ignored("10.1.5.0-25", "wrong_prefix_len", "a /25", 7, lease("10.1.5.0/25"))
    with caplog.at_level("INFO", logger="overlay.subnetmgr.validate"):
        for _ in range(5):  # lists and watch events meeting the same key and value again
            rec.ignore(bad, b"value-1")
        assert counted == ["wrong_prefix_len"] and dict(rec.current) == {bad.key: bad}
        rec.ignore(bad, b"value-2")  # a new value: logged and counted again
        assert counted == ["wrong_prefix_len"] * 2
        rec.clear(bad.key, checked=False)  # only the codec's own entries: this one stays
        assert bad.key in rec.current
        changes = rec.changes
        rec.clear(bad.key, deleted=True)
        assert rec.current == {} and rec.changes == changes + 1
        rec.ignore(bad, b"value-2")  # deleted and written again: a new key
        assert counted == ["wrong_prefix_len"] * 3
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3
    assert "10.1.5.0-25 (revision 7): a /25 [wrong_prefix_len]" in warnings[0].getMessage()
    assert "no longer ignored (deleted)" in caplog.text
