"""vxlan's dual stack in the kernel, its two options on the IPv6 underlay: DirectRouting (flannel's
`v6Dev.directRouting`) and FilterPeers (our `table ip6 overlay_vxlan`), with real IPv6 traffic
between throwaway namespaces.

DirectRouting (tests/test_ipv6_kernel.py's two hosts on one veth, 192.168.93.0/24 + fd93::/64):

    c1 (10.6.1.2, fd00:6:0:1::2) -- h1 ==veth fd93::/64== h2 -- c2 (...2...)

FilterPeers (a bridge as the underlay, a third host that holds no lease):

    h1 fd93::1  --+
    h2 fd93::2  --+-- bridge in namespace u
    x  fd93::66 --+

A UDP listener on h2 binds flannel-v6.1's address (fd00:6:0:2::). The attack is a crafted VXLAN
frame (VNI 1, inner Ethernet to h2's v6 VTEP MAC, inner IPv6/UDP to the listener) sent by x from
an ordinary UDP socket to [fd93::2]:8472, so with its real source address: delivered without the
filter (checked, so the test can fail), dropped and counted with it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from backends.base import ExternalInterface
from backends.vxlan import FILTER_TABLE, VxlanBackend
from overlay.health import Metrics
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig
from tests.netns import Netns, NetnsLab, netns_lab
from tests.test_ipv6_kernel import Pair, lease_for, probe, v6_entries
from tests.test_vxlan_filter import (
    LISTENER,
    WAIT,
    Lines,
    nft_json,
    peers_of,
    read_generation,
    send,
    tables,
)
from tests.test_vxlan_kernel import closing_backends

pytestmark = pytest.mark.root

lab = pytest.fixture(netns_lab, name="lab")
made = pytest.fixture(closing_backends, name="made")

LISTEN_PORT = 7789
PING6 = textwrap.dedent(
    """
    import os, socket, struct, sys
    # An ICMPv6 echo request (the kernel fills in the checksum) and its reply, as ping -6 does.
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.settimeout(5)
    ident = os.getpid() & 0xFFFF
    s.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, 1) + b"overlay", (sys.argv[1], 0))
    while True:
        data, peer = s.recvfrom(2000)
        kind, _code, _sum, rid, seq = struct.unpack_from("!BBHHH", data)
        if kind == 129 and rid == ident and seq == 1:
            print("reply from", peer[0])
            break
    """
)


def config(**backend: Any) -> NetworkConfig:
    return NetworkConfig.from_dict(
        {
            "Network": "10.6.0.0/16",
            "EnableIPv6": True,
            "IPv6Network": "fd00:6::/48",
            "Backend": {"Type": "vxlan", **backend},
        }
    )


def v6_lease(n: int, ip6: str, mac6: str) -> Lease:
    """A dual-stack vxlan lease of host n (10.6.n.0/24, fd00:6:0:n::/64)."""
    return Lease(
        IPv4Network(f"10.6.{n}.0/24"),
        LeaseAttrs(
            IPv4Address(f"192.168.93.{n}"),
            IPv6Address(ip6),
            "vxlan",
            {"VNI": 1, "VtepMAC": f"02:00:00:00:{n:02x}:04"},
            {"VNI": 1, "VtepMAC": mac6},
        ),
        IPv6Network(f"fd00:6:0:{n}::/64"),
    )


def direct_routes(h: Netns, dev: str) -> list[tuple[str, str | None]]:
    """The IPv6 routes to cluster subnets on the external interface: (destination, gateway)."""
    return sorted(
        (r["dst"], r.get("gateway"))
        for r in h.ip_json("-6", "route", "show", "dev", dev)
        if r["dst"].startswith("fd00:6:")
    )


def tx_packets(h: Netns, dev: str) -> int:
    (link,) = h.ip_json("-s", "link", "show", "dev", dev)
    return int(link["stats64"]["tx"]["packets"])


# --------------------------------------------------------------------------- DirectRouting


async def test_ipv6_direct_routing_routes_on_link_peers_and_switches_level_triggered(
    lab: NetnsLab, made: list[VxlanBackend], tmp_path: Path
) -> None:
    pair = Pair(lab)
    cfg = config(DirectRouting=True)
    leases = []
    for i in range(2):
        b = VxlanBackend(cfg, pair.ext(i), netns=pair.h[i].name)
        made.append(b)
        lease = lease_for(i, await b.prepare())
        await b.start(lease)
        leases.append(lease)
    b1, b2 = made
    h1, u1 = pair.h[0], pair.u[0]
    await b1.reconcile(peers_of(leases[1]))
    await b2.reconcile(peers_of(leases[0]))

    # h2's PublicIPv6 fd93::2 is inside fd93::/64 on h1's underlay: a route via it, no triple.
    assert direct_routes(h1, u1) == [("fd00:6:0:2::/64", "fd93::2")]
    assert v6_entries(h1, "flannel-v6.1") == ([], [], [])
    got = h1.ip_json("-6", "route", "get", "fd00:6:0:2::2")[0]
    assert (got["dev"], got["gateway"]) == (u1, "fd93::2")
    # Real traffic between the containers takes it: it passes, and flannel-v6.1 sends nothing.
    tx_before = tx_packets(h1, "flannel-v6.1")
    ping = pair.c[0].run(sys.executable, "-c", PING6, "fd00:6:0:2::2")
    assert ping.strip() == "reply from fd00:6:0:2::2"
    assert probe(tmp_path, pair.c[0], pair.c[1], "fd00:6:0:2::2") == ["udp:hello", "tcp:hello"]
    assert tx_packets(h1, "flannel-v6.1") == tx_before
    assert not [
        n
        for n in h1.ip_json("-6", "neigh", "show", "dev", "flannel-v6.1")
        if n["dst"] == "fd00:6:0:2::"
    ], "no flannel-v6 neighbour for a direct peer"

    # A third peer whose PublicIPv6 is off link keeps the triple on flannel-v6.1.
    mac3 = "02:00:00:00:03:06"
    far = v6_lease(3, "fd77::3", mac3)
    triple3 = (
        [("fd00:6:0:3::", mac3)],
        [(mac3, "fd77::3")],
        [("fd00:6:0:3::/64", "fd00:6:0:3::", True)],
    )
    await b1.reconcile(peers_of(leases[1], far), {far.subnet})
    assert not b1.v6.last.full
    assert v6_entries(h1, "flannel-v6.1") == triple3
    assert direct_routes(h1, u1) == [("fd00:6:0:2::/64", "fd93::2")]

    # Its PublicIPv6 moves on link (a lease event): the triple goes, a direct route comes.
    near = v6_lease(3, "fd93::3", mac3)
    await b1.reconcile(peers_of(leases[1], near), {near.subnet})
    assert not b1.v6.last.full
    assert v6_entries(h1, "flannel-v6.1") == ([], [], [])
    assert direct_routes(h1, u1) == [("fd00:6:0:2::/64", "fd93::2"), ("fd00:6:0:3::/64", "fd93::3")]
    # ... and off link again.
    await b1.reconcile(peers_of(leases[1], far), {far.subnet})
    assert v6_entries(h1, "flannel-v6.1") == triple3
    assert direct_routes(h1, u1) == [("fd00:6:0:2::/64", "fd93::2")]

    # The on-link networks change (fd77::/64 added to the underlay): the next pass, even one for
    # no changed lease, is a full one and makes fd77::3 direct; removed again, back to the triple.
    h1.ip("addr", "add", "fd77::1/64", "dev", u1, "nodad")
    await b1.reconcile(peers_of(leases[1], far), set())
    assert b1.v6.last.full
    assert v6_entries(h1, "flannel-v6.1") == ([], [], [])
    assert direct_routes(h1, u1) == [("fd00:6:0:2::/64", "fd93::2"), ("fd00:6:0:3::/64", "fd77::3")]
    h1.ip("addr", "del", "fd77::1/64", "dev", u1)
    await b1.reconcile(peers_of(leases[1], far), set())
    assert v6_entries(h1, "flannel-v6.1") == triple3
    assert direct_routes(h1, u1) == [("fd00:6:0:2::/64", "fd93::2")]

    # Full passes repair: the direct route deleted by hand comes back; a stale triple for the
    # direct peer (left by hand, as an older daemon would) goes; a second pass changes nothing.
    mac2 = leases[1].attrs.backend_v6_data["VtepMAC"]  # type: ignore[index]
    h1.ip("-6", "route", "del", "fd00:6:0:2::/64", "dev", u1)
    h1.ip("-6", "neigh", "add", "fd00:6:0:2::", "lladdr", mac2, "dev", "flannel-v6.1", "nud",
          "permanent")  # fmt: skip
    h1.run("bridge", "fdb", "add", mac2, "dev", "flannel-v6.1", "dst", "fd93::2", "self",
           "permanent")  # fmt: skip
    await b1.reconcile(peers_of(leases[1], far))
    assert v6_entries(h1, "flannel-v6.1") == triple3
    assert direct_routes(h1, u1) == [("fd00:6:0:2::/64", "fd93::2")]
    await b1.reconcile(peers_of(leases[1], far))
    assert b1.v6.last.applied == 0 and b1.v6.last.failed == 0

    # A restart without DirectRouting: every peer gets the triple, no direct route stays.
    plain = VxlanBackend(config(), pair.ext(0), netns=h1.name)
    made.append(plain)
    await plain.prepare()
    await plain.start(leases[0])
    await plain.reconcile(peers_of(leases[1], far))
    assert direct_routes(h1, u1) == []
    assert v6_entries(h1, "flannel-v6.1")[2] == [
        ("fd00:6:0:2::/64", "fd00:6:0:2::", True),
        ("fd00:6:0:3::/64", "fd00:6:0:3::", True),
    ]
    assert probe(tmp_path, pair.c[0], pair.c[1], "fd00:6:0:2::2") == ["udp:hello", "tcp:hello"]

    # DirectRouting back; then the leases go: nothing is left, on either device.
    again = VxlanBackend(cfg, pair.ext(0), netns=h1.name)
    made.append(again)
    await again.prepare()
    await again.start(leases[0])
    await again.reconcile(peers_of(leases[1], far))
    assert direct_routes(h1, u1) == [("fd00:6:0:2::/64", "fd93::2")]
    await again.reconcile(peers_of(far), {leases[1].subnet})
    assert direct_routes(h1, u1) == []
    await again.reconcile({})
    assert direct_routes(h1, u1) == []
    assert v6_entries(h1, "flannel-v6.1") == ([], [], [])


# --------------------------------------------------------------------------- FilterPeers


@dataclass
class Host:
    ns: Netns
    ext: ExternalInterface


@dataclass
class World:
    lab: NetnsLab
    h1: Host
    h2: Host
    x: Host
    leases: dict[str, Lease]
    listener: Lines | None = None

    def received(self) -> str:
        assert self.listener is not None
        return self.listener.line()

    def send_from_h1(self, text: str) -> None:
        """Real overlay traffic over the IPv6 underlay: h1 to h2's flannel-v6.1 address."""
        send(self.h1.ns, text.encode(), "fd00:6:0:2::", LISTEN_PORT)

    def inject_from_x(self, text: str, count: int = 1) -> None:
        """Crafted VXLAN frames from x (its real source fd93::66) to [fd93::2]:8472."""
        mac = self.leases["h2"].attrs.backend_v6_data["VtepMAC"]  # type: ignore[index]
        send(self.x.ns, crafted_vxlan6(str(mac), text), "fd93::2", 8472, count)


