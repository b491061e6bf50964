"""The health server over real TCP on loopback: /healthz, /readyz, /metrics; and sd_notify."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from overlay.health import MAX_HEADER_BYTES, MAX_HEADERS, MAX_REQUEST_LINE, HealthServer, Metrics
from overlay.sdnotify import sd_notify
from tests.labtools import eventually


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(5):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_healthz_readyz_and_metrics() -> None:
    metrics = Metrics()
    server = HealthServer(metrics, "127.0.0.1", 0, serve_metrics=True)
    port = await server.start()
    try:
        assert await http_get(port, "/healthz") == (200, "ok\n")
        status, body = await http_get(port, "/readyz")
        assert status == 503 and "not ready" in body

        metrics.ready = True
        metrics.lease_subnet = "10.7.3.0/24"
        metrics.lease_public_ip = "192.0.2.9"
        metrics.lease_backend = "vxlan"
        metrics.lease_expiration = 1700000000.0
        metrics.peers = 4
        metrics.observe_reconcile("change", 0.25, ok=True)
        metrics.observe_reconcile("full", 0.5, ok=False)
        metrics.etcd_errors = 2
        metrics.events["peer_added"] += 3
        assert (await http_get(port, "/readyz"))[0] == 200

        status, text = await http_get(port, "/metrics")
        assert status == 200
        lines = set(text.splitlines())
        assert (
            'overlay_lease_info{backend="vxlan",public_ip="192.0.2.9",subnet="10.7.3.0/24"} 1'
            in lines
        )
        assert "overlay_peers 4" in lines
        assert 'overlay_reconciles_total{trigger="change"} 1' in lines
        assert 'overlay_reconciles_total{trigger="full"} 1' in lines
        assert "overlay_reconcile_errors_total 1" in lines
        assert "overlay_reconcile_duration_seconds_sum 0.75" in lines
        assert "overlay_reconcile_duration_seconds_count 2" in lines
        assert "overlay_lease_expiration_seconds 1700000000" in lines
        assert "overlay_etcd_errors_total 2" in lines
        assert 'overlay_events_total{type="peer_added"} 3' in lines
        assert "overlay_ready 1" in lines
        assert "# TYPE overlay_peers gauge" in lines

        assert (await http_get(port, "/nope"))[0] == 404
        assert (await http_get(port, "/healthz", method="POST"))[0] == 405
    finally:
        await server.close()


async def test_metrics_off_is_404_and_garbage_request_is_survived() -> None:
    server = HealthServer(Metrics(), "127.0.0.1", 0, serve_metrics=False)
    port = await server.start()
    try:
        assert (await http_get(port, "/metrics"))[0] == 404
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert data.startswith(b"HTTP/1.0 400")
        assert (await http_get(port, "/healthz"))[0] == 200
    finally:
        await server.close()


def test_sd_notify_sends_to_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        assert sd_notify("READY=1", environ={"NOTIFY_SOCKET": str(path)}) is True
        assert sock.recv(100) == b"READY=1"
    assert sd_notify("READY=1", environ={}) is False
    # A socket that went away is logged, not raised.
    assert sd_notify("READY=1", environ={"NOTIFY_SOCKET": str(path)}) is False


async def test_backend_counters_are_published_at_every_scrape() -> None:
    # The counters come from a plain function standing in for UdpBackend.counters (the real
    # backend's counters on a real daemon's /metrics: tests/test_integration_udp.py).
    values = {"tx_packets": 5, "dropped_unknown_source": 0, "bad-name": 1}
    metrics = Metrics()
    server = HealthServer(metrics, "127.0.0.1", 0, serve_metrics=True)
    port = await server.start()
    try:
        _, text = await http_get(port, "/metrics")
        assert "overlay_udp_" not in text  # no backend counters published yet
        metrics.publish_backend_counters("udp", lambda: values)
        _, text = await http_get(port, "/metrics")
        lines = text.splitlines()
        assert "# TYPE overlay_udp_tx_packets counter" in lines
        assert "overlay_udp_tx_packets 5" in lines
        assert "overlay_udp_dropped_unknown_source 0" in lines
        assert not any("bad-name" in line for line in lines)  # not a metric name: skipped
        values["tx_packets"] = 2**40 + 1  # read at every scrape, printed exactly
        _, text = await http_get(port, "/metrics")
        assert f"overlay_udp_tx_packets {2**40 + 1}" in text.splitlines()

        def broken() -> dict[str, int]:
            raise RuntimeError("stats block gone")

        metrics.publish_backend_counters("udp", broken)
        status, text = await http_get(port, "/metrics")
        assert status == 200 and "overlay_up 1" in text and "overlay_udp_" not in text
    finally:
        await server.close()


# --------------------------------------------------------------------------- bounds and limits


class Records(logging.Handler):
    """Every log record at WARNING or above, from any logger (the server's, asyncio's), emitted
    in the server's thread. Records from other threads are not the server's: e.g. asyncio's
    "Future exception was never retrieved" for a future an earlier test left to the garbage
    collector, logged whenever a collection happens to run."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.thread: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append(record)


