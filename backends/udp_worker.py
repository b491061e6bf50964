"""The udp backend's packet loop: one process per direction, started by `UdpBackend`.

    python -m backends.udp_worker --role tx|rx --tun FD --sock FD --ctl FD --stats FD --slot N ...

Why processes and not threads: a Python packet loop holds the GIL for all the work between two
system calls. In a thread it would take turns with the asyncio control plane (and the other
direction's loop) on one interpreter lock, so the two directions could never use both cores and
a busy control plane (a full resync of thousands of leases) would stall packets. One process per
direction lets tun->udp and udp->tun run on separate cores, and neither can stall the daemon.

Hand-over: the daemon writes the whole peer table as one JSON line on the `ctl` socket
({"gen": N, "peers": [[network_int, prefixlen, public_ip], ...], "port": P,
"own": [network_int, prefixlen]}); the loop polls that
socket whenever it would block and every 256 packets while busy, swaps its table in one step and
writes the generation it applied into its stats slot, so `reconcile()` can wait until the table
is in effect. EOF on `ctl` (daemon gone or closing) ends the loop.

Counters live in a shared memory block (a memfd, mmap'ed by both sides): slot N holds 16
unsigned 64-bit words, written by this process only; see `COUNTERS`.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import signal
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from backends import udp_packet as P

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
UDP_MAX_PAYLOAD = 65507
UDP_MAX_SEGMENTS = 64

SLOT_WORDS = 32
GEN = 0
COUNTERS = (
    "tx_packets",  # 1: packets read from the TUN device and sent to a peer
    "tx_bytes",  # 2
    "rx_packets",  # 3: packets received from a peer and written to the TUN device
    "rx_bytes",  # 4
    "dropped_unknown_source",  # 5: datagrams from an address that is no lease's PublicIP
    "dropped_malformed",  # 6: datagrams that are not one sound IPv4 packet (see udp_packet)
    "dropped_ttl",  # 7: TTL would reach zero (either direction)
    "dropped_no_route",  # 8: no lease covers the destination; ICMP net unreachable sent
    "dropped_tun_other",  # 9: TUN reads that are not IPv4 (e.g. IPv6) or no sound TSO packet
    "send_errors",  # 10: sendmsg/write failures (counted, packet dropped)
    "tx_syscalls",  # 11: sendmsg calls made (fewer than packets with UDP_SEGMENT)
    "rx_syscalls",  # 12: recvmsg calls that returned data (fewer than packets with UDP_GRO)
    "tun_writes",  # 13: writes into the TUN device (fewer than rx_packets when coalesced)
    "tun_reads",  # 14: reads from the TUN device (fewer than tx_packets with TSO)
    "dropped_source_port",  # 15: from a lease's PublicIP, but not from the backend's Port
    "dropped_inner_source",  # 16: inner source outside the sending lease's subnet
    "dropped_inner_destination",  # 17: inner destination outside our own subnet
)
"""Counter names in slot order (word i + 1); SLOT_WORDS leaves room to add more."""
_I = {name: i + 1 for i, name in enumerate(COUNTERS)}
C_RX_PACKETS = _I["rx_packets"]
C_RX_BYTES = _I["rx_bytes"]
C_MALFORMED = _I["dropped_malformed"]
C_TTL = _I["dropped_ttl"]
C_INNER_SOURCE = _I["dropped_inner_source"]
C_INNER_DESTINATION = _I["dropped_inner_destination"]
C_SOURCE_PORT = _I["dropped_source_port"]
C_UNKNOWN_SOURCE = _I["dropped_unknown_source"]
assert len(COUNTERS) < SLOT_WORDS


class Stats:
    """This worker's counters: plain local ints, flushed to shared memory now and then."""

    def __init__(self, fd: int, slot: int) -> None:
        self._map = mmap.mmap(fd, 0)
        self._words = memoryview(self._map).cast("Q")
        self._base = slot * SLOT_WORDS
        self.c = [0] * (len(COUNTERS) + 1)

    def flush(self) -> None:
        base = self._base
        words = self._words
        for i in range(1, len(self.c)):
            words[base + i] = self.c[i]

    def applied(self, gen: int) -> None:
        self.flush()
        self._words[self._base + GEN] = gen


Subnets = tuple[tuple[int, int], ...]
"""(mask, network) pairs as integers: the subnets one PublicIP holds leases for."""
NOTHING = (0, 1)
"""A (mask, network) pair that no address matches: our subnet until the daemon sends it."""


def _mask(plen: int) -> int:
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF


