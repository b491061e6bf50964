"""overlayd: the composition root. Builds the parts and wires them together.

wait_for_config -> choose the backend -> backend.prepare() -> acquire the lease with those
attributes -> backend.start(own) -> subnet.env, traffic rules (overlay/masq.py) -> ready; then,
side by side in one TaskGroup: the lease mirror feeding the reconcile scheduler
(overlay/reconcile.py: incremental passes for the subnets that changed, full passes at start,
every --resync-period seconds and after an error; only leases that fit the network config, see
subnetmgr.validate: the others are logged once and counted in
overlay_leases_ignored_total{reason}), keep() renewing the lease and telling us what happens to it
(OwnLeaseEvent: the subnet manager is the one judge; we turn its word into readiness, events and,
on a new lease, a backend restart), a watch on the network config (a change is logged; it applies
at the next start, as in flannel), the iptables resync (rules and blackhole route), and the MQTT
publisher. etcd's health (registry.health) feeds /metrics, /readyz, /status and the
etcd_down/etcd_up events. An etcd failure never touches the data path.

SIGTERM/SIGINT stop everything and leave kernel state (devices, routes, rules) in place: exit 0.
Fatal problems (no interface, out of subnets, a backend that cannot start) exit 1 with a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import hashlib
import logging
import math
import os
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any

import backends
from backends.base import NO_ADDRESS, Backend, BackendError, ExternalInterface
from overlay.blackhole import BlackholeRoute
from overlay.events import EventPublisher
from overlay.events import raise_if_cancelling as _raise_if_cancelling
from overlay.health import HealthServer, Metrics
from overlay.iface import InterfaceError, choose_interface
from overlay.masq import IptablesError, TrafficRules, traffic_rules
from overlay.options import Options, parse_options
from overlay.preflight import HostLock, PreflightError, privilege_problem
from overlay.reconcile import Reconciler
from overlay.sdnotify import sd_notify
from overlay.subnetenv import (
    SubnetEnv,
    SubnetEnvError,
    read_previous_ipv6_subnet,
    read_previous_subnet,
    write_subnet_env,
)
from subnetmgr.backoff import Backoff
from subnetmgr.manager import (
    TAKEN_POLICIES,
    AcquireConflict,
    LeaseMirror,
    OutOfSubnets,
    OwnLeaseEvent,
    SubnetManager,
)
from subnetmgr.model import (
    NO_IPV4,
    ConfigError,
    Lease,
    LeaseAttrs,
    NetworkConfig,
    Subnet,
    subnet_order,
)
from subnetmgr.registry import Compacted, EtcdRegistry, Registry, RegistryError
from subnetmgr.validate import Ignored

log = logging.getLogger("overlayd")

MAX_BACKOFF = 30.0
SHUTDOWN_TIMEOUT = 5.0
LEASE_TAKEN_ENV = "OVERLAYD_LEASE_TAKEN"
"""What a running daemon does when another host holds its subnet after it lost its lease:
"wait" (default: keep subnet.env and the data path, stay not ready, take the subnet back once
it is free) or "move" (take another subnet at once). See docs/subnetmgr.md."""
FULL_RECONCILE_ENV = "OVERLAYD_FULL_RECONCILE"
"""Set to 1: every lease event makes a full pass, as before incremental reconcile existed (for
benchmarks side by side and for ruling the incremental path out when chasing a problem)."""


class PeersView(Mapping[Subnet, Lease]):
    """The mirror's leases without our own, as a live view: made in O(1) for every event, where a
    copy would cost O(leases). Backends read it without awaiting in between (see Backend)."""

    def __init__(self, leases: Mapping[Subnet, Lease], own: Subnet | None) -> None:
        self._leases = leases
        self._own = own

    def __getitem__(self, subnet: Subnet) -> Lease:
        if subnet == self._own:
            raise KeyError(subnet)
        return self._leases[subnet]

    def __contains__(self, subnet: object) -> bool:
        return subnet != self._own and subnet in self._leases

    def __iter__(self) -> Iterator[Subnet]:
        return (s for s in self._leases if s != self._own)

    def __len__(self) -> int:
        return len(self._leases) - (self._own is not None and self._own in self._leases)


def renew_margin(ttl: int, margin_minutes: int) -> float:
    """Seconds before expiry to renew: --subnet-lease-renew-margin (minutes, as flannel's), or
    half the TTL when the margin is not below it (so a short --subnet-lease-ttl just works)."""
    margin = margin_minutes * 60.0
    if margin < ttl:
        return margin
    log.info("--subnet-lease-renew-margin %d min is not below --subnet-lease-ttl %ds: renewing "
             "at half the TTL (every %.1fs)", margin_minutes, ttl, ttl / 2)  # fmt: skip
    return ttl / 2


def ttl_timeout_problem(ttl: int, etcd_timeout: float) -> str | None:
    """A warning when one etcd call may hang for a quarter of the lease TTL or more: a renewal
    stuck on a dead member (the call timeout, then failover) can then outlive a short lease
    (seen in the chaos tests with a 6 s TTL and the 5 s default timeout)."""
    if etcd_timeout * 4 <= ttl:
        return None
    return (
        f"--etcd-timeout {etcd_timeout:g}s is not below a quarter of --subnet-lease-ttl {ttl}s: a "
        "renewal that hangs on an unreachable etcd member can let the lease expire; lower "
        f"--etcd-timeout to {ttl / 4:g}s or less, or raise the TTL"
    )


class FatalError(RuntimeError):
    """Stops the daemon with exit code 1; the message says what to do."""


async def _retry_etcd(what: str, call: Callable[[], Awaitable[Any]]) -> Any:
    """Retry `call` on RegistryError with the project's back-off (the registry counts errors)."""
    backoff = Backoff(0.5, MAX_BACKOFF)
    while True:
        try:
            return await call()
        except RegistryError as e:
            _raise_if_cancelling(e)
            wait = backoff.next()
            log.warning("%s failed: %s; retrying in %.1fs", what, e, wait)
            await asyncio.sleep(wait)


async def _logged(name: str, coro: Coroutine[Any, Any, None]) -> None:
    """Await `coro`; an unexpected exception is logged with its traceback at once (before the
    TaskGroup's cancellation of the other tasks), then re-raised."""
    try:
        await coro
    except asyncio.CancelledError:
        log.debug("%s: cancelled", name)
        raise
    except BaseException as e:
        log.error("%s failed: %r", name, e, exc_info=not isinstance(e, FatalError))
        raise
    log.debug("%s: finished", name)


def _known(expiration: float | None) -> float | None:
    """An expiry that is known: None for a reservation or one the mirror did not look up (inf)."""
    return expiration if expiration is not None and math.isfinite(expiration) else None


class Overlayd:
    """One running daemon: owns the lease, the backend and the loops around them."""

    def __init__(
        self,
        opts: Options,
        registry: Registry,
        ext: ExternalInterface,
        metrics: Metrics,
        events: EventPublisher,
        *,
        iptables_prefix: Sequence[str] = (),
        manager: SubnetManager | None = None,
        incremental: bool = True,
        on_taken: str = "wait",
    ) -> None:
        """`incremental=False`: lease events make full passes too (see FULL_RECONCILE_ENV);
        `on_taken`: what to do when another host holds our subnet (see LEASE_TAKEN_ENV)."""
        self.opts = opts
        self.registry = registry
        self.ext = ext
        self.metrics = metrics
        self.events = events
        self.iptables_prefix = tuple(iptables_prefix)
        self.manager = manager or SubnetManager(
            registry,
            ttl=opts.subnet_lease_ttl,
            renew_margin=renew_margin(opts.subnet_lease_ttl, opts.subnet_lease_renew_margin),
            on_taken=on_taken,
        )
        # Without per-lease expiry lookups the first list is ~40x faster (10,000 leases: 0.03 s
        # instead of 1.1 s, bench/bench_daemon_coldstart.py). Nothing in the data path reads other
        # hosts' expiry; leases listed at start carry expiration=inf ("unknown") until they change.
        self.mirror = LeaseMirror(registry, expirations=False)
        self.backend: Backend | None = None
        self.config: NetworkConfig | None = None
        self.own: Lease | None = None
        self.traffic: TrafficRules | None = None
        self.blackhole: BlackholeRoute | None = None
        self.ready = asyncio.Event()
        self.reconciler: Reconciler | None = None
        self.incremental = incremental
        self._known_peers: set[Subnet] = set()
        self._config_revision = 0
        """The last revision of <prefix>/config looked at (the config watch resumes after it)."""
        self._config_seen = b""
        """A digest of the last config value logged about (each distinct value is logged once)."""
        registry.ignored.on_new = self._count_ignored
        current = registry.ignored.current
        metrics.leases_ignored_now = lambda: Counter(i.reason for i in current.values())
        registry.health.listeners.append(self._etcd_changed)
        metrics.refresh = self._refresh_metrics

    def _etcd_changed(self, up: bool, reason: str) -> None:
        if up:
            log.warning("etcd is reachable again")
            self.events.publish("etcd_up")
        else:
            log.error("etcd is unreachable: %s; the data path stays as it is", reason)
            self.events.publish("etcd_down", reason=reason)

    def _refresh_metrics(self) -> None:
        """Copy the live etcd and watch figures into the metrics (at each scrape)."""
        m, health = self.metrics, self.registry.health
        m.etcd_up = health.up
        m.etcd_errors = health.errors
        m.etcd_last_success = health.last_success or None
        if self.mirror.ready.is_set():
            m.watch_lag = max(health.revision - self.mirror.revision, 0)

    def _count_ignored(self, ignored: Ignored) -> None:
        self.metrics.leases_ignored[ignored.reason] += 1

    # ------------------------------------------------------------------ start-up

    async def run(self) -> None:
        config = await _retry_etcd("reading the network config", self.manager.wait_for_config)
        self.config = config
        self._config_revision = self.manager.config_revision
        for warning in config.warnings:
            log.warning("%s", warning)
        # Before the backend touches the kernel and before a lease is taken (issue 12).
        problem = privilege_problem(config.backend_type, self.opts.ip_masq,
                                    self.opts.iptables_forward_rules,
                                    self.opts.ip_blackhole_route)  # fmt: skip
        if problem:
            raise FatalError(problem)
        if config.backend_defaulted:
            log.info(
                "the network config has no Backend: using the default backend %r "
                '(write "Backend": {"Type": "vxlan"} to choose another)',
                config.backend_type,
            )
        if config.enable_ipv4 and self.ext.public_ip == NO_ADDRESS:
            raise FatalError(
                f"interface {self.ext.name} has no IPv4 address, but the network config is "
                f"IPv4 (Network {config.network}): give the interface one, choose another with "
                "--iface, or make the network IPv6-only (EnableIPv4 false, EnableIPv6 true)"
            )
        if config.enable_ipv6 and self.ext.public_ipv6 is None:
            raise FatalError(
                f"the network config sets EnableIPv6, but interface {self.ext.name} has no "
                "global IPv6 address: give it one, or pass --public-ipv6 (FLANNELD_PUBLIC_IPV6)"
            )
        if config.enable_ipv6:
            log.info("dual stack: IPv6 network %s, subnet length /%d, public IPv6 %s",
                     config.ipv6_network, config.ipv6_subnet_len, self.ext.public_ipv6)  # fmt: skip
        if config.ipv6_only:
            log.info("IPv6-only network (EnableIPv4 false): no IPv4 subnet, device or rules; "
                     "backend %s", config.backend_type)  # fmt: skip
        else:
            log.info("network %s, subnet length /%d, backend %s", config.network,
                     config.subnet_len, config.backend_type)  # fmt: skip
        try:
            self.backend = backends.create(config, self.ext)
            counters = getattr(self.backend, "counters", None)
            if callable(counters):  # the udp backend's packet loop counters, on /metrics
                self.metrics.publish_backend_counters(self.backend.type, counters)
            attrs = await self.backend.prepare()
        except BackendError as e:
            raise FatalError(f"backend {config.backend_type!r}: {e}") from None
        lease_attrs = LeaseAttrs(
            # flannel's IPv6-only lease carries PublicIP 0.0.0.0 (its zero IPv4 address).
            public_ip=self.ext.public_ip if config.enable_ipv4 else NO_ADDRESS,
            public_ipv6=self.ext.public_ipv6 if config.enable_ipv6 else None,
            backend_type=attrs.backend_type,
            backend_data=attrs.backend_data,
            backend_v6_data=attrs.backend_v6_data if config.enable_ipv6 else None,
        )
        previous = read_previous_subnet(self.opts.subnet_file) if config.enable_ipv4 else None
        previous6 = read_previous_ipv6_subnet(self.opts.subnet_file)
        if previous is not None or (config.ipv6_only and previous6 is not None):
            log.info("%s names subnet %s from a previous run", self.opts.subnet_file,
                     previous or previous6)  # fmt: skip

        async def acquire() -> Lease:
            while True:
                try:
                    return await self.manager.acquire(config, lease_attrs, previous, previous6)
                except AcquireConflict as e:
                    log.warning("%s", e)
                    await asyncio.sleep(1.0)

        try:
            own: Lease = await _retry_etcd("acquiring a lease", acquire)
        except OutOfSubnets as e:
            raise FatalError(f"{e}; widen Network or free a lease (overlayctl leases)") from None
        self.metrics.lease_acquisitions += 1
        log.info("acquired lease %s for %s", own.key, own.attrs.address)
        # From here on the backends see only leases that fit this config, and never a lease
        # over our own subnet.
        self.mirror.config = config
        self.mirror.set_own(own)
        self.events.publish("lease_acquired", **self._lease_details(own))
        self.reconciler = Reconciler(self.backend, self._peers, self.metrics,
                                     period=self.opts.resync_period,
                                     incremental=self.incremental)  # fmt: skip
        await self._apply_own(own)
        self._set_ready(None)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(_logged("lease mirror", self._supervise("mirror", self._run_mirror)))
            tg.create_task(_logged("reconcile loop", self.reconciler.run(self.mirror.ready)))
            tg.create_task(_logged("lease keeper", self._supervise("renewal", self._run_keep)))
            tg.create_task(
                _logged("config watch", self._supervise("config watch", self._watch_config))
            )
            if self.opts.iptables_resync > 0:
                tg.create_task(_logged("iptables resync", self._masq_loop()))

    def _lease_details(self, lease: Lease) -> dict[str, Any]:
        return {
            "subnet": str(lease.ident),
            "public_ip": str(lease.attrs.address),
            "backend": lease.attrs.backend_type,
            # None for a reservation, and for an expiry not looked up (inf): JSON has no Infinity.
            "expiration": _known(lease.expiration),
        }

    async def _apply_own(self, own: Lease) -> None:
        """Start (or restart) the backend for `own`, write subnet.env and the iptables rules."""
        assert self.backend is not None and self.config is not None
        assert self.reconciler is not None
        async with self.reconciler.lock:
            self.own = own
            try:
                mtu = await self.backend.start(own)
            except BackendError as e:
                raise FatalError(f"backend {self.backend.type!r} could not start: {e}") from None
            env = SubnetEnv(
                network=self.config.network,
                subnet=None if self.config.ipv6_only else own.subnet,
                mtu=mtu,
                ipmasq=self.opts.ip_masq,
                ipv6_network=self.config.ipv6_network if own.ipv6_subnet else None,
                ipv6_subnet=own.ipv6_subnet,
            )
            try:
                write_subnet_env(self.opts.subnet_file, env)
            except (OSError, SubnetEnvError) as e:
                raise FatalError(
                    f"cannot write {self.opts.subnet_file}: {e}; check --subnet-file"
                ) from None
            log.info("wrote %s (subnet %s, MTU %d)", self.opts.subnet_file, own.ident, mtu)
            await self._apply_rules(own)
            m = self.metrics
            m.lease_subnet = str(own.ident)
            m.lease_public_ip = str(own.attrs.address)
            m.lease_backend = own.attrs.backend_type or self.backend.type
            m.lease_expiration = _known(own.expiration)
            self.reconciler.full_due()  # the next reconcile is a full one

    async def _apply_rules(self, own: Lease) -> None:
        """Masquerade/forward rules (iptables or nftables) and the blackhole route for `own`;
        the first time, also take out rules this configuration does not install."""
        assert self.config is not None
        opts = self.opts
        try:
            if self.traffic is None:
                self.traffic = await traffic_rules(
                    self.config, own, masq=opts.ip_masq, forward=opts.iptables_forward_rules,
                    random_fully_disable=opts.ip_masq_fully_random_disable,
                    prefix=self.iptables_prefix,
                )  # fmt: skip
                await self.traffic.prune()
            else:
                self.traffic.set_lease(None if own.ipv6_only else own.subnet, own.ipv6_subnet)
            await self.traffic.ensure()
        except IptablesError as e:
            raise FatalError(f"traffic rules ({self.traffic.name if self.traffic else 'setup'}): "
                             f"{e}; --iptables-forward-rules=false without --ip-masq installs "
                             "none") from None  # fmt: skip
        if opts.ip_blackhole_route:
            subnets = [s for s in (own.subnet, own.ipv6_subnet)
                       if s is not None and s != NO_IPV4]  # fmt: skip
            if self.blackhole is None:
                self.blackhole = BlackholeRoute(subnets, prefix=self.iptables_prefix)
            else:
                self.blackhole.set_subnets(subnets)
            try:
                await self.blackhole.ensure()
            except IptablesError as e:
                raise FatalError(f"--ip-blackhole-route: {e}") from None

    def _set_ready(self, problem: str | None) -> None:
        """Ready (None), or not ready for the reason given (/readyz, /status, sd_notify)."""
        m = self.metrics
        if problem is None:
            was_ready = m.ready
            m.ready, m.not_ready_reason = True, ""
            self.ready.set()
            if not was_ready:
                self.events.publish("ready", **self._lease_details(self.own) if self.own else {})
                sd_notify(f"READY=1\nSTATUS=lease {self.own.ident if self.own else '?'}")
                log.info("ready")
            return
        m.ready, m.not_ready_reason = False, problem
        self.ready.clear()
        sd_notify(f"STATUS=not ready: {problem}")

    # ------------------------------------------------------------------ loops

    async def _supervise(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run `body` until cancelled; restart it after an etcd error (logged, with backoff)."""
        backoff = Backoff(0.5, MAX_BACKOFF)
        while True:
            try:
                await body()
                return
            except RegistryError as e:
                _raise_if_cancelling(e)
                wait = backoff.next()
                log.warning("%s: etcd error: %s; restarting in %.1fs", name, e, wait)
                await asyncio.sleep(wait)

    async def _run_mirror(self) -> None:
        await self.mirror.run(self._on_leases)

    async def _run_keep(self) -> None:
        assert self.config is not None and self.own is not None
        await self.manager.keep(self.config, self.own, self._on_own_lease)

    async def _on_own_lease(self, ev: OwnLeaseEvent) -> None:
        """What the subnet manager says about our lease: the one source of that truth."""
        m = self.metrics
        if ev.kind == "renewed":
            m.lease_expiration = _known(ev.lease.expiration)
            self.events.publish("lease_renewed", **self._lease_details(ev.lease))
        elif ev.kind == "expiring":
            self.events.publish("lease_expiring", subnet=str(ev.lease.ident), reason=ev.reason)
        elif ev.kind == "lost":
            self.events.publish("lease_lost", subnet=str(ev.lease.ident), reason=ev.reason)
            named = str(ev.lease.ident) in ev.reason  # else say which lease
            self._set_ready(ev.reason if named else f"lease {ev.lease.ident} lost: {ev.reason}")
        elif ev.kind == "taken":
            holder = ev.holder.address if ev.holder is not None else None
            self.events.publish("lease_taken", subnet=str(ev.lease.ident),
                                holder=str(holder), reason=ev.reason)  # fmt: skip
            self._set_ready(ev.reason)
        elif ev.kind == "duplicate":
            self.events.publish("duplicate_public_ip", subnet=str(ev.lease.ident),
                                public_ip=str(ev.lease.attrs.address),
                                reason=ev.reason)  # fmt: skip
            field = "PublicIP" if ev.lease.attrs.address.version == 4 else "PublicIPv6"
            self._set_ready(f"duplicate {field} {ev.lease.attrs.address}: {ev.reason}")
        elif ev.kind == "reacquired":
            await self._reacquired(ev.lease)

    async def _reacquired(self, new: Lease) -> None:
        self.metrics.lease_acquisitions += 1
        old = self.own
        if old is not None and old.key != new.key:
            log.warning("re-acquired lease %s for %s (was %s); moving the backend, subnet.env "
                        "and the iptables rules to it", new.key, new.attrs.address,
                        old.key)  # fmt: skip
        else:
            log.warning("re-acquired lease %s for %s", new.key, new.attrs.address)
        self.events.publish("lease_reacquired", **self._lease_details(new))
        assert self.reconciler is not None
        self.reconciler.changed(self.mirror.set_own(new))
        await self._apply_own(new)
        self._set_ready(None)

    async def _watch_config(self) -> None:
        """Follow <prefix>/config and log each change: the running config stays (flannel also
        reads it once); a valid new one applies at the next start."""
        while True:
            try:
                async for value, revision in self.registry.watch_config(self._config_revision + 1):
                    self._config_revision = revision
                    self._config_changed(value, revision)
            except Compacted:
                value, self._config_revision = await self.registry.get_config_value()
                self._config_changed(value, self._config_revision)

    def _config_changed(self, value: bytes | None, revision: int) -> None:
        assert self.config is not None
        digest = b"" if value is None else hashlib.blake2b(value, digest_size=16).digest()
        if value is not None and digest == self._config_seen:
            return
        self._config_seen = digest
        key = getattr(self.registry, "config_key", "<prefix>/config")
        running = self.config.describe()
        if value is None:
            log.warning("the network config at %s was deleted (revision %d); overlayd keeps "
                        "the running config (%s)", key, revision, running)  # fmt: skip
            return
        try:
            new = NetworkConfig.from_json(value)
        except ConfigError as e:
            log.warning("the network config at %s changed to an invalid one (revision %d): %s; "
                        "overlayd keeps the running config (%s)", key, revision, e,
                        running)  # fmt: skip
            return
        if new == self.config:
            log.info("the network config at %s was rewritten (revision %d), same config", key,
                     revision)  # fmt: skip
            return
        log.warning("the network config at %s changed (revision %d): %s; it applies when "
                    "overlayd restarts (the config is read once, at start, as flanneld does); "
                    "running: %s", key, revision, new.describe(), running)  # fmt: skip

    async def _on_leases(self, snapshot: Mapping[Subnet, Lease], changed: set[Subnet]) -> None:
        own = self.own
        for subnet in sorted(changed, key=subnet_order):
            lease = snapshot.get(subnet)
            if own is not None and subnet == own.ident:
                continue  # our own lease: the subnet manager tells us about it
            if lease is not None and subnet not in self._known_peers:
                self._known_peers.add(subnet)
                log.info("peer added: %s at %s", subnet, lease.attrs.address)
                self.events.publish("peer_added", **self._lease_details(lease))
            elif lease is None and subnet in self._known_peers:
                self._known_peers.discard(subnet)
                log.info("peer removed: %s", subnet)
                self.events.publish("peer_removed", subnet=str(subnet))
        assert self.reconciler is not None
        self.reconciler.changed(changed)

    def _peers(self) -> PeersView:
        own = self.own
        return PeersView(self.mirror.snapshot, own.ident if own is not None else None)

    async def _masq_loop(self) -> None:
        """Every --iptables-resync seconds: the traffic rules and the blackhole route."""
        while True:
            await asyncio.sleep(self.opts.iptables_resync)
            self.metrics.masq_resyncs += 1
            assert self.reconciler is not None
            parts = (("rules", self.traffic), ("blackhole route", self.blackhole))
            for what, part in parts:
                if part is None:
                    continue
                try:
                    async with self.reconciler.lock:
                        repaired = await part.ensure()
                except IptablesError as e:
                    log.error("%s resync failed: %s", what, e)
                    continue
                if repaired and part is self.traffic:
                    self.metrics.masq_repairs += 1
                    log.warning("%s %s were missing or changed; restored them",
                                self.traffic.name, what)  # fmt: skip


# ---------------------------------------------------------------------- the process


async def _connect(opts: Options, metrics: Metrics) -> EtcdRegistry:
    eopts = opts.etcd.registry_options()

    async def connect() -> EtcdRegistry:
        registry: EtcdRegistry = await EtcdRegistry.connect(eopts)
        return registry

    result: EtcdRegistry = await _retry_etcd(
        f"connecting to etcd at {','.join(opts.etcd.endpoints)}", connect
    )
    return result


async def serve(opts: Options, stop: asyncio.Event) -> int:
    """Run until `stop` is set (exit 0) or a fatal error (exit 1). One daemon per host: the
    lock in the subnet file's directory is taken before anything else (overlay/preflight.py)."""
    lock = HostLock.for_subnet_file(opts.subnet_file)
    try:
        lock.acquire()
    except PreflightError as e:
        log.error("%s", e)
        return 1
    try:
        return await _serve_locked(opts, stop)
    finally:
        lock.release()


async def _serve_locked(opts: Options, stop: asyncio.Event) -> int:
    problem = ttl_timeout_problem(opts.subnet_lease_ttl, opts.etcd.timeout)
    if problem is not None:
        log.warning("%s", problem)
    on_taken = os.environ.get(LEASE_TAKEN_ENV, "wait") or "wait"
    if on_taken not in TAKEN_POLICIES:
        log.error("%s=%r: use one of %s", LEASE_TAKEN_ENV, on_taken, ", ".join(TAKEN_POLICIES))
        return 1
    try:
        ext = await choose_interface(
            opts.iface, opts.iface_regex, opts.iface_can_reach, opts.public_ip, opts.public_ipv6
        )
    except (InterfaceError, TimeoutError) as e:
        log.error("%s", e or "timed out reading interfaces")
        return 1
    if ext.public_ip == NO_ADDRESS:
        log.info("using interface %s (index %d), no IPv4 address, public IPv6 %s, MTU %d",
                 ext.name, ext.index, ext.public_ipv6, ext.mtu)  # fmt: skip
    else:
        log.info("using interface %s (index %d), address %s, public IP %s, MTU %d", ext.name,
                 ext.index, ext.iface_addr, ext.public_ip, ext.mtu)  # fmt: skip
    metrics = Metrics()
    health: HealthServer | None = None
    if opts.healthz_port:
        health = HealthServer(
            metrics, str(opts.healthz_ip), opts.healthz_port, serve_metrics=opts.metrics
        )
        try:
            await health.start()
        except OSError as e:
            log.error("cannot listen on %s:%d for --healthz-port: %s", opts.healthz_ip,
                      opts.healthz_port, e)  # fmt: skip
            return 1
    # The host's name in MQTT topics: its PublicIP, or its PublicIPv6 on an IPv6-only underlay.
    host_address = ext.public_ipv6 if ext.public_ip == NO_ADDRESS else ext.public_ip
    events = EventPublisher(opts.mqtt, opts.mqtt_topic_prefix, host_address, metrics)
    registry: EtcdRegistry | None = None
    daemon: Overlayd | None = None
    incremental = os.environ.get(FULL_RECONCILE_ENV, "") not in ("1", "true", "yes")

    if not incremental:
        log.warning("%s is set: every lease event makes a full reconcile", FULL_RECONCILE_ENV)

    async def body() -> None:
        nonlocal registry, daemon
        registry = await _connect(opts, metrics)
        daemon = Overlayd(
            opts, registry, ext, metrics, events, incremental=incremental, on_taken=on_taken
        )
        await daemon.run()

    async def everything() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_logged("MQTT publisher", events.run()))
            tg.create_task(_logged("daemon", body()))

    code = 0
    running = asyncio.create_task(everything())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            code = _exit_code(running)
        else:
            log.info("signal received: stopping; devices, routes and rules stay in place")
            running.cancel()
            done, _ = await asyncio.wait({running}, timeout=SHUTDOWN_TIMEOUT)
            if not done:
                log.warning("some tasks did not stop within %.0fs; exiting anyway",
                            SHUTDOWN_TIMEOUT)  # fmt: skip
    finally:
        stopping.cancel()
        sd_notify("STOPPING=1")
        if daemon is not None and daemon.backend is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(daemon.backend.close(), 10)
        if registry is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(registry.close(), 5)
        if health is not None:
            await health.close()
    return code


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]


