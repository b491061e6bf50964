"""The host-gw backend against the real kernel, in throwaway namespaces; asserts with `ip -j`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from backends import create
from backends.base import BackendError, ExternalInterface
from backends.hostgw import RTPROT_HOSTGW, HostGwBackend
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig, Subnet
from tests.netns import Netns
from tests.test_vxlan_kernel import HOST_IP, OWN, Host, lab, lease

pytestmark = pytest.mark.root

__all__ = ["lab"]  # the fixture, used by name

NETWORK = "10.5.0.0/16"
A = ("10.5.2.0/24", "192.168.90.2")
B = ("10.5.3.0/24", "192.168.90.3")
FAR = ("10.5.4.0/24", "192.168.77.4")  # not on the external interface's /24


def config() -> NetworkConfig:
    return NetworkConfig.from_dict({"Network": NETWORK, "Backend": {"Type": "host-gw"}})


def gw_lease(entry: tuple[str, str]) -> Lease:
    return lease(entry[0], entry[1], None, "host-gw")


def peers(*leases: Lease) -> dict[Subnet, Lease]:
    return {le.subnet: le for le in leases}


@pytest.fixture(name="host")
def fixture_host(lab: Any) -> Host:
    h = lab.netns("h")
    u = lab.netns("u")
    veth, _ = lab.veth(h, u, f"{HOST_IP}/24", "192.168.90.254/24", mtu=9000)
    return Host(h, ExternalInterface(veth, h.ifindex(veth), HOST_IP, HOST_IP, 9000))


@pytest.fixture(name="backends")
async def fixture_backends() -> AsyncIterator[list[HostGwBackend]]:
    made: list[HostGwBackend] = []
    try:
        yield made
    finally:
        for b in made:
            await b.close()


async def started(host: Host, backends: list[HostGwBackend]) -> HostGwBackend:
    b = HostGwBackend(config(), host.ext, netns=host.ns.name)
    backends.append(b)
    await b.prepare()
    await b.start(gw_lease((str(OWN), str(HOST_IP))))
    return b


def routes(ns: Netns, *args: str) -> list[tuple[str, str | None, str, str | None]]:
    """Main-table IPv4 routes inside the network: (dst, gateway, dev, protocol), sorted."""
    return sorted(
        (r["dst"], r.get("gateway"), r["dev"], r.get("protocol"))
        for r in ns.ip_json("-4", "route", "show", "root", NETWORK, *args)
    )


def ours(host: Host, *entries: tuple[str, str]) -> list[tuple[str, str | None, str, str | None]]:
    return sorted((s, ip, host.ext.name, str(RTPROT_HOSTGW)) for s, ip in entries)


async def test_lease_attrs_and_mtu(host: Host, backends: list[HostGwBackend]) -> None:
    b = create(config(), host.ext)
    assert isinstance(b, HostGwBackend)
    await b.close()
    b = HostGwBackend(config(), host.ext, netns=host.ns.name)
    backends.append(b)
    attrs = await b.prepare()
    assert (attrs.backend_type, attrs.backend_data) == ("host-gw", None)
    value = LeaseAttrs(HOST_IP, None, attrs.backend_type, attrs.backend_data).to_json()
    assert value == '{"PublicIP":"192.168.90.1","PublicIPv6":null,"BackendType":"host-gw"}'
    assert await b.start(gw_lease((str(OWN), str(HOST_IP)))) == 9000  # the interface's MTU


def test_public_ip_behind_nat_is_refused(host: Host) -> None:
    ext = ExternalInterface(
        host.ext.name, host.ext.index, HOST_IP, IPv4Address("203.0.113.9"), 1500
    )
    with pytest.raises(BackendError, match=r"public IP 203\.0\.113\.9 differs.*use vxlan"):
        HostGwBackend(config(), ext, netns=host.ns.name)


async def test_routes_appear_and_a_second_pass_changes_nothing(
    host: Host, backends: list[HostGwBackend]
) -> None:
    b = await started(host, backends)
    vx = lease("10.5.7.0/24", "192.168.90.7", "0a:00:00:00:00:07")  # vxlan: not ours
    own = gw_lease((str(OWN), str(HOST_IP)))
    await b.reconcile(peers(gw_lease(A), gw_lease(B), vx, own))
    assert routes(host.ns) == ours(host, A, B)
    assert (b.last.full, b.last.applied, b.last.routes) == (True, 2, 2)
    await b.reconcile(peers(gw_lease(A), gw_lease(B), vx, own))
    assert (b.last.applied, b.last.failed) == (0, 0)
    assert routes(host.ns) == ours(host, A, B)


async def test_lease_events_are_incremental(host: Host, backends: list[HostGwBackend]) -> None:
    b = await started(host, backends)
    await b.reconcile(peers(gw_lease(A), gw_lease(B)))
    moved = gw_lease((A[0], "192.168.90.22"))
    await b.reconcile(peers(moved, gw_lease(B)), [moved.subnet])
    assert (b.last.full, b.last.reads) == (False, 1)
    assert routes(host.ns) == ours(host, (A[0], "192.168.90.22"), B)
    b_subnet = IPv4Network(B[0])
    await b.reconcile(peers(moved), [b_subnet])
    assert routes(host.ns) == ours(host, (A[0], "192.168.90.22"))
    # A hand-deleted route is not looked at by an event for another subnet...
    host.ns.ip("route", "del", A[0])
    await b.reconcile(peers(moved, gw_lease(B)), [b_subnet])
    assert routes(host.ns) == ours(host, B)
    # ... but comes back at the next full pass.
    await b.reconcile(peers(moved, gw_lease(B)))
    assert routes(host.ns) == ours(host, (A[0], "192.168.90.22"), B)


async def test_restart_adopts_routes_without_touching_them(
    host: Host, backends: list[HostGwBackend]
) -> None:
    first = await started(host, backends)
    await first.reconcile(peers(gw_lease(A), gw_lease(B)))
    await first.close()
    second = await started(host, backends)
    await second.reconcile(peers(gw_lease(A), gw_lease(B)))
    assert (second.last.applied, second.last.failed) == (0, 0)  # nothing deleted or rewritten
    assert routes(host.ns) == ours(host, A, B)


async def test_a_route_flannel_made_is_adopted(host: Host, backends: list[HostGwBackend]) -> None:
    # flanneld's route for a lease: same destination, gateway and device, protocol boot.
    host.ns.ip("route", "add", A[0], "via", A[1], "dev", host.ext.name)
    b = await started(host, backends)
    await b.reconcile(peers(gw_lease(A)))
    assert routes(host.ns) == ours(host, A)
    await b.reconcile({})  # once ours, it goes with its lease
    assert routes(host.ns) == []


async def test_public_ip_not_on_link_is_skipped_and_logged_once(
    host: Host, backends: list[HostGwBackend], caplog: pytest.LogCaptureFixture
) -> None:
    b = await started(host, backends)
    caplog.set_level(logging.WARNING, "backends.hostgw")
    all_peers = peers(gw_lease(A), gw_lease(FAR))
    await b.reconcile(all_peers)
    assert routes(host.ns) == ours(host, A)
    far_lines = [r.getMessage() for r in caplog.records if "10.5.4.0/24" in r.getMessage()]
    assert len(far_lines) == 1
    assert "192.168.77.4 is not on-link" in far_lines[0] and "one L2 segment" in far_lines[0]
    assert b.last.skipped == 1
    caplog.clear()
    await b.reconcile(all_peers)
    await b.reconcile(all_peers, [IPv4Network(FAR[0])])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert routes(host.ns) == ours(host, A)
    # The host moves onto the segment: routed, and no longer skipped.
    near = gw_lease((FAR[0], "192.168.90.4"))
    await b.reconcile(peers(gw_lease(A), near), [near.subnet])
    assert routes(host.ns) == ours(host, A, (FAR[0], "192.168.90.4"))
    assert b.last.skipped == 0


async def test_a_route_the_kernel_refuses_is_skipped_and_logged_once(
    host: Host, backends: list[HostGwBackend], caplog: pytest.LogCaptureFixture
) -> None:
    """The address is on the segment but its connected route was deleted: the on-link check
    (the interface's networks) passes, the kernel says the gateway is unreachable."""
    ns, dev = host.ns, host.ext.name
    b = await started(host, backends)
    await b.reconcile(peers(gw_lease(A)))
    ns.ip("route", "del", "192.168.90.0/24", "dev", dev)
    caplog.set_level(logging.WARNING, "backends.hostgw")
    all_peers = peers(gw_lease(A), gw_lease(B))
    await b.reconcile(all_peers, [IPv4Network(B[0])])
    await b.reconcile(all_peers)
    await b.reconcile(all_peers)
    lines = [r.getMessage() for r in caplog.records if "10.5.3.0/24" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "the kernel refused route 10.5.3.0/24 via 192.168.90.3" in lines[0]
    assert "Network is unreachable" in lines[0] and "one L2 segment" in lines[0]
    assert (b.last.failed, b.last.skipped) == (1, 1)
    assert routes(ns) == ours(host, A)
    # The segment is back: the next full pass routes the lease.
    ns.ip("route", "add", "192.168.90.0/24", "dev", dev, "proto", "kernel", "scope", "link",
          "src", str(HOST_IP))  # fmt: skip
    await b.reconcile(all_peers)
    assert routes(ns) == ours(host, A, B)
    assert (b.last.failed, b.last.skipped) == (0, 0)


async def test_routes_of_the_operator_are_never_removed(
    host: Host, backends: list[HostGwBackend], caplog: pytest.LogCaptureFixture
) -> None:
    ns, dev = host.ns, host.ext.name
    # A route inside the network with no lease, via a host on the segment.
    ns.ip("route", "add", "10.5.9.0/24", "via", "192.168.90.9", "dev", dev)
    # A backup route for a lease's subnet at another metric.
    ns.ip("route", "add", A[0], "via", "192.168.90.99", "dev", dev, "metric", "100")
    # A lease whose subnet the operator already routes elsewhere at metric 0.
    ns.ip("route", "add", B[0], "via", "192.168.90.98", "dev", dev, "proto", "static")
    b = await started(host, backends)
    caplog.set_level(logging.WARNING, "backends.hostgw")
    await b.reconcile(peers(gw_lease(A), gw_lease(B)))
    assert "10.5.3.0/24: a route to it that is not ours is already there" in caplog.text
    have = ns.ip_json("-4", "route", "show", "root", NETWORK)
    assert sorted(
        (r["dst"], r.get("gateway"), r.get("metric"), r.get("protocol")) for r in have
    ) == [
        ("10.5.2.0/24", "192.168.90.2", None, str(RTPROT_HOSTGW)),
        ("10.5.2.0/24", "192.168.90.99", 100, None),  # proto boot: not shown
        ("10.5.3.0/24", "192.168.90.98", None, "static"),
        ("10.5.9.0/24", "192.168.90.9", None, None),  # proto boot: not shown
    ]
    await b.reconcile({})  # every lease gone: only our route goes
    await b.reconcile({}, [IPv4Network(A[0]), IPv4Network(B[0])])
    have = ns.ip_json("-4", "route", "show", "root", NETWORK)
    assert sorted((r["dst"], r.get("gateway"), r.get("protocol")) for r in have) == [
        ("10.5.2.0/24", "192.168.90.99", None),  # proto boot: not shown
        ("10.5.3.0/24", "192.168.90.98", "static"),
        ("10.5.9.0/24", "192.168.90.9", None),  # proto boot: not shown
    ]


async def test_a_lease_outside_the_network_or_with_our_ip_makes_no_route(
    host: Host, backends: list[HostGwBackend], caplog: pytest.LogCaptureFixture
) -> None:
    b = await started(host, backends)
    caplog.set_level(logging.WARNING, "backends.hostgw")
    outside = gw_lease(("192.168.90.0/25", "192.168.90.5"))  # would shadow the underlay
    whole = gw_lease((NETWORK, "192.168.90.6"))
    mine = gw_lease(("10.5.8.0/24", str(HOST_IP)))  # an older lease of this host
    await b.reconcile(peers(outside, whole, mine, gw_lease(A)))
    assert routes(host.ns) == ours(host, A)
    # Nothing of ours anywhere in the main table but that one route.
    mine_all = host.ns.ip_json("-4", "route", "show", "proto", str(RTPROT_HOSTGW))
    assert [(r["dst"], r["gateway"]) for r in mine_all] == [A]
    assert "not inside the network" in caplog.text and "is our own" in caplog.text


async def test_missing_namespace_is_a_backend_error(host: Host) -> None:
    b = HostGwBackend(config(), host.ext, netns="no-such-ns-hostgw")
    with pytest.raises(BackendError, match="does not exist"):
        await b.prepare()
    await b.close()
