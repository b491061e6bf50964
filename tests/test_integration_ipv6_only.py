"""IPv6-only end to end (`EnableIPv4: false`): real overlayd daemons in a `--ipv6-only` lab,
vxlan and host-gw.

One 3-host lab per backend (module fixture, parametrized) whose hosts have no IPv4 address at
all: etcd on the lab's IPv6 underlay, leases in flannel's IPv6-only form (`0.0.0.0-0&<v6>`,
PublicIP 0.0.0.0, no BackendData), subnet.env with the IPv6 pair only, no IPv4 device, route or
rule anywhere, containers attached by our CNI plugin with an IPv6 address only, the IPv6
matrix passing; keys of other forms ignored; a restart keeping the subnet; a route deleted by
hand coming back; a host set up by hand as flannel sets up an IPv6-only host reaching everyone;
an IPv4 network config refused by a daemon on an interface without IPv4.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Iterator
from ipaddress import IPv6Address, IPv6Network, ip_address

import pytest

from integration.containers import SubnetEnv
from integration.lab import Lab, LabError, MatrixEntry
from integration.netns import ip_json, run
from subnetmgr.model import NO_IPV4
from tests.labtools import eventually, lease_kvs, v6_routes

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(f"o{uuid.uuid4().hex[:6]}", state_root=tmp_path_factory.mktemp("labs"))
    try:
        asyncio.run(lab.up(nodes=3, backend=request.param, resync_period="1", ipv6_only=True))
        yield lab
    finally:
        asyncio.run(lab.down())


async def assert_matrix(lab: Lab) -> list[MatrixEntry]:
    entries = await lab.matrix()
    n = len(lab.containers())
    assert len(entries) == n * (n - 1) * 2  # TCP and UDP, IPv6 only
    assert {e.family for e in entries} == {6}
    assert [e for e in entries if not e.ok] == []
    for e in entries:
        assert ip_address(e.dst_ip).version == ip_address(e.src_ip).version == 6
    return entries


def others6(lab: Lab, index: int) -> set[str]:
    return {str(n.subnet6) for n in lab.state.nodes if n.index != index}


async def test_leases_subnet_env_no_ipv4_anywhere_and_matrix(lab: Lab) -> None:
    kvs = await lease_kvs(lab)
    assert len(kvs) == 3
    for key, value in kvs:
        node = next(n for n in lab.state.nodes if n.ip6 == value["PublicIPv6"])
        # flannel's IPv6-only key and value: its zero IPv4 subnet and PublicIP.
        assert key == f"0.0.0.0-0&{node.subnet6}".replace("/", "-")
        assert value["PublicIP"] == "0.0.0.0" and node.subnet is None
        if lab.state.backend == "vxlan":
            assert list(value) == ["PublicIP", "PublicIPv6", "BackendType", "BackendV6Data"]
            assert set(value["BackendV6Data"]) == {"VNI", "VtepMAC"}
        else:
            assert list(value) == ["PublicIP", "PublicIPv6", "BackendType"]
    for node in lab.state.nodes:
        text = lab.subnet_file(node.index).read_text()
        assert "FLANNEL_NETWORK=" not in text and "FLANNEL_SUBNET=" not in text
        env = SubnetEnv.read(lab.subnet_file(node.index))
        assert env.network is None and env.subnet is None
        assert str(env.ipv6_network) == lab.state.network6 and str(env.ipv6_subnet) == node.subnet6
        assert env.mtu == (1430 if lab.state.backend == "vxlan" else 1500)
        # No IPv4 anywhere: no address but loopback's, no route, no flannel.1, no IPv4 rules.
        addrs = await ip_json("-4", "addr", "show", ns=node.ns)
        assert [a["ifname"] for a in addrs if a.get("addr_info")] == ["lo"]
        assert await ip_json("-4", "route", "show", ns=node.ns) == []
        links = {x["ifname"] for x in await ip_json("link", "show", ns=node.ns)}
        assert "flannel.1" not in links
        assert ("flannel-v6.1" in links) == (lab.state.backend == "vxlan")
        nat4 = await run("iptables", "-t", "nat", "-S", ns=node.ns)
        nat6 = await run("ip6tables", "-t", "nat", "-S", ns=node.ns)
        assert "FLANNEL" not in nat4 and "-s fd10:1::/48" in nat6
        assert await v6_routes(lab, node.index) == others6(lab, node.index)
    for node, cont in lab.containers():
        assert cont.ip is None and cont.ip6 is not None
        assert IPv6Address(cont.ip6) in IPv6Network(str(node.subnet6))
    await assert_matrix(lab)


async def test_keys_of_other_forms_are_ignored(lab: Lab) -> None:
    """An IPv4 key, a dual-stack key, and IPv6-only keys that are outside IPv6Network or name
    an unusable PublicIPv6: no daemon routes any of them; everyone stays reachable."""
    mac = "02:00:00:00:66:02"
    v6data = f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac}"}}'
    b = lab.state.backend
    hostile = {
        "10.1.250.0-24": f'{{"PublicIP":"198.18.0.9","PublicIPv6":null,"BackendType":"{b}"}}',
        "10.1.251.0-24&fd10:1:0:f1::-64": (
            f'{{"PublicIP":"198.18.0.9","PublicIPv6":"fd28::99","BackendType":"{b}",{v6data}}}'
        ),
        "0.0.0.0-0&fd99::-64": (
            f'{{"PublicIP":"0.0.0.0","PublicIPv6":"fd28::99","BackendType":"{b}",{v6data}}}'
        ),
        "0.0.0.0-0&fd10:1:0:f3::-64": (
            f'{{"PublicIP":"0.0.0.0","PublicIPv6":"ff02::1","BackendType":"{b}",{v6data}}}'
        ),
    }
    for key, value in hostile.items():
        await lab.etcdctl("put", f"{lab.state.prefix}/subnets/{key}", value)
    try:
        await asyncio.sleep(2.5)  # lease events, then at least one full pass (--resync-period 1)
        for node in lab.state.nodes:
            assert await v6_routes(lab, node.index) == others6(lab, node.index)
            assert await ip_json("-4", "route", "show", ns=node.ns) == []
        await assert_matrix(lab)
    finally:
        for key in hostile:
            await lab.etcdctl("del", f"{lab.state.prefix}/subnets/{key}")


async def test_restart_keeps_the_subnet_and_a_deleted_route_comes_back(lab: Lab) -> None:
    node = lab.state.nodes[1]
    before = node.subnet6
    await lab.stop_daemon(node.index, signal.SIGTERM)
    # subnet.env names it too: remove it so the lease is found in etcd by our PublicIPv6.
    lab.subnet_file(node.index).unlink()
    await lab.start_daemon(node.index)
    env = SubnetEnv.read(lab.subnet_file(node.index))
    assert str(env.ipv6_subnet) == before
    assert {str(v.subnet6) for v in (await lab.leases()).values()} == {
        str(n.subnet6) for n in lab.state.nodes
    }
    # Level-triggered: a route deleted by hand comes back with the next full pass.
    victim = sorted(others6(lab, node.index))[0]
    await run("ip", "-6", "route", "del", victim, ns=node.ns)

    async def back() -> bool:
        return victim in await v6_routes(lab, node.index)

    await eventually(back, f"h{node.index} routes {victim} again")
    await assert_matrix(lab)


async def test_flannel_host_by_hand_reaches_overlay_hosts(lab: Lab) -> None:
    node = await lab.add_flannel_host()
    try:
        assert node.subnet is None and node.subnet6 is not None
        key = lab.lease_key(NO_IPV4, IPv6Network(node.subnet6))  # flannel's IPv6-only form
        value = await lab.etcdctl("get", "--print-value-only", key)
        assert json.loads(value)["PublicIP"] == "0.0.0.0" and "BackendData" not in value

        async def everyone_routes_to_it() -> bool:
            for n in lab.state.nodes:
                if n.kind == "overlayd" and node.subnet6 not in await v6_routes(lab, n.index):
                    return False
            return True

        await eventually(everyone_routes_to_it, "overlayd hosts route to the flannel host")
        if lab.state.backend == "vxlan":
            links = await ip_json("-d", "link", "show", "flannel-v6.1", ns=node.ns)
            assert links[0]["linkinfo"]["info_data"]["local6"] == node.ip6
        entries = await assert_matrix(lab)
        assert {e.dst for e in entries} >= {c.ns for c in node.containers}
    finally:
        await lab.remove_node(node.index)
    assert node.subnet6 not in await v6_routes(lab, 1)


async def test_an_ipv4_network_is_refused_on_an_interface_without_ipv4(lab: Lab) -> None:
    """The hosts' eth0 has no IPv4 address: a daemon started under an IPv4 network config exits
    saying so, instead of publishing PublicIP 0.0.0.0."""
    key = f"{lab.state.prefix}/config"
    saved = await lab.etcdctl("get", "--print-value-only", key)
    ipv4 = {"Network": "10.1.0.0/16", "Backend": {"Type": lab.state.backend}}
    await lab.etcdctl("put", key, json.dumps(ipv4))
    before = {n.index for n in lab.state.nodes}
    try:
        with pytest.raises(LabError, match="has no IPv4 address, but the network config is IPv4"):
            await lab.add_node(ready_timeout=20)
    finally:
        await lab.etcdctl("put", key, saved.strip())
        for n in [n for n in lab.state.nodes if n.index not in before]:
            await lab.remove_node(n.index, delete_lease=False)
    assert len(await lab.leases()) == 3
