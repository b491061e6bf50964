"""host-gw's pure parts: which leases get a route, and the route plan against a simulated table."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from backends import netlink as nl
from backends.hostgw import RTPROT_HOSTGW, SkipLog, desired_routes, plan_routes
from subnetmgr.model import Lease, LeaseAttrs

NET = IPv4Network("10.5.0.0/16")
EXT, OTHER = 2, 9
ONLINK = [IPv4Network("192.168.90.0/24")]
OWN_IP = IPv4Address("192.168.90.1")


def route(
    dst: IPv4Network, gw: IPv4Address | None, oif: int, proto: int, prio: int | None
) -> nl.Route:
    return nl.Route(dst, oif, gw, nl.RT_TABLE_MAIN, proto, 0, nl.RTN_UNICAST, 0, prio)


subnets = st.integers(0, 7).map(lambda i: IPv4Network(f"10.5.{i}.0/24"))
gateways = st.integers(1, 6).map(lambda i: IPv4Address(f"192.168.90.{i + 1}"))
protos = st.sampled_from([RTPROT_HOSTGW, nl.RTPROT_BOOT, 4, 2])
kernel_routes = st.lists(
    st.builds(
        route,
        subnets,
        gateways,
        st.sampled_from([EXT, OTHER]),
        protos,
        st.sampled_from([None, 0, 100]),
    ),
    max_size=12,
)


def apply(
    table: list[nl.Route], plan: Any, desired: dict[IPv4Network, IPv4Address]
) -> list[nl.Route]:
    """What the kernel does with the plan's deletes, then its replaces: a replace at metric 0
    overwrites the first metric-0 route to that destination, else adds one."""
    out = list(table)
    for req, dst in plan.deletes:
        victim = next(r for r in out if r.dst == dst and nl.route_delete(r).body == req.body)
        out.remove(victim)
    for _req, dst in plan.adds:
        new = route(dst, desired[dst], EXT, RTPROT_HOSTGW, None)
        first = next((i for i, r in enumerate(out) if r.dst == dst and not r.priority), None)
        if first is None:
            out.append(new)
        else:
            out[first] = new
    return out


def unique(table: list[nl.Route]) -> list[nl.Route]:
    """The kernel holds one route per (destination, metric, gateway, device)."""
    seen: dict[tuple[Any, ...], nl.Route] = {}
    for r in table:
        seen.setdefault((r.dst, r.priority or 0, r.gateway, r.oif), r)
    return list(seen.values())


@given(st.dictionaries(subnets, gateways, max_size=8), kernel_routes)
def test_plan_reaches_the_desired_routes_and_never_removes_others(
    desired: dict[IPv4Network, IPv4Address], table: list[nl.Route]
) -> None:
    """After the plan: every wanted route is ours at metric 0 unless someone else's route holds
    metric 0 there (a conflict, left alone); no route of ours is left where none is wanted; every
    route that is not ours is still there (or rewritten as ours with the same gateway and
    device: adopted); and planning again gives nothing to do."""
    table = unique(table)
    plan = plan_routes(desired, table, ext_index=EXT)
    for req, _ in plan.deletes:
        assert req.type == nl.RTM_DELROUTE
    after = apply(table, plan, desired)
    for dst, gw in desired.items():
        first = [r for r in after if r.dst == dst and not r.priority]
        if dst in plan.conflicts:
            assert plan.conflicts[dst] in table and plan.conflicts[dst].protocol != RTPROT_HOSTGW
        else:
            assert any(
                r.protocol == RTPROT_HOSTGW and r.gateway == gw and r.oif == EXT for r in first
            )
    for r in after:
        if r.protocol == RTPROT_HOSTGW:
            assert r.dst in desired and not r.priority
    for r in table:
        if r.protocol != RTPROT_HOSTGW and r not in after:
            adopted = route(r.dst, r.gateway, EXT, RTPROT_HOSTGW, None)
            assert r.oif == EXT and not r.priority and adopted in after
    assert len(plan_routes(desired, after, ext_index=EXT)) == 0


def gw_lease(subnet: str, ip: str, btype: str = "host-gw") -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), None, btype, None))


def test_desired_routes_rules() -> None:
    skipped = SkipLog()
    leases = [
        gw_lease("10.5.2.0/24", "192.168.90.2"),
        gw_lease("10.5.3.0/24", "192.168.77.3"),  # not on-link
        gw_lease("10.5.4.0/24", "192.168.90.1"),  # our own PublicIP
        gw_lease("10.6.0.0/24", "192.168.90.6"),  # outside the network
        gw_lease("10.5.0.0/16", "192.168.90.7"),  # the whole network
        gw_lease("10.5.5.0/24", "192.168.90.5", "vxlan"),  # another type: ignored silently
        gw_lease("10.5.1.0/24", "192.168.90.8"),  # our own subnet
        gw_lease("10.5.6.0/24", "192.168.90.255"),  # the segment's broadcast address
        gw_lease("10.5.7.0/24", "192.168.90.0"),  # the segment's network address
        gw_lease("10.5.8.0/24", "0.0.0.0"),
        gw_lease("10.5.9.0/24", "127.0.0.1"),
        gw_lease("10.5.10.0/24", "224.0.0.1"),
        gw_lease("10.5.11.0/24", "255.255.255.255"),
    ]
    want = desired_routes(
        {le.subnet: le for le in leases},
        own_subnet=IPv4Network("10.5.1.0/24"),
        own_ip=OWN_IP,
        network=NET,
        onlink=[*ONLINK, IPv4Network("192.168.77.3/32")],  # a /32 is no segment
        skipped=skipped,
    )
    assert want == {IPv4Network("10.5.2.0/24"): IPv4Address("192.168.90.2")}
    assert sorted(map(str, skipped.reasons)) == [
        "10.5.0.0/16", "10.5.10.0/24", "10.5.11.0/24", "10.5.3.0/24", "10.5.4.0/24",
        "10.5.6.0/24", "10.5.7.0/24", "10.5.8.0/24", "10.5.9.0/24", "10.6.0.0/24",
    ]  # fmt: skip
    assert "broadcast" in skipped.reasons[IPv4Network("10.5.6.0/24")]
    assert "not on-link" in skipped.reasons[IPv4Network("10.5.3.0/24")]


@given(
    st.integers(0, 32).flatmap(
        lambda n: st.builds(lambda a: IPv4Network((a, n), strict=False), st.integers(0, 2**32 - 1))
    ),
    st.integers(0, 2**32 - 1).map(IPv4Address),
    st.integers(1, 2**31 - 1),
    st.integers(0, 255),
    st.booleans(),
)
def test_route_replace_decodes_to_what_was_asked(
    dst: IPv4Network, gw: IPv4Address, oif: int, proto: int, onlink: bool
) -> None:
    """The route request host-gw sends, read back by the parser the passes use on the kernel's
    answers: the same destination, gateway, device, protocol and onlink flag, main table."""
    req = nl.route_replace(dst, gw, oif, onlink=onlink, protocol=proto)
    assert req.type == nl.RTM_NEWROUTE
    got = nl.parse_route(memoryview(req.body))
    assert got is not None
    assert (got.dst, got.gateway, got.oif, got.protocol, got.onlink, got.table) == (
        dst, gw, oif, proto, onlink, nl.RT_TABLE_MAIN,
    )  # fmt: skip
    assert got.priority is None and got.type == nl.RTN_UNICAST


def test_lease_backend_data_is_ignored_by_host_gw() -> None:
    """flannel's host-gw reads no BackendData: whatever a lease carries there changes nothing."""
    odd = Lease(
        IPv4Network("10.5.2.0/24"),
        LeaseAttrs(IPv4Address("192.168.90.2"), None, "host-gw", {"VtepMAC": [1, {"x": None}]}),
    )
    want = desired_routes(
        {odd.subnet: odd}, own_subnet=None, own_ip=OWN_IP, network=NET, onlink=ONLINK,
        skipped=SkipLog(),
    )  # fmt: skip
    assert want == {odd.subnet: IPv4Address("192.168.90.2")}
