"""--ip-blackhole-route in a throwaway namespace: the route as `ip -j route` shows it, kept in
place (re-added after a deletion by hand), idempotent, moved on a new lease, left alone when a
bridge's route covers the subnet, and what traffic to an unassigned address of the subnet does;
plus the parser of `ip -j route` output against hostile text."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.blackhole import BlackholeRoute, routes_for
from tests.netns import Netns, NetnsLab, netns_lab

lab = pytest.fixture(netns_lab, name="lab")

LEASE = IPv4Network("10.50.3.0/24")
LEASE6 = IPv6Network("fd00:50:0:3::/64")
SEND = """
import socket, sys
host = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b"x", (host, 9))
    print("sent")
except OSError as e:
    print(e.errno)
"""


@pytest.fixture
def host(lab: NetnsLab) -> Iterator[Netns]:
    """A host with a default route (IPv4 and IPv6) through a gateway namespace."""
    h, gw = lab.netns("bhhost"), lab.netns("bhgw")
    h_if, _ = lab.veth(h, gw, "192.168.78.1/24", "192.168.78.2/24")
    h.ip("route", "add", "default", "via", "192.168.78.2")
    h.ip("addr", "add", "fd78::1/64", "dev", h_if, "nodad")
    h.ip("-6", "route", "add", "default", "via", "fd78::2")
    yield h


def routes(ns: Netns, subnet: IPv4Network | IPv6Network) -> list[dict[str, object]]:
    out = ns.run("ip", f"-{subnet.version}", "-j", "route", "show", "exact", str(subnet))
    return [{k: r[k] for k in ("type", "dst") if k in r} for r in json.loads(out or "[]")]


def send(ns: Netns, addr: str) -> str:
    return ns.run("/usr/bin/python3", "-c", SEND, addr).strip()


@pytest.mark.root
async def test_blackhole_route_for_our_subnets_kept_in_place(host: Netns) -> None:
    prefix = ("ip", "netns", "exec", host.name)
    # Without it, traffic to an unassigned address of our subnet follows the default route.
    assert send(host, "10.50.3.77") == "sent"
    bh = BlackholeRoute([LEASE, LEASE6], prefix=prefix)
    assert await bh.ensure() is True
    assert routes(host, LEASE) == [{"type": "blackhole", "dst": "10.50.3.0/24"}]
    assert routes(host, LEASE6) == [{"type": "blackhole", "dst": "fd00:50:0:3::/64"}]
    assert send(host, "10.50.3.77") == "22"  # EINVAL: the kernel refuses, nothing leaves
    assert await bh.ensure() is False  # idempotent
    assert len(routes(host, LEASE)) == 1

    host.ip("route", "del", "blackhole", str(LEASE))
    assert await bh.ensure() is True  # put back by the next resync
    assert routes(host, LEASE) == [{"type": "blackhole", "dst": "10.50.3.0/24"}]

    # A new lease (and no IPv6 subnet any more): the new subnet gets the route, the old
    # subnets lose ours.
    bh.set_subnets([IPv4Network("10.50.9.0/24")])
    assert await bh.ensure() is True
    assert routes(host, LEASE) == [] and routes(host, LEASE6) == []
    assert routes(host, IPv4Network("10.50.9.0/24"))[0]["type"] == "blackhole"
    await bh.remove()
    assert routes(host, IPv4Network("10.50.9.0/24")) == []
    await bh.remove()  # twice is fine


@pytest.mark.root
async def test_a_bridge_route_covering_the_subnet_is_left_alone(lab: NetnsLab, host: Netns) -> None:
    other = lab.netns("bhpod")
    h_if, _ = lab.veth(host, other, "10.50.3.1/24", "10.50.3.2/24")  # like cni0's address
    bh = BlackholeRoute([LEASE], prefix=("ip", "netns", "exec", host.name))
    assert await bh.ensure() is False
    assert routes(host, LEASE) == [{"dst": "10.50.3.0/24"}]  # the kernel's, untouched
    host.ip("link", "set", h_if, "down")  # the bridge goes away: now the blackhole is needed
    assert await bh.ensure() is True
    assert routes(host, LEASE) == [{"type": "blackhole", "dst": "10.50.3.0/24"}]
    assert send(host, "10.50.3.2") == "22"

    # The bridge comes back: its route lands behind the blackhole, which would win; the next
    # resync takes the blackhole out so the pod is reachable again.
    host.ip("link", "set", h_if, "up")
    assert routes(host, LEASE)[0]["type"] == "blackhole" and len(routes(host, LEASE)) == 2
    assert await bh.ensure() is False
    assert routes(host, LEASE) == [{"dst": "10.50.3.0/24"}]
    assert send(host, "10.50.3.2") == "sent"
    await bh.remove()


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.one_of(st.text(), ANY_JSON.map(json.dumps)))
def test_routes_for_any_text_is_a_list_of_objects(text: str) -> None:
    """Odd `ip -j` output never raises; only JSON objects in a top-level list come back."""
    got = routes_for(text)
    assert isinstance(got, list) and all(isinstance(r, dict) for r in got)
    try:
        doc = json.loads(text)
    except ValueError:
        return
    expected = [r for r in doc if isinstance(r, dict)] if isinstance(doc, list) else []
    assert got == expected


def test_routes_for_deep_nesting() -> None:
    assert routes_for("[" * 100_000 + "]" * 100_000) == []
    assert routes_for("") == []
    assert routes_for(subprocess.list2cmdline(["x"])) == []
