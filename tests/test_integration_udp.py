"""Integration with the udp backend: real overlayd daemons in namespaces, real traffic.

Two hosts with Backend.Type udp: every container reaches every other one, and the underlay
carries flannel's udp format (the UDP payload on port 8285 is the bare inner IPv4 packet).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from integration.containers import SubnetEnv
from integration.lab import Lab
from integration.netns import in_ns, run

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
async def udp_lab(tmp_path: Path) -> AsyncIterator[Lab]:
    lab = Lab(f"u{uuid.uuid4().hex[:6]}", state_root=tmp_path / "labs")
    try:
        await lab.up(nodes=2, backend="udp", containers_per_node=1)
        yield lab
    finally:
        await lab.down()


async def test_udp_backend_connectivity_and_wire_format(udp_lab: Lab, tmp_path: Path) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.packet import bind_layers
    from scapy.utils import rdpcap

    lab = udp_lab
    for node in lab.state.nodes:
        env = SubnetEnv.read(lab.subnet_file(node.index))
        assert env.mtu == 1500 - 28
        sub = IPv4Network(node.subnet)
        key = f"{lab.state.prefix}/subnets/{sub.network_address}-{sub.prefixlen}"
        raw = await lab.etcdctl("get", "--print-value-only", key)
        assert raw.strip() == f'{{"PublicIP":"{node.ip}","PublicIPv6":null}}'  # flannel's udp
    entries = await lab.matrix()
    assert len(entries) == 2 * 1 * 2
    assert [e for e in entries if not e.ok] == []

    (src_node, src), (_, dst) = lab.containers()
    pcap = tmp_path / "udp.pcap"
    dump = await asyncio.create_subprocess_exec(
        *in_ns(lab.underlay_ns, ["tcpdump", "-i", f"h{src_node.index}", "--immediate-mode",
                                 "-U", "-n", "-w", str(pcap), "udp", "port", "8285"]),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert dump.stderr is not None
        assert b"listening on" in await asyncio.wait_for(dump.stderr.readline(), 10)
        out = await run(sys.executable, "-m", "integration.probe", "check", str(dst.ip), ns=src.ns)
        assert all(r["ok"] for r in json.loads(out))
        for _ in range(100):
            if len(rdpcap(str(pcap))) >= 4:
                break
            await asyncio.sleep(0.1)
    finally:
        dump.send_signal(signal.SIGINT)
        await asyncio.wait_for(dump.wait(), 10)
    bind_layers(UDP, IP, dport=8285)
    pairs = set()
    for pkt in rdpcap(str(pcap)):
        inner = pkt[UDP].payload
        assert isinstance(inner, IP), pkt.summary()
        assert len(bytes(inner)) == pkt[UDP].len - 8  # no header of our own
        pairs.add((inner.src, inner.dst))
        assert IPv4Address(pkt[IP].src) in {IPv4Address(n.ip) for n in lab.state.nodes}
    assert (str(src.ip), str(dst.ip)) in pairs and (str(dst.ip), str(src.ip)) in pairs
