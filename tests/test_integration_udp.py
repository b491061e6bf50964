"""Integration with the udp backend: real overlayd daemons in namespaces, real traffic.

One 3-host lab with Backend.Type udp is shared by the tests of this module, which run in file
order as in tests/test_integration.py (the vxlan version): the ones that only look come first,
then a 4th host joins and leaves, then one host's daemon restarts (SIGTERM, SIGKILL); each test
that disturbs a host restores it and checks full connectivity again.

The daemons serve /metrics (FLANNELD_METRICS=true in their environment), so the packet loop's
counters are read from outside the daemon as overlay_udp_<name>.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from integration.containers import SubnetEnv
from integration.lab import HEALTH_PORT, Lab
from integration.netns import ip_json, run
from tests.labtools import (
    assert_full_connectivity,
    assert_kept_subnet_and_lease,
    eventually,
    icmp_error,
    probe_stream,
    running_lab,
    underlay_capture,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

RESYNC = "1"  # seconds: the daemons' full reconcile pass


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    # The lab's daemons inherit this process's environment: turn /metrics on for all of them,
    # including the ones the tests start later (a joining host, a restart).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLANNELD_METRICS", "true")
        yield from running_lab(tmp_path_factory, "u", "udp", RESYNC)


async def flannel0(lab: Lab, index: int) -> tuple[int, set[str], set[str]]:
    """flannel0 of host `index`: its ifindex, IPv4 addresses and the routes through it."""
    ns = lab.node(index).ns
    link = (await ip_json("link", "show", "flannel0", ns=ns))[0]
    addrs = (await ip_json("-4", "addr", "show", "flannel0", ns=ns))[0]["addr_info"]
    routes = await ip_json("route", "show", "dev", "flannel0", ns=ns)
    return (
        int(link["ifindex"]),
        {f"{a['local']}/{a['prefixlen']}" for a in addrs},
        {r["dst"] for r in routes},
    )


async def scrape(lab: Lab, index: int) -> dict[str, float]:
    """The unlabelled samples of host `index`'s /metrics (over the lab's management link)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(lab.node(index).ip, HEALTH_PORT), 5
    )
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.split()[1] == "200", head
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            samples[name] = float(value)
    return samples


async def probe(lab: Lab, src_ns: str, target: str) -> dict[str, dict[str, Any]]:
    """One TCP and one UDP round trip from `src_ns` to `target`, by protocol."""
    out = await run(
        sys.executable, "-m", "integration.probe", "check", "--timeout", "2", target,
        ns=src_ns, check=False, limit=20,
    )  # fmt: skip
    return {r["proto"]: r for r in json.loads(out)}


# --------------------------------------------------------------------------- looking


async def test_three_hosts_full_connectivity_and_flannel_leases(lab: Lab) -> None:
    assert len({n.subnet for n in lab.state.nodes}) == 3
    network = lab.state.network
    for node in lab.state.nodes:
        env = SubnetEnv.read(lab.subnet_file(node.index))
        assert env.mtu == 1500 - 28 and str(env.subnet.network) == node.subnet
        sub = IPv4Network(node.subnet)
        raw = await lab.etcdctl("get", "--print-value-only", lab.lease_key(sub))
        assert raw.strip() == f'{{"PublicIP":"{node.ip}","PublicIPv6":null}}'  # flannel's udp
        _, addrs, routes = await flannel0(lab, node.index)
        assert addrs == {f"{sub.network_address}/32"} and routes == {network}
    await assert_full_connectivity(lab)


async def test_underlay_carries_flannel_udp(lab: Lab, tmp_path: Path) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.packet import bind_layers
    from scapy.utils import rdpcap

    (src_node, src), (_, dst) = lab.containers()[0], lab.containers()[1]
    pcap = tmp_path / "udp.pcap"
    async with underlay_capture(lab, src_node.index, pcap, "udp", "port", "8285"):
        results = await probe(lab, src.ns, str(dst.ip))
        assert results["tcp"]["ok"] and results["udp"]["ok"]
    bind_layers(UDP, IP, dport=8285)
    pairs = set()
    for pkt in rdpcap(str(pcap)):
        inner = pkt[UDP].payload
        assert isinstance(inner, IP), pkt.summary()
        assert len(bytes(inner)) == pkt[UDP].len - 8  # no header of our own
        pairs.add((inner.src, inner.dst))
        assert IPv4Address(pkt[IP].src) in {IPv4Address(n.ip) for n in lab.state.nodes}
    assert (str(src.ip), str(dst.ip)) in pairs and (str(dst.ip), str(src.ip)) in pairs


