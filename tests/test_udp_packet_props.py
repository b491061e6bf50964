"""Properties of the udp backend's packet functions (hypothesis), for any input.

Every test states what must hold, and checks it against a naive reference or by undoing the
operation; hostile input (random bytes, cut headers, lying length fields) is part of each
strategy. Profiles: "ci" by default (200 examples each), HYPOTHESIS_PROFILE=long for a deep run
(see tests/conftest.py). No root needed.
"""

from __future__ import annotations

import struct

from hypothesis import example, given
from hypothesis import strategies as st

from backends import udp_packet as P
from backends import udp_worker as W
from tests.test_udp_packet import naive_sum  # RFC 1071 the slow way: the reference

# --------------------------------------------------------------------------- references


def sums_to_zero(data: bytes) -> bool:
    """What a receiver checks: the covered data including its checksum sums to 0xFFFF."""
    return naive_sum(data) == 0xFFFF


def tcp_ok(pkt: bytes) -> bool:
    ihl = (pkt[0] & 0x0F) * 4
    seg = pkt[ihl:]
    pseudo = pkt[12:20] + b"\0\x06" + struct.pack("!H", len(seg))
    return sums_to_zero(pseudo + seg)


def ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    body: bytes,
    *,
    ttl: int = 64,
    ident: int = 0,
    frag: int = 0,
    tos: int = 0,
    options: bytes = b"",
) -> bytes:
    """An IPv4 packet with a correct header checksum (options padded to 32-bit words)."""
    options += b"\0" * (-len(options) % 4)
    ihl = 20 + len(options)
    hdr = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, tos, ihl + len(body), ident, frag, ttl,
                    proto, 0, src, dst)
        + options
    )  # fmt: skip
    struct.pack_into("!H", hdr, 10, naive_sum(bytes(hdr)) ^ 0xFFFF)
    return bytes(hdr) + body


