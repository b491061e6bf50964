"""MQTT over TLS with a user name and password, the retained status and the Last Will
(issue 12, item 7), against a real mosquitto with certificates made by openssl (tests/tls.py).

The broker listens with TLS only and refuses anonymous clients (a password file made by
mosquitto_passwd). The publisher's events and status reach a subscriber that authenticates the
same way; a wrong password, a CA that did not sign the broker, a missing client certificate
where one is required: nothing delivered, the publisher retries and never raises. The real
overlayd killed with SIGKILL: the broker publishes its will, "offline", retained.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from integration.etcdserver import free_port
from overlay.events import EventPublisher
from overlay.health import Metrics
from overlay.options import (
    FlagValueError,
    MqttBroker,
    MqttSettings,
    _mqtt_broker,
    parse_options,
)
from tests.test_daemon import (
    ALLOC_CONFIG,
    Daemon,
    Site,
    daemon_factory,
    etcdctl,
    site,
)
from tests.test_events import Broker, drained, running
from tests.tls import Pki, make_pki

__all__ = ["daemon_factory", "site"]  # fixtures used here

USER = "overlay"
PASSWORD = "s3cret with spaces & $igns"


@dataclass
class TlsBroker:
    broker: Broker
    pki: Pki

    @property
    def port(self) -> int:
        return self.broker.port

    def settings(self, **changes: Any) -> MqttSettings:
        base: dict[str, Any] = {
            "host": self.broker.host, "port": self.port, "tls": True,
            "username": USER, "password": PASSWORD, "cafile": self.pki.ca,
        }  # fmt: skip
        base.update(changes)
        return MqttSettings(**base)


def start_tls_broker(directory: Path, host: str, require_cert: bool) -> TlsBroker:
    pki_dir = directory / "pki"
    pki_dir.mkdir()
    pki = make_pki(pki_dir, server_ips=(host,))
    passwords = directory / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), USER, PASSWORD],
                   check=True, capture_output=True, timeout=10)  # fmt: skip
    os.chmod(passwords, 0o600)
    listener = (
        f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        f"require_certificate {'true' if require_cert else 'false'}\n"
    )
    broker = Broker(directory, free_port(host), host=host, listener_conf=listener,
                    anonymous=False, password_file=passwords)  # fmt: skip
    broker.start()
    return TlsBroker(broker, pki)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    b = start_tls_broker(tmp_path, "127.0.0.1", require_cert=False)
    try:
        yield b
    finally:
        b.broker.stop()


@pytest.fixture
def mtls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    b = start_tls_broker(tmp_path, "127.0.0.1", require_cert=True)
    try:
        yield b
    finally:
        b.broker.stop()


@contextlib.asynccontextmanager
async def tls_subscriber(b: TlsBroker, topic: str, ident: str) -> AsyncIterator[aiomqtt.Client]:
    context = ssl.create_default_context(cafile=str(b.pki.ca))
    context.load_cert_chain(str(b.pki.client_cert), str(b.pki.client_key))
    async with aiomqtt.Client(
        b.broker.host, b.port, identifier=ident, username=USER, password=PASSWORD,
        tls_context=context, timeout=5,
    ) as client:  # fmt: skip
        await client.subscribe(topic, qos=1)
        yield client


async def next_json(client: aiomqtt.Client, topic_suffix: str, seconds: float = 15) -> Any:
    async with asyncio.timeout(seconds):
        async for message in client.messages:
            if str(message.topic).endswith(topic_suffix):
                assert isinstance(message.payload, bytes)
                return json.loads(message.payload), message.retain
    raise AssertionError("unreachable")


async def test_events_and_status_over_tls_with_a_password(
    tls_broker: TlsBroker, unique: str
) -> None:
    metrics = Metrics()
    publisher = EventPublisher(tls_broker.settings(), f"t{unique}", "192.0.2.5", metrics)
    lease = {"subnet": "10.9.4.0/24", "public_ip": "192.0.2.5", "backend": "vxlan",
             "expiration": 1.5e9}  # fmt: skip
    async with tls_subscriber(tls_broker, f"t{unique}/#", f"sub-{unique}") as sub:
        async with running(publisher):
            publisher.publish("lease_acquired", **lease)
            first, _ = await next_json(sub, "/status")
            got, _ = await next_json(sub, "/events")
            assert got["event"] == "lease_acquired" and got["subnet"] == "10.9.4.0/24"
            await drained(publisher, 10)
            assert publisher.connected
    # The status before the lease event may or may not have been sent first: either is right.
    assert first["status"] == "online" and first["host"] == "192.0.2.5"
    assert first["lease"] in (None, lease)
    # A later subscriber gets the retained status: after a clean stop, "offline".
    async with tls_subscriber(tls_broker, f"t{unique}/+/status", f"late-{unique}") as late:
        status, retained = await next_json(late, "/status")
    assert retained and status["status"] == "offline" and status["host"] == "192.0.2.5"


async def test_retained_status_carries_the_lease_while_running(
    tls_broker: TlsBroker, unique: str
) -> None:
    publisher = EventPublisher(tls_broker.settings(), f"t{unique}", "192.0.2.6", Metrics())
    lease = {"subnet": "10.9.5.0/24", "public_ip": "192.0.2.6", "backend": "udp",
             "expiration": None}  # fmt: skip
    async with running(publisher):
        publisher.publish("lease_acquired", **lease)
        await drained(publisher, 10)
        async with tls_subscriber(tls_broker, f"t{unique}/+/status", f"s-{unique}") as sub:
            status, retained = await next_json(sub, "/status")
            assert retained and status == {**status, "status": "online", "lease": lease}
            publisher.publish("lease_lost", subnet="10.9.5.0/24")
            status, _ = await next_json(sub, "/status")
            assert status["status"] == "online" and status["lease"] is None


@pytest.mark.parametrize(
    ("change", "log_words"),
    [({"password": "wrong"}, "Not authorized"),
     ({"username": None, "password": None}, "Not authorized"),
     ({"cafile": "other"}, "CERTIFICATE_VERIFY_FAILED")],
    ids=["wrong-password", "anonymous", "other-ca"],
)  # fmt: skip
async def test_refused_connections_deliver_nothing_and_retry(
    tls_broker: TlsBroker, unique: str, change: dict[str, Any], log_words: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    if change.get("cafile") == "other":
        change = {"cafile": tls_broker.pki.other_ca}
    publisher = EventPublisher(tls_broker.settings(**change), f"t{unique}", "192.0.2.7",
                               Metrics(), max_backoff=0.2)  # fmt: skip
    caplog.set_level(logging.DEBUG, logger="overlay.events")
    async with tls_subscriber(tls_broker, f"t{unique}/#", f"sub-{unique}") as sub:
        async with running(publisher) as task:
            publisher.publish("ready")
            with pytest.raises(TimeoutError):
                await next_json(sub, "", seconds=2)
            assert not task.done() and not publisher.connected and publisher.queued == 1
    assert log_words.lower() in caplog.text.lower()


async def test_client_certificate_required_by_the_broker(
    mtls_broker: TlsBroker, unique: str
) -> None:
    pki = mtls_broker.pki
    without = EventPublisher(mtls_broker.settings(), f"t{unique}", "192.0.2.8", Metrics(),
                             max_backoff=0.2)  # fmt: skip
    with_cert = EventPublisher(
        mtls_broker.settings(certfile=pki.client_cert, keyfile=pki.client_key),
        f"t{unique}", "192.0.2.9", Metrics(),
    )  # fmt: skip
    async with tls_subscriber(mtls_broker, f"t{unique}/+/events", f"sub-{unique}") as sub:
        async with running(without), running(with_cert):
            without.publish("ready")
            with_cert.publish("ready")
            got, _ = await next_json(sub, "/events")
            assert got["host"] == "192.0.2.9"
            with pytest.raises(TimeoutError):
                await next_json(sub, "/events", seconds=2)
            assert without.queued == 1 and not without.connected


# ------------------------------------------------------------------ flags: parse and check


@pytest.mark.parametrize(
    ("text", "want"),
    [("127.0.0.1:1883", MqttBroker("127.0.0.1", 1883)),
     ("broker.example", MqttBroker("broker.example", 1883)),
     ("mqtt://10.0.0.1", MqttBroker("10.0.0.1", 1883, False)),
     ("mqtts://10.0.0.1", MqttBroker("10.0.0.1", 8883, True)),
     ("mqtts://ops@mq.example:9883/", MqttBroker("mq.example", 9883, True, "ops")),
     ("MQTTS://[::1]:8884", MqttBroker("::1", 8884, True)),
     ("[::1]:1884", MqttBroker("::1", 1884))],
)  # fmt: skip
def test_broker_forms(text: str, want: MqttBroker) -> None:
    assert _mqtt_broker(text) == want


@pytest.mark.parametrize(
    ("text", "words"),
    [("mqtts://ops:pw@host", "password in --mqtt-broker is visible"),
     ("http://host:1883", "is not mqtt:// or mqtts://"),
     ("mqtts://host/topic", "no path"),
     ("ops@host:1883", "needs the URL form"),
     ("host:0", "not 1-65535"), ("host:99999", "not 1-65535"), ("host:", "not 1-65535"),
     ("mqtt://:1883", "has no host"), ("bad_host!:1883", "not a host name"),
     ("[zz]:1883", "not an IPv6 address"), ("mqtts://a b@host", "printable"),
     ("mqtts://a/b@host", "no path"),
     ("host:1883x", "not 1-65535")],
)  # fmt: skip
def test_broker_refused_saying_why(text: str, words: str) -> None:
    with pytest.raises(FlagValueError) as exc:
        _mqtt_broker(text)
    assert words in str(exc.value)


_URL_USER_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "/?#@:")


@given(
    host=st.one_of(st.ip_addresses(v=4).map(str),
                   st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9]{0,5}){0,3}",
                                 fullmatch=True)),
    port=st.integers(1, 65535), tls=st.booleans(),
    user=st.one_of(st.none(), st.text(_URL_USER_CHARS, min_size=1, max_size=20)),
)  # fmt: skip
def test_broker_url_round_trips(host: str, port: int, tls: bool, user: str | None) -> None:
    broker = MqttBroker(host, port, tls, user)
    assert _mqtt_broker(str(broker)) == broker


@given(st.text(max_size=60))
def test_any_broker_text_is_a_broker_or_a_typed_error(text: str) -> None:
    try:
        b = _mqtt_broker(text)
    except FlagValueError as e:
        assert str(e)
        return
    assert 0 < b.port < 65536 and b.host and (b.username is None or b.tls is not None)


def test_flag_combinations_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--mqtt-username", "u"], "--mqtt-username without --mqtt-broker"),
        (["--mqtt-broker", "mqtt://h", "--mqtt-cafile", "/etc/hostname"], "use mqtts://"),
        (["--mqtt-broker", "mqtts://a@h", "--mqtt-username", "b"], "give one"),
        (["--mqtt-broker", "mqtts://h", "--mqtt-password", "p"], "needs a user name"),
        (["--mqtt-broker", "mqtts://h", "--mqtt-cafile", str(tmp_path / "no")], "no such file"),
        (["--mqtt-broker", "mqtts://h", "--mqtt-certfile", "/etc/hostname"], "together"),
    ]
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\n\xff\x00\n-----END CERTIFICATE-----\n")
    cases.append((["--mqtt-broker", "mqtts://h", "--mqtt-cafile", str(garbage)], "MQTT TLS files"))
    for argv, words in cases:
        with pytest.raises(SystemExit) as exc:
            parse_options(argv, environ={})
        assert exc.value.code == 2
        assert words in capsys.readouterr().err, argv


def test_settings_from_flags_and_env(tmp_path: Path) -> None:
    opts = parse_options(["--mqtt-broker", "mqtts://ops@127.0.0.1"],
                         environ={"FLANNELD_MQTT_PASSWORD": "pw"})  # fmt: skip
    assert opts.mqtt == MqttSettings("127.0.0.1", 8883, True, "ops", "pw")
    assert "pw" not in repr(opts.mqtt)
    assert opts.warnings == ()  # from the environment, over TLS: nothing to say
    # HOST:PORT with a CA file: TLS
    ca = make_pki(tmp_path).ca
    opts = parse_options(["--mqtt-broker", "127.0.0.1:8883", "--mqtt-cafile", str(ca)], environ={})
    assert opts.mqtt is not None and opts.mqtt.tls
    assert parse_options([], environ={}).mqtt is None


def test_secret_warnings() -> None:
    opts = parse_options(["--etcd-username", "u", "--etcd-password", "pw"], environ={})
    cmdline, clear = opts.warnings
    assert "--etcd-password on the command line" in cmdline and "FLANNELD_ETCD_PASSWORD" in cmdline
    assert "/etc/default/overlayd" in cmdline and "0600" in cmdline
    assert "clear text to http://127.0.0.1:2379" in clear
    # From the environment, over https: quiet.
    opts = parse_options(["--etcd-endpoints", "https://127.0.0.1:2379"],
                         environ={"FLANNELD_ETCD_USERNAME": "u",
                                  "FLANNELD_ETCD_PASSWORD": "p"})  # fmt: skip
    assert opts.warnings == ()
    opts = parse_options(["--mqtt-broker", "mqtt://h", "--mqtt-username", "u",
                          "--mqtt-password", "p"], environ={})  # fmt: skip
    assert len(opts.warnings) == 2 and "MQTT password is sent in clear text" in opts.warnings[1]


# ------------------------------------------------- the real daemon: SIGKILL and the will


@pytest.mark.root
@pytest.mark.slow
async def test_sigkilled_daemon_leaves_its_will_offline(
    site: Site, etcd_prefix: str, daemon_factory: object, tmp_path: Path, unique: str
) -> None:
    assert callable(daemon_factory)
    (tmp_path / "broker").mkdir()
    b = start_tls_broker(tmp_path / "broker", site.host_ip, require_cert=False)
    try:
        etcdctl(site, "put", f"{etcd_prefix}/config", ALLOC_CONFIG)
        topic = f"t{unique}"
        d: Daemon = daemon_factory(
            "--mqtt-broker", f"mqtts://{USER}@{site.host_ip}:{b.port}",
            "--mqtt-cafile", str(b.pki.ca), "--mqtt-topic-prefix", topic,
        )  # fmt: skip
        d.env["FLANNELD_MQTT_PASSWORD"] = PASSWORD
        async with tls_subscriber(b, f"{topic}/+/status", f"sub-{unique}") as sub:
            d.start()
            while True:  # online, then online with the lease
                status, _ = await next_json(sub, "/status", seconds=30)
                assert status["status"] == "online" and status["host"] == site.node_ip
                if status["lease"] is not None:
                    break
            assert status["lease"]["public_ip"] == site.node_ip
            assert status["lease"]["subnet"].startswith("10.77.")
            assert PASSWORD not in d.tail()
            d.kill()  # SIGKILL: no goodbye from the daemon
            will, _ = await next_json(sub, "/status", seconds=30)
        assert will == {"status": "offline", "host": site.node_ip}
        async with tls_subscriber(b, f"{topic}/+/status", f"late-{unique}") as late:
            kept, retained = await next_json(late, "/status")
        assert retained and kept == will
    finally:
        b.broker.stop()