class PeerTable:
    """Both directions' view of the leases, from the daemon's table.

    tx: destination -> (public ip, port) by longest prefix among the leases' prefix lengths.
    rx: public ip -> the subnets of its leases (a datagram's inner source must lie in one), our
    own subnet (its inner destination must lie there) and the port peers send from.
    """

    def __init__(self) -> None:
        self.routes: list[tuple[int, dict[int, tuple[str, int]]]] = []
        self.sources: dict[str, Subnets] = {}
        self.port = 0
        self.own_mask, self.own_net = NOTHING

    def load(self, doc: dict[str, Any]) -> None:
        port = int(doc["port"])
        by_len: dict[int, dict[int, tuple[str, int]]] = {}
        sources: dict[str, list[tuple[int, int]]] = {}
        for net, plen, ip in doc["peers"]:
            by_len.setdefault(int(plen), {})[int(net)] = (str(ip), port)
            sources.setdefault(str(ip), []).append((_mask(int(plen)), int(net)))
        routes = []
        for plen in sorted(by_len, reverse=True):
            routes.append((_mask(plen), by_len[plen]))
        own = doc.get("own")
        own_mask, own_net = (_mask(int(own[1])), int(own[0])) if own else NOTHING
        # Swap whole objects: the loop never sees a half-built table.
        self.routes = routes
        self.sources = {ip: tuple(nets) for ip, nets in sources.items()}
        self.port = port
        self.own_mask, self.own_net = own_mask, own_net

    def lookup(self, dst: int) -> tuple[str, int] | None:
        for mask, table in self.routes:
            addr = table.get(dst & mask)
            if addr is not None:
                return addr
        return None


_ADDRS = struct.Struct("!II").unpack_from  # inner source and destination, bytes 12..20


def _in_any(addr: int, subnets: Subnets) -> bool:
    return any(addr & mask == net for mask, net in subnets)


def screen(
    buf: memoryview,
    n: int,
    seg: int,
    mtu: int,
    subnets: Subnets,
    own_mask: int,
    own_net: int,
    c: list[int],
) -> list[memoryview]:
    """The inner packets of one received datagram (or UDP_GRO batch) that may enter flannel0.

    `buf[:n]` holds datagrams of `seg` bytes laid end to end (the last may be shorter), all
    from one peer whose leases are `subnets`. A packet is kept when it is one sound IPv4
    packet no larger than `mtu` (udp_packet.check_ipv4), its source lies in one of `subnets`,
    its destination lies in our own subnet (`own_mask`, `own_net`) and its TTL is above 1; it
    is returned cut to its total length, TTL not yet decremented. Every other one is counted
    in `c` by the first reason that applies, in that order: dropped_malformed,
    dropped_inner_source, dropped_inner_destination, dropped_ttl. An empty datagram counts as
    one malformed. Never raises for any bytes.
    """
    if n <= 0:
        c[C_MALFORMED] += 1
        return []
    if seg <= 0:
        seg = n
    check = P.check_ipv4
    addrs = _ADDRS
    # Nearly every PublicIP holds one lease: test its subnet inline, the others only on a miss.
    mask0, net0 = subnets[0] if subnets else NOTHING
    more = len(subnets) > 1
    batch = []
    for start in range(0, n, seg):
        end = start + seg
        if end > n:
            end = n
        pkt = buf[start:end]
        if check(pkt, end - start, mtu):
            c[C_MALFORMED] += 1
            continue
        src, dst = addrs(pkt, 12)
        if src & mask0 != net0 and not (more and _in_any(src, subnets)):
            c[C_INNER_SOURCE] += 1
            continue
        if dst & own_mask != own_net:
            c[C_INNER_DESTINATION] += 1
            continue
        if pkt[8] <= 1:
            c[C_TTL] += 1
            continue
        batch.append(pkt[: (pkt[2] << 8) | pkt[3]])
    return batch


class Control:
    """The daemon's side channel: peer tables in, EOF means stop."""

    def __init__(self, fd: int, table: PeerTable, stats: Stats) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.table = table
        self.stats = stats
        self.buf = b""
        self.poll = select.poll()
        self.poll.register(self.sock.fileno(), select.POLLIN)

    def check(self) -> None:
        """Apply any pending table without blocking; exit on EOF."""
        if self.poll.poll(0):
            self.read()

    def read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            if not data:
                self.stats.flush()
                sys.exit(0)
            self.buf += data
            while b"\n" in self.buf:
                line, _, self.buf = self.buf.partition(b"\n")
                doc = json.loads(line)
                self.table.load(doc)
                self.stats.applied(int(doc["gen"]))


def _waiter(data_fd: int, ctl: Control, stats: Stats) -> Callable[[], None]:
    poller = select.poll()
    poller.register(data_fd, select.POLLIN)
    poller.register(ctl.sock.fileno(), select.POLLIN)
    ctl_fd = ctl.sock.fileno()

    def wait() -> None:
        stats.flush()
        for fd, _ in poller.poll():
            if fd == ctl_fd:
                ctl.read()

    return wait