def tcp(
    src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, window: int,
    options: bytes, payload: bytes,
) -> bytes:  # fmt: skip
    """A TCP segment (header + payload) with a correct checksum for src -> dst."""
    options += b"\x01" * (-len(options) % 4)
    thl = 20 + len(options)
    hdr = bytearray(
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (thl // 4) << 4, flags, window, 0, 0)
        + options
    )
    seg = bytes(hdr) + payload
    pseudo = src + dst + b"\0\x06" + struct.pack("!H", len(seg))
    struct.pack_into("!H", hdr, 16, naive_sum(pseudo + seg) ^ 0xFFFF)
    return bytes(hdr) + payload


addresses = st.binary(min_size=4, max_size=4)
hostile = st.binary(max_size=80)
"""Random bytes: anything a peer or a spoofer can put into a datagram."""


@st.composite
def ip_packets(draw: st.DrawFn) -> bytes:
    """Sound IPv4 packets of any protocol, options, TTL and fragment field."""
    return ipv4(
        draw(addresses),
        draw(addresses),
        draw(st.integers(0, 255)),
        draw(st.binary(max_size=64)),
        ttl=draw(st.integers(0, 255)),
        ident=draw(st.integers(0, 0xFFFF)),
        frag=draw(st.integers(0, 0xFFFF)),
        tos=draw(st.integers(0, 255)),
        options=draw(st.binary(max_size=40)),
    )


def mutated(base: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Sound packets with one byte changed or the end cut off: almost right is the hard case."""

    @st.composite
    def one(draw: st.DrawFn) -> bytes:
        pkt = bytearray(draw(base))
        if pkt and draw(st.booleans()):
            pkt[draw(st.integers(0, len(pkt) - 1))] = draw(st.integers(0, 255))
        else:
            pkt = pkt[: draw(st.integers(0, len(pkt)))]
        return bytes(pkt)

    return one()


any_packet = st.one_of(hostile, ip_packets(), mutated(ip_packets()))

# --------------------------------------------------------------------------- checksums


@given(st.binary(max_size=3000))
def test_ones_sum_and_checksum_match_the_naive_sum(data: bytes) -> None:
    # ones_sum takes shortcuts (one big integer, halvings, % 0xFFFF): same value as the naive
    # sum for any length, odd or even, and the checksum makes the data sum to 0xFFFF.
    assert P.ones_sum(data) == naive_sum(data)
    assert P.ones_sum(memoryview(bytearray(data))) == naive_sum(data)
    padded = data + b"\0" * (len(data) % 2)
    assert sums_to_zero(padded + struct.pack("!H", P.checksum(data)))


@given(
    st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=40),
    st.data(),
)
def test_incremental_update_equals_a_recomputed_checksum(
    words: list[int], data: st.DataObject
) -> None:
    # RFC 1624 eqn. 3: changing one covered word old -> new and patching the checksum gives the
    # checksum a full recompute gives; bit for bit unless the data is all zeros before and after
    # (then 0x0000 and 0xFFFF, the same ones'-complement zero), and the result always verifies.
    pos = data.draw(st.integers(0, len(words) - 1), label="checksum word")
    words[pos] = 0
    hc = naive_sum(struct.pack(f"!{len(words)}H", *words)) ^ 0xFFFF
    words[pos] = hc
    i = data.draw(st.integers(0, len(words) - 2), label="changed word")
    i += i >= pos  # any word but the checksum
    new = data.draw(st.integers(0, 0xFFFF), label="new value")
    old = words[i]
    inc = P.incremental_update(hc, old, new)
    words[i] = new
    words[pos] = 0
    full = naive_sum(struct.pack(f"!{len(words)}H", *words)) ^ 0xFFFF
    if any(words):
        assert inc == full
    else:
        assert {inc, full} <= {0x0000, 0xFFFF}
    words[pos] = inc
    assert sums_to_zero(struct.pack(f"!{len(words)}H", *words)) or not any(
        w for k, w in enumerate(words) if k != pos
    )


# --------------------------------------------------------------------------- TTL


@given(ip_packets(), st.binary(max_size=12))
def test_decrement_ttl_keeps_the_header_checksum_valid(pkt: bytes, before: bytes) -> None:
    # TTL above 1: decremented by one, the header (with its options) still verifies, the
    # checksum is what a recompute gives, and no other byte changes. TTL 0 or 1: False and the
    # packet untouched (the caller drops it; flannel's C proxy would wrap 0 to 255).
    buf = bytearray(before + pkt)
    off = len(before)
    ihl = (pkt[0] & 0x0F) * 4
    ttl = pkt[8]
    result = P.decrement_ttl(buf, off)
    if ttl <= 1:
        assert result is False and bytes(buf) == before + pkt
        return
    assert result is True
    out = bytes(buf[off:])
    assert out[8] == ttl - 1
    assert sums_to_zero(out[:ihl])
    zeroed = bytearray(out[:ihl])
    zeroed[10:12] = b"\0\0"
    assert out[10:12] == struct.pack("!H", naive_sum(bytes(zeroed)) ^ 0xFFFF)
    changed = {k for k in range(len(pkt)) if out[k] != pkt[k]}
    assert changed <= {8, 10, 11} and bytes(buf[:off]) == before


# --------------------------------------------------------------------------- check_ipv4


def expected_reason(data: bytes, limit: int) -> int:
    """check_ipv4's contract, written out plainly."""
    n = len(data)
    if n < 20:
        return P.TRUNCATED
    if data[0] >> 4 != 4:
        return P.NOT_IPV4
    ihl = (data[0] & 0x0F) * 4
    if ihl < 20:
        return P.BAD_HEADER_LENGTH
    total = int.from_bytes(data[2:4], "big")
    if total > limit:
        return P.OVERSIZED
    if total > n:
        return P.TRUNCATED
    if ihl > total:
        return P.BAD_HEADER_LENGTH
    return P.OK


@given(any_packet, st.integers(0, 70000))
@example(b"\x45" + bytes(19), 1472)  # total length 0: shorter than its own header
@example(b"\x4f\x00\x00\x21" + bytes(29), 1472)  # 60-byte header in a 33-byte packet
def test_check_ipv4_gives_a_reason_for_any_bytes(data: bytes, limit: int) -> None:
    # Any bytes and any limit: a reason code (never an exception), OK exactly when the bytes
    # hold one IPv4 packet whose header fits in its total length, no larger than the limit.
    reason = P.check_ipv4(data, len(data), limit)
    assert reason in P.REASONS
    assert reason == expected_reason(data, limit)


# --------------------------------------------------------------------------- ICMP


@given(any_packet)
@example(ipv4(b"\x0a\0\0\2", b"\x0a\0\x4d\5", 1, bytes([3, 1]) + bytes(30)))  # an ICMP error
@example(ipv4(b"\x0a\0\0\2", b"\x0a\0\x4d\5", 1, bytes([8, 0]) + bytes(6)))  # an echo request
def test_net_unreachable_is_valid_icmp_quoting_the_packet_or_nothing(pkt: bytes) -> None:
    # For any bytes: None, or an IPv4 packet from the unreachable destination to the source,
    # header checksum valid, ICMP type 3 code 0 with a valid checksum, quoting the offending
    # header and the first 8 bytes after it. Never an answer to an ICMP error, a non-first
    # fragment, a multicast/broadcast/zero source, or something that is not IPv4.
    reply = P.net_unreachable(pkt)
    sound = len(pkt) >= 20 and pkt[0] >> 4 == 4 and 20 <= (pkt[0] & 0x0F) * 4 <= len(pkt)
    if not sound:
        assert reply is None
        return
    ihl = (pkt[0] & 0x0F) * 4
    is_icmp_error = pkt[9] == 1 and len(pkt) > ihl and pkt[ihl] in (3, 4, 5, 11, 12)
    later_fragment = int.from_bytes(pkt[6:8], "big") & 0x1FFF != 0
    src = pkt[12:16]
    bad_source = src[0] >= 224 or src in (b"\xff" * 4, b"\0" * 4)
    if is_icmp_error or later_fragment or bad_source:
        assert reply is None
        return
    assert reply is not None
    assert reply[0] == 0x45 and reply[9] == 1
    assert int.from_bytes(reply[2:4], "big") == len(reply)
    assert sums_to_zero(reply[:20])
    assert (reply[12:16], reply[16:20]) == (pkt[16:20], pkt[12:16])
    icmp = reply[20:]
    assert (icmp[0], icmp[1]) == (3, 0)
    assert sums_to_zero(icmp)
    assert icmp[8:] == pkt[: ihl + 8]
    # and the answer is itself an ICMP error: it is never answered in turn
    assert P.net_unreachable(reply) is None


# --------------------------------------------------------------------------- segmentation


@st.composite
def super_packets(draw: st.DrawFn) -> tuple[bytes, int]:
    """TSO super-packets as the kernel hands them over, and an MSS."""
    src, dst = draw(addresses), draw(addresses)
    payload = draw(st.binary(max_size=6000))
    options = draw(st.binary(max_size=40))
    body = tcp(src, dst, draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF)),
               draw(st.integers(0, 0xFFFFFFFF)), draw(st.integers(0, 0xFFFFFFFF)),
               draw(st.sampled_from([0x10, 0x18, 0x19, 0x11])), draw(st.integers(0, 0xFFFF)),
               options, payload)  # fmt: skip
    pkt = ipv4(src, dst, 6, body, ttl=draw(st.integers(2, 255)),
               ident=draw(st.integers(0, 0xFFFF)), frag=draw(st.sampled_from([0, 0x4000])),
               options=draw(st.binary(max_size=20)))  # fmt: skip
    return pkt, draw(st.integers(1, 1500))


