"""MQTT events through a real mosquitto on loopback: delivery, format, broker outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from integration.etcdserver import free_port
from overlay.events import EventPublisher
from overlay.health import Metrics


@dataclass
class Broker:
    """A real mosquitto on 127.0.0.1 with persistent sessions kept in a temp dir."""

    directory: Path
    port: int
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.directory / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.directory}/\n"
            "log_dest none\n"
            "user root\n"  # stay root: the session store lives in a root-only temp dir
        )
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():  # fail, never skip: CI installs it (scripts/bootstrap.sh)
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto")
        log = open(self.directory / "mosquitto.log", "ab")  # handed to the child
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError((self.directory / "mosquitto.log").read_text())
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((self.host, self.port), timeout=0.2),
                ):
                    return
                time.sleep(0.05)
            raise TimeoutError("mosquitto did not start")
        except BaseException:  # not started: stop it here, a caller's finally may not run
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # SIGTERM: mosquitto saves its sessions
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path, free_port())
    try:
        b.start()
        yield b
    finally:
        b.stop()


@contextlib.asynccontextmanager
async def subscriber(
    port: int, topic: str, ident: str, host: str = "127.0.0.1"
) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        host, port, identifier=ident, clean_session=False, timeout=5
    ) as client:
        await client.subscribe(topic, qos=1)
        yield client


def _not_json(name: str) -> None:
    raise AssertionError(f"an event carries {name}, which is not JSON")


async def receive(client: aiomqtt.Client, count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(15):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            # Strict JSON, as any consumer parses it: Infinity or NaN would be a defect.
            out.append(json.loads(message.payload, parse_constant=_not_json))
            if len(out) == count:
                break
    return out


async def drained(publisher: EventPublisher, seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while True:
            if not publisher.queued:
                return
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(publisher: EventPublisher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(publisher.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_events_arrive_as_json_on_the_host_topic(broker: Broker, unique: str) -> None:
    metrics = Metrics()
    publisher = EventPublisher(("127.0.0.1", broker.port), f"t{unique}", "192.0.2.5", metrics)
    assert publisher.topic == f"t{unique}/192.0.2.5/events"
    async with subscriber(broker.port, publisher.topic, f"sub-{unique}") as sub:
        async with running(publisher):
            publisher.publish("lease_acquired", subnet="10.9.4.0/24", public_ip="192.0.2.5")
            publisher.publish("peer_added", subnet="10.9.7.0/24", public_ip="192.0.2.6")
            publisher.publish("ready")
            got = await receive(sub, 3)
    assert [m["event"] for m in got] == ["lease_acquired", "peer_added", "ready"]
    assert got[0]["subnet"] == "10.9.4.0/24"
    assert got[1]["public_ip"] == "192.0.2.6"
    assert all(m["host"] == "192.0.2.5" and isinstance(m["time"], float) for m in got)
    assert metrics.events["peer_added"] == 1


async def test_broker_outage_queues_bounded_and_reconnects(broker: Broker, unique: str) -> None:
    metrics = Metrics()
    publisher = EventPublisher(
        ("127.0.0.1", broker.port), f"t{unique}", "192.0.2.8", metrics,
        max_queue=3, max_backoff=0.5, timeout=1.0,
    )  # fmt: skip
    ident = f"sub-{unique}"
    async with subscriber(broker.port, publisher.topic, ident):
        pass  # a persistent session: the broker keeps QoS 1 messages for us while we are away
    async with running(publisher) as task:
        publisher.publish("ready")
        await drained(publisher, 10)
        broker.stop()
        # The broker is down: publishing neither blocks nor raises, the queue stays bounded.
        for n in range(5):
            publisher.publish("peer_removed", subnet=f"10.9.{n}.0/24")
        assert publisher.queued == 3
        assert metrics.events_dropped == 2
        await asyncio.sleep(0.3)  # the publisher keeps retrying meanwhile
        assert not task.done()
        broker.start()
        await drained(publisher, 15)
    async with subscriber(broker.port, publisher.topic, ident) as sub:
        got = await receive(sub, 4)
    assert got[0]["event"] == "ready"
    # The oldest two of the outage were dropped; the newest three arrive in order.
    assert [m["subnet"] for m in got[1:]] == ["10.9.2.0/24", "10.9.3.0/24", "10.9.4.0/24"]


async def test_no_broker_configured_is_a_no_op() -> None:
    metrics = Metrics()
    publisher = EventPublisher(None, "overlay", "192.0.2.1", metrics)
    publisher.publish("ready")
    await asyncio.wait_for(publisher.run(), 1)  # returns at once
    assert publisher.queued == 0 and metrics.events["ready"] == 1


def test_unknown_event_kind_is_refused() -> None:
    publisher = EventPublisher(None, "overlay", "192.0.2.1", Metrics())
    with pytest.raises(ValueError, match="'bogus'"):
        publisher.publish("bogus")
