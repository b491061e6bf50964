"""The container provider with IPv6: `lab up --provider containers --ipv6` (dual stack) and
`--ipv6-only` (EnableIPv4 false), vxlan.

One 3-host container lab per mode (module fixture, parametrized): hosts are Docker containers
with systemd and overlayd.service on an internal Docker network with the lab's ULA /64, etcd
in its own container. Checked for real: the Docker network's two pools, the hosts' IPv6
addresses (and, IPv6-only, no IPv4 at all in the hosts and in etcd's container, although
Docker gives every endpoint one), etcd on the IPv6 underlay, the daemons' env file, the lease
forms flannel writes (dual-stack key, or `0.0.0.0-0&<v6>` with PublicIP 0.0.0.0), subnet.env,
`status`, the full matrix per family, and a restart that finds its lease again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path

import pytest

from integration.docker_lab import ContainerLab, ensure_engine, ensure_image
from integration.lab import NodeState, open_lab
from integration.netns import ip_json, run
from overlay.subnetenv import SubnetEnv
from tests.labtools import lease_kvs

MODES = ("dual", "only")


@pytest.fixture(scope="module")
def image(docker_engine: None) -> str:
    return ensure_image(ensure_engine())


@pytest.fixture(scope="module", params=MODES)
def lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, image: str
) -> Iterator[ContainerLab]:
    only = request.param == "only"
    lab = open_lab(f"{'o' if only else 'd'}{uuid.uuid4().hex[:6]}",
                   state_root=tmp_path_factory.mktemp("labs"), provider="containers")  # fmt: skip
    assert isinstance(lab, ContainerLab)
    try:
        asyncio.run(lab.up(nodes=3, backend="vxlan", resync_period="1", ipv6=not only,
                           ipv6_only=only))  # fmt: skip
        yield lab
    finally:
        asyncio.run(lab.down())


def test_daemon_settings_healthz_on_ipv6_only(tmp_path: Path) -> None:
    """/etc/default/overlayd of an IPv6-only lab: health on `::` (there is no IPv4 to bind)."""
    lab = ContainerLab("hz", state_root=tmp_path)
    lab.state.daemon_endpoints = "http://[fd00::fd]:2379"
    assert "FLANNELD_HEALTHZ_IP=0.0.0.0" in lab.daemon_settings({})
    lab.state.ipv6 = True
    assert "FLANNELD_HEALTHZ_IP=0.0.0.0" in lab.daemon_settings({})
    lab.state.ipv6_only = True
    lines = lab.daemon_settings({})
    assert "FLANNELD_HEALTHZ_IP=::" in lines
    assert "FLANNELD_ETCD_ENDPOINTS=http://[fd00::fd]:2379" in lines


async def _ipv4_of(prefix: list[str]) -> tuple[list[str], str]:
    """(interfaces with an IPv4 address, IPv4 routes of any table but loopback's) in a
    network namespace."""
    addrs = await run(*prefix, "ip", "-4", "-o", "addr", "show")
    routes = await run(*prefix, "ip", "-4", "route", "show", "table", "all")
    other = [r for r in routes.splitlines() if " dev lo " not in f"{r} "]
    return sorted({line.split()[1] for line in addrs.splitlines()}), "\n".join(other)


def _etcd_pid(lab: ContainerLab) -> int:
    attrs = lab.client.api.inspect_container(lab.etcd_container)
    return int(attrs["State"]["Pid"])


@pytest.mark.root
@pytest.mark.slow
async def test_network_hosts_and_etcd_addresses(lab: ContainerLab) -> None:
    only = lab.state.ipv6_only
    net = lab.client.api.inspect_network(lab.docker_network)
    assert net["EnableIPv6"] is True and net["Internal"] is True
    pools = {c["Subnet"]: c["Gateway"] for c in net["IPAM"]["Config"]}
    net6 = IPv6Network(lab.state.underlay6)
    assert pools == {
        lab.state.underlay: str(IPv4Network(lab.state.underlay).broadcast_address - 1),
        str(net6): str(net6.network_address + 0xFE),
    }
    etcd6 = net6.network_address + 0xFD
    if only:
        assert lab.state.etcd_endpoint == f"http://[{etcd6}]:2379"
        assert lab.state.daemon_endpoints == lab.state.etcd_endpoint
        # Docker gave etcd's container an IPv4 address too; the lab took it away.
        assert await _ipv4_of(["nsenter", f"--target={_etcd_pid(lab)}", "--net", "--"]) == (
            ["lo"],
            "",
        )
    else:
        assert (
            lab.state.etcd_endpoint
            == f"http://{IPv4Network(lab.state.underlay).broadcast_address - 2}:2379"
        )
    for node in lab.state.nodes:
        assert node.ip6 == str(net6.network_address + node.index)
        eth0 = (await ip_json("addr", "show", "dev", "eth0", ns=node.ns))[0]["addr_info"]
        assert {a["local"] for a in eth0 if a["family"] == "inet6" and a["scope"] == "global"} == {
            node.ip6
        }
        assert not [a for a in eth0 if a.get("tentative")]  # DAD done before overlayd started
        inet = [a["local"] for a in eth0 if a["family"] == "inet"]
        if only:
            assert node.ip == "" and inet == []
            assert await _ipv4_of(["ip", "netns", "exec", node.ns]) == (["lo"], "")
        else:
            assert inet == [node.ip]
        sysctl = await run(
            "sysctl", "-n", "net.ipv6.conf.all.forwarding", "net.ipv6.conf.default.disable_ipv6",
            "net.ipv6.conf.cni0.disable_ipv6", ns=node.ns,
        )  # fmt: skip
        assert sysctl.split() == ["1", "0", "0"]


@pytest.mark.root
@pytest.mark.slow
async def test_leases_subnet_env_and_unit_settings(lab: ContainerLab) -> None:
    only = lab.state.ipv6_only
    kvs = await lease_kvs(lab)
    assert len(kvs) == 3
    for key, value in kvs:
        node = next(n for n in lab.state.nodes if n.ip6 == value["PublicIPv6"])
        v6 = str(node.subnet6).replace("/", "-")
        if only:  # flannel's IPv6-only key and value
            assert node.subnet is None
            assert key == f"0.0.0.0-0&{v6}"
            assert value["PublicIP"] == "0.0.0.0"
            assert list(value) == ["PublicIP", "PublicIPv6", "BackendType", "BackendV6Data"]
        else:  # flannel's dual-stack key and value
            assert key == f"{str(node.subnet).replace('/', '-')}&{v6}"
            assert value["PublicIP"] == node.ip
            assert set(value) == {
                "PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data"
            }  # fmt: skip
            assert set(value["BackendData"]) == {"VNI", "VtepMAC"}
        assert set(value["BackendV6Data"]) == {"VNI", "VtepMAC"}
    for node in lab.state.nodes:
        text = lab.subnet_file(node.index).read_text()
        env = SubnetEnv.read(lab.subnet_file(node.index))
        assert str(env.ipv6_network) == lab.state.network6
        assert str(env.ipv6_subnet) == node.subnet6
        if only:
            assert "FLANNEL_NETWORK=" not in text and "FLANNEL_SUBNET=" not in text
            assert env.mtu == 1430  # 1500 - 70, the IPv6 VXLAN overhead
        else:
            assert str(env.network) == lab.state.network and str(env.subnet) == node.subnet
            assert env.mtu == 1430  # one MTU for both families: the IPv6 one
        settings = await lab.exec(node, "cat", "/etc/default/overlayd")
        healthz = "::" if only else "0.0.0.0"
        assert f"\nFLANNELD_HEALTHZ_IP={healthz}\n" in settings
        assert f"\nFLANNELD_ETCD_ENDPOINTS={lab.state.daemon_endpoints}\n" in settings
        assert await lab.daemon_state(node.index) == "active"
        links = {x["ifname"] for x in await ip_json("link", "show", ns=node.ns)}
        assert "flannel-v6.1" in links and ("flannel.1" in links) == (not only)
    for node, cont in lab.containers():
        assert cont.ip6 is not None and IPv6Address(cont.ip6) in IPv6Network(str(node.subnet6))
        assert (cont.ip is None) == only


@pytest.mark.root
@pytest.mark.slow
async def test_status_reaches_daemons_and_etcd(lab: ContainerLab) -> None:
    """`lab status` reads /readyz and etcd's /health where they are: over IPv6 when there is
    no IPv4."""
    st = await lab.status()
    assert st["ipv6_only"] == lab.state.ipv6_only and st["underlay6"] == lab.state.underlay6
    assert st["etcd_alive"] is True and st["etcd_error"] is None
    assert [(n["systemd"], n["ready"]) for n in st["nodes"]] == [("active", True)] * 3
    assert len(st["leases"]) == 3


async def _assert_matrix(lab: ContainerLab) -> None:
    entries = await lab.matrix()
    n = len(lab.containers())
    families = {6} if lab.state.ipv6_only else {4, 6}
    assert n == 3
    assert len(entries) == n * (n - 1) * 2 * len(families)  # TCP and UDP per family
    assert {e.family for e in entries} == families
    assert [e for e in entries if not e.ok] == []
    for e in entries:
        assert ip_address(e.dst_ip).version == ip_address(e.src_ip).version == e.family


@pytest.mark.root
@pytest.mark.slow
async def test_full_matrix(lab: ContainerLab) -> None:
    await _assert_matrix(lab)


@pytest.mark.root
@pytest.mark.slow
async def test_restart_without_subnet_env_finds_its_lease(lab: ContainerLab) -> None:
    """overlayd.service stopped, subnet.env removed, started again: the daemon finds its lease
    in etcd by its public address(es) and keeps the subnet; traffic flows again."""
    node: NodeState = lab.state.nodes[1]
    before = (node.subnet, node.subnet6)
    await lab.stop_daemon(node.index)
    lab.subnet_file(node.index).unlink()
    await lab.start_daemon(node.index)
    env = SubnetEnv.read(lab.subnet_file(node.index))
    after = (str(env.subnet) if env.subnet else None, str(env.ipv6_subnet))
    assert after == before
    assert len(await lab.leases()) == 3
    await _assert_matrix(lab)
