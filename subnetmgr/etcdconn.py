"""Our own gRPC channel to etcd: several endpoints with failover, TLS, username/password.

aetcd's `Client` opens an insecure channel to one host and port. We keep its generated
stubs and messages (`aetcd.rpc`) and manage the channel ourselves:

- endpoints are tried in order; a call that fails with UNAVAILABLE or DEADLINE_EXCEEDED is
  retried once on each following endpoint (wrapping round), then `RegistryError` names them all;
- `https://` endpoints use TLS with the CA, client certificate and key from `EtcdOptions`;
- with a username, an auth token is fetched on first use and again when etcd says it expired.

Every unary call carries `EtcdOptions.timeout`. Nothing here knows flannel's formats.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
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


def _describe(e: grpc.aio.AioRpcError) -> str:
    return f"{e.code().name}: {e.details()}"


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
                return await fn(self, md)
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
                raise RegistryError(f"etcd {what} failed at {url}: {_describe(e)}") from None
        raise RegistryError(
            f"etcd {what} failed: no endpoint answered ({'; '.join(errors)}); "
            "check --etcd-endpoints and that etcd is running"
        )

    async def watch_stream(self, request: Any) -> AsyncIterator[Any]:
        """Open a watch with `request` (a WatchCreateRequest) and yield its responses.

        Raises `Compacted` when the start revision is gone, `RegistryError` when the stream
        breaks (after switching to the next endpoint, so that the caller's retry goes there).
        """
        self._open()
        url = self.endpoint.url
        try:
            md = await self.metadata()
            stream = self.watch.Watch(metadata=md)
        except grpc.aio.AioRpcError as e:
            await self.failover(_describe(e))
            raise RegistryError(f"etcd watch failed at {url}: {_describe(e)}") from None
        try:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result of an
                # awaitable that completed just as the caller was cancelled, losing the
                # cancellation, and this generator then read the quiet stream for ever.
                async with asyncio.timeout(self.opts.timeout):
                    await stream.write(rpc.WatchRequest(create_request=request))
                    resp = await stream.read()
            except TimeoutError:
                await self.failover("watch not created in time")
                raise RegistryError(
                    f"etcd at {url} did not answer a watch request within {self.opts.timeout}s"
                ) from None
            while True:
                if resp is grpc.aio.EOF:
                    raise RegistryError(f"etcd at {url} closed the watch stream")
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision, request.start_revision)
                if resp.canceled:
                    raise RegistryError(f"etcd at {url} cancelled the watch: {resp.cancel_reason}")
                yield resp
                resp = await stream.read()
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._token = None
            else:
                await self.failover(_describe(e))
            raise RegistryError(f"etcd watch at {url} broke: {_describe(e)}") from None
        except asyncio.CancelledError:
            if _cancel_requested():
                raise
            raise RegistryError(
                f"etcd watch at {url} was cut: its channel was closed after another call failed"
            ) from None
        finally:
            stream.cancel()

    async def close(self) -> None:
        await self._drop()
