"""FilterPeers against the real kernel: nftables in throwaway namespaces, real VXLAN traffic.

    h1 192.168.93.1 --+
    h2 192.168.93.2 --+-- bridge in namespace u (the underlay)
    x  192.168.93.66 -+   (a third host on the same underlay that holds no lease)

h1 and h2 run VxlanBackends (subnets 10.5.1.0/24 and 10.5.2.0/24). A UDP listener on h2 binds
h2's flannel.1 address (10.5.2.0). Legitimate traffic is a datagram from h1 to it through the
overlay. The attack is a crafted VXLAN frame (VNI 1, flags 0x08, inner Ethernet to h2's VTEP MAC,
inner IPv4/UDP to the listener) sent from x to h2's UDP 8472 with an ordinary UDP socket, so its
source address is x's real one. Without the filter the listener receives the injected datagram
(checked, so the tests can fail); with it the frame is dropped at the input hook: the drop
counter counts it, flannel.1's receive counter does not move, and the listener never sees it
(it sees a later legitimate datagram, and only that).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from backends import nftset
from backends.base import BackendError, ExternalInterface
from backends.vxlan import FILTER_TABLE, VxlanBackend
from overlay.health import Metrics
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig, Subnet
from tests.netns import Netns, NetnsLab, netns_lab
from tests.test_vxlan_kernel import closing_backends

pytestmark = pytest.mark.root

LISTEN_PORT = 7788
WAIT = 10.0
"""Seconds to wait for an expected datagram or counter value (a bound, not a timing assert)."""

LISTENER = textwrap.dedent(
    """
    import socket, sys
    u = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    while True:
        data, peer = u.recvfrom(2000)
        print(data.decode(errors="replace"), peer[0], flush=True)
    """
)
SENDER = textwrap.dedent(
    """
    import socket, sys
    payload, host, port = bytes.fromhex(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(int(sys.argv[4])):
        s.sendto(payload, (host, port))
    """
)

lab = pytest.fixture(netns_lab, name="lab")


@dataclass
class Node:
    ns: Netns
    ip: IPv4Address
    ext: ExternalInterface


class Lines:
    """Lines printed by a process, read from its pipe's file descriptor without buffering, so
    that a select() on it never misses a line already read into a buffer."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.pending = b""

    def line(self) -> str:
        """The next line; AssertionError when none is complete within WAIT seconds."""
        line = self.poll(WAIT)
        assert line is not None, f"no line within {WAIT} s (partial: {self.pending!r})"
        return line

    def poll(self, timeout: float) -> str | None:
        """The next line, or None when none is complete within `timeout` seconds."""
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.fd, 65536)
            assert chunk, f"the process ended (partial: {self.pending!r})"
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode().rstrip()


@dataclass
class World:
    lab: NetnsLab
    h1: Node
    h2: Node
    x: Node
    leases: dict[str, Lease]
    listener: Lines | None = None

    def received(self) -> str:
        """The next line the listener printed (waits at most WAIT seconds)."""
        assert self.listener is not None
        return self.listener.line()

    def send_from_h1(self, text: str) -> None:
        """Real overlay traffic: a datagram from h1 to h2's flannel.1 address."""
        send(self.h1.ns, text.encode(), "10.5.2.0", LISTEN_PORT)

    def inject_from_x(self, text: str, count: int = 1, inner_src: str = "10.5.1.99") -> None:
        """Crafted VXLAN frames from x to h2's VXLAN port (x's own, real source address)."""
        send(self.x.ns, crafted_vxlan(self.h2_mac, inner_src, text), str(self.h2.ip), 8472, count)

    @property
    def h2_mac(self) -> str:
        data = self.leases["h2"].attrs.backend_data
        assert data is not None
        return str(data["VtepMAC"])


def send(ns: Netns, payload: bytes, host: str, port: int, count: int = 1) -> None:
    ns.run(sys.executable, "-c", SENDER, payload.hex(), host, str(port), str(count))


