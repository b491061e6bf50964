"""Pure packet functions of the udp backend, checked against scapy and naive references."""

from __future__ import annotations

import os
import random
import struct
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw, raw

from backends import udp_packet as P
from backends import udp_worker as W
from backends.base import BackendError, ExternalInterface
from backends.udp import UdpBackend
from overlay.health import HealthServer, Metrics
from subnetmgr.model import NetworkConfig
from tests.test_health import http_get


def naive_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def valid_ip_checksum(hdr: bytes) -> bool:
    return naive_sum(hdr) == 0xFFFF


def valid_tcp_checksum(pkt: bytes) -> bool:
    """The receiver's check: pseudo-header + segment sum to 0xFFFF (a checksum of 0x0000 or
    0xFFFF are the same ones'-complement zero, and either passes)."""
    pseudo = pkt[12:20] + b"\0\x06" + struct.pack("!H", len(pkt) - 20)
    return naive_sum(pseudo + pkt[20:]) == 0xFFFF


@pytest.mark.parametrize("size", [0, 1, 2, 3, 19, 20, 21, 1419, 1420, 1421, 4096, 65000])
def test_ones_sum_matches_naive(size: int) -> None:
    rng = random.Random(size)
    for data in (rng.randbytes(size), b"\xff" * size, b"\0" * size):
        assert P.ones_sum(data) == naive_sum(data)
        assert P.ones_sum(memoryview(bytearray(data))) == naive_sum(data)


def test_incremental_update_matches_full_recompute() -> None:
    rng = random.Random(1624)
    for _ in range(2000):
        words = [rng.randrange(0x10000) for _ in range(10)]
        words[5] = 0
        data = struct.pack("!10H", *words)
        hc = naive_sum(data) ^ 0xFFFF
        i = rng.choice([0, 1, 2, 3, 4, 6, 7, 8, 9])
        new = rng.randrange(0x10000)
        words2 = list(words)
        words2[i] = new
        full = naive_sum(struct.pack("!10H", *words2)) ^ 0xFFFF
        inc = P.incremental_update(hc, words[i], new)
        # RFC 1624: both are the same ones'-complement value (0x0000 and 0xFFFF are both zero
        # only for all-zero data, which these random words never are).
        assert inc == full


@pytest.mark.parametrize("ttl", [2, 3, 64, 128, 255])
def test_decrement_ttl_updates_checksum_like_a_full_recompute(ttl: int) -> None:
    rng = random.Random(ttl)
    for _ in range(500):
        hdr = bytearray(
            P.ipv4_header(
                rng.randbytes(4), rng.randbytes(4), rng.randrange(256), rng.randrange(1400), ttl,
                rng.randrange(0x10000),
            )
        )  # fmt: skip
        assert valid_ip_checksum(hdr)
        assert P.decrement_ttl(hdr)
        assert hdr[8] == ttl - 1
        assert valid_ip_checksum(hdr)
        expected = bytearray(hdr)
        expected[10:12] = b"\0\0"
        assert hdr[10:12] == struct.pack("!H", P.checksum(expected))


@pytest.mark.parametrize("ttl", [0, 1])
def test_decrement_ttl_refuses_to_reach_zero(ttl: int) -> None:
    hdr = bytearray(P.ipv4_header(b"\x0a\0\0\1", b"\x0a\0\0\2", 17, 8, ttl))
    before = bytes(hdr)
    assert not P.decrement_ttl(hdr)
    assert bytes(hdr) == before


def test_decrement_ttl_at_an_offset_leaves_the_rest_alone() -> None:
    pkt = raw(IP(src="10.1.1.2", dst="10.1.2.2", ttl=9) / UDP(sport=1, dport=2) / b"x")
    buf = bytearray(b"\xaa" * 10 + pkt)
    assert P.decrement_ttl(buf, 10)
    assert buf[:10] == b"\xaa" * 10
    out = IP(bytes(buf[10:]))
    assert out.ttl == 8
    assert valid_ip_checksum(bytes(buf[10:30]))


