"""The store seam: flannel's etcd layout behind a small protocol, and its etcd implementation.

Layout (v3 API, see shared/FLANNEL-COMPAT.md):
    <prefix>/config                        the network config JSON
    <prefix>/subnets/10.5.52.0-24          a lease: flannel's value JSON, an etcd lease of 24 h
    <prefix>/subnets/10.5.53.0-24          a reservation: the same value, no etcd lease

Keys or values that do not follow the format are skipped, never fatal: each one is recorded in
`EtcdRegistry.ignored` (logged and counted once per distinct key and value, see
subnetmgr.validate.IgnoredLeases) until it is deleted or rewritten with a valid value.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import TracebackType
from typing import Any, Literal, Protocol

from aetcd import rpc

from subnetmgr.etcdconn import (
    Compacted,
    EtcdConnection,
    EtcdHealth,
    EtcdOptions,
    RegistryError,
)
from subnetmgr.model import (
    NO_IPV4,
    Lease,
    LeaseAttrs,
    MalformedLease,
    parse_subnet_key,
    subnet_key,
)
from subnetmgr.validate import Ignored, IgnoredLeases

__all__ = [
    "Compacted",
    "EtcdOptions",
    "EtcdRegistry",
    "KeyRecord",
    "LeaseBatch",
    "LeaseEvent",
    "LeaseLost",
    "Registry",
    "RegistryError",
]

log = logging.getLogger("overlay.subnetmgr.registry")

_TTL_LOOKUPS_IN_FLIGHT = 64
_MAX_SPARES = 16
_SPARE_MAX_AGE = 60.0


@dataclass(frozen=True)
class LeaseEvent:
    """One change to the leases in etcd.

    "added" is also used for a changed value. "removed" carries the last known lease: the
    previous value as etcd reports it (prev_kv); when etcd no longer has that (compacted), the
    lease's PublicIP is 0.0.0.0 and the mirror substitutes the lease it knew.
    """

    kind: Literal["added", "removed"]
    lease: Lease
    revision: int


@dataclass(frozen=True)
class KeyRecord:
    """A lease key as etcd stores it, for `overlayctl leases revoke`."""

    key: str
    """The key's last element, e.g. `10.1.5.0-24`."""
    value: bytes
    lease_id: int
    """0 for a reservation."""
    mod_revision: int
    ttl: int
    """Seconds left on the etcd lease (-1: expired, or a reservation)."""
    granted_ttl: int
    """The TTL it was granted with (-1 for a reservation); granted - ttl = seconds since the
    host last renewed (our renewals, like flannel's, grant a fresh etcd lease)."""
    attached_keys: int


class LeaseBatch(list[LeaseEvent]):
    """The lease events of one etcd watch response, and `revision`: every change up to it has
    been delivered (the last event's revision, events that did not decode included; for a
    progress answer with no events, the store revision in its header). 0 for the response
    that says the watch was created: nothing is known delivered then."""

    revision: int = 0


class LeaseLost(RuntimeError):
    """Our lease is gone from etcd (expired, revoked, deleted) or now holds another value."""


