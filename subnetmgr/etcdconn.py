"""Our own gRPC channel to etcd: several endpoints with failover, TLS, username/password.

aetcd's `Client` opens an insecure channel to one host and port. We keep its generated
stubs and messages (`aetcd.rpc`) and manage the channel ourselves:

- endpoints are tried in order; a call that fails with UNAVAILABLE or DEADLINE_EXCEEDED is
  retried once on each following endpoint (wrapping round), then `RegistryError` names them all;
- `https://` endpoints use TLS with the CA, client certificate and key from `EtcdOptions`;
- with a username, an auth token is fetched on first use and again when etcd says it expired.

Every unary call carries `EtcdOptions.timeout`. Nothing here knows flannel's formats.

Watches notice a partition:
- every watch carries etcd's "require leader" metadata (`hasleader: true`, as clientv3's
  WithRequireLeader): a member that loses its leader cancels such watches (etcd 3.4 checks
  every election timeout and gives up after three) and refuses new ones with UNAVAILABLE, so a
  member cut off from its peers makes us fail over instead of serving a watch that never
  delivers another event;
- a liveness check catches a stream that went silent otherwise (a proxy or a peer that stopped
  answering without closing): after `watch_idle` seconds without a response we send a
  WatchProgressRequest; etcd answers it at once (a response with no events, the store's
  revision in its header). No answer within `timeout` seconds: failover, RegistryError, and the
  caller resumes from its last revision on the next endpoint.

`EtcdConnection.health` (EtcdHealth) records whether etcd answered the last call, when a call last
succeeded, the highest store revision seen and every failed call, for /metrics and /readyz.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
from aetcd import rpc

from subnetmgr.model import DEFAULT_PREFIX

log = logging.getLogger("overlay.subnetmgr.etcd")

T = TypeVar("T")

_FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

# Keepalive pings find a dead peer under a quiet watch stream. etcd refuses pings more often
# than every 5 s (its --grpc-keepalive-min-time) and pings with no stream open at all.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class RegistryError(RuntimeError):
    """etcd could not be used: unreachable, refused our credentials, bad options.

    The message names the endpoints (or the option) and what to check.
    """


class Compacted(RegistryError):
    """A watch asked for history that etcd has compacted away; re-list and watch again."""

    def __init__(self, compact_revision: int, start_revision: int) -> None:
        self.compact_revision = compact_revision
        self.start_revision = start_revision
        super().__init__(
            f"etcd compacted its history up to revision {compact_revision}; "
            f"cannot watch from revision {start_revision}"
        )


@dataclass(frozen=True)
class EtcdOptions:
    """How to reach etcd; names follow flanneld's --etcd-* flags."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    """Tried in order; the next one takes over when the current one is unreachable."""
    prefix: str = DEFAULT_PREFIX
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    timeout: float = 5.0
    """Seconds for each remote call."""
    watch_idle: float = 10.0
    """Seconds a watch may stay quiet before we ask etcd for its progress (see the module)."""


_CUT = object()
"""Queued by a watch's reader when grpc cancelled its read: the channel was closed under it."""

_REQUIRE_LEADER = ("hasleader", "true")
"""gRPC metadata: etcd refuses or cancels the stream when the member has no leader."""


@dataclass
class EtcdHealth:
    """What the calls to etcd found, updated by every call and watch response."""

    up: bool = True
    """False once a call failed on every endpoint; True again after any success."""
    last_success: float = 0.0
    """Unix time of the last call or watch response that succeeded (0: none yet)."""
    revision: int = 0
    """The highest store revision seen in a response header."""
    errors: int = 0
    """Failed calls and broken watches (each retry of a caller counts again)."""
    last_error: str = ""
    listeners: list[Callable[[bool, str], None]] = field(default_factory=list)
    """Called with (up, reason) when `up` changes."""

    def success(self, header_revision: int = 0) -> None:
        self.last_success = time.time()
        if header_revision > self.revision:
            self.revision = header_revision
        if not self.up:
            self._set(True, "etcd answered again")

    def failure(self, reason: str, *, down: bool) -> None:
        self.errors += 1
        self.last_error = reason
        if down and self.up:
            self._set(False, reason)

    def _set(self, up: bool, reason: str) -> None:
        self.up = up
        for listener in list(self.listeners):
            try:
                listener(up, reason)
            except Exception as e:  # a listener's bug must not break an etcd call
                log.error("etcd health listener failed: %r", e)


