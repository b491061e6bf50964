"""overlayctl: look at and change what overlayd keeps in etcd.

    overlayctl config set '{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}'
    overlayctl config set @network.json
    overlayctl config get
    overlayctl leases [--json] [--renew-margin MINUTES]
    overlayctl leases revoke 10.1.7.0/24 [--force]
    overlayctl reserve 10.1.7.0/24 192.168.1.20
    overlayctl unreserve 10.1.7.0/24

Same --etcd-* flags and FLANNELD_ETCD_* variables as overlayd. Exit codes: 0 ok, 1 failed
(etcd unreachable, nothing to unreserve, ...), 2 bad input (nothing is written).

Other packages add subcommands: each module in PLUGIN_MODULES that can be imported exposes
`register(subparsers) -> None`, which adds a subparser with `set_defaults(func=...)`, where
`func(args) -> int`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from overlay.options import (
    ETCD_FLAGS,
    EtcdFlags,
    _nonneg_int,
    add_flags,
    package_version,
    resolve,
    secret_warnings,
)
from subnetmgr.model import (
    ConfigError,
    Lease,
    LeaseAttrs,
    MalformedLease,
    NetworkConfig,
    printable,
)
from subnetmgr.validate import Ignored, select_leases, unusable_public_ip

log = logging.getLogger("overlayctl")

PLUGIN_MODULES: tuple[str, ...] = (
    "integration.cli",
    "cni.install",
    "overlay.install",
    "overlay.events_cli",
    "overlay.trace",
    "overlay.status",
    "overlay.doctor",
)


class UsageError(Exception):
    """Bad input from the user: exit 2, nothing written."""


class CommandError(Exception):
    """The command could not be done: exit 1."""


# ---------------------------------------------------------------------- commands


def _config_bytes(arg: str) -> bytes:
    """The config exactly as given: a file's bytes, or the argument's (bytes that are not UTF-8
    come back as they were, so that they are refused as overlayd would refuse them)."""
    if arg.startswith("@"):
        path = Path(arg[1:])
        try:
            return path.read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
    return os.fsencode(arg)


async def cmd_config_set(registry: Any, args: argparse.Namespace) -> int:
    # The daemon's own parser and limits (NetworkConfig.from_json): what it would refuse is
    # refused here, with the same message.
    text = _config_bytes(args.config).strip()
    try:
        config = NetworkConfig.from_json(text)
    except ConfigError as e:
        raise UsageError(f"invalid network config, nothing written: {e}") from None
    for warning in config.warnings:
        print(f"overlayctl: warning: {warning}", file=sys.stderr)
    await registry.put_config_text(text)
    how = " (no Backend given: default)" if config.backend_defaulted else ""
    print(
        f"wrote {args.etcd.prefix}/config: network {config.network}, "
        f"subnets /{config.subnet_len}, backend {config.backend_type}{how}"
    )
    return 0


async def cmd_config_get(registry: Any, args: argparse.Namespace) -> int:
    text = await registry.get_config_text()
    if text is None:
        raise CommandError(
            f"no network config at {args.etcd.prefix}/config; write one with "
            '`overlayctl config set \'{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}\'`'
        )
    print(text)
    return 0


RENEW_GRACE = 300
"""Seconds a host may be late with its renewal (etcd briefly unreachable, a restart) before its
lease looks dead."""


def looks_dead(seconds_left: float | None, renew_margin: float) -> bool:
    """Whether a lease's host missed its renewal: overlayd (like flanneld) renews its lease
    once `renew_margin` seconds are left on it (--subnet-lease-renew-margin), so a lease with
    less than that left, minus RENEW_GRACE, was not renewed when it should have been.
    A reservation (None) never looks dead."""
    return seconds_left is not None and seconds_left < renew_margin - RENEW_GRACE


def _lease_row(lease: Lease, now: float, renew_margin: float = 3600.0) -> dict[str, Any]:
    data = lease.attrs.backend_data or {}
    ttl = None if lease.expiration is None else max(0, int(lease.expiration - now))
    mac = data.get("VtepMAC")
    return {
        "subnet": str(lease.subnet),
        "public_ip": str(lease.attrs.public_ip),
        "backend": lease.attrs.backend_type or "udp",
        "vtep_mac": mac if isinstance(mac, str) and len(mac) <= 64 else None,
        "ttl": ttl,
        "reserved": lease.reserved,
        "key": lease.key,
        "ignored": None,
        "detail": None,
        "looks_dead": looks_dead(ttl, renew_margin),
    }


def _ignored_row(ignored: Ignored, now: float, renew_margin: float = 3600.0) -> dict[str, Any]:
    if ignored.lease is not None:
        row = _lease_row(ignored.lease, now, renew_margin)
    else:  # it did not decode: only its key is known
        row = {"subnet": None, "public_ip": None, "backend": None, "vtep_mac": None,
               "ttl": None, "reserved": None, "key": ignored.key, "looks_dead": False}  # fmt: skip
    row["ignored"] = ignored.reason
    row["detail"] = ignored.detail
    return row


def _human_ttl(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _status(row: Mapping[str, Any]) -> str:
    if row["ignored"]:
        return f"ignored: {row['ignored']}"
    return "looks dead" if row.get("looks_dead") else "ok"


def render_leases_table(rows: Sequence[Mapping[str, Any]], renew_margin: float = 3600.0) -> str:
    """One line per key; an ignored one says why (`ignored: outside_network`), with the details
    listed under the table; a lease whose host missed its renewal says `looks dead`."""
    header = ("SUBNET", "PUBLIC IP", "BACKEND", "VTEP MAC", "TTL", "RESERVED", "STATUS")
    body = [
        (
            r["subnet"] or printable(f"key {r['key']}", 60),
            r["public_ip"] or "-",
            r["backend"] or "-",
            printable(r["vtep_mac"] or "-", 60),
            _human_ttl(r["ttl"]),
            "-" if r["reserved"] is None else "yes" if r["reserved"] else "no",
            _status(r),
        )
        for r in rows
    ]
    notes = [f"  {printable(r['key'])}: {printable(r['detail'], 200)}"
             for r in rows if r["ignored"]]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=False)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
             for row in (header, *body)]  # fmt: skip
    if notes:
        lines += ["", "ignored by overlayd (the data path does not use them):", *notes]
    if any(r.get("looks_dead") for r in rows):
        lines += [
            "",
            f"looks dead: less than {_human_ttl(int(renew_margin - RENEW_GRACE))} left on its "
            f"etcd lease, but a live host renews with {_human_ttl(int(renew_margin))} left "
            "(--renew-margin); free the subnet with `overlayctl leases revoke SUBNET`",
        ]
    return "\n".join(lines)


async def cmd_leases(registry: Any, args: argparse.Namespace) -> int:
    """Every key under <prefix>/subnets/, the ones overlayd ignores with the reason: those that
    do not decode, and (when the config is valid) those that do not fit the network, checked as
    overlayd checks them (subnetmgr.validate; without "overlaps_own", which only a host knows)."""
    registry.ignored.quiet = True  # shown in the output instead of logged
    leases, _revision = await registry.list_leases()
    config = None
    text, _ = await registry.get_config_value()
    if text is not None:
        try:
            config = NetworkConfig.from_json(text)
        except ConfigError as e:
            print(f"overlayctl: {e}; leases are not checked against it", file=sys.stderr)
    now = time.time()
    selection = select_leases(config, leases)
    by_key = {lease.key: lease for lease in leases}
    ignored = dict(registry.ignored.current)
    for key, (reason, detail) in selection.ignored.items():
        lease = by_key[key]
        ignored[key] = Ignored(key, reason, detail, lease.create_revision, lease)
    valid = sorted(selection.valid.values(), key=lambda x: x.subnet)
    margin = args.renew_margin * 60.0
    rows = [_lease_row(lease, now, margin) for lease in valid]
    rows += [_ignored_row(ignored[key], now, margin) for key in sorted(ignored)]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no leases under {args.etcd.prefix}/subnets/")
    else:
        print(render_leases_table(rows, margin))
    return 0


def _whose(value: bytes) -> str:
    """Whose lease a stored value names, for messages: PublicIP, backend, VtepMAC."""
    try:
        attrs = LeaseAttrs.from_json(value)
    except MalformedLease as e:
        return f"a malformed value ({printable(str(e), 120)})"
    data = attrs.backend_data or {}
    mac = data.get("VtepMAC")
    parts = [f"backend {attrs.backend_type or 'udp'}"]
    if isinstance(mac, str):
        parts.append(f"VtepMAC {printable(mac, 40)}")
    return f"{attrs.public_ip} ({', '.join(parts)})"


async def cmd_leases_revoke(registry: Any, args: argparse.Namespace) -> int:
    """Delete a dead host's lease key and revoke its etcd lease; refuses a lease whose host
    renewed it on time (see looks_dead) unless --force."""
    subnet = _subnet_arg(args.subnet)
    record = await registry.inspect_key(subnet)
    if record is None:
        raise CommandError(f"no lease for {subnet} (see `overlayctl leases`)")
    whose = _whose(record.value)
    if record.lease_id == 0:
        raise CommandError(
            f"{subnet} is a reservation for {whose}, not a lease: it never expires; "
            f"remove it with `overlayctl unreserve {subnet}`"
        )
    margin = args.renew_margin * 60.0
    left, granted = record.ttl, record.granted_ttl
    if left < 0:
        clock = "its etcd lease has just expired"
    else:
        clock = (
            f"renewed {_human_ttl(max(granted - left, 0))} ago for {_human_ttl(granted)}, "
            f"{_human_ttl(left)} left"
        )
    if left >= 0 and not looks_dead(left, margin) and not args.force:
        raise CommandError(
            f"refusing to revoke {subnet}, the lease of {whose}: {clock}, and a live host "
            f"renews with {_human_ttl(int(margin))} left (--renew-margin), so its host looks "
            "alive. Stop that host's overlayd first and wait, or pass --force (a running "
            "host then takes a lease again at once)"
        )
    if not await registry.revoke_key(record):
        raise CommandError(
            f"{subnet} changed while revoking it (renewed or rewritten): nothing deleted; "
            "look again with `overlayctl leases`"
        )
    forced = " (--force)" if args.force and not looks_dead(left, margin) else ""
    print(f"revoked {subnet}{forced}: it was the lease of {whose}, {clock}")
    print("the other hosts remove its routes as they see the key deleted")
    return 0


def _minutes(text: str) -> int:
    try:
        return _nonneg_int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _subnet_arg(text: str) -> IPv4Network:
    try:
        return IPv4Network(text, strict=True)
    except ValueError as e:
        raise UsageError(
            f"subnet {text!r} is not an IPv4 network such as 10.1.7.0/24: {e}"
        ) from None


async def cmd_reserve(registry: Any, args: argparse.Namespace) -> int:
    subnet = _subnet_arg(args.subnet)
    try:
        public_ip = IPv4Address(args.public_ip)
    except ValueError:
        raise UsageError(
            f"public IP {args.public_ip!r} is not an IPv4 address such as 192.168.1.20"
        ) from None
    why = unusable_public_ip(public_ip)
    if why is not None:
        raise UsageError(f"public IP {public_ip} is {why}: overlayd would ignore the reservation")
    text = await registry.get_config_text()
    if text is not None:
        try:
            config = NetworkConfig.from_json(text)
        except ConfigError:
            config = None
        if config is not None and not config.contains(subnet):
            raise UsageError(
                f"subnet {subnet} does not fit the network config ({config.describe()})"
            )
    await registry.reserve(subnet, public_ip)
    print(f"reserved {subnet} for {public_ip}")
    return 0


async def cmd_unreserve(registry: Any, args: argparse.Namespace) -> int:
    subnet = _subnet_arg(args.subnet)
    if not await registry.unreserve(subnet):
        raise CommandError(f"no reservation for {subnet} (see `overlayctl leases`)")
    print(f"unreserved {subnet}")
    return 0


# ---------------------------------------------------------------------- plumbing

EtcdCommand = Callable[[Any, argparse.Namespace], Coroutine[Any, Any, int]]


def _etcd_command(command: EtcdCommand) -> Callable[[argparse.Namespace], int]:
    """Wrap an async command that needs a registry into `func(args) -> int`."""

    def run(args: argparse.Namespace) -> int:
        return asyncio.run(_with_registry(command, args))

    return run


async def _with_registry(command: EtcdCommand, args: argparse.Namespace) -> int:
    from subnetmgr.registry import EtcdRegistry, RegistryError

    etcd: EtcdFlags = args.etcd
    try:
        async with asyncio.timeout(etcd.timeout * 4):
            registry = await EtcdRegistry.connect(etcd.registry_options())
        try:
            async with asyncio.timeout(etcd.timeout * 4):
                return await command(registry, args)
        finally:
            await registry.close()
    except RegistryError as e:
        raise CommandError(f"etcd: {e}") from None
    except TimeoutError:
        raise CommandError(
            f"etcd at {','.join(etcd.endpoints)} did not answer in time; check --etcd-endpoints"
        ) from None


def load_plugins(subparsers: Any, modules: Sequence[str] = PLUGIN_MODULES) -> list[str]:
    """Call `register(subparsers)` of each importable module; returns those registered."""
    loaded: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                continue  # the module (or its package) is not part of this build
            log.warning("subcommands from %s unavailable: %s", name, e)
            continue
        except Exception as e:  # a broken plugin must not break overlayctl
            log.warning("subcommands from %s unavailable: %s", name, e)
            continue
        register = getattr(module, "register", None)
        if register is None:
            log.warning("%s has no register(subparsers); skipped", name)
            continue
        register(subparsers)
        loaded.append(name)
    return loaded


def build_parser(plugin_modules: Sequence[str] = PLUGIN_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlayctl",
        description="Look at and change overlay's network config, leases and reservations "
        "in etcd. Every --etcd-* flag can also come from FLANNELD_ETCD_*.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the version and exit")  # fmt: skip
    etcd = parser.add_argument_group("etcd")
    add_flags(etcd, ETCD_FLAGS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = sub.add_parser("config", help="get or set the network config",
                            description="Get or set <prefix>/config.")  # fmt: skip
    csub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cset = csub.add_parser(
        "set",
        help="validate and write the network config",
        description="Validate JSON as a flannel network config and write it to "
        "<prefix>/config. An invalid config is refused (exit 2) and nothing is written.",
    )
    cset.add_argument("config", metavar="JSON|@FILE",
                      help="the config as JSON, or @path to read it from a file")  # fmt: skip
    cset.set_defaults(func=_etcd_command(cmd_config_set))
    cget = csub.add_parser("get", help="print the network config",
                           description="Print <prefix>/config as stored.")  # fmt: skip
    cget.set_defaults(func=_etcd_command(cmd_config_get))

    margin_help = (
        "the hosts' --subnet-lease-renew-margin: a live host renews its lease when this many "
        "minutes are left on it (default %(default)s, as overlayd's and flanneld's)"
    )
    leases = sub.add_parser(
        "leases",
        help="list subnet leases, or revoke a dead host's lease",
        description="List every lease: subnet, public IP, backend, VTEP MAC, TTL left, and "
        "whether it is a reservation (no TTL). Keys that overlayd ignores (malformed, or not "
        "fitting the network config) are listed too, with the reason (STATUS; --json: "
        '"ignored" and "detail"). A lease whose host looks dead says so (STATUS "looks '
        'dead"; --json: "looks_dead"): it has less than --renew-margin minus '
        f"{RENEW_GRACE // 60} minutes left on its etcd lease, so its host missed the renewal "
        "a live host makes with --renew-margin left.",
    )
    leases.add_argument("--json", action="store_true", help="print JSON instead of a table")
    leases.add_argument("--renew-margin", type=_minutes, default=60, metavar="MINUTES",
                        help=margin_help)  # fmt: skip
    leases.set_defaults(func=_etcd_command(cmd_leases))
    lsub = leases.add_subparsers(dest="leases_command", metavar="ACTION")
    revoke = lsub.add_parser(
        "revoke",
        help="free a dead host's subnet",
        description="Delete the lease key of SUBNET and revoke its etcd lease, so that the "
        "other hosts drop its routes and the subnet can be allocated again. Says whose lease "
        "it was (PublicIP, backend, VtepMAC). Refuses (exit 1) a lease its host renewed on "
        "time: one with at least --renew-margin minus "
        f"{RENEW_GRACE // 60} minutes left (etcd's LeaseTimeToLive: seconds left of the TTL "
        "granted at the last renewal), unless --force. Refuses a reservation (see "
        "unreserve). A key renewed between the check and the delete is left alone.",
    )
    revoke.add_argument("subnet", metavar="SUBNET", help="e.g. 10.1.7.0/24")
    revoke.add_argument("--force", action="store_true",
                        help="revoke even a lease whose host renewed it on time")  # fmt: skip
    # SUPPRESS: `leases --renew-margin N revoke` keeps N (a subparser default would replace it).
    revoke.add_argument(
        "--renew-margin",
        type=_minutes,
        default=argparse.SUPPRESS,
        metavar="MINUTES",
        help=margin_help.replace("%(default)s", "60"),
    )
    revoke.set_defaults(func=_etcd_command(cmd_leases_revoke))

    reserve = sub.add_parser(
        "reserve",
        help="reserve a subnet for a host",
        description="Write a lease without a TTL: SUBNET stays with PUBLIC_IP until unreserved.",
    )
    reserve.add_argument("subnet", metavar="SUBNET", help="e.g. 10.1.7.0/24")
    reserve.add_argument("public_ip", metavar="PUBLIC_IP", help="the host's public IPv4 address")
    reserve.set_defaults(func=_etcd_command(cmd_reserve))

    unreserve = sub.add_parser("unreserve", help="remove a reservation",
                               description="Delete the reservation of SUBNET.")  # fmt: skip
    unreserve.add_argument("subnet", metavar="SUBNET", help="e.g. 10.1.7.0/24")
    unreserve.set_defaults(func=_etcd_command(cmd_unreserve))

    load_plugins(sub, plugin_modules)
    return parser


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    plugin_modules: Sequence[str] = PLUGIN_MODULES,
) -> int:
    logging.basicConfig(level=logging.WARNING, format="overlayctl: %(levelname)s: %(message)s")
    parser = build_parser(plugin_modules)
    args = parser.parse_args(argv)
    values = resolve(parser, args, ETCD_FLAGS, os.environ if environ is None else environ)
    args.etcd = EtcdFlags.from_values(values)
    problem = args.etcd.check()
    if problem:
        parser.error(problem)
    for warning in secret_warnings(args, args.etcd):
        log.warning("%s", warning)
    try:
        code: int = args.func(args)
    except UsageError as e:
        print(f"overlayctl: {e}", file=sys.stderr)
        return 2
    except CommandError as e:
        print(f"overlayctl: {e}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