class Registry(Protocol):
    ignored: IgnoredLeases
    """The keys skipped now because they do not decode; the mirror adds those it rejects."""

    @property
    def health(self) -> EtcdHealth:
        """What the calls to the store found (up, last success, revision, failed calls)."""
        ...

    async def get_config_text(self) -> str | None: ...

    async def get_config_value(self) -> tuple[bytes | None, int]:
        """The config's raw bytes (None when absent) and the store revision."""
        ...

    def watch_config(self, start_revision: int) -> AsyncIterator[tuple[bytes | None, int]]:
        """Each change of the config from `start_revision` on: (new bytes or None when deleted,
        its revision). Raises Compacted / RegistryError as watch_lease_batches."""
        ...

    async def put_config_text(self, text: str) -> None: ...

    async def list_leases(
        self, *, expirations: bool = True, created_after: int = 0
    ) -> tuple[list[Lease], int]:
        """Valid leases and the store revision; malformed ones are logged and skipped.

        `expirations=False` skips looking up each etcd lease's time to live: leases whose
        expiry is not known yet get `expiration=math.inf` (still not None, so they are told
        from reservations). Allocation needs nothing more.

        `created_after=REVISION` lists only the keys created after that revision (a key
        deleted meanwhile is not reported): what a host that lost a race needs to add to the
        list it had."""
        ...

    async def get_lease(
        self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None
    ) -> tuple[Lease | None, int]:
        """One lease (None when absent or malformed) and the store revision; with `ipv6_subnet`
        the dual-stack key naming both."""
        ...

    async def create_lease(
        self,
        subnet: IPv4Network,
        attrs: LeaseAttrs,
        ttl: int,
        ipv6_subnet: IPv6Network | None = None,
    ) -> Lease | None:
        """Create the key atomically (a dual-stack key with `ipv6_subnet`); None when it exists
        already."""
        ...

    async def update_lease(self, lease: Lease, attrs: LeaseAttrs, ttl: int) -> Lease | None:
        """Rewrite an existing lease of ours with `attrs` (a reservation stays one, a lease gets a
        fresh TTL); None when the key is gone or no longer holds `lease`'s PublicIP."""
        ...

    async def renew_lease(self, lease: Lease, ttl: int) -> Lease:
        """Same value, new expiration; raises LeaseLost when the key is gone or changed."""
        ...

    async def delete_lease(
        self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None
    ) -> bool: ...

    async def reserve(
        self,
        subnet: IPv4Network,
        public_ip: IPv4Address,
        ipv6_subnet: IPv6Network | None = None,
        public_ipv6: IPv6Address | None = None,
    ) -> None: ...

    async def unreserve(self, subnet: IPv4Network | IPv6Network) -> list[str]: ...

    def watch_leases(
        self,
        start_revision: int,
        subnet: IPv4Network | None = None,
        ipv6_subnet: IPv6Network | None = None,
    ) -> AsyncIterator[LeaseEvent]: ...

    def watch_lease_batches(
        self,
        start_revision: int,
        subnet: IPv4Network | None = None,
        ipv6_subnet: IPv6Network | None = None,
    ) -> AsyncIterator[LeaseBatch]: ...

    async def close(self) -> None: ...