def _header_revision(resp: object) -> int:
    header = getattr(resp, "header", None)
    revision = getattr(header, "revision", 0)
    return revision if isinstance(revision, int) else 0


@dataclass(frozen=True)
class Endpoint:
    url: str
    target: str
    secure: bool


def parse_endpoints(opts: EtcdOptions) -> list[Endpoint]:
    """Check the endpoint URLs; `host:port` without a scheme means http (https with TLS files)."""
    if not opts.endpoints:
        raise RegistryError("no etcd endpoints given: pass --etcd-endpoints http://HOST:2379")
    tls_files = bool(opts.ca_file or opts.cert_file)
    out = []
    for url in opts.endpoints:
        raw = url.strip()
        if "://" not in raw:
            raw = ("https://" if tls_files else "http://") + raw
        parts = urlsplit(raw)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise RegistryError(
                f"etcd endpoint {url!r} is not of the form http://HOST:PORT or https://HOST:PORT"
            )
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        out.append(Endpoint(url, f"{host}:{port}", parts.scheme == "https"))
    return out


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise RegistryError(f"cannot read the etcd {what} {path!r}: {e.strerror}") from None


def _cancel_requested() -> bool:
    """Whether someone asked to cancel the current task.

    grpc.aio raises `asyncio.CancelledError` also in a task nobody cancelled, when the call's
    channel is closed under it (`EtcdConnection.failover` by a concurrent call): such an error
    is an etcd failure to retry, not a cancellation to pass on."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _printable(text: object, limit: int = 200) -> str:
    """Text from the server for a log line: printable, one line, at most `limit` characters."""
    raw = "" if text is None else str(text)
    s = "".join(c if c.isprintable() else "?" for c in raw[: limit + 1])
    return s if len(s) <= limit else s[:limit] + "..."


def _describe(e: grpc.aio.AioRpcError) -> str:
    return f"{e.code().name}: {_printable(e.details())}"


class EtcdConnection:
    """One channel at a time, to the current endpoint; see the module docstring."""

    def __init__(self, opts: EtcdOptions) -> None:
        self.opts = opts
        self.endpoints = parse_endpoints(opts)
        if (opts.cert_file is None) != (opts.key_file is None):
            raise RegistryError(
                "etcd client TLS needs both a certificate and a key: "
                f"got certfile={opts.cert_file!r} keyfile={opts.key_file!r}"
            )
        if (opts.username is None) != (opts.password is None):
            raise RegistryError("etcd authentication needs both a username and a password")
        self._creds: grpc.ChannelCredentials | None = None
        if any(ep.secure for ep in self.endpoints):
            self._creds = grpc.ssl_channel_credentials(
                root_certificates=_read(opts.ca_file, "CA file"),
                private_key=_read(opts.key_file, "key file"),
                certificate_chain=_read(opts.cert_file, "certificate file"),
            )
        self._index = 0
        self._channel: grpc.aio.Channel | None = None
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self.kv: Any = None
        self.lease: Any = None
        self.watch: Any = None
        self._auth: Any = None
        self.health = EtcdHealth()

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self._index]

    def _open(self) -> None:
        if self._channel is not None:
            return
        ep = self.endpoint
        if ep.secure:
            assert self._creds is not None
            self._channel = grpc.aio.secure_channel(ep.target, self._creds, _CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(ep.target, _CHANNEL_OPTIONS)
        self.kv = rpc.KVStub(self._channel)
        self.lease = rpc.LeaseStub(self._channel)
        self.watch = rpc.WatchStub(self._channel)
        self._auth = rpc.AuthStub(self._channel)
        self._token = None

    async def _drop(self) -> None:
        channel, self._channel = self._channel, None
        self._token = None
        if channel is not None:
            await channel.close()

    async def failover(self, reason: str) -> None:
        """Close the channel and move on to the next endpoint (the same one if it is alone:
        a fresh channel retries at once instead of waiting out gRPC's reconnect backoff)."""
        old = self.endpoint.url
        await self._drop()
        self._index = (self._index + 1) % len(self.endpoints)
        if len(self.endpoints) > 1:
            log.warning(
                "etcd endpoint %s failed (%s); switching to %s", old, reason, self.endpoint.url
            )

    async def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The auth token metadata, fetching a token when we have none."""
        if self.opts.username is None:
            return None
        async with self._auth_lock:
            if self._token is None:
                self._open()
                try:
                    resp = await self._auth.Authenticate(
                        rpc.AuthenticateRequest(
                            name=self.opts.username, password=self.opts.password
                        ),
                        timeout=self.opts.timeout,
                    )
                except grpc.aio.AioRpcError as e:
                    if e.code() in _FAILOVER_CODES:
                        raise
                    raise RegistryError(
                        f"etcd at {self.endpoint.url} refused user {self.opts.username!r} "
                        f"({_describe(e)}); check --etcd-username and --etcd-password"
                    ) from None
                self._token = resp.token
        return (("token", self._token),)

    async def call(self, what: str, fn: Callable[[EtcdConnection, Any], Awaitable[T]]) -> T:
        """Run `fn(self, metadata)` on the current endpoint, failing over on UNAVAILABLE and
        DEADLINE_EXCEEDED to each other endpoint once; re-authenticate once on an expired token.
        """
        errors: list[str] = []
        reauthed = False
        attempts = 0
        while attempts < len(self.endpoints):
            self._open()
            url = self.endpoint.url
            try:
                md = await self.metadata()
                result = await fn(self, md)
            except asyncio.CancelledError:
                if _cancel_requested():
                    raise
                # Not ours: grpc cancels every call on a channel that is closed, and another
                # call's failover closed this one. Retry on the channel that replaced it.
                errors.append(f"{url}: cut by a failover")
                attempts += 1
                continue
            except grpc.aio.AioRpcError as e:
                if e.code() in _FAILOVER_CODES:
                    errors.append(f"{url}: {_describe(e)}")
                    attempts += 1
                    await self.failover(_describe(e))
                    continue
                if e.code() == grpc.StatusCode.UNAUTHENTICATED and not reauthed:
                    reauthed = True
                    self._token = None
                    continue
                error = f"etcd {what} failed at {url}: {_describe(e)}"
                self.health.failure(error, down=False)  # etcd answered: it is up
                raise RegistryError(error) from None
            except RegistryError as e:  # refused credentials (metadata)
                self.health.failure(str(e), down=False)
                raise
            self.health.success(_header_revision(result))
            return result
        error = (
            f"etcd {what} failed: no endpoint answered ({'; '.join(errors)}); "
            "check --etcd-endpoints and that etcd is running"
        )
        self.health.failure(error, down=True)
        raise RegistryError(error)

    async def watch_stream(self, request: Any) -> AsyncIterator[Any]:
        """Open a watch with `request` (a WatchCreateRequest) and yield its responses, the
        progress answers too (no events, not `created`: the header's revision is how far etcd
        has delivered).

        Raises `Compacted` when the start revision is gone, `RegistryError` when the stream
        breaks, the member has no leader or the stream went silent (after switching to the next
        endpoint, so that the caller's retry goes there).
        """
        self._open()
        url = self.endpoint.url
        try:
            md = await self.metadata()
            stream = self.watch.Watch(metadata=(*(md or ()), _REQUIRE_LEADER))
        except grpc.aio.AioRpcError as e:
            await self._watch_failed(url, _describe(e))
            raise RegistryError(f"etcd watch failed at {url}: {_describe(e)}") from None
        # One task reads the stream into a queue: the consumer waits on the queue with a
        # deadline, never cancelling a read on the gRPC call itself.
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            try:
                while True:
                    resp = await stream.read()
                    await queue.put(resp)
                    if resp is grpc.aio.EOF:
                        return
            except asyncio.CancelledError:
                if _cancel_requested():  # by us, in the finally below
                    raise
                # grpc cancels the reads of a channel that another call's failover closed.
                await queue.put(_CUT)
            except BaseException as e:  # handed to the consumer, which raises it
                await queue.put(e)

        reader: asyncio.Task[None] | None = None
        try:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result of an
                # awaitable that completed just as the caller was cancelled, losing the
                # cancellation, and this generator then read the quiet stream for ever.
                async with asyncio.timeout(self.opts.timeout):
                    await stream.write(rpc.WatchRequest(create_request=request))
                    reader = asyncio.create_task(pump())
                    resp = await queue.get()
            except TimeoutError:
                await self._watch_failed(url, "watch not created in time")
                raise RegistryError(
                    f"etcd at {url} did not answer a watch request within {self.opts.timeout}s"
                ) from None
            while True:
                if resp is _CUT:
                    raise asyncio.CancelledError()  # not requested: reported as a cut below
                if isinstance(resp, BaseException):
                    raise resp
                if resp is grpc.aio.EOF:
                    await self._watch_failed(url, "stream closed")
                    raise RegistryError(f"etcd at {url} closed the watch stream")
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision, request.start_revision)
                if resp.canceled:
                    reason = _printable(resp.cancel_reason) or "no reason given"
                    await self._watch_failed(url, f"watch cancelled: {reason}")
                    raise RegistryError(f"etcd at {url} cancelled the watch: {reason}")
                self.health.success(_header_revision(resp))
                yield resp
                resp = await self._next(stream, queue, url)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._token = None
                self.health.failure(f"etcd watch at {url}: {_describe(e)}", down=False)
            else:
                await self._watch_failed(url, _describe(e))
            raise RegistryError(f"etcd watch at {url} broke: {_describe(e)}") from None
        except asyncio.CancelledError:
            if _cancel_requested():
                raise
            self.health.failure(f"etcd watch at {url} cut by a failover", down=False)
            raise RegistryError(
                f"etcd watch at {url} was cut: its channel was closed after another call failed"
            ) from None
        finally:
            if reader is not None:
                reader.cancel()
            stream.cancel()
            if reader is not None:
                await asyncio.gather(reader, return_exceptions=True)

    async def _next(self, stream: Any, queue: asyncio.Queue[Any], url: str) -> Any:
        """The next response; after `watch_idle` quiet seconds, ask etcd for the watch's
        progress and give it `timeout` seconds to answer anything."""
        try:
            async with asyncio.timeout(self.opts.watch_idle):
                return await queue.get()
        except TimeoutError:
            pass
        try:
            async with asyncio.timeout(self.opts.timeout):
                await stream.write(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
                return await queue.get()
        except TimeoutError:
            why = (
                f"the watch was silent for {self.opts.watch_idle:g}s and a progress request "
                f"got no answer within {self.opts.timeout:g}s"
            )
            await self._watch_failed(url, why)
            raise RegistryError(f"etcd at {url}: {why}") from None

    async def _watch_failed(self, url: str, reason: str) -> None:
        """A watch broke at `url`: count it and move on to the next endpoint."""
        self.health.failure(f"etcd watch at {url}: {reason}", down=len(self.endpoints) == 1)
        await self.failover(reason)

    async def close(self) -> None:
        await self._drop()