def crafted_vxlan6(inner_dst_mac: str, text: str) -> bytes:
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    frame = (
        VXLAN(vni=1, flags=0x08)
        / Ether(src="0a:66:66:66:66:66", dst=inner_dst_mac)
        / IPv6(src="fd00:6:0:1::99", dst="fd00:6:0:2::", hlim=64)
        / UDP(sport=40000, dport=LISTEN_PORT)
        / text.encode()
    )
    return bytes(frame)


@pytest.fixture
def world(lab: NetnsLab) -> Iterator[World]:
    u = lab.netns("u")
    bridge = f"br-{lab.token}"
    u.ip("link", "add", bridge, "type", "bridge")
    u.ip("link", "set", bridge, "up")
    hosts: dict[str, Host] = {}
    for role, last in (("h1", 1), ("h2", 2), ("x", 0x66)):
        ns = lab.netns(role)
        ip, ip6 = IPv4Address(f"192.168.93.{last}"), IPv6Address(f"fd93::{last:x}")
        inside, outside = lab.veth(ns, u, f"{ip}/24")
        ns.ip("addr", "add", f"{ip6}/64", "dev", inside, "nodad")
        u.ip("link", "set", outside, "master", bridge)
        ext = ExternalInterface(inside, ns.ifindex(inside), ip, ip, 1500, ip6, ip6)
        hosts[role] = Host(ns, ext)
    yield World(lab, hosts["h1"], hosts["h2"], hosts["x"], {})