@contextlib.contextmanager
def threaded_server(**kwargs: Any) -> Iterator[tuple[HealthServer, int, Records]]:
    """A HealthServer on 127.0.0.1 in its own thread and event loop, for blocking clients
    (hypothesis drives synchronous tests); stopped and joined at the end, also on failure."""
    metrics = Metrics(ready=True, lease_subnet="10.7.3.0/24", peers=2)
    server = HealthServer(metrics, "127.0.0.1", 0, serve_metrics=True, **kwargs)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="health-server", daemon=True)
    records = Records()
    gc.collect()  # what earlier tests left behind is collected (and logged) now, not during ours
    logging.getLogger().addHandler(records)
    thread.start()
    records.thread = thread.ident
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield server, port, records
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        logging.getLogger().removeHandler(records)


def exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    """Send `data`, half-close, read until the server closes; b"" when it answered nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


STATUS_LINE = re.compile(rb"HTTP/1\.0 ([1-5][0-9][0-9]) [A-Za-z ]*")


def parse_response(data: bytes, *, head: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one well-formed HTTP/1.0 answer (asserts that it is one)."""
    head_part, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no end of headers in {data[:200]!r}"
    status_line, *header_lines = head_part.split(b"\r\n")
    match = STATUS_LINE.fullmatch(status_line)
    assert match, f"bad status line {status_line!r}"
    headers = {}
    for line in header_lines:
        name, colon, value = line.decode("ascii").partition(":")
        assert colon and name and name == name.strip(), f"bad header line {line!r}"
        headers[name.lower()] = value.strip()
    assert headers["connection"] == "close"
    if not head:
        assert int(headers["content-length"]) == len(body), "Content-Length is not the body's"
    return int(match.group(1)), headers, body


def healthz(port: int) -> int:
    return parse_response(exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))[0]


def assert_quiet(records: Records) -> None:
    assert not records.records, [(r.name, r.levelname, r.getMessage()) for r in records.records]


def test_a_100k_request_line_is_400_and_headers_over_the_limit_431() -> None:
    with threaded_server() as (_, port, records):
        line = b"GET /" + b"a" * 100 * 1024 + b" HTTP/1.1\r\n\r\n"
        status, _, body = parse_response(exchange(port, line))
        assert status == 400 and b"request line longer than 8192 bytes" in body

        huge = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n"
        assert parse_response(exchange(port, huge))[0] == 431
        many = b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(65))
        assert parse_response(exchange(port, many + b"\r\n"))[0] == 431
        # 3 headers of 7 KiB: each line is within 8 KiB, together they are over 16 KiB.
        wide = b"".join(b"X-%d: " % i + b"w" * 7000 + b"\r\n" for i in range(3))
        assert (
            parse_response(exchange(port, b"GET /healthz HTTP/1.1\r\n" + wide + b"\r\n"))[0] == 431
        )
        # Just under the limits is served.
        fits = b"GET /healthz HTTP/1.1\r\n" + b"X-A: " + b"a" * 8000 + b"\r\n\r\n"
        assert parse_response(exchange(port, fits))[0] == 200
        assert healthz(port) == 200
    assert_quiet(records)


