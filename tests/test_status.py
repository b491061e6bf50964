"""overlay/status.py without a lab: the parsers of what the health server says (properties),
and `read_daemon` against the real health server and against hostile servers on loopback."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.health import HealthServer, Metrics
from overlay.status import (
    MAX_ANSWER,
    AnswerError,
    metric,
    parse_http_answer,
    parse_metrics,
    parse_status_doc,
    read_daemon,
    render_status,
)

LOOPBACK = IPv4Address("127.0.0.1")


# --------------------------------------------------------------------------- parsers


@given(st.binary(max_size=300))
def test_any_bytes_are_an_answer_or_an_answer_error(data: bytes) -> None:
    try:
        code, body = parse_http_answer(data)
    except AnswerError:
        return
    assert 100 <= code <= 999 and isinstance(body, str)
    assert data.startswith((b"HTTP/1.0 ", b"HTTP/1.1 "))


@given(
    st.sampled_from(["HTTP/1.0", "HTTP/1.1"]),
    st.integers(100, 599),
    st.lists(st.from_regex(r"[A-Za-z-]{1,10}: [ -~]{0,20}", fullmatch=True), max_size=4),
    st.text(max_size=200),
)
def test_answer_round_trip(version: str, code: int, headers: list[str], body: str) -> None:
    head = "\r\n".join([f"{version} {code} Whatever", *headers])
    assert parse_http_answer(f"{head}\r\n\r\n{body}".encode()) == (code, body)


def test_answer_limits() -> None:
    with pytest.raises(AnswerError, match="larger than"):
        parse_http_answer(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * MAX_ANSWER)
    with pytest.raises(AnswerError, match="not UTF-8"):
        parse_http_answer(b"HTTP/1.0 200 OK\r\n\r\n\xff")
    with pytest.raises(AnswerError, match="not an HTTP status line"):
        parse_http_answer(b"SSH-2.0-OpenSSH\r\n\r\n")


@given(st.text(max_size=400))
def test_any_text_is_metrics_or_an_answer_error(text: str) -> None:
    try:
        samples = parse_metrics(text)
    except AnswerError:
        return
    for name, values in samples.items():
        assert isinstance(name, str)
        for labels, value in values:
            assert isinstance(labels, dict) and isinstance(value, float)


@given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.dictionaries(
        st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.integers(1, 1000), max_size=4
    ),
    st.booleans(),
)
def test_metrics_round_trip_through_the_daemons_renderer(
    peers: int, errors: int, ignored: dict[str, int], ready: bool
) -> None:
    m = Metrics(
        ready=ready,
        peers=peers,
        etcd_errors=errors,
        lease_subnet="10.1.7.0/24",
        lease_public_ip="192.0.2.7",
        lease_backend="vxlan",
    )
    m.leases_ignored_now = lambda: ignored
    samples = parse_metrics(m.render())
    assert metric(samples, "overlay_peers") == peers
    assert metric(samples, "overlay_etcd_errors_total") == errors
    assert metric(samples, "overlay_ready") == (1 if ready else 0)
    assert samples["overlay_lease_info"][0][0] == {
        "subnet": "10.1.7.0/24",
        "public_ip": "192.0.2.7",
        "backend": "vxlan",
    }
    for reason, count in ignored.items():
        assert metric(samples, "overlay_leases_ignored", reason=reason) == count


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
status_like = st.fixed_dictionaries(
    {},
    optional={
        "ready": json_values,
        "reason": json_values,
        "lease": st.fixed_dictionaries(
            {},
            optional={
                "subnet": json_values | st.just("10.1.2.0/24"),
                "public_ip": json_values,
                "backend": json_values,
                "expiry_seconds": json_values,
            },
        ),
        "etcd": st.fixed_dictionaries(
            {},
            optional={
                "up": json_values,
                "last_success": json_values,
                "errors": json_values,
                "watch_lag_revisions": json_values,
            },
        ),
    },
)


@given(status_like | json_values)
def test_status_doc_fields_are_typed_or_none(doc: object) -> None:
    """Whatever JSON /status serves, each field comes out of the type the schema says, or
    None; a document that is not an object is an AnswerError."""
    try:
        text = json.dumps(doc)
    except ValueError:
        return
    try:
        out = parse_status_doc(text)
    except AnswerError:
        assert not isinstance(doc, dict)
        return
    assert isinstance(doc, dict)
    assert out["ready"] is None or isinstance(out["ready"], bool)
    assert out["reason"] is None or (isinstance(out["reason"], str) and len(out["reason"]) <= 200)
    if out["lease"] is not None:
        lease = out["lease"]
        assert lease["subnet"] in (None, "10.1.2.0/24") or "/" in lease["subnet"]
        ttl = lease["ttl_seconds"]
        assert ttl is None or (
            isinstance(ttl, int | float) and not isinstance(ttl, bool) and math.isfinite(ttl)
        )
    if out["etcd"] is not None:
        assert out["etcd"]["up"] is None or isinstance(out["etcd"]["up"], bool)
        errors = out["etcd"]["errors"]
        assert errors is None or (isinstance(errors, int) and not isinstance(errors, bool))


def test_status_doc_of_the_faults_branch_shape() -> None:
    """The /status document the daemon serves (wip/faults' Metrics.status) reads as is."""
    doc = {
        "ready": False,
        "reason": "lease lost: 10.1.3.0/24 taken by 192.0.2.9",
        "lease": {
            "subnet": "10.1.3.0/24",
            "public_ip": "192.0.2.8",
            "backend": "vxlan",
            "expiration": 1.7e9,
            "expiry_seconds": 12.5,
        },
        "etcd": {"up": True, "last_success": 1.7e9, "errors": 3, "watch_lag_revisions": 0},
        "lease_acquisitions": 2,
    }
    out = parse_status_doc(json.dumps(doc))
    assert out == {
        "ready": False,
        "reason": "lease lost: 10.1.3.0/24 taken by 192.0.2.9",
        "lease": {
            "subnet": "10.1.3.0/24",
            "public_ip": "192.0.2.8",
            "backend": "vxlan",
            "ttl_seconds": 12.5,
        },
        "etcd": {"up": True, "last_success": 1.7e9, "errors": 3, "watch_lag_revisions": 0},
    }


def test_status_doc_hostile_values() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(AnswerError, match="not JSON"):
        parse_status_doc(deep)
    out = parse_status_doc(
        json.dumps(
            {
                "ready": 1,
                "reason": "x\x1b[2J" * 100,
                "lease": {
                    "subnet": "10.1.2.3/24",
                    "public_ip": "1.2.3.4.5",
                    "expiry_seconds": True,
                },
            }
        )
    )
    assert out["ready"] is None  # 1 is not a boolean
    assert "\x1b" not in out["reason"] and len(out["reason"]) <= 200
    assert out["lease"]["subnet"] is None  # host bits set: not a subnet
    assert out["lease"]["public_ip"] is None and out["lease"]["ttl_seconds"] is None
    # An IPv6-only host's lease is named by its IPv6 subnet and PublicIPv6.
    lease6 = {"subnet": "fd00:1:0:5::/64", "public_ip": "fd99::5"}
    out = parse_status_doc(json.dumps({"ready": True, "lease": lease6}))
    assert out["lease"]["subnet"] == "fd00:1:0:5::/64" and out["lease"]["public_ip"] == "fd99::5"


# --------------------------------------------------------------------------- read_daemon


async def test_read_daemon_from_the_real_health_server() -> None:
    metrics = Metrics(
        peers=4, lease_subnet="10.1.7.0/24", lease_public_ip="192.0.2.7", lease_backend="vxlan"
    )
    server = HealthServer(metrics, "127.0.0.1", 0, serve_metrics=True)
    port = await server.start()
    try:
        view = await read_daemon(LOOPBACK, port)
        assert view.reachable and view.ready is False and view.error is None
        assert view.reason  # the daemon's one-line reason
        assert metric(view.metrics, "overlay_peers") == 4
        metrics.ready = True
        view = await read_daemon(IPv4Address("0.0.0.0"), port)  # 0.0.0.0: asked on loopback
        assert view.ready is True and view.reason is None
    finally:
        await server.close()


async def test_read_daemon_without_a_health_server() -> None:
    view = await read_daemon(LOOPBACK, 0)
    assert not view.reachable and "--healthz-port 0" in (view.error or "")
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    view = await read_daemon(LOOPBACK, port)  # nothing listens there now
    assert not view.reachable and view.error is not None
    assert view.error.startswith(f"nothing answers at http://127.0.0.1:{port}")


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def hostile(handler: Handler) -> AsyncIterator[int]:
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def answering(data: bytes, *, readyz_only: bool = False) -> Handler:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        line = await r.readline()
        if readyz_only and b"/readyz" in line:
            w.write(b"HTTP/1.0 200 OK\r\n\r\nready\n")
        else:
            w.write(data)
        await w.drain()

    return handler


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP answer"),
        (b"HTTP/1.0 200 OK\r\n\r\n" + b"a" * (MAX_ANSWER + 10), "larger than"),
        (b"HTTP/1.0 302 Found\r\nLocation: /\r\n\r\n", "answered 302"),
        (b"HTTP/1.0 200 OK\r\n\r\n\xff\xfe", "not UTF-8"),
        (b"", "not an HTTP answer"),
    ],
)
async def test_read_daemon_from_hostile_servers(data: bytes, error: str) -> None:
    async with hostile(answering(data)) as port:
        view = await read_daemon(LOOPBACK, port)
    assert view.ready is None and view.error is not None and error in view.error


