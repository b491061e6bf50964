"""Flags and environment of `overlayd` (and the etcd flags shared with `overlayctl`).

Every flag keeps flanneld's name and can also come from `FLANNELD_<UPPER_SNAKE>`, e.g.
`--etcd-endpoints` from `FLANNELD_ETCD_ENDPOINTS`. A flag on the command line wins over the
environment, which wins over the default. A repeatable flag (`--iface`) takes a comma-separated
list from its environment variable. A bad value, from either place, is an argparse error:
a message naming the flag (or variable) and the value, and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
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


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise FlagValueError(f"{text!r} is not a valid regular expression: {e}") from None
    return text


def _iface(text: str) -> str:
    text = text.strip()
    if not text:
        raise FlagValueError("expected an interface name or an IPv4 address")
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
         "interface (name or IPv4 address) for traffic between hosts; repeat to give "
         "candidates, the first that exists wins", "NAME|IP", repeat=True,
         shown_default="none"),
    Flag("--iface-regex", _regex, (),
         "regular expression matched against interface names and IPv4 addresses, tried after "
         "--iface; repeatable (its env var holds one regex)", "REGEX", repeat=True,
         env_split=False, shown_default="none"),
    Flag("--iface-can-reach", _ipv4, None,
         "use the interface of the route to this IPv4 address (when no --iface/--iface-regex)",
         "IP"),
    Flag("--public-ip", _ipv4, None,
         "IPv4 address other hosts use to reach this one (default: the interface's first "
         "IPv4 address)", "IP"),
    Flag("--subnet-file", _path, DEFAULT_SUBNET_FILE,
         "where to write the subnet.env that the flannel CNI plugin reads", "FILE"),
    Flag("--subnet-lease-renew-margin", _nonneg_int, 60,
         "renew the lease this many minutes before it expires (when not below the lease TTL: "
         "at half the TTL)", "MINUTES"),
    Flag("--subnet-lease-ttl", _lease_ttl, 86400,
         "seconds a lease lives without renewal; for labs and tests that need a real expiry in "
         f"seconds, not for production (ours; at least {MIN_LEASE_TTL})", "SECONDS"),
    Flag("--ip-masq", _bool, False,
         "install iptables rules that masquerade traffic leaving the overlay network and "
         "accept forwarding within it", switch=True),
    Flag("--iptables-resync", _nonneg_int, 5,
         "seconds between checks that the iptables rules are still in place", "SECONDS"),
    Flag("--healthz-ip", _ipv4, IPv4Address("127.0.0.1"),
         "address the health server listens on (flannel's default is 0.0.0.0; ours is "
         "loopback)", "IP"),
    Flag("--healthz-port", _port, 0,
         "port of the health server (/healthz, /readyz, /metrics); 0 turns it off", "PORT"),
    Flag("--metrics", _bool, False,
         "serve Prometheus metrics at /metrics on the health server (ours)", switch=True),
    Flag("--mqtt-broker", _host_port, None,
         "publish lease and peer events to this MQTT broker, HOST:PORT (ours; off by default)",
         "HOST:PORT", shown_default="off"),
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
        if shown is None:
            shown = "off" if f.switch else ("none" if f.default is None else str(f.default))
        text = f"{f.help} (default: {shown}; env {f.env})"
        if f.switch:
            parser.add_argument(f.name, action="store_const", const=True, default=None, help=text)
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
    iface_can_reach: IPv4Address | None
    public_ip: IPv4Address | None
    subnet_file: Path
    subnet_lease_renew_margin: int
    subnet_lease_ttl: int
    ip_masq: bool
    iptables_resync: int
    healthz_ip: IPv4Address
    healthz_port: int
    metrics: bool
    mqtt_broker: tuple[str, int] | None
    mqtt_topic_prefix: str
    log_level: str
    resync_period: float

    @property
    def log_level_number(self) -> int:
        return int(getattr(logging, self.log_level.upper()))


DESCRIPTION = """\
overlayd: one per host. Leases a subnet of the cluster network from etcd (flannel's layout),
sets up the data path named by the network config's Backend.Type, writes subnet.env for the
flannel CNI plugin and keeps the lease and the routes to every other host up to date.

Every flag can also be set with the environment variable shown (FLANNELD_<FLAG>); the command
line wins. FLANNELD_IFACE takes a comma-separated list. Bad values exit with code 2.
SIGTERM/SIGINT stop the daemon and leave devices, routes and iptables rules in place (exit 0).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlayd",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    return Options(etcd=etcd, **kwargs)