async def backend_on(
    host: Host, made: list[VxlanBackend], n: int, **options: Any
) -> tuple[VxlanBackend, Lease]:
    b = VxlanBackend(config(**options), host.ext, netns=host.ns.name)
    made.append(b)
    attrs = await b.prepare()
    assert host.ext.public_ipv6 is not None
    lease = Lease(
        IPv4Network(f"10.6.{n}.0/24"),
        LeaseAttrs(
            host.ext.public_ip,
            host.ext.public_ipv6,
            attrs.backend_type,
            attrs.backend_data,
            attrs.backend_v6_data,
        ),
        IPv6Network(f"fd00:6:0:{n}::/64"),
    )
    await b.start(lease)
    return b, lease


async def started_world(world: World, made: list[VxlanBackend], **h2_options: Any) -> VxlanBackend:
    b1, l1 = await backend_on(world.h1, made, 1)
    b2, l2 = await backend_on(world.h2, made, 2, **h2_options)
    world.leases.update(h1=l1, h2=l2)
    await b1.reconcile(peers_of(l2))
    await b2.reconcile(peers_of(l1))
    world.listener = Lines(
        world.h2.ns.popen(
            [sys.executable, "-c", LISTENER, "fd00:6:0:2::", str(LISTEN_PORT)],
            stdout=subprocess.PIPE,
        )
    )
    assert world.received() == "ready"
    return b2


