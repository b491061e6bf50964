"""overlayctl: look at and change what overlayd keeps in etcd.

    overlayctl config set '{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}'
    overlayctl config set @network.json
    overlayctl config get
    overlayctl leases [--json]
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

from overlay.options import ETCD_FLAGS, EtcdFlags, add_flags, package_version, resolve
from subnetmgr.model import ConfigError, Lease, NetworkConfig

log = logging.getLogger("overlayctl")

PLUGIN_MODULES: tuple[str, ...] = ("integration.cli", "cni.install")


class UsageError(Exception):
    """Bad input from the user: exit 2, nothing written."""


class CommandError(Exception):
    """The command could not be done: exit 1."""


# ---------------------------------------------------------------------- commands


def _config_text(arg: str) -> str:
    if arg.startswith("@"):
        path = Path(arg[1:])
        try:
            return path.read_text()
        except OSError as e:
            raise UsageError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
    return arg


async def cmd_config_set(registry: Any, args: argparse.Namespace) -> int:
    text = _config_text(args.config).strip()
    try:
        config = NetworkConfig.from_json(text)
    except ConfigError as e:
        raise UsageError(f"invalid network config, nothing written: {e}") from None
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


def _lease_row(lease: Lease, now: float) -> dict[str, Any]:
    data = lease.attrs.backend_data or {}
    ttl = None if lease.expiration is None else max(0, int(lease.expiration - now))
    return {
        "subnet": str(lease.subnet),
        "public_ip": str(lease.attrs.public_ip),
        "backend": lease.attrs.backend_type or "udp",
        "vtep_mac": data.get("VtepMAC"),
        "ttl": ttl,
        "reserved": lease.reserved,
    }


def _human_ttl(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def render_leases_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ("SUBNET", "PUBLIC IP", "BACKEND", "VTEP MAC", "TTL", "RESERVED")
    body = [
        (
            r["subnet"],
            r["public_ip"],
            r["backend"],
            r["vtep_mac"] or "-",
            _human_ttl(r["ttl"]),
            "yes" if r["reserved"] else "no",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=False)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
             for row in (header, *body)]  # fmt: skip
    return "\n".join(lines)


async def cmd_leases(registry: Any, args: argparse.Namespace) -> int:
    leases, _revision = await registry.list_leases()
    now = time.time()
    rows = [_lease_row(lease, now) for lease in sorted(leases, key=lambda x: x.subnet)]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no leases under {args.etcd.prefix}/subnets/")
    else:
        print(render_leases_table(rows))
    return 0


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
    text = await registry.get_config_text()
    if text is not None:
        try:
            config = NetworkConfig.from_json(text)
        except ConfigError:
            config = None
        if config is not None and not config.contains(subnet):
            raise UsageError(
                f"subnet {subnet} does not fit the network config ({config.network}, "
                f"/{config.subnet_len} subnets from {config.subnet_min.network_address} to "
                f"{config.subnet_max.network_address})"
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

    leases = sub.add_parser(
        "leases",
        help="list subnet leases",
        description="List every lease: subnet, public IP, backend, VTEP MAC, TTL left, and "
        "whether it is a reservation (no TTL). Malformed leases are skipped (logged).",
    )
    leases.add_argument("--json", action="store_true", help="print JSON instead of a table")
    leases.set_defaults(func=_etcd_command(cmd_leases))

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