def test_check_ipv4_reasons() -> None:
    good = raw(IP(src="10.1.1.2", dst="10.1.2.2") / UDP() / b"hello")
    assert P.check_ipv4(good, len(good), 1472) == P.OK
    assert P.check_ipv4(good + b"pad", len(good) + 3, 1472) == P.OK
    assert P.check_ipv4(good[:19], 19, 1472) == P.TRUNCATED
    assert P.check_ipv4(b"", 0, 1472) == P.TRUNCATED
    assert P.check_ipv4(good[:30], 30, 1472) == P.TRUNCATED  # total length says more
    v6 = bytes([0x60]) + bytes(39)
    assert P.check_ipv4(v6, len(v6), 1472) == P.NOT_IPV4
    short_ihl = bytes([0x43]) + good[1:]
    assert P.check_ipv4(short_ihl, len(short_ihl), 1472) == P.BAD_HEADER_LENGTH
    big = raw(IP(src="10.1.1.2", dst="10.1.2.2") / UDP() / bytes(2000))
    assert P.check_ipv4(big, len(big), 1472) == P.OVERSIZED
    long_ihl = bytes([0x4F]) + good[1:]  # 60-byte header in a 33-byte packet
    assert P.check_ipv4(long_ihl, len(long_ihl), 1472) == P.BAD_HEADER_LENGTH


def test_net_unreachable_answers_from_the_destination_and_quotes_the_packet() -> None:
    pkt = raw(IP(src="10.1.1.2", dst="10.1.77.5", ttl=63) / UDP(sport=4000, dport=53) / (b"q" * 30))
    reply = P.net_unreachable(pkt)
    assert reply is not None
    ip = IP(reply)
    assert (ip.src, ip.dst, ip.proto) == ("10.1.77.5", "10.1.1.2", 1)
    assert (ip[ICMP].type, ip[ICMP].code) == (3, 0)
    assert valid_ip_checksum(reply[:20])
    assert naive_sum(reply[20:]) == 0xFFFF  # ICMP checksum
    assert reply[28:] == pkt[: 20 + 8]


def test_net_unreachable_never_answers_errors_fragments_or_garbage() -> None:
    err = raw(IP(src="10.1.1.2", dst="10.1.77.5") / ICMP(type=3, code=1) / bytes(28))
    assert P.net_unreachable(err) is None
    echo = raw(IP(src="10.1.1.2", dst="10.1.77.5") / ICMP(type=8))
    assert P.net_unreachable(echo) is not None
    frag = raw(IP(src="10.1.1.2", dst="10.1.77.5", frag=100) / Raw(bytes(16)))
    assert P.net_unreachable(frag) is None
    mcast = raw(IP(src="224.0.0.1", dst="10.1.77.5") / UDP())
    assert P.net_unreachable(mcast) is None
    assert P.net_unreachable(b"\x45\x00") is None
    assert P.net_unreachable(bytes([0x60]) + bytes(39)) is None


def _tso(payload: bytes, flags: str = "PA", ttl: int = 64) -> bytes:
    opts = [("NOP", None), ("NOP", None), ("Timestamp", (11, 22))]
    return raw(
        IP(src="10.1.1.2", dst="10.1.2.2", ttl=ttl, id=0xFFFE, flags="DF")
        / TCP(sport=40000, dport=5201, seq=0xFFFFF000, ack=77, flags=flags, options=opts)
        / payload
    )


