"""LeaseMirror against a real etcd: list + watch, expiry, malformed entries, resuming after an
etcd restart without losing events, and re-listing after compaction."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

import aetcd
import pytest

from integration.etcdserver import EtcdServer
from subnetmgr.manager import LeaseMirror, OwnLeaseEvent, SubnetManager
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig, Subnet
from subnetmgr.registry import EtcdOptions, EtcdRegistry
from tests.conftest import raw_client


def attrs(i: int) -> LeaseAttrs:
    return LeaseAttrs(
        IPv4Address(f"192.168.7.{i}"),
        None,
        "vxlan",
        {"VNI": 1, "VtepMAC": f"02:00:00:00:07:{i:02x}"},
    )


def net(i: int) -> IPv4Network:
    return IPv4Network(f"10.8.{i}.0/24")


@dataclass
class Recorder:
    """Collects on_change calls; `wait_for` blocks until the snapshot satisfies a predicate."""

    calls: list[tuple[frozenset[Subnet], set[Subnet]]] = field(default_factory=list)
    snapshot: dict[Subnet, Lease] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def __call__(self, snapshot: Mapping[Subnet, Lease], changed: set[Subnet]) -> None:
        self.calls.append((frozenset(snapshot), set(changed)))
        self.snapshot = dict(snapshot)
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(
        self, pred: Callable[[dict[Subnet, Lease]], bool], within: float = 10
    ) -> None:
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(lambda: pred(self.snapshot))

    def all_changed(self) -> set[Subnet]:
        out: set[Subnet] = set()
        for _, changed in self.calls:
            out |= changed
        return out


@asynccontextmanager
async def running(mirror: LeaseMirror, rec: Recorder) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(mirror.run(rec))
    try:
        async with asyncio.timeout(10):
            await mirror.ready.wait()
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def registry_for(server: EtcdServer, prefix: str) -> AsyncIterator[EtcdRegistry]:
    opts = EtcdOptions(endpoints=(server.endpoint,), prefix=prefix, timeout=2)
    async with await EtcdRegistry.connect(opts) as reg:
        yield reg


async def test_list_then_watch_reports_adds_changes_and_removals(
    etcd_server: EtcdServer, etcd_prefix: str, raw: aetcd.Client
) -> None:
    async with registry_for(etcd_server, etcd_prefix) as reg:
        await reg.create_lease(net(1), attrs(1), 600)
        await reg.reserve(net(2), attrs(2).public_ip)
        mirror, rec = LeaseMirror(reg), Recorder()
        async with running(mirror, rec):
            assert rec.calls[0] == (frozenset({net(1), net(2)}), {net(1), net(2)})
            assert mirror.snapshot[net(2)].reserved and not mirror.snapshot[net(1)].reserved
            await reg.create_lease(net(3), attrs(3), 600)
            await rec.wait_for(lambda s: net(3) in s)
            assert rec.calls[-1][1] == {net(3)}
            assert mirror.snapshot[net(3)].attrs == attrs(3)
            # A renewal (same value, later expiry) is reported, then a changed value.
            calls = len(rec.calls)
            before = mirror.snapshot[net(3)]
            renewed = await reg.renew_lease(before, 900)
            assert renewed.expiration is not None and before.expiration is not None
            assert renewed.expiration > before.expiration + 200
            await rec.wait_for(lambda s: s[net(3)].expiration == renewed.expiration)
            assert mirror.snapshot[net(3)].attrs == attrs(3)
            await reg.update_lease(renewed, attrs(33), 600)
            await rec.wait_for(lambda s: s[net(3)].attrs == attrs(33))
            assert [c for _, c in rec.calls[calls:]] == [{net(3)}, {net(3)}]
            await reg.delete_lease(net(1))
            await rec.wait_for(lambda s: net(1) not in s)
            assert rec.calls[-1] == (frozenset({net(2), net(3)}), {net(1)})
            assert mirror.relists == 1


async def test_expired_lease_disappears_from_every_mirror(
    etcd_server: EtcdServer, etcd_prefix: str, raw: aetcd.Client
) -> None:
    async with (
        registry_for(etcd_server, etcd_prefix) as reg_a,
        registry_for(etcd_server, etcd_prefix) as reg_b,
    ):
        await reg_a.create_lease(net(1), attrs(1), 600)
        short = await reg_a.create_lease(net(2), attrs(2), 2)  # etcd's minimum TTL is ~2 s
        assert short is not None
        mirrors = [(LeaseMirror(reg), Recorder()) for reg in (reg_a, reg_b)]
        async with running(*mirrors[0]), running(*mirrors[1]):
            for mirror, _ in mirrors:
                assert set(mirror.snapshot) == {net(1), net(2)}
            for mirror, rec in mirrors:
                await rec.wait_for(lambda s: net(2) not in s, within=15)
                assert set(mirror.snapshot) == {net(1)}
                assert net(2) in rec.calls[-1][1]


async def test_malformed_entries_are_logged_and_skipped(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    raw: aetcd.Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sub = f"{etcd_prefix}/subnets/"
    async with registry_for(etcd_server, etcd_prefix) as reg:
        await reg.create_lease(net(1), attrs(1), 600)
        await raw.put(f"{sub}10.8.2.0-24".encode(), b"{broken")
        mirror, rec = LeaseMirror(reg), Recorder()
        with caplog.at_level(logging.WARNING, logger="overlay.subnetmgr"):
            async with running(mirror, rec) as task:
                assert set(mirror.snapshot) == {net(1)}
                await raw.put(f"{sub}not-a-subnet".encode(), attrs(4).to_json().encode())
                await raw.put(f"{sub}10.8.5.0-24".encode(), b'{"PublicIP":"nope"}')
                await reg.create_lease(net(6), attrs(6), 600)
                await rec.wait_for(lambda s: net(6) in s)
                assert set(mirror.snapshot) == {net(1), net(6)}
                # A valid lease overwritten with garbage is no longer a lease.
                await raw.put(f"{sub}10.8.1.0-24".encode(), b"[]")
                await rec.wait_for(lambda s: net(1) not in s)
                assert set(mirror.snapshot) == {net(6)}
                assert not task.done()
    for bad in ("10.8.2.0-24", "not-a-subnet", "10.8.5.0-24"):
        assert f"{sub}{bad}" in caplog.text


async def test_watch_resumes_after_etcd_restart_without_losing_events(
    etcd_factory: Callable[..., EtcdServer], etcd_prefix: str
) -> None:
    server = etcd_factory()
    async with (
        registry_for(server, etcd_prefix) as reg,
        registry_for(server, etcd_prefix) as writer,
    ):
        for i in (1, 2):
            await writer.create_lease(net(i), attrs(i), 600)
        mirror, rec = LeaseMirror(reg), Recorder()
        async with running(mirror, rec) as task:
            await writer.create_lease(net(3), attrs(3), 600)
            await rec.wait_for(lambda s: net(3) in s)
            before_restart = len(rec.calls)
            server.kill()
            await asyncio.sleep(0.5)  # the mirror notices and starts retrying
            server.start()
            # Written right after the restart, likely before the mirror is back: only resuming
            # from the last revision it saw delivers these as events.
            await writer.create_lease(net(4), attrs(4), 600)
            await writer.delete_lease(net(1))
            await writer.update_lease(mirror.snapshot[net(2)], attrs(22), 600)
            await writer.create_lease(net(5), attrs(5), 600)
            await rec.wait_for(lambda s: net(5) in s, within=20)
            truth, _ = await writer.list_leases()
            # (Expiry times are not compared: etcd extends leases when it restarts.)
            assert {s: x.attrs for s, x in mirror.snapshot.items()} == {
                x.subnet: x.attrs for x in truth
            }
            assert set(mirror.snapshot) == {net(2), net(3), net(4), net(5)}
            assert mirror.snapshot[net(2)].attrs == attrs(22)
            reported: set[Subnet] = set()
            for _, changed in rec.calls[before_restart:]:
                reported |= changed
            assert reported == {net(1), net(2), net(4), net(5)}
            assert mirror.relists == 1  # resumed, not re-listed
            # And it keeps following after that.
            await writer.delete_lease(net(5))
            await rec.wait_for(lambda s: net(5) not in s)
            assert not task.done()


async def test_compaction_forces_a_relist_that_reports_the_difference(
    etcd_factory: Callable[..., EtcdServer], etcd_prefix: str
) -> None:
    server = etcd_factory()
    async with (
        registry_for(server, etcd_prefix) as reg,
        registry_for(server, etcd_prefix) as writer,
        raw_client(server) as raw,
    ):
        for i in (1, 2, 3):
            await writer.create_lease(net(i), attrs(i), 600)
        mirror, rec = LeaseMirror(reg), Recorder()
        async with running(mirror, rec):
            pass  # listed; now stopped
        assert mirror.relists == 1
        # While the mirror is away: changes, then the history behind them is compacted.
        await writer.delete_lease(net(1))
        await writer.update_lease(mirror.snapshot[net(2)], attrs(22), 600)
        await writer.create_lease(net(4), attrs(4), 600)
        _, head = await writer.list_leases()
        await raw.compact(head)
        rec.calls.clear()
        async with running(mirror, rec):  # run() again resumes from the old revision
            await rec.wait_for(lambda s: net(4) in s)
            assert mirror.relists == 2
            assert rec.calls[0][1] == {net(1), net(2), net(4)}
            assert set(mirror.snapshot) == {net(2), net(3), net(4)}
            assert mirror.snapshot[net(2)].attrs == attrs(22)
            # Watching again from the new revision.
            await writer.create_lease(net(5), attrs(5), 600)
            await rec.wait_for(lambda s: net(5) in s)
            assert mirror.relists == 2


async def test_mirror_without_expiry_lookups_keeps_reservations_apart(
    etcd_server: EtcdServer, etcd_prefix: str, raw: aetcd.Client
) -> None:
    async with (
        registry_for(etcd_server, etcd_prefix) as writer,
        registry_for(etcd_server, etcd_prefix) as reg,
    ):
        await writer.create_lease(net(1), attrs(1), 600)
        await writer.reserve(net(2), attrs(2).public_ip)
        mirror, rec = LeaseMirror(reg, expirations=False), Recorder()
        async with running(mirror, rec):
            assert mirror.snapshot[net(1)].expiration == float("inf")
            assert mirror.snapshot[net(2)].reserved
            assert not mirror.snapshot[net(1)].reserved
            await writer.create_lease(net(3), attrs(3), 600)
            await rec.wait_for(lambda s: net(3) in s)
            exp = mirror.snapshot[net(3)].expiration  # watched events are looked up
            assert exp is not None and exp < float("inf")


async def test_mirror_started_while_etcd_is_down_lists_once_it_is_up(
    etcd_factory: Callable[..., EtcdServer], etcd_prefix: str
) -> None:
    server = etcd_factory()
    async with registry_for(server, etcd_prefix) as writer:
        await writer.create_lease(net(1), attrs(1), 600)
        server.kill()
        async with registry_for(server, etcd_prefix) as reg:
            mirror, rec = LeaseMirror(reg), Recorder()
            task = asyncio.create_task(mirror.run(rec))
            try:
                await asyncio.sleep(1.0)  # several failed lists meanwhile
                assert not mirror.ready.is_set() and not task.done()
                server.start()
                async with asyncio.timeout(20):
                    await mirror.ready.wait()
                assert set(mirror.snapshot) == {net(1)}
                await writer.create_lease(net(2), attrs(2), 600)
                await rec.wait_for(lambda s: net(2) in s)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


@pytest.mark.slow
async def test_renewals_by_keep_are_reported_at_once_by_every_mirror(
    etcd_server: EtcdServer, etcd_prefix: str, raw: aetcd.Client
) -> None:
    """keep() renews (a short TTL); the renewing host's mirror and another host's both report
    each renewal as a change of that subnet with the new expiration, without any resync."""
    cfg = NetworkConfig.from_dict({"Network": "10.8.0.0/16", "Backend": {"Type": "vxlan"}})
    async with (
        registry_for(etcd_server, etcd_prefix) as reg,
        registry_for(etcd_server, etcd_prefix) as other,
    ):
        await reg.create_lease(net(9), attrs(9), 600)  # a quiet peer: never reported again
        mgr = SubnetManager(reg, ttl=6, renew_margin=4.0)  # renews every ~2 s
        own = await mgr.acquire(cfg, attrs(1))
        assert own.expiration is not None
        mirrors = [(LeaseMirror(r), Recorder()) for r in (reg, other)]
        async with running(*mirrors[0]), running(*mirrors[1]):

            async def lost(ev: OwnLeaseEvent) -> None:
                if ev.kind not in ("renewed", "expiring"):
                    raise AssertionError(f"keep() reported {ev}")

            keeper = asyncio.create_task(mgr.keep(cfg, own, lost))
            try:
                for _mirror, rec in mirrors:
                    first = rec.snapshot[own.subnet].expiration
                    assert first is not None

                    def renewed_twice(s: dict[Subnet, Lease], first: float = first) -> bool:
                        exp = s[own.subnet].expiration
                        return exp is not None and exp >= first + 3

                    await rec.wait_for(renewed_twice, within=15)
                for mirror, rec in mirrors:
                    assert rec.all_changed() == {own.subnet, net(9)}  # net(9): the first list
                    assert [c for _, c in rec.calls[1:]] == [{own.subnet}] * (len(rec.calls) - 1)
                    assert mirror.snapshot[own.subnet].attrs == attrs(1)
                    assert not mirror.snapshot[own.subnet].reserved
                assert not keeper.done()
            finally:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
