"""Dual stack in the kernel, with real traffic: vxlan's second device flannel-v6.<VNI> (VXLAN
over an IPv6 underlay) and host-gw's IPv6 routes, between two hosts in throwaway namespaces.

    c1 (10.6.1.2, fd00:6:0:1::2) -- h1 ==veth 192.168.93.0/24 + fd93::/64== h2 -- c2 (...2...)

Each test builds its own namespaces (unique names, removed at the end also on failure) and
sends traffic only between them.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from backends.base import BackendError, ExternalInterface
from backends.hostgw import RTPROT_HOSTGW, HostGwBackend
from backends.udp import UdpBackend
from backends.vxlan import VxlanBackend
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig
from tests.netns import Netns, NetnsLab, netns_lab

pytestmark = pytest.mark.root

lab = pytest.fixture(netns_lab, name="lab")

PROBE = textwrap.dedent(
    """
    import socket, sys
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    if mode == "serve":
        t = socket.socket(fam); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((host, port)); t.listen()
        u = socket.socket(fam, socket.SOCK_DGRAM); u.bind((host, port))
        print("ready", flush=True)
        data, peer = u.recvfrom(100); u.sendto(b"udp:" + data, peer)
        c, _ = t.accept(); c.sendall(b"tcp:" + c.recv(100)); c.close()
    else:
        u = socket.socket(fam, socket.SOCK_DGRAM); u.settimeout(5)
        u.sendto(b"hello", (host, port)); print(u.recvfrom(100)[0].decode())
        t = socket.create_connection((host, port), timeout=5); t.sendall(b"hello")
        print(t.recv(100).decode())
    """
)


def dual_config(backend: str) -> NetworkConfig:
    return NetworkConfig.from_dict(
        {
            "Network": "10.6.0.0/16",
            "EnableIPv6": True,
            "IPv6Network": "fd00:6::/48",
            "Backend": {"Type": backend},
        }
    )


@pytest.fixture(name="made")
async def fixture_made() -> AsyncIterator[list[Any]]:
    """Backends made by a test; closed at the end (kernel state stays until the namespaces go)."""
    made: list[Any] = []
    try:
        yield made
    finally:
        for b in made:
            await b.close()


class Pair:
    """Two dual-stack hosts on one veth underlay, each with a dual-stack container behind it."""

    def __init__(self, lab: NetnsLab) -> None:
        self.h = [lab.netns("h1"), lab.netns("h2")]
        self.u = list(lab.veth(self.h[0], self.h[1], "192.168.93.1/24", "192.168.93.2/24"))
        self.c: list[Netns] = []
        for i, (h, u) in enumerate(zip(self.h, self.u, strict=True), start=1):
            h.ip("addr", "add", f"fd93::{i}/64", "dev", u, "nodad")
            h.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            h.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
            c = lab.netns(f"c{i}")
            cv, hv = lab.veth(c, h, f"10.6.{i}.2/24", f"10.6.{i}.1/24")
            c.ip("addr", "add", f"fd00:6:0:{i}::2/64", "dev", cv, "nodad")
            h.ip("addr", "add", f"fd00:6:0:{i}::1/64", "dev", hv, "nodad")
            c.ip("route", "add", "default", "via", f"10.6.{i}.1")
            c.ip("-6", "route", "add", "default", "via", f"fd00:6:0:{i}::1")
            self.c.append(c)

    def ext(self, i: int) -> ExternalInterface:
        ip = IPv4Address(f"192.168.93.{i + 1}")
        ip6 = IPv6Address(f"fd93::{i + 1}")
        h, u = self.h[i], self.u[i]
        return ExternalInterface(u, h.ifindex(u), ip, ip, 1500, ip6, ip6)


def lease_for(i: int, attrs: Any) -> Lease:
    return Lease(
        IPv4Network(f"10.6.{i + 1}.0/24"),
        LeaseAttrs(
            IPv4Address(f"192.168.93.{i + 1}"),
            IPv6Address(f"fd93::{i + 1}"),
            attrs.backend_type,
            attrs.backend_data,
            attrs.backend_v6_data,
        ),
        IPv6Network(f"fd00:6:0:{i + 1}::/64"),
    )


def probe(tmp_path: Path, client: Netns, server: Netns, addr: str) -> list[str]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    srv = server.popen([sys.executable, str(script), "serve", addr, "7777"], stdout=subprocess.PIPE)
    assert srv.stdout is not None
    assert srv.stdout.readline().decode().strip() == "ready"
    out = client.run(sys.executable, str(script), "probe", addr, "7777", timeout=20).split()
    assert srv.wait(timeout=10) == 0
    return out


def v6_entries(h: Netns, dev: str) -> tuple[Any, Any, Any]:
    neigh = [
        (n["dst"], n.get("lladdr"))
        for n in h.ip_json("-6", "neigh", "show", "dev", dev)
        if "PERMANENT" in n.get("state", [])
    ]
    fdb = [
        (f["mac"], f.get("dst"))
        for f in h.bridge_json("fdb", "show", "dev", dev)
        if f["mac"] != "00:00:00:00:00:00"
    ]
    routes = [
        (r["dst"], r.get("gateway"), "onlink" in r.get("flags", []))
        for r in h.ip_json("-6", "route", "show", "dev", dev)
        if r.get("protocol") != "kernel"
    ]
    return sorted(neigh), sorted(fdb), sorted(routes)


async def test_vxlan_dual_stack_second_device_entries_traffic_repair_and_removal(
    lab: NetnsLab, made: list[Any], tmp_path: Path
) -> None:
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.utils import rdpcap

    pair = Pair(lab)
    cfg = dual_config("vxlan")
    leases = []
    for i in range(2):
        b = VxlanBackend(cfg, pair.ext(i), netns=pair.h[i].name)
        made.append(b)
        attrs = await b.prepare()
        assert attrs.backend_v6_data is not None
        assert attrs.backend_v6_data["VNI"] == 1
        assert attrs.backend_v6_data["VtepMAC"] != attrs.backend_data["VtepMAC"]  # type: ignore[index]
        lease = lease_for(i, attrs)
        assert await b.start(lease) == 1430  # flannel-v6.1: 1500 - 70; one MTU for both
        leases.append(lease)
    b1, b2 = made
    h1 = pair.h[0]
    dev = h1.ip_json("-d", "link", "show", "dev", "flannel-v6.1")[0]
    data = dev["linkinfo"]["info_data"]
    assert (data["id"], data["local6"], data["port"], data["learning"]) == (
        1,
        "fd93::1",
        8472,
        False,
    )
    assert dev["address"] == leases[0].attrs.backend_v6_data["VtepMAC"]  # type: ignore[index]
    assert dev["mtu"] == 1430
    addrs = [
        (a["local"], a["prefixlen"])
        for a in h1.ip_json("-6", "addr", "show", "dev", "flannel-v6.1")[0]["addr_info"]
        if a["scope"] == "global"
    ]
    assert addrs == [("fd00:6:0:1::", 128)]

    await b1.reconcile({leases[1].subnet: leases[1]})
    await b2.reconcile({leases[0].subnet: leases[0]})
    mac2 = leases[1].attrs.backend_v6_data["VtepMAC"]  # type: ignore[index]
    want = (
        [("fd00:6:0:2::", mac2)],
        [(mac2, "fd93::2")],
        [("fd00:6:0:2::/64", "fd00:6:0:2::", True)],
    )
    assert v6_entries(h1, "flannel-v6.1") == want

    pcap = tmp_path / "underlay.pcap"
    dump = h1.popen(
        ["tcpdump", "-i", pair.u[0], "-n", "-U", "--immediate-mode", "-w", str(pcap),
         "ip6", "and", "udp", "port", "8472"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert dump.stderr is not None
    assert "listening on" in dump.stderr.readline().decode()
    assert probe(tmp_path, pair.c[0], pair.c[1], "fd00:6:0:2::2") == ["udp:hello", "tcp:hello"]
    assert probe(tmp_path, pair.c[1], pair.c[0], "10.6.1.2") == ["udp:hello", "tcp:hello"]
    inner: set[tuple[str, str]] = set()
    for _ in range(100):
        try:
            packets = [p for p in rdpcap(str(pcap)) if p.haslayer(VXLAN)]
        except Exception:  # a record being written right now; read again
            packets = []
        inner = set()
        for p in packets:
            assert {p[IPv6].src, p[IPv6].dst} == {"fd93::1", "fd93::2"}  # IPv6 underlay
            assert p[VXLAN].vni == 1
            i6 = p[VXLAN][Ether][IPv6]
            inner.add((i6.src, i6.dst))
        if {("fd00:6:0:1::2", "fd00:6:0:2::2"), ("fd00:6:0:2::2", "fd00:6:0:1::2")} <= inner:
            break
        await asyncio.sleep(0.05)
    dump.terminate()
    dump.wait(timeout=10)
    assert ("fd00:6:0:1::2", "fd00:6:0:2::2") in inner, inner

    # Level-triggered: entries deleted by hand come back, a second pass changes nothing.
    h1.ip("-6", "route", "del", "fd00:6:0:2::/64", "dev", "flannel-v6.1")
    h1.ip("-6", "neigh", "del", "fd00:6:0:2::", "dev", "flannel-v6.1")
    h1.run("bridge", "fdb", "del", mac2, "dev", "flannel-v6.1", "dst", "fd93::2")
    await b1.reconcile({leases[1].subnet: leases[1]})
    assert v6_entries(h1, "flannel-v6.1") == want
    await b1.reconcile({leases[1].subnet: leases[1]})
    assert b1.v6.last.applied == 0 and b1.v6.last.failed == 0

    # Lease events: only the difference is applied, nothing is read (a third host comes, its
    # MAC changes, it goes); a full pass after that finds nothing to do.
    third = Lease(
        IPv4Network("10.6.3.0/24"),
        LeaseAttrs(
            IPv4Address("192.168.93.3"),
            IPv6Address("fd93::3"),
            "vxlan",
            {"VNI": 1, "VtepMAC": "02:00:00:00:03:04"},
            {"VNI": 1, "VtepMAC": "02:00:00:00:03:06"},
        ),
        IPv6Network("fd00:6:0:3::/64"),
    )
    peers = {leases[1].subnet: leases[1], third.subnet: third}
    await b1.reconcile(peers, {third.subnet})
    assert not b1.last.full and not b1.v6.last.full and b1.v6.last.applied == 3
    with3 = (
        sorted([*want[0], ("fd00:6:0:3::", "02:00:00:00:03:06")]),
        sorted([*want[1], ("02:00:00:00:03:06", "fd93::3")]),
        sorted([*want[2], ("fd00:6:0:3::/64", "fd00:6:0:3::", True)]),
    )
    assert v6_entries(h1, "flannel-v6.1") == with3
    moved = Lease(
        third.subnet,
        LeaseAttrs(
            third.attrs.public_ip,
            IPv6Address("fd93::33"),
            "vxlan",
            third.attrs.backend_data,
            {"VNI": 1, "VtepMAC": "02:00:00:00:03:07"},
        ),
        third.ipv6_subnet,
    )
    await b1.reconcile({**peers, third.subnet: moved}, {third.subnet})
    entries = v6_entries(h1, "flannel-v6.1")
    assert ("fd00:6:0:3::", "02:00:00:00:03:07") in entries[0]
    assert ("02:00:00:00:03:07", "fd93::33") in entries[1]
    assert ("02:00:00:00:03:06", "fd93::3") not in entries[1]
    await b1.reconcile({leases[1].subnet: leases[1]}, {third.subnet})
    assert v6_entries(h1, "flannel-v6.1") == want
    await b1.reconcile({leases[1].subnet: leases[1]})
    assert b1.v6.last.full and b1.v6.last.applied == 0

    # A restarted backend adopts flannel-v6.1 with its MAC and changes nothing.
    again = VxlanBackend(cfg, pair.ext(0), netns=h1.name)
    made.append(again)
    attrs = await again.prepare()
    assert attrs.backend_v6_data == leases[0].attrs.backend_v6_data
    await again.start(leases[0])
    await again.reconcile({leases[1].subnet: leases[1]})
    assert again.v6.last.applied == 0

    # The peer's lease goes: its IPv6 entries go, the IPv4 side too.
    await again.reconcile({})
    assert v6_entries(h1, "flannel-v6.1") == ([], [], [])


async def test_vxlan_ipv6_side_of_a_hostile_lease_is_skipped_ipv4_side_kept(
    lab: NetnsLab, made: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    pair = Pair(lab)
    cfg = dual_config("vxlan")
    b = VxlanBackend(cfg, pair.ext(0), netns=pair.h[0].name)
    made.append(b)
    attrs = await b.prepare()
    own = lease_for(0, attrs)
    await b.start(own)
    mac = "02:00:00:00:00:02"
    bad = [
        # (v4 subnet, v6 subnet, PublicIPv6, BackendV6Data)
        ("10.6.2.0/24", "fd00:6:0:2::/64", None, {"VNI": 1, "VtepMAC": mac}),
        ("10.6.3.0/24", "fd00:6:0:3::/64", "fd93::3", {"VNI": 1, "VtepMAC": "01:00:5e:00:00:01"}),
        ("10.6.4.0/24", "fd00:6:0:4::/64", "fd93::4", {"VNI": 1, "VtepMAC": 7}),
        ("10.6.5.0/24", "fd00:6:0:1::/64", "fd93::5", {"VNI": 1, "VtepMAC": mac}),  # ours
    ]
    peers = {}
    for v4, v6, ip6, data in bad:
        lease = Lease(
            IPv4Network(v4),
            LeaseAttrs(
                IPv4Address("192.168.93.2"),
                IPv6Address(ip6) if ip6 else None,
                "vxlan",
                {"VNI": 1, "VtepMAC": mac},
                data,
            ),
            IPv6Network(v6),
        )
        peers[lease.subnet] = lease
    with caplog.at_level(logging.WARNING):
        await b.reconcile(peers)
        await b.reconcile(peers)
    assert v6_entries(pair.h[0], "flannel-v6.1") == ([], [], [])
    v4_routes = {r["dst"] for r in pair.h[0].ip_json("route", "show", "dev", "flannel.1")}
    assert {"10.6.2.0/24", "10.6.3.0/24", "10.6.4.0/24", "10.6.5.0/24"} <= v4_routes
    skips = [r for r in caplog.records if "skipping the IPv6 side" in r.getMessage()]
    assert len(skips) == 4  # each once, however many passes


async def test_hostgw_ipv6_routes_traffic_skips_and_repair(
    lab: NetnsLab, made: list[Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pair = Pair(lab)
    cfg = dual_config("host-gw")
    leases = []
    for i in range(2):
        b = HostGwBackend(cfg, pair.ext(i), netns=pair.h[i].name)
        made.append(b)
        attrs = await b.prepare()
        assert attrs.backend_v6_data is None  # host-gw publishes no BackendData
        lease = lease_for(i, attrs)
        assert await b.start(lease) == 1500
        leases.append(lease)
    b1, b2 = made
    far = Lease(  # PublicIPv6 not on-link: skipped, logged once
        IPv4Network("10.6.9.0/24"),
        LeaseAttrs(IPv4Address("192.168.93.9"), IPv6Address("fd77::9"), "host-gw"),
        IPv6Network("fd00:6:0:9::/64"),
    )
    h1, u1 = pair.h[0], pair.u[0]
    # The operator's own IPv6 route (another protocol) is never touched.
    h1.ip("-6", "route", "add", "fd00:6:0:42::/64", "via", "fd93::2", "dev", u1)
    with caplog.at_level(logging.WARNING):
        await b1.reconcile({leases[1].subnet: leases[1], far.subnet: far})
        await b1.reconcile({leases[1].subnet: leases[1], far.subnet: far})
    await b2.reconcile({leases[0].subnet: leases[0]})

    def ours() -> list[tuple[str, str | None, str]]:
        return sorted(
            (r["dst"], r.get("gateway"), r["dev"])
            for r in h1.ip_json("-6", "route", "show", "proto", str(RTPROT_HOSTGW))
        )

    assert ours() == [("fd00:6:0:2::/64", "fd93::2", u1)]
    skips = [r for r in caplog.records if "fd77::9 is not on-link" in r.getMessage()]
    assert len(skips) == 1
    assert probe(tmp_path, pair.c[0], pair.c[1], "fd00:6:0:2::2") == ["udp:hello", "tcp:hello"]
    assert probe(tmp_path, pair.c[1], pair.c[0], "10.6.1.2") == ["udp:hello", "tcp:hello"]

    h1.ip("-6", "route", "del", "fd00:6:0:2::/64", "proto", str(RTPROT_HOSTGW))
    await b1.reconcile({leases[1].subnet: leases[1]})
    assert ours() == [("fd00:6:0:2::/64", "fd93::2", u1)]
    # Lease events: the difference only (a host comes and goes), no kernel reads.
    extra = Lease(
        IPv4Network("10.6.4.0/24"),
        LeaseAttrs(IPv4Address("192.168.93.4"), IPv6Address("fd93::4"), "host-gw"),
        IPv6Network("fd00:6:0:4::/64"),
    )
    await b1.reconcile({leases[1].subnet: leases[1], extra.subnet: extra}, {extra.subnet})
    assert not b1.v6.last.full and b1.v6.last.applied == 1
    assert ours() == [("fd00:6:0:2::/64", "fd93::2", u1), ("fd00:6:0:4::/64", "fd93::4", u1)]
    await b1.reconcile({leases[1].subnet: leases[1]}, {extra.subnet})
    assert ours() == [("fd00:6:0:2::/64", "fd93::2", u1)]
    await b1.reconcile({})
    assert ours() == []
    operator = [r["dst"] for r in h1.ip_json("-6", "route", "show", "fd00:6:0:42::/64")]
    assert operator == ["fd00:6:0:42::/64"]


def test_udp_backend_refuses_ipv6_naming_the_option() -> None:
    ext = ExternalInterface("eth0", 2, IPv4Address("192.0.2.1"), IPv4Address("192.0.2.1"), 1500)
    with pytest.raises(BackendError, match=r"IPv4 only.*EnableIPv6"):
        UdpBackend(dual_config("udp"), ext)


def test_vxlan_dual_stack_needs_an_ipv6_underlay_address() -> None:
    ext = ExternalInterface("eth0", 2, IPv4Address("192.0.2.1"), IPv4Address("192.0.2.1"), 1500)
    with pytest.raises(BackendError, match="EnableIPv6 needs a global IPv6 address on eth0"):
        VxlanBackend(dual_config("vxlan"), ext)


async def test_interface_choice_finds_the_global_ipv6_address(lab: NetnsLab) -> None:
    from overlay.iface import choose_interface

    a, b = lab.netns("ifa"), lab.netns("ifb")
    va, _vb = lab.veth(a, b, "192.168.94.1/24", "192.168.94.2/24")
    # A link-local (automatic), a tentative one (DAD still running) and two global ones.
    a.run("sysctl", "-qw", f"net.ipv6.conf.{va}.dad_transmits=200")
    a.ip("addr", "add", "fd94::7/64", "dev", va)  # stays tentative for long
    a.ip("addr", "add", "fd94::1/64", "dev", va, "nodad")
    a.ip("addr", "add", "2001:db8:94::1/64", "dev", va, "nodad")
    ext = await choose_interface([va], netns=a.name)
    assert ext.iface_addr6 in (IPv6Address("fd94::1"), IPv6Address("2001:db8:94::1"))
    assert ext.public_ipv6 == ext.iface_addr6
    assert ext.iface_addr6 is not None and not ext.iface_addr6.is_link_local
    # --iface by an IPv6 address of the interface; --public-ipv6 wins over the interface's.
    ext = await choose_interface(["fd94::1"], public_ipv6=IPv6Address("fd95::9"), netns=a.name)
    assert ext.name == va and ext.public_ipv6 == IPv6Address("fd95::9")
    # --iface-regex also matches global IPv6 addresses; --iface-can-reach takes an IPv6 one.
    a.ip("link", "add", "zz0", "type", "veth", "peer", "name", "zz1")
    a.ip("addr", "add", "192.168.95.1/24", "dev", "zz0")
    a.ip("addr", "add", "fd96::1/64", "dev", "zz0", "nodad")
    a.ip("link", "set", "zz0", "up")
    a.ip("link", "set", "zz1", "up")
    assert (await choose_interface(regexes=[r"^fd96:"], netns=a.name)).name == "zz0"
    ext = await choose_interface(can_reach=IPv6Address("fd96::77"), netns=a.name)
    assert ext.name == "zz0" and ext.iface_addr == IPv4Address("192.168.95.1")
    assert (await choose_interface(can_reach=IPv6Address("fd94::9"), netns=a.name)).name == va
    # No global IPv6 address: None (the daemon refuses EnableIPv6 then).
    a.ip("-6", "addr", "flush", "dev", va, "scope", "global")
    ext = await choose_interface([va], netns=a.name)
    assert ext.iface_addr6 is None and ext.public_ipv6 is None
