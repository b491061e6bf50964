"""The health server: /healthz, /readyz and /metrics (Prometheus text format 0.0.4).

A small HTTP/1.0 server on asyncio streams. `/healthz` is 200 while the daemon runs; `/readyz`
is 200 "ready" while our lease holds and subnet.env and the data path are in place, else 503
with a one-line reason (starting, lease lost or taken, duplicate PublicIP, ...); `/status` is
that reason and the lease and etcd figures as JSON (for `overlayctl status`); `/metrics` is
served when metrics are on (404 otherwise). It is bounded (HealthServer: connections, request size,
time) and answers any malformed request with a 4xx, never a traceback.

Our metrics are rendered by hand (Metrics.render: exact names, integer values as integers);
the standard process_* metrics come from prometheus_client's ProcessCollector. Why not aiohttp
for the server or prometheus_client for everything: docs/daemon.md, bench/bench_health.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0
_METRIC_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    """Prometheus sample value: integers as such, floats at full precision."""
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _labels(pairs: dict[str, str]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(pairs.items())) + "}"


@dataclass
class Metrics:
    """Counters and gauges of one daemon; rendered on demand."""

    ready: bool = False
    not_ready_reason: str = "starting: lease, data path or subnet.env not in place"
    """Why /readyz answers 503 (one line); empty while ready."""
    lease_subnet: str | None = None
    lease_public_ip: str | None = None
    lease_backend: str | None = None
    lease_expiration: float | None = None
    peers: int = 0
    reconciles: Counter[str] = field(default_factory=Counter)
    reconcile_errors: int = 0
    reconcile_seconds: float = 0.0
    etcd_errors: int = 0
    lease_acquisitions: int = 0
    events: Counter[str] = field(default_factory=Counter)
    events_dropped: int = 0
    masq_resyncs: int = 0
    masq_repairs: int = 0
    leases_ignored: Counter[str] = field(default_factory=Counter)
    """Lease keys or values from etcd that were skipped, by reason (e.g. "not_json",
    "outside_network", "overlaps_older"); each distinct key and value is counted once."""
    leases_ignored_now: Callable[[], Mapping[str, int]] | None = None
    """The keys ignored right now, by reason (read at every scrape): a key that is fixed or
    deleted leaves this gauge, while the counter above only grows."""
    started: float = field(default_factory=time.time)
    etcd_up: bool | None = None
    """Whether etcd answered the last call (None: not asked yet)."""
    etcd_last_success: float | None = None
    """Unix time of the last etcd call that succeeded."""
    watch_lag: int | None = None
    """etcd's newest revision seen minus the lease mirror's revision."""
    refresh: Callable[[], None] | None = None
    """Called before each render and status: the daemon copies its live figures in."""
    backend_type: str = ""
    backend_counters: Callable[[], Mapping[str, int]] | None = None
    """The backend's `counters()` when it has one (udp): each one is rendered at every scrape
    as `overlay_<backend_type>_<name>`, e.g. `overlay_udp_tx_packets`."""

    def publish_backend_counters(
        self, backend_type: str, counters: Callable[[], Mapping[str, int]]
    ) -> None:
        self.backend_type = backend_type
        self.backend_counters = counters

    def observe_reconcile(self, kind: str, seconds: float, ok: bool) -> None:
        self.reconciles[kind] += 1
        self.reconcile_seconds += seconds
        if not ok:
            self.reconcile_errors += 1

    def _refresh(self) -> None:
        if self.refresh is not None:
            try:
                self.refresh()
            except Exception as e:  # a scrape must not fail because of a daemon bug
                log.warning("metrics: cannot refresh the live figures: %r", e)

    def readiness(self) -> tuple[bool, str]:
        """(ready, one-line reason when not ready)."""
        self._refresh()
        reason = " ".join(self.not_ready_reason.split()) or "not in place yet"
        return self.ready, reason

    def status(self) -> dict[str, object]:
        """What `/status` serves as JSON: readiness with its reason, the lease, etcd."""
        ready, reason = self.readiness()
        now = time.time()
        left = None if self.lease_expiration is None else round(self.lease_expiration - now, 3)
        return {
            "ready": ready,
            "reason": "" if ready else reason,
            "lease": None if self.lease_subnet is None else {
                "subnet": self.lease_subnet,
                "public_ip": self.lease_public_ip,
                "backend": self.lease_backend,
                "expiration": self.lease_expiration,
                "expiry_seconds": left,
            },
            "etcd": {
                "up": self.etcd_up,
                "last_success": self.etcd_last_success,
                "errors": self.etcd_errors,
                "watch_lag_revisions": self.watch_lag,
            },
            "lease_acquisitions": self.lease_acquisitions,
        }  # fmt: skip

    def render(self) -> str:
        self._refresh()
        out: list[str] = []
        now = time.time()

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{labels} {_number(value)}")

        metric("overlay_up", "gauge", "1 while overlayd runs.", [("", 1)])
        with contextlib.suppress(RuntimeError):  # no running loop: rendered outside the daemon
            metric("overlay_asyncio_tasks", "gauge", "asyncio tasks alive (a leak is a slope).",
                   [("", len(asyncio.all_tasks()))])  # fmt: skip
        metric("overlay_ready", "gauge", "1 once subnet.env and the data path are in place.",
               [("", 1 if self.ready else 0)])  # fmt: skip
        metric("overlay_start_time_seconds", "gauge", "Unix time overlayd started.",
               [("", self.started)])  # fmt: skip
        if self.lease_subnet is not None:
            info = _labels({
                "subnet": self.lease_subnet,
                "public_ip": self.lease_public_ip or "",
                "backend": self.lease_backend or "",
            })  # fmt: skip
            metric("overlay_lease_info", "gauge", "This host's lease (labels), value 1.",
                   [(info, 1)])  # fmt: skip
            if self.lease_expiration is not None:
                metric("overlay_lease_expiration_seconds", "gauge",
                       "Unix time this host's lease expires (absent for a reservation).",
                       [("", self.lease_expiration)])  # fmt: skip
                metric("overlay_lease_expiry_seconds", "gauge",
                       "Seconds left on this host's lease (negative: expired that long ago).",
                       [("", round(self.lease_expiration - now, 3))])  # fmt: skip
        metric("overlay_lease_acquisitions_total", "counter",
               "Leases acquired (first one and re-acquisitions).",
               [("", self.lease_acquisitions)])  # fmt: skip
        metric("overlay_peers", "gauge", "Remote leases handed to the backend.",
               [("", self.peers)])  # fmt: skip
        kinds = sorted(set(self.reconciles) | {"change", "full"})
        metric("overlay_reconciles_total", "counter", "Backend reconciles by trigger.",
               [(_labels({"trigger": k}), self.reconciles[k]) for k in kinds])  # fmt: skip
        metric("overlay_reconcile_errors_total", "counter", "Backend reconciles that failed.",
               [("", self.reconcile_errors)])  # fmt: skip
        out.append("# HELP overlay_reconcile_duration_seconds Time spent in backend reconciles.")
        out.append("# TYPE overlay_reconcile_duration_seconds summary")
        out.append(f"overlay_reconcile_duration_seconds_sum {_number(self.reconcile_seconds)}")
        total = sum(self.reconciles.values())
        out.append(f"overlay_reconcile_duration_seconds_count {total}")
        metric("overlay_etcd_errors_total", "counter",
               "etcd calls that failed, every retry counted, and watches that broke.",
               [("", self.etcd_errors)])  # fmt: skip
        if self.etcd_up is not None:
            metric("overlay_etcd_up", "gauge", "1 when etcd answered the last call, else 0.",
                   [("", 1 if self.etcd_up else 0)])  # fmt: skip
        if self.etcd_last_success is not None:
            metric("overlay_etcd_last_success_timestamp_seconds", "gauge",
                   "Unix time of the last etcd call that succeeded.",
                   [("", self.etcd_last_success)])  # fmt: skip
            metric("overlay_etcd_seconds_since_success", "gauge",
                   "Seconds since the last etcd call that succeeded.",
                   [("", round(max(now - self.etcd_last_success, 0.0), 3))])  # fmt: skip
        if self.watch_lag is not None:
            metric("overlay_watch_lag_revisions", "gauge",
                   "etcd's newest revision seen minus the lease mirror's revision.",
                   [("", self.watch_lag)])  # fmt: skip
        metric("overlay_events_total", "counter", "Events queued for MQTT, by type.",
               [(_labels({"type": k}), v) for k, v in sorted(self.events.items())])  # fmt: skip
        metric("overlay_events_dropped_total", "counter",
               "Events dropped because the MQTT queue was full.",
               [("", self.events_dropped)])  # fmt: skip
        metric("overlay_masq_resyncs_total", "counter", "iptables rule checks.",
               [("", self.masq_resyncs)])  # fmt: skip
        metric("overlay_masq_repairs_total", "counter", "iptables rule checks that rewrote rules.",
               [("", self.masq_repairs)])  # fmt: skip
        ignored = sorted(self.leases_ignored.items())
        metric("overlay_leases_ignored_total", "counter",
               "Lease keys or values read from etcd and skipped, by reason.",
               [(_labels({"reason": k}), v) for k, v in ignored])  # fmt: skip
        if self.leases_ignored_now is not None:
            current = sorted(self.leases_ignored_now().items())
            metric("overlay_leases_ignored", "gauge",
                   "Lease keys in etcd ignored right now, by reason.",
                   [(_labels({"reason": k}), v) for k, v in current])  # fmt: skip
        self._render_backend_counters(metric)
        return "\n".join(out) + "\n"

    def _render_backend_counters(
        self, metric: Callable[[str, str, str, list[tuple[str, float]]], None]
    ) -> None:
        if self.backend_counters is None:
            return
        try:
            values = dict(self.backend_counters())
        except Exception as e:  # a scrape must not fail because of a backend bug
            log.warning("metrics: cannot read the %s backend's counters: %r", self.backend_type, e)
            return
        for name, value in values.items():
            full = f"overlay_{self.backend_type}_{name}"
            if not _METRIC_NAME.fullmatch(full):
                log.debug("metrics: skipping backend counter %r (not a metric name)", name)
                continue
            metric(full, "counter", f"{self.backend_type} backend: {name.replace('_', ' ')}.",
                   [("", value)])  # fmt: skip


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}  # fmt: skip

MAX_CONNECTIONS = 32
"""Connections served at once; one more is answered 503 and closed at once (never queued)."""
MAX_REQUEST_LINE = 8 * 1024
"""Bytes of the request line (and of any one header line); a longer request line is a 400."""
MAX_HEADER_BYTES = 16 * 1024
"""Bytes of all header lines together; more is a 431, as are more than MAX_HEADERS lines."""
MAX_HEADERS = 64
REQUEST_TIMEOUT = 5.0
"""Seconds for one connection to send its request and take the answer; an idle or slow
connection is closed when they run out."""
LINGER_BYTES = 256 * 1024
LINGER_SECONDS = 1.0
"""After an answer, what the client still sends is read and dropped, up to these limits,
before the connection is closed: closing with unread input would make the kernel reset the
connection, and the client could lose the answer."""

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_VERSION = re.compile(rb"HTTP/1\.[0-9]")
_FIELD_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")


class _Reject(Exception):
    """A request answered with a 4xx before it was read to its end."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


