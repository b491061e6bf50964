"""Flags and environment of `overlayd` (and the etcd flags shared with `overlayctl`).

Every flag keeps flanneld's name and can also come from `FLANNELD_<UPPER_SNAKE>`, e.g.
`--etcd-endpoints` from `FLANNELD_ETCD_ENDPOINTS`. A flag on the command line wins over the
environment, which wins over the default. A repeatable flag (`--iface`) takes a comma-separated
list from its environment variable. A bad value, from either place, is an argparse error:
a message naming the flag (or variable) and the value, and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import logging
import os
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

from subnetmgr.model import DEFAULT_PREFIX

ENV_PREFIX = "FLANNELD_"
DEFAULT_SUBNET_FILE = Path("/run/flannel/subnet.env")
DEFAULT_ETCD_ENDPOINT = "http://127.0.0.1:2379"
LOG_LEVELS = ("debug", "info", "warning", "error")


def env_name(flag: str) -> str:
    """`--etcd-endpoints` -> `FLANNELD_ETCD_ENDPOINTS`."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


# --------------------------------------------------------------------------- value parsers
# Each raises ValueError with a message that says what is expected; argparse turns it into
# "argument --flag: invalid value" and we add the value and the hint.


class FlagValueError(ValueError):
    pass


def _endpoints(text: str) -> tuple[str, ...]:
    items = tuple(e.strip() for e in text.split(",") if e.strip())
    if not items:
        raise FlagValueError("expected a comma-separated list such as http://127.0.0.1:2379")
    for e in items:
        m = re.fullmatch(r"(https?)://([^/:\s]+|\[[0-9a-fA-F:]+\]):(\d{1,5})/?", e)
        if m is None or not 0 < int(m[3]) < 65536:
            raise FlagValueError(f"{e!r} is not an endpoint such as http://127.0.0.1:2379")
    return items


def _prefix(text: str) -> str:
    if not text.startswith("/") or (text.endswith("/") and text != "/"):
        raise FlagValueError("expected an absolute etcd key prefix such as /coreos.com/network")
    return text


def _ipv4(text: str) -> IPv4Address:
    try:
        return IPv4Address(text.strip())
    except ValueError:
        raise FlagValueError(f"{text!r} is not an IPv4 address such as 192.168.1.10") from None


def _ip_any(text: str) -> IPv4Address | IPv6Address:
    try:
        return ip_address(text.strip())
    except ValueError:
        raise FlagValueError(
            f"{text!r} is not an IPv4 or IPv6 address such as 192.168.1.10 or fd00:12::10"
        ) from None


def _ipv6(text: str) -> IPv6Address:
    try:
        addr = IPv6Address(text.strip())
    except ValueError:
        raise FlagValueError(f"{text!r} is not an IPv6 address such as fd00:12::10") from None
    if addr.ipv4_mapped is not None or addr.is_link_local or addr.is_multicast:
        raise FlagValueError(
            f"{text!r} cannot carry traffic between hosts (IPv4-mapped, link-local or "
            "multicast): give a global or unique-local IPv6 address"
        )
    if addr.is_unspecified or addr.is_loopback:
        raise FlagValueError(f"{text!r} is unspecified or loopback: give the host's own address")
    return addr


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise FlagValueError(f"{text!r} is not a valid regular expression: {e}") from None
    return text


IFNAMSIZ = 16  # the kernel's limit on an interface name, with its NUL


