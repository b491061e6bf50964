"""`overlayctl events`: the real command against a real mosquitto (tests/test_events.py's
fixture) and a real etcd; hostile broker messages; properties of the message checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import aetcd
import aiomqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from integration.etcdserver import EtcdServer, free_port
from overlay.events import EventPublisher
from overlay.events_cli import (
    MAX_EVENT_BYTES,
    Event,
    Skipped,
    parse_event,
    render_human,
    render_json,
)
from overlay.health import Metrics
from subnetmgr.model import LeaseAttrs
from subnetmgr.registry import EtcdOptions, EtcdRegistry
from tests.test_events import Broker, broker  # noqa: F401  (the fixture)

CTL = [sys.executable, "-m", "overlay.ctl"]


@contextlib.asynccontextmanager
async def events_cmd(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`overlayctl events ARGS` running; yields once it follows its source (its stderr says
    so). Killed at the end if still running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
    proc = await asyncio.create_subprocess_exec(
        *CTL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert proc.stderr is not None
        first = await asyncio.wait_for(proc.stderr.readline(), 20)
        assert b"following" in first, first
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, list[str], str]:
    assert proc.stdout is not None and proc.stderr is not None
    out = await asyncio.wait_for(proc.stdout.read(), 30)
    err = await asyncio.wait_for(proc.stderr.read(), 30)
    code = await asyncio.wait_for(proc.wait(), 30)
    return code, out.decode().splitlines(), err.decode()


HOSTILE: list[tuple[str, bytes, str]] = [
    ("192.0.2.9", b"\xff\xfe\x00garbage", "not_utf8"),
    ("192.0.2.9", b"[" * 200_00 + b"]" * 200_00, "too_large"),
    ("192.0.2.9", b"[" * 5000 + b"]" * 5000, "too_deep"),
    ("192.0.2.9", b"x" * (MAX_EVENT_BYTES + 1), "too_large"),
    ("192.0.2.9", b'{"event":"ready","host":"192.0.2.9","time":NaN}', "not_json"),
    ("192.0.2.9", b"[1,2,3]", "not_object"),
    ("192.0.2.9", b'{"event":"\\u001b[31mred","host":"192.0.2.9","time":1}', "bad_event"),
    ("192.0.2.9", b'{"event":"ready","host":"not-an-ip","time":1}', "bad_host"),
    ("192.0.2.9", b'{"event":"ready","host":"192.0.2.66","time":1}', "host_mismatch"),
    ("192.0.2.9", b'{"event":"ready","host":"192.0.2.9","time":true}', "bad_time"),
    ("192.0.2.9", b'{"event":"ready","host":"192.0.2.9","time":1e300}', "bad_time"),
    ("192.0.2.9", b"", "not_json"),
]


async def test_mqtt_events_as_json_with_hostile_messages_skipped(
    broker: Broker,  # noqa: F811
    unique: str,
) -> None:
    prefix = f"t{unique}"
    publisher = EventPublisher(("127.0.0.1", broker.port), prefix, "192.0.2.5", Metrics())
    total = 2 + len(HOSTILE)
    args = ("events", "--json", "--mqtt-broker", f"127.0.0.1:{broker.port}",
            "--mqtt-topic-prefix", prefix, "--count", str(total), "--timeout", "60")  # fmt: skip
    async with events_cmd(*args) as proc:
        task = asyncio.create_task(publisher.run())
        try:
            publisher.publish("lease_acquired", subnet="10.9.4.0/24", public_ip="192.0.2.5")
            async with aiomqtt.Client("127.0.0.1", broker.port, timeout=5) as raw:
                for host, payload, _ in HOSTILE:
                    await raw.publish(f"{prefix}/{host}/events", payload, qos=1)
            publisher.publish("ready")
            code, lines, err = await finish(proc)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert code == 0, err
    assert len(lines) == total
    docs = [json.loads(line) for line in lines]
    events = [d for d in docs if "event" in d]
    assert [e["event"] for e in events] == ["lease_acquired", "ready"]
    assert events[0]["host"] == "192.0.2.5" and events[0]["subnet"] == "10.9.4.0/24"
    skipped = [d for d in docs if "skipped" in d]
    assert [d["skipped"] for d in skipped] == [reason for _, _, reason in HOSTILE]
    assert all(d["topic"] == f"{prefix}/192.0.2.9/events" for d in skipped)


async def test_mqtt_events_human_readable_one_host(
    broker: Broker,  # noqa: F811
    unique: str,
) -> None:
    prefix = f"t{unique}"
    metrics = Metrics()
    ours = EventPublisher(("127.0.0.1", broker.port), prefix, "192.0.2.5", metrics)
    other = EventPublisher(("127.0.0.1", broker.port), prefix, "192.0.2.6", metrics)
    args = ("events", "--mqtt-broker", f"127.0.0.1:{broker.port}", "--mqtt-topic-prefix",
            prefix, "--host", "192.0.2.5", "--count", "2", "--timeout", "60")  # fmt: skip
    async with events_cmd(*args) as proc:
        tasks = [asyncio.create_task(p.run()) for p in (ours, other)]
        try:
            other.publish("ready")  # another host: not shown
            ours.publish("peer_added", subnet="10.9.7.0/24", public_ip="192.0.2.7",
                         vtep_mac="c6:d2:32:6f:8f:44")  # fmt: skip
            other.publish("ready")
            ours.publish("ready", subnet="10.9.4.0/24")
            code, lines, err = await finish(proc)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    assert code == 0, err
    first = lines[0].split()
    assert first[2:] == ["192.0.2.5", "peer_added", "subnet=10.9.7.0/24",
                         "public_ip=192.0.2.7", "vtep_mac=c6:d2:32:6f:8f:44"]  # fmt: skip
    assert first[0].startswith("20") and len(first[1]) == len("09:31:02.123")
    assert lines[1].split()[2:] == ["192.0.2.5", "ready", "subnet=10.9.4.0/24"]


async def test_mqtt_feed_reconnects_after_the_broker_restarts(
    broker: Broker,  # noqa: F811
    unique: str,
) -> None:
    prefix = f"t{unique}"
    args = ("events", "--json", "--mqtt-broker", f"127.0.0.1:{broker.port}",
            "--mqtt-topic-prefix", prefix, "--count", "2", "--timeout", "60")  # fmt: skip
    doc = {"event": "ready", "host": "192.0.2.5", "time": 1.0}
    topic = f"{prefix}/192.0.2.5/events"
    async with events_cmd(*args) as proc:
        async with aiomqtt.Client("127.0.0.1", broker.port, timeout=5) as raw:
            await raw.publish(topic, json.dumps(doc), qos=1)
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert json.loads(first) == doc
        broker.stop()
        broker.start()
        assert proc.stderr is not None
        note = await asyncio.wait_for(proc.stderr.readline(), 20)
        assert b"lost the broker" in note
        # The feed subscribes again once it is back: publish until it shows the message.
        async with aiomqtt.Client("127.0.0.1", broker.port, timeout=5) as raw:
            for _ in range(100):
                await raw.publish(topic, json.dumps({**doc, "time": 2.0}), qos=1)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.2)
                    break
        code, lines, err = await finish(proc)
    assert code == 0, err
    assert [json.loads(line)["time"] for line in lines] == [2.0]


def test_no_broker_there_is_an_error() -> None:
    port = free_port()
    out = subprocess.run([*CTL, "events", "--mqtt-broker", f"127.0.0.1:{port}", "--timeout",
                          "20"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1
    assert f"MQTT broker 127.0.0.1:{port}" in out.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--count", "0"], "must be more than 0"),
        (["--timeout", "nan"], "must be more than 0"),
        (["--timeout", "x"], "is not a number"),
        (["--host", "h1"], "is not a host's public IP"),
        (["--mqtt-broker", "a:b:c:99999"], "is not HOST:PORT"),
        (["--mqtt-topic-prefix", "a/#"], "is not an MQTT topic prefix"),
    ],
)
def test_bad_flags_exit_2(args: list[str], needle: str) -> None:
    out = subprocess.run([*CTL, "events", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and needle in out.stderr, out.stderr


async def test_etcd_lease_watch_without_broker(
    etcd_server: EtcdServer, etcd_prefix: str, raw: aetcd.Client
) -> None:
    """Added, changed (renewed), ignored (undecodable; outside the network), removed."""
    opts = EtcdOptions(endpoints=(etcd_server.endpoint,), prefix=etcd_prefix)
    registry = await EtcdRegistry.connect(opts)
    try:
        await registry.put_config_text('{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}')
        args = ("--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix,
                "events", "--json", "--count", "5", "--timeout", "60")  # fmt: skip
        async with events_cmd(*args) as proc:
            attrs = LeaseAttrs(IPv4Address("192.0.2.5"), None, "vxlan",
                               {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"})  # fmt: skip
            lease = await registry.create_lease(IPv4Network("10.1.4.0/24"), attrs, 3600)
            assert lease is not None
            await registry.renew_lease(lease, 3600)
            await raw.put(f"{etcd_prefix}/subnets/10.1.5.0-24".encode(), b"\xff{")
            outside = LeaseAttrs(IPv4Address("192.0.2.6"))
            assert await registry.create_lease(IPv4Network("10.2.0.0/24"), outside, 60)
            assert await registry.delete_lease(IPv4Network("10.1.4.0/24"))
            code, lines, err = await finish(proc)
    finally:
        await registry.close()
    assert code == 0, err
    docs = [json.loads(line) for line in lines]
    assert [d["event"] for d in docs] == [
        "lease_added", "lease_changed", "lease_ignored", "lease_ignored", "lease_removed",
    ]  # fmt: skip
    assert docs[0]["host"] == "192.0.2.5" and docs[0]["subnet"] == "10.1.4.0/24"
    assert docs[0]["vtep_mac"] == "c6:d2:32:6f:8f:44"
    assert docs[1]["revision"] > docs[0]["revision"] and 3500 < docs[1]["ttl"] <= 3600
    assert docs[2]["key"] == "10.1.5.0-24" and docs[2]["reason"] == "not_utf8"
    assert docs[3]["reason"] == "outside_network" and docs[3]["host"] == "192.0.2.6"
    assert docs[4]["subnet"] == "10.1.4.0/24" and docs[4]["host"] == "192.0.2.5"


# ---------------------------------------------------------------------- properties

TOPIC = "overlay/192.0.2.5/events"
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=30),
    st.floats(allow_nan=False, allow_infinity=False),
)  # fmt: skip
_details = st.dictionaries(
    st.text(max_size=12).filter(lambda k: k not in ("event", "host", "time")),
    st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6),
    max_size=5,
)
_valid_docs = st.builds(
    lambda kind, stamp, details: {"event": kind, "host": "192.0.2.5", "time": stamp, **details},
    st.from_regex(r"[a-z][a-z0-9_]{0,39}", fullmatch=True),
    st.one_of(st.integers(0, 10**10), st.floats(0, 1e10)),
    _details,
)


def _one_printable_line(text: str) -> bool:
    return "\n" not in text and all(c.isprintable() for c in text)


@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode), st.text(max_size=80))
def test_any_message_is_an_event_or_a_typed_skip(payload: bytes, topic: str) -> None:
    got = parse_event(topic, payload)
    assert isinstance(got, Event | Skipped)
    if isinstance(got, Skipped):
        assert got.reason and got.size == len(payload)
        assert json.loads(render_json(got))["skipped"] == got.reason
    else:  # whatever decoded has the three checked fields
        assert isinstance(got.doc["event"], str) and isinstance(got.doc["host"], str)
    assert _one_printable_line(render_human(got))
    assert _one_printable_line(render_json(got))


@given(_valid_docs)
def test_valid_events_round_trip(doc: dict[str, Any]) -> None:
    """What a daemon (or anyone) publishes as a valid event comes out as the same object in
    --json, and as one printable line naming its host and event in the human form."""
    got = parse_event(TOPIC, json.dumps(doc).encode())
    assert isinstance(got, Event) and got.doc == doc
    assert json.loads(render_json(got)) == doc
    line = render_human(got)
    assert _one_printable_line(line) and f"192.0.2.5        {doc['event']}" in line


def test_many_details_are_cut_in_the_human_line_not_in_json() -> None:
    doc = {"event": "ready", "host": "192.0.2.5", "time": 1.5,
           **{f"k{n}": "v" * 500 for n in range(25)}}  # fmt: skip
    got = parse_event(TOPIC, json.dumps(doc).encode())
    assert isinstance(got, Event)
    line = render_human(got)
    assert line.count("=") == 20 and "(+5 more details; --json shows all)" in line
    assert "v" * 201 not in line and "v" * 197 + "..." in line
    assert json.loads(render_json(got)) == doc


@given(_valid_docs, st.sampled_from(["event", "host", "time"]), _scalars)
def test_a_broken_field_is_skipped_with_its_reason(
    doc: dict[str, Any], field: str, value: object
) -> None:
    doc = {**doc, field: value}
    got = parse_event(TOPIC, json.dumps(doc).encode())
    if isinstance(got, Event):  # the new value happens to be valid too
        assert got.doc == doc
    else:
        assert got.reason in {"event": ("bad_event",), "host": ("bad_host", "host_mismatch"),
                              "time": ("bad_time",)}[field]  # fmt: skip


def test_an_ipv6_only_lease_event_names_its_ipv6_subnet_and_host() -> None:
    """flannel's IPv6-only lease (key 0.0.0.0-0&<v6>, PublicIP 0.0.0.0, no BackendData) is
    shown by its IPv6 subnet, its PublicIPv6 and BackendV6Data's VTEP MAC."""
    from ipaddress import IPv6Address, IPv6Network

    from overlay.events_cli import lease_doc
    from subnetmgr.model import NO_IPV4, Lease

    attrs = LeaseAttrs(IPv4Address(0), IPv6Address("fd99::5"), "vxlan", None,
                       {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:46"})  # fmt: skip
    doc = lease_doc("lease_added", Lease(NO_IPV4, attrs, IPv6Network("fd00:1:0:5::/64")), 7)
    assert (doc["host"], doc["subnet"], doc["vtep_mac"]) == (
        "fd99::5",
        "fd00:1:0:5::/64",
        "c6:d2:32:6f:8f:46",
    )
    gone = lease_doc("lease_removed", Lease(NO_IPV4, LeaseAttrs(IPv4Address(0))), 8)
    assert gone["host"] is None