async def _read_line(reader: asyncio.StreamReader, what: str, too_long: int) -> bytes | None:
    """One line without its CRLF (or bare LF); None when the peer closed before sending any
    byte of it. A longer line than the reader's limit is a _Reject with status `too_long`."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _Reject(too_long, f"{what} longer than {MAX_REQUEST_LINE} bytes") from None
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise _Reject(400, f"connection closed in the middle of the {what}") from None
    line = line[:-1]
    return line[:-1] if line.endswith(b"\r") else line


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    """Method and target of one HTTP/1.x request, its headers read, checked and dropped.

    None when the peer closed without sending anything. Raises _Reject for anything else that
    is not a well-formed request within the limits."""
    line = await _read_line(reader, "request line", 400)
    if line is None:
        return None
    parts = line.split(b" ")
    if (
        len(parts) != 3
        or not _TOKEN.fullmatch(parts[0])
        or not _TARGET.fullmatch(parts[1])
        or not _VERSION.fullmatch(parts[2])
    ):
        raise _Reject(400, "malformed request line")
    total = count = 0
    while True:
        header = await _read_line(reader, "header line", 431)
        if header is None:
            raise _Reject(400, "connection closed in the middle of the headers")
        if not header:
            break
        total += len(header) + 2
        count += 1
        if total > MAX_HEADER_BYTES or count > MAX_HEADERS:
            raise _Reject(431, f"headers over {MAX_HEADER_BYTES} bytes or {MAX_HEADERS} lines")
        name, colon, value = header.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise _Reject(400, "malformed header line")
    return parts[0].decode("ascii"), parts[1].decode("ascii")


def _process_metrics() -> Callable[[], str]:
    """The standard process_* metrics (CPU seconds, resident and virtual memory, open and max
    fds, start time) from prometheus_client's ProcessCollector, rendered by the library.

    Imported here, so a daemon without --metrics does not pay for the import."""
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)

    def render() -> str:
        try:
            return generate_latest(registry).decode()
        except Exception as e:  # a scrape must not fail because /proc could not be read
            log.warning("metrics: cannot read the process metrics: %r", e)
            return ""

    return render


def _response(status: int, ctype: str, body: str, *, head_only: bool = False) -> bytes:
    data = body.encode()
    extra = "Allow: GET, HEAD\r\n" if status == 405 else ""
    head = (
        f"HTTP/1.0 {status} {_REASONS.get(status, '')}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(data)}\r\n{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else data)


class HealthServer:
    """Serves one Metrics object. `start()` binds; `close()` stops listening.

    Bounded: at most `max_connections` at once (one more is answered 503 and closed), request
    line and headers within MAX_REQUEST_LINE / MAX_HEADER_BYTES / MAX_HEADERS (else 400 or 431),
    each connection closed after its answer or after `request_timeout` seconds, whichever comes
    first. A malformed request is a 4xx and a DEBUG line, never a traceback."""

    def __init__(
        self, metrics: Metrics, host: str, port: int, *, serve_metrics: bool,
        max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:  # fmt: skip
        self.metrics = metrics
        self.host = host
        self.port = port
        self.serve_metrics = serve_metrics
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.refused = 0
        """Connections answered 503 because max_connections were open (for tests and logs)."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusals: set[asyncio.Task[None]] = set()
        self._process: Callable[[], str] | None = _process_metrics() if serve_metrics else None

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0 in tests)."""
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=MAX_REQUEST_LINE
        )
        bound: int = self._server.sockets[0].getsockname()[1]
        log.info("health server on http://%s:%d (/healthz, /readyz%s)", self.host, bound,
                 ", /metrics" if self.serve_metrics else "")  # fmt: skip
        return bound

    async def close(self) -> None:
        """Stop listening and end the connections still open."""
        if self._server is not None:
            self._server.close()
            tasks = self._tasks | self._refusals
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await asyncio.gather(*tasks, return_exceptions=True)
                    await self._server.wait_closed()
            self._server = None

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._tasks)

    def respond(self, method: str, path: str) -> tuple[int, str, str]:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", "only GET\n"
        if path == "/healthz":
            return 200, "text/plain", "ok\n"
        if path == "/readyz":
            ready, reason = self.metrics.readiness()
            if ready:
                return 200, "text/plain", "ready\n"
            return 503, "text/plain", f"not ready: {reason}\n"
        if path == "/status":
            body = json.dumps(self.metrics.status(), default=str, sort_keys=True)
            return 200, "application/json", body + "\n"
        if path == "/metrics" and self._process is not None:
            text = self.metrics.render() + self._process()
            return 200, "text/plain; version=0.0.4; charset=utf-8", text
        return 404, "text/plain", "not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        try:
            if task is None or len(self._tasks) >= self.max_connections:
                self.refused += 1
                log.debug("health server: %d connections open, refusing one more",
                          len(self._tasks))  # fmt: skip
                writer.write(_response(503, "text/plain", "too many connections\n"))
                # Lingering (so the client reads the 503 rather than a reset) is bounded too:
                # past max_connections refusals at once, the extra ones are just closed.
                if task is not None and len(self._refusals) < self.max_connections:
                    self._refusals.add(task)
                    await self._linger(reader, writer)
                return
            self._tasks.add(task)
            await self._serve(reader, writer)
        except Exception as e:  # a bug here must not kill the server or print a traceback
            log.warning("health server: request failed: %r", e)
        finally:
            if task is not None:
                self._tasks.discard(task)
                self._refusals.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.request_timeout):
                try:
                    request = await _read_request(reader)
                except _Reject as e:
                    log.debug("health server: %d for a request: %s", e.status, e)
                    writer.write(_response(e.status, "text/plain", f"{e}\n"))
                else:
                    if request is None:
                        return
                    method, target = request
                    status, ctype, body = self.respond(method, target)
                    writer.write(_response(status, ctype, body, head_only=method == "HEAD"))
                await writer.drain()
        except (TimeoutError, ConnectionError):
            return
        # The client may have sent more than we read (a body, the rest of an oversized line).
        await self._linger(reader, writer)

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then drop what the client still sends (bounded), so it gets the answer."""
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(LINGER_SECONDS):
                dropped = 0
                while dropped < LINGER_BYTES:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    dropped += len(chunk)