def crafted_vxlan(inner_dst_mac: str, inner_src: str, text: str) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    frame = (
        VXLAN(vni=1, flags=0x08)
        / Ether(src="0a:66:66:66:66:66", dst=inner_dst_mac)
        / IP(src=inner_src, dst="10.5.2.0", ttl=64)
        / UDP(sport=40000, dport=LISTEN_PORT)
        / text.encode()
    )
    return bytes(frame)


def cfg(**backend: Any) -> NetworkConfig:
    return NetworkConfig.from_dict(
        {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", **backend}}
    )


def peers_of(*leases: Lease) -> dict[Subnet, Lease]:
    return {le.ident: le for le in leases}


def x_lease() -> Lease:
    return Lease(
        IPv4Network("10.5.3.0/24"),
        LeaseAttrs(IPv4Address("192.168.93.66"), None, "vxlan", {"VtepMAC": "0a:66:66:66:66:66"}),
    )


async def backend_on(
    node: Node, made: list[VxlanBackend], subnet: str, **options: Any
) -> tuple[VxlanBackend, Lease]:
    b = VxlanBackend(cfg(**options), node.ext, netns=node.ns.name)
    made.append(b)
    attrs = await b.prepare()
    lease = Lease(
        IPv4Network(subnet), LeaseAttrs(node.ip, None, attrs.backend_type, attrs.backend_data)
    )
    await b.start(lease)
    return b, lease


def nft_json(ns: Netns, *args: str) -> Any:
    return json.loads(ns.run("nft", "-j", *args))


def filter_elements(ns: Netns) -> set[str]:
    for item in nft_json(ns, "list", "set", "ip", FILTER_TABLE, "peers")["nftables"]:
        if "set" in item:
            return set(item["set"].get("elem", []))
    raise AssertionError("no set in the listing")


def tables(ns: Netns) -> set[tuple[str, str]]:
    return {
        (i["table"]["family"], i["table"]["name"])
        for i in nft_json(ns, "list", "tables")["nftables"]
        if "table" in i
    }


def dropped(b: VxlanBackend) -> int:
    return b.counters().get("peer_filter_dropped_packets_total", 0)


def rx_packets(ns: Netns) -> int:
    (link,) = ns.ip_json("-s", "link", "show", "dev", "flannel.1")
    return int(link["stats64"]["rx"]["packets"])


def wait_dropped(b: VxlanBackend, want: int) -> int:
    """The drop counter once it reached `want` (bounded wait: the kernel counts on receive)."""
    seen = dropped(b)
    for _ in range(int(WAIT / 0.05)):
        if seen >= want:
            break
        select.select([], [], [], 0.05)
        seen = dropped(b)
    return seen


@pytest.fixture
def world(lab: NetnsLab) -> Iterator[World]:
    u = lab.netns("u")
    bridge = f"br-{lab.token}"
    u.ip("link", "add", bridge, "type", "bridge")
    u.ip("link", "set", bridge, "up")
    nodes: dict[str, Node] = {}
    for role, last in (("h1", 1), ("h2", 2), ("x", 66)):
        ns = lab.netns(role)
        ip = IPv4Address(f"192.168.93.{last}")
        inside, outside = lab.veth(ns, u, f"{ip}/24")
        u.ip("link", "set", outside, "master", bridge)
        nodes[role] = Node(ns, ip, ExternalInterface(inside, ns.ifindex(inside), ip, ip, 1500))
    yield World(lab, nodes["h1"], nodes["h2"], nodes["x"], {})


async def started_world(world: World, made: list[VxlanBackend], **h2_options: Any) -> VxlanBackend:
    """h1 and h2 programmed with each other's lease; a listener on h2; returns h2's backend."""
    b1, l1 = await backend_on(world.h1, made, "10.5.1.0/24")
    b2, l2 = await backend_on(world.h2, made, "10.5.2.0/24", **h2_options)
    world.leases.update(h1=l1, h2=l2)
    await b1.reconcile(peers_of(l2))
    await b2.reconcile(peers_of(l1))
    world.listener = Lines(
        world.h2.ns.popen(
            [sys.executable, "-c", LISTENER, "10.5.2.0", str(LISTEN_PORT)], stdout=subprocess.PIPE
        )
    )
    assert world.received() == "ready"
    return b2


made = pytest.fixture(closing_backends, name="made")


# --------------------------------------------------------------------------- tests


async def test_filter_drops_a_third_host_and_admits_lease_hosts(
    world: World, made: list[VxlanBackend]
) -> None:
    # Without the filter (flannel's behaviour) x's crafted frame is delivered: the attack works.
    b2 = await started_world(world, made)
    assert (world.h2.ns.run("nft", "list", "tables").strip()) == ""
    world.inject_from_x("inject-unfiltered")
    assert world.received() == "inject-unfiltered 10.5.1.99"

    # FilterPeers on (a restarted daemon: the device and its entries are reused).
    on = VxlanBackend(cfg(FilterPeers=True), world.h2.ext, netns=world.h2.ns.name)
    made.append(on)
    await on.prepare()
    await on.start(world.leases["h2"])
    await on.reconcile(peers_of(world.leases["h1"]))
    assert on.last.filter is not None and on.last.filter.created
    assert filter_elements(world.h2.ns) == {"192.168.93.1"}, "h1 only, not h2's own address"

    world.send_from_h1("legit-1")
    assert world.received() == "legit-1 10.5.1.0"

    rx_before = rx_packets(world.h2.ns)
    world.inject_from_x("inject-filtered", count=5)
    assert wait_dropped(on, 5) == 5
    assert rx_packets(world.h2.ns) == rx_before, "no injected frame reached flannel.1"
    world.send_from_h1("legit-2")
    assert world.received() == "legit-2 10.5.1.0", "the injected datagrams never arrived"
    assert on.counters()["peer_filter_dropped_bytes_total"] > 0

    # The counter is on /metrics as the daemon publishes it.
    metrics = Metrics()
    metrics.publish_backend_counters(on.type, on.counters)
    page = metrics.render()
    assert "# TYPE overlay_vxlan_peer_filter_dropped_packets_total counter" in page
    assert "\noverlay_vxlan_peer_filter_dropped_packets_total 5\n" in page

    # FilterPeers off again: prepare() deletes our table (and only ours); x gets through again.
    world.h2.ns.run("nft", "add", "table", "ip", "someone_else")
    off = VxlanBackend(cfg(), world.h2.ext, netns=world.h2.ns.name)
    made.append(off)
    await off.prepare()
    assert tables(world.h2.ns) == {("ip", "someone_else")}
    assert off.counters() == {}
    world.inject_from_x("inject-after-off")
    assert world.received() == "inject-after-off 10.5.1.99"
    await off.prepare()  # nothing left to delete: no error
    del b2


async def test_lease_events_admit_and_drop_a_peer_incrementally(
    world: World, made: list[VxlanBackend]
) -> None:
    b2 = await started_world(world, made, FilterPeers=True)
    h1 = world.leases["h1"]
    world.inject_from_x("before-lease", count=3, inner_src="10.5.3.2")
    assert wait_dropped(b2, 3) == 3

    # x gets a lease: an incremental pass admits it (one element added, nothing re-read).
    xl = x_lease()
    await b2.reconcile(peers_of(h1, xl), {xl.subnet})
    assert not b2.last.full
    assert b2.last.filter is not None
    assert (b2.last.filter.added, b2.last.filter.transactions) == (1, 1)
    assert filter_elements(world.h2.ns) == {"192.168.93.1", "192.168.93.66"}
    world.inject_from_x("as-a-peer", inner_src="10.5.3.2")
    assert world.received() == "as-a-peer 10.5.3.2"
    assert dropped(b2) == 3

    # Its lease goes: dropped again.
    await b2.reconcile(peers_of(h1), {xl.subnet})
    assert not b2.last.full
    assert b2.last.filter is not None and b2.last.filter.removed == 1
    assert filter_elements(world.h2.ns) == {"192.168.93.1"}
    world.inject_from_x("after-lease", count=2, inner_src="10.5.3.2")
    assert wait_dropped(b2, 5) == 5
    world.send_from_h1("legit")
    assert world.received() == "legit 10.5.1.0"

    # A lease event that does not touch any PublicIP's membership sends only no-op elements;
    # the set stays as it is. A second lease with h1's PublicIP keeps h1 admitted when one of the
    # two goes away.
    twin = Lease(IPv4Network("10.5.9.0/24"), h1.attrs)
    await b2.reconcile(peers_of(h1, twin), {twin.subnet})
    await b2.reconcile(peers_of(twin), {h1.subnet})
    assert filter_elements(world.h2.ns) == {"192.168.93.1"}


async def test_full_pass_repairs_the_filter_changed_by_hand(
    world: World, made: list[VxlanBackend]
) -> None:
    b2 = await started_world(world, made, FilterPeers=True)
    ns = world.h2.ns
    peers = peers_of(world.leases["h1"])
    world.inject_from_x("x", count=4)
    assert wait_dropped(b2, 4) == 4

    # Table deleted by hand: no counter to publish; the next full pass recreates it (the
    # counter restarts at 0 then).
    ns.run("nft", "delete", "table", "ip", FILTER_TABLE)
    assert b2.counters() == {}
    await b2.reconcile(peers)
    assert b2.counters() == {
        "peer_filter_dropped_packets_total": 0,
        "peer_filter_dropped_bytes_total": 0,
    }
    assert b2.last.filter is not None and b2.last.filter.created
    assert filter_elements(ns) == {"192.168.93.1"}

    # Rule and set deleted by hand (the set cannot go while the rule uses it): rebuilt in one
    # transaction, the drop counter carried over.
    world.inject_from_x("x", count=2)
    assert wait_dropped(b2, 2) == 2
    handle = next(
        i["rule"]["handle"]
        for i in nft_json(ns, "-a", "list", "chain", "ip", FILTER_TABLE, "input")["nftables"]
        if "rule" in i
    )
    ns.run("nft", "delete", "rule", "ip", FILTER_TABLE, "input", "handle", str(handle))
    ns.run("nft", "delete", "set", "ip", FILTER_TABLE, "peers")
    await b2.reconcile(peers)
    assert b2.last.filter is not None and b2.last.filter.rebuilt
    assert filter_elements(ns) == {"192.168.93.1"}
    assert dropped(b2) == 2

    # Elements flushed, a stranger added, a rule of someone else's in our chain, the chain's
    # priority changed: all back to our shape.
    ns.run("nft", "flush", "set", "ip", FILTER_TABLE, "peers")
    await b2.reconcile(peers)
    assert b2.last.filter is not None
    assert (b2.last.filter.added, b2.last.filter.rebuilt) == (1, ())
    ns.run("nft", "add", "element", "ip", FILTER_TABLE, "peers", "{ 192.168.93.66 }")
    ns.run("nft", "add", "rule", "ip", FILTER_TABLE, "input", "accept")
    await b2.reconcile(peers)
    assert b2.last.filter is not None and b2.last.filter.rebuilt
    assert filter_elements(ns) == {"192.168.93.1"}
    world.inject_from_x("x", count=1)
    assert wait_dropped(b2, 3) == 3
    assert dropped(b2) == 3

    # An incremental pass after the table was deleted falls back to a full one.
    ns.run("nft", "delete", "table", "ip", FILTER_TABLE)
    xl = x_lease()
    await b2.reconcile(peers_of(world.leases["h1"], xl), {xl.subnet})
    assert filter_elements(ns) == {"192.168.93.1", "192.168.93.66"}
    assert b2.last.filter is not None and b2.last.filter.created

    # A pass with nothing to change runs no nft transaction at all.
    await b2.reconcile(peers_of(world.leases["h1"], xl))
    assert b2.last.filter is not None and b2.last.filter.transactions == 0


async def test_each_set_update_is_one_transaction(world: World, made: list[VxlanBackend]) -> None:
    """`nft monitor` prints every change and one "# new generation" line per committed
    transaction: an incremental pass that admits one peer and drops another, and a full pass
    that rebuilds the table with its elements, must each be one generation."""
    b2 = await started_world(world, made, FilterPeers=True)
    ns = world.h2.ns
    h1, xl = world.leases["h1"], x_lease()
    await b2.reconcile(peers_of(h1, xl))
    assert filter_elements(ns) == {"192.168.93.1", "192.168.93.66"}

    proc = ns.popen(["nft", "monitor"], stdout=subprocess.PIPE)
    monitor = Lines(proc)
    # The monitor is listening once it reports a change: add probe tables until it does.
    for attempt in range(int(WAIT / 0.1)):
        ns.run("nft", "add", "table", "ip", f"probe_{attempt}")
        line = monitor.poll(0.1)
        if line is not None:
            break
    assert line is not None and "add table ip probe_" in line, line
    assert monitor.line().startswith("# new generation")

    # One incremental pass: h1's lease replaced by one with another PublicIP, x's lease gone.
    moved = Lease(h1.subnet, LeaseAttrs(IPv4Address("192.168.93.7"), None, "vxlan",
                                        h1.attrs.backend_data))  # fmt: skip
    await b2.reconcile(peers_of(moved), {h1.subnet, xl.subnet})
    assert not b2.last.full
    lines = read_generation(monitor)
    assert lines[-1].startswith("# new generation")
    changes = sorted(line for line in lines[:-1] if line.strip())
    assert changes == [
        f"add element ip {FILTER_TABLE} peers {{ 192.168.93.7 }}",
        f"delete element ip {FILTER_TABLE} peers {{ 192.168.93.1 }}",
        f"delete element ip {FILTER_TABLE} peers {{ 192.168.93.66 }}",
    ]
    assert filter_elements(ns) == {"192.168.93.7"}

    # One full pass rebuilding the table (an extra chain added by hand): one generation, in
    # which the new table already holds its element when the old one goes.
    ns.run("nft", "add", "chain", "ip", FILTER_TABLE, "extra")
    assert read_generation(monitor)[0] == f"add chain ip {FILTER_TABLE} extra"
    await b2.reconcile(peers_of(moved, xl))
    lines = read_generation(monitor)
    assert lines[-1].startswith("# new generation")
    assert not any(line.startswith("# new generation") for line in lines[:-1])
    assert f"add element ip {FILTER_TABLE} peers {{ 192.168.93.66 }}" in lines
    assert f"delete table ip {FILTER_TABLE}" in lines
    proc.kill()
    proc.wait(timeout=10)


def read_generation(monitor: Lines) -> list[str]:
    """`nft monitor` lines up to and including the next "# new generation" line (bounded)."""
    lines: list[str] = []
    while True:
        lines.append(monitor.line())
        if lines[-1].startswith("# new generation"):
            return lines


async def test_restart_with_the_filter_in_place_changes_nothing(
    world: World, made: list[VxlanBackend]
) -> None:
    """A restarted daemon (a new backend over the same kernel state) finds the table right and
    runs no transaction: the set is never empty or rebuilt across a restart."""
    await started_world(world, made, FilterPeers=True)
    again = VxlanBackend(cfg(FilterPeers=True), world.h2.ext, netns=world.h2.ns.name)
    made.append(again)
    await again.prepare()
    await again.start(world.leases["h2"])
    await again.reconcile(peers_of(world.leases["h1"]))
    assert again.last.filter is not None
    assert again.last.filter.transactions == 0
    assert not again.last.filter.created and not again.last.filter.rebuilt


async def test_port_change_rewrites_the_rule(world: World, made: list[VxlanBackend]) -> None:
    """A restart with another Port: the rule is rewritten for it, elements and counter kept."""
    b2 = await started_world(world, made, FilterPeers=True)
    world.inject_from_x("x", count=2)
    assert wait_dropped(b2, 2) == 2
    moved = VxlanBackend(cfg(FilterPeers=True, Port=4789), world.h2.ext, netns=world.h2.ns.name)
    made.append(moved)
    await moved.prepare()
    await moved.start(world.leases["h2"])
    await moved.reconcile(peers_of(world.leases["h1"]))
    assert moved.last.filter is not None and moved.last.filter.rebuilt
    rules = [
        i["rule"]
        for i in nft_json(world.h2.ns, "list", "chain", "ip", FILTER_TABLE, "input")["nftables"]
        if "rule" in i
    ]
    assert [r["expr"][0]["match"]["right"] for r in rules] == [4789]
    assert filter_elements(world.h2.ns) == {"192.168.93.1"}
    assert dropped(moved) == 2


async def test_nft_missing_is_a_clear_error(
    world: World, made: list[VxlanBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the nft command, FilterPeers fails the pass with an error naming the fix, while
    a backend without the option starts as before."""
    b2 = await started_world(world, made, FilterPeers=True)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(nftset, "NFT_FALLBACKS", ())
    with pytest.raises(BackendError, match=r"FilterPeers.*apt-get install nftables"):
        await b2.reconcile(peers_of(world.leases["h1"]))
    off = VxlanBackend(cfg(), world.h2.ext, netns=world.h2.ns.name)
    made.append(off)
    await off.prepare()


async def test_only_valid_vxlan_leases_are_admitted(world: World, made: list[VxlanBackend]) -> None:
    """Leases that the data path skips are not admitted either: another backend type with x's
    PublicIP, a vxlan lease of x without a usable VtepMAC, and leases whose PublicIP is our
    own. Odd but well-formed PublicIPs (0.0.0.0, broadcast, multicast, loopback) go into the
    set like any other address and do not break the transaction."""
    b2 = await started_world(world, made, FilterPeers=True)
    h1, h2 = world.leases["h1"], world.leases["h2"]
    x_ip = IPv4Address("192.168.93.66")

    def other(n: int, ip: IPv4Address, btype: str, data: dict[str, Any] | None) -> Lease:
        return Lease(IPv4Network(f"10.5.{n}.0/24"), LeaseAttrs(ip, None, btype, data))

    skipped = [
        other(20, x_ip, "udp", None),
        other(21, x_ip, "host-gw", None),
        other(22, x_ip, "vxlan", None),
        other(23, x_ip, "vxlan", {"VtepMAC": "ff:ff:ff:ff:ff:ff"}),
        other(24, x_ip, "vxlan", {"VtepMAC": 12}),
        other(25, x_ip, "vxlan", {"VtepMAC": "0a:00:00:00:00:zz"}),
        other(26, h2.attrs.public_ip, "vxlan", {"VtepMAC": "0a:00:00:00:00:26"}),
    ]
    odd = {
        other(30 + i, IPv4Address(ip), "vxlan", {"VtepMAC": f"0a:00:00:00:01:{i:02x}"})
        for i, ip in enumerate(["0.0.0.0", "255.255.255.255", "224.0.0.1", "127.0.0.1"])
    }
    everything = peers_of(h1, *skipped, *odd)
    await b2.reconcile(everything)
    assert filter_elements(world.h2.ns) == {"192.168.93.1"} | {
        str(le.attrs.public_ip) for le in odd
    }
    for lease in skipped:  # one by one, as lease events
        await b2.reconcile(peers_of(h1, lease), {lease.subnet, *(le.subnet for le in odd)})
        assert filter_elements(world.h2.ns) == {"192.168.93.1"}, lease
    world.inject_from_x("still-out", count=2)
    assert wait_dropped(b2, 2) == 2


def test_nft_accepts_the_generated_scripts(lab: NetnsLab) -> None:
    """The pure scripts are valid nft input for the installed nftables (`nft -c`: checked by
    the kernel, nothing committed) and, applied, give the listing parse_table reads back."""
    ns = lab.netns("n")
    spec = nftset.PortFilter("overlay_t", 8472, "a test filter")
    peers = {IPv4Address(f"10.{i // 250}.{i % 250}.1") for i in range(2500)}
    script = nftset.table_script(spec, peers, counter=nftset.Counter(7, 700), replace=True)
    for check in (["-c"], []):
        subprocess.run(
            ns.exec_cmd("nft", *check, "-f", "-"), input=script.encode(), check=True, timeout=30
        )
    state = nftset.parse_table(spec, ns.run("nft", "-j", "list", "table", "ip", "overlay_t"))
    assert state == nftset.TableState(frozenset(peers), nftset.Counter(7, 700), ())