def _iface(text: str) -> str:
    """An interface name, an IPv4 address, or an address with a prefix length (192.0.2.12/24:
    the address is what is matched; the prefix length is accepted and not compared)."""
    text = text.strip()
    if not text:
        raise FlagValueError("expected an interface name or an IPv4 address")
    if "/" in text:
        address, _, plen = text.partition("/")
        try:
            ip = IPv4Address(address)
        except ValueError:
            raise FlagValueError(
                f"{text!r}: {address!r} before the / is not an IPv4 address; give a name "
                "(eth1), an address (192.0.2.12) or an address/length (192.0.2.12/24)"
            ) from None
        if not (plen.isascii() and plen.isdigit()) or not 0 <= int(plen[:3]) <= 32:
            raise FlagValueError(
                f"{text!r}: the prefix length {plen!r} after the / must be a number 0-32"
            )
        return str(ip)
    if "." in text and text.replace(".", "").isdigit():  # all digits and dots: an address
        try:
            return str(IPv4Address(text))
        except ValueError as e:
            raise FlagValueError(f"{text!r} looks like an IPv4 address but is not: {e}") from None
    if len(text.encode()) >= IFNAMSIZ:
        raise FlagValueError(
            f"{text!r} is not an interface name: at most {IFNAMSIZ - 1} bytes (Linux's limit)"
        )
    if (
        text in (".", "..")
        or any(c in text for c in "/:")
        or not text.isprintable()
        or any(c.isspace() for c in text)
    ):
        raise FlagValueError(
            f"{text!r} is not an interface name: no spaces, '/', ':' or control characters"
        )
    return text


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise FlagValueError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise FlagValueError(f"{text!r} must be 0 or more")
    return value


MIN_LEASE_TTL = 5
"""Seconds: the shortest --subnet-lease-ttl (a renewal needs a few round trips to etcd)."""


