"""overlay.reconcile.Reconciler: failed passes are counted, retried as full passes after a
back-off that doubles, and a success resets it.

The backend here is a double that fails on demand, the one stand-in in this file: the real
backends fail only on kernel errors that a test cannot cause at a chosen pass. The scheduler,
metrics and back-off are the real ones."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from ipaddress import IPv4Address, IPv4Network

from backends.base import BackendAttrs
from overlay.health import Metrics
from overlay.reconcile import Reconciler
from subnetmgr.backoff import Backoff
from subnetmgr.model import Lease, LeaseAttrs, Subnet

PEER = IPv4Network("10.5.7.0/24")


class FailingBackend:
    """Records each pass (None for a full one); raises while `failures` is above zero."""

    type = "alloc"

    def __init__(self) -> None:
        self.passes: list[frozenset[Subnet] | None] = []
        self.failures = 0
        self.changed = asyncio.Condition()

    async def prepare(self) -> BackendAttrs:
        return BackendAttrs(self.type, None)

    async def start(self, own: Lease) -> int:
        return 1500

    async def reconcile(
        self, peers: Mapping[Subnet, Lease], changed: Collection[Subnet] | None = None
    ) -> None:
        async with self.changed:
            self.passes.append(None if changed is None else frozenset(changed))
            self.changed.notify_all()
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("netlink says no")

    async def close(self) -> None:
        pass

    async def wait_passes(self, n: int) -> None:
        async with asyncio.timeout(10), self.changed:
            await self.changed.wait_for(lambda: len(self.passes) >= n)


async def test_failed_passes_back_off_and_are_followed_by_full_passes_until_one_succeeds() -> None:
    backend = FailingBackend()
    backend.failures = 3
    metrics = Metrics()
    peers = {PEER: Lease(PEER, LeaseAttrs(IPv4Address("192.0.2.5"), None, "alloc"))}
    r = Reconciler(backend, lambda: peers, metrics, period=3600,  # type: ignore[arg-type]
                   retry=Backoff(0.01, 0.04, jitter=False))  # fmt: skip
    ready = asyncio.Event()
    ready.set()
    task = asyncio.create_task(r.run(ready))
    try:
        await backend.wait_passes(4)  # three failures, then a success
        assert backend.passes[:4] == [None, None, None, None]  # every retry a full pass
        assert metrics.reconcile_errors == 3
        assert metrics.reconciles["full"] == 4 and metrics.peers == 1
        assert r.errors.failures == 0 and r.errors.delay == 0.01  # the success reset it

        # An incremental pass that fails is followed by a full one, after the first delay.
        backend.failures = 1
        r.changed({PEER})
        await backend.wait_passes(6)
        assert backend.passes[4:6] == [frozenset({PEER}), None]
        assert metrics.reconcile_errors == 4 and metrics.reconciles["change"] == 1
        assert r.errors.failures == 0

        # A success without a failure before it needs no retry: a change is incremental.
        r.changed({PEER})
        await backend.wait_passes(7)
        assert backend.passes[6] == frozenset({PEER})
        assert metrics.reconcile_errors == 4
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_delay_doubles_with_each_failure_up_to_the_cap() -> None:
    backend = FailingBackend()
    backend.failures = 5
    r = Reconciler(backend, dict, Metrics(), period=3600,  # type: ignore[arg-type]
                   retry=Backoff(0.01, 0.04, jitter=False))  # fmt: skip
    delays = []
    for _ in range(5):
        await r.reconcile("full")
        delays.append(r.errors.delay)  # the delay the next failure would wait
    assert delays == [0.02, 0.04, 0.04, 0.04, 0.04]
    assert r.errors.failures == 5
    await r.reconcile("full")
    assert r.errors.failures == 0 and r.errors.delay == 0.01
