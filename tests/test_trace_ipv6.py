"""overlay.trace over IPv6, without root: VXLAN over an IPv6 underlay and plain IPv6 (host-gw)
frames built with scapy decode to the fields they were built with (extension headers too); any
bytes give an IPv6 packet or a typed reason; SRC and DST found by the leases' IPv6 subnets
(dual stack and IPv6-only); the verdict over IPv6."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet, Raw

from overlay.trace import (
    LINKTYPE_ETHERNET,
    LINKTYPE_RAW,
    Decoded,
    IPInfo,
    Path,
    Point,
    TraceError,
    Undecodable,
    decode_frame,
    decode_ipv6,
    path_from,
    verdict,
)
from subnetmgr.model import NO_IPV4, Lease, LeaseAttrs, NetworkConfig

addresses6 = st.integers(1, 2**128 - 1).map(lambda n: str(IPv6Address(n)))
ports = st.integers(1, 65535)
# Addresses given: scapy would otherwise look the destination MAC up on a real network.
ETHER = Ether(src="02:00:00:00:00:03", dst="02:00:00:00:00:04")
hlims = st.integers(0, 255)
extensions = st.lists(st.sampled_from(["hbh", "dst", "frag"]), max_size=3)


def _with_extensions(names: list[str], upper: Packet) -> Packet:
    """`upper` behind these extension headers (a fragment header at offset 0: first fragment)."""
    made = {"hbh": IPv6ExtHdrHopByHop, "dst": IPv6ExtHdrDestOpt, "frag": IPv6ExtHdrFragment}
    for name in reversed(names):
        upper = made[name]() / upper
    return upper


def vxlan6_frame(
    o_src: str, o_dst: str, o_hlim: int, sport: int, vni: int, i_src: str, i_dst: str,
    i_hlim: int, i_sport: int, i_dport: int, payload: bytes, ext: list[str] = [],  # noqa: B006
) -> bytes:  # fmt: skip
    inner = (Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
             / IPv6(src=i_src, dst=i_dst, hlim=i_hlim)
             / _with_extensions(ext, UDP(sport=i_sport, dport=i_dport) / Raw(payload)))  # fmt: skip
    outer = (ETHER / IPv6(src=o_src, dst=o_dst, hlim=o_hlim) / UDP(sport=sport, dport=8472)
             / VXLAN(vni=vni, flags=0x08) / inner)  # fmt: skip
    return bytes(outer)


@given(addresses6, addresses6, hlims, ports, st.integers(0, 2**24 - 1), addresses6, addresses6,
       hlims, ports, ports, st.binary(max_size=64), extensions)  # fmt: skip
def test_vxlan_over_ipv6_decodes_to_what_was_built(
    o_src: str, o_dst: str, o_hlim: int, sport: int, vni: int, i_src: str, i_dst: str,
    i_hlim: int, i_sport: int, i_dport: int, payload: bytes, ext: list[str],
) -> None:  # fmt: skip
    frame = vxlan6_frame(o_src, o_dst, o_hlim, sport, vni, i_src, i_dst, i_hlim, i_sport,
                         i_dport, payload, ext)  # fmt: skip
    got = decode_frame("source", 1.0, LINKTYPE_ETHERNET, frame, "vxlan", 8472)
    assert got.error is None and got.encap == "vxlan" and got.vni == vni
    assert got.outer is not None and got.inner is not None
    assert got.outer.version == got.inner.version == 6
    assert (got.outer.src, got.outer.dst, got.outer.ttl, got.outer.sport, got.outer.dport) == (
        o_src, o_dst, o_hlim, sport, 8472)  # fmt: skip
    assert got.outer.length == len(frame) - 14 and got.size == len(frame)
    assert (got.inner.src, got.inner.dst, got.inner.ttl, got.inner.proto) == (
        i_src, i_dst, i_hlim, 17)  # fmt: skip
    assert (got.inner.sport, got.inner.dport) == (i_sport, i_dport)
    assert got.inner.length == 40 + 8 * len(ext) + 8 + len(payload)
    # IPv6 header + UDP + VXLAN + Ethernet around the inner packet.
    assert got.outer.length == got.inner.length + 70
    assert f"[{i_src}]:{i_sport} > [{i_dst}]:{i_dport} udp hlim {i_hlim}" in got.inner.brief()


@given(addresses6, addresses6, hlims, st.integers(0, 0xFFFF), st.binary(max_size=64),
       extensions)  # fmt: skip
def test_plain_ipv6_decodes_to_what_was_built(
    src: str, dst: str, hlim: int, seq: int, payload: bytes, ext: list[str]
) -> None:
    packet = IPv6(src=src, dst=dst, hlim=hlim) / _with_extensions(
        ext, ICMPv6EchoRequest(id=7, seq=seq, data=payload)
    )
    for linktype, frame in ((LINKTYPE_ETHERNET, bytes(ETHER / packet)),
                            (LINKTYPE_RAW[0], bytes(packet))):  # fmt: skip
        got = decode_frame("delivered", 1.0, linktype, frame, "none", 0)
        assert got.error is None and got.outer is None and got.inner is not None
        assert (got.inner.src, got.inner.dst, got.inner.ttl, got.inner.proto) == (
            src, dst, hlim, 58)  # fmt: skip
        assert got.inner.icmp == (128, 0) and got.inner.sport is None
        assert got.inner.length == len(bytes(packet))


def test_a_later_fragment_has_no_ports_and_the_ident_follows_the_payload() -> None:
    later = (
        IPv6(src="fd00::1", dst="fd00::2")
        / IPv6ExtHdrFragment(offset=10, nh=17)
        / Raw(b"\x01\x02\x03\x04" * 4)
    )
    got = decode_ipv6(bytes(later))
    assert (got.proto, got.sport, got.dport) == (17, None, None)
    one = decode_ipv6(bytes(IPv6(src="fd00::1", dst="fd00::2", hlim=64) / UDP() / Raw(b"a")))
    again = decode_ipv6(bytes(IPv6(src="fd00::1", dst="fd00::2", hlim=62) / UDP() / Raw(b"a")))
    other = decode_ipv6(bytes(IPv6(src="fd00::1", dst="fd00::2", hlim=64) / UDP() / Raw(b"b")))
    assert one.ident == again.ident != other.ident


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x60" + b"\0" * 10, "truncated IPv6 header"),
        (b"\x40" + b"\0" * 50, "not IPv6: version 4"),
        (bytes(IPv6(plen=0) / Raw(b"x" * 8))[:48], "payload length 0"),
        (bytes(IPv6() / Raw(b"x" * 8))[:45], "truncated IPv6 packet"),
        (bytes(IPv6(nh=0, plen=8) / Raw(b"\x11\x05" + b"\0" * 6)), "extension header 0 of 48"),
        (bytes(IPv6(nh=60, plen=4) / Raw(b"\x11\x00\0\0")), "truncated IPv6 extension"),
        (bytes(IPv6(nh=44, plen=4) / Raw(b"\x11\x00\0\0")), "truncated IPv6 fragment"),
        (bytes(IPv6(nh=0, plen=80) / Raw(b"\x00\x00" + b"\0" * 78)), "more than 8 IPv6 ext"),
        (bytes(IPv6(nh=17, plen=4) / Raw(b"\0" * 4)), "truncated udp header"),
    ],
)
def test_hostile_ipv6_is_a_typed_error(data: bytes, why: str) -> None:
    with pytest.raises(Undecodable, match=why):
        decode_ipv6(data)


@given(st.binary(max_size=300))
def test_any_bytes_give_an_ipv6_packet_or_a_typed_skip(data: bytes) -> None:
    for candidate in (data, b"\x60" + data[1:]):
        try:
            got = decode_ipv6(candidate)
        except Undecodable:
            continue
        assert got.version == 6 and IPv6Address(got.src) and 0 <= got.ttl <= 255
        assert 40 < got.length <= len(candidate)


@given(st.binary(max_size=200), st.sampled_from(["vxlan", "none"]))
def test_any_bytes_on_the_vxlan_port_over_ipv6(payload: bytes, encap: str) -> None:
    frame = bytes(ETHER / IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=8472)
                  / Raw(payload))  # fmt: skip
    got = decode_frame("destination", 1.0, LINKTYPE_ETHERNET, frame, encap, 8472)
    assert isinstance(got, Decoded)
    if encap == "vxlan":
        assert got.outer is not None and got.outer.dst == "fd00::2"
        assert got.error is not None or got.note is not None or got.inner is not None
        if got.inner is not None:
            ip_address(got.inner.src)
    else:
        assert got.inner is not None and got.inner.dport == 8472


@given(st.integers(0, 300))
def test_every_truncation_of_vxlan_over_ipv6_is_a_typed_error(cut: int) -> None:
    frame = vxlan6_frame("fd00::1", "fd00::2", 64, 5000, 1, "fd10:1:0:1::2", "fd10:1:0:2::2",
                         63, 40000, 9, b"x" * 40, ["hbh"])  # fmt: skip
    cut = min(cut, len(frame) - 1)
    got = decode_frame("source", 1.0, LINKTYPE_ETHERNET, frame[:cut], "vxlan", 8472)
    assert got.error is not None and got.inner is None
    assert "truncated" in got.error or "payload length 0" in got.error


# ---------------------------------------------------------------------- leases and verdict

DUAL_VXLAN = NetworkConfig.from_json(
    '{"Network": "10.1.0.0/16", "EnableIPv6": true, "IPv6Network": "fd10:1::/48", '
    '"Backend": {"Type": "vxlan"}}'
)
ONLY6 = NetworkConfig.from_json(
    '{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd10:1::/48", '
    '"Backend": {"Type": "host-gw"}}'
)
UDP_CONFIG = NetworkConfig.from_json('{"Network": "10.1.0.0/16", "Backend": {"Type": "udp"}}')


def leases(dual: bool) -> list[Lease]:
    out = []
    for n in (1, 2):
        sub4 = IPv4Network(f"10.1.{n}.0/24") if dual else NO_IPV4
        public = IPv4Address(f"198.18.0.{n}" if dual else "0.0.0.0")
        attrs = LeaseAttrs(public, IPv6Address(f"fd00::{n}"), "vxlan" if dual else "host-gw")
        out.append(Lease(sub4, attrs, IPv6Network(f"fd10:1:0:{n}::/64")))
    return out


def test_path_by_ipv6_subnet_in_dual_stack_and_ipv6_only() -> None:
    src, dst = IPv6Address("fd10:1:0:1::5"), IPv6Address("fd10:1:0:2::7")
    path = path_from(DUAL_VXLAN, leases(True), src, dst)
    assert (path.src_host, path.dst_host) == (IPv6Address("fd00::1"), IPv6Address("fd00::2"))
    assert (path.src_subnet, path.dst_subnet) == (
        IPv6Network("fd10:1:0:1::/64"), IPv6Network("fd10:1:0:2::/64"))  # fmt: skip
    assert (path.encap, path.port, path.vni, path.device) == ("vxlan", 8472, 1, "flannel-v6.1")
    v4 = path_from(DUAL_VXLAN, leases(True), IPv4Address("10.1.1.5"), IPv4Address("10.1.2.5"))
    assert (v4.src_host, v4.device) == (IPv4Address("198.18.0.1"), "flannel.1")
    path = path_from(ONLY6, leases(False), src, dst)
    assert (path.dst_host, path.encap, path.port) == (IPv6Address("fd00::2"), "none", 0)


@pytest.mark.parametrize(
    ("config", "dual", "src", "dst", "why"),
    [
        # An IPv6-only lease's IPv4 part, 0.0.0.0/0, holds no IPv4 container.
        (ONLY6, False, "10.1.1.5", "10.1.2.5", "10.1.1.5 is in no usable lease's subnet"),
        (DUAL_VXLAN, True, "10.1.1.5", "fd10:1:0:2::7", "not of one address family"),
        (DUAL_VXLAN, True, "fd10:1:0:1::5", "fd10:1:0:1::6", "never crosses the underlay"),
        (DUAL_VXLAN, True, "fd10:1:0:1::5", "fd10:1:0:9::6", "no usable lease's IPv6 subnet"),
        (UDP_CONFIG, True, "fd10:1:0:1::5", "fd10:1:0:2::6", "carries IPv4 only"),
    ],
)
def test_path_refusals(config: NetworkConfig, dual: bool, src: str, dst: str, why: str) -> None:
    with pytest.raises(TraceError, match=why):
        path_from(config, leases(dual), ip_address(src), ip_address(dst))


def test_a_lease_without_public_ipv6_is_named() -> None:
    lone = [Lease(x.subnet, LeaseAttrs(x.attrs.public_ip, None, "vxlan"), x.ipv6_subnet)
            for x in leases(True)]  # fmt: skip
    with pytest.raises(TraceError, match="has no PublicIPv6"):
        path_from(DUAL_VXLAN, lone, IPv6Address("fd10:1:0:1::5"), IPv6Address("fd10:1:0:2::7"))


def test_verdict_over_ipv6() -> None:
    path = path_from(DUAL_VXLAN, leases(True), IPv6Address("fd10:1:0:1::5"),
                     IPv6Address("fd10:1:0:2::7"))  # fmt: skip

    def seen(stage: str, ident: int) -> Decoded:
        inner = IPInfo("fd10:1:0:1::5", "fd10:1:0:2::7", 17, 63, 60, ident, 1, 9, version=6)
        return Decoded(stage, 1.0, 100, inner=inner)

    points: list[Any] = []
    for stage, idents in (("source", [1, 2]), ("destination", [1]), ("delivered", [])):
        point = Point(stage, None, "eth0", "")
        point.packets = [seen(stage, i) for i in idents]
        points.append(point)
    result = verdict(points, path)
    assert (result.last_seen, result.forward, result.reached_last) == ("destination", 2, False)
    assert result.text.startswith("fd10:1:0:1::5 -> fd10:1:0:2::7: last seen: reached")
    assert isinstance(path, Path)
