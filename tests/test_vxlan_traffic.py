"""Real traffic through two VxlanBackends: hosts on a veth underlay, containers behind them.

    c1 (10.5.1.2) -- h1 [flannel.1] ==veth 192.168.91.0/24== [flannel.1] h2 -- c2 (10.5.2.2)

A TCP and a UDP probe from c1 to c2 must pass, and a capture on h1's underlay veth, decoded with
scapy, must show VXLAN on UDP 8472 with VNI 1, flags 0x08 and the containers' inner addresses.
Everything lives in namespaces this test creates; no traffic leaves them.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from backends.base import ExternalInterface
from backends.vxlan import VxlanBackend
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig
from tests.netns import Netns, NetnsLab, netns_lab
from tests.test_vxlan_kernel import closing_backends

pytestmark = pytest.mark.root

PORT = 7777
PROBE = textwrap.dedent(
    """
    import socket, sys
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "serve":
        t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((host, port)); t.listen()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((host, port))
        print("ready", flush=True)
        data, peer = u.recvfrom(100); u.sendto(b"udp:" + data, peer)
        c, _ = t.accept(); c.sendall(b"tcp:" + c.recv(100)); c.close()
    else:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
        u.sendto(b"hello", (host, port)); print(u.recvfrom(100)[0].decode())
        t = socket.create_connection((host, port), timeout=5); t.sendall(b"hello")
        print(t.recv(100).decode())
    """
)


lab = pytest.fixture(netns_lab, name="lab")
backends = pytest.fixture(closing_backends, name="backends")


def _container(lab: NetnsLab, host: Netns, role: str, n: int) -> Netns:
    """A container namespace on 10.5.<n>.2/24 behind `host` (10.5.<n>.1), default via host."""
    c = lab.netns(role)
    lab.veth(c, host, f"10.5.{n}.2/24", f"10.5.{n}.1/24")
    c.ip("route", "add", "default", "via", f"10.5.{n}.1")
    host.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    return c


async def test_tcp_and_udp_cross_the_overlay_as_vxlan(
    lab: NetnsLab, backends: list[VxlanBackend], tmp_path: Path
) -> None:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.utils import rdpcap

    h1, h2 = lab.netns("h1"), lab.netns("h2")
    u1, u2 = lab.veth(h1, h2, "192.168.91.1/24", "192.168.91.2/24")
    c1 = _container(lab, h1, "c1", 1)
    c2 = _container(lab, h2, "c2", 2)
    cfg = NetworkConfig.from_dict({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}})

    leases: list[Lease] = []
    for ns, veth, n in ((h1, u1, 1), (h2, u2, 2)):
        ip = IPv4Address(f"192.168.91.{n}")
        b = VxlanBackend(
            cfg, ExternalInterface(veth, ns.ifindex(veth), ip, ip, 1500), netns=ns.name
        )
        backends.append(b)
        attrs = await b.prepare()
        lease = Lease(
            IPv4Network(f"10.5.{n}.0/24"),
            LeaseAttrs(ip, None, attrs.backend_type, attrs.backend_data),
        )
        assert await b.start(lease) == 1450
        leases.append(lease)
    await backends[0].reconcile({leases[1].subnet: leases[1]})
    await backends[1].reconcile({leases[0].subnet: leases[0]})

    pcap = tmp_path / "underlay.pcap"
    dump = h1.popen(
        [
            "tcpdump",
            "-i",
            u1,
            "-n",
            "-U",
            "--immediate-mode",
            "-w",
            str(pcap),
            "udp",
            "port",
            "8472",
        ],
        stderr=subprocess.PIPE,
    )
    assert dump.stderr is not None
    assert "listening on" in dump.stderr.readline().decode()

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    server = c2.popen(
        [sys.executable, str(script), "serve", "10.5.2.2", str(PORT)], stdout=subprocess.PIPE
    )
    assert server.stdout is not None
    assert server.stdout.readline().decode().strip() == "ready"
    out = c1.run(sys.executable, str(script), "probe", "10.5.2.2", str(PORT), timeout=20)
    assert out.split() == ["udp:hello", "tcp:hello"]
    assert server.wait(timeout=10) == 0

    # tcpdump writes each packet as it sees it (-U, --immediate-mode): read the file until the
    # four inner flows are there (bounded), then stop it.
    want = {
        ("10.5.1.2", "10.5.2.2", "udp"),
        ("10.5.2.2", "10.5.1.2", "udp"),
        ("10.5.1.2", "10.5.2.2", "tcp"),
        ("10.5.2.2", "10.5.1.2", "tcp"),
    }
    seen: set[tuple[str, str, str]] = set()
    for _ in range(100):
        try:
            packets = [p for p in rdpcap(str(pcap)) if p.haslayer(VXLAN)]
        except Exception:  # a record being written right now; read again
            packets = []
        seen = set()
        for p in packets:
            assert p[IP].src in ("192.168.91.1", "192.168.91.2")
            assert p[UDP].dport == 8472
            vx = p[VXLAN]
            assert vx.vni == 1
            assert int(vx.flags) == 0x08
            inner = vx[Ether]
            assert {inner.src, inner.dst} == {backends[0].mac, backends[1].mac}
            inner_ip = inner[IP]
            proto = "tcp" if inner_ip.haslayer(TCP) else "udp" if inner_ip.haslayer(UDP) else "?"
            seen.add((inner_ip.src, inner_ip.dst, proto))
        if want <= seen:
            break
        await asyncio.sleep(0.05)
    dump.terminate()
    dump.wait(timeout=10)
    assert want <= seen, f"VXLAN flows seen on the underlay: {sorted(seen)}"
