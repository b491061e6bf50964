"""One exponential back-off with jitter for every retry loop in the project.

subnetmgr/ and overlay/ both use it (overlay imports subnetmgr, never the other way round):
the lease keeper, the lease mirror, the daemon's etcd retries and supervised loops, the reconcile
scheduler after a failed pass, and the MQTT publisher.
"""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Delays of `first`, 2x`first`, ... up to `cap` seconds; `reset()` after a success.

    With `jitter` (the default) each sleep lasts a random 50-100 % of the delay, so that hosts
    that failed together do not retry in lockstep. `failures` counts the delays handed out since
    the last reset (a loop logs the first failure loudly and the rest quietly)."""

    def __init__(
        self,
        first: float = 0.5,
        cap: float = 30.0,
        *,
        jitter: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"back-off needs 0 < first <= cap, got first={first} cap={cap}")
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.delay = first
        """The delay the next failure waits (before jitter)."""
        self.failures = 0

    def reset(self) -> None:
        self.delay = self.first
        self.failures = 0

    def next(self) -> float:
        """The seconds to wait after one more failure; the delay doubles for the next one."""
        wait = self.delay * (self._rng.uniform(0.5, 1.0) if self.jitter else 1.0)
        self.delay = min(self.delay * 2, self.cap)
        self.failures += 1
        return wait

    async def sleep(self) -> float:
        """Wait `next()` seconds; returns how long it waited."""
        wait = self.next()
        await asyncio.sleep(wait)
        return wait
