"""`overlayctl events`: a live feed of what the daemons report.

With --mqtt-broker: the MQTT events every overlayd publishes (overlay.events) on
`<prefix>/<public-ip>/events`, from every host (or one, --host). A message from the broker is
checked before it is shown (parse_event): its size, UTF-8, JSON nesting, an object with an
`event` name, a `host` IP address that is the one in its topic, a finite `time`. Anything
else is shown as a `skipped` line saying why, never a crash.

Without a broker: the etcd lease watch (subnetmgr.registry), rendered the same way, as
lease_added, lease_changed (a renewal too: our renewals re-put the key), lease_removed (expired,
revoked or deleted) and lease_ignored (a key overlayd does not use, with the reason).

Human-readable by default, one line per event: time (UTC), host, event, details.
`--json`: one JSON object per line, as received (after the checks); skipped messages as
`{"skipped": REASON, "detail": ..., "topic": ..., "size": N}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import ip_address
from typing import Any

from overlay.options import Flag, _host_port, _topic_prefix, add_flags, resolve
from subnetmgr.model import JsonRejected, load_json, printable

MAX_EVENT_BYTES = 16 * 1024
"""The largest MQTT message decoded (overlayd's events are about 200 bytes)."""
MAX_DETAIL_CHARS = 200
"""Each detail value is cut to this many characters in the human-readable line."""
MAX_DETAILS = 20
"""At most this many details in the human-readable line."""
_EVENT_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
_MAX_TIME = 1e11  # year 5138: a time beyond it is not a Unix time

MQTT_FLAGS: tuple[Flag, ...] = (
    Flag("--mqtt-broker", _host_port, None,
         "read the daemons' MQTT events from this broker, HOST:PORT (without it: the etcd "
         "lease watch)", "HOST:PORT", shown_default="none: etcd"),
    Flag("--mqtt-topic-prefix", _topic_prefix, "overlay",
         "the daemons' --mqtt-topic-prefix: events are on <prefix>/<public-ip>/events",
         "PREFIX"),
)  # fmt: skip


@dataclass(frozen=True)
class Event:
    """A checked event: `doc` holds `event`, `host`, `time` and the details."""

    topic: str
    doc: dict[str, Any]


@dataclass(frozen=True)
class Skipped:
    """A message that is not an event: why (a snake_case code) and what was wrong."""

    topic: str
    size: int
    reason: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"skipped": self.reason, "detail": self.detail, "topic": self.topic,
                "size": self.size}  # fmt: skip


def topic_host(topic: str) -> str | None:
    """The host element of `<prefix>/<host>/events`, or None for another shape."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[-1] != "events":
        return None
    return parts[-2]


def parse_event(topic: str, payload: object) -> Event | Skipped:
    """Check one message from the broker; never raises."""
    shown_topic = printable(topic, 200)
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    if not isinstance(payload, bytes | bytearray):
        return Skipped(shown_topic, 0, "not_bytes", f"payload of type {type(payload).__name__}")
    size = len(payload)

    def skip(reason: str, detail: str) -> Skipped:
        return Skipped(shown_topic, size, reason, detail)

    if size > MAX_EVENT_BYTES:
        return skip("too_large", f"{size} bytes, the limit is {MAX_EVENT_BYTES}")
    try:
        doc = load_json(bytes(payload))
    except JsonRejected as e:
        return skip(e.reason, str(e))
    if not isinstance(doc, dict):
        return skip("not_object", f"a JSON {type(doc).__name__}, not an object")
    kind = doc.get("event")
    if not isinstance(kind, str) or not _EVENT_RE.fullmatch(kind):
        return skip("bad_event", f"event {printable(repr(kind), 60)} is not an event name")
    host = doc.get("host")
    try:
        if not isinstance(host, str) or len(host) > 45:
            raise ValueError
        ip_address(host)
    except ValueError:
        return skip("bad_host", f"host {printable(repr(host), 60)} is not an IP address")
    in_topic = topic_host(topic)
    if in_topic is not None and in_topic != host:
        return skip("host_mismatch", f"host {host} published on the topic of {shown_topic}")
    stamp = doc.get("time")
    if (
        isinstance(stamp, bool)
        or not isinstance(stamp, int | float)
        or not 0 <= stamp < _MAX_TIME
        or (isinstance(stamp, float) and not math.isfinite(stamp))
    ):
        return skip("bad_time", f"time {printable(repr(stamp), 60)} is not a Unix time")
    return Event(shown_topic, doc)


def _detail(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return printable(text, MAX_DETAIL_CHARS)


def render_human(item: Event | Skipped) -> str:
    """One line with printable characters only."""
    if isinstance(item, Skipped):
        return (f"skipped: a message on {item.topic} ({item.size} bytes): {item.reason}: "
                f"{printable(item.detail, 200)}")  # fmt: skip
    doc = item.doc
    when = datetime.fromtimestamp(float(doc["time"]), UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    host = doc.get("host") or "-"
    shown = [(k, v) for k, v in doc.items() if k not in ("event", "host", "time") and v is not None]
    details = " ".join(f"{printable(str(k), 40)}={_detail(v)}" for k, v in shown[:MAX_DETAILS])
    if len(shown) > MAX_DETAILS:
        details += f" (+{len(shown) - MAX_DETAILS} more details; --json shows all)"
    return f"{when}  {printable(str(host), 45):15}  {doc['event']:16}  {details}".rstrip()


def render_json(item: Event | Skipped) -> str:
    """One line of JSON: the event as received (checked), or the skipped message's record."""
    doc = item.to_json() if isinstance(item, Skipped) else item.doc
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True)


