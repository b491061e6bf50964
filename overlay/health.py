"""The health server: /healthz, /readyz and /metrics (Prometheus text format 0.0.4).

A tiny HTTP/1.0 server on asyncio streams, standard library only. `/healthz` is 200 while the
daemon runs; `/readyz` is 200 only once subnet.env and the data path are in place (503 before);
`/metrics` is served when metrics are on (404 otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
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
    started: float = field(default_factory=time.time)
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

    def render(self) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{labels} {_number(value)}")

        metric("overlay_up", "gauge", "1 while overlayd runs.", [("", 1)])
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
        metric("overlay_etcd_errors_total", "counter", "etcd requests that failed.",
               [("", self.etcd_errors)])  # fmt: skip
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


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable",
            400: "Bad Request"}  # fmt: skip


class HealthServer:
    """Serves one Metrics object. `start()` binds; `close()` stops listening."""

    def __init__(self, metrics: Metrics, host: str, port: int, *, serve_metrics: bool) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.serve_metrics = serve_metrics
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0 in tests)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        bound: int = self._server.sockets[0].getsockname()[1]
        log.info("health server on http://%s:%d (/healthz, /readyz%s)", self.host, bound,
                 ", /metrics" if self.serve_metrics else "")  # fmt: skip
        return bound

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    def respond(self, method: str, path: str) -> tuple[int, str, str]:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", "only GET\n"
        if path == "/healthz":
            return 200, "text/plain", "ok\n"
        if path == "/readyz":
            if self.metrics.ready:
                return 200, "text/plain", "ready\n"
            return 503, "text/plain", "not ready: lease, data path or subnet.env not in place\n"
        if path == "/metrics" and self.serve_metrics:
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render()
        return 404, "text/plain", "not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await reader.readline()
                while (await reader.readline()).strip():  # skip headers
                    pass
                parts = request.decode("latin-1").split()
                if len(parts) < 2:
                    status, ctype, body = 400, "text/plain", "bad request\n"
                    method = "GET"
                else:
                    method = parts[0]
                    status, ctype, body = self.respond(method, parts[1])
                data = body.encode()
                head = (
                    f"HTTP/1.0 {status} {_REASONS.get(status, '')}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                    "Connection: close\r\n\r\n"
                )
                writer.write(head.encode() + (b"" if method == "HEAD" else data))
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