def test_head_and_method_not_allowed() -> None:
    with threaded_server() as (_, port, records):
        status, headers, body = parse_response(
            exchange(port, b"HEAD /healthz HTTP/1.0\r\n\r\n"), head=True
        )
        assert (status, headers["content-length"], body) == (200, "3", b"")
        status, headers, _ = parse_response(exchange(port, b"DELETE /healthz HTTP/1.1\r\n\r\n"))
        assert (status, headers["allow"]) == (405, "GET, HEAD")
    assert_quiet(records)


def test_garbage_beyond_every_limit_is_cut_off_and_the_server_carries_on() -> None:
    # 8 MiB without a newline, sent without waiting: more than the server reads before it
    # answers 400 and closes (LINGER_BYTES). The client sees the 400 or, when its data was
    # still arriving, a reset: both are fine, a hang or a dead server are not.
    with threaded_server() as (_, port, records):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            answer = b""
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(b"G" * 8 * 2**20)
            with contextlib.suppress(ConnectionResetError):
                answer = sock.recv(65536)
            assert answer == b"" or answer.startswith(b"HTTP/1.0 400 ")
        assert healthz(port) == 200
    assert_quiet(records)


def test_connection_limit_refuses_the_extra_connection_until_a_slot_frees() -> None:
    limit = 3
    with threaded_server(max_connections=limit, request_timeout=60) as (server, port, records):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(limit)]
        try:
            wait_until(lambda: server.connections == limit, "the idle connections held")
            # One more: answered 503 and closed at once, not queued behind the idle ones.
            status, _, body = parse_response(exchange(port, b"", half_close=False))
            assert (status, body) == (503, b"too many connections\n")
            assert server.refused == 1
            # Fresh /healthz is refused too while every slot is held...
            assert healthz(port) == 503
            # ...and served once one idle client goes away.
            idle.pop().close()
            wait_until(lambda: server.connections == limit - 1, "one slot freed")
            assert healthz(port) == 200
        finally:
            for sock in idle:
                sock.close()
    assert_quiet(records)


def test_idle_connections_are_closed_after_the_request_timeout() -> None:
    with threaded_server(request_timeout=0.3) as (server, port, records):
        silent = socket.create_connection(("127.0.0.1", port), timeout=30)
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        with silent, slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the end of the headers
            # Both closed by the server, without an answer.
            assert silent.recv(100) == b"" and slow.recv(100) == b""
        wait_until(lambda: server.connections == 0, "the slots freed")
        assert healthz(port) == 200
    assert_quiet(records)


async def test_close_ends_open_connections() -> None:
    server = HealthServer(Metrics(), "127.0.0.1", 0, serve_metrics=False, request_timeout=60)
    port = await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def accepted() -> bool:
            return server.connections == 1

        await eventually(accepted, "the connection accepted")
        await server.close()
        assert server.connections == 0
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()


def wait_until(check: Callable[[], bool], what: str, seconds: float = 10) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, f"not within {seconds}s: {what}"
        time.sleep(0.01)


# --------------------------------------------------------------------------- hostile requests

METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "get", "BREW"])
PATHS = st.sampled_from(["/healthz", "/readyz", "/metrics", "/status", "/", "/nope", "/healthz?x=1",
                         "/metrics/", "/%00", "/" + "p" * 9000])  # fmt: skip
VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/1.9",
                           "HTTP/2.0", "http/1.1", ""])  # fmt: skip
HEADER_NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True)
HEADER_VALUES = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    st.builds(lambda c, n: c * n, st.sampled_from(["v", "\t", "é"]), st.integers(0, 20000)),
)


@st.composite
def structured_requests(draw: st.DrawFn) -> tuple[bytes, int]:
    """A request built from valid and invalid parts, with the status it must get."""
    method, path, version = draw(METHODS), draw(PATHS), draw(VERSIONS)
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=MAX_HEADERS + 6))
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    line = f"{method} {path} {version}".encode()
    fields = [f"{n}: {v}".encode() for n, v in headers]
    data = b"".join(x + eol.encode() for x in [line, *fields, b""])

    def too_long(x: bytes) -> bool:  # the line as the server reads it: with its CR, if any
        return len(x) + (eol == "\r\n") > MAX_REQUEST_LINE

    if too_long(line) or not re.fullmatch(r"HTTP/1\.[0-9]", version):
        return data, 400
    # Header lines are checked in order: the first one too long, or past either total, is 431.
    total = 0
    for count, field in enumerate(fields, 1):
        total += len(field) + 2
        if too_long(field) or total > MAX_HEADER_BYTES or count > MAX_HEADERS:
            return data, 431
    if method not in ("GET", "HEAD"):
        return data, 405
    served = ("/healthz", "/readyz", "/metrics", "/status")
    return data, 200 if path.split("?")[0] in served else 404