def elements6(ns: Netns) -> set[str]:
    for item in nft_json(ns, "list", "set", "ip6", FILTER_TABLE, "peers")["nftables"]:
        if "set" in item:
            return set(item["set"].get("elem", []))
    raise AssertionError("no set in the listing")


def elements4(ns: Netns) -> set[str]:
    for item in nft_json(ns, "list", "set", "ip", FILTER_TABLE, "peers")["nftables"]:
        if "set" in item:
            return set(item["set"].get("elem", []))
    raise AssertionError("no set in the listing")


V6_PACKETS = "peer_filter_ipv6_dropped_packets_total"


def wait_dropped6(b: VxlanBackend, want: int) -> int:
    """The IPv6 drop counter once it reached `want` (a bound, not a timing assert)."""
    import select

    seen = b.counters().get(V6_PACKETS, 0)
    for _ in range(int(WAIT / 0.05)):
        if seen >= want:
            break
        select.select([], [], [], 0.05)
        seen = b.counters().get(V6_PACKETS, 0)
    return seen


async def test_ipv6_filter_drops_a_non_peer_and_admits_peers(
    world: World, made: list[VxlanBackend]
) -> None:
    # Without the filter the crafted frame over the IPv6 underlay is delivered: the attack works.
    await started_world(world, made)
    assert world.h2.ns.run("nft", "list", "tables").strip() == ""
    world.inject_from_x("inject-unfiltered")
    assert world.received() == "inject-unfiltered fd00:6:0:1::99"
    world.send_from_h1("legit-0")
    assert world.received() == "legit-0 fd00:6:0:1::"

    # FilterPeers on (a restart): both tables, each admitting h1's address of its family only.
    on = VxlanBackend(config(FilterPeers=True), world.h2.ext, netns=world.h2.ns.name)
    made.append(on)
    await on.prepare()
    await on.start(world.leases["h2"])
    await on.reconcile(peers_of(world.leases["h1"]))
    ns = world.h2.ns
    assert {("ip", FILTER_TABLE), ("ip6", FILTER_TABLE)} <= tables(ns)
    assert elements6(ns) == {"fd93::1"}, "h1 only, not h2's own address"
    assert elements4(ns) == {"192.168.93.1"}

    tx_before = world.h2.ns.ip_json("-s", "link", "show", "dev", "flannel-v6.1")[0]
    rx_before = int(tx_before["stats64"]["rx"]["packets"])
    world.inject_from_x("inject-filtered", count=5)
    assert wait_dropped6(on, 5) == 5
    rx_after = int(
        ns.ip_json("-s", "link", "show", "dev", "flannel-v6.1")[0]["stats64"]["rx"]["packets"]
    )
    assert rx_after == rx_before, "no injected frame reached flannel-v6.1"
    world.send_from_h1("legit-1")
    assert world.received() == "legit-1 fd00:6:0:1::", "the injected datagrams never arrived"
    counters = on.counters()
    assert counters["peer_filter_ipv6_dropped_bytes_total"] > 0
    assert counters["peer_filter_dropped_packets_total"] == 0, "the IPv4 table counted nothing"

    # Both counters on /metrics; the IPv4 one under the name it always had.
    metrics = Metrics()
    metrics.publish_backend_counters(on.type, on.counters)
    page = metrics.render()
    assert "\noverlay_vxlan_peer_filter_ipv6_dropped_packets_total 5\n" in page
    assert "\noverlay_vxlan_peer_filter_dropped_packets_total 0\n" in page

    # x gets a lease (a lease event): admitted by one incremental transaction; it goes: dropped.
    xl = Lease(
        IPv4Network("10.6.3.0/24"),
        LeaseAttrs(world.x.ext.public_ip, IPv6Address("fd93::66"), "vxlan",
                   {"VtepMAC": "0a:66:66:66:66:01"}, {"VtepMAC": "0a:66:66:66:66:66"}),
        IPv6Network("fd00:6:0:3::/64"),
    )  # fmt: skip
    await on.reconcile(peers_of(world.leases["h1"], xl), {xl.subnet})
    assert not on.last.full and not on.v6.last.full
    assert elements6(ns) == {"fd93::1", "fd93::66"}
    world.inject_from_x("as-a-peer")
    assert world.received() == "as-a-peer fd00:6:0:1::99"
    await on.reconcile(peers_of(world.leases["h1"]), {xl.subnet})
    assert elements6(ns) == {"fd93::1"}
    world.inject_from_x("after-lease", count=2)
    assert wait_dropped6(on, 7) == 7

    # SIGTERM (close) leaves the tables; a restart with the option on changes nothing.
    await on.close()
    assert {("ip", FILTER_TABLE), ("ip6", FILTER_TABLE)} <= tables(ns)
    again = VxlanBackend(config(FilterPeers=True), world.h2.ext, netns=ns.name)
    made.append(again)
    await again.prepare()
    await again.start(world.leases["h2"])
    await again.reconcile(peers_of(world.leases["h1"]))
    assert again.last.filter is not None and again.last.filter.transactions == 0
    assert again.last.filter6 is not None and again.last.filter6.transactions == 0
    assert not again.last.filter6.created and not again.last.filter6.rebuilt

    # EnableIPv6 off (FilterPeers still on): the leftover ip6 table is deleted, the ip one kept.
    v4only = VxlanBackend(
        NetworkConfig.from_dict({"Network": "10.6.0.0/16", "Backend": {"Type": "vxlan",
                                                                        "FilterPeers": True}}),
        world.h2.ext, netns=ns.name,
    )  # fmt: skip
    made.append(v4only)
    await v4only.prepare()
    assert tables(ns) == {("ip", FILTER_TABLE)}
    # FilterPeers off: both gone; x's frames get through again.
    off = VxlanBackend(config(), world.h2.ext, netns=ns.name)
    made.append(off)
    await again.reconcile(peers_of(world.leases["h1"]))  # the ip6 table back first
    assert ("ip6", FILTER_TABLE) in tables(ns)
    await off.prepare()
    assert tables(ns) == set()
    assert off.counters() == {}
    world.inject_from_x("inject-after-off")
    assert world.received() == "inject-after-off fd00:6:0:1::99"


