"""Events over MQTT: JSON messages on `<prefix>/<public-ip>/events`.

Kinds: lease_acquired, lease_renewed, lease_lost (with `reason`), lease_taken (our subnet now
held by another host: `subnet`, `holder` PublicIP), lease_expiring (a renewal failed),
lease_reacquired, duplicate_public_ip (a host with our PublicIP rewrote our lease), etcd_down
(with `reason`) / etcd_up, peer_added, peer_removed, ready. Each message is a JSON object
`{"event": KIND, "host": PUBLIC_IP, "time": UNIX_TIME, ...details}`, published with QoS 1.

Beside the events, a retained status message on `<prefix>/<public-ip>/status`:
`{"status": "online", "host": ..., "time": ..., "lease": {subnet, public_ip, backend,
expiration} or null}`, published at every connect and whenever the lease changes (taken from
the lease events), and a Last Will registered with the broker at connect, retained too,
`{"status": "offline", "host": ...}`: when the daemon dies without a word (kill -9, a crash,
the host gone) the broker publishes it, so a subscriber sees every host's last state. A clean
stop (SIGTERM) publishes "offline" itself.

The broker may need TLS (mqtts://, --mqtt-cafile, a client certificate) and a user name and
password (overlay.options.MqttSettings).

The broker is optional and must never stall or kill the daemon: `publish()` only appends to a
bounded queue (the oldest event is dropped when it is full, and counted), and `run()` connects,
drains the queue, and on any broker error logs, waits with the project's back-off
(subnetmgr.backoff: 0.5 s doubling up to 30 s, with jitter) and reconnects. An event leaves
the queue only once the broker acknowledged it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections import deque
from typing import Any

from overlay.health import Metrics
from overlay.options import MqttSettings
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


def status_topic(prefix: str, public_ip: object) -> str:
    return f"{prefix}/{public_ip}/status"


STATUS_FROM_EVENTS = {"lease_acquired", "lease_reacquired", "lease_renewed", "ready"}
"""Events whose details are our lease: the retained status message follows them."""
LEASE_GONE = {"lease_lost", "lease_taken"}
"""Events after which we hold no lease (lease_taken: another host's now, where that kind
exists): the status says lease null."""
LEASE_FIELDS = ("subnet", "public_ip", "backend", "expiration")
OFFLINE_TIMEOUT = 1.0
"""Seconds a clean stop waits for the broker to take the "offline" status."""


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), default=str).encode()


class EventPublisher:
    def __init__(
        self,
        broker: MqttSettings | tuple[str, int] | None,
        topic_prefix: str,
        public_ip: object,
        metrics: Metrics,
        *,
        max_queue: int = 1000,
        timeout: float = 5.0,
        max_backoff: float = 30.0,
    ) -> None:
        if isinstance(broker, tuple):  # (host, port): plain TCP, no credentials
            broker = MqttSettings(broker[0], broker[1])
        self.settings = broker
        self.broker = None if broker is None else (broker.host, broker.port)
        self.topic = events_topic(topic_prefix, public_ip)
        self.status_topic = status_topic(topic_prefix, public_ip)
        self.host = str(public_ip)
        self._lease: dict[str, Any] | None = None
        self._status_due = True  # publish the status at the next (first) connect
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
        if kind in STATUS_FROM_EVENTS and "subnet" in details:
            lease = {k: details.get(k) for k in LEASE_FIELDS}
            if lease != self._lease:
                self._lease, self._status_due = lease, True
        elif kind in LEASE_GONE:
            self._lease, self._status_due = None, True
        doc = {"event": kind, "host": self.host, "time": round(time.time(), 3), **details}
        payload = _json(doc)
        if self._queue.maxlen is not None and len(self._queue) == self._queue.maxlen:
            self.metrics.events_dropped += 1
            log.debug("MQTT queue full: dropping the oldest event")
        self._queue.append((next(self._seq), payload))
        self._wakeup.set()

    def status_payload(self, online: bool) -> bytes:
        doc: dict[str, Any] = {"status": "online" if online else "offline", "host": self.host,
                               "time": round(time.time(), 3)}  # fmt: skip
        if online:
            doc["lease"] = self._lease
        return _json(doc)

    def _client_options(self, aiomqtt: Any) -> dict[str, Any]:
        """Credentials, TLS and the Last Will for aiomqtt.Client."""
        s = self.settings
        assert s is not None
        will = {"status": "offline", "host": self.host}  # no time: the broker sends it later
        options: dict[str, Any] = {
            "username": s.username,
            "password": s.password,
            "will": aiomqtt.Will(self.status_topic, _json(will), qos=1, retain=True),
        }
        if s.tls:
            options["tls_context"] = s.ssl_context()
        return options

    async def run(self) -> None:
        """Deliver queued events until cancelled; returns at once when no broker is set."""
        if self.broker is None:
            return
        import aiomqtt  # only when events are on

        host, port = self.broker
        try:  # checked at start (Options.check_mqtt); a file may have changed since
            client_options = self._client_options(aiomqtt)
        except (OSError, ValueError) as e:
            log.error("MQTT events are off: the TLS files cannot be used: %s", e)
            return
        backoff = Backoff(min(0.5, self.max_backoff), self.max_backoff)
        identifier = f"overlayd-{self.host}-{os.getpid()}"
        while True:
            raise_if_cancelling()
            try:
                async with aiomqtt.Client(
                    host, port, identifier=identifier, timeout=self.timeout, keepalive=30,
                    **client_options,
                ) as client:  # fmt: skip
                    self.connected = True
                    log.info("connected to MQTT broker %s:%d%s, events on %s", host, port,
                             " (TLS)" if self.settings and self.settings.tls else "",
                             self.topic)  # fmt: skip
                    self._status_due = True  # the will may have replaced it meanwhile
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
        try:
            await self._drain_until_cancelled(client)
        except asyncio.CancelledError:
            # A clean stop: say "offline" ourselves (a clean disconnect does not fire the
            # will), briefly; a broker that does not answer must not hold up the stop.
            with contextlib.suppress(Exception):
                await client.publish(self.status_topic, self.status_payload(False), qos=1,
                                     retain=True, timeout=OFFLINE_TIMEOUT)  # fmt: skip
            raise

    async def _drain_until_cancelled(self, client: Any) -> None:
        while True:
            if self._status_due:
                self._status_due = False
                try:
                    await client.publish(self.status_topic, self.status_payload(True), qos=1,
                                         retain=True, timeout=self.timeout)  # fmt: skip
                except BaseException:
                    self._status_due = True
                    raise
            while not self._queue and not self._status_due:
                self._wakeup.clear()
                await self._wakeup.wait()
            if not self._queue:
                continue
            seq, payload = self._queue[0]
            await client.publish(self.topic, payload, qos=1, timeout=self.timeout)
            if self._queue and self._queue[0][0] == seq:
                self._queue.popleft()
