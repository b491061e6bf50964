"""overlay.trace's decoding, without root: frames built with scapy (VXLAN, flannel udp, plain
IP) decode to the fields they were built with; any bytes decode to fields or a typed reason;
pcap streams as tcpdump writes them; the verdict (where a packet was last seen)."""

from __future__ import annotations

import io
from ipaddress import IPv4Address, IPv4Network, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw
from scapy.utils import PcapWriter

from overlay.trace import (
    LINKTYPE_ETHERNET,
    LINKTYPE_RAW,
    Decoded,
    IPv4Info,
    Path,
    Point,
    decode_frame,
    read_pcap,
    verdict,
)

addresses = st.integers(1, 2**32 - 2).map(lambda n: str(IPv4Address(n)))
ports = st.integers(1, 65535)
ttls = st.integers(1, 255)


def vxlan_frame(
    o_src: str, o_dst: str, o_ttl: int, sport: int, vni: int, i_src: str, i_dst: str,
    i_ttl: int, i_sport: int, i_dport: int, payload: bytes,
) -> bytes:  # fmt: skip
    inner = (Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
             / IP(src=i_src, dst=i_dst, ttl=i_ttl) / UDP(sport=i_sport, dport=i_dport)
             / Raw(payload))  # fmt: skip
    outer = (Ether() / IP(src=o_src, dst=o_dst, ttl=o_ttl) / UDP(sport=sport, dport=8472)
             / VXLAN(vni=vni, flags=0x08) / inner)  # fmt: skip
    return bytes(outer)


@given(addresses, addresses, ttls, ports, st.integers(0, 2**24 - 1), addresses, addresses, ttls,
       ports, ports, st.binary(max_size=64))  # fmt: skip
def test_vxlan_frames_decode_to_what_was_built(
    o_src: str, o_dst: str, o_ttl: int, sport: int, vni: int, i_src: str, i_dst: str,
    i_ttl: int, i_sport: int, i_dport: int, payload: bytes,
) -> None:  # fmt: skip
    frame = vxlan_frame(o_src, o_dst, o_ttl, sport, vni, i_src, i_dst, i_ttl, i_sport, i_dport,
                        payload)  # fmt: skip
    got = decode_frame("source", 1.0, LINKTYPE_ETHERNET, frame, "vxlan", 8472)
    assert got.error is None and got.encap == "vxlan" and got.vni == vni
    assert got.outer is not None and got.inner is not None
    assert (got.outer.src, got.outer.dst, got.outer.ttl, got.outer.sport, got.outer.dport) == (
        o_src, o_dst, o_ttl, sport, 8472)  # fmt: skip
    assert got.outer.length == len(frame) - 14 and got.size == len(frame)
    assert (got.inner.src, got.inner.dst, got.inner.ttl, got.inner.proto) == (
        i_src, i_dst, i_ttl, 17)  # fmt: skip
    assert (got.inner.sport, got.inner.dport) == (i_sport, i_dport)
    assert got.inner.length == 28 + len(payload)


@given(addresses, addresses, ttls, st.integers(0, 2**16 - 1), st.binary(max_size=64))
def test_flannel_udp_frames_decode_to_what_was_built(
    i_src: str, i_dst: str, i_ttl: int, ident: int, payload: bytes
) -> None:
    inner = IP(src=i_src, dst=i_dst, ttl=i_ttl, id=ident, proto=47) / Raw(payload)
    frame = bytes(Ether() / IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=8285, dport=8285)
                  / inner)  # fmt: skip
    got = decode_frame("destination", 1.0, LINKTYPE_ETHERNET, frame, "udp", 8285)
    assert got.error is None and got.encap == "udp" and got.vni is None
    assert got.inner is not None
    assert (got.inner.src, got.inner.dst, got.inner.ttl, got.inner.ident, got.inner.proto) == (
        i_src, i_dst, i_ttl, ident, 47)  # fmt: skip
    # The same packet on a TUN device (raw IP, no link header): the delivered point.
    got = decode_frame("delivered", 1.0, LINKTYPE_RAW[0], bytes(inner), "none", 0)
    assert got.outer is None and got.inner is not None and got.inner.src == i_src


@given(st.integers(0, 300), st.sampled_from(["vxlan", "udp"]))
def test_every_truncation_is_a_typed_error(cut: int, encap: str) -> None:
    port = 8472 if encap == "vxlan" else 8285
    if encap == "vxlan":
        frame = vxlan_frame("198.18.0.1", "198.18.0.2", 64, 5000, 1, "10.1.1.2", "10.1.2.2", 63,
                            40000, 9, b"x" * 40)  # fmt: skip
    else:
        frame = bytes(Ether() / IP(src="198.18.0.1", dst="198.18.0.2")
                      / UDP(sport=port, dport=port) / IP(src="10.1.1.2", dst="10.1.2.2")
                      / UDP() / Raw(b"x" * 40))  # fmt: skip
    cut = min(cut, len(frame) - 1)
    got = decode_frame("source", 1.0, LINKTYPE_ETHERNET, frame[:cut], encap, port)
    assert got.error is not None and got.inner is None
    assert "truncated" in got.error