async def test_ipv6_filter_full_pass_repairs_and_each_change_is_one_transaction(
    world: World, made: list[VxlanBackend]
) -> None:
    b2 = await started_world(world, made, FilterPeers=True)
    ns = world.h2.ns
    peers = peers_of(world.leases["h1"])
    world.inject_from_x("x", count=3)
    assert wait_dropped6(b2, 3) == 3

    # Deleted by hand: no IPv6 counter to publish; the next full pass recreates the table.
    ns.run("nft", "delete", "table", "ip6", FILTER_TABLE)
    assert V6_PACKETS not in b2.counters()
    await b2.reconcile(peers)
    assert elements6(ns) == {"fd93::1"}
    assert b2.counters()[V6_PACKETS] == 0
    # A stranger added and h1 removed by hand, a foreign rule in our chain: all back.
    ns.run("nft", "add", "element", "ip6", FILTER_TABLE, "peers", "{ fd93::66 }")
    ns.run("nft", "delete", "element", "ip6", FILTER_TABLE, "peers", "{ fd93::1 }")
    await b2.reconcile(peers)
    assert elements6(ns) == {"fd93::1"}
    ns.run("nft", "add", "rule", "ip6", FILTER_TABLE, "input", "accept")
    await b2.reconcile(peers)
    rules = [i for i in nft_json(ns, "list", "chain", "ip6", FILTER_TABLE, "input")["nftables"]
             if "rule" in i]  # fmt: skip
    assert len(rules) == 1
    world.inject_from_x("x")
    assert wait_dropped6(b2, 1) == 1

    # An incremental pass after the set was deleted by hand falls back to a full one.
    ns.run("nft", "delete", "table", "ip6", FILTER_TABLE)
    moved = Lease(
        IPv4Network("10.6.1.0/24"),
        LeaseAttrs(IPv4Address("192.168.93.1"), IPv6Address("fd93::7"), "vxlan",
                   world.leases["h1"].attrs.backend_data,
                   world.leases["h1"].attrs.backend_v6_data),
        IPv6Network("fd00:6:0:1::/64"),
    )  # fmt: skip
    await b2.reconcile(peers_of(moved), {moved.subnet})
    assert elements6(ns) == {"fd93::7"}

    # One lease event changing a PublicIPv6 is one transaction on the ip6 table.
    proc = ns.popen(["nft", "monitor"], stdout=subprocess.PIPE)
    monitor = Lines(proc)
    for attempt in range(int(WAIT / 0.1)):
        ns.run("nft", "add", "table", "ip", f"probe_{attempt}")
        line = monitor.poll(0.1)
        if line is not None:
            break
    assert line is not None and "add table ip probe_" in line, line
    assert monitor.line().startswith("# new generation")
    await b2.reconcile(peers_of(world.leases["h1"]), {moved.subnet})
    lines = read_generation(monitor)
    changes = sorted(line for line in lines[:-1] if line.strip())
    assert changes == [
        f"add element ip6 {FILTER_TABLE} peers {{ fd93::1 }}",
        f"delete element ip6 {FILTER_TABLE} peers {{ fd93::7 }}",
    ]
    proc.kill()
    proc.wait(timeout=10)
    assert elements6(ns) == {"fd93::1"}
    # Nothing to change: no transaction at all.
    await b2.reconcile(peers_of(world.leases["h1"]), {moved.subnet})
    assert b2.last.filter6 is not None and b2.last.filter6.transactions == 0
    await b2.reconcile(peers_of(world.leases["h1"]))
    assert b2.last.filter6 is not None and b2.last.filter6.transactions == 0


