"""Helpers shared by the lab integration tests (tests/test_integration*.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from integration.containers import SubnetEnv
from integration.lab import PROVIDERS, Lab, LeaseView, open_lab
from integration.netns import in_ns, ip_json, run

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


def running_lab(
    tmp_path_factory: pytest.TempPathFactory,
    letter: str,
    backend: str,
    resync_period: str,
    provider: str = "netns",
) -> Iterator[Lab]:
    """For a module fixture (`yield from`): a 3-host lab named `<letter><random>` on
    `provider` (hosts as namespaces or as containers), taken down (daemons, etcd, namespaces,
    containers, state) at the end, also when `up` fails."""
    lab = open_lab(
        f"{letter}{uuid.uuid4().hex[:6]}",
        state_root=tmp_path_factory.mktemp("labs"),
        provider=provider,
    )
    try:
        asyncio.run(lab.up(nodes=3, backend=backend, resync_period=resync_period))
        yield lab
    finally:
        asyncio.run(lab.down())


# The module fixtures of the lab scenarios are parametrized with these: every scenario runs on
# hosts as network namespaces and on hosts as containers (overlayd under systemd).
LAB_PROVIDERS = PROVIDERS


async def node_metrics(lab: Lab, index: int) -> str:
    """Host `index`'s /metrics page (its daemon runs with FLANNELD_METRICS=true)."""
    from integration.lab import HEALTH_PORT

    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(lab.node(index).ip, HEALTH_PORT), 5
    )
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.split()[1] == "200", head
    return body


async def full_passes(lab: Lab) -> dict[int, int]:
    """overlay_reconciles_total{trigger="full"} of every host, by index."""
    out = {}
    for n in lab.state.nodes:
        for line in (await node_metrics(lab, n.index)).splitlines():
            if line.startswith('overlay_reconciles_total{trigger="full"} '):
                out[n.index] = int(line.split()[1])
    return out


async def wait_full_passes(lab: Lab, since: dict[int, int], more: int = 2) -> None:
    """Until every host made `more` full passes after the counts `since` (full_passes): a check
    that nothing changed then means something (a pass has provably run), where a sleep did not."""

    async def done() -> bool:
        now = await full_passes(lab)
        return all(now.get(i, 0) >= count + more for i, count in since.items())

    await eventually(done, f"{more} more full reconcile passes on every host")


class LabCrash(Exception):
    """Raised by a `crash_on` progress callback."""


def crash_on(prefix: str) -> Callable[[str], None]:
    """A Lab progress callback that raises LabCrash at the first message starting with `prefix`
    (to make `Lab.up` die at that step)."""

    def progress(msg: str) -> None:
        if msg.startswith(prefix):
            raise LabCrash(msg)

    return progress


@asynccontextmanager
async def probe_stream(lab: Lab, source: int, target: int) -> AsyncIterator[dict[str, Any]]:
    """A probe stream (`integration.probe stream`, one probe every 10 ms) from the container of
    host `source` to the one of host `target` while the block runs. The dict yielded holds the
    stream's JSON summary (sent, received, ...) once the block has ended without an error."""
    (_, src) = next((n, c) for n, c in lab.containers() if n.index == source)
    (_, dst) = next((n, c) for n, c in lab.containers() if n.index == target)
    summary: dict[str, Any] = {}
    streamer = await asyncio.create_subprocess_exec(
        *in_ns(src.ns, [sys.executable, "-m", "integration.probe", "stream",
                        "--interval", "0.01", str(dst.ip)]),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield summary
    finally:
        streamer.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(streamer.communicate(), 10)
    summary.update(json.loads(out))


@asynccontextmanager
async def underlay_capture(
    lab: Lab, index: int, pcap: Path, *capture_filter: str
) -> AsyncIterator[None]:
    """tcpdump (with `capture_filter`) on host `index`'s port on the underlay bridge (a bridge
    device itself only sees frames addressed to it, not the ones it forwards), writing `pcap`
    while the block runs. Once the block has ended without an error, waits until at least 4
    packets are on disk; tcpdump is stopped in any case."""
    from scapy.utils import rdpcap

    port_ns, port = await lab.underlay_port(index)
    dump = await asyncio.create_subprocess_exec(
        *in_ns(port_ns, ["tcpdump", "-i", port, "--immediate-mode",
                         "-U", "-n", "-w", str(pcap), *capture_filter]),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert dump.stderr is not None
        first = await asyncio.wait_for(dump.stderr.readline(), 10)
        assert b"listening on" in first, first
        yield

        async def written() -> bool:  # tcpdump has the packets; wait until they are on disk
            return len(rdpcap(str(pcap))) >= 4

        await eventually(written, "tcpdump wrote the probe's packets", 10)
    finally:
        dump.send_signal(signal.SIGINT)
        await asyncio.wait_for(dump.wait(), 10)


async def assert_kept_subnet_and_lease(lab: Lab, index: int, lease_before: LeaseView) -> None:
    """After host `index`'s daemon restarted: the same subnet in its subnet.env and a lease in
    etcd for it with the same attributes as `lease_before`."""
    subnet = lab.node(index).subnet
    env = SubnetEnv.read(lab.subnet_file(index))
    assert str(env.subnet) == subnet
    lease_after = (await lab.leases())[IPv4Network(subnet)]
    assert lease_after.attrs == lease_before.attrs


async def v6_routes(lab: Lab, index: int) -> set[str]:
    """The IPv6 routes host `index` has to other hosts' subnets (the lab's IPv6 network)."""
    net6 = IPv6Network(lab.state.network6)
    routes = await ip_json("-6", "route", "show", ns=lab.node(index).ns)
    return {
        r["dst"]
        for r in routes
        if "/" in r["dst"]
        and IPv6Network(r["dst"]).subnet_of(net6)
        and r.get("protocol") != "kernel"
    }


async def lease_kvs(lab: Lab) -> list[tuple[str, dict[str, Any]]]:
    """Every lease in the lab's etcd as (the key's last element, the value's JSON), read with
    etcdctl: the bytes as flannel and overlayd write them."""
    out = await lab.etcdctl("get", "--prefix", f"{lab.state.prefix}/subnets/", "-w", "json")
    return [
        (
            base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1],
            json.loads(base64.b64decode(kv["value"])),
        )
        for kv in json.loads(out).get("kvs", [])
    ]
