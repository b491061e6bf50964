"""When the backend reconciles: incremental passes for lease events, full passes when due.

A full pass (changed=None) runs at start, every --resync-period seconds counted from the last
full pass (so steady events do not put it off), after a new own lease, and after a failed pass;
a failed pass is retried with the project's back-off (1 s doubling to 30 s), and a success
resets it. Between full passes each batch of lease events makes an incremental pass over the
subnets that changed. One backend call at a time: `lock` is shared with the daemon's other
backend users (starting the backend, the iptables resync).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from backends.base import Backend
from overlay.health import Metrics
from subnetmgr.backoff import Backoff
from subnetmgr.model import Lease, Subnet

log = logging.getLogger("overlayd")

RETRY_AFTER_ERROR = 1.0
"""Seconds before the full pass that follows a failed reconcile (doubling up to MAX_BACKOFF)."""
MAX_BACKOFF = 30.0


class Reconciler:
    """Schedules `backend.reconcile` passes; see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        peers: Callable[[], Mapping[Subnet, Lease]],
        metrics: Metrics,
        *,
        period: float,
        incremental: bool = True,
        retry: Backoff | None = None,
    ) -> None:
        """`peers()` gives the current remote leases (a live view); `incremental=False`: lease
        events make full passes too (overlay.daemon.FULL_RECONCILE_ENV); `retry`: the delays
        before the full pass after a failed one (default 1 s doubling to 30 s)."""
        self.backend = backend
        self.peers = peers
        self.metrics = metrics
        self.period = period
        self.incremental = incremental
        self.lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._pending: set[Subnet] = set()
        """Subnets changed by lease events since the last pass took them."""
        self._full_due = True
        self._last_full = 0.0
        self._retry_at = 0.0
        self.errors = retry or Backoff(RETRY_AFTER_ERROR, MAX_BACKOFF, jitter=False)
        """The delay before the full pass after a failure; `errors.failures` in a row."""

    def changed(self, subnets: set[Subnet]) -> None:
        """Lease events changed these subnets: an incremental pass takes them."""
        self._pending |= subnets
        self._changed.set()

    def full_due(self) -> None:
        """The next pass is a full one (a new own lease). Call with `lock` held or not."""
        self._full_due = True
        self._changed.set()

    async def run(self, ready: asyncio.Event) -> None:
        """Once `ready` is set (the mirror listed), pass after pass until cancelled."""
        await ready.wait()
        while True:
            now = time.monotonic()
            if self._full_due:
                if self._retry_at > now:
                    await asyncio.sleep(self._retry_at - now)
            else:
                wait = self._last_full + self.period - now
                if wait > 0:
                    try:
                        async with asyncio.timeout(wait):
                            await self._changed.wait()
                    except TimeoutError:
                        pass
                if time.monotonic() >= self._last_full + self.period:
                    self._full_due = True
            self._changed.clear()
            await self.reconcile("full" if self._full_due else "change")

    async def reconcile(self, trigger: str) -> None:
        """Hand the backend the peers: on "change" with the subnets changed since the last pass
        (nothing to do when none did), else (or when a full pass is due) for a full pass."""
        async with self.lock:
            full = trigger == "full" or self._full_due or not self.incremental
            changed, self._pending = self._pending, set()
            if not full and not changed:
                return
            peers: Mapping[Subnet, Lease] = self.peers()
            if full:
                peers = dict(peers)  # a full pass reads all of it anyway: a stable copy
            started = time.monotonic()
            ok = False
            try:
                await self.backend.reconcile(peers, None if full else changed)
                ok = True
                if full:
                    self._full_due = False
                    self._last_full = started
                self.errors.reset()
            except Exception as e:  # a backend bug or kernel error must not stop the daemon
                self._full_due = True
                delay = self.errors.next()
                self._retry_at = time.monotonic() + delay
                log.error("reconcile (%s, %d peers) failed: %s; a full pass follows in %.1fs",
                          trigger, len(peers), e, delay,
                          exc_info=log.isEnabledFor(logging.DEBUG))  # fmt: skip
            finally:
                kind = "full" if full else "change"
                self.metrics.peers = len(peers)
                self.metrics.observe_reconcile(kind, time.monotonic() - started, ok)
            log.debug("reconciled %d peers (%s)", len(peers),
                      "full" if full else f"{len(changed)} changed")  # fmt: skip
