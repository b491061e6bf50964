"""Real traffic through a host namespace with the traffic rules of both modes (iptables and
nftables), both families: two "containers" in overlay subnets routed by a "host" namespace,
and an "outside" namespace beyond it.

    c1 (lease 10.50.3.2) --- host --- c2 (another subnet of the network, 10.50.4.2)
                              |
                            outside (192.168.77.2; knows no route back to the overlay)

Forward rules: with FORWARD's policy DROP on the host (docker sets it), c1 -> c2 arrives with
the rules and is dropped without them. Masquerade: c1 -> outside arrives from the host's
address, c1 -> c2 keeps its source (no NAT inside the overlay). A receiver in the target
namespace prints the source address of the first datagram (or "nothing" after a few seconds).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

import pytest

from overlay.masq import IptablesRules, TrafficRules
from overlay.nftrules import NftRules
from tests.netns import Netns, NetnsLab, netns_lab

pytestmark = pytest.mark.root

lab = pytest.fixture(netns_lab, name="lab")

PY = "/usr/bin/python3"  # starts in ~15 ms (the pyenv shim on PATH costs 70-130 ms)
RECEIVE = """
import socket, sys
host, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
print("bound", flush=True)
s.settimeout(wait)
try:
    print(s.recvfrom(100)[1][0], flush=True)
except TimeoutError:
    print("nothing", flush=True)
"""
SEND = """
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(200):  # until killed: the first ones may wait for neighbour discovery
    s.sendto(b"probe", (host, port))
    time.sleep(0.1)
