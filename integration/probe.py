"""A small TCP and UDP probe of ours (this machine has no ping), run inside namespaces.

    python -m integration.probe serve --port 7777
        echo server: every TCP line and every UDP datagram is sent back unchanged.
    python -m integration.probe check --port 7777 10.1.2.2 10.1.3.2
        one TCP and one UDP round trip per target; prints a JSON list of results.
    python -m integration.probe stream --port 7777 --interval 0.01 10.1.2.2
        numbered UDP datagrams until SIGTERM/SIGINT (or --duration); prints a JSON summary with
        how many were lost and the longest stretch without an answer.

Standard library only, so that it starts fast in every namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import cast

DEFAULT_PORT = 7777


@dataclass
class ProbeResult:
    target: str
    proto: str
    ok: bool
    rtt_ms: float | None
    error: str = ""


@dataclass
class StreamSummary:
    target: str
    sent: int
    received: int
    lost: int
    longest_gap_ms: float
    """The longest time between two consecutive answers (or start/end and an answer)."""
    duration_s: float


# --------------------------------------------------------------------------- server


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await asyncio.wait_for(reader.readline(), 30):
            writer.write(line)
            await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int) -> None:
    """Echo on `host`; the default 0.0.0.0 also serves `::` (dual-stack containers) when the
    namespace has IPv6."""
    loop = asyncio.get_running_loop()
    hosts = [host]
    if host == "0.0.0.0" and socket.has_ipv6:
        hosts.append("::")
    servers: list[asyncio.Server] = []
    transports: list[asyncio.BaseTransport] = []
    for h in hosts:
        try:
            servers.append(await asyncio.start_server(_tcp_echo, h, port, reuse_address=True))
            family = socket.AF_INET6 if ":" in h else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:  # beside the IPv4 socket on the same port
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((h, port))
            transport, _ = await loop.create_datagram_endpoint(_UdpEcho, sock=sock)
            transports.append(transport)
        except OSError:
            if h == host:
                raise
            break  # IPv6 disabled in this namespace: IPv4 only
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"probe: serving TCP and UDP on {' and '.join(hosts)} port {port}", flush=True)
    try:
        await stop.wait()
    finally:
        for t in transports:
            t.close()
        for server in servers:
            server.close()


# --------------------------------------------------------------------------- check


async def probe_tcp(target: str, port: int, limit: float) -> ProbeResult:
    nonce = os.urandom(8).hex().encode() + b"\n"
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(target, port), limit)
        try:
            writer.write(nonce)
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), limit)
        finally:
            writer.close()
    except (TimeoutError, OSError) as e:
        return ProbeResult(target, "tcp", False, None, _describe(e))
    if answer != nonce:
        return ProbeResult(target, "tcp", False, None, f"wrong echo {answer!r}")
    return ProbeResult(target, "tcp", True, (time.perf_counter() - start) * 1000)


async def probe_udp(target: str, port: int, limit: float, tries: int = 3) -> ProbeResult:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.connect((target, port))
        error = "no answer"
        for _ in range(tries):
            nonce = os.urandom(8)
            start = time.perf_counter()
            try:
                await loop.sock_sendall(sock, nonce)
                deadline = start + limit / tries
                while True:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        raise TimeoutError
                    data = await asyncio.wait_for(loop.sock_recv(sock, 2048), left)
                    if data == nonce:
                        return ProbeResult(
                            target, "udp", True, (time.perf_counter() - start) * 1000
                        )
            except (TimeoutError, OSError) as e:
                error = _describe(e)
        return ProbeResult(target, "udp", False, None, error)
    finally:
        sock.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    return e.strerror or str(e) if isinstance(e, OSError) else str(e)


async def check(targets: Sequence[str], port: int, limit: float) -> list[ProbeResult]:
    jobs = []
    for t in targets:
        jobs.append(probe_tcp(t, port, limit))
        jobs.append(probe_udp(t, port, limit))
    return list(await asyncio.gather(*jobs))


# --------------------------------------------------------------------------- stream

_SEQ = struct.Struct("!Q")


async def stream(target: str, port: int, interval: float, duration: float | None) -> StreamSummary:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((target, port))
    seen: set[int] = set()
    sent = 0
    start = time.monotonic()
    last_answer = start
    longest_gap = 0.0

    async def receive() -> None:
        nonlocal last_answer, longest_gap
        while True:
            try:
                data = await loop.sock_recv(sock, 64)
            except OSError:
                # ICMP errors (e.g. unreachable while a route is missing) surface here: go on.
                await asyncio.sleep(interval)
                continue
            if len(data) != _SEQ.size:
                continue
            now = time.monotonic()
            longest_gap = max(longest_gap, now - last_answer)
            last_answer = now
            seen.add(_SEQ.unpack(data)[0])

    receiver = asyncio.create_task(receive())
    try:
        while not stop.is_set():
            if duration is not None and time.monotonic() - start >= duration:
                break
            try:
                await loop.sock_sendall(sock, _SEQ.pack(sent))
            except OSError:
                pass  # a missing route while a daemon restarts: counted as lost
            sent += 1
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
        await asyncio.sleep(min(0.5, 20 * interval))  # late answers
    finally:
        receiver.cancel()
        sock.close()
    end = time.monotonic()
    longest_gap = max(longest_gap, end - last_answer - min(0.5, 20 * interval))
    received = len(seen)
    return StreamSummary(
        target, sent, received, sent - received, round(longest_gap * 1000, 1), end - start
    )


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integration.probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="TCP and UDP echo server")
    p_serve.add_argument("--host", default="0.0.0.0")
    p_serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    p_check = sub.add_parser("check", help="one TCP and one UDP round trip per target")
    p_check.add_argument("--port", type=int, default=DEFAULT_PORT)
    p_check.add_argument("--timeout", type=float, default=2.0)
    p_check.add_argument("targets", nargs="+")
    p_stream = sub.add_parser("stream", help="numbered UDP datagrams, loss summary at the end")
    p_stream.add_argument("--port", type=int, default=DEFAULT_PORT)
    p_stream.add_argument("--interval", type=float, default=0.01)
    p_stream.add_argument("--duration", type=float, default=None)
    p_stream.add_argument("target")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        asyncio.run(serve(args.host, args.port))
        return 0
    if args.cmd == "check":
        results = asyncio.run(check(args.targets, args.port, args.timeout))
        json.dump([asdict(r) for r in results], sys.stdout)
        print()
        return 0 if all(r.ok for r in results) else 1
    summary = asyncio.run(stream(args.target, args.port, args.interval, args.duration))
    json.dump(asdict(summary), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
