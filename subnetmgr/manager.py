"""Lease lifecycle on top of a `Registry`: config, acquisition, renewal, and the lease mirror.

- `SubnetManager.acquire` follows flannel's order of preference (allocation.choose) and claims
  the subnet with a transaction, retrying on conflict (10 tries, as flannel).
- `SubnetManager.keep` renews before expiry without changing the value, and is the one place
  that knows whether our lease holds: it tells its caller through OwnLeaseEvent (renewed,
  expiring, lost, taken, duplicate, reacquired). A lost lease is taken back when its subnet is
  free; another host holding it is reported and waited out (or, with on_taken="move", another
  subnet is taken); a host with our PublicIP is never fought over (docs/subnetmgr.md).
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
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from types import MappingProxyType
from typing import Literal

from subnetmgr import allocation
from subnetmgr.backoff import Backoff
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
    LeaseBatch,
    LeaseEvent,
    LeaseLost,
    Registry,
    RegistryError,
)
from subnetmgr.validate import Ignored, check_lease, pick

__all__ = [
    "TAKEN_POLICIES",
    "LeaseEvent",
    "LeaseMirror",
    "OutOfSubnets",
    "OwnLeaseEvent",
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


TAKEN_POLICIES = ("wait", "move")
"""What keep() does when another host holds our subnet after we lost it (docs/subnetmgr.md):
"wait" (default) keeps the subnet, reports, and takes it back once it is free; "move" takes
another subnet at once (subnet.env, device and rules follow)."""


@dataclass(frozen=True)
class OwnLeaseEvent:
    """What keep() tells its caller about our lease.

    - renewed: `lease` is the renewed lease (new expiration);
    - expiring: a renewal failed; `reason` says why and how long is left (once per outage);
    - lost: the lease no longer holds; `reason` says why (gone, expired while etcd was
      unreachable, taken by another host, rewritten by a host with our PublicIP);
    - taken: another host (`holder`) holds our subnet now;
    - duplicate: a host with our PublicIP but other backend data holds it (`holder`): two hosts
      share one PublicIP; we stop writing the key;
    - reacquired: `lease` is ours again (the same subnet, or another with the "move" policy).
    """

    kind: Literal["renewed", "expiring", "lost", "taken", "duplicate", "reacquired"]
    lease: Lease
    reason: str = ""
    holder: LeaseAttrs | None = None


OnOwnLease = Callable[[OwnLeaseEvent], Awaitable[None]]


@dataclass(frozen=True)
class _Loss:
    kind: Literal["gone", "expired", "taken", "duplicate"]
    reason: str
    holder: LeaseAttrs | None = None


_SHOWN = 300
"""Characters of another host's lease value shown in a reason (a value may be 64 KiB)."""


def _shown(attrs: LeaseAttrs) -> str:
    """A lease value for a log line or /readyz: JSON (ASCII, control characters escaped),
    cut to _SHOWN characters."""
    text = attrs.to_json()
    return text if len(text) <= _SHOWN else text[:_SHOWN] + f"... ({len(text)} characters)"


