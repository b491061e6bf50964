"""Watches that notice a partition, against real etcd members.

- A 3-member cluster, each member in its own network namespace; one member's links to the
  others go down (a real partition: the member runs, answers clients, and has no leader). The
  lease mirror watches through that member first: etcd cancels a watch that requires a leader,
  the registry fails over, and the mirror resumes from its last revision with every event
  exactly once.
- A single etcd reached through a relay that goes silent (connections open, nothing passes):
  the progress probe finds the silent watch and the mirror moves to the next endpoint.

Traffic only to loopback and to the namespaces the test made; the namespaces (with their
links) and every etcd are removed at the end, also on failure. Bounds below are liveness
limits, not speed asserts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from integration.etcdserver import EtcdServer
from subnetmgr.manager import LeaseMirror
from subnetmgr.model import Lease, LeaseAttrs, Subnet
from subnetmgr.registry import EtcdOptions, EtcdRegistry, LeaseBatch
from tests.labtools import eventually
from tests.netns import Netns, NetnsLab, run
from tests.tcprelay import TcpRelay

pytestmark = [pytest.mark.root, pytest.mark.slow]


class RecordingRegistry(EtcdRegistry):
    """The real registry; every lease event its watches deliver is recorded (revision, key)."""

    delivered: list[tuple[int, str, str]]

    async def watch_lease_batches(
        self, start_revision: int, subnet: Subnet | None = None
    ) -> AsyncIterator[LeaseBatch]:
        async for batch in super().watch_lease_batches(start_revision, subnet):
            self.delivered.extend((ev.revision, ev.kind, ev.lease.key) for ev in batch)
            yield batch


def attrs(i: int) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"192.168.9.{i}"), None, "vxlan", {"VNI": 1})


@dataclass
class Member:
    """One etcd member in its own namespace: client and peer URLs on 10.Q.i.1."""

    ns: Netns
    name: str
    addr: str
    mesh: dict[int, str] = field(default_factory=dict)
    """Index of another member -> this namespace's end of the veth to it."""

    @property
    def endpoint(self) -> str:
        return f"http://{self.addr}:2379"

    @property
    def peer_url(self) -> str:
        return f"http://{self.addr}:2380"


def _free_range() -> int:
    """A 10.Q.0.0/16 that the root namespace has no route into (nor an address in)."""
    for _ in range(50):
        q = random.randint(100, 250)
        if not run(["ip", "-4", "route", "show", "to", "match", f"10.{q}.0.1"]).strip().startswith(
            f"10.{q}."
        ) and f" 10.{q}." not in run(["ip", "-4", "-o", "addr"]):
            return q
    raise RuntimeError("no free 10.Q.0.0/16 range for the test")


def _healthy(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/health", timeout=1) as r:
            return b"true" in r.read()
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[Member]]:
    """Three etcd members, each in its own network namespace, linked to each other by one veth
    per pair (the peer traffic) and to the root namespace by one veth each (the clients).
    Downing a member's veths to the others is a real partition: clients still reach it."""
    q = _free_range()
    with NetnsLab() as lab:
        members = []
        for i in range(1, 4):
            ns = lab.netns(f"etcd{i}")
            root_end = f"h{i}-{lab.token}"
            ns_end = f"r{i}-{lab.token}"
            ns.ip("link", "add", ns_end, "type", "veth", "peer", "name", root_end, "netns", "1")
            ns.ip("addr", "add", f"10.{q}.{i}.1/24", "dev", ns_end)
            ns.ip("link", "set", ns_end, "up")
            run(["ip", "addr", "add", f"10.{q}.{i}.254/24", "dev", root_end])
            run(["ip", "link", "set", root_end, "up"])
            members.append(Member(ns, f"m{i}-{lab.token}", f"10.{q}.{i}.1"))
        for i, a in enumerate(members, 1):
            for j, b in enumerate(members, 1):
                if i < j:
                    a_end, b_end = lab.veth(a.ns, b.ns)
                    a.mesh[j], b.mesh[i] = a_end, b_end
                    a.ns.ip("route", "add", f"{b.addr}/32", "dev", a_end)
                    b.ns.ip("route", "add", f"{a.addr}/32", "dev", b_end)
        initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        for m in members:
            log = open(tmp_path / f"{m.name}.log", "ab")  # handed to the child
            m.ns.popen([
                "etcd", "--name", m.name, "--data-dir", str(tmp_path / m.name),
                "--listen-client-urls", m.endpoint, "--advertise-client-urls", m.endpoint,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", initial, "--log-level", "warn", "--logger", "zap",
            ], stdout=log, stderr=log, stdin=subprocess.DEVNULL)  # fmt: skip
            log.close()
        deadline = time.monotonic() + 30
        while not all(_healthy(m.endpoint) for m in members):
            if time.monotonic() > deadline:
                raise TimeoutError("the 3-member etcd cluster did not become healthy in 30 s")
            time.sleep(0.1)
        yield members


def cut_off(member: Member) -> None:
    """Down `member`'s veths to the other members: no peer traffic either way."""
    for link in member.mesh.values():
        member.ns.ip("link", "set", link, "down")


