"""The udp backend on real kernel devices: two hosts, two containers, real traffic.

Layout (all namespaces made here, unique names, deleted at the end):

    cA (10.201.1.2) --veth-- hA ==== veth underlay 192.168.201.0/24 ==== hB --veth-- cB (10.201.2.2)
                          flannel0 10.201.1.0/32                   flannel0 10.201.2.0/32

hA and hB each run `backends.udp_driver` (a UdpBackend in that namespace) with the other host as
its peer. Network 10.201.0.0/16, subnets 10.201.1.0/24 and 10.201.2.0/24.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import bind_layers, raw
from scapy.utils import rdpcap

from tests.labtools import ICMP_PROBE

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
NETWORK = "10.201.0.0/16"
UNDERLAY = "192.168.201"
A_SUB, B_SUB = "10.201.1.0/24", "10.201.2.0/24"
CA, CB = "10.201.1.2", "10.201.2.2"
HA_IP, HB_IP = f"{UNDERLAY}.1", f"{UNDERLAY}.2"
STRANGER_IP = f"{UNDERLAY}.9"


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode:
        raise AssertionError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res


def in_ns(ns: str, code: str, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    """Run a small Python program inside a namespace (probes, crafted datagrams)."""
    return sh("ip", "netns", "exec", ns, PY, "-c", code, *args, check=False, timeout=timeout)


class Driver:
    """A UdpBackend running in a namespace, driven over its stdin/stdout (backends.udp_driver)."""

    def __init__(self, ns: str, iface: str, subnet: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-m", "backends.udp_driver", "--iface", iface,
             "--network", NETWORK, "--subnet", subnet],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            self.ready = self._read()
        except BaseException:  # it never said ready: nobody else holds it to close it
            self.proc.kill()
            self.close()
            raise

    def _read(self, timeout: float = 20) -> dict[str, object]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError("udp_driver did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"udp_driver exited with {self.proc.wait()}")
        doc: dict[str, object] = json.loads(line)
        return doc

    def command(self, cmd: dict[str, object]) -> dict[str, object]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def peers(self, *peers: tuple[str, str, str]) -> None:
        assert self.command({"peers": [list(p) for p in peers]}) == {"ok": True}

    def counters(self) -> dict[str, int]:
        reply = self.command({"counters": True})
        assert reply["running"] is True
        counters = reply["counters"]
        assert isinstance(counters, dict)
        return counters

    def pids(self) -> list[int]:
        pids = self.command({"counters": True})["pids"]
        assert isinstance(pids, list)
        return pids

    def wait_counter(self, name: str, at_least: int) -> int:
        """Counters are flushed when a worker goes idle: poll until one reaches `at_least`."""
        value = 0
        for _ in range(100):
            value = self.counters()[name]
            if value >= at_least:
                return value
            time.sleep(0.05)
        raise AssertionError(f"counter {name} stayed at {value}, expected >= {at_least}")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Lab:
    ha: str
    hb: str
    ca: str
    cb: str
    ua: str  # underlay interface in hA
    ub: str
    drivers: dict[str, Driver] = field(default_factory=dict)

    @property
    def a(self) -> Driver:
        return self.drivers["a"]

    @property
    def b(self) -> Driver:
        return self.drivers["b"]

    def default_peers(self) -> None:
        self.a.peers((B_SUB, HB_IP, ""))
        self.b.peers((A_SUB, HA_IP, "udp"))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    tag = uuid.uuid4().hex[:6]
    lab = Lab(f"uhA{tag}", f"uhB{tag}", f"ucA{tag}", f"ucB{tag}", f"uu{tag}a", f"uu{tag}b")
    made: list[str] = []
    try:
        for ns in (lab.ha, lab.hb, lab.ca, lab.cb):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", lab.ua, "netns", lab.ha, "type", "veth",
           "peer", "name", lab.ub, "netns", lab.hb)  # fmt: skip
        sh("ip", "-n", lab.ha, "addr", "add", f"{HA_IP}/24", "dev", lab.ua)
        sh("ip", "-n", lab.hb, "addr", "add", f"{HB_IP}/24", "dev", lab.ub)
        for host, cont, sub, cip in ((lab.ha, lab.ca, "1", CA), (lab.hb, lab.cb, "2", CB)):
            underlay = lab.ua if host == lab.ha else lab.ub
            sh("ip", "-n", host, "link", "set", underlay, "up")
            sh("ip", "-n", host, "link", "add", "cveth", "type", "veth",
               "peer", "name", "eth0", "netns", cont)  # fmt: skip
            sh("ip", "-n", host, "addr", "add", f"10.201.{sub}.1/24", "dev", "cveth")
            sh("ip", "-n", host, "link", "set", "cveth", "up")
            sh("ip", "-n", cont, "addr", "add", f"{cip}/24", "dev", "eth0")
            sh("ip", "-n", cont, "link", "set", "eth0", "up")
            sh("ip", "-n", cont, "route", "add", "default", "via", f"10.201.{sub}.1")
            sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        lab.drivers["a"] = Driver(lab.ha, lab.ua, A_SUB)
        lab.drivers["b"] = Driver(lab.hb, lab.ub, B_SUB)
        lab.default_peers()
        yield lab
    finally:
        for driver in lab.drivers.values():
            driver.close()
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)


TCP_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); s.settimeout(10)
print("listening", flush=True)
c, peer = s.accept(); c.settimeout(10)
data = b""
while not data.endswith(b"\\n"):
    chunk = c.recv(65536)
    if not chunk: break
    data += chunk
c.sendall(peer[0].encode() + b" " + str(len(data)).encode() + b"\\n"); c.close()
"""

