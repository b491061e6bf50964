"""Dual stack, pure parts: IPv6 allocation (flannel's allocateSubnet rule), dual-stack keys,
the IPv6 checks of lease validation, the IPv6 peer plan, and the flags. No root, no etcd."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.ipv6 import desired_v6
from overlay.options import parse_options
from subnetmgr.allocation import blocks_ipv6, choose, free_ipv6_subnets, own_leases
from subnetmgr.model import (
    NO_IPV4,
    ConfigError,
    Lease,
    LeaseAttrs,
    MalformedLease,
    NetworkConfig,
    parse_subnet_key,
    subnet_key,
)
from subnetmgr.validate import check_lease, ipv6_owners, unusable_public_ipv6

ME = IPv4Address("192.168.0.10")
OTHER = IPv4Address("192.168.0.11")
MAC = "02:00:00:00:00:01"


def dual(**extra: object) -> NetworkConfig:
    doc: dict[str, Any] = {
        "Network": "10.1.0.0/16",
        "EnableIPv6": True,
        "IPv6Network": "fd00:1::/48",
        "Backend": {"Type": "vxlan"},
    }
    doc.update(extra)
    return NetworkConfig.from_dict(doc)


def lease(
    subnet: str,
    sub6: str | None = None,
    ip: IPv4Address = OTHER,
    ip6: str | None = "fd99::2",
    backend: str = "vxlan",
    v6_data: dict[str, Any] | None = None,
    revision: int = 0,
    reserved: bool = False,
) -> Lease:
    attrs = LeaseAttrs(
        ip,
        IPv6Address(ip6) if ip6 else None,
        backend,
        {"VNI": 1, "VtepMAC": MAC} if backend == "vxlan" else None,
        v6_data if v6_data is not None else ({"VNI": 1, "VtepMAC": MAC} if sub6 else None),
    )
    return Lease(
        IPv4Network(subnet),
        attrs,
        IPv6Network(sub6) if sub6 else None,
        None if reserved else 1e12,
        revision,
    )


# --------------------------------------------------------------------------- allocation


def test_random_choice_is_dual_stack_and_inside_both_ranges() -> None:
    c = dual()
    got = choose(c, [], ME, rng=random.Random(1))
    assert got is not None and got.reason == "random" and got.ipv6_subnet is not None
    assert c.contains(got.subnet) and c.contains_ipv6(got.ipv6_subnet)
    # flannel's rule: the first 100 free IPv6 subnets from IPv6SubnetMin (fd00:1:0:1::/64 on)
    first = int(IPv6Network("fd00:1:0:1::/64").network_address)
    assert first <= int(got.ipv6_subnet.network_address) < first + (100 << 64)


def test_ipv6_walk_skips_taken_v6_parts_independently_of_v4() -> None:
    c = dual(IPv6Network="fd00:1::/62")  # IPv6SubnetLen 64: subnets :1, :2, :3
    taken = [lease("10.1.9.0/24", "fd00:1:0:1::/64"), lease("10.1.8.0/24", "fd00:1:0:3::/64")]
    got = choose(c, taken, ME, rng=random.Random(3))
    assert got is not None and got.ipv6_subnet == IPv6Network("fd00:1:0:2::/64")
    assert got.subnet not in (IPv4Network("10.1.9.0/24"), IPv4Network("10.1.8.0/24"))


def test_out_of_ipv6_subnets_is_out_of_subnets() -> None:
    c = dual(IPv6Network="fd00:1::/62")  # /64s :1, :2, :3 after the skipped first one
    taken = [lease(f"10.1.{9 + i}.0/24", f"fd00:1:0:{i}::/64") for i in (1, 2, 3)]
    assert choose(c, taken, ME) is None
    assert choose(c, taken[:2], ME) is not None


def test_own_dual_stack_lease_is_kept_and_an_ipv4_only_one_does_not_fit() -> None:
    c = dual()
    mine = lease("10.1.5.0/24", "fd00:1:0:5::/64", ip=ME)
    old = lease("10.1.6.0/24", None, ip=ME)
    assert own_leases(c, [old, mine], ME) == [mine]
    got = choose(c, [old, mine], ME)
    assert got is not None and got.reason == "own" and got.existing == mine
    assert got.ipv6_subnet == IPv6Network("fd00:1:0:5::/64")
    # Without EnableIPv6 only the IPv4-only key fits (flannel's isIPv6SubnetConfigCompat).
    v4 = NetworkConfig.from_dict({"Network": "10.1.0.0/16"})
    assert own_leases(v4, [old, mine], ME) == [old]


def test_previous_needs_both_parts_fitting_and_free() -> None:
    c = dual()
    prev4, prev6 = IPv4Network("10.1.7.0/24"), IPv6Network("fd00:1:0:7::/64")
    got = choose(c, [], ME, prev4, previous_ipv6=prev6)
    assert got is not None and (got.reason, got.subnet, got.ipv6_subnet) == (
        "previous",
        prev4,
        prev6,
    )
    taken = [lease("10.1.99.0/24", "fd00:1:0:7::/64")]  # someone holds the IPv6 part now
    got = choose(c, taken, ME, prev4, previous_ipv6=prev6, rng=random.Random(0))
    assert got is not None and got.reason == "random"
    got = choose(c, [], ME, prev4, previous_ipv6=None, rng=random.Random(0))
    assert got is not None and got.reason == "random"  # subnet.env had no IPv6 subnet
    got = choose(c, [], ME, prev4, previous_ipv6=IPv6Network("fd00:2::/64"))
    assert got is not None and got.reason == "random"  # outside IPv6Network


def test_huge_ipv6_keys_do_not_block_the_whole_range() -> None:
    c = dual()
    rogue = [lease("10.1.9.0/24", "::/0"), lease("10.1.8.0/24", "fd00:1::/48")]
    assert not blocks_ipv6(c, IPv6Network("::/0"))
    assert not blocks_ipv6(c, IPv6Network("fd00:1::/48"))
    assert blocks_ipv6(c, IPv6Network("fd00:1:0:4::/64"))
    assert choose(c, rogue, ME) is not None


@given(
    taken=st.lists(st.integers(0, 15), max_size=16),
    seed=st.integers(0, 2**32),
)
def test_properties_ipv6_choice_never_overlaps_a_taken_v6_part(taken: list[int], seed: int) -> None:
    """Whatever IPv6 parts are taken: the choice is None exactly when every IPv6 subnet of the
    range is taken, else an aligned /IPv6SubnetLen in range overlapping none of them."""
    c = dual(IPv6Network="fd00:1::/60")  # /64s 1..15 usable (the first is skipped)
    leases = [lease(f"10.1.{200 + i}.0/24", f"fd00:1:0:{i:x}::/64", revision=i) for i in set(taken)]
    got = choose(c, leases, ME, rng=random.Random(seed))
    free = free_ipv6_subnets(c, [x.ipv6_subnet for x in leases if x.ipv6_subnet])
    if not free:
        assert got is None
        assert set(range(1, 16)) <= set(taken)
    else:
        assert got is not None and got.ipv6_subnet is not None
        assert c.contains_ipv6(got.ipv6_subnet)
        assert all(not got.ipv6_subnet.overlaps(x.ipv6_subnet) for x in leases if x.ipv6_subnet)


# --------------------------------------------------------------------------- keys


@given(
    v4=st.integers(0, 2**24 - 1),
    v6=st.integers(0, 2**64 - 1),
    len6=st.integers(1, 128),
)
def test_properties_dual_stack_key_round_trip(v4: int, v6: int, len6: int) -> None:
    """Every dual-stack key subnet_key writes parses back to the same two subnets."""
    sub4 = IPv4Network((v4 << 8, 24))
    sub6 = IPv6Network(((v6 << 64) & ~((1 << (128 - len6)) - 1), len6))
    key = subnet_key(sub4, sub6)
    assert "&" in key and parse_subnet_key(key) == (sub4, sub6)


@pytest.mark.parametrize(
    "text",
    [
        "10.12.13.0-24&fd00:12:13::-129",  # prefix out of range
        "10.12.13.0-24&fd00:12:13::1-56",  # host bits
        "10.12.13.0-24&FD00:12:13::-56",  # not canonical
        "10.12.13.0-24&fd00:12:13:0::-56",  # not canonical
        "10.12.13.0-24&10.1.0.0-16",  # IPv4 in the IPv6 part
        "10.12.13.0-24&",
        "10.12.13.0-24&fd00::-56&fd01::-56",
        "&fd00::-56",
        "10.12.13.0-24&::ffff:10.1.2.0-120x",
    ],
)
def test_hostile_dual_stack_keys_are_refused(text: str) -> None:
    with pytest.raises(MalformedLease):
        parse_subnet_key(text)


def test_flannels_dual_stack_key_literal() -> None:
    assert parse_subnet_key("10.12.13.0-24&fd00:12:13::-56") == (
        IPv4Network("10.12.13.0/24"),
        IPv6Network("fd00:12:13::/56"),
    )


def test_dual_stack_lease_value_is_flannels_bytes() -> None:
    attrs = LeaseAttrs(
        IPv4Address("192.168.64.3"),
        IPv6Address("fd99::3"),
        "vxlan",
        {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"},
        {"VNI": 1, "VtepMAC": "ce:aa:32:6f:8f:45"},
    )
    assert attrs.to_json() == (
        '{"PublicIP":"192.168.64.3","PublicIPv6":"fd99::3","BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},'
        '"BackendV6Data":{"VNI":1,"VtepMAC":"ce:aa:32:6f:8f:45"}}'
    )
    assert LeaseAttrs.from_json(attrs.to_json()) == attrs


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("sub6", "ip6", "reason"),
    [
        ("fd00:2::/64", "fd99::2", "ipv6_outside_network"),
        ("::/0", "fd99::2", "ipv6_outside_network"),
        ("fd00:1:0:4::/63", "fd99::2", "ipv6_wrong_prefix_len"),
        ("fd00:1:0:4:8000::/65", "fd99::2", "ipv6_wrong_prefix_len"),
        ("fd00:1:0:4::/64", "::", "unusable_public_ipv6"),
        ("fd00:1:0:4::/64", "::1", "unusable_public_ipv6"),
        ("fd00:1:0:4::/64", "ff02::1", "unusable_public_ipv6"),
        ("fd00:1:0:4::/64", "fe80::1", "unusable_public_ipv6"),
        ("fd00:1:0:4::/64", "::ffff:192.168.0.1", "unusable_public_ipv6"),
        ("fd00:1:0:4::/64", "fd99::2", None),
        ("fd00:1:0:4::/64", None, None),  # no PublicIPv6: the backends skip its IPv6 side
    ],
)
def test_check_lease_ipv6_part(sub6: str, ip6: str | None, reason: str | None) -> None:
    problem = check_lease(dual(), lease("10.1.4.0/24", sub6, ip6=ip6))
    assert (problem[0] if problem else None) == reason
    # Without EnableIPv6 the IPv6 part is neither used nor checked.
    v4 = NetworkConfig.from_dict({"Network": "10.1.0.0/16"})
    assert check_lease(v4, lease("10.1.4.0/24", sub6, ip6=ip6)) is None


@given(st.integers(0, 2**128 - 1))
def test_properties_unusable_public_ipv6(raw: int) -> None:
    """A usable PublicIPv6 is a unicast address a host can have: never multicast, loopback,
    unspecified, link-local or IPv4-mapped; anything else gets a reason."""
    ip = IPv6Address(raw)
    bad = (
        ip.is_multicast
        or ip.is_loopback
        or ip.is_unspecified
        or ip.is_link_local
        or ip.ipv4_mapped is not None
        or ip.is_reserved
    )
    assert (unusable_public_ipv6(ip) is not None) == bad


def test_ipv6_owners_keeps_the_older_and_never_our_own() -> None:
    own = lease("10.1.1.0/24", "fd00:1:0:1::/64", ip=ME)
    a = lease("10.1.2.0/24", "fd00:1:0:2::/64", revision=10)
    b = lease("10.1.3.0/24", "fd00:1:0:2::/64", revision=5)
    c = lease("10.1.4.0/24", "fd00:1:0:1::/64", revision=1)
    owners = ipv6_owners([a, b, c], own)
    assert owners == {IPv6Network("fd00:1:0:2::/64"): b}
    assert ipv6_owners([b, a], own) == ipv6_owners([a, b], own)


# --------------------------------------------------------------------------- the IPv6 plan


def test_desired_v6_skips_what_it_cannot_program_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    own = lease("10.1.1.0/24", "fd00:1:0:1::/64", ip=ME)
    good = lease("10.1.2.0/24", "fd00:1:0:2::/64", ip6="fd99::2")
    no_ip6 = lease("10.1.3.0/24", "fd00:1:0:3::/64", ip6=None)
    bad_mac = lease(
        "10.1.4.0/24", "fd00:1:0:4::/64", v6_data={"VNI": 1, "VtepMAC": "ff:ff:ff:ff:ff:ff"}
    )
    no_data = lease("10.1.5.0/24", "fd00:1:0:5::/64", v6_data={"VNI": 1})
    deep = lease("10.1.6.0/24", "fd00:1:0:6::/64", v6_data={"VtepMAC": [[["x" * 500]]]})
    v4_only = lease("10.1.7.0/24", None)
    hostgw = lease("10.1.8.0/24", "fd00:1:0:8::/64", backend="host-gw")
    steals = lease("10.1.9.0/24", "fd00:1:0:1::/64")  # names our IPv6 subnet
    peers = {x.subnet: x for x in (good, no_ip6, bad_mac, no_data, deep, v4_only, hostgw, steals)}
    skipped: set[tuple[str, str]] = set()
    for _ in range(2):
        want = desired_v6(peers, own, "vxlan", need_mac=True, skipped=skipped)
        assert list(want) == [IPv6Network("fd00:1:0:2::/64")]
        peer = want[IPv6Network("fd00:1:0:2::/64")]
        assert (peer.public_ipv6, peer.vtep_mac) == (IPv6Address("fd99::2"), MAC)
    lines = [r.getMessage() for r in caplog.records if "skipping the IPv6 side" in r.getMessage()]
    assert len(lines) == 5  # no_ip6, bad_mac, no_data, deep, steals: once each
    assert all(len(line) < 400 for line in lines)
    gw = desired_v6(peers, own, "host-gw", need_mac=False, skipped=set())
    assert (
        list(gw) == [IPv6Network("fd00:1:0:8::/64")]
        and gw[IPv6Network("fd00:1:0:8::/64")].vtep_mac is None
    )


# --------------------------------------------------------------------------- config and flags


def test_ipv6_only_config_has_no_ipv4_part() -> None:
    config = NetworkConfig.from_dict(
        {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:1::/48",
         "Backend": {"Type": "vxlan"}}
    )  # fmt: skip
    assert config.ipv6_only and not config.enable_ipv4 and config.network is None
    assert config.subnet_min is None and config.subnet_max is None and config.subnet_len == 0
    assert config.ipv6_subnet_len == 64
    assert config.ipv6_subnet_min == IPv6Network("fd00:1:0:1::/64")
    assert config.ipv6_subnet_max == IPv6Network("fd00:1:0:ffff::/64")
    # The IPv4 part of every lease is flannel's zero subnet.
    assert config.contains(NO_IPV4) and not config.contains(IPv4Network("10.1.5.0/24"))
    assert config.contains_ipv6(IPv6Network("fd00:1:0:5::/64"))
    assert config.describe() == ("IPv6 network fd00:1::/48 (IPv6-only), /64 subnets, backend vxlan")
    assert config.warnings == ()


def test_ipv6_only_config_ignores_the_ipv4_keys_with_a_warning() -> None:
    config = NetworkConfig.from_dict(
        {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:1::/48",
         "Network": "10.1.0.0/16", "SubnetLen": 26}
    )  # fmt: skip
    assert config.network is None
    assert any("Network, SubnetLen ignored" in w for w in config.warnings)


def test_ipv6_only_needs_ipv6() -> None:
    with pytest.raises(ConfigError, match=r"EnableIPv4=False: with EnableIPv6 false too"):
        NetworkConfig.from_dict({"EnableIPv4": False, "Network": "10.1.0.0/16"})
    with pytest.raises(ConfigError, match=r"IPv6Network=None: not an IPv6 network"):
        NetworkConfig.from_dict({"EnableIPv4": False, "EnableIPv6": True})


def test_public_ipv6_flag_and_env() -> None:
    opts = parse_options(["--public-ipv6", "fd00:9::5"], {})
    assert opts.public_ipv6 == IPv6Address("fd00:9::5")
    opts = parse_options([], {"FLANNELD_PUBLIC_IPV6": "2001:db8::7"})
    assert opts.public_ipv6 == IPv6Address("2001:db8::7")
    assert parse_options([], {}).public_ipv6 is None


@pytest.mark.parametrize(
    "value", ["10.0.0.1", "fe80::1", "ff02::1", "::", "::1", "::ffff:10.0.0.1", "fd00::/64", "x"]
)
def test_public_ipv6_flag_refuses_unusable_values(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        parse_options(["--public-ipv6", value], {})
    assert e.value.code == 2
    assert "--public-ipv6" in capsys.readouterr().err


# --------------------------------------------------------------------------- more properties


@given(
    sub=st.integers(0, 2**128 - 1),
    plen=st.integers(0, 128),
    ip6=st.none() | st.integers(0, 2**128 - 1),
)
def test_properties_check_lease_ipv6_is_a_reason_or_a_usable_ipv6_side(
    sub: int, plen: int, ip6: int | None
) -> None:
    """Any IPv6 part and PublicIPv6: a known reason, or a /IPv6SubnetLen inside IPv6Network
    with a usable (or no) PublicIPv6."""
    c = dual()
    sub6 = IPv6Network((sub & ~((1 << (128 - plen)) - 1), plen))
    l6 = Lease(
        IPv4Network("10.1.4.0/24"),
        LeaseAttrs(ME, IPv6Address(ip6) if ip6 is not None else None, "vxlan"),
        sub6,
    )
    problem = check_lease(c, l6)
    if problem is None:
        assert c.ipv6_network is not None and sub6.subnet_of(c.ipv6_network)
        assert sub6.prefixlen == c.ipv6_subnet_len
        assert ip6 is None or unusable_public_ipv6(IPv6Address(ip6)) is None
    else:
        assert problem[0] in {
            "ipv6_outside_network",
            "ipv6_wrong_prefix_len",
            "unusable_public_ipv6",
        }


@given(st.text(max_size=300))
def test_properties_previous_ipv6_subnet_from_any_subnet_env(text: str) -> None:
    """Whatever subnet.env holds: None or an IPv6 network, never an exception; a subnet.env
    the daemon wrote gives its FLANNEL_IPV6_SUBNET's network back."""
    import tempfile
    from pathlib import Path

    from overlay.subnetenv import SubnetEnv, read_previous_ipv6_subnet, write_subnet_env

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "subnet.env"
        path.write_text(text, errors="surrogateescape")
        got = read_previous_ipv6_subnet(path)
        assert got is None or isinstance(got, IPv6Network)
        env = SubnetEnv(
            IPv4Network("10.1.0.0/16"),
            IPv4Network("10.1.7.0/24"),
            1450,
            False,
            IPv6Network("fd00:1::/48"),
            IPv6Network("fd00:1:0:7::/64"),
        )
        write_subnet_env(path, env)
        assert read_previous_ipv6_subnet(path) == IPv6Network("fd00:1:0:7::/64")