def test_nft_accepts_the_generated_ip6_scripts(lab: NetnsLab) -> None:
    """The ip6 table's scripts are valid input for the installed nftables (`nft -c`, then for
    real) and the listing it prints reads back as what was written (IPv4-mapped and compressed
    addresses included: nft prints its own text forms)."""
    from backends import nftset

    ns = lab.netns("n6")
    spec = nftset.PortFilter("overlay_t6", 8472, "a test filter", family="ip6")
    peers: set[Any] = {IPv6Address(f"fd93::{i:x}") for i in range(2000)}
    peers |= {
        IPv6Address("::ffff:192.0.2.1"),
        IPv6Address("2001:db8:0:0:1:0:0:1"),
        IPv6Address("::"),
    }
    script = nftset.table_script(spec, peers, counter=nftset.Counter(7, 700), replace=True)
    for check in (["-c"], []):
        subprocess.run(
            ns.exec_cmd("nft", *check, "-f", "-"), input=script.encode(), check=True, timeout=30
        )
    state = nftset.parse_table(spec, ns.run("nft", "-j", "list", "table", "ip6", "overlay_t6"))
    assert state == nftset.TableState(frozenset(peers), nftset.Counter(7, 700), ())
    gone = {IPv6Address("fd93::5"), IPv6Address("::ffff:192.0.2.1")}
    new = {IPv6Address("fd94::1")}
    subprocess.run(
        ns.exec_cmd("nft", "-f", "-"),
        input=nftset.element_script(spec, new, gone).encode(),
        check=True,
        timeout=30,
    )
    state = nftset.parse_table(spec, ns.run("nft", "-j", "list", "table", "ip6", "overlay_t6"))
    assert state.elements == (peers - gone) | new and not state.problems
