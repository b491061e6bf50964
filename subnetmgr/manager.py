"""Lease lifecycle on top of a `Registry`: config, acquisition, renewal, and the lease mirror.

- `SubnetManager.acquire` follows flannel's order of preference (allocation.choose) and claims
  the subnet with a transaction, retrying on conflict (10 tries, as flannel).
- `SubnetManager.keep` renews before expiry without changing the value, and when our key is
  deleted, revoked or overwritten logs a WARNING and acquires again (same subnet when free).
- `LeaseMirror` keeps every valid lease in memory: list, then watch from the next revision;
  resumes after a disconnect from the last revision seen, re-lists after compaction; reports
  added, changed, renewed and removed leases. Given the network config, it hands on only the
  leases that fit it (subnetmgr.validate) and records the others in `registry.ignored`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from ipaddress import IPv4Address, IPv6Network
from types import MappingProxyType

from subnetmgr import allocation
from subnetmgr.model import (
    LEASE_TTL_SECONDS,
    ConfigError,
    Lease,
    LeaseAttrs,
    NetworkConfig,
    Subnet,
)
from subnetmgr.registry import (
    Compacted,
    LeaseEvent,
    LeaseLost,
    Registry,
    RegistryError,
)
from subnetmgr.validate import Ignored, check_lease, pick

__all__ = [
    "LeaseEvent",
    "LeaseMirror",
    "OutOfSubnets",
    "SubnetManager",
]

log = logging.getLogger("overlay.subnetmgr.manager")
mirror_log = logging.getLogger("overlay.subnetmgr.mirror")

ACQUIRE_ATTEMPTS = 10
"""Transactions tried before giving up on conflicts, as flannel."""

WIDEN_STEPS = 4
"""The candidate pool grows 4x after each lost race, up to 2**WIDEN_STEPS x (100 -> 1,600)."""

_NOBODY = LeaseAttrs(IPv4Address(0))

CONFIG_EXAMPLE = '{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}'


class OutOfSubnets(RuntimeError):
    """No free subnet is left in SubnetMin..SubnetMax."""


class AcquireConflict(RuntimeError):
    """Every attempt to claim a subnet lost the race to another host."""


def _same(a: Lease, b: Lease) -> bool:
    """Nothing to report: the same value, kind and expiration (a renewal is a change). The
    registry caches each etcd lease's expiry, so an unchanged lease keeps the same number."""
    value = (a.attrs, a.ipv6_subnet, a.reserved) == (b.attrs, b.ipv6_subnet, b.reserved)
    return value and a.expiration == b.expiration


class _Backoff:
    """Exponential backoff with jitter, reset after a success."""

    def __init__(self, first: float = 0.2, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay * random.uniform(0.5, 1.0))
        self.delay = min(self.delay * 2, self.cap)