ANY_BYTES = st.one_of(
    st.binary(max_size=600),
    st.builds(lambda chunk, n: chunk * n, st.binary(min_size=1, max_size=64), st.integers(1, 2000)),
    st.builds(lambda a, b: a + b"\r\n\r\n" + b, st.binary(max_size=200), st.binary(max_size=200)),
)


def test_any_request_bytes_get_a_well_formed_answer_or_a_close() -> None:
    """Arbitrary bytes (any length up to ~128 KiB, any encoding, no CRLF, huge headers) and
    requests built from valid and invalid parts: every one gets a well-formed HTTP/1.0 answer
    with a 2xx or 4xx status, or (only for no bytes at all) a close without an answer. No
    WARNING or ERROR is logged, and /healthz is answered after each one."""
    with threaded_server() as (server, port, records):

        @given(st.one_of(ANY_BYTES.map(lambda b: (b, None)), structured_requests()))
        def check(case: tuple[bytes, int | None]) -> None:
            data, expected = case
            answer = exchange(port, data)
            if not data:
                assert answer == b""
            else:
                status, _, body = parse_response(answer, head=data.startswith(b"HEAD "))
                assert 200 <= status < 300 or 400 <= status < 500, status
                if expected is not None:
                    assert status == expected, (status, expected, body[:100])
            assert healthz(port) == 200
            assert_quiet(records)

        check()
        wait_until(lambda: server.connections == 0, "every connection ended")


# --------------------------------------------------------------------------- the exposition

TYPES = {
    "overlay_up": "gauge",
    "overlay_asyncio_tasks": "gauge",
    "overlay_ready": "gauge",
    "overlay_start_time_seconds": "gauge",
    "overlay_lease_info": "gauge",
    "overlay_lease_expiration_seconds": "gauge",
    "overlay_lease_acquisitions_total": "counter",
    "overlay_peers": "gauge",
    "overlay_reconciles_total": "counter",
    "overlay_reconcile_errors_total": "counter",
    "overlay_reconcile_duration_seconds": "summary",
    "overlay_etcd_errors_total": "counter",
    "overlay_etcd_up": "gauge",
    "overlay_etcd_last_success_timestamp_seconds": "gauge",
    "overlay_etcd_seconds_since_success": "gauge",
    "overlay_watch_lag_revisions": "gauge",
    "overlay_lease_expiry_seconds": "gauge",
    "overlay_events_total": "counter",
    "overlay_events_dropped_total": "counter",
    "overlay_masq_resyncs_total": "counter",
    "overlay_masq_repairs_total": "counter",
    "overlay_leases_ignored_total": "counter",
    "overlay_leases_ignored": "gauge",
    # prometheus_client's ProcessCollector, for this process
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "process_start_time_seconds": "gauge",
}


def promtool(text: str) -> tuple[int, list[str]]:
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    return proc.returncode, (proc.stdout + proc.stderr).splitlines()