def _lease_ttl(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise FlagValueError(f"{text!r} is not a whole number of seconds") from None
    if value < MIN_LEASE_TTL:
        raise FlagValueError(f"{text!r} must be at least {MIN_LEASE_TTL} seconds")
    return value


def _pos_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FlagValueError(f"{text!r} is not a number") from None
    if not value > 0:
        raise FlagValueError(f"{text!r} must be more than 0")
    return value


def _port(text: str) -> int:
    value = _nonneg_int(text)
    if value > 65535:
        raise FlagValueError(f"{text!r} is not a TCP port (0-65535)")
    return value


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        host, port = text, "1883"
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FlagValueError(f"{text!r} is not HOST:PORT such as 127.0.0.1:1883")
    return host, int(port)


MQTT_PORT = 1883
MQTTS_PORT = 8883
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")
_URL_USER_RE = re.compile(r"[!-~]{1,128}")  # printable ASCII, no space
_URL_USER_BAD = frozenset("/?#@:")  # would end the user name or the URL's authority


@dataclass(frozen=True)
class MqttBroker:
    """Where `--mqtt-broker` points: HOST:PORT (plain TCP, today's form), mqtt://HOST[:PORT]
    or mqtts://[USER@]HOST[:PORT] (TLS; port 8883 unless given)."""

    host: str
    port: int
    tls: bool | None = None  # None: no scheme given (TLS only if --mqtt-cafile/--mqtt-certfile)
    username: str | None = None

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{host}:{self.port}"


def _mqtt_host(host: str, whole: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(IPv6Address(host[1:-1]))
        except ValueError:
            raise FlagValueError(f"{whole!r}: {host!r} is not an IPv6 address") from None
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
        raise FlagValueError(f"{whole!r}: {host[:64]!r} is not a host name or IPv4 address")
    return host


def _mqtt_broker(text: str) -> MqttBroker:
    text = text.strip()
    tls: bool | None = None
    rest = text
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme.lower() not in ("mqtt", "mqtts"):
            raise FlagValueError(
                f"{text[:80]!r}: scheme {scheme[:16]!r} is not mqtt:// or mqtts://"
            )
        tls = scheme.lower() == "mqtts"
        rest = rest[:-1] if rest.endswith("/") else rest
        if "/" in rest or "?" in rest or "#" in rest:
            raise FlagValueError(f"{text[:80]!r}: no path or query after HOST:PORT")
    username = None
    if "@" in rest:
        if tls is None:
            raise FlagValueError(f"{text[:80]!r}: a user name needs the URL form mqtts://USER@HOST")
        userinfo, _, rest = rest.rpartition("@")
        if ":" in userinfo:
            raise FlagValueError(
                "a password in --mqtt-broker is visible to every user of this host (ps, "
                "/proc/PID/cmdline): give it in FLANNELD_MQTT_PASSWORD (the environment file)"
            )
        if not _URL_USER_RE.fullmatch(userinfo) or _URL_USER_BAD & set(userinfo):
            raise FlagValueError(
                f"{text[:80]!r}: a user name in the URL must be 1-128 printable characters "
                "without spaces or / ? # @ : (give any other with --mqtt-username)"
            )
        username = userinfo
    default_port = MQTTS_PORT if tls else MQTT_PORT
    if rest.startswith("["):
        host, _, tail = rest.partition("]")
        host += "]"
        if tail and not tail.startswith(":"):
            raise FlagValueError(f"{text[:80]!r} is not [IPV6]:PORT")
        port_text = tail[1:] if tail else str(default_port)
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            host, port_text = rest, str(default_port)
    if not host:
        raise FlagValueError(f"{text[:80]!r} has no host; such as 127.0.0.1:1883 or mqtts://host")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text[:6]) < 65536:
        raise FlagValueError(
            f"{text[:80]!r}: port {port_text[:16]!r} is not 1-65535; such as 127.0.0.1:1883"
        )
    return MqttBroker(_mqtt_host(host, text[:80]), int(port_text), tls, username)


def _topic_prefix(text: str) -> str:
    if not text or any(c in text for c in "#+\0") or text.startswith("/"):
        raise FlagValueError(
            f"{text!r} is not an MQTT topic prefix such as overlay (no #, + or leading /)"
        )
    return text.rstrip("/")


def _log_level(text: str) -> str:
    value = text.strip().lower()
    if value not in LOG_LEVELS:
        raise FlagValueError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return value


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise FlagValueError(f"{text!r} is not a boolean (true/false, 1/0, yes/no)")


def _path(text: str) -> Path:
    if not text:
        raise FlagValueError("expected a file path")
    return Path(text)


def _str(text: str) -> str:
    return text


def _checked(parse: Callable[[str], Any], label: str) -> Callable[[str], Any]:
    """Wrap a parser so argparse shows our message (it hides ValueError text otherwise)."""

    def run(text: str) -> Any:
        try:
            return parse(text)
        except FlagValueError as e:
            raise argparse.ArgumentTypeError(f"{e}") from None

    run.__name__ = label
    return run


# --------------------------------------------------------------------------- the flag table


@dataclass(frozen=True)
class Flag:
    name: str  # "--etcd-endpoints"
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None
    repeat: bool = False  # may be given several times; env var is a comma-separated list
    env_split: bool = True  # for a repeatable flag: split its env var on commas
    switch: bool = False  # a boolean switch (--ip-masq); env var is true/false
    shown_default: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return env_name(self.name)


ETCD_FLAGS: tuple[Flag, ...] = (
    Flag("--etcd-endpoints", _endpoints, (DEFAULT_ETCD_ENDPOINT,),
         "comma-separated etcd client URLs, tried in order (failover)", "URLS",
         shown_default=DEFAULT_ETCD_ENDPOINT),
    Flag("--etcd-prefix", _prefix, DEFAULT_PREFIX,
         "etcd key prefix holding <prefix>/config and <prefix>/subnets/", "PREFIX"),
    Flag("--etcd-keyfile", _path, None, "TLS client key file for etcd", "FILE"),
    Flag("--etcd-certfile", _path, None, "TLS client certificate file for etcd", "FILE"),
    Flag("--etcd-cafile", _path, None, "CA certificate file that signs etcd's server cert", "FILE"),
    Flag("--etcd-username", _str, None, "etcd user name (etcd auth)", "NAME"),
    Flag("--etcd-password", _str, None, "etcd password (etcd auth)", "PASSWORD"),
    Flag("--etcd-timeout", _pos_float, 5.0,
         "seconds allowed for each etcd request (ours, flannel has no such flag)", "SECONDS"),
)  # fmt: skip

DAEMON_FLAGS: tuple[Flag, ...] = (
    Flag("--iface", _iface, (),
         "interface (name, IPv4 or IPv6 address, or address/length such as 192.0.2.12/24) for "
         "traffic between hosts; repeat to give candidates, the first that exists wins; "
         "loopback and link-local addresses are refused", "NAME|IP", repeat=True,
         shown_default="none"),
    Flag("--iface-regex", _regex, (),
         "regular expression matched against interface names and addresses, tried after "
         "--iface; repeatable (its env var holds one regex)", "REGEX", repeat=True,
         env_split=False, shown_default="none"),
    Flag("--iface-can-reach", _ip_any, None,
         "use the interface of the route to this IPv4 or IPv6 address (when no "
         "--iface/--iface-regex)",
         "IP"),
    Flag("--public-ip", _ipv4, None,
         "IPv4 address other hosts use to reach this one (default: the interface's first "
         "IPv4 address)", "IP"),
    Flag("--public-ipv6", _ipv6, None,
         "IPv6 address other hosts use to reach this one with EnableIPv6 (default: the "
         "interface's first global IPv6 address)", "IPV6"),
    Flag("--subnet-file", _path, DEFAULT_SUBNET_FILE,
         "where to write the subnet.env that the flannel CNI plugin reads", "FILE"),
    Flag("--subnet-lease-renew-margin", _nonneg_int, 60,
         "renew the lease this many minutes before it expires (when not below the lease TTL: "
         "at half the TTL)", "MINUTES"),
    Flag("--subnet-lease-ttl", _lease_ttl, 86400,
         "seconds a lease lives without renewal; for labs and tests that need a real expiry in "
         f"seconds, not for production (ours; at least {MIN_LEASE_TTL})", "SECONDS"),
    Flag("--ip-masq", _bool, False,
         "masquerade traffic leaving the overlay network (nat chain FLANNEL-POSTRTG from "
         "POSTROUTING, or chain postrtg of the nftables table)", switch=True),
    Flag("--ip-masq-fully-random-disable", _bool, False,
         "masquerade without --random-fully / fully-random (also used without it when the "
         "iptables or nft in use does not support it; a warning says so)", switch=True),
    Flag("--iptables-forward-rules", _bool, True,
         "accept forwarding to and from the overlay network (chain FLANNEL-FWD from FORWARD, "
         "or chain forward of the nftables table), so a FORWARD policy of DROP does not stop "
         "overlay traffic; independent of --ip-masq; =false leaves FORWARD alone",
         switch=True),
    Flag("--iptables-resync", _nonneg_int, 5,
         "seconds between checks that the iptables/nftables rules (and the blackhole route) "
         "are still in place; 0: set them once", "SECONDS"),
    Flag("--ip-blackhole-route", _bool, False,
         "add a blackhole route for our own subnet, so traffic to its unassigned addresses is "
         "dropped here instead of following the default route (for CNI setups without a "
         "bridge covering the subnet); re-added every --iptables-resync seconds",
         switch=True),
    Flag("--healthz-ip", _ip_any, IPv4Address("127.0.0.1"),
         "address the health server listens on, IPv4 or IPv6 (flannel's default is 0.0.0.0; "
         "ours is loopback; :: listens on every address)", "IP"),
    Flag("--healthz-port", _port, 0,
         "port of the health server (/healthz, /readyz, /metrics); 0 turns it off", "PORT"),
    Flag("--metrics", _bool, False,
         "serve Prometheus metrics at /metrics on the health server (ours)", switch=True),
    Flag("--mqtt-broker", _mqtt_broker, None,
         "publish lease and peer events to this MQTT broker: HOST:PORT, mqtt://HOST[:PORT], or "
         "mqtts://[USER@]HOST[:PORT] for TLS (port 8883 by default); never a password here "
         "(ours; off by default)", "URL", shown_default="off"),
    Flag("--mqtt-username", _str, None,
         "MQTT user name (or USER@ in an mqtts:// URL)", "NAME"),
    Flag("--mqtt-password", _str, None,
         "MQTT password; give it in the environment file as FLANNELD_MQTT_PASSWORD, not on "
         "the command line", "PASSWORD"),
    Flag("--mqtt-cafile", _path, None,
         "CA certificate file that signs the broker's certificate (TLS; default: the system's "
         "CAs)", "FILE"),
    Flag("--mqtt-certfile", _path, None, "TLS client certificate file for the broker", "FILE"),
    Flag("--mqtt-keyfile", _path, None, "TLS client key file for the broker", "FILE"),
    Flag("--mqtt-topic-prefix", _topic_prefix, "overlay",
         "events go to <prefix>/<public-ip>/events (ours)", "PREFIX"),
    Flag("--log-level", _log_level, "info",
         f"log verbosity: {', '.join(LOG_LEVELS)} (ours)", "LEVEL"),
    Flag("--resync-period", _pos_float, 60.0,
         "seconds between full reconciles of the data path with all leases (ours)", "SECONDS"),
)  # fmt: skip


def add_flags(parser: argparse._ActionsContainer, flags: Sequence[Flag]) -> None:
    for f in flags:
        shown = f.shown_default
        if shown is None and f.switch:
            shown = "on" if f.default else "off"
        elif shown is None:
            shown = "none" if f.default is None else str(f.default)
        text = f"{f.help} (default: {shown}; env {f.env})"
        if f.switch:  # `--flag` alone is true; `--flag=false` as Go's flag package takes it
            parser.add_argument(f.name, nargs="?", const=True, default=None, metavar="BOOL",
                                type=_checked(f.parse, "BOOL"), help=text)  # fmt: skip
        else:
            parser.add_argument(
                f.name,
                type=_checked(f.parse, f.metavar or "value"),
                action="append" if f.repeat else "store",
                default=None,
                metavar=f.metavar,
                help=text,
            )


def resolve(
    parser: argparse.ArgumentParser,
    ns: argparse.Namespace,
    flags: Sequence[Flag],
    environ: Mapping[str, str],
) -> dict[str, Any]:
    """Command line, else environment, else default; a bad env value is a parser error (exit 2)."""
    out: dict[str, Any] = {}
    for f in flags:
        value = getattr(ns, f.dest, None)
        if value is not None:
            out[f.dest] = tuple(value) if f.repeat else value
            continue
        raw = environ.get(f.env)
        if raw is None:
            out[f.dest] = f.default
            continue
        try:
            if f.repeat and f.env_split:
                out[f.dest] = tuple(f.parse(x) for x in raw.split(",") if x.strip())
            elif f.repeat:
                out[f.dest] = (f.parse(raw),)
            else:
                out[f.dest] = f.parse(raw)
        except FlagValueError as e:
            parser.error(f"environment variable {f.env}={raw!r}: {e}")
    return out


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class EtcdFlags:
    endpoints: tuple[str, ...]
    prefix: str
    keyfile: Path | None
    certfile: Path | None
    cafile: Path | None
    username: str | None
    password: str | None
    timeout: float

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> EtcdFlags:
        return cls(
            endpoints=v["etcd_endpoints"],
            prefix=v["etcd_prefix"],
            keyfile=v["etcd_keyfile"],
            certfile=v["etcd_certfile"],
            cafile=v["etcd_cafile"],
            username=v["etcd_username"],
            password=v["etcd_password"],
            timeout=v["etcd_timeout"],
        )

    def check(self) -> str | None:
        """A problem a user must fix before we connect, or None."""
        if (self.certfile is None) != (self.keyfile is None):
            return "--etcd-certfile and --etcd-keyfile must be given together"
        for name, path in (
            ("--etcd-keyfile", self.keyfile),
            ("--etcd-certfile", self.certfile),
            ("--etcd-cafile", self.cafile),
        ):
            if path is not None and not path.is_file():
                return f"{name} {str(path)!r}: no such file"
        if (self.username is None) != (self.password is None):
            return "--etcd-username and --etcd-password must be given together"
        return None

    def registry_options(self) -> Any:
        """The subnetmgr EtcdOptions for these flags (imported late: aetcd is heavy)."""
        from subnetmgr.registry import EtcdOptions

        return EtcdOptions(
            endpoints=self.endpoints,
            prefix=self.prefix,
            username=self.username,
            password=self.password,
            ca_file=str(self.cafile) if self.cafile else None,
            cert_file=str(self.certfile) if self.certfile else None,
            key_file=str(self.keyfile) if self.keyfile else None,
            timeout=self.timeout,
        )


@dataclass(frozen=True)
class Options:
    etcd: EtcdFlags
    iface: tuple[str, ...]
    iface_regex: tuple[str, ...]
    iface_can_reach: IPv4Address | IPv6Address | None
    public_ip: IPv4Address | None
    public_ipv6: IPv6Address | None
    subnet_file: Path
    subnet_lease_renew_margin: int
    subnet_lease_ttl: int
    ip_masq: bool
    ip_masq_fully_random_disable: bool
    iptables_forward_rules: bool
    iptables_resync: int
    ip_blackhole_route: bool
    healthz_ip: IPv4Address | IPv6Address
    healthz_port: int
    metrics: bool
    mqtt_broker: MqttBroker | None
    mqtt_username: str | None
    mqtt_password: str | None
    mqtt_cafile: Path | None
    mqtt_certfile: Path | None
    mqtt_keyfile: Path | None
    mqtt_topic_prefix: str
    log_level: str
    resync_period: float

    warnings: tuple[str, ...] = ()
    """Things the operator should change (a password on the command line or in clear text);
    overlayd logs them at WARNING once logging is set up."""

    @property
    def log_level_number(self) -> int:
        return int(getattr(logging, self.log_level.upper()))

    @property
    def mqtt(self) -> MqttSettings | None:
        """Everything the MQTT publisher needs, or None when events are off."""
        b = self.mqtt_broker
        if b is None:
            return None
        tls = b.tls if b.tls is not None else bool(self.mqtt_cafile or self.mqtt_certfile)
        return MqttSettings(
            host=b.host,
            port=b.port,
            tls=tls,
            username=self.mqtt_username or b.username,
            password=self.mqtt_password,
            cafile=self.mqtt_cafile,
            certfile=self.mqtt_certfile,
            keyfile=self.mqtt_keyfile,
        )

    def check_mqtt(self) -> str | None:
        """A problem with the MQTT flags a user must fix, or None."""
        b = self.mqtt_broker
        tls_files = self.mqtt_cafile or self.mqtt_certfile or self.mqtt_keyfile
        if b is None:
            given = [f for f, v in (("--mqtt-username", self.mqtt_username),
                     ("--mqtt-password", self.mqtt_password), ("--mqtt-cafile", self.mqtt_cafile),
                     ("--mqtt-certfile", self.mqtt_certfile),
                     ("--mqtt-keyfile", self.mqtt_keyfile)) if v is not None]  # fmt: skip
            return f"{', '.join(given)} without --mqtt-broker" if given else None
        if b.tls is False and tls_files:
            return (
                "--mqtt-cafile/--mqtt-certfile/--mqtt-keyfile need TLS: use mqtts:// in "
                "--mqtt-broker"
            )
        if b.username and self.mqtt_username and b.username != self.mqtt_username:
            return (
                f"--mqtt-broker names user {b.username!r} and --mqtt-username "
                f"{self.mqtt_username!r}: give one"
            )
        if self.mqtt_password is not None and not (self.mqtt_username or b.username):
            return "--mqtt-password needs a user name (--mqtt-username or mqtts://USER@HOST)"
        if (self.mqtt_certfile is None) != (self.mqtt_keyfile is None):
            return "--mqtt-certfile and --mqtt-keyfile must be given together"
        settings = self.mqtt
        if settings is not None and settings.tls:
            try:
                settings.ssl_context()
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                return f"MQTT TLS files: {e}"
        return None


@dataclass(frozen=True)
class MqttSettings:
    """The broker, its TLS files and credentials, as the publisher uses them."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """A client context verifying the broker (its name or IP against the certificate) with
        --mqtt-cafile or the system's CAs, presenting the client certificate when given.
        OSError/ssl.SSLError on a missing or unreadable file, ValueError-like on bad PEM."""
        for name, path in (("--mqtt-cafile", self.cafile), ("--mqtt-certfile", self.certfile),
                           ("--mqtt-keyfile", self.keyfile)):  # fmt: skip
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{name} {str(path)!r}: no such file")
        context = ssl.create_default_context(
            cafile=str(self.cafile) if self.cafile is not None else None
        )
        if self.certfile is not None:
            context.load_cert_chain(
                str(self.certfile), str(self.keyfile) if self.keyfile is not None else None
            )
        return context


def secret_warnings(
    ns: argparse.Namespace, etcd: EtcdFlags, mqtt: MqttSettings | None = None
) -> tuple[str, ...]:
    """Warnings for secrets on the command line (every user sees them in `ps`) and for
    passwords that would travel in clear text."""
    out = []
    for dest, env in (("etcd_password", "FLANNELD_ETCD_PASSWORD"),
                      ("mqtt_password", "FLANNELD_MQTT_PASSWORD")):  # fmt: skip
        if getattr(ns, dest, None) is not None:
            flag = "--" + dest.replace("_", "-")
            out.append(
                f"{flag} on the command line is visible to every user of this host (ps, "
                f"/proc/PID/cmdline): put {env}=... in the environment file /etc/default/overlayd "
                "(mode 0600; `overlayctl install-systemd --env` writes it) instead"
            )
    plain = [e for e in etcd.endpoints if e.lower().startswith("http://")]
    if etcd.password is not None and plain:
        out.append(
            f"the etcd password is sent in clear text to {', '.join(plain)}: anyone on the path "
            "can read it; use https:// endpoints (--etcd-cafile)"
        )
    if mqtt is not None and mqtt.password is not None and not mqtt.tls:
        out.append(
            f"the MQTT password is sent in clear text to {mqtt.host}:{mqtt.port}: use "
            "mqtts:// in --mqtt-broker"
        )
    return tuple(out)


DESCRIPTION = """\
overlayd: one per host. Leases a subnet of the cluster network from etcd (flannel's layout),
sets up the data path named by the network config's Backend.Type, writes subnet.env for the
flannel CNI plugin and keeps the lease and the routes to every other host up to date.

Every flag can also be set with the environment variable shown (FLANNELD_<FLAG>); the command
line wins. FLANNELD_IFACE takes a comma-separated list. Bad values exit with code 2.
A switch (--ip-masq, --iptables-forward-rules, ...) alone means true; --switch=false (or
FLANNELD_<SWITCH>=false) turns it off.
SIGTERM/SIGINT stop the daemon and leave devices, routes and iptables rules in place (exit 0).
"""


def package_version() -> str:
    """The installed overlay package's version ("unknown" when run from a bare source tree)."""
    try:
        return importlib.metadata.version("overlay")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlayd",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the version and exit")  # fmt: skip
    etcd = parser.add_argument_group("etcd")
    add_flags(etcd, ETCD_FLAGS)
    daemon = parser.add_argument_group("daemon")
    add_flags(daemon, DAEMON_FLAGS)
    return parser


def parse_options(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Options:
    """Parse flags and env; exits 2 with a clear message on a bad value (argparse's way)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    values = resolve(parser, ns, ETCD_FLAGS + DAEMON_FLAGS, env)
    etcd = EtcdFlags.from_values(values)
    problem = etcd.check()
    if problem:
        parser.error(problem)
    kwargs = {f.dest: values[f.dest] for f in DAEMON_FLAGS}
    opts = Options(etcd=etcd, **kwargs)
    problem = opts.check_mqtt()
    if problem:
        parser.error(problem)
    return dataclasses.replace(opts, warnings=secret_warnings(ns, etcd, opts.mqtt))