def run_tx(
    tun: int, sock: socket.socket, ctl: Control, stats: Stats, vnet: bool, gso: bool
) -> None:
    """TUN -> UDP: look up the peer, decrement TTL, send the raw IP packet as the payload.

    With `gso`, consecutive packets of one size to one peer (a UDP stream, the segments the
    kernel made itself) are gathered in a batch and sent with one UDP_SEGMENT sendmsg when the
    TUN device runs dry, the size or peer changes, or the batch is full; TSO super-packets are
    segmented here and sent the same way.
    """
    os.set_blocking(tun, False)
    table = ctl.table
    c = stats.c
    wait = _waiter(tun, ctl, stats)
    buf = bytearray(65536 + P.VNET_HDR_LEN)
    mv = memoryview(buf)
    readv = os.readv
    bufs = [buf]
    sendto = sock.sendto
    sendmsg = sock.sendmsg
    from_bytes = int.from_bytes
    decrement_ttl = P.decrement_ttl
    off = P.VNET_HDR_LEN if vnet else 0
    unpack_vnet = P.VNET_HDR.unpack_from
    seg_opt = struct.Struct("=H").pack
    batch = memoryview(bytearray(UDP_MAX_PAYLOAD))
    b_len = b_seg = b_count = 0
    b_addr: tuple[str, int] = ("", 0)

    def flush() -> None:
        nonlocal b_len, b_count
        try:
            if b_count == 1:
                sendto(batch[:b_len], b_addr)
            else:
                sendmsg([batch[:b_len]], [(SOL_UDP, UDP_SEGMENT, seg_opt(b_seg))], 0, b_addr)
            c[1] += b_count
            c[2] += b_len
            c[11] += 1
        except OSError:
            c[10] += 1
        b_len = b_count = 0

    ticks = 0
    while True:
        try:
            n = readv(tun, bufs)
        except BlockingIOError:
            if b_count:
                flush()
            wait()
            continue
        ticks += 1
        c[14] += 1
        if not ticks & 255:
            ctl.check()
            stats.flush()
        pkt = mv[off:n]
        plen = n - off
        if plen < 20 or pkt[0] >> 4 != 4:
            c[9] += 1
            continue
        dst = from_bytes(pkt[16:20], "big")
        addr = None
        for mask, routes in table.routes:
            addr = routes.get(dst & mask)
            if addr is not None:
                break
        if addr is None:
            c[8] += 1
            reply = P.net_unreachable(pkt)
            if reply is not None:
                try:
                    if vnet:
                        os.writev(tun, [P.VNET_HDR_NONE, reply])
                    else:
                        os.write(tun, reply)
                except OSError:
                    c[10] += 1
            continue
        if vnet:
            flags, gso_type, _hl, gso_size, csum_start, csum_off = unpack_vnet(buf, 0)
            if gso_type & 0x7F == P.VNET_GSO_TCPV4:
                if b_count:
                    flush()
                if pkt[8] <= 1:
                    c[7] += 1
                    continue
                try:
                    _send_tso(pkt, gso_size, addr, c, sendmsg, sendto, seg_opt if gso else None)
                except OSError:
                    c[10] += 1
                except ValueError:  # not a TCP/IPv4 super-packet (segment_tcp4 says why)
                    c[9] += 1
                continue
            if flags & P.VNET_F_NEEDS_CSUM:
                P.complete_checksum(pkt, csum_start, csum_off)
        if not decrement_ttl(pkt):
            c[7] += 1
            continue
        if not gso:
            try:
                sendto(pkt, addr)
                c[1] += 1
                c[2] += plen
                c[11] += 1
            except OSError:
                c[10] += 1
            continue
        if b_count and (
            addr is not b_addr
            or plen > b_seg
            or b_len + plen > UDP_MAX_PAYLOAD
            or b_count >= UDP_MAX_SEGMENTS
        ):
            flush()
        if not b_count:
            b_addr = addr
            b_seg = plen
        batch[b_len : b_len + plen] = pkt
        b_len += plen
        b_count += 1
        if plen < b_seg:
            flush()