async def test_a_member_cut_off_from_its_peers_makes_the_watch_fail_over_and_resume(
    cluster: list[Member], etcd_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    first, second, third = cluster
    # The mirror talks to `first`; the writer (another host) to `second`.
    opts = EtcdOptions(endpoints=tuple(m.endpoint for m in cluster), prefix=etcd_prefix,
                       timeout=2)  # fmt: skip
    writer_opts = EtcdOptions(endpoints=(second.endpoint, third.endpoint), prefix=etcd_prefix,
                              timeout=2)  # fmt: skip
    async with (
        RecordingRegistry(opts) as reg,
        await EtcdRegistry.connect(writer_opts) as writer,
    ):
        reg.delivered = []
        seen: dict[Subnet, Lease] = {}
        changed = asyncio.Event()

        async def on_change(snapshot: Mapping[Subnet, Lease], subnets: set[Subnet]) -> None:
            seen.clear()
            seen.update(snapshot)
            changed.set()

        mirror = LeaseMirror(reg)
        task = asyncio.create_task(mirror.run(on_change))
        try:
            async with asyncio.timeout(20):
                await mirror.ready.wait()
            written: list[tuple[int, str, str]] = []
            lease = await writer.create_lease(IPv4Network("10.9.1.0/24"), attrs(1), 600)
            assert lease is not None
            written.append((lease.create_revision, "added", lease.key))

            async def mirror_has(n: int) -> bool:
                return len(reg.delivered) >= n

            await eventually(lambda: mirror_has(1), "the first event")
            with caplog.at_level(logging.WARNING, logger="overlay.subnetmgr"):
                cut_off(first)
                cut_at = time.monotonic()
                # The two others keep a quorum: a few writes after they elected a leader.
                for i in (2, 3, 4):
                    subnet = IPv4Network(f"10.9.{i}.0/24")
                    made: Lease | None = None

                    async def write(subnet: IPv4Network = subnet, i: int = i) -> bool:
                        nonlocal made
                        try:
                            made = await writer.create_lease(subnet, attrs(i), 600)
                        except Exception:
                            return False
                        return made is not None

                    await eventually(write, f"a write to the majority ({subnet})", limit=30)
                    assert made is not None
                    written.append((made.create_revision, "added", made.key))
                assert await writer.delete_lease(IPv4Network("10.9.2.0/24"))
                _, head = await writer.get_lease(IPv4Network("10.9.2.0/24"))
                written.append((head, "removed", "10.9.2.0-24"))
                await eventually(lambda: mirror_has(len(written)), "every event after the cut",
                                 limit=60)  # fmt: skip
                # Reported, not asserted: from the cut to every event delivered elsewhere.
                print(f"\npartitioned member: all events delivered {time.monotonic() - cut_at:.1f}"
                      " s after the cut")  # fmt: skip
            # Every event once, in order: nothing lost, nothing repeated across the failover.
            assert reg.delivered == written
            assert set(mirror.snapshot) == {IPv4Network(f"10.9.{i}.0/24") for i in (1, 3, 4)}
            assert mirror.relists == 1  # resumed from its revision, not listed again
            assert reg._conn.endpoint.url != first.endpoint  # it moved off the cut-off member
            # etcd said why: the member lost its leader (require-leader at work).
            text = " ".join(r.getMessage() for r in caplog.records)
            assert "leader" in text, text[-2000:]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_silent_watch_is_found_by_the_progress_probe_and_moved(
    etcd_server: EtcdServer, etcd_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = int(etcd_server.endpoint.rsplit(":", 1)[1])
    async with TcpRelay("127.0.0.1", port) as relay:
        opts = EtcdOptions(endpoints=(relay.endpoint, etcd_server.endpoint), prefix=etcd_prefix,
                           timeout=1, watch_idle=1)  # fmt: skip
        direct = EtcdOptions(endpoints=(etcd_server.endpoint,), prefix=etcd_prefix)
        async with RecordingRegistry(opts) as reg, await EtcdRegistry.connect(direct) as writer:
            reg.delivered = []
            mirror = LeaseMirror(reg)

            async def on_change(snapshot: Mapping[Subnet, Lease], subnets: set[Subnet]) -> None:
                pass

            task = asyncio.create_task(mirror.run(on_change))
            try:
                async with asyncio.timeout(20):
                    await mirror.ready.wait()
                await asyncio.sleep(0.5)  # the watch is created (through the relay)
                relay.freeze()  # the path stays open and says nothing
                frozen_at = time.monotonic()
                lease = await writer.create_lease(IPv4Network("10.9.7.0/24"), attrs(7), 600)
                assert lease is not None

                async def delivered() -> bool:
                    return bool(reg.delivered)

                with caplog.at_level(logging.WARNING, logger="overlay.subnetmgr"):
                    await eventually(delivered, "the event through the other endpoint", limit=60)
                print(f"\nsilent watch: event delivered {time.monotonic() - frozen_at:.1f} s after "
                      "the path went silent (watch_idle 1 s, timeout 1 s)")  # fmt: skip
                assert reg.delivered == [(lease.create_revision, "added", lease.key)]
                # Found by the probe (gRPC keepalive would also end it, later and otherwise).
                text = " ".join(r.getMessage() for r in caplog.records)
                assert "progress request got no answer" in text, text[-2000:]
                assert mirror.relists == 1
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