def _exit_code(task: asyncio.Task[None]) -> int:
    """1 for a fatal error (logged here with its message), 0 if the task just ended."""
    if task.cancelled():
        return 0
    error = task.exception()
    if error is None:
        return 0
    for leaf in _leaves(error):
        if isinstance(leaf, (FatalError, OutOfSubnets, BackendError, IptablesError)):
            log.error("%s", leaf)
        elif not isinstance(leaf, asyncio.CancelledError):
            log.error("unexpected error: %r", leaf, exc_info=leaf)
    return 1


async def _main(opts: Options) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await serve(opts, stop)


_NOISY = ("aetcd", "grpc", "pyroute2")


def _quiet_libraries(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.name.startswith(_NOISY)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(argv)
    logging.basicConfig(
        level=opts.log_level_number,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Library chatter stays out even at debug level (pyroute2 resets its logger's level when
    # imported, so a filter on our handlers rather than a level on its logger).
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_libraries)
    for warning in opts.warnings:  # secrets on the command line or in clear text
        log.warning("%s", warning)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` dumps every thread's stack to stderr
    # Not asyncio.run(): its final "cancel everything and wait" would hang on a library task
    # that swallows cancellation; leftovers get a bounded grace period instead.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_main(opts))
    finally:
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers, timeout=2))
        with contextlib.suppress(TimeoutError):
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), 2))
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
