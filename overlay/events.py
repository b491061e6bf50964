"""Events over MQTT: JSON messages on `<prefix>/<public-ip>/events`.

Kinds: lease_acquired, lease_renewed, lease_lost (with `reason`), lease_taken (our subnet now
held by another host: `subnet`, `holder` PublicIP), lease_expiring (a renewal failed),
lease_reacquired, duplicate_public_ip (a host with our PublicIP rewrote our lease), etcd_down
(with `reason`) / etcd_up, peer_added, peer_removed, ready. Each message is a JSON object
`{"event": KIND, "host": PUBLIC_IP, "time": UNIX_TIME, ...details}`, published with QoS 1.

The broker is optional and must never stall or kill the daemon: `publish()` only appends to a
bounded queue (the oldest event is dropped when it is full, and counted), and `run()` connects,
drains the queue, and on any broker error logs, waits with the project's back-off
(subnetmgr.backoff: 0.5 s doubling up to 30 s, with jitter) and reconnects. An event leaves
the queue only once the broker acknowledged it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections import deque
from typing import Any

from overlay.health import Metrics
from subnetmgr.backoff import Backoff

log = logging.getLogger(__name__)

EVENT_KINDS = (
    "lease_acquired",
    "lease_renewed",
    "lease_lost",
    "lease_taken",
    "lease_expiring",
    "lease_reacquired",
    "duplicate_public_ip",
    "etcd_down",
    "etcd_up",
    "peer_added",
    "peer_removed",
    "ready",
)


def raise_if_cancelling(cause: BaseException | None = None) -> None:
    """Raise CancelledError when the current task is being cancelled (after a library turned
    the cancellation into an error of its own, which must not be retried)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from cause


def events_topic(prefix: str, public_ip: object) -> str:
    return f"{prefix}/{public_ip}/events"


class EventPublisher:
    def __init__(
        self,
        broker: tuple[str, int] | None,
        topic_prefix: str,
        public_ip: object,
        metrics: Metrics,
        *,
        max_queue: int = 1000,
        timeout: float = 5.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.broker = broker
        self.topic = events_topic(topic_prefix, public_ip)
        self.host = str(public_ip)
        self.metrics = metrics
        self.timeout = timeout
        self.max_backoff = max_backoff
        self._queue: deque[tuple[int, bytes]] = deque(maxlen=max_queue)
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self.connected = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    def publish(self, kind: str, **details: Any) -> None:
        """Queue an event; never blocks, never raises for a broker problem."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}; one of {', '.join(EVENT_KINDS)}")
        self.metrics.events[kind] += 1
        if self.broker is None:
            return
        doc = {"event": kind, "host": self.host, "time": round(time.time(), 3), **details}
        payload = json.dumps(doc, separators=(",", ":"), default=str).encode()
        if self._queue.maxlen is not None and len(self._queue) == self._queue.maxlen:
            self.metrics.events_dropped += 1
            log.debug("MQTT queue full: dropping the oldest event")
        self._queue.append((next(self._seq), payload))
        self._wakeup.set()

    async def run(self) -> None:
        """Deliver queued events until cancelled; returns at once when no broker is set."""
        if self.broker is None:
            return
        import aiomqtt  # only when events are on

        host, port = self.broker
        backoff = Backoff(0.5, self.max_backoff)
        identifier = f"overlayd-{self.host}-{os.getpid()}"
        while True:
            raise_if_cancelling()
            try:
                async with aiomqtt.Client(
                    host, port, identifier=identifier, timeout=self.timeout, keepalive=30
                ) as client:
                    self.connected = True
                    log.info("connected to MQTT broker %s:%d, events on %s", host, port,
                             self.topic)  # fmt: skip
                    backoff.reset()
                    await self._drain(client)
            except aiomqtt.MqttError as e:
                # aiomqtt's __aexit__ may turn our cancellation into an MqttError (a failed
                # disconnect): never let that swallow a cancel, or shutdown hangs.
                raise_if_cancelling(e)
                self.connected = False
                wait = backoff.next()
                failures = backoff.failures
                level = logging.WARNING if failures == 1 or failures % 20 == 0 else logging.DEBUG
                log.log(level, "MQTT broker %s:%d unavailable (%s); %d events queued; "
                        "retrying in %.1fs", host, port, e, len(self._queue), wait)  # fmt: skip
                await asyncio.sleep(wait)
            finally:
                self.connected = False

    async def _drain(self, client: Any) -> None:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            seq, payload = self._queue[0]
            await client.publish(self.topic, payload, qos=1, timeout=self.timeout)
            if self._queue and self._queue[0][0] == seq:
                self._queue.popleft()