def _send_tso(
    pkt: memoryview,
    mss: int,
    addr: tuple[str, int],
    c: list[int],
    sendmsg: Callable[..., int],
    sendto: Callable[..., int],
    seg_opt: Callable[[int], bytes] | None,
) -> None:
    out, seg_len, count = P.segment_tcp4(pkt, mss)
    view = memoryview(out)
    total = len(out)
    c[1] += count
    c[2] += total
    if seg_opt is None:
        for start in range(0, total, seg_len):
            sendto(view[start : start + seg_len], addr)
            c[11] += 1
        return
    per_send = min(UDP_MAX_SEGMENTS, UDP_MAX_PAYLOAD // seg_len) * seg_len
    cmsg = [(SOL_UDP, UDP_SEGMENT, seg_opt(seg_len))]
    for start in range(0, total, per_send):
        part = view[start : start + per_send]
        if len(part) <= seg_len:
            sendto(part, addr)
        else:
            sendmsg([part], cmsg, 0, addr)
        c[11] += 1


def run_rx(
    tun: int, sock: socket.socket, ctl: Control, stats: Stats, vnet: bool, gro: bool, mtu: int
) -> None:
    """UDP -> TUN: accept known peers only, check each inner packet, decrement TTL, write.

    A datagram is taken only from a lease's PublicIP and the backend's port; each inner packet
    must then be sound, come from that lease's subnet and go to our own (see `screen`)."""
    table = ctl.table
    c = stats.c
    wait = _waiter(sock.fileno(), ctl, stats)
    buf = bytearray(65536)
    mv = memoryview(buf)
    dontwait = socket.MSG_DONTWAIT
    recvfrom_into = sock.recvfrom_into
    recvmsg_into = sock.recvmsg_into
    decrement_ttl = P.decrement_ttl
    write = os.write
    writev = os.writev
    hdr = P.VNET_HDR_NONE
    if gro:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    merge = gro and vnet
    coalesce = P.coalesce
    cmsg_space = socket.CMSG_SPACE(4)
    bufs = [buf]
    ticks = 0
    while True:
        try:
            if gro:
                n, anc, _f, addr = recvmsg_into(bufs, cmsg_space, dontwait)
            else:
                n, addr = recvfrom_into(buf, 0, dontwait)
        except BlockingIOError:
            wait()
            continue
        except OSError:
            c[10] += 1
            continue
        ticks += 1
        if not ticks & 255:
            ctl.check()
            stats.flush()
        c[12] += 1
        seg = n
        if gro:
            for level, kind, data in anc:
                if level == SOL_UDP and kind == UDP_GRO:
                    seg = int.from_bytes(data[:4], sys.byteorder) or n
        subnets = table.sources.get(addr[0])
        if subnets is None:
            c[C_UNKNOWN_SOURCE] += -(-n // seg) if n else 1
            continue
        if addr[1] != table.port:
            c[C_SOURCE_PORT] += -(-n // seg) if n else 1
            continue
        batch = screen(mv, n, seg, mtu, subnets, table.own_mask, table.own_net, c)
        if not batch:
            continue
        if merge and len(batch) > 1:
            # Several packets: write runs of one TCP or UDP flow as single GSO packets.
            c[C_RX_PACKETS] += len(batch)
            c[C_RX_BYTES] += sum(map(len, batch))
            try:
                writes = coalesce(batch, True)
            except Exception:  # a bug must not stop the data path: write them one by one
                c[C_MALFORMED] += 1
                writes = [[hdr, pkt] for pkt in batch if decrement_ttl(pkt)]
            for iov in writes:
                try:
                    writev(tun, iov)
                    c[13] += 1
                except OSError:
                    c[10] += 1
            continue
        for pkt in batch:
            decrement_ttl(pkt)  # screen() kept only TTLs above 1
            try:
                if vnet:
                    writev(tun, [hdr, pkt])
                else:
                    write(tun, pkt)
                c[C_RX_PACKETS] += 1
                c[C_RX_BYTES] += len(pkt)
                c[13] += 1
            except OSError:
                c[10] += 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("tx", "rx"), required=True)
    parser.add_argument("--tun", type=int, required=True)
    parser.add_argument("--sock", type=int, required=True)
    parser.add_argument("--ctl", type=int, required=True)
    parser.add_argument("--stats", type=int, required=True)
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--mtu", type=int, required=True)
    parser.add_argument("--vnet", action="store_true", help="the TUN fd carries virtio_net_hdr")
    parser.add_argument("--gso", action="store_true", help="send TSO segments with UDP_SEGMENT")
    parser.add_argument("--gro", action="store_true", help="receive coalesced with UDP_GRO")
    args = parser.parse_args(argv)
    # The daemon decides when we stop (EOF on ctl); a terminal's Ctrl-C must not kill us first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stats = Stats(args.stats, args.slot)
    table = PeerTable()
    ctl = Control(args.ctl, table, stats)
    sock = socket.socket(fileno=args.sock)
    if args.role == "tx":
        run_tx(args.tun, sock, ctl, stats, args.vnet, args.gso)
    else:
        run_rx(args.tun, sock, ctl, stats, args.vnet, args.gro, args.mtu)


if __name__ == "__main__":
    main()