class SubnetManager:
    """Acquires and keeps this host's lease. One per daemon; no state beyond its arguments."""

    def __init__(
        self,
        registry: Registry,
        *,
        renew_margin: float = 3600.0,
        ttl: int = LEASE_TTL_SECONDS,
        max_attempts: int = ACQUIRE_ATTEMPTS,
        rng: random.Random | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        if not 0 <= renew_margin < ttl:
            raise ValueError(
                f"renew margin {renew_margin}s must be at least 0 and below the lease TTL {ttl}s"
            )
        self.registry = registry
        self.renew_margin = renew_margin
        self.ttl = ttl
        self.max_attempts = max_attempts
        self._rng = rng or random.Random()
        self.config_revision = 0
        """The store revision at which wait_for_config read the config it returned."""

    # ------------------------------------------------------------------ config

    async def wait_for_config(self, retry_interval: float = 1.0) -> NetworkConfig:
        """Poll `<prefix>/config` until it holds a valid network config.

        A missing or invalid config is logged once at WARNING, then every 60 s at INFO; an
        unreachable etcd likewise. Any value (any size, nesting, encoding) is an invalid config
        at worst (NetworkConfig.from_json), never an exception here.
        """
        key = getattr(self.registry, "config_key", "<prefix>/config")
        last_problem = ""
        last_logged = 0.0
        while True:
            try:
                text, revision = await self.registry.get_config_value()
                if text is None:
                    problem = (
                        f"no network config at {key}; write one with "
                        f"`overlayctl config set '{CONFIG_EXAMPLE}'` "
                        f"(or `etcdctl put {key} '{CONFIG_EXAMPLE}'`)"
                    )
                else:
                    try:
                        config = NetworkConfig.from_json(text)
                    except ConfigError as e:
                        problem = f"invalid network config at {key}: {e}; waiting for a fix"
                    else:
                        if last_problem:
                            log.info("network config found at %s", key)
                        self.config_revision = revision
                        return config
            except RegistryError as e:
                problem = f"cannot read the network config: {e}"
            now = time.monotonic()
            if problem != last_problem:
                log.warning("%s", problem)
                last_problem, last_logged = problem, now
            elif now - last_logged >= 60:
                log.info("still waiting: %s", problem)
                last_logged = now
            await asyncio.sleep(retry_interval)

    # ------------------------------------------------------------------ acquire

    async def acquire(
        self,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        previous: Subnet | None = None,
        previous_ipv6: IPv6Network | None = None,
    ) -> Lease:
        """Get a lease for `attrs.public_ip`; see allocation.choose for the order.

        Raises OutOfSubnets when no subnet is free, AcquireConflict after `max_attempts`
        lost races, RegistryError when etcd cannot be used.
        """
        known: dict[tuple[Subnet, IPv6Network | None], Lease] = {}
        revision = 0
        relist = True
        for attempt in range(1, self.max_attempts + 1):
            if relist:
                listed, revision = await self.registry.list_leases(expirations=False)
                known = {(lease.subnet, lease.ipv6_subnet): lease for lease in listed}
            else:
                # We lost a create race: add the keys created since our list (one, or a few
                # when many hosts join at once) instead of listing and decoding every lease
                # again. Keys deleted meanwhile stay taken in our view: that is safe.
                new, revision = await self.registry.list_leases(
                    expirations=False, created_after=revision
                )
                known.update(((lease.subnet, lease.ipv6_subnet), lease) for lease in new)
            leases = list(known.values()) + self._undecodable_keys()
            # Flannel picks among the first 100 free subnets. After a lost race, pick among
            # more (400, then 1,600): hosts joining at once then stop colliding on the same
            # few subnets. An uncontended join is flannel's exactly.
            pool = allocation.MAX_CANDIDATES << min(2 * (attempt - 1), WIDEN_STEPS)
            choice = allocation.choose(
                config, leases, attrs.public_ip, previous, self._rng, pool, previous_ipv6
            )
            if choice is None and not relist:  # perhaps freed meanwhile: look at everything
                listed, revision = await self.registry.list_leases(expirations=False)
                known = {(lease.subnet, lease.ipv6_subnet): lease for lease in listed}
                leases = listed + self._undecodable_keys()
                choice = allocation.choose(
                    config, leases, attrs.public_ip, previous, self._rng, pool, previous_ipv6
                )
            if choice is None:
                raise OutOfSubnets(
                    f"out of subnets: no free /{config.subnet_len} left between "
                    f"{config.subnet_min.network_address} and {config.subnet_max.network_address} "
                    f"in {config.network}"
                    + (
                        f" (or no free /{config.ipv6_subnet_len} in {config.ipv6_network})"
                        if config.enable_ipv6
                        else ""
                    )
                    + f" ({len(leases)} leases); widen Network or SubnetMin/"
                    "SubnetMax, or delete stale leases"
                )
            # Only a lost create race is repaired by the keys created since; after anything
            # else (an own lease that changed under us) the next attempt lists everything.
            relist = choice.existing is not None
            if choice.existing is not None:
                lease = await self.registry.update_lease(choice.existing, attrs, self.ttl)
            elif choice.ipv6_subnet is None:
                lease = await self.registry.create_lease(choice.subnet, attrs, self.ttl)
            else:
                lease = await self.registry.create_lease(
                    choice.subnet, attrs, self.ttl, choice.ipv6_subnet
                )
                if lease is not None:
                    lease = await self._check_dual_stack_race(config, lease, revision)
            if lease is not None:
                log.info(
                    "acquired %s %s for %s (%s)",
                    "reservation" if lease.reserved else "lease",
                    lease.key,
                    attrs.public_ip,
                    choice.reason,
                )
                return lease
            log.info(
                "subnet %s was taken meanwhile (attempt %d of %d); trying again",
                choice.subnet,
                attempt,
                self.max_attempts,
            )
            # Jitter keeps hosts that collided from colliding again in lockstep.
            await asyncio.sleep(self._rng.uniform(0, 0.02 * attempt))
        raise AcquireConflict(
            f"could not claim a subnet for {attrs.public_ip} in {self.max_attempts} attempts: "
            "other hosts took each one first; try again"
        )

    async def _check_dual_stack_race(
        self, config: NetworkConfig, lease: Lease, revision: int
    ) -> Lease | None:
        """`lease` (a dual-stack key just created) when no older key names an overlapping IPv4
        or IPv6 subnet, else None with our key deleted again.

        etcd's transaction guards the whole key only: two hosts choosing the same IPv4 subnet
        with different IPv6 subnets (or the reverse) at once would both succeed, their keys
        being different (flannel has that race). Of two such keys the older (lower creation
        revision, then the smaller key) keeps the subnet, the rule every host's validation
        applies (subnetmgr.validate); the younger gives its key back and tries again, as after
        a lost create.

        Only keys created after `revision` can conflict: allocation saw every key up to it and
        chose subnets none of them overlaps. So this lists only those (usually ours alone)."""
        sub6 = lease.ipv6_subnet
        assert sub6 is not None
        listed, _ = await self.registry.list_leases(expirations=False, created_after=revision)
        mine = (lease.create_revision, lease.key)
        older = [
            other.key
            for other in listed
            if other.key != lease.key
            and (other.create_revision, other.key) < mine
            and (
                (allocation.blocks(config, other.subnet) and other.subnet.overlaps(lease.subnet))
                or (
                    other.ipv6_subnet is not None
                    and allocation.blocks_ipv6(config, other.ipv6_subnet)
                    and other.ipv6_subnet.overlaps(sub6)
                )
            )
        ]
        if not older:
            return lease
        log.info("subnet %s was taken meanwhile by %s; giving our key back", lease.key,
                 older[0])  # fmt: skip
        await self.registry.delete_lease(lease.subnet, sub6)
        return None

    def _undecodable_keys(self) -> list[Lease]:
        """A stand-in lease (PublicIP 0.0.0.0, so never ours) for each key whose value does not
        decode: its subnet is taken all the same (creating the key would fail, attempt after
        attempt), where allocation could not see it among the listed leases."""
        return [
            Lease(ig.subnet, _NOBODY)
            for ig in self.registry.ignored.current.values()
            if ig.lease is None and ig.subnet is not None
        ]

    # ------------------------------------------------------------------ keep

    async def keep(
        self, config: NetworkConfig, own: Lease, on_change: Callable[[Lease], Awaitable[None]]
    ) -> None:
        """Hold `own` until cancelled: renew it, and replace it when it is lost."""
        while True:
            reason = await self._hold(own)
            log.warning(
                "LOST our lease %s (%s): %s; acquiring a lease again, the same subnet if free",
                own.subnet,
                own.attrs.public_ip,
                reason,
            )
            own = await self._reacquire(config, own)
            log.warning(
                "re-acquired %s for %s after losing %s", own.subnet, own.attrs.public_ip, reason
            )
            await on_change(own)

    async def _reacquire(self, config: NetworkConfig, lost: Lease) -> Lease:
        backoff = _Backoff(first=0.5, cap=30.0)
        while True:
            try:
                return await self.acquire(config, lost.attrs, lost.subnet, lost.ipv6_subnet)
            except (RegistryError, OutOfSubnets, AcquireConflict) as e:
                log.error("cannot re-acquire a lease for %s: %s; retrying", lost.attrs.public_ip, e)
                await backoff.sleep()

    async def _hold(self, own: Lease) -> str:
        """Renew `own` and watch its key; return why it was lost."""
        current = own
        lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def set_lost(reason: str) -> None:
            if not lost.done():
                lost.set_result(reason)

        async def renew_loop() -> None:
            nonlocal current
            backoff = _Backoff(first=1.0, cap=30.0)
            while True:
                if current.expiration is None:  # a reservation does not expire
                    await asyncio.Event().wait()
                    return
                delay = current.expiration - self.renew_margin - time.time()
                if delay > 0 and math.isfinite(delay):  # inf: expiry unknown, renew now
                    await asyncio.sleep(delay)
                try:
                    current = await self.registry.renew_lease(current, self.ttl)
                    backoff.reset()
                    until = time.gmtime(current.expiration or 0)
                    log.info(
                        "renewed lease %s until %s UTC",
                        current.subnet,
                        time.strftime("%Y-%m-%d %H:%M:%S", until),
                    )
                except LeaseLost as e:
                    set_lost(str(e))
                    return
                except RegistryError as e:
                    left = (current.expiration or 0) - time.time()
                    log.error("could not renew lease %s (%.0fs left): %s", current.subnet, left, e)
                    await backoff.sleep()

        async def watch_loop() -> None:
            backoff = _Backoff()
            while True:
                try:
                    lease, revision = await self.registry.get_lease(own.subnet, own.ipv6_subnet)
                    if lease is None:
                        set_lost("the key is gone (expired, revoked or deleted)")
                        return
                    if lease.attrs != own.attrs:
                        set_lost(f"the key was overwritten with {lease.attrs.to_json()}")
                        return
                    backoff.reset()
                    async for ev in self.registry.watch_leases(
                        revision + 1, own.subnet, own.ipv6_subnet
                    ):
                        if ev.kind == "removed":
                            set_lost("the key was deleted or its etcd lease expired or was revoked")
                            return
                        if ev.lease.attrs != own.attrs:
                            set_lost(f"the key was overwritten with {ev.lease.attrs.to_json()}")
                            return
                except Compacted:
                    continue  # the next get_lease re-reads the state
                except RegistryError as e:
                    log.warning("watching our lease %s: %s; retrying", own.subnet, e)
                    await backoff.sleep()

        tasks = [asyncio.create_task(renew_loop()), asyncio.create_task(watch_loop())]
        try:
            waiters: list[asyncio.Future[object]] = [lost, *tasks]  # type: ignore[list-item]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                failure = task.exception() if task.done() and not task.cancelled() else None
                if failure is not None:
                    raise failure  # a bug in a loop: fail loudly rather than hang
            return await lost
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class LeaseMirror:
    """Every valid lease in etcd, kept current by a watch. Feed it to a backend's reconcile.

    `snapshot` holds one lease per subnet. With `config`, only leases that fit it (see
    subnetmgr.validate: inside Network, SubnetLen, a usable PublicIP, the oldest of several keys
    for one subnet, never over our own); the others are in `registry.ignored` with a reason.
    `set_own(lease)` names our own lease: its key keeps its subnet whatever it holds (the daemon
    tells a takeover from that), and it is not checked."""

    def __init__(
        self,
        registry: Registry,
        *,
        expirations: bool = True,
        config: NetworkConfig | None = None,
    ) -> None:
        """`expirations=False` lists without looking up each lease's expiry (see
        Registry.list_leases): a much faster start with 10,000 leases; the snapshot's leases
        of other hosts then show `expiration=inf` until they change."""
        self.registry = registry
        self.expirations = expirations
        self.config = config
        self._own: Lease | None = None
        self._entries: dict[str, Lease] = {}
        """Every lease that decoded, by key (two keys can name one subnet)."""
        self._groups: dict[Subnet, set[str]] = {}
        """subnet -> the keys in `_entries` that name it."""
        self._leases: dict[Subnet, Lease] = {}
        self.snapshot: Mapping[Subnet, Lease] = MappingProxyType(self._leases)
        self.ready = asyncio.Event()
        self.revision = 0
        """The last store revision the mirror reflects."""
        self.relists = 0
        """How many times the mirror listed everything (1 + compactions)."""
        self._outage = False

    def set_own(self, own: Lease | None) -> set[Subnet]:
        """Name our own lease (None: none); returns the subnets whose kept lease changed."""
        old, self._own = self._own, own
        touched = {lease.subnet for lease in (old, own) if lease is not None}
        return {s for s in touched if self._resolve(s)}

    def _resolve(self, subnet: Subnet) -> bool:
        """Decide which lease `subnet` keeps (recording the rejected keys); True if that changed."""
        own = self._own if self._own is not None and self._own.subnet == subnet else None
        candidates = []
        ignored = self.registry.ignored
        for key in self._groups.get(subnet, ()):
            lease = self._entries[key]
            problem = None
            if self.config is not None and (own is None or key != own.key):
                problem = check_lease(self.config, lease)
            if problem is None:
                candidates.append(lease)
            else:
                self._reject(key, lease, problem)
        kept, losers = pick(subnet, candidates, own)
        for lease in candidates:
            problem = losers.get(lease.key)
            if problem is None:
                ignored.clear(lease.key, checked=True)
            else:
                self._reject(lease.key, lease, problem)
        old = self._leases.get(subnet)
        if kept is None:
            return self._leases.pop(subnet, None) is not None
        self._leases[subnet] = kept
        return old is None or old.key != kept.key or not _same(old, kept)

    def _reject(self, key: str, lease: Lease, problem: tuple[str, str]) -> None:
        reason, detail = problem
        ignored = Ignored(key, reason, detail, lease.create_revision, lease)
        self.registry.ignored.ignore(ignored, (lease.attrs, lease.ipv6_subnet))

    def _put(self, lease: Lease) -> None:
        self._entries[lease.key] = lease
        self._groups.setdefault(lease.subnet, set()).add(lease.key)

    def _drop(self, key: str) -> Subnet | None:
        lease = self._entries.pop(key, None)
        if lease is None:
            return None
        group = self._groups[lease.subnet]
        group.discard(key)
        if not group:
            del self._groups[lease.subnet]
        self.registry.ignored.clear(key, checked=True)
        return lease.subnet

    def _replace(self, leases: list[Lease]) -> set[Subnet]:
        touched = set(self._leases)
        new_keys = {lease.key for lease in leases}
        for key in [k for k in self._entries if k not in new_keys]:
            self._drop(key)
        for lease in leases:
            self._put(lease)
        touched |= self._groups.keys()
        return {s for s in touched if self._resolve(s)}

    def _apply(self, events: list[LeaseEvent]) -> set[Subnet]:
        touched: set[Subnet] = set()
        for ev in events:
            touched.add(ev.lease.subnet)
            if ev.kind == "added":
                self._put(ev.lease)
            else:
                self._drop(ev.lease.key)
            self.revision = max(self.revision, ev.revision)
        return {s for s in touched if self._resolve(s)}

    async def run(
        self, on_change: Callable[[Mapping[Subnet, Lease], set[Subnet]], Awaitable[None]]
    ) -> None:
        """Until cancelled: list (on_change with every subnet), then follow the watch and call
        on_change(snapshot, changed subnets) per batch. Removed subnets are in `changed` and
        absent from the snapshot. A renewal is a change too: the same value with a new
        expiration (so that a daemon learns of its own renewal at once); a consumer that cares
        only for the data path compares `attrs`. Called again after a cancel, it resumes from
        `revision`."""
        backoff = _Backoff()
        need_list = not self.ready.is_set()  # run() again after a cancel resumes the watch
        self._outage = False
        while True:
            try:
                if need_list:
                    leases, revision = await self.registry.list_leases(expirations=self.expirations)
                    first = not self.ready.is_set()
                    changed = self._replace(leases)
                    self.revision = revision
                    self.relists += 1
                    need_list = False
                    mirror_log.info("listed %d leases at revision %d", len(leases), revision)
                    if first:
                        self.ready.set()
                        await on_change(self.snapshot, set(self._leases))
                    elif changed:
                        await on_change(self.snapshot, changed)
                await self._follow(on_change, backoff)
            except Compacted as e:
                mirror_log.warning("%s; listing all leases again", e)
                need_list = True
            except RegistryError as e:
                if not self._outage:
                    mirror_log.warning(
                        "lease watch interrupted: %s; resuming from revision %d",
                        e,
                        self.revision + 1,
                    )
                    self._outage = True
                else:
                    mirror_log.debug("lease watch still down: %s", e)
                await backoff.sleep()

    async def _follow(
        self,
        on_change: Callable[[Mapping[Subnet, Lease], set[Subnet]], Awaitable[None]],
        backoff: _Backoff,
    ) -> None:
        """Watch from revision + 1. Batches that arrive while on_change runs are merged."""
        queue: asyncio.Queue[list[LeaseEvent] | BaseException] = asyncio.Queue()

        async def read() -> None:
            try:
                async for batch in self.registry.watch_lease_batches(self.revision + 1):
                    await queue.put(batch)
                await queue.put(RegistryError("the lease watch ended"))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # handed to the consumer, which re-raises it
                await queue.put(e)

        reader = asyncio.create_task(read())
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                changed: set[Subnet] = set()
                error: BaseException | None = None
                for item in items:
                    if isinstance(item, BaseException):
                        error = item
                        break
                    changed |= self._apply(item)
                    backoff.reset()
                    if self._outage:
                        mirror_log.warning(
                            "etcd is back; following lease changes from revision %d",
                            self.revision + 1,
                        )
                        self._outage = False
                if changed:
                    await on_change(self.snapshot, changed)
                if error is not None:
                    raise error
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