"""
PORT = 7070
ARRIVAL_WAIT, NOTHING_WAIT = 15.0, 3.0
"""Seconds a receiver waits for a datagram that should arrive (it comes at once, with IPv6
after neighbour discovery; the margin is for a loaded machine) and for one that should be
dropped (it never comes; every such check follows a passing one on the same path, so the
neighbours are known). No speed is asserted."""


@dataclass
class Site:
    host: Netns
    c1: Netns
    c2: Netns
    outside: Netns
    version: int
    network: IPv4Network | IPv6Network
    lease: IPv4Network | IPv6Network
    c1_ip: str
    c2_ip: str
    outside_ip: str
    host_outside_ip: str

    def rules(self, kind: str, *, masq: bool = True, forward: bool = True) -> TrafficRules:
        prefix = ("ip", "netns", "exec", self.host.name)
        v4net, v4lease = IPv4Network("10.50.0.0/16"), IPv4Network("10.50.3.0/24")
        ipv6 = None
        if self.version == 6:
            assert isinstance(self.network, IPv6Network) and isinstance(self.lease, IPv6Network)
            ipv6 = (self.network, self.lease)
        if kind == "nftables":
            return NftRules(v4net, v4lease, ipv6=ipv6, masq=masq, forward=forward, prefix=prefix)
        return IptablesRules(v4net, v4lease, ipv6=ipv6, masq=masq, forward=forward,
                             prefix=prefix)  # fmt: skip

    def source_seen(self, src: Netns, target: Netns, addr: str, *, dropped: bool = False) -> str:
        """What `target` sees as the source of a datagram from `src` to `addr` ("nothing");
        `dropped`: the caller expects nothing, so the receiver waits only NOTHING_WAIT."""
        wait = NOTHING_WAIT if dropped else ARRIVAL_WAIT
        receiver = target.popen([PY, "-c", RECEIVE, addr, str(PORT), str(wait)],
                                stdout=subprocess.PIPE)  # fmt: skip
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == b"bound"
        sender = src.popen([PY, "-c", SEND, addr, str(PORT)])
        try:
            out, _ = receiver.communicate(timeout=30)
        finally:
            sender.kill()
            sender.wait()
        return out.decode().strip()


def build(lab: NetnsLab, version: int) -> Site:
    host, c1, c2, outside = (lab.netns(r) for r in ("host", "c1", "c2", "out"))
    net: IPv4Network | IPv6Network
    lease: IPv4Network | IPv6Network
    if version == 4:
        net, lease, plen = IPv4Network("10.50.0.0/16"), IPv4Network("10.50.3.0/24"), 24
        a = {"h1": "10.50.3.1", "c1": "10.50.3.2", "h2": "10.50.4.1", "c2": "10.50.4.2",
             "ho": "192.168.77.1", "out": "192.168.77.2"}  # fmt: skip
        host.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    else:
        net, lease, plen = IPv6Network("fd00:50::/56"), IPv6Network("fd00:50:0:3::/64"), 64
        a = {"h1": "fd00:50:0:3::1", "c1": "fd00:50:0:3::2", "h2": "fd00:50:0:4::1",
             "c2": "fd00:50:0:4::2", "ho": "fd77::1", "out": "fd77::2"}  # fmt: skip
        host.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1",
                 "net.ipv6.conf.default.forwarding=1")  # fmt: skip
    links = [(c1, "c1", "h1"), (c2, "c2", "h2"), (outside, "out", "ho")]
    for ns, mine, hosts in links:
        h_if, ns_if = lab.veth(host, ns)
        host.ip("addr", "add", f"{a[hosts]}/{plen}", "dev", h_if, *(["nodad"] * (version == 6)))
        ns.ip("addr", "add", f"{a[mine]}/{plen}", "dev", ns_if, *(["nodad"] * (version == 6)))
        if ns is not outside:  # the outside has no route back into the overlay
            ns.ip(f"-{version}", "route", "add", "default", "via", a[hosts])
    return Site(host, c1, c2, outside, version, net, lease, a["c1"], a["c2"], a["out"], a["ho"])


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def site(request: pytest.FixtureRequest, lab: NetnsLab) -> Iterator[Site]:
    yield build(lab, request.param)  # the namespaces (and every rule in them) die with the lab


def forward_drop(site: Site) -> None:
    binary = "iptables" if site.version == 4 else "ip6tables"
    site.host.run(binary, "-w", "5", "-P", "FORWARD", "DROP")


async def test_forward_rules_carry_overlay_traffic_past_a_drop_policy(site: Site) -> None:
    forward_drop(site)
    rules = site.rules("iptables", masq=False)
    await rules.ensure()
    assert site.source_seen(site.c1, site.c2, site.c2_ip) == site.c1_ip
    assert site.source_seen(site.c2, site.c1, site.c1_ip) == site.c2_ip

    # --iptables-forward-rules=false on the next start: prune takes the chain out, the host's
    # DROP policy applies again.
    off = site.rules("iptables", masq=False, forward=False)
    await off.prune()
    await off.ensure()
    assert site.source_seen(site.c1, site.c2, site.c2_ip, dropped=True) == "nothing"


async def test_nft_forward_chain_cannot_overrule_an_iptables_drop_policy(site: Site) -> None:
    """Documented nftables semantics: an accept ends only its own base chain, so with
    EnableNFTables a DROP policy of iptables' FORWARD still drops overlay traffic."""
    rules = site.rules("nftables", masq=False)
    await rules.ensure()
    assert site.source_seen(site.c1, site.c2, site.c2_ip) == site.c1_ip
    forward_drop(site)
    assert site.source_seen(site.c1, site.c2, site.c2_ip, dropped=True) == "nothing"


@pytest.mark.parametrize("kind", ["iptables", "nftables"])
async def test_masquerade_leaving_the_overlay_but_not_inside_it(site: Site, kind: str) -> None:
    assert site.source_seen(site.c1, site.outside, site.outside_ip) == site.c1_ip  # no rules
    rules = site.rules(kind, masq=True, forward=True)
    assert await rules.ensure() is True
    assert site.source_seen(site.c1, site.outside, site.outside_ip) == site.host_outside_ip
    assert site.source_seen(site.c1, site.c2, site.c2_ip) == site.c1_ip
    await rules.remove()
    assert site.source_seen(site.c1, site.outside, site.outside_ip) == site.c1_ip
