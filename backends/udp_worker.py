"""The udp backend's packet loop: one process per direction, started by `UdpBackend`.

    python -m backends.udp_worker --role tx|rx --tun FD --sock FD --ctl FD --stats FD --slot N ...

Why processes and not threads: a Python packet loop holds the GIL for all the work between two
system calls. In a thread it would take turns with the asyncio control plane (and the other
direction's loop) on one interpreter lock, so the two directions could never use both cores and
a busy control plane (a full resync of thousands of leases) would stall packets. One process per
direction lets tun->udp and udp->tun run on separate cores, and neither can stall the daemon.

Hand-over: the daemon writes the whole peer table as one JSON line on the `ctl` socket
({"gen": N, "peers": [[network_int, prefixlen, public_ip], ...], "port": P}); the loop polls that
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

SLOT_WORDS = 16
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
    "dropped_tun_other",  # 9: non-IPv4 packets read from the TUN device (e.g. IPv6)
    "send_errors",  # 10: sendmsg/write failures (counted, packet dropped)
    "tx_syscalls",  # 11: sendmsg calls made (fewer than packets with UDP_SEGMENT)
    "rx_syscalls",  # 12: recvmsg calls that returned data (fewer than packets with UDP_GRO)
    "tun_writes",  # 13: writes into the TUN device (fewer than rx_packets when coalesced)
    "tun_reads",  # 14: reads from the TUN device (fewer than tx_packets with TSO)
)
_I = {name: i + 1 for i, name in enumerate(COUNTERS)}


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


class PeerTable:
    """Destination -> (public ip, port) by longest prefix among the leases' prefix lengths."""

    def __init__(self) -> None:
        self.routes: list[tuple[int, dict[int, tuple[str, int]]]] = []
        self.sources: frozenset[str] = frozenset()

    def load(self, doc: dict[str, Any]) -> None:
        port = int(doc["port"])
        by_len: dict[int, dict[int, tuple[str, int]]] = {}
        sources = set()
        for net, plen, ip in doc["peers"]:
            by_len.setdefault(int(plen), {})[int(net)] = (str(ip), port)
            sources.add(str(ip))
        routes = []
        for plen in sorted(by_len, reverse=True):
            mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
            routes.append((mask, by_len[plen]))
        # Swap whole objects: the loop never sees a half-built table.
        self.routes = routes
        self.sources = frozenset(sources)

    def lookup(self, dst: int) -> tuple[str, int] | None:
        for mask, table in self.routes:
            addr = table.get(dst & mask)
            if addr is not None:
                return addr
        return None


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
    """UDP -> TUN: accept known peers only, validate, decrement TTL, write into the TUN device."""
    table = ctl.table
    c = stats.c
    wait = _waiter(sock.fileno(), ctl, stats)
    buf = bytearray(65536)
    mv = memoryview(buf)
    dontwait = socket.MSG_DONTWAIT
    recvfrom_into = sock.recvfrom_into
    recvmsg_into = sock.recvmsg_into
    check = P.check_ipv4
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
        if addr[0] not in table.sources:
            c[5] += -(-n // seg) if n else 1
            continue
        if merge and seg < n:
            # Several datagrams in one: validate each, then write runs of one TCP flow as
            # single GSO packets (see udp_packet.coalesce).
            batch = []
            for start in range(0, n, seg):
                end = min(start + seg, n)
                pkt = mv[start:end]
                if check(pkt, end - start, mtu):
                    c[6] += 1
                elif pkt[8] <= 1:  # coalesce() decrements the TTL once per write
                    c[7] += 1
                else:
                    total = (pkt[2] << 8) | pkt[3]
                    batch.append(pkt[:total])
                    c[4] += total
            c[3] += len(batch)
            try:
                writes = coalesce(batch, True)
            except Exception:  # a bug must not stop the data path: write them one by one
                c[6] += 1
                writes = [[hdr, pkt] for pkt in batch if decrement_ttl(pkt)]
            for iov in writes:
                try:
                    writev(tun, iov)
                    c[13] += 1
                except OSError:
                    c[10] += 1
            continue
        start = 0
        while True:
            end = min(start + seg, n)
            size = end - start
            pkt = mv[start:end]
            reason = check(pkt, size, mtu)
            if reason:
                c[6] += 1
            elif not decrement_ttl(pkt):
                c[7] += 1
            else:
                total = (pkt[2] << 8) | pkt[3]
                try:
                    if vnet:
                        writev(tun, [hdr, pkt[:total]])
                    else:
                        write(tun, pkt[:total])
                    c[3] += 1
                    c[4] += total
                    c[13] += 1
                except OSError:
                    c[10] += 1
            start = end
            if start >= n:
                break


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