def test_iface_can_reach_takes_ipv6_and_refuses_garbage(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_options(["--iface-can-reach", "fd00:9::1"], {}).iface_can_reach == IPv6Address(
        "fd00:9::1"
    )
    env = {"FLANNELD_IFACE_CAN_REACH": "192.0.2.1"}
    assert parse_options([], env).iface_can_reach == IPv4Address("192.0.2.1")
    with pytest.raises(SystemExit):
        parse_options(["--iface-can-reach", "fd00::/64"], {})
    assert "--iface-can-reach" in capsys.readouterr().err


# --------------------------------------------------------------------------- DirectRouting (IPv6)


def test_desired_v6_marks_on_link_peers_direct() -> None:
    own = lease("10.1.1.0/24", "fd00:1:0:1::/64", ip=ME)
    near = lease("10.1.2.0/24", "fd00:1:0:2::/64", ip6="fd99::2")
    far = lease("10.1.3.0/24", "fd00:1:0:3::/64", ip6="fd77::3")
    peers = {x.subnet: x for x in (near, far)}
    nets = [IPv6Network("fd99::/64"), IPv6Network("2001:db8::1/128")]
    want = desired_v6(peers, own, "vxlan", need_mac=True, skipped=set(), onlink=nets)
    direct = {str(s): p.direct for s, p in want.items()}
    assert direct == {"fd00:1:0:2::/64": True, "fd00:1:0:3::/64": False}
    # DirectRouting off (None) or no networks: nobody is direct.
    for onlink in (None, []):
        want = desired_v6(peers, own, "vxlan", need_mac=True, skipped=set(), onlink=onlink)
        assert not any(p.direct for p in want.values())


@given(
    st.ip_addresses(v=6),
    st.lists(st.tuples(st.ip_addresses(), st.integers(0, 128)), max_size=6),
)
def test_properties_on_link_is_membership_of_the_same_family(
    ip: IPv6Address, raw: list[tuple[Any, int]]
) -> None:
    """on_link is the one test both families' DirectRouting use: inside one of the networks, of
    its own family (an IPv4 network never holds an IPv6 address, whatever the bits say)."""
    from backends.vxlan_plan import on_link

    nets: list[Any] = []
    for addr, plen in raw:
        nets.append(
            IPv4Network(f"{addr}/{min(plen, 32)}", strict=False)
            if addr.version == 4
            else IPv6Network(f"{addr}/{plen}", strict=False)
        )
    expect = any(n.version == 6 and int(ip) >> (128 - n.prefixlen) == int(n.network_address) >> (
        128 - n.prefixlen) for n in nets)  # fmt: skip
    assert on_link(ip, nets) is expect
    assert on_link(ip, None) is False
    v4 = IPv4Address(int(ip) & 0xFFFFFFFF)
    assert on_link(v4, nets) is any(n.version == 4 and v4 in n for n in nets)