def _range_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with `prefix`."""
    b = bytearray(prefix)
    for i in reversed(range(len(b))):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def _put_op(key: bytes, value: bytes, lease_id: int) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease_id))


class EtcdRegistry:
    """`Registry` on a real etcd (v3 API), through `EtcdConnection`.

    Use `await EtcdRegistry.connect(opts)`, or `async with await EtcdRegistry.connect(opts)`.
    Connecting contacts nobody: the first call does, and fails with `RegistryError` naming
    the endpoints when none answers.
    """

    def __init__(self, opts: EtcdOptions) -> None:
        self.opts = opts
        self._conn = EtcdConnection(opts)
        prefix = opts.prefix.rstrip("/")
        self._config_key = f"{prefix}/config".encode()
        self._subnets = f"{prefix}/subnets/".encode()
        self._subnets_end = _range_end(self._subnets)
        self._expiry: dict[int, float] = {}
        """etcd lease ID -> Unix time of expiry. Our renewals grant new IDs (as flannel's do),
        so an ID's expiry does not move and can be cached."""
        self._lookups: dict[int, asyncio.Task[float]] = {}
        """etcd lease ID -> the time-to-live lookup in flight for it."""
        self._spares: list[tuple[int, int, float]] = []
        """Granted etcd leases not attached to a key (ID, TTL, expiry), for the next create."""
        self._decoded: dict[bytes, tuple[bytes, int, Lease | None]] = {}
        """key -> (value, etcd lease ID, decoded lease or None when malformed) from the last
        list: a host acquiring among 1,000 others lists often, and decoding dominates."""
        self.ignored = IgnoredLeases()
        self.ignored.key_prefix = self._subnets.decode(errors="backslashreplace")
        """Keys that do not decode (this registry's record) and, through the lease mirror,
        leases that do not fit the network config. overlayd sets `ignored.on_new`."""
        self._undecodable: set[str] = set()
        """The keys in `ignored` because of this registry (the mirror clears only its own)."""

    @classmethod
    async def connect(cls, opts: EtcdOptions) -> EtcdRegistry:
        return cls(opts)

    async def __aenter__(self) -> EtcdRegistry:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def health(self) -> EtcdHealth:
        """Whether etcd answers, when it last did, its revision, failed calls (EtcdHealth)."""
        return self._conn.health

    async def close(self) -> None:
        spares, self._spares = self._spares, []
        for lease_id, _, _ in spares:
            await self._revoke(lease_id)
        await self._conn.close()

    # ------------------------------------------------------------------ helpers

    def key(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> bytes:
        return self._subnets + subnet_key(subnet, ipv6_subnet).encode()

    @property
    def timeout(self) -> float:
        return self.opts.timeout

    async def _range(
        self, key: bytes, range_end: bytes | None = None, min_create_revision: int = 0
    ) -> Any:
        async def go(c: EtcdConnection, md: Any) -> Any:
            req = rpc.RangeRequest(
                key=key, range_end=range_end or b"", min_create_revision=min_create_revision
            )
            return await c.kv.Range(req, timeout=self.timeout, metadata=md)

        return await self._conn.call("get", go)

    async def _txn(self, compare: list[Any], success: list[Any]) -> Any:
        async def go(c: EtcdConnection, md: Any) -> Any:
            req = rpc.TxnRequest(compare=compare, success=success, failure=[])
            return await c.kv.Txn(req, timeout=self.timeout, metadata=md)

        return await self._conn.call("transaction", go)

    async def _grant(self, ttl: int) -> tuple[int, float]:
        async def go(c: EtcdConnection, md: Any) -> Any:
            return await c.lease.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=ttl), timeout=self.timeout, metadata=md
            )

        resp = await self._conn.call("lease grant", go)
        expiry = time.time() + resp.TTL
        self._expiry[resp.ID] = expiry
        return resp.ID, expiry

    async def _revoke(self, lease_id: int) -> None:
        """Best effort: a lease we failed to attach or replaced would expire by itself anyway."""

        async def go(c: EtcdConnection, md: Any) -> Any:
            return await c.lease.LeaseRevoke(
                rpc.LeaseRevokeRequest(ID=lease_id), timeout=self.timeout, metadata=md
            )

        self._expiry.pop(lease_id, None)
        try:
            await self._conn.call("lease revoke", go)
        except RegistryError as e:
            log.debug("could not revoke etcd lease %x: %s", lease_id, e)

    async def _expiration(self, lease_id: int) -> float | None:
        """None for a reservation (no etcd lease), else the Unix time the lease expires."""
        if lease_id == 0:
            return None
        cached = self._expiry.get(lease_id)
        if cached is not None:
            return cached
        pending = self._lookups.get(lease_id)
        if pending is not None:  # another list or watch is asking already: share its answer
            return await asyncio.shield(pending)

        async def go(c: EtcdConnection, md: Any) -> Any:
            return await c.lease.LeaseTimeToLive(
                rpc.LeaseTimeToLiveRequest(ID=lease_id), timeout=self.timeout, metadata=md
            )

        async def lookup() -> float:
            try:
                resp = await self._conn.call("lease time-to-live", go)
            finally:
                self._lookups.pop(lease_id, None)
            # TTL is -1 when the lease has just expired: the key is about to go.
            expiry = time.time() + max(int(resp.TTL), 0)
            self._expiry[lease_id] = expiry
            return expiry

        task = asyncio.create_task(lookup())
        # Retrieve a failure even when every waiter was cancelled (no "never retrieved" noise).
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._lookups[lease_id] = task
        return await asyncio.shield(task)

    async def _expirations(self, lease_ids: set[int]) -> None:
        """Look up the expiry of many leases at once, a bounded number in flight."""
        missing = [i for i in lease_ids if i and i not in self._expiry]
        if not missing:
            return
        sem = asyncio.Semaphore(_TTL_LOOKUPS_IN_FLIGHT)

        async def one(lease_id: int) -> None:
            async with sem:
                await self._expiration(lease_id)

        # gather, not a TaskGroup: a failed lookup raises its RegistryError itself (callers
        # catch that), not an ExceptionGroup; the other lookups are shielded and finish anyway.
        await asyncio.gather(*(one(lease_id) for lease_id in missing))

    def key_text(self, key: bytes) -> str:
        """A key's last element as text (`10.1.5.0-24`), bytes that are not UTF-8 escaped."""
        return key[len(self._subnets) :].decode("utf-8", "backslashreplace")

    def _decode(
        self,
        key: bytes,
        value: bytes,
        lease_id: int,
        unknown: float = 0.0,
        *,
        revision: int = 0,
        create_revision: int = 0,
        record: bool = True,
    ) -> Lease | None:
        """The lease in a key/value pair, or None when either is malformed: then recorded in
        `ignored` (logged once per key and value) unless `record` is false (a previous value).

        `unknown` is the expiration of a lease whose expiry was not looked up."""
        text = self.key_text(key)
        subnet = v6 = None
        try:
            try:
                key.decode()
            except UnicodeDecodeError:
                raise MalformedLease("the lease key is not UTF-8", "key_not_utf8") from None
            subnet, v6 = parse_subnet_key(text)
            attrs = LeaseAttrs.from_json(value)
        except MalformedLease as e:
            if record:
                self._undecodable.add(text)
                digest = hashlib.blake2b(value, digest_size=16).digest()
                ignored = Ignored(text, e.reason, str(e), revision, None, subnet, v6)
                self.ignored.ignore(ignored, digest)
            return None
        if record and text in self._undecodable:
            self._undecodable.discard(text)
            self.ignored.clear(text, checked=False)
        # An expiry not looked up (the previous value of a deleted key: 0.0; a list without
        # expirations: inf) is never None: None would make a lease look like a reservation.
        expiration = self._expiry.get(lease_id, unknown) if lease_id else None
        lease = Lease(subnet, attrs, v6, expiration, create_revision)
        lease.__dict__["key"] = text  # Lease.key, cached: a key that parses is canonical
        return lease

    def _forget(self, key: bytes) -> None:
        """`key` was deleted: nothing about it is ignored any more."""
        text = self.key_text(key)
        self._undecodable.discard(text)
        self.ignored.clear(text, deleted=True)

    # ------------------------------------------------------------------ config

    async def get_config_text(self) -> str | None:
        resp = await self._range(self._config_key)
        if not resp.kvs:
            return None
        value: bytes = resp.kvs[0].value
        return value.decode(errors="replace")

    async def get_config_value(self) -> tuple[bytes | None, int]:
        resp = await self._range(self._config_key)
        revision = int(resp.header.revision)
        if not resp.kvs:
            return None, revision
        value: bytes = resp.kvs[0].value
        return value, revision

    async def put_config_text(self, text: str | bytes) -> None:
        value = text.encode() if isinstance(text, str) else text

        async def go(c: EtcdConnection, md: Any) -> Any:
            req = rpc.PutRequest(key=self._config_key, value=value)
            return await c.kv.Put(req, timeout=self.timeout, metadata=md)

        await self._conn.call("put config", go)

    async def watch_config(self, start_revision: int) -> AsyncIterator[tuple[bytes | None, int]]:
        req = rpc.WatchCreateRequest(key=self._config_key, start_revision=start_revision)
        async for resp in self._conn.watch_stream(req):
            for ev in resp.events:
                value: bytes | None = ev.kv.value if ev.type == 0 else None
                yield value, int(ev.kv.mod_revision)

    @property
    def config_key(self) -> str:
        return self._config_key.decode()

    # ------------------------------------------------------------------ leases

    async def list_leases(
        self, *, expirations: bool = True, created_after: int = 0
    ) -> tuple[list[Lease], int]:
        if created_after > 0:
            return await self._list_created_after(created_after, expirations)
        resp = await self._range(self._subnets, self._subnets_end)
        ids = {kv.lease for kv in resp.kvs}
        if expirations:
            await self._expirations(ids)
        if len(self._expiry) > 2 * len(ids) + 1000:
            # Forget expiries of leases no longer attached to any key, now and then only:
            # concurrent lists (of other revisions) still need theirs.
            self._expiry = {i: t for i, t in self._expiry.items() if i in ids}
        leases = []
        decoded: dict[bytes, tuple[bytes, int, Lease | None]] = {}
        old = self._decoded
        for kv in resp.kvs:
            lease = self._decode_cached(old, decoded, kv, expirations)
            if lease is not None:
                leases.append(lease)
        self._decoded = decoded
        listed = {self.key_text(kv.key) for kv in resp.kvs}
        self._undecodable &= listed
        self.ignored.retain(listed)  # keys deleted while nobody watched
        return leases, int(resp.header.revision)

    def _decode_cached(
        self,
        old: dict[bytes, tuple[bytes, int, Lease | None]],
        new: dict[bytes, tuple[bytes, int, Lease | None]],
        kv: Any,
        expirations: bool,
    ) -> Lease | None:
        """Decode `kv`, or reuse its lease from `old` when its value and etcd lease are the
        same; record it in `new`."""
        key, value, lease_id = kv.key, kv.value, kv.lease
        hit = old.get(key)
        if (
            hit is not None
            and hit[0] == value
            and hit[1] == lease_id
            # a reservation deleted and put again has the same value and no etcd lease
            and (hit[2] is None or hit[2].create_revision == kv.create_revision)
        ):
            lease = hit[2]  # unchanged since the last list (a malformed one was logged then)
            if lease is not None and lease_id and lease.expiration == math.inf:
                known = self._expiry.get(lease_id)
                if known is not None:
                    lease = replace(lease, expiration=known)
        else:
            lease = self._decode(
                key,
                value,
                lease_id,
                math.inf if not expirations else 0.0,
                revision=int(kv.mod_revision),
                create_revision=int(kv.create_revision),
            )
        new[key] = (value, lease_id, lease)
        return lease

    async def _list_created_after(
        self, revision: int, expirations: bool
    ) -> tuple[list[Lease], int]:
        """The keys created after `revision`, through the decoded cache of the full lists (into
        which they go too: concurrent acquisitions on one registry see the same new keys)."""
        resp = await self._range(self._subnets, self._subnets_end, revision + 1)
        if expirations:
            await self._expirations({kv.lease for kv in resp.kvs})
        leases = []
        for kv in resp.kvs:
            lease = self._decode_cached(self._decoded, self._decoded, kv, expirations)
            if lease is not None:
                leases.append(lease)
        return leases, int(resp.header.revision)

    async def get_lease(
        self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None
    ) -> tuple[Lease | None, int]:
        resp = await self._range(self.key(subnet, ipv6_subnet))
        revision = int(resp.header.revision)
        if not resp.kvs:
            return None, revision
        kv = resp.kvs[0]
        await self._expiration(kv.lease)
        lease = self._decode(
            kv.key,
            kv.value,
            kv.lease,
            revision=int(kv.mod_revision),
            create_revision=int(kv.create_revision),
        )
        return lease, revision

    async def create_lease(
        self,
        subnet: IPv4Network,
        attrs: LeaseAttrs,
        ttl: int,
        ipv6_subnet: IPv6Network | None = None,
    ) -> Lease | None:
        key = self._subnets + subnet_key(subnet, ipv6_subnet).encode()
        lease_id, expiry = await self._grant_or_spare(ttl)
        compare = rpc.Compare(
            key=key, target=rpc.Compare.VERSION, result=rpc.Compare.EQUAL, version=0
        )
        # After an error, give the etcd lease back. Not when cancelled: a remote call would hold
        # the cancellation up for a timeout when etcd is slow. An etcd lease with no key expires
        # by itself; a key created just before the cancel is ours at the next acquisition.
        try:
            resp = await self._txn([compare], [_put_op(key, attrs.to_json().encode(), lease_id)])
        except Exception:
            await self._revoke(lease_id)
            raise
        if not resp.succeeded:
            await self._keep_spare(lease_id, ttl, expiry)
            return None
        return Lease(subnet, attrs, ipv6_subnet, expiry, int(resp.header.revision))

    async def _grant_or_spare(self, ttl: int) -> tuple[int, float]:
        """A fresh etcd lease: one left unattached by a lost race moments ago, else a new one.

        Saves a grant and a revoke per conflict when many hosts acquire at once."""
        now = time.time()
        while self._spares:
            lease_id, spare_ttl, expiry = self._spares.pop()
            if spare_ttl == ttl and expiry - now > ttl - _SPARE_MAX_AGE:
                return lease_id, expiry
            await self._revoke(lease_id)
        return await self._grant(ttl)

    async def _keep_spare(self, lease_id: int, ttl: int, expiry: float) -> None:
        if len(self._spares) < _MAX_SPARES:
            self._spares.append((lease_id, ttl, expiry))
        else:
            await self._revoke(lease_id)

    async def _rewrite(
        self, lease: Lease, value: bytes | None, ttl: int, check: LeaseAttrs | None
    ) -> tuple[Lease | None, str]:
        """Re-put `lease`'s key, atomically against its current revision.

        `value` None keeps the stored bytes. `check`: the stored value must decode to exactly
        these attrs (else only its PublicIP must match `lease`'s). A reservation stays one.
        Returns the new lease, or None and why not.
        """
        key = self._subnets + lease.key.encode()  # a dual-stack key names both subnets
        resp = await self._range(key)
        if not resp.kvs:
            return None, "the key is gone"
        kv = resp.kvs[0]
        try:
            current = LeaseAttrs.from_json(kv.value)
        except MalformedLease as e:
            return None, f"the value is malformed now ({e})"
        if check is not None and current != check:
            return None, f"the value changed to {kv.value.decode(errors='replace')}"
        if current.public_ip != lease.attrs.public_ip:
            return None, f"the key now belongs to {current.public_ip}"
        reserved = kv.lease == 0
        created = int(kv.create_revision)
        if reserved and value is None:  # nothing expires
            return Lease(lease.subnet, current, lease.ipv6_subnet, None, created), ""
        new_id, expiry = (0, None) if reserved else await self._grant(ttl)
        compare = rpc.Compare(
            key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=kv.mod_revision
        )
        put_value = kv.value if value is None else value
        # No revoke of new_id when the transaction fails with an error or is cancelled: it may
        # have committed all the same, and revoking would then delete the key we renewed. An
        # etcd lease that no key uses expires by itself.
        txn = await self._txn([compare], [_put_op(key, put_value, new_id)])
        if not txn.succeeded:
            if new_id:
                await self._revoke(new_id)
            return None, "the key changed while we rewrote it"
        if kv.lease:
            await self._revoke(kv.lease)
        attrs = current if value is None else LeaseAttrs.from_json(value)
        return Lease(lease.subnet, attrs, lease.ipv6_subnet, expiry, created), ""

    async def update_lease(self, lease: Lease, attrs: LeaseAttrs, ttl: int) -> Lease | None:
        new, why = await self._rewrite(lease, attrs.to_json().encode(), ttl, None)
        if new is None:
            log.info("could not update lease %s: %s", lease.subnet, why)
        return new

    async def renew_lease(self, lease: Lease, ttl: int) -> Lease:
        new, why = await self._rewrite(lease, None, ttl, lease.attrs)
        if new is None:
            raise LeaseLost(f"lease {lease.subnet} of {lease.attrs.public_ip} was lost: {why}")
        return new

    async def delete_lease(
        self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None
    ) -> bool:
        async def go(c: EtcdConnection, md: Any) -> Any:
            req = rpc.DeleteRangeRequest(key=self.key(subnet, ipv6_subnet))
            return await c.kv.DeleteRange(req, timeout=self.timeout, metadata=md)

        resp = await self._conn.call("delete", go)
        return bool(resp.deleted)

    async def reserve(
        self,
        subnet: IPv4Network,
        public_ip: IPv4Address,
        ipv6_subnet: IPv6Network | None = None,
        public_ipv6: IPv6Address | None = None,
    ) -> None:
        """Put a permanent reservation (no etcd lease) under the key of `subnet` and
        `ipv6_subnet`, replacing whatever that key held: a lease of that host (same PublicIP and
        PublicIPv6) becomes permanent, with its value kept. An IPv6-only reservation is flannel's
        form: `subnet` NO_IPV4 and `public_ip` 0.0.0.0 (key `0.0.0.0-0&fd00:1:0:7::-64`)."""
        key = self.key(subnet, ipv6_subnet)
        resp = await self._range(key)
        value = LeaseAttrs(public_ip, public_ipv6).to_json().encode()
        if resp.kvs:
            try:
                old = LeaseAttrs.from_json(resp.kvs[0].value)
                if (old.public_ip, old.public_ipv6) == (public_ip, public_ipv6):
                    value = resp.kvs[0].value
            except MalformedLease:
                pass

        async def go(c: EtcdConnection, md: Any) -> Any:
            return await c.kv.Put(
                rpc.PutRequest(key=key, value=value), timeout=self.timeout, metadata=md
            )

        await self._conn.call("put reservation", go)

    async def unreserve(self, subnet: IPv4Network | IPv6Network) -> list[str]:
        """Delete every reservation (a key without an etcd lease) whose key names `subnet` as
        its IPv4 or its IPv6 part: `10.1.7.0/24` finds `10.1.7.0-24` and `10.1.7.0-24&...`,
        `fd00:1:0:7::/64` finds `...&fd00:1:0:7::-64`. Leases, and a key rewritten meanwhile,
        are left alone. Returns the keys deleted (their last elements), none when nothing was."""
        if isinstance(subnet, IPv4Network):
            first = self.key(subnet)
            resp = await self._range(first, _range_end(first))
        else:
            resp = await self._range(self._subnets, self._subnets_end)
        deleted: list[str] = []
        for kv in resp.kvs:
            text = self.key_text(kv.key)
            try:
                v4, v6 = parse_subnet_key(text)
            except MalformedLease:
                continue
            # 0.0.0.0/0 is the IPv4 part of every IPv6-only key: it names only the key 0.0.0.0-0.
            named = v6 == subnet or (v4 == subnet and (v6 is None or v4.prefixlen > 0))
            if kv.lease or not named:
                continue
            same = rpc.Compare(key=kv.key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                               mod_revision=kv.mod_revision)  # fmt: skip
            delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=kv.key))
            if (await self._txn([same], [delete])).succeeded:
                deleted.append(text)
        return deleted

    # ------------------------------------------------------------------ revoke (overlayctl)

    async def inspect_key(self, subnet: IPv4Network | IPv6Network) -> KeyRecord | None:
        """The raw key holding `subnet` and what etcd says of its etcd lease; None when there is
        no such key. An IPv4 subnet finds its key, also a dual-stack `<v4>&<v6>` one; an IPv6
        subnet finds the IPv6-only key `0.0.0.0-0&<v6>`, else the dual-stack key naming it (a
        scan of the keys: it is not a key prefix)."""
        if isinstance(subnet, IPv6Network):
            only6 = self.key(NO_IPV4, subnet)
            resp = await self._range(only6)
            if not resp.kvs:
                resp = await self._range(self._subnets, self._subnets_end)
            tail = b"&" + subnet_key(NO_IPV4, subnet).split("&", 1)[1].encode()
            kv = next((kv for kv in resp.kvs if kv.key.endswith(tail)), None)
        else:
            first = self.key(subnet)
            resp = await self._range(first, _range_end(first))
            kv = next(
                (kv for kv in resp.kvs if kv.key == first or kv.key.startswith(first + b"&")),
                None,
            )
        if kv is None:
            return None
        ttl = granted = -1
        attached = 0
        if kv.lease:

            async def go(c: EtcdConnection, md: Any) -> Any:
                req = rpc.LeaseTimeToLiveRequest(ID=kv.lease, keys=True)
                return await c.lease.LeaseTimeToLive(req, timeout=self.timeout, metadata=md)

            ttl_resp = await self._conn.call("lease time-to-live", go)
            ttl, granted = int(ttl_resp.TTL), int(ttl_resp.grantedTTL)
            attached = len(ttl_resp.keys)
        return KeyRecord(self.key_text(kv.key), bytes(kv.value), int(kv.lease),
                         int(kv.mod_revision), ttl, granted, attached)  # fmt: skip

    async def revoke_key(self, record: KeyRecord) -> bool:
        """Delete the key of `record` if it still holds the same etcd lease (a renewal grants a
        new one, so a host that renewed meanwhile keeps its lease), then revoke that etcd lease
        when no other key uses it. False when the key changed or is gone."""
        key = self._subnets + record.key.encode()
        same = rpc.Compare(
            key=key, target=rpc.Compare.LEASE, result=rpc.Compare.EQUAL, lease=record.lease_id
        )
        exists = rpc.Compare(
            key=key, target=rpc.Compare.VERSION, result=rpc.Compare.GREATER, version=0
        )
        delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))
        resp = await self._txn([exists, same], [delete])
        if not resp.succeeded:
            return False
        if record.lease_id and record.attached_keys <= 1:
            await self._revoke(record.lease_id)
        return True

    # ------------------------------------------------------------------ watch

    async def watch_lease_batches(
        self,
        start_revision: int,
        subnet: IPv4Network | None = None,
        ipv6_subnet: IPv6Network | None = None,
    ) -> AsyncIterator[LeaseBatch]:
        """Lease events from `start_revision` on, one LeaseBatch per etcd watch response.

        The first batch is empty and comes once etcd has created the watch; empty ones follow
        for progress answers (their `revision` says how far etcd has delivered). Raises `Compacted`
        when that revision is compacted away, `RegistryError` when the stream breaks; the
        caller resumes from the last revision it saw (+1).
        """
        if subnet is None:
            key, end = self._subnets, self._subnets_end
        else:
            key, end = self.key(subnet, ipv6_subnet), b""
        req = rpc.WatchCreateRequest(
            key=key, range_end=end, start_revision=start_revision, prev_kv=True
        )
        async for resp in self._conn.watch_stream(req):
            if resp.created:
                yield LeaseBatch()  # the watch is established: tells the caller etcd is reachable
                continue
            batch = LeaseBatch()
            if not resp.events:  # a progress answer: everything up to the header's revision
                batch.revision = int(resp.header.revision)
                yield batch
                continue
            await self._expirations({ev.kv.lease for ev in resp.events if ev.type == 0})
            for ev in resp.events:
                event = self._event(ev)
                if event is not None:
                    batch.append(event)
            batch.revision = max(int(ev.kv.mod_revision) for ev in resp.events)
            yield batch

    def _event(self, ev: Any) -> LeaseEvent | None:
        kv = ev.kv
        revision = int(kv.mod_revision)
        if ev.type == 0 and ev.HasField("prev_kv") and ev.prev_kv.lease not in (0, kv.lease):
            # A renewal puts the same value on a fresh etcd lease: the old one's expiry is of
            # no use any more (kept, the cache grew by one entry per renewal of every host).
            self._expiry.pop(ev.prev_kv.lease, None)
        if ev.type == 0:  # PUT
            lease = self._decode(
                kv.key,
                kv.value,
                kv.lease,
                revision=revision,
                create_revision=int(kv.create_revision),
            )
            if lease is not None:
                return LeaseEvent("added", lease, revision)
            # A valid lease overwritten with garbage is no longer a lease.
        else:
            self._forget(kv.key)
        try:
            subnet, v6 = parse_subnet_key(self.key_text(kv.key))
        except MalformedLease:
            return None  # recorded by _decode for PUTs; a DELETE of such a key changes nothing
        last = None
        if ev.HasField("prev_kv") and ev.prev_kv.value:
            prev = ev.prev_kv
            last = self._decode(
                prev.key,
                prev.value,
                prev.lease,
                create_revision=int(prev.create_revision),
                record=False,
            )
        if last is None:
            last = Lease(subnet, LeaseAttrs(IPv4Address(0)), v6)
        if ev.type == 1:
            self._expiry.pop(ev.prev_kv.lease, None)
        return LeaseEvent("removed", last, revision)

    async def watch_leases(
        self,
        start_revision: int,
        subnet: IPv4Network | None = None,
        ipv6_subnet: IPv6Network | None = None,
    ) -> AsyncIterator[LeaseEvent]:
        """Like `watch_lease_batches`, one event at a time."""
        async for batch in self.watch_lease_batches(start_revision, subnet, ipv6_subnet):
            for event in batch:
                yield event
