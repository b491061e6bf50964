"""The health server over real TCP on loopback: /healthz, /readyz, /metrics; and sd_notify."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from overlay.health import HealthServer, Metrics
from overlay.sdnotify import sd_notify


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