def _loss_of(own: Lease, holder: LeaseAttrs | None) -> _Loss:
    """How `own` was lost, given what its key holds now (None: nothing)."""
    if holder is None:
        return _Loss("gone", "the key is gone (expired, revoked or deleted)")
    ours = own.attrs.address
    field, flag = (
        ("PublicIP", "--public-ip") if ours.version == 4 else ("PublicIPv6", "--public-ipv6")
    )
    if holder.address == ours:
        return _Loss(
            "duplicate",
            f"another host with our {field} {ours} rewrote it with "
            f"{_shown(holder)}; two hosts share this {field}: give each host its own with "
            f"{flag}, or choose another interface with --iface",
            holder,
        )
    theirs = holder.address
    return _Loss(
        "taken",
        f"lease {own.ident} lost to {theirs} ({field} {theirs} holds the key now: "
        f"{_shown(holder)})",
        holder,
    )


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
        on_taken: str = "wait",
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        if not 0 <= renew_margin < ttl:
            raise ValueError(
                f"renew margin {renew_margin}s must be at least 0 and below the lease TTL {ttl}s"
            )
        if on_taken not in TAKEN_POLICIES:
            raise ValueError(f"on_taken must be one of {', '.join(TAKEN_POLICIES)}: {on_taken!r}")
        self.on_taken = on_taken
        self.registry = registry
        self.renew_margin = renew_margin
        self.ttl = ttl
        self.retry_cap = max(0.5, min(30.0, ttl / 4))
        """The longest wait between retries of a renewal or of getting our lease back: 30 s, or a
        quarter of a short TTL (a 30 s wait would let a lease of seconds expire unrenewed)."""
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
        previous: IPv4Network | None = None,
        previous_ipv6: IPv6Network | None = None,
    ) -> Lease:
        """Get a lease for `attrs.public_ip`; see allocation.choose for the order.

        Raises OutOfSubnets when no subnet is free, AcquireConflict after `max_attempts`
        lost races, RegistryError when etcd cannot be used.
        """
        known: dict[tuple[IPv4Network, IPv6Network | None], Lease] = {}
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
                config, leases, attrs.public_ip, previous, self._rng, pool, previous_ipv6,
                attrs.public_ipv6,
            )  # fmt: skip
            if choice is None and not relist:  # perhaps freed meanwhile: look at everything
                listed, revision = await self.registry.list_leases(expirations=False)
                known = {(lease.subnet, lease.ipv6_subnet): lease for lease in listed}
                leases = listed + self._undecodable_keys()
                choice = allocation.choose(
                    config, leases, attrs.public_ip, previous, self._rng, pool, previous_ipv6,
                    attrs.public_ipv6,
                )  # fmt: skip
            if choice is None and config.subnet_min is None:
                raise OutOfSubnets(
                    f"out of subnets: no free /{config.ipv6_subnet_len} left in "
                    f"{config.ipv6_network} (IPv6-only; {len(leases)} leases); widen "
                    "IPv6Network or IPv6SubnetMin/IPv6SubnetMax, or delete stale leases"
                )
            if choice is None:
                assert config.subnet_min is not None and config.subnet_max is not None
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
                choice.ipv6_subnet if config.ipv6_only else choice.subnet,
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
            Lease(ig.subnet, _NOBODY, ig.ipv6_subnet)
            for ig in self.registry.ignored.current.values()
            if ig.lease is None and ig.subnet is not None
        ]

    # ------------------------------------------------------------------ keep

    async def keep(self, config: NetworkConfig, own: Lease, on_event: OnOwnLease) -> None:
        """Hold `own` until cancelled: renew it, and tell `on_event` whatever happens to it
        (OwnLeaseEvent). This is the one place that decides whether our lease holds."""
        while True:
            loss = await self._hold(own, on_event)
            log.error("LOST our lease %s (%s): %s", own.ident, own.attrs.address, loss.reason)
            await on_event(OwnLeaseEvent("lost", own, loss.reason, loss.holder))
            new = await self._regain(config, own, loss, on_event)
            log.warning("re-acquired %s for %s after losing %s (%s)", new.ident,
                        new.attrs.address, own.ident, loss.reason)  # fmt: skip
            await on_event(OwnLeaseEvent("reacquired", new, loss.reason))
            own = new

    async def _regain(
        self, config: NetworkConfig, lost: Lease, loss: _Loss, on_event: OnOwnLease
    ) -> Lease:
        """Get a lease back after `loss`: the same subnet when it is free (or still ours);
        while another host holds it, report that once and wait for its key to change (policy
        "wait"), or take another subnet at once (policy "move"). A host with our PublicIP is
        never fought over: we wait until its key goes."""
        backoff = Backoff(min(0.5, self.retry_cap), self.retry_cap)
        reported: _Loss | None = None
        current: _Loss | None = loss if loss.kind in ("taken", "duplicate") else None
        while True:
            try:
                if current is None:
                    lease, revision = await self.registry.get_lease(lost.subnet, lost.ipv6_subnet)
                    if lease is None:
                        new = await self.registry.create_lease(
                            lost.subnet, lost.attrs, self.ttl, lost.ipv6_subnet
                        )
                        if new is not None:
                            return new
                        # The key exists: a value that does not decode (get_lease skips it),
                        # or created by another host since our look. Wait for its next change
                        # (the watch delivers a creation after `revision` at once), never
                        # retry at once: that would be a write loop.
                        current = _Loss(
                            "taken",
                            f"lease {lost.ident} lost: its key holds a value that is not a "
                            "valid lease (see overlayctl leases, overlay_leases_ignored_total)",
                        )
                        if current != reported:
                            reported = current
                            await self._report(lost, current, on_event)
                        if self.on_taken == "move":
                            return await self.acquire(config, lost.attrs)
                        await self._key_changed(lost, revision)
                        current = None
                        backoff.reset()
                        continue
                    if lease.attrs == lost.attrs:
                        # Still ours: etcd kept it (a restarted cluster refreshes lease TTLs),
                        # or a create of ours committed before its answer was lost.
                        return await self.registry.renew_lease(lease, self.ttl)
                    current = _loss_of(lost, lease.attrs)
                else:
                    revision = 0
                if current != reported:
                    reported = current
                    await self._report(lost, current, on_event)
                if current.kind == "taken" and self.on_taken == "move":
                    return await self.acquire(config, lost.attrs)
                await self._key_changed(lost, revision)
                current = None
                backoff.reset()
            except LeaseLost:
                current = None  # changed under the renewal: look again
            except (RegistryError, OutOfSubnets, AcquireConflict) as e:
                log.error("cannot get lease %s back for %s: %s; retrying", lost.ident,
                          lost.attrs.address, e)  # fmt: skip
                await backoff.sleep()

    async def _report(self, lost: Lease, loss: _Loss, on_event: OnOwnLease) -> None:
        if loss.kind == "duplicate":
            field = "PublicIP" if lost.attrs.address.version == 4 else "PublicIPv6"
            log.error("duplicate %s %s: %s. overlayd stops writing lease %s until that key "
                      "is gone", field, lost.attrs.address, loss.reason, lost.ident)  # fmt: skip
            await on_event(OwnLeaseEvent("duplicate", lost, loss.reason, loss.holder))
        else:
            move = self.on_taken == "move"
            log.error("%s; %s", loss.reason,
                      "taking another subnet (policy move)" if move else
                      "keeping subnet.env and the data path of that subnet and waiting for it to "
                      "be free (policy wait; see docs/subnetmgr.md)")  # fmt: skip
            await on_event(OwnLeaseEvent("taken", lost, loss.reason, loss.holder))

    async def _key_changed(self, lease: Lease, revision: int) -> None:
        """Return at the first change of `lease`'s key after `revision` (0: look first)."""
        if revision == 0:
            _lease, revision = await self.registry.get_lease(lease.subnet, lease.ipv6_subnet)
        async for _event in self.registry.watch_leases(
            revision + 1, lease.subnet, lease.ipv6_subnet
        ):
            return
        raise RegistryError("the watch on our lease's key ended")

    async def _hold(self, own: Lease, on_event: OnOwnLease) -> _Loss:
        """Renew `own` and watch its key; return how it was lost."""
        current = own
        lost: asyncio.Future[_Loss] = asyncio.get_running_loop().create_future()

        def set_lost(loss: _Loss) -> None:
            if not lost.done():
                lost.set_result(loss)

        async def renew_loop() -> None:
            nonlocal current
            backoff = Backoff(min(1.0, self.retry_cap), self.retry_cap)
            warned = False
            while True:
                if current.expiration is None:  # a reservation does not expire
                    await asyncio.Event().wait()
                    return
                delay = current.expiration - self.renew_margin - time.time()
                if backoff.failures == 0 and delay > 0 and math.isfinite(delay):
                    await asyncio.sleep(delay)  # inf: expiry unknown, renew now
                # A renewal that hangs (etcd without quorum, every endpoint timing out in turn)
                # must not outlive the lease: the expiry is noticed on time, not a call later.
                left = current.expiration - time.time()
                limit = max(left, 0.05) if math.isfinite(left) else None
                try:
                    try:
                        async with asyncio.timeout(limit):
                            current = await self.registry.renew_lease(current, self.ttl)
                    except TimeoutError:
                        raise RegistryError(
                            "the renewal did not finish before the lease expired"
                        ) from None
                except LeaseLost as e:
                    set_lost(_Loss("gone", str(e)))
                    return
                except RegistryError as e:
                    left = (current.expiration or 0) - time.time()
                    if left <= 0:
                        set_lost(_Loss("expired", "lease expired while etcd was unreachable"))
                        return
                    log.error("could not renew lease %s (%.0fs left): %s", current.ident, left, e)
                    if not warned:
                        warned = True
                        reason = f"could not renew: {e}; {left:.0f}s left"
                        await on_event(OwnLeaseEvent("expiring", current, reason))
                    # Never sleep past the expiry: it is noticed (and reported) on time.
                    await asyncio.sleep(min(backoff.next(), max(left, 0.05)))
                    continue
                backoff.reset()
                warned = False
                until = time.gmtime(current.expiration or 0)
                log.info("renewed lease %s until %s UTC", current.ident,
                         time.strftime("%Y-%m-%d %H:%M:%S", until))  # fmt: skip
                await on_event(OwnLeaseEvent("renewed", current))

        async def watch_loop() -> None:
            backoff = Backoff(0.2, 5.0)
            while True:
                try:
                    lease, revision = await self.registry.get_lease(own.subnet, own.ipv6_subnet)
                    if lease is None or lease.attrs != own.attrs:
                        set_lost(_loss_of(own, None if lease is None else lease.attrs))
                        return
                    backoff.reset()
                    async for ev in self.registry.watch_leases(
                        revision + 1, own.subnet, own.ipv6_subnet
                    ):
                        if ev.kind == "removed":
                            set_lost(_loss_of(own, None))
                            return
                        if ev.lease.attrs != own.attrs:
                            set_lost(_loss_of(own, ev.lease.attrs))
                            return
                except Compacted:
                    continue  # the next get_lease re-reads the state
                except RegistryError as e:
                    if backoff.failures == 0:
                        log.warning("watching our lease %s: %s; retrying", own.ident, e)
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
        touched = {lease.ident for lease in (old, own) if lease is not None}
        return {s for s in touched if self._resolve(s)}

    def _resolve(self, subnet: Subnet) -> bool:
        """Decide which lease `subnet` keeps (recording the rejected keys); True if that changed."""
        own = self._own if self._own is not None and self._own.ident == subnet else None
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
        self._groups.setdefault(lease.ident, set()).add(lease.key)

    def _drop(self, key: str) -> Subnet | None:
        lease = self._entries.pop(key, None)
        if lease is None:
            return None
        group = self._groups[lease.ident]
        group.discard(key)
        if not group:
            del self._groups[lease.ident]
        self.registry.ignored.clear(key, checked=True)
        return lease.ident

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
            touched.add(ev.lease.ident)
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
        backoff = Backoff(0.2, 5.0)
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
        backoff: Backoff,
    ) -> None:
        """Watch from revision + 1. Batches that arrive while on_change runs are merged."""
        queue: asyncio.Queue[LeaseBatch | BaseException] = asyncio.Queue()

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
                    # Progress answers and events that did not decode move the revision on
                    # too: a resumed watch starts after them, and the watch lag stays true.
                    self.revision = max(self.revision, item.revision)
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