async def test_metrics_publish_the_packet_loop_counters(lab: Lab) -> None:
    (src_node, src), (_, dst) = lab.containers()[0], lab.containers()[1]
    before = await scrape(lab, src_node.index)
    assert {"overlay_udp_tx_packets", "overlay_udp_rx_packets", "overlay_udp_dropped_no_route",
            "overlay_udp_dropped_unknown_source"} <= before.keys()  # fmt: skip
    results = await probe(lab, src.ns, str(dst.ip))
    assert results["tcp"]["ok"] and results["udp"]["ok"]

    async def counted() -> bool:  # the loop flushes its counters when it goes idle
        after = await scrape(lab, src_node.index)
        return (
            after["overlay_udp_tx_packets"] >= before["overlay_udp_tx_packets"] + 2
            and after["overlay_udp_rx_packets"] >= before["overlay_udp_rx_packets"] + 2
        )

    await eventually(counted, "the probe's packets counted on the source host's /metrics", 10)
    # A destination inside the network that no lease covers: ICMP net unreachable from
    # flannel0, counted as dropped_no_route.
    covered = [IPv4Network(n.subnet) for n in lab.state.nodes]
    nowhere = next(
        s for s in IPv4Network(lab.state.network).subnets(new_prefix=24)
        if s not in covered and s.network_address != IPv4Network(lab.state.network).network_address
    )  # fmt: skip
    target = str(nowhere.network_address + 2)
    assert await icmp_error(src.ns, target) == ["101", "2", "3", "0", target]

    async def no_route_counted() -> bool:
        after = await scrape(lab, src_node.index)
        return after["overlay_udp_dropped_no_route"] > before["overlay_udp_dropped_no_route"]

    await eventually(no_route_counted, "dropped_no_route counted on /metrics", 10)


# --------------------------------------------------------------------------- joins, leaves


async def test_host_joins_then_leaves(lab: Lab) -> None:
    joined = await lab.add_node()
    gone = [c for c in joined.containers if c.ip]
    assert gone

    async def everyone_reaches_it() -> bool:
        entries = await lab.matrix()
        return len(entries) > 0 and all(e.ok for e in entries)

    try:
        await eventually(everyone_reaches_it, "every host reaches the 4th host and back")
        await assert_full_connectivity(lab)
        assert len(lab.containers()) == 4
        _, _, routes = await flannel0(lab, joined.index)
        assert routes == {lab.state.network}
    finally:
        # The host leaves: daemon stopped (SIGTERM), lease deleted, namespaces gone.
        await lab.remove_node(joined.index)

    async def unreachable_everywhere() -> bool:
        # Its subnet left every peer table: the loop answers with ICMP net unreachable
        # (from flannel0) at once instead of sending into the void.
        target = str(gone[0].ip)
        for _node, cont in lab.containers():
            if await icmp_error(cont.ns, target) != ["101", "2", "3", "0", target]:
                return False
        return True

    await eventually(unreachable_everywhere, "the left host's subnet is unreachable everywhere")
    await assert_full_connectivity(lab)
    for n in lab.state.nodes:  # and the others' routes are the one Network route, as before
        assert (await flannel0(lab, n.index))[2] == {lab.state.network}


# --------------------------------------------------------------------------- restarts


@pytest.mark.parametrize(
    "sig,delete_device",
    [(signal.SIGTERM, False), (signal.SIGKILL, False), (signal.SIGKILL, True)],
    ids=["SIGTERM", "SIGKILL", "SIGKILL-flannel0-deleted"],
)
async def test_restart_keeps_subnet_device_and_traffic(
    lab: Lab,
    sig: signal.Signals,
    delete_device: bool,
    record_property: Callable[[str, object], None],
) -> None:
    """A daemon restart: the same subnet, flannel0 kept and reused, traffic resumes.

    SIGKILL-flannel0-deleted deletes flannel0 by hand while the daemon is down, as the
    backend did before flannel0 was persistent (the device went with the process): the
    restarted daemon creates it anew; its loss figure is the "before" of the comparison."""
    h1 = lab.node(1)
    lease_before = (await lab.leases())[IPv4Network(h1.subnet)]
    device_before = await flannel0(lab, 1)
    log = lab.node_dir(1) / "overlayd.log"
    said = "attaching to the existing flannel0" if not delete_device else "creating flannel0"
    said_before = log.read_text().count(said)
    async with probe_stream(lab, source=2, target=1) as summary:
        await asyncio.sleep(0.5)
        await lab.stop_daemon(1, sig)
        # The daemon is gone: flannel0, its address and its route stay.
        assert await flannel0(lab, 1) == device_before
        if delete_device:
            await run("ip", "link", "del", "flannel0", ns=h1.ns)
        await lab.start_daemon(1)
        await asyncio.sleep(1.0)
    # Probes sent after the restart are answered (a stream started now, not the earlier one).
    async with probe_stream(lab, source=2, target=1) as after:
        await asyncio.sleep(1.0)
    # The loss figure (reported, not asserted: it depends on the machine's load). The udp
    # data path is the daemon's own packet loop: it pauses while the daemon is away.
    name = f"{sig.name}{'-flannel0-deleted' if delete_device else ''}"
    print(f"\nudp restart with {name}: {summary}; after: {after}")
    record_property(f"loss_during_{name}_restart", summary)
    assert summary["received"] > 0 and after["received"] > 0
    # Traffic came back within the first stream: its longest gap ended before the stream did
    # (the gap counts up to the end of the stream when no answer followed it).
    assert summary["longest_gap_ms"] < summary["duration_s"] * 1000 - 500, summary
    await assert_kept_subnet_and_lease(lab, 1, lease_before)
    index, addrs, routes = await flannel0(lab, 1)
    assert (addrs, routes) == device_before[1:]
    if delete_device:
        assert index != device_before[0]
    else:
        assert index == device_before[0]  # the restarted daemon attached to the same device
    assert log.read_text().count(said) == said_before + 1  # and said so in its log
    await assert_full_connectivity(lab)
