"""Pure tests of the vxlan backend's option parsing, desired state and planning (no root)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends import netlink as nl
from backends.base import ExternalInterface
from backends.vxlan_device import VxlanOptions, device_mtu, random_mac
from backends.vxlan_plan import DesiredIndex, Peer, desired_peers, plan
from subnetmgr.model import ConfigError, Lease, LeaseAttrs

NET = IPv4Network("10.5.0.0/16")
VX, EXT = 10, 2


def ext(mtu: int = 1500, addr: Any = None) -> ExternalInterface:
    a = addr or IPv4Address("192.168.90.1")
    return ExternalInterface("eth0", EXT, a, a, mtu)


def lease(
    subnet: str, ip: str, mac: str | None = "0a:00:00:00:00:02", btype: str = "vxlan"
) -> Lease:
    data = {"VNI": 1, "VtepMAC": mac} if mac is not None else None
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), None, btype, data))


def test_options_defaults_follow_flannel() -> None:
    o = VxlanOptions.from_backend({"type": "vxlan"})
    assert (o.vni, o.port, o.gbp, o.learning, o.mtu, o.direct_routing) == (
        1,
        8472,
        False,
        False,
        0,
        False,
    )
    assert o.device == "flannel.1"
    assert not o.disable_tx_checksum
    assert not o.filter_peers


def test_filter_peers_option() -> None:
    assert VxlanOptions.from_backend({"FilterPeers": True}).filter_peers
    assert VxlanOptions.from_backend({"filterPEERS": True}).filter_peers
    assert not VxlanOptions.from_backend({"FilterPeers": False}).filter_peers
    assert not VxlanOptions.from_backend({"FilterPeers": None}).filter_peers  # as if absent


def test_options_are_case_insensitive_and_port_zero_means_8472() -> None:
    o = VxlanOptions.from_backend(
        {"VNI": 42, "Port": 0, "DirectRouting": True, "DisableTxChecksumOffload": True}
    )
    assert (o.vni, o.port, o.direct_routing, o.disable_tx_checksum) == (42, 8472, True, True)
    assert o.device == "flannel.42"


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("vni", "1", "Backend.VNI"),
        ("vni", 1 << 24, "Backend.VNI"),
        ("vni", 10_000_000, "Backend.VNI"),  # flannel.10000000 is 16 characters
        ("port", 70000, "Backend.Port"),
        ("mtu", 40, "Backend.MTU"),
        ("mtu", 117, "Backend.MTU"),  # the underlay MTU: the device would get 67
        ("mtu", 1500.0, "Backend.MTU"),
        ("mtu", True, "Backend.MTU"),
        ("learning", "yes", "Backend.Learning"),
        ("directrouting", 1, "Backend.DirectRouting"),
        ("disabletxchecksumoffload", "off", "Backend.DisableTxChecksumOffload"),
        ("filterpeers", "true", "Backend.FilterPeers"),
        ("filterpeers", 1, "Backend.FilterPeers"),
        ("FilterPeers", {"on": True}, "Backend.FilterPeers"),
        ("FilterPeers", [True], "Backend.FilterPeers"),
    ],
)
def test_bad_options_name_the_field_and_value(key: str, value: object, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        VxlanOptions.from_backend({key: value})
    assert info.value.field == field
    assert repr(value) in str(info.value)


def test_mtu_rules() -> None:
    assert device_mtu(VxlanOptions(), ext(1500)) == 1450
    assert device_mtu(VxlanOptions(), ext(9000)) == 8950
    # Backend.MTU is the underlay MTU (flannel's meaning): the device gets 50 less, whatever
    # the external interface's MTU is.
    assert device_mtu(VxlanOptions(mtu=1300), ext(9000)) == 1250
    assert device_mtu(VxlanOptions(mtu=9000), ext(1500)) == 8950
    assert device_mtu(VxlanOptions.from_backend({"MTU": 118}), ext(1500)) == 68
    # An IPv6 underlay costs 70 bytes (flannel subtracts 50 regardless; we do not).
    assert device_mtu(VxlanOptions(), ext(1500, IPv6Address("fd00::1"))) == 1430


def test_random_mac_is_locally_administered_unicast() -> None:
    macs = {random_mac() for _ in range(200)}
    assert len(macs) == 200
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01


def test_desired_peers_filters_types_own_subnet_and_malformed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    leases = [
        lease("10.5.2.0/24", "192.168.90.2", "0A:00:00:00:00:02"),
        lease("10.5.3.0/24", "192.168.90.3", None, "host-gw"),
        lease("10.5.4.0/24", "192.168.90.4", None, ""),
        lease("10.5.5.0/24", "192.168.90.5", "not-a-mac"),
        lease("10.5.6.0/24", "192.168.90.6", "01:00:00:00:00:06"),  # multicast
        lease("10.5.1.0/24", "192.168.90.1", "0a:00:00:00:00:01"),  # our own
        lease("10.5.7.0/24", "10.99.0.7", "0a:00:00:00:00:07"),
    ]
    skipped: set[tuple[str, str]] = set()
    got = desired_peers(
        {le.subnet: le for le in leases},
        IPv4Network("10.5.1.0/24"),
        [IPv4Network("192.168.90.0/24")],
        skipped,
    )
    assert got == {
        IPv4Network("10.5.2.0/24"): Peer(
            IPv4Network("10.5.2.0/24"), "0a:00:00:00:00:02", IPv4Address("192.168.90.2"), True
        ),
        IPv4Network("10.5.7.0/24"): Peer(
            IPv4Network("10.5.7.0/24"), "0a:00:00:00:00:07", IPv4Address("10.99.0.7"), False
        ),
    }
    assert "10.5.5.0-24" in caplog.text and "not-a-mac" in caplog.text
    assert "10.5.6.0-24" in caplog.text
    # Logged once per lease and value, not on every reconcile.
    caplog.clear()
    desired_peers({le.subnet: le for le in leases}, None, None, skipped)
    assert "malformed" not in caplog.text


def _peer(n: int, direct: bool = False) -> Peer:
    return Peer(
        IPv4Network(f"10.5.{n}.0/24"),
        f"0a:00:00:00:00:{n:02x}",
        IPv4Address(f"192.168.90.{n}"),
        direct,
    )


def _kernel_for(peers: list[Peer]) -> tuple[list[nl.Neighbour], list[nl.FdbEntry], list[nl.Route]]:
    neigh = [
        nl.Neighbour(VX, p.subnet.network_address, p.vtep_mac, nl.NUD_PERMANENT) for p in peers
    ]
    fdb = [nl.FdbEntry(VX, p.vtep_mac, p.public_ip, nl.NUD_PERMANENT, nl.NTF_SELF) for p in peers]
    routes = [
        nl.Route(p.subnet, VX, p.subnet.network_address, 254, 3, 0, 1, nl.RTNH_F_ONLINK, None)
        for p in peers
    ]
    return neigh, fdb, routes


def _plan(desired: list[Peer], kernel: tuple[list[Any], list[Any], list[Any]]) -> Any:
    neigh, fdb, routes = kernel
    return plan(
        {p.subnet: p for p in desired},
        vx_index=VX,
        ext_index=EXT,
        network=NET,
        neighbours=neigh,
        fdb=fdb,
        routes=routes,
    )


def test_plan_is_empty_when_the_kernel_matches() -> None:
    peers = [_peer(2), _peer(3)]
    assert len(_plan(peers, _kernel_for(peers))) == 0


def test_plan_adds_in_flannel_order_and_removes_stale() -> None:
    p = _plan([_peer(2)], _kernel_for([_peer(3)]))
    assert [r.type for r in p.adds] == [nl.RTM_NEWNEIGH, nl.RTM_NEWNEIGH, nl.RTM_NEWROUTE]
    assert [r.what for r in p.adds] == [
        "neighbour 10.5.2.0 lladdr 0a:00:00:00:00:02",
        "fdb 0a:00:00:00:00:02 dst 192.168.90.2",
        "route 10.5.2.0/24 via 10.5.2.0 dev #10 onlink",
    ]
    assert [r.what for r in p.deletes] == [
        "route 10.5.3.0/24 via 10.5.3.0 (delete)",
        "neighbour 10.5.3.0 (delete)",
        "fdb 0a:00:00:00:00:03 dst 192.168.90.3 (delete)",
    ]


def test_plan_replaces_changed_mac_and_public_ip() -> None:
    old = _peer(2)
    new = Peer(old.subnet, "0a:00:00:00:00:99", IPv4Address("192.168.90.77"), False)
    p = _plan([new], _kernel_for([old]))
    assert [r.what for r in p.adds] == [
        "neighbour 10.5.2.0 lladdr 0a:00:00:00:00:99",
        "fdb 0a:00:00:00:00:99 dst 192.168.90.77",
    ]
    assert [r.what for r in p.deletes] == ["fdb 0a:00:00:00:00:02 dst 192.168.90.2 (delete)"]


def test_plan_direct_routing_moves_the_route_and_drops_neigh_and_fdb() -> None:
    p = _plan([_peer(2, direct=True)], _kernel_for([_peer(2)]))
    assert [r.what for r in p.adds] == ["route 10.5.2.0/24 via 192.168.90.2 dev #2"]
    assert [r.what for r in p.deletes] == [
        "neighbour 10.5.2.0 (delete)",
        "fdb 0a:00:00:00:00:02 dst 192.168.90.2 (delete)",
    ]


def test_plan_leaves_foreign_routes_alone() -> None:
    foreign = [
        # The external interface's own connected route and a default route.
        nl.Route(IPv4Network("192.168.90.0/24"), EXT, None, 254, 2, 253, 1, 0, None),
        nl.Route(
            IPv4Network("0.0.0.0/0"), EXT, IPv4Address("192.168.90.254"), 254, 3, 0, 1, 0, None
        ),
        # A route to the whole cluster network on the external interface is not a lease's.
        nl.Route(NET, EXT, IPv4Address("192.168.90.254"), 254, 3, 0, 1, 0, None),
        # The kernel's route for an address someone put on the device (protocol kernel).
        nl.Route(IPv4Network("10.5.1.0/24"), VX, None, 254, 2, 253, 1, 0, None),
    ]
    assert len(_plan([], ([], [], foreign))) == 0
    # ...but a gateway route for a lease-sized subnet there is (a stale DirectRouting route).
    stale = nl.Route(
        IPv4Network("10.5.9.0/24"), EXT, IPv4Address("192.168.90.9"), 254, 3, 0, 1, 0, None
    )
    assert [r.what for r in _plan([], ([], [], [stale])).deletes] == [
        "route 10.5.9.0/24 via 192.168.90.9 (delete)"
    ]


def test_netlink_requests_decode_back_to_what_was_asked() -> None:
    # Our encoder against our decoder: the kernel tests check the kernel's view of the same bytes.
    ifindex, dst, mac = 7, IPv4Address("10.5.2.0"), "0a:00:00:00:00:02"
    neigh = nl.parse_neighbour(memoryview(nl.neigh_replace(ifindex, dst, mac).body))
    assert neigh == nl.Neighbour(ifindex, dst, mac, nl.NUD_PERMANENT)
    fdb = nl.parse_neighbour(memoryview(nl.fdb_replace(ifindex, mac, IPv4Address("1.2.3.4")).body))
    assert fdb == nl.FdbEntry(ifindex, mac, IPv4Address("1.2.3.4"), nl.NUD_PERMANENT, nl.NTF_SELF)
    req = nl.route_replace(IPv4Network("10.5.2.0/24"), dst, ifindex, onlink=True)
    route = nl.parse_route(memoryview(req.body))
    assert route is not None
    assert (route.dst, route.gateway, route.oif, route.onlink, route.table) == (
        IPv4Network("10.5.2.0/24"),
        dst,
        ifindex,
        True,
        nl.RT_TABLE_MAIN,
    )


@pytest.mark.parametrize("bad", ["", "0a:00:00:00:00", "0a:00:00:00:00:0g", "0a-00-00-00-00-02"])
def test_mac_parsing_names_the_bad_value(bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(")):
        nl.mac_bytes(bad)


def test_desired_index_keeps_a_shared_vtep_until_its_last_lease_goes() -> None:
    """Two leases of one host (its old subnet still leased) share VtepMAC and PublicIP."""
    a = _peer(2)
    b = Peer(IPv4Network("10.5.8.0/24"), a.vtep_mac, a.public_ip, False)
    index = DesiredIndex.build({a.subnet: a, b.subnet: b})
    index.put(a.subnet, None)
    assert index.want_fdb(a.vtep_mac) == {a.public_ip}
    assert index.want_neigh(a.subnet.network_address) is None
    assert index.want_neigh(b.subnet.network_address) == a.vtep_mac
    index.put(b.subnet, Peer(b.subnet, b.vtep_mac, b.public_ip, True))  # now DirectRouting
    assert index.want_fdb(a.vtep_mac) == set() and index.by_mac == {} and index.by_addr == {}
    assert list(index.peers) == [b.subnet]


@given(
    st.lists(
        st.tuples(
            st.integers(0, 7),  # which subnet 10.5.<n>.0/24
            st.one_of(st.none(), st.tuples(st.integers(1, 3), st.booleans())),  # (host, direct)
        ),
        max_size=40,
    )
)
def test_desired_index_by_ip_follows_any_sequence_of_changes(
    changes: list[tuple[int, tuple[int, bool] | None]],
) -> None:
    """The peer filter's index: after any sequence of puts, by_ip names exactly the subnets
    whose peer has that PublicIP (DirectRouting peers too), and no empty entries."""
    index = DesiredIndex()
    for n, what in changes:
        subnet = IPv4Network(f"10.5.{n}.0/24")
        if what is None:
            index.put(subnet, None)
        else:
            host, direct = what
            mac = f"0a:00:00:00:00:{host:02x}"
            index.put(subnet, Peer(subnet, mac, IPv4Address(f"192.168.90.{host}"), direct))
    want: dict[IPv4Address, set[IPv4Network]] = {}
    for subnet, peer in index.peers.items():
        want.setdefault(peer.public_ip, set()).add(subnet)
    assert index.by_ip == want


def test_plan_restricted_to_keys_leaves_other_entries_alone() -> None:
    """An incremental plan sees only the changed subnets' keys: a wrong entry elsewhere in the
    kernel lists is not its business (the full pass's)."""
    a, b, c = _peer(2), _peer(3), _peer(4)
    index = DesiredIndex.build({a.subnet: a, b.subnet: b, c.subnet: c})
    neigh, fdb, routes = _kernel_for([b, c])  # a is new; b and c are right...
    neigh[0] = nl.Neighbour(VX, b.subnet.network_address, "0a:bb:bb:bb:bb:bb", nl.NUD_PERMANENT)
    p = plan(
        {a.subnet: a},
        vx_index=VX,
        ext_index=EXT,
        network=NET,
        neighbours=[n for n in neigh if n.dst == a.subnet.network_address],
        fdb=[f for f in fdb if f.lladdr == a.vtep_mac],
        routes=[r for r in routes if r.dst == a.subnet],
        index=index,
        neigh_keys={a.subnet.network_address},
        mac_keys={a.vtep_mac},
    )
    assert [r.what for r in p.adds] == [
        "neighbour 10.5.2.0 lladdr 0a:00:00:00:00:02",
        "fdb 0a:00:00:00:00:02 dst 192.168.90.2",
        "route 10.5.2.0/24 via 10.5.2.0 dev #10 onlink",
    ]
    assert p.deletes == []
    # ...while the full plan over the same kernel state fixes b's neighbour too.
    full = plan(index.peers, vx_index=VX, ext_index=EXT, network=NET, neighbours=neigh,
                fdb=fdb, routes=routes)  # fmt: skip
    assert "neighbour 10.5.3.0 lladdr 0a:00:00:00:00:03" in [r.what for r in full.adds]


def test_get_requests_encode_what_they_ask_for() -> None:
    dst, mac = IPv4Address("10.5.2.0"), "0a:00:00:00:00:02"
    neigh = nl.parse_neighbour(memoryview(nl.neigh_get(7, dst).body))
    assert neigh == nl.Neighbour(7, dst, None, 0)
    fdb = nl.parse_neighbour(memoryview(nl.fdb_get(7, mac).body))
    assert fdb == nl.FdbEntry(7, mac, None, 0, nl.NTF_SELF)
    route = nl.parse_route(memoryview(nl.route_get(dst).body))
    assert route is not None and route.dst == IPv4Network("10.5.2.0/32")
    assert route.flags == nl.RTM_F_FIB_MATCH


@given(st.one_of(st.integers(-(1 << 70), 1 << 70), st.floats(), st.text(max_size=8), st.none()))
def test_backend_mtu_is_the_underlay_mtu_or_a_typed_error(value: object) -> None:
    """Any Backend.MTU value gives a ConfigError naming the key, or a device MTU that is the
    value (the external interface's when 0 or absent) minus 50 and at least 68."""
    try:
        options = VxlanOptions.from_backend({"MTU": value})
    except ConfigError as e:
        assert e.field == "Backend.MTU"
        return
    mtu = device_mtu(options, ext(1500))
    if value in (None, 0):
        assert mtu == 1450
    else:
        assert isinstance(value, int) and mtu == value - 50 and mtu >= 68
