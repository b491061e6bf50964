"""Helpers shared by the lab integration tests (tests/test_integration*.py)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import pytest

from integration.lab import Lab
from integration.netns import run

ICMP_PROBE = """
# argv: target port. Prints "errno origin icmp_type icmp_code offender" for the first ICMP
# error the datagram drew, or "no answer" after 3 s.
import socket, struct, sys, select
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR: queue every ICMP error on the socket
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"anyone")
if not select.select([s], [], [], 3)[0]:
    print("no answer"); sys.exit()
msg, anc, flags, addr = s.recvmsg(100, 512, socket.MSG_ERRQUEUE)
for level, kind, data in anc:
    if level == socket.IPPROTO_IP and kind == 11:
        err, origin, icmp_type, code = struct.unpack_from("=IBBB", data)
        offender = socket.inet_ntoa(data[20:24])
        print(err, origin, icmp_type, code, offender)
"""


async def icmp_error(ns: str, target: str, port: int = 9) -> list[str]:
    """Send one UDP datagram from namespace `ns`; the ICMP error it drew (see ICMP_PROBE).

    ["101", "2", "3", "0", target] is ENETUNREACH from an ICMP net unreachable."""
    out = await run(sys.executable, "-c", ICMP_PROBE, target, str(port), ns=ns, limit=15)
    return out.split()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, limit: float = 20.0) -> None:
    """Poll `check` until it holds; fail naming `what` if it never does within `limit` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"never happened within {limit}s: {what}")
        await asyncio.sleep(0.1)


async def assert_full_connectivity(lab: Lab) -> None:
    """Every container reaches every other one, TCP and UDP."""
    entries = await lab.matrix()
    n = len(lab.containers())
    assert len(entries) == n * (n - 1) * 2
    assert [e for e in entries if not e.ok] == []


def remote_subnets(lab: Lab, index: int) -> set[str]:
    """The subnets of every host of the lab but host `index`."""
    return {str(n.subnet) for n in lab.state.nodes if n.index != index and n.subnet}
