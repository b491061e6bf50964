"""Integration: real overlayd daemons in network namespaces, a real etcd, real traffic.

One 3-host vxlan lab (integration.lab) is shared by the tests of this module, which run in
file order: the ones that only look come first, the ones that disturb a host (faults, joins,
leaves, restarts) come later and each restores what it disturbed and checks full connectivity
again, so a broken repair fails its own test instead of hiding behind the next one.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from integration.containers import SubnetEnv
from integration.etcdserver import EtcdServer
from integration.lab import Lab
from integration.netns import ip_json, list_netns, pid_alive, run
from tests.labtools import (
    LabCrash,
    assert_full_connectivity,
    assert_kept_subnet_and_lease,
    crash_on,
    eventually,
    full_passes,
    probe_stream,
    remote_subnets,
    running_lab,
    underlay_capture,
    wait_full_passes,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

RESYNC = "1"  # seconds: the daemons' full reconcile pass, so repairs are quick to observe


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLANNELD_METRICS", "true")  # /metrics: the full pass counter
        yield from running_lab(tmp_path_factory, "i", "vxlan", RESYNC)


async def overlay_routes(lab: Lab, index: int) -> set[str]:
    """The subnets routed over flannel.1 in host `index`."""
    routes = await ip_json("route", "show", "dev", "flannel.1", ns=lab.node(index).ns)
    return {r["dst"] for r in routes}


# --------------------------------------------------------------------------- looking


async def test_three_hosts_full_connectivity(lab: Lab) -> None:
    subnets = [n.subnet for n in lab.state.nodes]
    assert len(set(subnets)) == 3
    leases = await lab.leases()
    assert {str(s) for s in leases} == set(subnets)
    for node in lab.state.nodes:
        assert await overlay_routes(lab, node.index) == remote_subnets(lab, node.index)
        lease = leases[IPv4Network(node.subnet)]
        assert lease.attrs.public_ip == IPv4Address(node.ip)
        assert lease.attrs.backend_type == "vxlan"
        env = SubnetEnv.read(lab.subnet_file(node.index))
        assert env.mtu == 1450 and str(env.subnet.network) == node.subnet and env.ipmasq
        # The container was attached by our flannel CNI plugin, which saved its delegate conf:
        # bridge + host-local on this host's subnet, no masquerading (the daemon does it).
        saved = [
            json.loads(p.read_text())
            for p in (lab.node_dir(node.index) / "cni" / "flannel").iterdir()
            if not p.name.startswith(".")
        ]
        assert len(saved) == 1
        assert saved[0]["type"] == "bridge" and saved[0]["ipMasq"] is False
        assert saved[0]["ipam"]["ranges"] == [[{"subnet": node.subnet}]]
    await assert_full_connectivity(lab)


async def test_underlay_carries_flannel_vxlan(lab: Lab, tmp_path: Path) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.vxlan import VXLAN
    from scapy.utils import rdpcap

    pcap = tmp_path / "underlay.pcap"
    (src_node, src), (_, dst) = lab.containers()[0], lab.containers()[1]
    async with underlay_capture(lab, src_node.index, pcap, "udp"):
        out = await run(sys.executable, "-m", "integration.probe", "check", str(dst.ip), ns=src.ns)
        assert all(r["ok"] for r in json.loads(out))
    inner = []
    for pkt in rdpcap(str(pcap)):
        if UDP in pkt and pkt[UDP].dport == 8472:
            assert VXLAN in pkt, pkt.summary()
            vx = pkt[VXLAN]
            assert vx.vni == 1 and int(vx.flags) == 0x08
            inner.append((vx[IP].src, vx[IP].dst, pkt[IP].src, pkt[IP].dst))
    by_ip = {n.ip: n for n in lab.state.nodes}
    assert (str(src.ip), str(dst.ip)) in {(s, d) for s, d, _, _ in inner}
    assert (str(dst.ip), str(src.ip)) in {(s, d) for s, d, _, _ in inner}
    for s, d, outer_s, outer_d in inner:
        # The outer addresses are the hosts' public IPs whose subnets hold the inner ones.
        assert IPv4Address(s) in IPv4Network(by_ip[outer_s].subnet)
        assert IPv4Address(d) in IPv4Network(by_ip[outer_d].subnet)


# --------------------------------------------------------------------------- faults


async def test_malformed_leases_disturb_nothing(lab: Lab) -> None:
    prefix = f"{lab.state.prefix}/subnets"
    junk = {
        f"{prefix}/10.1.200.0-24": "this is not json",
        f"{prefix}/10.1.201.0-24": '{"PublicIPv6":null,"BackendType":"vxlan"}',
        f"{prefix}/10.1.202.0-24": '{"PublicIP":"198.18.9.9","BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"not-a-mac"}}',
        f"{prefix}/10.1.203.7-24": '{"PublicIP":"198.18.9.9","PublicIPv6":null}',
        f"{prefix}/garbage": '{"PublicIP":"198.18.9.9","PublicIPv6":null}',
    }
    before = {n.index: await overlay_routes(lab, n.index) for n in lab.state.nodes}
    try:
        passes = await full_passes(lab)
        for key, value in junk.items():
            await lab.etcdctl("put", key, value)
        await wait_full_passes(lab, passes, 3)  # several full passes have seen the junk
        status = await lab.status()
        assert all(n["alive"] and n["ready"] for n in status["nodes"])
        for n in lab.state.nodes:
            assert await overlay_routes(lab, n.index) == before[n.index]
        await assert_full_connectivity(lab)
    finally:
        for key in junk:
            await lab.etcdctl("del", key)


async def test_routes_fdb_and_device_deleted_by_hand_are_repaired(lab: Lab) -> None:
    h1 = lab.node(1)
    ns = h1.ns
    remote = sorted(remote_subnets(lab, 1))
    victim = IPv4Network(remote[0])
    gw = str(victim.network_address)

    async def entries() -> tuple[set[str], set[str], set[str]]:
        routes = await overlay_routes(lab, 1)
        neigh = {n["dst"] for n in await ip_json("neigh", "show", "dev", "flannel.1", ns=ns)}
        fdb_out = await run("bridge", "-j", "fdb", "show", "dev", "flannel.1", ns=ns)
        fdb = {f.get("dst", "") for f in json.loads(fdb_out or "[]")}
        return routes, neigh, fdb

    routes, neigh, fdb = await entries()
    assert str(victim) in routes and gw in neigh
    owner = next(n for n in lab.state.nodes if n.subnet == str(victim))
    assert owner.ip in fdb

    await run("ip", "route", "del", str(victim), "dev", "flannel.1", ns=ns)
    await run("ip", "neigh", "del", gw, "dev", "flannel.1", ns=ns)
    fdb_entries = json.loads(await run("bridge", "-j", "fdb", "show", "dev", "flannel.1", ns=ns))
    mac = next(f["mac"] for f in fdb_entries if f.get("dst") == owner.ip)
    await run("bridge", "fdb", "del", mac, "dst", owner.ip, "self", "dev", "flannel.1", ns=ns)
    assert (await entries()) != (routes, neigh, fdb)

    async def repaired() -> bool:
        return await entries() == (routes, neigh, fdb)

    await eventually(repaired, "route, neighbour and FDB entry of h1 put back")

    link_before = (await ip_json("link", "show", "flannel.1", ns=ns))[0]
    await run("ip", "link", "del", "flannel.1", ns=ns)

    async def device_back() -> bool:
        links = await ip_json("link", "show", ns=ns)
        return any(link["ifname"] == "flannel.1" for link in links) and await repaired()

    await eventually(device_back, "flannel.1 of h1 recreated with its routes")
    link_after = (await ip_json("link", "show", "flannel.1", ns=ns))[0]
    assert link_after["address"] == link_before["address"]  # the VTEP MAC in the lease holds
    addrs = await ip_json("addr", "show", "flannel.1", ns=ns)
    assert f"{IPv4Network(h1.subnet).network_address}" in {
        a["local"] for a in addrs[0]["addr_info"]
    }
    await assert_full_connectivity(lab)


async def test_flannel_host_configured_by_hand_gets_full_connectivity(lab: Lab) -> None:
    node = await lab.add_flannel_host()
    try:

        async def everyone_routes_to_it() -> bool:
            for n in lab.state.nodes:
                if n.kind == "overlayd" and node.subnet not in await overlay_routes(lab, n.index):
                    return False
            return True

        await eventually(everyone_routes_to_it, "overlayd hosts route to the flannel host")
        await assert_full_connectivity(lab)
    finally:
        await lab.remove_node(node.index)

    async def routes_gone() -> bool:
        for n in lab.state.nodes:
            if node.subnet in await overlay_routes(lab, n.index):
                return False
        return True

    await eventually(routes_gone, "routes to the removed flannel host disappear")


@pytest.mark.parametrize("leave", ["lease-deleted", "lease-expired"])
async def test_host_joins_then_leaves(lab: Lab, leave: str) -> None:
    joined = await lab.add_node()

    async def everyone_routes_to_it() -> bool:
        for n in lab.state.nodes:
            if n.index != joined.index:
                if joined.subnet not in await overlay_routes(lab, n.index):
                    return False
        return await overlay_routes(lab, joined.index) == remote_subnets(lab, joined.index)

    async def routes_gone() -> bool:
        for n in lab.state.nodes:
            if n.index != joined.index and joined.subnet in await overlay_routes(lab, n.index):
                return False
        return True

    try:
        await eventually(everyone_routes_to_it, "every host routes to the 4th host and back")
        await assert_full_connectivity(lab)
        if leave == "lease-expired":
            # The daemon stops (SIGTERM keeps its lease), then its etcd lease ends: revoking it
            # is what etcd does at expiry (the key is deleted), without waiting 24 h.
            etcd_lease = (await lab.leases())[IPv4Network(joined.subnet)].etcd_lease
            assert etcd_lease != 0
            await lab.stop_daemon(joined.index)
            await lab.etcdctl("lease", "revoke", f"{etcd_lease:x}")
            await eventually(routes_gone, "routes to the 4th host go when its lease expires")
    finally:
        # Daemon stopped (SIGTERM) if still running, lease deleted if still there, netns gone.
        await lab.remove_node(joined.index)
    await eventually(routes_gone, "routes to the 4th host disappear from the others")
    await assert_full_connectivity(lab)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_restart_keeps_subnet_and_traffic(
    lab: Lab, sig: signal.Signals, record_property: Callable[[str, object], None]
) -> None:
    h1 = lab.node(1)
    lease_before = (await lab.leases())[IPv4Network(h1.subnet)]
    routes_before = {n.index: await overlay_routes(lab, n.index) for n in lab.state.nodes}
    async with probe_stream(lab, source=2, target=1) as summary:
        await asyncio.sleep(0.5)
        down = time.monotonic()
        await lab.stop_daemon(1, sig)
        # The daemon is gone: nothing it programmed may have gone with it.
        assert await overlay_routes(lab, 1) == routes_before[1]
        await lab.start_daemon(1)  # returns once /readyz says ready
        downtime_ms = (time.monotonic() - down) * 1000
        await asyncio.sleep(1.0)
    # Probes sent after the restart are answered (a stream started now, not the earlier one).
    async with probe_stream(lab, source=2, target=1) as after:
        await asyncio.sleep(1.0)
    print(f"\nrestart with {sig.name}: {summary}; after: {after}; daemon down for "
          f"{downtime_ms:.0f} ms")  # fmt: skip
    record_property(f"loss_during_{sig.name}_restart", summary)
    assert summary["received"] > 0 and after["received"] > 0
    # The kernel path outlives the daemon: no stretch without answers as long as the time the
    # daemon was away (from the stop to the restarted daemon's readiness). A data path torn
    # down with the daemon would show a gap at least that long.
    assert summary["longest_gap_ms"] < downtime_ms, (summary, downtime_ms)
    # The same subnet; a lease with the same public IP and VTEP MAC.
    await assert_kept_subnet_and_lease(lab, 1, lease_before)
    for n in lab.state.nodes:
        assert await overlay_routes(lab, n.index) == routes_before[n.index]
    await assert_full_connectivity(lab)


# --------------------------------------------------------------------------- external etcd


async def test_lab_on_an_external_etcd_on_loopback(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    """`--etcd-endpoints http://127.0.0.1:N`: daemons reach it through the lab's relay."""
    lab = Lab(f"e{uuid.uuid4().hex[:6]}", state_root=tmp_path / "labs")
    try:
        await lab.up(nodes=2, etcd_endpoints=etcd_server.endpoint, etcd_prefix=etcd_prefix)
        assert lab.state.etcd_pid is None  # no etcd of its own
        assert lab.state.daemon_endpoints.startswith(f"http://{lab.mgmt_ip.ip}:")
        assert len(await lab.leases()) == 2
        await assert_full_connectivity(lab)
    finally:
        await lab.down()
    # `down` removed the lab's keys from the external etcd, which itself keeps running.
    out = await run(
        "etcdctl", f"--endpoints={etcd_server.endpoint}", "get", "--prefix", f"{etcd_prefix}/",
        "--keys-only", env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.strip() == ""


# --------------------------------------------------------------------------- the CLI


def test_cli_up_status_down_with_alloc(tmp_path: Path) -> None:
    """`overlayctl lab up` end to end as a user runs it (alloc: leases only, no data path)."""
    name = f"c{uuid.uuid4().hex[:6]}"
    common = ["--name", name, "--state-root", str(tmp_path / "labs")]
    cli = [sys.executable, "-m", "integration.cli"]
    try:
        up = subprocess.run(
            [*cli, "up", *common, "--nodes", "2", "--backend", "alloc",
             "--containers-per-node", "2"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        assert "waiting for /readyz of 2 overlayd" in up.stderr  # progress while it works
        # alloc has no data path: only containers of the same host are probed, and pass.
        assert "8/8 probes passed" in up.stdout  # 4 containers x 1 peer x TCP, UDP
        assert f"overlayctl lab down --name {name}" in up.stdout
        status = subprocess.run(
            [*cli, "status", *common, "--json"], capture_output=True, text=True, timeout=60,
            check=True,
        )  # fmt: skip
        st = json.loads(status.stdout)
        assert [n["ready"] for n in st["nodes"]] == [True, True]
        assert {lease["backend_type"] for lease in st["leases"]} == {"alloc"}
    finally:
        down = subprocess.run([*cli, "down", *common], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert list_netns(f"ovl-{name}-") == []


async def test_down_after_up_crashed_with_daemons_running(tmp_path: Path) -> None:
    """`up` dies while its daemons start: a fresh `down` still stops them and removes it all."""
    name = f"k{uuid.uuid4().hex[:6]}"
    root = tmp_path / "labs"
    lab = Lab(name, state_root=root, progress=crash_on("waiting for /readyz"))
    try:
        with pytest.raises(LabCrash):
            await lab.up(nodes=2)
        pids = [n.daemon_pid for n in lab.state.nodes]
        assert len(pids) == 2 and all(pid is not None and pid_alive(pid) for pid in pids)
        await Lab(name, state_root=root).down()
        assert not any(pid is not None and pid_alive(pid) for pid in pids)
        assert list_netns(f"ovl-{name}-") == []
        assert not (root / name).exists()
    finally:
        await Lab(name, state_root=root).down()


def test_quick_start_script() -> None:
    """scripts/lab.sh, the README's quick start: a 3-host vxlan lab, full matrix, left running."""
    name = f"q{uuid.uuid4().hex[:6]}"
    repo = Path(__file__).resolve().parent.parent
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LAB_NAME": name}
    try:
        out = subprocess.run(
            [str(repo / "scripts" / "lab.sh")], capture_output=True, text=True, timeout=300,
            env=env, cwd="/",
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert "12/12 probes passed" in out.stdout
        assert f"overlayctl lab status --name {name}" in out.stdout
        assert f"overlayctl lab down --name {name}" in out.stdout
        assert len(list_netns(f"ovl-{name}-h")) == 6  # left running: 3 hosts, 3 containers
    finally:
        asyncio.run(Lab(name).down())
    assert list_netns(f"ovl-{name}-") == []
