"""Dual stack end to end: real overlayd daemons in a `--ipv6` lab, vxlan and host-gw.

One 3-host dual-stack lab per backend (module fixture, parametrized): dual-stack lease keys and
values in etcd, subnet.env with FLANNEL_IPV6_*, containers attached by our CNI plugin through
the reference bridge/host-local getting an IPv4 and an IPv6 address, the connectivity matrix
passing on both families; hostile IPv6 leases ignored; a restart keeping both subnets; a host
set up by hand as flannel sets up a dual-stack host reaching everyone on both families.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest

from integration.containers import SubnetEnv
from integration.lab import Lab, MatrixEntry
from integration.netns import ip_json
from tests.labtools import eventually, lease_kvs, v6_routes

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(f"s{uuid.uuid4().hex[:6]}", state_root=tmp_path_factory.mktemp("labs"))
    try:
        asyncio.run(lab.up(nodes=3, backend=request.param, resync_period="1", ipv6=True))
        yield lab
    finally:
        asyncio.run(lab.down())


async def assert_both_families(lab: Lab) -> list[MatrixEntry]:
    entries = await lab.matrix()
    n = len(lab.containers())
    assert len(entries) == n * (n - 1) * 2 * 2  # TCP and UDP, IPv4 and IPv6
    assert {e.family for e in entries} == {4, 6}
    assert [e for e in entries if not e.ok] == []
    for e in entries:
        assert ip_address(e.dst_ip).version == ip_address(e.src_ip).version == e.family
    return entries


async def test_dual_stack_leases_subnet_env_containers_and_matrix(lab: Lab) -> None:
    kvs = await lease_kvs(lab)
    assert len(kvs) == 3
    for key, value in kvs:
        node = next(n for n in lab.state.nodes if n.ip == value["PublicIP"])
        assert key == f"{node.subnet}&{node.subnet6}".replace("/", "-")  # flannel's key form
        assert value["PublicIPv6"] == node.ip6
        if lab.state.backend == "vxlan":
            assert set(value["BackendV6Data"]) == {"VNI", "VtepMAC"}
            assert value["BackendV6Data"]["VtepMAC"] != value["BackendData"]["VtepMAC"]
        else:
            assert list(value) == ["PublicIP", "PublicIPv6", "BackendType"]
    for node, cont in lab.containers():
        env = SubnetEnv.read(lab.subnet_file(node.index))
        assert str(env.ipv6_network) == lab.state.network6
        assert str(env.ipv6_subnet) == node.subnet6
        assert cont.ip6 is not None and IPv6Address(cont.ip6) in IPv6Network(str(node.subnet6))
        assert IPv4Address(cont.ip) in env.subnet
        want_mtu = 1430 if lab.state.backend == "vxlan" else 1500
        assert env.mtu == want_mtu
    for node in lab.state.nodes:
        others = {str(n.subnet6) for n in lab.state.nodes if n.index != node.index}
        assert await v6_routes(lab, node.index) == others
    await assert_both_families(lab)


async def test_hostile_ipv6_leases_are_ignored(lab: Lab) -> None:
    """Keys whose IPv6 part is outside IPv6Network, of the wrong length, or whose PublicIPv6
    is unusable: no daemon routes them; one naming a host's IPv6 subnet: only its IPv4 side is
    routed. Everyone stays reachable on both families."""
    victim = lab.state.nodes[0]
    mac = "02:00:00:00:66:01"
    hostile = {
        "10.1.250.0-24&fd99::-64": "fd28::99",  # outside IPv6Network
        f"10.1.251.0-24&{lab.state.network6.split('/')[0]}-60": "fd28::99",  # wrong length
        "10.1.253.0-24&fd10:1:0:fd::-64": "ff02::1",  # multicast PublicIPv6
        "10.1.254.0-24&fd10:1:0:fe::-64": "::ffff:198.18.0.9",  # IPv4-mapped PublicIPv6
        # Last: a host's IPv6 subnet under another IPv4 subnet. Its IPv4 side is valid, so its
        # IPv4 route shows when every daemon has handled all five keys (events come in order).
        f"10.1.252.0-24&{str(victim.subnet6).replace('/', '-')}": "fd28::99",
    }
    public_ip = IPv4Network(lab.state.underlay).network_address + 99  # on-link, no host
    for key, ip6 in hostile.items():
        value = (
            f'{{"PublicIP":"{public_ip}","PublicIPv6":"{ip6}","BackendType":'
            f'"{lab.state.backend}","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}},'
            f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac}"}}}}'
        )
        await lab.etcdctl("put", f"{lab.state.prefix}/subnets/{key}", value)
    try:

        async def handled() -> bool:
            for node in lab.state.nodes:
                routes = await ip_json("-4", "route", "show", "10.1.252.0/24", ns=node.ns)
                if not routes:
                    return False
            return True

        await eventually(handled, "every daemon routes the IPv4 side of the last key")
        await asyncio.sleep(1.5)  # and a full pass (--resync-period 1) changes nothing
        for node in lab.state.nodes:
            others = {str(n.subnet6) for n in lab.state.nodes if n.index != node.index}
            assert await v6_routes(lab, node.index) == others
            routes = await ip_json("-4", "route", "show", ns=node.ns)
            # Only the key that merely repeats a host's IPv6 subnet is valid for IPv4: its
            # IPv4 side is routed, its IPv6 side is not (the older key keeps the IPv6 subnet).
            hostile4 = {r["dst"] for r in routes if r["dst"].startswith("10.1.25")}
            assert hostile4 == {"10.1.252.0/24"}, routes
        await assert_both_families(lab)
    finally:
        for key in hostile:
            await lab.etcdctl("del", f"{lab.state.prefix}/subnets/{key}")


async def test_restart_keeps_both_subnets(lab: Lab) -> None:
    node = lab.state.nodes[1]
    before = (node.subnet, node.subnet6)
    await lab.stop_daemon(node.index, signal.SIGTERM)
    await lab.start_daemon(node.index)
    env = SubnetEnv.read(lab.subnet_file(node.index))
    assert (str(env.subnet), str(env.ipv6_subnet)) == before
    leases = await lab.leases()
    assert {(str(v.subnet), str(v.subnet6)) for v in leases.values()} >= {before}
    await assert_both_families(lab)


async def test_flannel_host_by_hand_reaches_overlay_hosts_on_both_families(lab: Lab) -> None:
    node = await lab.add_flannel_host()
    try:
        assert node.subnet6 is not None

        async def everyone_routes_to_it() -> bool:
            for n in lab.state.nodes:
                if n.kind == "overlayd" and node.subnet6 not in await v6_routes(lab, n.index):
                    return False
            return True

        await eventually(everyone_routes_to_it, "overlayd hosts route IPv6 to the flannel host")
        if lab.state.backend == "vxlan":
            links = await ip_json("-d", "link", "show", "flannel-v6.1", ns=node.ns)
            assert links[0]["linkinfo"]["info_data"]["local6"] == node.ip6
        entries = await assert_both_families(lab)
        assert {e.dst for e in entries if e.family == 6} >= {c.ns for c in node.containers}
    finally:
        await lab.remove_node(node.index)
    assert node.subnet6 not in await v6_routes(lab, 1)
