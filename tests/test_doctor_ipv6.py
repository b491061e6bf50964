"""`overlayctl doctor`'s IPv6 peer probe without a lab: the ICMPv6 echo codec (property tests),
the probe against a real kernel in a throwaway namespace (answers, silence, a source address we
do not have), and which families and addresses each backend probes."""

from __future__ import annotations

import json
import struct
import sys
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.doctor import echo6_request, parse_echo6_reply, ping, probe_families
from subnetmgr.model import NO_IPV4, Lease, LeaseAttrs, NetworkConfig
from tests.netns import NetnsLab, netns_lab

lab = pytest.fixture(netns_lab, name="lab")
u16 = st.integers(0, 0xFFFF)


@given(u16, u16, st.binary(max_size=64))
def test_echo6_request_and_its_reply(ident: int, seq: int, payload: bytes) -> None:
    request = echo6_request(ident, seq, payload)
    assert struct.unpack_from("!BBHHH", request) == (128, 0, 0, ident, seq)
    assert request[8:] == payload
    assert parse_echo6_reply(request) is None  # a request is not an answer
    # The peer's kernel answers with type 129 and everything after the checksum echoed back.
    reply = b"\x81\x00\x12\x34" + request[4:]
    assert parse_echo6_reply(reply) == ident
    assert parse_echo6_reply(b"\x81\x01" + reply[2:]) is None  # code 1: not an echo reply
    assert parse_echo6_reply(reply[:7]) is None


@given(st.binary(max_size=80))
def test_echo6_reply_any_bytes(data: bytes) -> None:
    got = parse_echo6_reply(data)
    assert got is None or 0 <= got <= 0xFFFF
    if got is not None:
        assert data[0] == 129 and len(data) >= 8


PING6_IN_NS = """
import asyncio, json, sys
from ipaddress import IPv6Address
from overlay.doctor import ping
src = IPv6Address(sys.argv[1]) if sys.argv[1] != "-" else None
try:
    rtts = asyncio.run(ping(src, [IPv6Address(a) for a in sys.argv[2:]], 1.0))
except OSError as e:
    print(json.dumps({"error": e.errno}))
else:
    print(json.dumps({str(k): v for k, v in rtts.items()}))
"""


@pytest.mark.root
def test_ping6_against_a_real_kernel(lab: NetnsLab) -> None:
    """In a throwaway namespace: ::1 and fd77::1 (on lo) answer, from our bound source too, each
    reply matched to its target on one socket (the kernel fills the ICMPv6 checksum: a wrong one
    would go unanswered); fd77:0:0:1::2, routed onto lo but nobody's, and fd78::1 without a
    route never answer; binding an address we do not have is an OSError."""
    ns = lab.netns("ping6")
    ns.ip("-6", "addr", "add", "fd77::1/128", "dev", "lo", "nodad")
    ns.ip("-6", "route", "add", "fd77:0:0:1::/64", "dev", "lo")
    got = json.loads(ns.run(sys.executable, "-c", PING6_IN_NS, "-", "::1", "fd77::1",
                            "fd77:0:0:1::2", "fd78::1"))  # fmt: skip
    assert got["::1"] is not None and got["fd77::1"] is not None
    assert got["fd77:0:0:1::2"] is None and got["fd78::1"] is None
    got = json.loads(ns.run(sys.executable, "-c", PING6_IN_NS, "fd77::1", "::1"))
    assert got["::1"] is not None
    got = json.loads(ns.run(sys.executable, "-c", PING6_IN_NS, "fd79::1", "::1"))
    assert "error" in got


async def test_ping_of_no_targets() -> None:
    assert await ping(None, list[IPv6Address](), 0.1) == {}


def config(doc: str) -> NetworkConfig:
    return NetworkConfig.from_json(doc)


ONLY6 = '"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd10:1::/48"'
DUAL = '"Network": "10.1.0.0/16", "EnableIPv6": true, "IPv6Network": "fd10:1::/48"'


def lease(dual: bool, n: int = 1) -> Lease:
    sub4 = IPv4Network(f"10.1.{n}.0/24") if dual else NO_IPV4
    public = IPv4Address(f"198.18.0.{n}" if dual else "0.0.0.0")
    return Lease(sub4, LeaseAttrs(public, IPv6Address(f"fd00::{n}"), "vxlan"),
                 IPv6Network(f"fd10:1:0:{n}::/64"))  # fmt: skip


def test_families_of_an_ipv6_only_network() -> None:
    own, peer = lease(False), lease(False, 2)
    (v6,) = probe_families(config(f'{{{ONLY6}, "Backend": {{"Type": "vxlan", "VNI": 4}}}}'), own)
    assert (v6.version, v6.src, v6.port) == (6, IPv6Address("fd10:1:0:1::"), 8472)
    assert v6.how == "through flannel-v6.4 (udp 8472)"
    assert v6.target(peer) == IPv6Address("fd10:1:0:2::") and v6.host(peer) == peer.attrs.address
    assert v6.name(peer) == "peer fd10:1:0:2::/64"
    assert "ip6tables -I INPUT -p udp --dport 8472 -j ACCEPT" in v6.fix(peer)
    assert "an ICMPv6 echo" == v6.echo
    (gw,) = probe_families(config(f'{{{ONLY6}, "Backend": {{"Type": "host-gw"}}}}'), own)
    assert (gw.version, gw.src, gw.port) == (6, None, 0)
    assert gw.target(peer) == IPv6Address("fd00::2") and "forwarding" in gw.fix(peer)


def test_families_of_dual_stack_and_ipv4() -> None:
    own, peer = lease(True), lease(True, 2)
    v4, v6 = probe_families(config(f'{{{DUAL}, "Backend": {{"Type": "vxlan"}}}}'), own)
    assert (v4.version, v4.src, v4.how) == (4, IPv4Address("10.1.1.0"),
                                            "through flannel.1 (udp 8472)")  # fmt: skip
    assert v4.target(peer) == IPv4Address("10.1.2.0") and v4.name(peer) == "peer 10.1.2.0/24"
    assert v4.target(lease(False, 3)) is None  # an IPv6-only lease has no IPv4 to probe
    assert v6.target(peer) == IPv6Address("fd10:1:0:2::") and v6.host(peer) == IPv6Address(
        "fd00::2"
    )
    v4, v6 = probe_families(config(f'{{{DUAL}, "Backend": {{"Type": "host-gw"}}}}'), own)
    assert (v4.target(peer), v6.target(peer)) == (IPv4Address("198.18.0.2"),
                                                  IPv6Address("fd00::2"))  # fmt: skip
    (udp,) = probe_families(config('{"Network": "10.1.0.0/16", "Backend": {"Type": "udp"}}'), own)
    assert (udp.version, udp.port, udp.how) == (4, 8285, "through flannel0 (udp 8285)")