@pytest.mark.parametrize("size,mss", [(65000, 1408), (1408 * 3, 1408), (1409, 1408), (5000, 999)])
def test_segment_tcp4_makes_valid_packets_that_reassemble(size: int, mss: int) -> None:
    payload = os.urandom(size)
    sup = _tso(payload, flags="FPA")
    out, seg_len, count = P.segment_tcp4(memoryview(bytearray(sup)), mss)
    assert count == -(-size // mss)
    assert seg_len == 20 + 32 + mss
    got = b""
    for i in range(count):
        seg = bytes(out[i * seg_len : (i + 1) * seg_len])
        assert len(seg) == seg_len or i == count - 1
        ip = IP(seg)
        assert ip.len == len(seg)
        assert ip.ttl == 63
        assert ip.id == (0xFFFE + i) & 0xFFFF
        assert valid_ip_checksum(seg[:20])
        tcp = ip[TCP]
        assert tcp.seq == (0xFFFFF000 + i * mss) & 0xFFFFFFFF
        assert tcp.ack == 77
        last = i == count - 1
        assert str(tcp.flags) == ("FPA" if last else "A")
        assert seg[40:52] == sup[40:52]  # options copied
        assert valid_tcp_checksum(seg)
        got += bytes(tcp.payload)
    assert got == payload


def test_complete_checksum_finishes_a_partial_tcp_checksum() -> None:
    pkt = bytearray(_tso(os.urandom(999)))
    # What the kernel hands over with VIRTIO_NET_HDR_F_NEEDS_CSUM: the pseudo-header sum.
    partial = P.fold(P.ones_sum(pkt[12:20]) + P.PROTO_TCP + len(pkt) - 20)
    pkt[36:38] = struct.pack("!H", partial)
    P.complete_checksum(pkt, 20, 16)
    ip = IP(bytes(pkt))
    check = ip[TCP].chksum
    ip[TCP].chksum = None
    assert IP(raw(ip))[TCP].chksum == check


def _segments(payload: bytes, mss: int, flags: str = "A") -> list[memoryview]:
    out, seg_len, count = P.segment_tcp4(memoryview(bytearray(_tso(payload, flags))), mss)
    return [memoryview(out)[i * seg_len : min((i + 1) * seg_len, len(out))] for i in range(count)]


def _joined(iov: P.IoVec) -> tuple[tuple[int, ...], bytes]:
    return P.VNET_HDR.unpack(bytes(iov[0])), b"".join(bytes(x) for x in iov[1:])


def test_coalesce_joins_one_flow_into_a_gso_packet() -> None:
    payload = os.urandom(1400 * 5 + 123)
    pkts = _segments(payload, 1400, flags="PA")
    writes = P.coalesce(pkts)
    assert len(writes) == 1
    (flags, gso_type, hdr_len, gso_size, csum_start, csum_off), pkt = _joined(writes[0])
    assert (flags, gso_type, hdr_len, gso_size) == (1, P.VNET_GSO_TCPV4, 52, 1400)
    assert (csum_start, csum_off) == (20, 16)
    ip = IP(pkt)
    assert ip.len == len(pkt) == 52 + len(payload)
    assert valid_ip_checksum(pkt[:20])
    assert ip[TCP].seq == 0xFFFFF000 and str(ip[TCP].flags) == "PA"
    assert bytes(ip[TCP].payload) == payload
    full = bytearray(pkt)
    P.complete_checksum(full, 20, 16)  # what the kernel does with the partial sum
    check = IP(bytes(full))[TCP].chksum
    ip2 = IP(bytes(full))
    ip2[TCP].chksum = None
    assert IP(raw(ip2))[TCP].chksum == check


def test_coalesce_keeps_apart_what_must_not_merge() -> None:
    a = _segments(os.urandom(1400 * 3), 1400)
    b = _segments(os.urandom(1400 * 2), 1400)
    gap = [a[0], a[2]]  # sequence hole
    writes = P.coalesce(gap)
    assert [P.VNET_HDR.unpack(bytes(w[0]))[1] for w in writes] == [0, 0]
    assert [b"".join(bytes(x) for x in w[1:]) for w in writes] == [bytes(a[0]), bytes(a[2])]
    udp = memoryview(raw(IP(src="10.1.1.2", dst="10.1.2.2") / UDP() / b"u"))
    # b's segments carry the same addresses and ports as a's but other sequence numbers.
    writes = P.coalesce([a[0], a[1], udp, b[0], b[1]])
    kinds = [P.VNET_HDR.unpack(bytes(w[0]))[1] for w in writes]
    assert kinds == [P.VNET_GSO_TCPV4, 0, P.VNET_GSO_TCPV4]
    single = P.coalesce([a[0]])
    assert _joined(single[0]) == ((0, 0, 0, 0, 0, 0), bytes(a[0]))


def test_udp_backend_rejects_a_bad_port_by_name() -> None:
    addr = IPv4Address("192.0.2.1")
    ext = ExternalInterface("eth0", 2, addr, addr, 1500)
    for bad in ("8285", -1, 70000, True):
        config = NetworkConfig.from_dict(
            {"Network": "10.1.0.0/16", "Backend": {"Type": "udp", "Port": bad}}
        )
        with pytest.raises(BackendError, match=r"Backend\.Port=.*1\.\.65535"):
            UdpBackend(config, ext)
    config = NetworkConfig.from_dict({"Network": "10.1.0.0/16", "Backend": {"Type": "udp"}})
    backend = UdpBackend(config, ext)
    assert (backend.port, backend.mtu, backend.type) == (8285, 1472, "udp")


def _udp(payload: bytes, sport: int = 7000, ttl: int = 63) -> memoryview:
    pkt = IP(src="10.1.1.2", dst="10.1.2.2", ttl=ttl) / UDP(sport=sport, dport=53) / payload
    return memoryview(bytearray(raw(pkt)))


def test_coalesce_joins_a_udp_burst_into_a_udp_l4_gso_packet() -> None:
    payloads = [os.urandom(1000) for _ in range(4)] + [os.urandom(300)]
    writes = P.coalesce([_udp(p) for p in payloads])
    assert len(writes) == 1
    vnet, pkt = _joined(writes[0])
    assert vnet == (1, P.VNET_GSO_UDP_L4, 28, 1000, 20, 6)
    ip = IP(pkt)
    assert ip.len == len(pkt) == 28 + 4300
    assert ip[UDP].len == 8 + 4300
    assert valid_ip_checksum(pkt[:20])
    assert bytes(ip[UDP].payload) == b"".join(payloads)
    full = bytearray(pkt)
    P.complete_checksum(full, 20, 6)
    assert naive_sum(bytes(full[12:20]) + b"\0\x11" + struct.pack("!H", 8 + 4300) + full[20:]) == (
        0xFFFF
    )


def test_coalesce_keeps_udp_datagrams_apart_when_they_differ() -> None:
    a, b = os.urandom(1000), os.urandom(1000)
    # a larger datagram after a smaller one, another flow, another TTL: nothing merges
    for pkts in (
        [_udp(a[:500]), _udp(a)],
        [_udp(a), _udp(b, sport=7001)],
        [_udp(a), _udp(b, ttl=9)],
    ):
        writes = P.coalesce(pkts)
        assert [_joined(w) for w in writes] == [((0, 0, 0, 0, 0, 0), bytes(p)) for p in pkts]
    # a shorter datagram ends the run: the next one starts another
    writes = P.coalesce([_udp(a), _udp(b[:10]), _udp(a), _udp(b)])
    assert [P.VNET_HDR.unpack(bytes(w[0]))[1] for w in writes] == [5, 5]


def test_coalesce_passes_odd_tcp_headers_through_untouched() -> None:
    good = _segments(os.urandom(1400 * 2), 1400)
    bad = bytearray(good[0])
    bad[32] = 0x20  # TCP data offset 8 bytes: less than a TCP header
    for pkts in ([memoryview(bad), good[1]], [good[0], memoryview(bad)]):
        writes = P.coalesce(pkts)
        assert [_joined(w) for w in writes] == [((0, 0, 0, 0, 0, 0), bytes(p)) for p in pkts]


def test_coalesce_can_decrement_the_ttl_once_per_write() -> None:
    segs = _segments(os.urandom(1400 * 3), 1400)  # TTL 63 after segment_tcp4
    lone = _udp(b"x", ttl=5)
    writes = P.coalesce([*segs, lone], ttl=True)
    assert len(writes) == 2
    _, merged = _joined(writes[0])
    _, single = _joined(writes[1])
    assert (merged[8], single[8]) == (62, 4)
    assert valid_ip_checksum(merged[:20]) and valid_ip_checksum(single[:20])


def _short_tcp(total: int) -> memoryview:
    """A sound IPv4 header (check_ipv4 says OK) carrying `total - 20` bytes of a TCP header."""
    full = raw(IP(src="10.1.1.2", dst="10.1.2.2", ttl=9) / TCP(sport=1, dport=2, flags="A"))
    pkt = bytearray(full[:total])
    struct.pack_into("!H", pkt, 2, total)
    pkt[10:12] = b"\0\0"
    struct.pack_into("!H", pkt, 10, P.checksum(pkt[:20]))
    return memoryview(pkt)


@pytest.mark.parametrize("total", range(20, 40))
def test_coalesce_passes_short_tcp_packets_through(total: int) -> None:
    # Regression: a TCP packet of 20-33 bytes (IP header and a cut TCP header) made coalesce
    # read past its end (IndexError), so the rx worker lost the whole batch's coalescing and
    # counted it as malformed. Such packets are sound IPv4 and must pass through unchanged.
    short = _short_tcp(total)
    assert P.check_ipv4(short, total, 1472) == P.OK
    segs = _segments(os.urandom(1400 * 2), 1400)
    for pkts in ([short], [short, short], [short, *segs], [*segs, short], [segs[0], short]):
        writes = P.coalesce(pkts)
        got = [_joined(w) for w in writes]
        none = (0, 0, 0, 0, 0, 0)
        if pkts == [short, *segs]:
            assert got[0] == (none, bytes(short)) and got[1][0][1] == P.VNET_GSO_TCPV4
        elif pkts == [*segs, short]:
            assert got[0][0][1] == P.VNET_GSO_TCPV4 and got[1] == (none, bytes(short))
        else:
            assert got == [(none, bytes(p)) for p in pkts]
    # with the TTL decremented once per write, the short packet's too
    (write,) = P.coalesce([_short_tcp(total)], ttl=True)
    assert write[1][8] == 8 and valid_ip_checksum(bytes(write[1][:20]))


def test_coalesce_merges_tiny_tcp_segments_with_options() -> None:
    # 1-byte payloads behind a 32-byte TCP header (NOP, NOP, timestamp): still one flow.
    payload = os.urandom(5)
    segs = _segments(payload, 1)
    assert [len(s) for s in segs] == [53] * 5
    writes = P.coalesce(segs)
    assert len(writes) == 1
    vnet, pkt = _joined(writes[0])
    assert vnet[1:4] == (P.VNET_GSO_TCPV4, 52, 1)
    assert pkt[52:] == payload


async def test_every_udp_counter_reaches_metrics_by_name() -> None:
    # The daemon publishes UdpBackend.counters as overlay_udp_<name>; the drops by reason must
    # come out as valid metric names, each one at every scrape (a backend not started reads 0).
    addr = IPv4Address("192.0.2.1")
    config = NetworkConfig.from_dict({"Network": "10.1.0.0/16", "Backend": {"Type": "udp"}})
    backend = UdpBackend(config, ExternalInterface("eth0", 2, addr, addr, 1500))
    metrics = Metrics()
    metrics.publish_backend_counters("udp", backend.counters)
    server = HealthServer(metrics, "127.0.0.1", 0, serve_metrics=True)
    port = await server.start()
    try:
        status, text = await http_get(port, "/metrics")
    finally:
        await server.close()
    assert status == 200
    lines = text.splitlines()
    for name in W.COUNTERS:
        assert f"# TYPE overlay_udp_{name} counter" in lines
        assert f"overlay_udp_{name} 0" in lines
    assert {"dropped_source_port", "dropped_inner_source", "dropped_inner_destination"} <= set(
        W.COUNTERS
    )