class Feed:
    """Prints events until `count` lines were printed (None: no limit)."""

    def __init__(self, as_json: bool, count: int | None, out: Any = None) -> None:
        self.render: Callable[[Event | Skipped], str] = render_json if as_json else render_human
        self.count = count
        self.printed = 0
        self.out = out if out is not None else sys.stdout
        self.done = asyncio.Event()

    def show(self, item: Event | Skipped) -> None:
        if self.done.is_set():
            return
        print(self.render(item), file=self.out, flush=True)
        self.printed += 1
        if self.count is not None and self.printed >= self.count:
            self.done.set()


def _note(text: str) -> None:
    print(f"overlayctl events: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- MQTT


async def mqtt_feed(broker: tuple[str, int], topic: str, feed: Feed) -> None:
    """Subscribe and show every message until `feed` is done; reconnects after the broker
    went away (the first connection failing is an error)."""
    import aiomqtt

    host, port = broker
    connected_once = False
    backoff = 0.5
    while not feed.done.is_set():
        try:
            async with aiomqtt.Client(
                host, port, identifier=f"overlayctl-events-{os.getpid()}-{time.monotonic_ns()}",
                timeout=5, keepalive=30,
            ) as client:  # fmt: skip
                await client.subscribe(topic, qos=1)
                if not connected_once:
                    _note(f"following {topic} on {host}:{port}")
                connected_once, backoff = True, 0.5
                async for message in client.messages:
                    feed.show(parse_event(str(message.topic), message.payload))
                    if feed.done.is_set():
                        return
        except aiomqtt.MqttError as e:
            if not connected_once:
                raise ConnectionError(f"MQTT broker {host}:{port}: {e}") from None
            _note(f"lost the broker {host}:{port} ({e}); reconnecting in {backoff:.1f}s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)


# ---------------------------------------------------------------------- etcd


def lease_doc(kind: str, lease: Any, revision: int) -> dict[str, Any]:
    """An etcd lease event in the shape of the MQTT events."""
    # An IPv6-only lease has no BackendData: its VTEP MAC is BackendV6Data's.
    data = lease.attrs.backend_data or lease.attrs.backend_v6_data or {}
    mac = data.get("VtepMAC")
    ttl = None
    if lease.expiration is not None and 0 < lease.expiration < math.inf:  # 0, inf: unknown
        ttl = max(0, int(lease.expiration - time.time()))
    host = lease.attrs.address  # an IPv6-only lease's PublicIPv6 (its PublicIP is 0.0.0.0)
    return {
        "event": kind,
        "host": None if host.is_unspecified else str(host),
        "time": round(time.time(), 3),
        "subnet": str(lease.ident),
        "backend": lease.attrs.backend_type or "udp",
        "vtep_mac": mac if isinstance(mac, str) else None,
        "ttl": ttl,
        "reserved": lease.reserved if kind != "lease_removed" else None,
        "revision": revision,
    }


def ignored_doc(ignored: Any) -> dict[str, Any]:
    host = str(ignored.lease.attrs.address) if ignored.lease is not None else None
    return {"event": "lease_ignored", "host": host, "time": round(time.time(), 3),
            "key": ignored.key, "reason": ignored.reason, "detail": ignored.detail,
            "revision": ignored.revision}  # fmt: skip


def _watch_doc(ev: Any, config: Any, check: Callable[[Any, Any], Any]) -> dict[str, Any]:
    """The event document of one lease event of the watch."""
    if ev.kind == "removed":
        return lease_doc("lease_removed", ev.lease, ev.revision)
    why = check(config, ev.lease) if config is not None else None
    if why is not None:
        doc = lease_doc("lease_ignored", ev.lease, ev.revision)
        doc.update(key=ev.lease.key, reason=why[0], detail=why[1])
        return doc
    new = ev.lease.create_revision == ev.revision
    return lease_doc("lease_added" if new else "lease_changed", ev.lease, ev.revision)


async def etcd_feed(args: argparse.Namespace, feed: Feed, host: str | None) -> None:
    """The lease watch: every change under <prefix>/subnets/ from now on; resumes after the
    stream breaks or the revision is compacted."""
    from subnetmgr.model import ConfigError, NetworkConfig
    from subnetmgr.registry import Compacted, EtcdRegistry, RegistryError
    from subnetmgr.validate import check_lease

    def show(doc: dict[str, Any]) -> None:
        if host is None or doc.get("host") == host:
            feed.show(Event("etcd", doc))

    registry = await EtcdRegistry.connect(args.etcd.registry_options())
    registry.ignored.quiet = True
    # Keys that do not decode are reported while the registry decodes a batch: shown with the
    # batch, in revision order.
    undecodable: list[dict[str, Any]] = []
    registry.ignored.on_new = lambda ignored: undecodable.append(ignored_doc(ignored))
    try:
        config = None
        text, _ = await registry.get_config_value()
        if text is not None:
            try:
                config = NetworkConfig.from_json(text)
            except ConfigError as e:
                _note(f"{e}; leases are not checked against it")
        _leases, revision = await registry.list_leases(expirations=False)
        _note(f"following the leases under {args.etcd.prefix}/subnets/ from revision "
              f"{revision + 1}")  # fmt: skip
        failures = 0
        while not feed.done.is_set():
            try:
                async for batch in registry.watch_lease_batches(revision + 1):
                    failures = 0
                    docs, undecodable[:] = list(undecodable), []
                    garbage = {int(d["revision"]) for d in docs}
                    for ev in batch:
                        revision = max(revision, ev.revision)
                        if ev.kind == "removed" and ev.revision in garbage:
                            continue  # the registry's "no longer a lease" for a garbage PUT
                        docs.append(_watch_doc(ev, config, check_lease))
                    for doc in sorted(docs, key=lambda d: int(d["revision"])):
                        revision = max(revision, int(doc["revision"]))
                        show(doc)
                    if feed.done.is_set():
                        return
            except Compacted:
                _, revision = await registry.list_leases(expirations=False)
                _note(f"the watch's revision was compacted; following from {revision + 1} "
                      "(changes in between are not shown)")  # fmt: skip
            except RegistryError as e:
                failures += 1
                if failures == 1:
                    _note(f"etcd: {e}; retrying")
                await asyncio.sleep(min(0.5 * failures, 5.0))
    finally:
        await registry.close()


# ---------------------------------------------------------------------- command


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
        return value

    parse.__name__ = kind.__name__
    return parse


def _host(text: str) -> str:
    try:
        return str(ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a host's public IP address such as 192.168.1.20"
        ) from None


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "events",
        help="a live feed of the daemons' events (MQTT, or the etcd lease watch)",
        description="Follow what the daemons report, one line per event: time (UTC), host, "
        "event, details. With --mqtt-broker: the MQTT events of every overlayd (lease_acquired, "
        "lease_renewed, lease_lost, lease_reacquired, peer_added, peer_removed, ready) on "
        "<prefix>/<public-ip>/events; a message that is not a valid event (too large, not "
        "UTF-8 JSON, nested too deep, no event name, a host that is not an IP address or not "
        "the one in its topic, no Unix time) is shown as a 'skipped' line with the reason. "
        "Without --mqtt-broker: the etcd lease watch (lease_added, lease_changed, "
        "lease_removed, lease_ignored with the reason). Runs until interrupted, --count or "
        "--timeout (exit 0 then).",
    )
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per line (as received, after the checks; a "
                        'skipped message as {"skipped": REASON, "detail": ..., "topic": ..., '
                        '"size": N})')  # fmt: skip
    add_flags(parser, MQTT_FLAGS)
    parser.add_argument("--host", type=_host, default=None, metavar="PUBLIC_IP",
                        help="only this host's events")  # fmt: skip
    parser.add_argument("--count", type=_positive(int), default=None, metavar="N",
                        help="stop after N lines")  # fmt: skip
    parser.add_argument("--timeout", type=_positive(float), default=None, metavar="SECONDS",
                        help="stop after this many seconds")  # fmt: skip

    def run(args: argparse.Namespace) -> int:
        values = resolve(parser, args, MQTT_FLAGS, os.environ)
        try:
            return asyncio.run(follow(args, values["mqtt_broker"], values["mqtt_topic_prefix"]))
        except KeyboardInterrupt:
            return 130

    parser.set_defaults(func=run)
    return parser


async def follow(args: argparse.Namespace, broker: tuple[str, int] | None, prefix: str) -> int:
    from subnetmgr.registry import RegistryError

    feed = Feed(args.json, args.count)
    if broker is not None:
        topic = f"{prefix}/{args.host or '+'}/events"
        work = mqtt_feed(broker, topic, feed)
    else:
        work = etcd_feed(args, feed, args.host)
    try:
        async with asyncio.timeout(args.timeout):
            await work
    except TimeoutError:
        pass
    except (ConnectionError, RegistryError) as e:
        print(f"overlayctl: {e}", file=sys.stderr)
        return 1
    return 0