@given(st.binary(max_size=200), st.sampled_from(["vxlan", "udp", "none"]),
       st.sampled_from([LINKTYPE_ETHERNET, LINKTYPE_RAW[0], 113, 228]))  # fmt: skip
def test_any_bytes_decode_or_say_why(data: bytes, encap: str, linktype: int) -> None:
    got = decode_frame("source", 1.0, linktype, data, encap, 8472)
    assert isinstance(got, Decoded) and got.size == len(data)
    assert got.error is None or got.inner is None
    if got.inner is not None:  # whatever decodes is a consistent IPv4 or IPv6 header
        assert ip_address(got.inner.src).version == got.inner.version
        assert 0 <= got.inner.ttl <= 255 and got.inner.length >= 20


@given(st.binary(min_size=0, max_size=300))
def test_garbage_on_the_vxlan_port_is_undecodable_or_vxlan(payload: bytes) -> None:
    frame = bytes(Ether() / IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=1, dport=8472)
                  / Raw(payload))  # fmt: skip
    got = decode_frame("destination", 1.0, LINKTYPE_ETHERNET, frame, "vxlan", 8472)
    assert got.outer is not None and got.encap == "vxlan"
    if len(payload) < 8 or not payload[0] & 0x08:
        assert got.error is not None and got.inner is None
    elif got.error is None and got.note is None:
        assert got.inner is not None and got.vni == int.from_bytes(payload[4:7], "big")


def _pcap(frames: list[bytes], linktype: int = LINKTYPE_ETHERNET) -> bytes:
    buf = io.BytesIO()
    writer = PcapWriter(buf, linktype=linktype, sync=True)
    writer.write_header(None)
    for n, frame in enumerate(frames):
        writer.write_packet(frame, sec=1_700_000_000 + n, usec=0)
    writer.flush()
    return buf.getvalue()


def test_read_pcap_streams_and_hostile_streams() -> None:
    frames = [vxlan_frame("198.18.0.1", "198.18.0.2", 64, 5000, 1, "10.1.1.2", "10.1.2.2", 63,
                          40000, 9, b"probe"), b"\x01\x02"]  # fmt: skip
    data = _pcap(frames)
    got, problem = read_pcap("source", data, "vxlan", 8472)
    assert problem is None and len(got) == 2
    assert got[0].inner is not None and got[0].inner.dst == "10.1.2.2"
    assert got[0].time == 1_700_000_000.0
    assert got[1].error is not None and "truncated Ethernet" in got[1].error
    # Cut inside the first record: what is there is decoded (as truncated), and said to be cut.
    got, problem = read_pcap("source", data[:60], "vxlan", 8472)
    assert len(got) == 1 and got[0].error is not None and "truncated" in got[0].error
    assert problem is not None and "capture cut short" in problem
    assert read_pcap("source", b"", "vxlan", 8472) == ([], None)
    got, problem = read_pcap("source", b"not a pcap at all, surely", "vxlan", 8472)
    assert got == [] and problem is not None and "not a pcap" in problem


@given(st.binary(max_size=400))
def test_read_pcap_of_any_bytes_never_raises(data: bytes) -> None:
    got, problem = read_pcap("source", data, "vxlan", 8472)
    assert isinstance(got, list) and (problem is None or isinstance(problem, str))


PATH = Path(IPv4Address("10.1.1.2"), IPv4Address("10.1.2.2"), IPv4Address("198.18.0.1"),
            IPv4Address("198.18.0.2"), IPv4Network("10.1.1.0/24"), IPv4Network("10.1.2.0/24"),
            "vxlan", "vxlan", 8472, 1)  # fmt: skip


def _seen(stage: str, ident: int, src: str = "10.1.1.2", dst: str = "10.1.2.2") -> Decoded:
    return Decoded(stage, 1.0, 100, inner=IPv4Info(src, dst, 17, 63, 50, ident, 1, 9))


@pytest.mark.parametrize(
    ("seen", "last", "reached_last"),
    [
        ({"source": [1], "destination": [1], "delivered": [1]}, "delivered", True),
        ({"source": [1, 2], "destination": [1, 2], "delivered": []}, "destination", False),
        ({"source": [1], "destination": [], "delivered": []}, "source", False),
        ({"source": [], "destination": [], "delivered": []}, "never", False),
    ],
)
def test_verdict_names_the_last_point_reached(
    seen: dict[str, list[int]], last: str, reached_last: bool
) -> None:
    points = []
    for stage, idents in seen.items():
        point = Point(stage, None, "eth0", "")
        point.packets = [_seen(stage, i) for i in idents]
        point.packets.append(_seen(stage, 99, "10.1.2.2", "10.1.1.2"))  # replies don't count
        points.append(point)
    result = verdict(points, PATH)
    assert (result.last_seen, result.reached_last) == (last, reached_last)
    if last == "destination":
        assert "never delivered towards DST" in result.text and "udp/8472" in result.text
    if last == "never":
        assert "never seen at any point" in result.text