async def test_read_daemon_bad_status_and_metrics_are_notes_not_crashes() -> None:
    bad = b"HTTP/1.0 200 OK\r\n\r\n{{{ not json nor metrics"
    async with hostile(answering(bad, readyz_only=True)) as port:
        view = await read_daemon(LOOPBACK, port)
    assert view.ready is True and view.error is None
    assert view.status is None and view.metrics is None
    assert any(n.startswith("/status: /status is not JSON") for n in view.notes)
    assert any(n.startswith("/metrics: not Prometheus metrics") for n in view.notes)


async def test_read_daemon_from_a_server_that_never_answers() -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(60)

    async with hostile(silent) as port:
        view = await read_daemon(LOOPBACK, port)
    assert not view.reachable and view.error is not None and "timed out" in view.error


def test_render_status_of_an_unreachable_everything() -> None:
    doc = {
        "schema": 1,
        "healthy": False,
        "ready": None,
        "reason": None,
        "daemon": {
            "endpoint": "http://127.0.0.1:8286",
            "reachable": False,
            "error": "x",
            "status_served": False,
            "metrics_served": False,
            "notes": [],
        },
        "lease": None,
        "subnet_env": {
            "path": "/run/flannel/subnet.env",
            "network": None,
            "subnet": None,
            "mtu": None,
            "error": "/run/flannel/subnet.env does not exist",
        },
        "backend": None,
        "device": None,
        "peers": {
            "leases": None,
            "programmed": None,
            "kernel_routes": None,
            "kernel_fdb": None,
            "missing": [],
        },
        "ignored_leases": [],
        "ignored_by_daemon": None,
        "etcd": {
            "endpoints": "http://127.0.0.1:2379",
            "reachable": False,
            "latency_ms": None,
            "error": "connection refused",
            "daemon_view": None,
        },
        "errors": None,
        "problems": ["x", "etcd: connection refused"],
    }
    text = render_status(doc)
    assert text.splitlines()[0] == "overlayd:    UNKNOWN (daemon not reached)"
    assert "etcd:        UNREACHABLE: connection refused" in text
    assert text.endswith("  - etcd: connection refused")


def test_hostile_metric_values_are_left_out() -> None:
    from overlay.status import ignored_gauge

    samples = parse_metrics(
        'overlay_leases_ignored{reason="\\u001b[31mred"} +Inf\n'
        'overlay_leases_ignored{reason="not_json"} 2\n'
        'overlay_leases_ignored{reason="nan"} NaN\n'
        "overlay_peers NaN\n"
    )
    assert ignored_gauge(samples) == {"not_json": 2}
    assert metric(samples, "overlay_peers") is None
    assert ignored_gauge(parse_metrics('overlay_leases_ignored{reason="\x1b[2J"} 1\n')) == {
        "\\x1b[2J": 1
    }
