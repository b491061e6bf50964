"""Pure packet functions of the udp backend: checksums, TTL, ICMP, validation, TSO segmentation.

No sockets, no kernel: everything here works on bytes and is unit tested without root.

Checksums use the fact that the ones'-complement sum of an even-length buffer, read as one
big-endian integer, is that integer modulo 0xFFFF (2**16 == 1 mod 0xFFFF), which CPython computes
at C speed. The one subtlety: ones'-complement arithmetic never yields +0 for data that is not
all zero, so a remainder of 0 means 0xFFFF unless the data is all zeros.
"""

from __future__ import annotations

import functools
import struct

IPV4_HEADER_MIN = 20
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

# Reasons a datagram is not a usable IPv4 packet (0 means fine).
OK = 0
TRUNCATED = 1
NOT_IPV4 = 2
BAD_HEADER_LENGTH = 3
OVERSIZED = 4
REASONS = {
    OK: "ok",
    TRUNCATED: "truncated",
    NOT_IPV4: "not IPv4",
    BAD_HEADER_LENGTH: "bad header length",
    OVERSIZED: "oversized",
}

# ICMP types that are errors themselves: never answer them with an error (RFC 1122 3.2.2).
_ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})


@functools.lru_cache(maxsize=64)
def _fold_plan(nbytes: int) -> tuple[tuple[int, int], ...]:
    """Shifts that halve a big integer of `nbytes` bytes while keeping it mod 0xFFFF.

    Splitting at a multiple of 16 bits and adding the halves keeps the value modulo 0xFFFF;
    a few O(n) shifts and adds are cheaper than one long division by CPython's 30-bit digits.
    """
    plan = []
    bits = nbytes * 8 + 8
    while bits > 1024:
        half = ((bits // 2) + 15) // 16 * 16
        plan.append((half, (1 << half) - 1))
        bits = max(half, bits - half) + 1
    return tuple(plan)


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The folded 16-bit ones'-complement sum of `data` (odd lengths padded with a zero byte)."""
    n = len(data)
    value = int.from_bytes(data, "big")
    if n & 1:
        value <<= 8
    for half, mask in _fold_plan(n):
        value = (value >> half) + (value & mask)
    total = value % 0xFFFF
    if total == 0 and value:
        return 0xFFFF
    return total


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of `data`: the complement of its ones'-complement sum."""
    return ones_sum(data) ^ 0xFFFF


def fold(value: int) -> int:
    """Fold a non-negative integer sum of 16-bit words into 16 bits with end-around carry."""
    while value > 0xFFFF:
        value = (value & 0xFFFF) + (value >> 16)
    return value


def incremental_update(hc: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: the new checksum when one 16-bit word of the covered data goes old -> new.

    HC' = ~(~HC + ~m + m')
    """
    return fold((hc ^ 0xFFFF) + (old ^ 0xFFFF) + new) ^ 0xFFFF


def decrement_ttl(buf: bytearray | memoryview, off: int = 0) -> bool:
    """Decrement the TTL of the IPv4 header at `off` in place, patching its checksum (RFC 1624).

    Returns False, leaving the packet untouched, when the TTL would reach zero: the caller drops
    it. (Flannel's C proxy wraps a TTL of 0 to 255; we drop it.)
    """
    ttl = buf[off + 8]
    if ttl <= 1:
        return False
    proto = buf[off + 9]
    old = (ttl << 8) | proto
    hc = (buf[off + 10] << 8) | buf[off + 11]
    new_hc = incremental_update(hc, old, old - 0x100)
    buf[off + 8] = ttl - 1
    buf[off + 10] = new_hc >> 8
    buf[off + 11] = new_hc & 0xFF
    return True


def check_ipv4(buf: bytes | bytearray | memoryview, n: int, limit: int) -> int:
    """Why the first `n` bytes of `buf` are not one usable IPv4 packet (OK = 0 when they are).

    `limit` is the largest packet accepted (the TUN device's MTU). Trailing bytes beyond the
    header's total length are tolerated (the caller writes total length bytes only).
    """
    if n < IPV4_HEADER_MIN:
        return TRUNCATED
    b0 = buf[0]
    if b0 >> 4 != 4:
        return NOT_IPV4
    ihl = (b0 & 0x0F) << 2
    if ihl < IPV4_HEADER_MIN:
        return BAD_HEADER_LENGTH
    total = (buf[2] << 8) | buf[3]
    if total > limit or n > 65535:
        return OVERSIZED
    if total > n:
        return TRUNCATED
    if ihl > total:
        return BAD_HEADER_LENGTH
    return OK


def ipv4_header(
    src: bytes, dst: bytes, proto: int, payload_len: int, ttl: int = 64, ident: int = 0
) -> bytes:
    """A 20-byte IPv4 header with a correct checksum (DF clear, no options)."""
    hdr = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, 0, ttl, proto, 0, src, dst)
    )
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr)


def net_unreachable(packet: bytes | bytearray | memoryview) -> bytes | None:
    """ICMP destination unreachable, code 0 (net unreachable), answering `packet`, or None.

    As flannel does, the reply comes from the unreachable destination itself: the kernel drops
    packets that arrive on flannel0 with one of its own addresses as source. The ICMP body quotes
    the offending header and the first 8 bytes of its payload (RFC 792). No error answers an
    ICMP error, a non-first fragment, or a broadcast/multicast source (RFC 1122 3.2.2).
    """
    if len(packet) < IPV4_HEADER_MIN or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) << 2
    if ihl < IPV4_HEADER_MIN or len(packet) < ihl:
        return None
    frag_offset = ((packet[6] << 8) | packet[7]) & 0x1FFF
    if frag_offset:
        return None
    if packet[9] == PROTO_ICMP and len(packet) > ihl and packet[ihl] in _ICMP_ERROR_TYPES:
        return None
    src = bytes(packet[12:16])
    dst = bytes(packet[16:20])
    if src[0] >= 224 or src == b"\xff\xff\xff\xff" or src == b"\x00\x00\x00\x00":
        return None
    quoted = bytes(packet[: ihl + 8])
    icmp = bytearray(b"\x03\x00\x00\x00\x00\x00\x00\x00" + quoted)
    struct.pack_into("!H", icmp, 2, checksum(icmp))
    return ipv4_header(dst, src, PROTO_ICMP, len(icmp)) + bytes(icmp)


# --------------------------------------------------------------------------- offloads
#
# With IFF_VNET_HDR every TUN read starts with a struct virtio_net_hdr (10 bytes):
#   u8 flags, u8 gso_type, u16 hdr_len, u16 gso_size, u16 csum_start, u16 csum_offset
# in native byte order (little endian here; TUNSETVNETLE is not needed on x86).

VNET_HDR_LEN = 10
VNET_F_NEEDS_CSUM = 1
VNET_GSO_NONE = 0
VNET_GSO_TCPV4 = 1
VNET_GSO_UDP_L4 = 5
VNET_GSO_ECN = 0x80
VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_NONE = bytes(VNET_HDR_LEN)

_TCP_FIN = 0x01
_TCP_PSH = 0x08


def complete_checksum(pkt: bytearray | memoryview, csum_start: int, csum_offset: int) -> None:
    """Finish a CHECKSUM_PARTIAL packet: the field at csum_start + csum_offset holds the folded
    pseudo-header sum; the checksum is the complement of the sum from csum_start to the end."""
    pos = csum_start + csum_offset
    value = ones_sum(pkt[csum_start:]) ^ 0xFFFF
    pkt[pos] = value >> 8
    pkt[pos + 1] = value & 0xFF


_IP_VAR = struct.Struct("!HHHBBH")  # total length .. header checksum (bytes 2..12)
_TCP_VAR = struct.Struct("!IIBBHHH")  # seq .. urgent pointer (bytes 4..20)


def segment_tcp4(pkt: memoryview, mss: int, ttl_dec: int = 1) -> tuple[bytearray, int, int]:
    """Cut a TCP/IPv4 TSO super-packet into MSS-sized packets laid end to end in one buffer.

    Every segment but the last is exactly `seg_len` bytes long, as UDP_SEGMENT needs. Each
    segment gets its own IP total length, ID (incremented), TTL (decremented by `ttl_dec`),
    IP checksum, TCP sequence number and full TCP checksum; FIN and PSH stay on the last segment
    only. Returns (buffer, seg_len, count). Raises ValueError, touching nothing, for anything
    that is not one: not TCP, headers shorter than their minimum or longer than the total
    length, a total length beyond the buffer, an MSS below 1, a TTL not above `ttl_dec`.

    The constant parts of both checksums are summed once; per segment only the varying words
    and the payload chunk are added (ones'-complement sums are order independent).
    """
    n = len(pkt)
    if n < IPV4_HEADER_MIN + 20 or mss < 1:
        raise ValueError(f"segment_tcp4: {n} bytes, MSS {mss}: not a TCP/IPv4 super-packet")
    ihl = (pkt[0] & 0x0F) << 2
    total = (pkt[2] << 8) | pkt[3]
    if (
        ihl < IPV4_HEADER_MIN
        or ihl + 20 > total
        or total > n
        or pkt[9] != PROTO_TCP
        or pkt[8] <= ttl_dec
    ):
        raise ValueError(
            f"segment_tcp4: IP header {ihl} bytes, total length {total} of {n}, protocol "
            f"{pkt[9]}, TTL {pkt[8]}: not a TCP/IPv4 super-packet"
        )
    thl = (pkt[ihl + 12] >> 4) << 2
    hlen = ihl + thl
    if thl < 20 or hlen > total:
        raise ValueError(f"segment_tcp4: TCP header {thl} bytes in a {total}-byte packet")
    payload = pkt[hlen:total]
    plen = len(payload)
    count = max(1, -(-plen // mss))
    seg_len = hlen + mss
    template = bytearray(pkt[:hlen])
    ident = (template[4] << 8) | template[5]
    frag = (template[6] << 8) | template[7]
    ttl = template[8] - ttl_dec
    seq = int.from_bytes(template[ihl + 4 : ihl + 8], "big")
    ack = int.from_bytes(template[ihl + 8 : ihl + 12], "big")
    off_byte = template[ihl + 12]
    flags = template[ihl + 13]
    mid_flags = flags & ~(_TCP_FIN | _TCP_PSH)
    window = (template[ihl + 14] << 8) | template[ihl + 15]
    urgent = (template[ihl + 18] << 8) | template[ihl + 19]
    # Zero the varying fields, then sum what stays.
    template[2:12] = _IP_VAR.pack(0, 0, frag, ttl, PROTO_TCP, 0)
    template[ihl + 4 : ihl + 20] = _TCP_VAR.pack(0, ack, off_byte, 0, window, 0, urgent)
    ip_base = ones_sum(template[:ihl])
    tcp_base = ones_sum(template[12:20]) + PROTO_TCP + ones_sum(template[ihl:hlen])
    pack_ip = _IP_VAR.pack_into
    pack_tcp = _TCP_VAR.pack_into
    tcp_off = ihl + 4
    last_len = plen - mss * (count - 1)
    head = bytes(template)
    out = bytearray((head + bytes(mss)) * (count - 1) + head + bytes(last_len))
    from_bytes = int.from_bytes
    plan = _fold_plan(mss)
    odd = mss & 1
    # Full segments: same length and flags; the payload sum is folded inline (see ones_sum),
    # and a final `% 0xFFFF` stands for the fold (0 and 0xFFFF are both zero to a receiver).
    tcp_mid = tcp_base + thl + mss + mid_flags
    ip_mid = ip_base + seg_len
    off = 0
    for i in range(count - 1):
        start = i * mss
        v = from_bytes(payload[start : start + mss], "big")
        if odd:
            v <<= 8  # pad an odd-length chunk with a zero byte, as ones_sum does
        for half, mask in plan:
            v = (v >> half) + (v & mask)
        seg_seq = (seq + start) & 0xFFFFFFFF
        seg_id = (ident + i) & 0xFFFF
        tcp_csum = ((tcp_mid + (seg_seq >> 16) + (seg_seq & 0xFFFF) + v) % 0xFFFF) ^ 0xFFFF
        ip_csum = ((ip_mid + seg_id) % 0xFFFF) ^ 0xFFFF
        pack_ip(out, off + 2, seg_len, seg_id, frag, ttl, PROTO_TCP, ip_csum)
        pack_tcp(out, off + tcp_off, seg_seq, ack, off_byte, mid_flags, window, tcp_csum, urgent)
        out[off + hlen : off + seg_len] = payload[start : start + mss]
        off += seg_len
    # The last segment keeps FIN/PSH and may be shorter.
    start = (count - 1) * mss
    chunk = payload[start:]
    seg_seq = (seq + start) & 0xFFFFFFFF
    seg_id = (ident + count - 1) & 0xFFFF
    tot = hlen + last_len
    tcp_csum = (
        fold(tcp_base + thl + last_len + (seg_seq >> 16) + (seg_seq & 0xFFFF) + flags
             + ones_sum(chunk))
        ^ 0xFFFF
    )  # fmt: skip
    ip_csum = fold(ip_base + tot + seg_id) ^ 0xFFFF
    pack_ip(out, off + 2, tot, seg_id, frag, ttl, PROTO_TCP, ip_csum)
    pack_tcp(out, off + tcp_off, seg_seq, ack, off_byte, flags, window, tcp_csum, urgent)
    out[off + hlen : off + tot] = chunk
    return out, seg_len, count


_TCP_ACK = 0x10
_MERGE_OK_FLAGS = _TCP_ACK | _TCP_PSH
_TCP_GSO_VNET = VNET_HDR.pack  # bound once for the hot path

IoVec = list[bytes | bytearray | memoryview]
_U32 = struct.Struct("!I")


@functools.lru_cache(maxsize=16)
def _tcp_key(thl: int) -> struct.Struct:
    """What must be equal for two TCP/IPv4 segments to merge, as one tuple.

    Version/IHL, TOS, fragment field, TTL, protocol, addresses and ports, ack and data offset,
    window, urgent pointer and options. Left out: lengths, IP ID, checksums, seq and flags.
    """
    return struct.Struct(f"!BB4x2sBB2x12s4x5sxH2x{thl - 18}s")


_UDP_KEY = struct.Struct("!BB4x2sBB2x12s")
"""The same for UDP/IPv4: up to the ports; lengths, IP ID and checksums left out."""


def coalesce(pkts: list[memoryview], ttl: bool = False) -> list[IoVec]:
    """Userspace GRO: join runs of consecutive segments of one TCP or UDP flow into GSO writes.

    `pkts` are IPv4 packets in arrival order, each exactly its total length long (the rx worker
    checks them first). With `ttl`, every packet's TTL must be above 1 and each write's TTL is
    decremented once (cheaper than per packet). The result is one iovec per TUN write, each
    starting with a virtio_net_hdr: NONE for a packet written as it is; TCPV4 with gso_size =
    MSS for a run, with one new IP/TCP header and the payloads following, the TCP checksum left
    partial (pseudo-header sum) for the kernel, which segments or delivers it as if its own GRO
    had built it.

    A run continues while: IPv4 without options, not fragmented, TCP with only ACK/PSH, same
    addresses, ports, TOS, TTL, ack, window and options, the sequence number continues the run,
    every payload but the last is MSS long, and no PSH before the last. UDP datagrams of one
    flow (addresses, ports, TOS, TTL, UDP length equal to the IP payload length) whose payloads
    all have the first one's size, except a shorter last one, become one UDP_L4 GSO write the
    same way. Inner checksums are not checked
    here: the outer UDP checksum, verified by the kernel, covers the whole packet.

    Never raises: anything else (shorter than its headers, a total length that is not its
    length, TCP or UDP headers cut short) is passed through as it is, in its place; with `ttl`
    a pass-through shorter than an IPv4 header is left untouched.
    """
    out: list[IoVec] = []
    n = len(pkts)
    i = 0
    while i < n:
        p = pkts[i]
        i += 1
        size = len(p)
        # Only a plain IPv4 header (no options), unfragmented, exactly as long as it says, with
        # room for a whole TCP (40) or UDP (28) header may start a run.
        if (
            size < 28
            or p[0] != 0x45
            or (p[6] & 0x3F)
            or p[7]
            or ((p[2] << 8) | p[3]) != size
            or i >= n
        ):
            out.append([VNET_HDR_NONE, p])
            continue
        proto = p[9]
        if proto == PROTO_UDP:
            i = _coalesce_udp4(pkts, i, out)
            continue
        if proto != PROTO_TCP or size < 40:
            out.append([VNET_HDR_NONE, p])
            continue
        thl = (p[32] >> 4) << 2
        hlen = 20 + thl
        mss = size - hlen
        flags = p[33]
        if mss <= 0 or thl < 20 or flags & ~_MERGE_OK_FLAGS or flags & _TCP_PSH:
            out.append([VNET_HDR_NONE, p])
            continue
        key = _tcp_key(thl)
        unpack_key = key.unpack_from
        ident = unpack_key(p)
        next_seq = (_U32.unpack_from(p, 24)[0] + mss) & 0xFFFFFFFF
        iov: IoVec = [b"", b"", p[hlen:]]
        length = mss
        last_flags = flags
        while i < n:
            q = pkts[i]
            qtotal = len(q)
            # The key covers version/IHL, fragment field and protocol, so q is a plain,
            # unfragmented TCP/IPv4 packet with the same header length once it matches.
            if qtotal < hlen or unpack_key(q) != ident or ((q[2] << 8) | q[3]) != qtotal:
                break
            qflags = q[33]
            if qflags & ~_MERGE_OK_FLAGS:
                break
            qlen = qtotal - hlen
            if qlen <= 0 or qlen > mss or _U32.unpack_from(q, 24)[0] != next_seq:
                break
            iov.append(q[hlen:])
            length += qlen
            next_seq = (next_seq + qlen) & 0xFFFFFFFF
            last_flags = qflags
            i += 1
            if qlen < mss or qflags & _TCP_PSH:
                break
        if len(iov) == 3:
            out.append([VNET_HDR_NONE, p])
            continue
        hdr = bytearray(p[:hlen])
        new_total = hlen + length
        hdr[2] = new_total >> 8
        hdr[3] = new_total & 0xFF
        hdr[10] = hdr[11] = 0
        hc = checksum(hdr[:20])
        hdr[10] = hc >> 8
        hdr[11] = hc & 0xFF
        hdr[33] = flags | (last_flags & _TCP_PSH)
        partial = fold(ones_sum(hdr[12:20]) + PROTO_TCP + thl + length)
        hdr[36] = partial >> 8
        hdr[37] = partial & 0xFF
        iov[0] = _TCP_GSO_VNET(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, hlen, mss, 20, 16)
        iov[1] = hdr
        out.append(iov)
    if ttl:
        for iov in out:
            if len(iov[1]) >= IPV4_HEADER_MIN:
                decrement_ttl(iov[1])  # type: ignore[arg-type]
    return out


def _coalesce_udp4(pkts: list[memoryview], i: int, out: list[IoVec]) -> int:
    """The UDP half of `coalesce`: pkts[i - 1] (a plain IPv4 header, exactly its total length,
    at least 28 bytes) starts a run; return the index after it. Only datagrams whose UDP length
    matches the IP length merge: trailing bytes after a shorter UDP length are not data, and a
    merge would deliver them as if they were."""
    p = pkts[i - 1]
    total = len(p)
    size = total - 28
    n = len(pkts)
    if size <= 0 or ((p[24] << 8) | p[25]) != total - 20:
        out.append([VNET_HDR_NONE, p])
        return i
    unpack_key = _UDP_KEY.unpack_from
    ident = unpack_key(p)
    iov: IoVec = [b"", b"", p[28:]]
    length = size
    while i < n:
        q = pkts[i]
        qtotal = len(q)
        # The key covers version/IHL, fragment field and protocol (see _tcp_key).
        if (
            qtotal < 28
            or unpack_key(q) != ident
            or ((q[2] << 8) | q[3]) != qtotal
            or ((q[24] << 8) | q[25]) != qtotal - 20
        ):
            break
        qsize = qtotal - 28
        if qsize <= 0 or qsize > size:
            break
        iov.append(q[28:])
        length += qsize
        i += 1
        if qsize < size:
            break
    if len(iov) == 3:
        out.append([VNET_HDR_NONE, p])
        return i
    hdr = bytearray(p[:28])
    new_total = 28 + length
    struct.pack_into("!H", hdr, 2, new_total)
    hdr[10] = hdr[11] = 0
    struct.pack_into("!H", hdr, 10, checksum(hdr[:20]))
    struct.pack_into("!H", hdr, 24, 8 + length)
    struct.pack_into("!H", hdr, 26, fold(ones_sum(hdr[12:20]) + PROTO_UDP + 8 + length))
    iov[0] = VNET_HDR.pack(VNET_F_NEEDS_CSUM, VNET_GSO_UDP_L4, 28, size, 20, 6)
    iov[1] = hdr
    out.append(iov)
    return i