TCP_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
c.sendall(b"x" * int(sys.argv[3]) + b"\\n")
print(c.makefile().readline().strip())
"""

UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[3]))
print("listening", flush=True)
try:
    while True:
        data, peer = s.recvfrom(65536)
        print("got", peer[0], data.decode(errors="replace"), flush=True)
        s.sendto(b"echo:" + data, peer)
except socket.timeout:
    pass
"""

UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(sys.argv[3].encode())
try:
    print(s.recv(100).decode())
except OSError as e:
    print("error", e.errno)
"""

SEND_DATAGRAMS = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
for payload in sys.argv[3:]:
    s.sendto(bytes.fromhex(payload), (sys.argv[2], 8285))
"""


def start(ns: str, code: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, PY, "-c", code, *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening"
    return proc


def finish(proc: subprocess.Popen[str]) -> str:
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def tcp_probe(src_ns: str, dst_ns: str, dst: str, port: int, size: int = 100) -> str:
    """Send `size` bytes over TCP; return what the server saw ('<client ip> <bytes>') or ''."""
    server = start(dst_ns, TCP_SERVER, dst, str(port))
    try:
        res = in_ns(src_ns, TCP_CLIENT, dst, str(port), str(size))
        return res.stdout.strip() if res.returncode == 0 else ""
    finally:
        server.kill()
        finish(server)


def udp_listen(ns: str, addr: str, port: int, seconds: float) -> subprocess.Popen[str]:
    return start(ns, UDP_ECHO, addr, str(port), str(seconds))


def send_datagrams(lab: Lab, source: str, *payloads: bytes) -> None:
    """Send raw UDP payloads to hB:8285 from `source` (an address on hA's underlay)."""
    res = in_ns(lab.ha, SEND_DATAGRAMS, source, HB_IP, *(p.hex() for p in payloads))
    assert res.returncode == 0, res.stderr


def inner(ttl: int = 64, port: int = 7001, text: bytes = b"crafted") -> bytes:
    """A packet from container A to container B, as hA's loop would put it on the wire."""
    return raw(IP(src=CA, dst=CB, ttl=ttl) / UDP(sport=7000, dport=port) / text)


# --------------------------------------------------------------------------- tests


def test_publishes_what_flannel_publishes(lab: Lab) -> None:
    assert lab.a.ready == {"ready": True, "mtu": 1500 - 28, "backend_type": ""}
    link = json.loads(sh("ip", "-n", lab.ha, "-j", "-d", "link", "show", "flannel0").stdout)[0]
    assert link["mtu"] == 1472
    assert link["linkinfo"]["info_kind"] == "tun"
    assert link["linkinfo"]["info_data"]["type"] == "tun"
    assert link["linkinfo"]["info_data"]["pi"] is False
    addrs = json.loads(sh("ip", "-n", lab.ha, "-j", "addr", "show", "flannel0").stdout)[0]
    assert [(a["local"], a["prefixlen"]) for a in addrs["addr_info"] if a["family"] == "inet"] == [
        ("10.201.1.0", 32)
    ]
    routes = json.loads(sh("ip", "-n", lab.ha, "-j", "route", "show", "dev", "flannel0").stdout)
    assert [r["dst"] for r in routes] == [NETWORK]
    sockets = sh("ip", "netns", "exec", lab.ha, "ss", "-uln").stdout
    assert f"{HA_IP}:8285" in sockets


def test_tcp_both_ways(lab: Lab) -> None:
    assert tcp_probe(lab.ca, lab.cb, CB, 5001, size=200_000) == f"{CA} 200001"
    assert tcp_probe(lab.cb, lab.ca, CA, 5002, size=200_000) == f"{CB} 200001"


def test_udp_both_ways(lab: Lab) -> None:
    for src, dst_ns, dst, port in ((lab.ca, lab.cb, CB, 6001), (lab.cb, lab.ca, CA, 6002)):
        server = udp_listen(dst_ns, dst, port, 5)
        try:
            res = in_ns(src, UDP_CLIENT, dst, str(port), "ping")
            assert res.stdout.strip() == "echo:ping"
        finally:
            server.kill()
            finish(server)


UDP_SINK = """
import socket, sys, hashlib
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((sys.argv[1], int(sys.argv[2]))); s.settimeout(2)
print("listening", flush=True)
got = []
try:
    while len(got) < int(sys.argv[3]):
        got.append(s.recv(65536))
except socket.timeout:
    pass
digest = hashlib.sha256(b"".join(sorted(got))).hexdigest()
print(len(got), sorted(set(len(g) for g in got)), digest)
"""

UDP_BURST = """
import socket, sys, hashlib
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
sent = [i.to_bytes(4, "big") * 250 for i in range(int(sys.argv[3]))] + [b"tail"]
for d in sent:
    s.sendto(d, (sys.argv[1], int(sys.argv[2])))
digest = hashlib.sha256(b"".join(sorted(sent))).hexdigest()
print(len(sent), sorted(set(len(d) for d in sent)), digest)
"""


def test_udp_burst_arrives_whole(lab: Lab) -> None:
    # Back-to-back datagrams of one size leave in UDP_SEGMENT batches and may be written into
    # hB's TUN device as one UDP GSO packet: the container must still get each datagram intact.
    sink = start(lab.cb, UDP_SINK, CB, "7100", "301")
    try:
        sent = in_ns(lab.ca, UDP_BURST, CB, "7100", "300")
    finally:
        got = finish(sink)
    assert sent.returncode == 0, sent.stderr
    assert got.strip() == sent.stdout.strip()


def test_capture_shows_raw_ipv4_in_udp_8285(lab: Lab) -> None:
    # With UDP_SEGMENT a veth carries one GSO datagram per sendmsg and tcpdump sees it before it
    # is cut. With the feature off on the veth the kernel cuts it in software first, so the
    # capture shows exactly what a NIC would put on the wire.
    ethtool = ("ip", "netns", "exec", lab.ha, "ethtool", "-K", lab.ua, "tx-udp-segmentation")
    sh(*ethtool, "off")
    with tempfile.TemporaryDirectory() as tmp:
        pcap = os.path.join(tmp, "underlay.pcap")
        dump = subprocess.Popen(
            ["ip", "netns", "exec", lab.ha, "tcpdump", "--immediate-mode", "-Z", "root",
             "-i", lab.ua, "-n", "-w", pcap, "udp port 8285"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert dump.stderr is not None
            assert "listening" in dump.stderr.readline()
            assert tcp_probe(lab.ca, lab.cb, CB, 5003, size=50_000) == f"{CA} 50001"
            time.sleep(0.3)
        finally:
            dump.terminate()
            dump.wait(timeout=10)
            sh(*ethtool, "on")
        bind_layers(UDP, IP, dport=8285)
        packets = rdpcap(pcap)
    outer = [p[IP] for p in packets if UDP in p and p[UDP].dport == 8285]
    to_b = [p for p in outer if p.src == HA_IP and p.dst == HB_IP]
    assert to_b, "no datagrams from hA to hB captured"
    for p in to_b:
        payload = bytes(p[UDP].payload)
        pkt = IP(payload)
        # the whole payload is one IPv4 packet: no header of our own
        assert pkt.version == 4 and pkt.len == len(payload)
        assert (pkt.src, pkt.dst) == (CA, CB)
        # 64 from the container, -1 forwarding in hA, -1 in our loop
        assert pkt.ttl == 62
        assert len(payload) <= 1472
        # checksums on the wire are right (flannel peers write these into a TUN as they are)
        ip_sum, tcp_sum = pkt.chksum, pkt[TCP].chksum
        pkt.chksum = None
        pkt[TCP].chksum = None
        again = IP(raw(pkt))
        assert (again.chksum, again[TCP].chksum) == (ip_sum, tcp_sum)
    assert any(len(bytes(p[UDP].payload)) == 1472 for p in to_b), "expected full-size packets"


def test_unknown_source_is_dropped_and_counted(lab: Lab) -> None:
    sh("ip", "-n", lab.ha, "addr", "add", f"{STRANGER_IP}/24", "dev", lab.ua)
    server = udp_listen(lab.cb, CB, 7001, 2)
    try:
        before = lab.b.counters()["dropped_unknown_source"]
        send_datagrams(lab, STRANGER_IP, inner(text=b"from-stranger"))
        lab.b.wait_counter("dropped_unknown_source", before + 1)
        # the same datagram from a known lease's PublicIP is delivered (the control)
        send_datagrams(lab, HA_IP, inner(text=b"from-peer"))
    finally:
        out = finish(server)
        sh("ip", "-n", lab.ha, "addr", "del", f"{STRANGER_IP}/24", "dev", lab.ua, check=False)
    assert "from-peer" in out
    assert "from-stranger" not in out


def test_ttl_one_is_dropped_both_ways(lab: Lab) -> None:
    server = udp_listen(lab.cb, CB, 7001, 2)
    try:
        rx_before = lab.b.counters()["dropped_ttl"]
        send_datagrams(lab, HA_IP, inner(ttl=1, text=b"ttl1"), inner(ttl=3, text=b"ttl3"))
        lab.b.wait_counter("dropped_ttl", rx_before + 1)
        # hA itself sends with TTL 1 straight into flannel0: its loop must drop it
        tx_before = lab.a.counters()["dropped_ttl"]
        code = (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1); "
            f"s.sendto(b'ttl-local', ('{CB}', 7001))"
        )
        assert in_ns(lab.ha, code).returncode == 0
        lab.a.wait_counter("dropped_ttl", tx_before + 1)
    finally:
        out = finish(server)
    assert "ttl3" in out  # -1 in hB's loop, -1 forwarding to cB: arrives with TTL 1
    assert "ttl1" not in out
    assert "ttl-local" not in out


def test_no_lease_gets_icmp_net_unreachable(lab: Lab) -> None:
    before = lab.a.counters()["dropped_no_route"]
    res = in_ns(lab.ca, ICMP_PROBE, "10.201.77.5", "9")
    # ENETUNREACH from an ICMP (origin 2) of type 3 code 0, sent as if by the destination
    assert res.stdout.split() == ["101", "2", "3", "0", "10.201.77.5"], res.stderr
    lab.a.wait_counter("dropped_no_route", before + 1)


def test_malformed_datagrams_are_dropped_and_the_loop_keeps_going(lab: Lab) -> None:
    pids = lab.b.pids()
    before = lab.b.counters()["dropped_malformed"]
    good = inner()
    oversized = raw(IP(src=CA, dst=CB) / UDP(sport=7000, dport=7001) / bytes(3000))
    bad = [
        b"",  # empty
        good[:12],  # shorter than a header
        good[:-3],  # shorter than its total length
        b"\x65" + good[1:],  # version 6
        b"\x43" + good[1:],  # header length 12 bytes
        oversized,  # larger than flannel0's MTU
    ]
    send_datagrams(lab, HA_IP, *bad)
    lab.b.wait_counter("dropped_malformed", before + len(bad))
    assert lab.b.pids() == pids
    assert tcp_probe(lab.ca, lab.cb, CB, 5004, size=100_000) == f"{CA} 100001"


def test_peer_table_updates_apply_without_restarting_the_loop(lab: Lab) -> None:
    pids_a, pids_b = lab.a.pids(), lab.b.pids()
    try:
        # A forgets B: A's loop answers net unreachable, nothing reaches B
        lab.a.peers()
        assert tcp_probe(lab.ca, lab.cb, CB, 5005) == ""
        # a lease of another backend type is not ours to use
        lab.a.peers((B_SUB, HB_IP, "vxlan"))
        assert tcp_probe(lab.ca, lab.cb, CB, 5006) == ""
        # B back, typed as flannel writes it: traffic flows again
        lab.a.peers((B_SUB, HB_IP, ""))
        assert tcp_probe(lab.ca, lab.cb, CB, 5007) == f"{CA} 101"
        # B forgets A: A's datagrams are now from an unknown source at B
        unknown = lab.b.counters()["dropped_unknown_source"]
        lab.b.peers()
        assert tcp_probe(lab.ca, lab.cb, CB, 5008) == ""
        lab.b.wait_counter("dropped_unknown_source", unknown + 1)
        # and a peer whose subnet is a different size still routes by longest prefix
        lab.b.peers(("10.201.0.0/23", HA_IP, "udp"))
        assert tcp_probe(lab.ca, lab.cb, CB, 5009) == f"{CA} 101"
    finally:
        lab.default_peers()
    assert tcp_probe(lab.ca, lab.cb, CB, 5010) == f"{CA} 101"
    assert (lab.a.pids(), lab.b.pids()) == (pids_a, pids_b)


def test_interoperates_with_a_flannel_style_peer(lab: Lab) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _with_flannel_style_peer(lab, os.path.join(tmp, "udp_baseline"))


def _with_flannel_style_peer(lab: Lab, binary: str) -> None:
    # bench/udp_baseline.c moves one packet per system call like flannel's C proxy: it receives
    # plain datagrams (no UDP_GRO) and writes each inner packet as it is into its TUN device, so
    # hB's kernel checks every checksum we put on the wire. Flannel itself (Go) cannot be built
    # here; this C peer stands in for its data path.
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build the flannel-style peer"
    sh(gcc, "-O2", "-o", binary, str(ROOT / "bench" / "udp_baseline.c"))
    lab.b.close()
    # Our flannel0 is persistent and outlives the driver; the C peer makes its own device.
    sh("ip", "-n", lab.hb, "link", "del", "flannel0")
    peer = subprocess.Popen(
        ["ip", "netns", "exec", lab.hb, binary, "flannel0", HB_IP, "8285", "10.201.1.0", "24",
         HA_IP],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert peer.stdout is not None
        assert peer.stdout.readline().strip() == "ready"
        sh("ip", "-n", lab.hb, "link", "set", "flannel0", "mtu", "1472", "up")
        sh("ip", "-n", lab.hb, "addr", "add", "10.201.2.0/32", "dev", "flannel0")
        sh("ip", "-n", lab.hb, "route", "add", NETWORK, "dev", "flannel0")
        assert tcp_probe(lab.ca, lab.cb, CB, 5012, size=500_000) == f"{CA} 500001"
        assert tcp_probe(lab.cb, lab.ca, CA, 5013, size=500_000) == f"{CB} 500001"
        sink = start(lab.cb, UDP_SINK, CB, "7101", "101")
        try:
            sent = in_ns(lab.ca, UDP_BURST, CB, "7101", "100")
        finally:
            got = finish(sink)
        assert got.strip() == sent.stdout.strip()
    finally:
        peer.kill()
        peer.wait()
        if peer.stdout is not None:
            peer.stdout.close()
        lab.drivers["b"] = Driver(lab.hb, lab.ub, B_SUB)
        lab.b.peers((A_SUB, HA_IP, "udp"))
    assert tcp_probe(lab.ca, lab.cb, CB, 5014) == f"{CA} 101"


def test_a_dead_worker_is_restarted_by_the_next_reconcile(lab: Lab) -> None:
    tx, rx = lab.b.pids()
    os.kill(rx, signal.SIGKILL)  # a worker this test's driver started, by its pid
    for _ in range(100):
        if not lab.b.command({"counters": True})["running"]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the driver did not notice its rx worker died")
    lab.default_peers()  # reconcile: revives the rx worker and hands it the table
    new_tx, new_rx = lab.b.pids()
    assert new_tx == tx and new_rx != rx
    assert tcp_probe(lab.ca, lab.cb, CB, 5011, size=100_000) == f"{CA} 100001"


def flannel0(ns: str) -> tuple[dict[str, Any], set[str], set[str]]:
    """flannel0's link (with -d details), its IPv4 addresses and the routes through it."""
    link = json.loads(sh("ip", "-n", ns, "-j", "-d", "link", "show", "flannel0").stdout)[0]
    addrs = json.loads(sh("ip", "-n", ns, "-j", "-4", "addr", "show", "flannel0").stdout)[0]
    routes = json.loads(sh("ip", "-n", ns, "-j", "route", "show", "dev", "flannel0").stdout)
    return (
        link,
        {f"{a['local']}/{a['prefixlen']}" for a in addrs["addr_info"]},
        {r["dst"] for r in routes},
    )


def test_flannel0_outlives_the_backend_and_is_reused(lab: Lab) -> None:
    link, addrs, routes = flannel0(lab.hb)
    assert link["linkinfo"]["info_data"]["persist"] is True
    lab.b.close()  # the backend stops: workers gone, descriptors closed
    # The device, its address and the route stay: nothing falls back to another route.
    after_link, after_addrs, after_routes = flannel0(lab.hb)
    assert after_link["ifindex"] == link["ifindex"]
    assert (after_addrs, after_routes) == ({"10.201.2.0/32"}, {NETWORK})
    assert (addrs, routes) == (after_addrs, after_routes)
    lab.drivers["b"] = Driver(lab.hb, lab.ub, B_SUB)
    lab.b.peers((A_SUB, HA_IP, "udp"))
    again_link, again_addrs, again_routes = flannel0(lab.hb)
    assert again_link["ifindex"] == link["ifindex"]  # attached to, not recreated
    assert (again_addrs, again_routes) == (addrs, routes)
    assert tcp_probe(lab.ca, lab.cb, CB, 5015, size=100_000) == f"{CA} 100001"


@pytest.mark.parametrize(
    "make",
    [
        ["tuntap", "add", "dev", "flannel0", "mode", "tun", "pi", "vnet_hdr"],  # packet info on
        ["tuntap", "add", "dev", "flannel0", "mode", "tun"],  # no vnet header
        ["tuntap", "add", "dev", "flannel0", "mode", "tap", "vnet_hdr"],  # a TAP device
        ["link", "add", "flannel0", "type", "veth", "peer", "name", "flannel0p"],  # no TUN
    ],
    ids=["tun-pi", "tun-no-vnet", "tap", "veth"],
)
def test_an_incompatible_flannel0_is_replaced(lab: Lab, make: list[str]) -> None:
    lab.b.close()
    sh("ip", "-n", lab.hb, "link", "del", "flannel0")
    sh("ip", "-n", lab.hb, *make)
    stranger = json.loads(sh("ip", "-n", lab.hb, "-j", "link", "show", "flannel0").stdout)[0]
    lab.drivers["b"] = Driver(lab.hb, lab.ub, B_SUB)
    lab.b.peers((A_SUB, HA_IP, "udp"))
    link, addrs, routes = flannel0(lab.hb)
    assert link["ifindex"] != stranger["ifindex"]
    info = link["linkinfo"]["info_data"]
    assert (link["linkinfo"]["info_kind"], info["type"], info["pi"], info["vnet_hdr"]) == (
        "tun", "tun", False, True,
    )  # fmt: skip
    assert (addrs, routes) == ({"10.201.2.0/32"}, {NETWORK})
    assert tcp_probe(lab.ca, lab.cb, CB, 5016) == f"{CA} 101"
