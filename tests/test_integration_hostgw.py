"""Integration with the host-gw backend: real overlayd daemons in namespaces, real traffic.

One 3-host lab with Backend.Type host-gw is shared by the tests of this module (the lab's hosts
share one underlay bridge, so they are L2 neighbours as host-gw needs). The tests run in file
order as in tests/test_integration.py: looking first, then repairs, a hand-made flannel host, a
4th host joining and leaving, and a restart; each restores what it disturbed and checks full
connectivity again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from backends.hostgw import RTPROT_HOSTGW
from integration.containers import SubnetEnv
from integration.lab import Lab
from integration.netns import ip_json, run
from tests.labtools import (
    assert_full_connectivity,
    assert_kept_subnet_and_lease,
    eventually,
    probe_stream,
    remote_subnets,
    running_lab,
    underlay_capture,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

RESYNC = "1"  # seconds: the daemons' full reconcile pass, so repairs are quick to observe


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab(tmp_path_factory, "g", "host-gw", RESYNC)


async def hostgw_routes(lab: Lab, index: int) -> dict[str, str]:
    """Host `index`'s routes of ours (proto 77): subnet -> gateway; all must be on eth0."""
    routes = await ip_json(
        "-4", "route", "show", "proto", str(RTPROT_HOSTGW), ns=lab.node(index).ns
    )
    assert all(r["dev"] == "eth0" for r in routes), routes
    return {r["dst"]: r["gateway"] for r in routes}


def expected_routes(lab: Lab, index: int) -> dict[str, str]:
    return {n.subnet: n.ip for n in lab.state.nodes if n.index != index and n.subnet}


async def test_three_hosts_full_connectivity(lab: Lab) -> None:
    leases = await lab.leases()
    assert {str(s) for s in leases} == {n.subnet for n in lab.state.nodes}
    out = await lab.etcdctl("get", "--prefix", f"{lab.state.prefix}/subnets/", "-w", "json")
    values = {base64.b64decode(kv["value"]).decode() for kv in json.loads(out)["kvs"]}
    # flannel's exact bytes for a host-gw lease: no BackendData.
    assert values == {
        f'{{"PublicIP":"{n.ip}","PublicIPv6":null,"BackendType":"host-gw"}}'
        for n in lab.state.nodes
    }
    for node in lab.state.nodes:
        assert await hostgw_routes(lab, node.index) == expected_routes(lab, node.index)
        env = SubnetEnv.read(lab.subnet_file(node.index))
        assert env.mtu == 1500  # the external interface's: no encapsulation
        links = await ip_json("link", "show", ns=node.ns)
        assert not [x["ifname"] for x in links if x["ifname"].startswith("flannel")]
    await assert_full_connectivity(lab)


async def test_underlay_carries_plain_ip(lab: Lab, tmp_path: Path) -> None:
    """Container packets cross the underlay unencapsulated, between the hosts' MACs."""
    from scapy.layers.inet import IP
    from scapy.utils import rdpcap

    pcap = tmp_path / "underlay.pcap"
    (src_node, src), (_, dst) = lab.containers()[0], lab.containers()[1]
    async with underlay_capture(lab, src_node.index, pcap, "ip"):
        out = await run(sys.executable, "-m", "integration.probe", "check", str(dst.ip), ns=src.ns)
        assert all(r["ok"] for r in json.loads(out))
    seen = {(p[IP].src, p[IP].dst) for p in rdpcap(str(pcap)) if IP in p}
    assert (str(src.ip), str(dst.ip)) in seen and (str(dst.ip), str(src.ip)) in seen


async def test_route_deleted_by_hand_comes_back(lab: Lab) -> None:
    ns = lab.node(1).ns
    victim = lab.node(2).subnet
    assert victim is not None
    await run("ip", "route", "del", victim, ns=ns)

    async def repaired() -> bool:
        return await hostgw_routes(lab, 1) == expected_routes(lab, 1)

    await eventually(repaired, "the deleted route is back after a full pass")
    await assert_full_connectivity(lab)


async def test_flannel_host_configured_by_hand_reaches_overlay_hosts(lab: Lab) -> None:
    node = await lab.add_flannel_host()
    try:
        assert node.subnet is not None

        async def everyone_routes_to_it() -> bool:
            for n in lab.state.nodes:
                if n.kind == "overlayd":
                    if (await hostgw_routes(lab, n.index)).get(node.subnet) != node.ip:
                        return False
            return True

        await eventually(everyone_routes_to_it, "overlayd hosts route to the flannel host")
        # The flannel host's own routes are flannel's (proto boot), made by iproute2.
        routes = await ip_json("-4", "route", "show", "root", lab.state.network, ns=node.ns)
        assert {r["dst"]: r["gateway"] for r in routes if "gateway" in r} == remote_gateways(
            lab, node.index
        )
        await assert_full_connectivity(lab)
    finally:
        await lab.remove_node(node.index)

    async def routes_gone() -> bool:
        for n in lab.state.nodes:
            if node.subnet in await hostgw_routes(lab, n.index):
                return False
        return True

    await eventually(routes_gone, "routes to the removed flannel host disappear")


def remote_gateways(lab: Lab, index: int) -> dict[str, str]:
    return {n.subnet: n.ip for n in lab.state.nodes if n.index != index and n.subnet}


async def test_host_joins_then_leaves(lab: Lab) -> None:
    joined = await lab.add_node()

    async def everyone_routes_to_it() -> bool:
        for n in lab.state.nodes:
            if await hostgw_routes(lab, n.index) != expected_routes(lab, n.index):
                return False
        return True

    async def routes_gone() -> bool:
        for n in lab.state.nodes:
            if n.index != joined.index and joined.subnet in await hostgw_routes(lab, n.index):
                return False
        return True

    try:
        await eventually(everyone_routes_to_it, "every host routes to the 4th host and back")
        assert set(await hostgw_routes(lab, joined.index)) == remote_subnets(lab, joined.index)
        await assert_full_connectivity(lab)
    finally:
        await lab.remove_node(joined.index)
    await eventually(routes_gone, "routes to the 4th host disappear from the others")
    await assert_full_connectivity(lab)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_restart_keeps_routes_and_traffic(lab: Lab, sig: signal.Signals) -> None:
    h1 = lab.node(1)
    lease_before = (await lab.leases())[IPv4Network(h1.subnet)]
    routes_before = await hostgw_routes(lab, 1)
    async with probe_stream(lab, source=2, target=1) as summary:
        await asyncio.sleep(0.5)
        await lab.stop_daemon(1, sig)
        assert await hostgw_routes(lab, 1) == routes_before  # nothing flushed on exit
        await lab.start_daemon(1)
        await asyncio.sleep(1.0)
    print(f"\nhost-gw restart with {sig.name}: {summary}")
    assert summary["received"] > 0
    assert lease_before.attrs.public_ip == IPv4Address(h1.ip)
    await assert_kept_subnet_and_lease(lab, 1, lease_before)
    assert await hostgw_routes(lab, 1) == routes_before
    await assert_full_connectivity(lab)