@given(super_packets())
def test_segment_tcp4_cuts_into_valid_packets_that_reassemble(case: tuple[bytes, int]) -> None:
    # The segments' payloads, in order, are the original payload; each segment is a TCP/IPv4
    # packet with valid IP and TCP checksums, its own total length, a payload of at most MSS
    # (all but the last exactly MSS, as UDP_SEGMENT needs), the sequence number where its bytes
    # start, the IP ID counting up, TTL - 1, and FIN/PSH only on the last one.
    pkt, mss = case
    ihl = (pkt[0] & 0x0F) * 4
    thl = (pkt[ihl + 12] >> 4) * 4
    hlen = ihl + thl
    payload = pkt[hlen:]
    out, seg_len, count = P.segment_tcp4(memoryview(bytearray(pkt)), mss)
    assert seg_len == hlen + mss
    assert count == max(1, -(-len(payload) // mss))
    segs = [bytes(out[k * seg_len : (k + 1) * seg_len]) for k in range(count)]
    assert b"".join(s[hlen:] for s in segs) == payload
    seq = int.from_bytes(pkt[ihl + 4 : ihl + 8], "big")
    flags = pkt[ihl + 13]
    offset = 0
    for k, seg in enumerate(segs):
        last = k == count - 1
        assert len(seg) - hlen <= mss and (last or len(seg) == seg_len)
        assert int.from_bytes(seg[2:4], "big") == len(seg)
        assert int.from_bytes(seg[4:6], "big") == (int.from_bytes(pkt[4:6], "big") + k) & 0xFFFF
        assert seg[8] == pkt[8] - 1
        assert sums_to_zero(seg[:ihl]) and tcp_ok(seg)
        assert int.from_bytes(seg[ihl + 4 : ihl + 8], "big") == (seq + offset) & 0xFFFFFFFF
        assert seg[ihl + 13] == (flags if last else flags & ~0x09)
        assert seg[ihl + 20 : hlen] == pkt[ihl + 20 : hlen]  # TCP options copied
        offset += len(seg) - hlen


@given(st.one_of(hostile, mutated(super_packets().map(lambda c: c[0]))), st.integers(-2, 2000))
def test_segment_tcp4_raises_value_error_or_cuts_what_it_says(data: bytes, mss: int) -> None:
    # Any bytes and MSS: ValueError, or segments whose lengths and count match what the
    # headers say (headers within the total length, total length within the bytes, MSS >= 1).
    try:
        out, seg_len, count = P.segment_tcp4(memoryview(bytearray(data)), mss)
    except ValueError:
        return
    ihl = (data[0] & 0x0F) * 4
    thl = (data[ihl + 12] >> 4) * 4
    total = int.from_bytes(data[2:4], "big")
    assert mss >= 1 and ihl >= 20 and thl >= 20 and ihl + thl <= total <= len(data)
    assert data[9] == 6 and data[8] > 1
    plen = total - ihl - thl
    assert seg_len == ihl + thl + mss and count == max(1, -(-plen // mss))
    assert len(out) == count * (ihl + thl) + plen


# --------------------------------------------------------------------------- coalescing

A_SRC, A_DST = b"\x0a\x01\x01\x02", b"\x0a\x01\x02\x02"


@st.composite
def tcp_runs(draw: st.DrawFn) -> list[bytes]:
    """Consecutive segments of one TCP flow (the kind that merges), some of them spoiled."""
    mss = draw(st.integers(1, 60))
    count = draw(st.integers(1, 6))
    options = draw(st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]))
    seq = draw(st.integers(0, 0xFFFFFFFF))
    ttl = draw(st.integers(2, 255))
    pkts = []
    for k in range(count):
        size = mss if k < count - 1 else draw(st.integers(0, mss))
        flags = draw(st.sampled_from([0x10, 0x10, 0x10, 0x18, 0x02, 0x11]))
        body = tcp(A_SRC, A_DST, 40000, 5201, seq, 77, flags, 512, options, bytes([k]) * size)
        pkts.append(ipv4(A_SRC, A_DST, 6, body, ttl=ttl, ident=k, frag=0x4000))
        seq = (seq + size + draw(st.sampled_from([0, 0, 0, 1]))) & 0xFFFFFFFF
    return pkts


@st.composite
def udp_runs(draw: st.DrawFn) -> list[bytes]:
    size = draw(st.integers(0, 60))
    count = draw(st.integers(1, 6))
    ttl = draw(st.integers(2, 255))
    pkts = []
    for k in range(count):
        n = size if k < count - 1 else draw(st.integers(0, size + 1))
        udp_len = 8 + n + draw(st.sampled_from([0, 0, 0, -1]))
        body = struct.pack("!HHHH", 7000, 53, udp_len & 0xFFFF, 0) + bytes([k]) * n
        pkts.append(ipv4(A_SRC, A_DST, 17, body, ttl=ttl, ident=k))
    return pkts


batches = st.lists(
    st.one_of(
        tcp_runs(),
        udp_runs(),
        st.lists(st.one_of(any_packet, mutated(tcp_runs().map(lambda r: r[0]))), max_size=3),
    ),
    max_size=5,
).map(lambda runs: [p for run in runs for p in run])


def _masked(hdr: bytes, fields: tuple[tuple[int, int], ...]) -> bytes:
    out = bytearray(hdr)
    for start, end in fields:
        out[start:end] = bytes(end - start)
    return bytes(out)


TCP_VARYING = ((2, 4), (4, 6), (10, 12), (24, 28), (33, 34), (36, 38))
UDP_VARYING = ((2, 4), (4, 6), (10, 12), (24, 26), (26, 28))


def check_coalesced(pkts: list[bytes], writes: list[P.IoVec], ttl: bool) -> None:
    """Undo coalesce: every input packet, in order, is in the writes exactly once.

    A pass-through write is the packet itself (TTL - 1 with `ttl` when it is an IPv4 header).
    A GSO write holds one header and the payloads of a run of consecutive input packets: each
    payload is that packet's payload byte for byte, each packet's header equals the write's
    header but for lengths, ID, checksums, sequence number and TCP flags (the merged header
    has the first packet's flags plus the last one's PSH), the sequence numbers continue, all
    payloads but the last are gso_size long, and the header's IP checksum is valid, its TCP
    or UDP checksum the pseudo-header sum that the kernel completes to a valid checksum.
    """
    k = 0
    for iov in writes:
        flags, gso_type, hdr_len, gso_size, csum_start, csum_off = P.VNET_HDR.unpack(bytes(iov[0]))
        head = bytes(iov[1])
        if gso_type == P.VNET_GSO_NONE:
            assert len(iov) == 2 and flags == 0
            want = pkts[k]
            if ttl and len(want) >= 20:
                assert head[8] == want[8] - 1 and sums_to_zero(head[: (head[0] & 15) * 4])
                head = head[:8] + want[8:9] + head[9:10] + want[10:12] + head[12:]
            assert head == want
            k += 1
            continue
        chunks = [bytes(c) for c in iov[2:]]
        assert len(chunks) >= 2 and hdr_len == len(head)
        assert (flags, csum_start) == (P.VNET_F_NEEDS_CSUM, 20)
        assert gso_size == len(chunks[0]) and all(0 < len(c) <= gso_size for c in chunks)
        assert all(len(c) == gso_size for c in chunks[:-1])
        run = pkts[k : k + len(chunks)]
        k += len(chunks)
        assert [p[hdr_len:] for p in run] == chunks
        assert int.from_bytes(head[2:4], "big") == hdr_len + sum(map(len, chunks))
        assert sums_to_zero(head[:20])
        joined = bytearray(head + b"".join(chunks))
        P.complete_checksum(joined, 20, csum_off)
        if gso_type == P.VNET_GSO_TCPV4:
            assert csum_off == 16 and tcp_ok(bytes(joined))
            varying = TCP_VARYING
            seq = int.from_bytes(head[24:28], "big")
            for p in run:
                assert int.from_bytes(p[24:28], "big") == seq
                seq = (seq + len(p) - hdr_len) & 0xFFFFFFFF
                assert p[33] & ~0x18 == 0
            assert all(not p[33] & 0x08 for p in run[:-1])
            assert head[33] == run[0][33] | (run[-1][33] & 0x08)
        else:
            assert gso_type == P.VNET_GSO_UDP_L4 and csum_off == 6
            pseudo = joined[12:20] + b"\0\x11" + joined[24:26]
            assert sums_to_zero(bytes(pseudo + joined[20:]))
            assert int.from_bytes(head[24:26], "big") == 8 + sum(map(len, chunks))
            varying = UDP_VARYING
        for p in run:
            first = run[0][8] - 1 if ttl else run[0][8]
            assert head[8] == first and p[8] == run[0][8]
            assert _masked(p[:hdr_len], varying)[:8] == _masked(head, varying)[:8]
            assert _masked(p[:hdr_len], varying)[9:] == _masked(head, varying)[9:]
    assert k == len(pkts)


@given(batches)
def test_coalesce_never_raises_and_carries_exactly_the_input(pkts: list[bytes]) -> None:
    views = [memoryview(bytearray(p)) for p in pkts]
    check_coalesced(pkts, P.coalesce(views), ttl=False)


@given(st.lists(st.one_of(tcp_runs(), udp_runs()), max_size=5))
def test_coalesce_decrements_each_writes_ttl_once(runs: list[list[bytes]]) -> None:
    # What the rx worker hands over (TTL above 1, sound packets): the same writes, each TTL
    # one lower with a valid header checksum.
    pkts = [p for run in runs for p in run]
    views = [memoryview(bytearray(p)) for p in pkts]
    check_coalesced(pkts, P.coalesce(views, True), ttl=True)


@given(st.lists(st.one_of(any_packet, hostile), max_size=8))
def test_coalesce_with_ttl_never_raises_on_garbage(pkts: list[bytes]) -> None:
    P.coalesce([memoryview(bytearray(p)) for p in pkts], True)


# --------------------------------------------------------------------------- rx screening

PEER = ((0xFFFFFF00, 0x0A010100),)  # 10.1.1.0/24
OWN = (0xFFFFFF00, 0x0A010200)  # 10.1.2.0/24
PEERS = [
    PEER,
    ((0xFFFFFF00, 0x0A010300), (0xFFFFFE00, 0x0A010000)),  # two leases: 10.1.3.0/24, 10.1.0.0/23
    (),  # none (the rx loop never asks for a PublicIP without a lease): nothing passes
]


def addr(value: int) -> bytes:
    return value.to_bytes(4, "big")


@st.composite
def inner_packets(draw: st.DrawFn) -> bytes:
    """Packets from anywhere to anywhere, often from the peer's subnet to ours."""
    near = st.integers(0x0A010000, 0x0A0103FF)  # 10.1.0.0 - 10.1.3.255
    src = draw(st.one_of(near, st.integers(0, 0xFFFFFFFF)))
    dst = draw(st.one_of(near, st.integers(0, 0xFFFFFFFF)))
    return ipv4(addr(src), addr(dst), 17, draw(st.binary(max_size=30)),
                ttl=draw(st.integers(0, 4)))  # fmt: skip


def in_net(value: int, mask: int, net: int) -> bool:
    return value & mask == net


@given(
    st.lists(st.one_of(inner_packets(), mutated(inner_packets()), hostile), max_size=8),
    st.booleans(),
    st.sampled_from(PEERS),
)
def test_screen_keeps_exactly_the_packets_a_peer_may_send_us(
    pkts: list[bytes], same_size: bool, peer: W.Subnets
) -> None:
    # A received datagram or UDP_GRO batch, from a peer whose leases are `peer` (one subnet,
    # two, or none), to us (10.1.2.0/24). Every inner packet is either returned (sound IPv4,
    # source in one of the peer's subnets, destination in ours, TTL above 1, cut to its total
    # length) or counted under exactly one drop reason, the first that applies; nothing
    # raises, whatever the bytes.
    if same_size:
        pkts = [p for p in pkts if p]  # a UDP_GRO batch holds no empty datagram
    if same_size and pkts:
        size = max(len(p) for p in pkts)
        pkts = [p + bytes(size - len(p)) for p in pkts[:-1]] + [pkts[-1][:size]]
        seg = size
    else:
        pkts = pkts[:1]
        seg = len(pkts[0]) if pkts else 0
    data = b"".join(pkts)
    c = [0] * (len(W.COUNTERS) + 1)
    kept = W.screen(memoryview(bytearray(data)), len(data), seg, 1472, peer, *OWN, c)
    expected: list[bytes] = []
    reasons: dict[int, int] = {}
    for p in pkts or [b""]:
        if expected_reason(p, 1472) != P.OK:
            reason = W.C_MALFORMED
        elif not any(in_net(int.from_bytes(p[12:16], "big"), *net) for net in peer):
            reason = W.C_INNER_SOURCE
        elif not in_net(int.from_bytes(p[16:20], "big"), *OWN):
            reason = W.C_INNER_DESTINATION
        elif p[8] <= 1:
            reason = W.C_TTL
        else:
            expected.append(p[: int.from_bytes(p[2:4], "big")])
            continue
        reasons[reason] = reasons.get(reason, 0) + 1
    assert [bytes(k) for k in kept] == expected
    assert {i: v for i, v in enumerate(c) if v} == reasons