def scrape(port: int) -> str:
    status, _, body = parse_response(exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
    assert status == 200
    return body.decode()


def test_live_metrics_page_keeps_every_metric_and_passes_promtool() -> None:
    with threaded_server() as (server, port, records):
        m = server.metrics
        m.lease_public_ip, m.lease_backend, m.lease_expiration = "192.0.2.9", "vxlan", 1.7e9
        m.lease_acquisitions, m.etcd_errors, m.events_dropped = 1, 2, 1
        m.masq_resyncs, m.masq_repairs = 4, 1
        m.etcd_up, m.etcd_last_success, m.watch_lag = False, 1.7e9, 3
        m.observe_reconcile("full", 0.125, ok=True)
        m.events["peer_added"] += 2
        m.leases_ignored["not_json"] += 2
        m.leases_ignored['odd "reason"\\\n'] += 1  # label values are escaped
        m.leases_ignored_now = lambda: {"outside_network": 3}
        text = scrape(port)
        types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
        assert types == TYPES
        lines = text.splitlines()
        assert 'overlay_leases_ignored_total{reason="not_json"} 2' in lines
        assert 'overlay_leases_ignored{reason="outside_network"} 3' in lines
        assert 'overlay_leases_ignored_total{reason="odd \\"reason\\"\\\\\\n"} 1' in lines
        assert 'overlay_reconciles_total{trigger="change"} 0' in lines
        assert "overlay_masq_repairs_total 1" in lines
        assert "overlay_etcd_up 0" in lines and "overlay_watch_lag_revisions 3" in lines
        assert "overlay_etcd_last_success_timestamp_seconds 1700000000" in lines
        values = {
            line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("process_")
        }
        status_text = Path("/proc/self/status").read_text()  # the server runs in this process
        rss = int(status_text.split("VmRSS:")[1].split()[0]) * 1024
        assert rss / 2 < values["process_resident_memory_bytes"] < rss * 2
        assert values["process_open_fds"] >= 3 and values["process_max_fds"] > 0
        assert promtool(text) == (0, [])

        # The udp backend's counters keep the names they have always had, without "_total":
        # promtool's lint names exactly those, and nothing else (docs/daemon.md).
        m.publish_backend_counters("udp", lambda: {"tx_packets": 5, "rx_bytes": 7})
        rc, out = promtool(scrape(port))
        assert rc != 0 and sorted(out) == [
            f'{name} counter metrics should have "_total" suffix'
            for name in ("overlay_udp_rx_bytes", "overlay_udp_tx_packets")
        ]
    assert_quiet(records)


async def test_readyz_says_why_in_one_line_and_status_serves_it_as_json() -> None:
    """What the daemon records as the reason is what /readyz and /status say; the refresh
    hook runs before each answer, and a failing hook is logged, never a failed request."""
    metrics = Metrics()
    calls: list[int] = []
    metrics.refresh = lambda: calls.append(1)
    server = HealthServer(metrics, "127.0.0.1", 0, serve_metrics=True)
    port = await server.start()
    try:
        status, body = await http_get(port, "/readyz")
        assert status == 503 and body.startswith("not ready: starting")
        metrics.ready = False
        metrics.not_ready_reason = "lease 10.1.5.0/24 lost to 198.18.0.7\n(PublicIP x)"
        metrics.lease_subnet, metrics.lease_expiration = "10.1.5.0/24", time.time() - 30
        metrics.etcd_up, metrics.etcd_errors = False, 7
        status, body = await http_get(port, "/readyz")
        assert (status, body) == (
            503,
            "not ready: lease 10.1.5.0/24 lost to 198.18.0.7 (PublicIP x)\n",
        )
        status, body = await http_get(port, "/status")
        doc = json.loads(body)
        assert status == 200 and doc["ready"] is False
        assert doc["reason"] == "lease 10.1.5.0/24 lost to 198.18.0.7 (PublicIP x)"
        assert doc["lease"]["subnet"] == "10.1.5.0/24" and doc["lease"]["expiry_seconds"] < -29
        assert doc["etcd"] == {"up": False, "last_success": None, "errors": 7,
                               "watch_lag_revisions": None}  # fmt: skip
        status, text = await http_get(port, "/metrics")
        expiry = [x for x in text.splitlines() if x.startswith("overlay_lease_expiry_seconds ")]
        assert len(expiry) == 1 and float(expiry[0].split()[1]) < -29
        assert len(calls) == 4  # two /readyz, one /status, one /metrics
        metrics.ready, metrics.not_ready_reason = True, ""
        assert await http_get(port, "/readyz") == (200, "ready\n")
        assert json.loads((await http_get(port, "/status"))[1])["reason"] == ""

        def broken() -> None:
            raise RuntimeError("bug")

        metrics.refresh = broken
        assert (await http_get(port, "/metrics"))[0] == 200
        assert (await http_get(port, "/status"))[0] == 200
    finally:
        await server.close()
