"""overlayctl: look at and change what overlayd keeps in etcd.

    overlayctl config set '{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}'
    overlayctl config set @network.json
    overlayctl config get
    overlayctl leases [--json] [--renew-margin MINUTES]
    overlayctl leases revoke 10.1.7.0/24 [--force]
    overlayctl reserve 10.1.7.0/24 192.168.1.20
    overlayctl reserve 10.1.7.0/24 192.168.1.20 --ipv6-subnet fd00:1:0:7::/64 --public-ipv6 fd00::20
    overlayctl reserve fd00:1:0:7::/64 fd00::20          (IPv6-only: EnableIPv4 false)
    overlayctl unreserve 10.1.7.0/24                     (or its IPv6 subnet)

Leases of every form are shown and taken: IPv4 (`10.1.7.0-24`), dual stack
(`10.1.7.0-24&fd00:1:0:7::-64`) and IPv6-only (`0.0.0.0-0&fd00:1:0:7::-64`, PublicIP 0.0.0.0 as
flannel writes it). An IPv6-only lease is named by its IPv6 subnet, never by `0.0.0.0/0`.

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
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
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
    NO_IPV4,
    ConfigError,
    Lease,
    LeaseAttrs,
    MalformedLease,
    NetworkConfig,
    printable,
    subnet_key,
)
from subnetmgr.validate import Ignored, select_leases, unusable_public_ip, unusable_public_ipv6

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


def ipv6_only(lease: Lease) -> bool:
    """Whether `lease` is IPv6-only: flannel's key `0.0.0.0-0&fd00:1:0:5::-64`."""
    return lease.subnet == NO_IPV4 and lease.ipv6_subnet is not None


def _mac(data: Mapping[str, Any] | None) -> str | None:
    mac = (data or {}).get("VtepMAC")
    return mac if isinstance(mac, str) and len(mac) <= 64 else None


def _lease_row(lease: Lease, now: float, renew_margin: float = 3600.0) -> dict[str, Any]:
    """A lease for the table and --json. `subnet` names the lease: its IPv4 subnet, or the
    IPv6 subnet of an IPv6-only lease; `public_ip` is null for an IPv6-only lease (its value
    says 0.0.0.0); `vtep_mac` is the VTEP of `subnet`'s family, `vtep_mac_v6` the IPv6 one."""
    attrs = lease.attrs
    v6only = ipv6_only(lease)
    ttl = None if lease.expiration is None else max(0, int(lease.expiration - now))
    no_ip = v6only and attrs.public_ip == NO_IPV4.network_address
    return {
        "subnet": str(lease.ipv6_subnet if v6only else lease.subnet),
        "public_ip": None if no_ip else str(attrs.public_ip),
        "ipv6_subnet": None if lease.ipv6_subnet is None else str(lease.ipv6_subnet),
        "public_ipv6": None if attrs.public_ipv6 is None else str(attrs.public_ipv6),
        "backend": attrs.backend_type or "udp",
        "vtep_mac": _mac(attrs.backend_v6_data if v6only else attrs.backend_data),
        "vtep_mac_v6": _mac(attrs.backend_v6_data),
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
        row = {"subnet": None, "public_ip": None, "ipv6_subnet": None, "public_ipv6": None,
               "backend": None, "vtep_mac": None, "vtep_mac_v6": None, "ttl": None,
               "reserved": None, "key": ignored.key, "looks_dead": False}  # fmt: skip
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


def _address_cells(r: Mapping[str, Any], v4: bool, v6: bool) -> list[str]:
    """SUBNET and PUBLIC IP (with `v4`), then IPV6 SUBNET and PUBLIC IPV6 (with `v6`); a key
    that did not decode is named in the first column."""
    unnamed = printable(f"key {r['key']}", 60) if r["subnet"] is None else None
    v6only = r["subnet"] is not None and r["subnet"] == r["ipv6_subnet"]
    cells = []
    if v4:
        cells += [unnamed or ("-" if v6only else r["subnet"]), r["public_ip"] or "-"]
        unnamed = None
    if v6:
        cells += [unnamed or r["ipv6_subnet"] or "-", r["public_ipv6"] or "-"]
    return cells


def render_leases_table(rows: Sequence[Mapping[str, Any]], renew_margin: float = 3600.0) -> str:
    """One line per key; an ignored one says why (`ignored: outside_network`), with the details
    listed under the table; a lease whose host missed its renewal says `looks dead`.

    The IPv6 columns (IPV6 SUBNET, PUBLIC IPV6) appear only when some key has an IPv6 part, and
    the IPv4 ones (SUBNET, PUBLIC IP) only when some key has an IPv4 part: an IPv4 cluster's
    table is as it always was, an IPv6-only cluster's has no column of `0.0.0.0/0`s, and an
    IPv6-only lease in a mixed table shows `-` as its IPv4 subnet. VTEP MAC is that of the
    first address column's family (all of them are in --json)."""
    v6 = any(r["ipv6_subnet"] or r["public_ipv6"] for r in rows)
    v4 = not v6 or any(r["subnet"] not in (None, r["ipv6_subnet"]) for r in rows)
    header = (
        *(("SUBNET", "PUBLIC IP") if v4 else ()),
        *(("IPV6 SUBNET", "PUBLIC IPV6") if v6 else ()),
        *("BACKEND", "VTEP MAC", "TTL", "RESERVED", "STATUS"),
    )
    body = [
        (
            *_address_cells(r, v4, v6),
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


def _order(lease: Lease) -> tuple[int, int, int, str]:
    """IPv4 and dual-stack leases by IPv4 subnet, then IPv6-only ones by IPv6 subnet."""
    net = lease.ipv6_subnet if ipv6_only(lease) and lease.ipv6_subnet else lease.subnet
    return net.version, int(net.network_address), net.prefixlen, lease.key


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
    valid = sorted(selection.valid.values(), key=_order)
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


def _whose(value: str | bytes) -> str:
    """Whose lease a stored value names, for messages: PublicIP and PublicIPv6 (PublicIPv6
    alone for an IPv6-only lease), backend, VtepMACs."""
    try:
        attrs = LeaseAttrs.from_json(value)
    except MalformedLease as e:
        return f"a malformed value ({printable(str(e), 120)})"
    v6only = attrs.public_ip == NO_IPV4.network_address and attrs.public_ipv6 is not None
    parts = [f"backend {attrs.backend_type or 'udp'}"]
    for data, tag in ((attrs.backend_data, ""), (attrs.backend_v6_data, "v6 ")):
        mac = (data or {}).get("VtepMAC")
        if isinstance(mac, str):
            parts.append(f"{tag}VtepMAC {printable(mac, 40)}")
    addresses = [str(attrs.public_ipv6)] if v6only else [str(attrs.public_ip)]
    if attrs.public_ipv6 is not None and not v6only:
        addresses.append(str(attrs.public_ipv6))
    return f"{' and '.join(addresses)} ({', '.join(parts)})"


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


def parse_subnet(text: str, what: str = "subnet") -> IPv4Network | IPv6Network:
    """An IPv4 or IPv6 subnet from the command line, as a lease key can name it: a CIDR with
    its prefix length and no host bits (`10.1.7.0/24`, `fd00:1:0:7::/64`), no zone."""
    try:
        if "/" not in text:
            raise ValueError("the prefix length is missing")
        if "%" in text:
            raise ValueError("a zone (%...) has no place in a subnet")
        net = ip_network(text, strict=True)
    except ValueError as e:
        raise UsageError(
            f"{what} {printable(text, 80)!r} is not a subnet such as 10.1.7.0/24 or "
            f"fd00:1:0:7::/64: {printable(str(e), 120)}"
        ) from None
    return net


def parse_address(text: str, what: str = "public IP") -> IPv4Address | IPv6Address:
    """An IPv4 or IPv6 address from the command line, without a zone (`192.168.1.20`,
    `fd00::20`)."""
    try:
        if "%" in text:
            raise ValueError("a zone (%...) has no place in a lease")
        return ip_address(text)
    except ValueError:
        raise UsageError(
            f"{what} {printable(text, 80)!r} is not an address such as 192.168.1.20 or fd00::20"
        ) from None


def _subnet_arg(text: str) -> IPv4Network | IPv6Network:
    """A lease named by its IPv4 subnet, or by its IPv6 one (an IPv6-only or dual-stack key)."""
    net = parse_subnet(text)
    if net == NO_IPV4:
        raise UsageError("0.0.0.0/0 names no lease: name an IPv6-only lease by its IPv6 subnet")
    return net


def _span(net: object, length: int, low: object, high: object) -> str:
    """`10.1.0.0/16, /24 subnets from 10.1.1.0 to 10.1.255.0`, for messages."""
    lo = getattr(low, "network_address", low)
    hi = getattr(high, "network_address", high)
    return f"{net}, /{length} subnets from {lo} to {hi}"


def reservation_misfit(
    config: NetworkConfig, subnet: IPv4Network, ipv6_subnet: IPv6Network | None
) -> str | None:
    """Why a reservation of `subnet` (NO_IPV4 for an IPv6-only one) and `ipv6_subnet` would not
    be taken by its host under `config` (the allocation takes a reservation only when its key
    has the families the config enables, each inside its range), or None when it fits."""
    if not config.enable_ipv4:
        if subnet != NO_IPV4:
            return (
                "the network config is IPv6-only (EnableIPv4 false): reserve an IPv6 subnet "
                "alone, e.g. `overlayctl reserve fd00:1:0:7::/64 fd00::20`"
            )
    elif subnet == NO_IPV4:
        return (
            f"the network config has EnableIPv4 (Network {config.network}): an IPv6-only "
            "reservation would be ignored; give an IPv4 SUBNET"
            + (" with --ipv6-subnet and --public-ipv6" if config.enable_ipv6 else "")
        )
    elif not config.contains(subnet):
        span = _span(config.network, config.subnet_len, config.subnet_min, config.subnet_max)
        return f"subnet {subnet} does not fit the network config ({span})"
    if not config.enable_ipv6:
        if ipv6_subnet is not None:
            return (
                f"the network config has no EnableIPv6: a host does not take a reservation "
                f"with an IPv6 subnet ({ipv6_subnet}); leave out --ipv6-subnet and --public-ipv6"
            )
    elif ipv6_subnet is None:
        return (
            "the network config is dual stack (EnableIPv6): a host does not take a "
            "reservation without an IPv6 part; add --ipv6-subnet and --public-ipv6"
        )
    elif not config.contains_ipv6(ipv6_subnet):
        span = _span(config.ipv6_network, config.ipv6_subnet_len, config.ipv6_subnet_min,
                     config.ipv6_subnet_max)  # fmt: skip
        return f"IPv6 subnet {ipv6_subnet} does not fit the network config ({span})"
    return None


def _reservation_args(
    args: argparse.Namespace,
) -> tuple[IPv4Network, IPv4Address, IPv6Network | None, IPv6Address | None]:
    """SUBNET, PUBLIC_IP, --ipv6-subnet and --public-ipv6 as the key's and value's parts:
    (IPv4 subnet, PublicIP, IPv6 subnet, PublicIPv6); an IPv6 SUBNET is an IPv6-only
    reservation (NO_IPV4, 0.0.0.0, SUBNET, PUBLIC_IP). Raises UsageError."""
    subnet = parse_subnet(args.subnet, "SUBNET")
    public = parse_address(args.public_ip, "PUBLIC_IP")
    sub6 = None if args.ipv6_subnet is None else parse_subnet(args.ipv6_subnet, "--ipv6-subnet")
    pub6 = None if args.public_ipv6 is None else parse_address(args.public_ipv6, "--public-ipv6")
    if isinstance(subnet, IPv6Network):
        if sub6 is not None or pub6 is not None:
            raise UsageError(
                f"SUBNET {subnet} is IPv6, so this is an IPv6-only reservation and PUBLIC_IP is "
                "the host's public IPv6 address; --ipv6-subnet and --public-ipv6 are for a "
                "dual-stack one, whose SUBNET is IPv4"
            )
        if not isinstance(public, IPv6Address):
            raise UsageError(
                f"PUBLIC_IP {public} is IPv4, but SUBNET {subnet} is IPv6: an IPv6-only "
                "reservation takes the host's public IPv6 address, such as fd00::20"
            )
        return NO_IPV4, NO_IPV4.network_address, subnet, public
    if subnet == NO_IPV4:
        raise UsageError(
            "SUBNET 0.0.0.0/0 is the IPv4 part of every IPv6-only key: to reserve an IPv6-only "
            "subnet give that IPv6 subnet alone, e.g. `overlayctl reserve fd00:1:0:7::/64 fd00::20`"
        )
    if not isinstance(public, IPv4Address):
        raise UsageError(
            f"PUBLIC_IP {public} is IPv6, but SUBNET {subnet} is IPv4: give the host's public "
            "IPv4 address (and its IPv6 one with --public-ipv6)"
        )
    if sub6 is not None and not isinstance(sub6, IPv6Network):
        raise UsageError(f"--ipv6-subnet {sub6} is not an IPv6 subnet such as fd00:1:0:7::/64")
    if pub6 is not None and not isinstance(pub6, IPv6Address):
        raise UsageError(f"--public-ipv6 {pub6} is not an IPv6 address such as fd00::20")
    if (sub6 is None) != (pub6 is None):
        raise UsageError(
            "--ipv6-subnet and --public-ipv6 go together: a dual-stack lease has an IPv6 subnet "
            "and the public IPv6 address that reaches it"
        )
    return subnet, public, sub6, pub6


async def cmd_reserve(registry: Any, args: argparse.Namespace) -> int:
    subnet, public_ip, ipv6_subnet, public_ipv6 = _reservation_args(args)
    v6only = subnet == NO_IPV4
    why = None if v6only else unusable_public_ip(public_ip)
    if why is not None:
        raise UsageError(f"public IP {public_ip} is {why}: overlayd would ignore the reservation")
    why = None if public_ipv6 is None else unusable_public_ipv6(public_ipv6)
    if why is not None:
        raise UsageError(
            f"public IPv6 {public_ipv6} is {why}: overlayd would ignore the reservation"
        )
    text = await registry.get_config_text()
    if text is not None:
        try:
            config = NetworkConfig.from_json(text)
        except ConfigError:
            config = None
        problem = None if config is None else reservation_misfit(config, subnet, ipv6_subnet)
        if problem is not None:
            raise UsageError(problem)
    key = subnet_key(subnet, ipv6_subnet)
    registry.ignored.quiet = True
    leases, _revision = await registry.list_leases(expirations=False)
    for other in leases:
        same4 = not v6only and other.subnet == subnet
        same6 = ipv6_subnet is not None and other.ipv6_subnet == ipv6_subnet
        if other.key != key and (same4 or same6):
            kind = "reservation" if other.reserved else "lease"
            named = subnet if same4 else ipv6_subnet
            undo = "unreserve" if other.reserved else "leases revoke"
            raise CommandError(
                f"{named} is already in the key {other.key}, a {kind} of "
                f"{_whose(other.attrs.to_json())}: two keys naming one subnet are one too many, "
                f"nothing written; remove it first (`overlayctl {undo}`)"
            )
    await registry.reserve(subnet, public_ip, ipv6_subnet, public_ipv6)
    if v6only:
        what, host = f"{ipv6_subnet}", f"{public_ipv6}"
    elif ipv6_subnet is not None:
        what, host = f"{subnet} and {ipv6_subnet}", f"{public_ip} and {public_ipv6}"
    else:
        what, host = f"{subnet}", f"{public_ip}"
    print(f"reserved {what} for {host} (key {key})")
    return 0


async def cmd_unreserve(registry: Any, args: argparse.Namespace) -> int:
    subnet = parse_subnet(args.subnet, "SUBNET")
    deleted = await registry.unreserve(subnet)
    if not deleted:
        raise CommandError(f"no reservation for {subnet} (see `overlayctl leases`)")
    for key in deleted:
        print(f"unreserved {subnet} (key {printable(key, 100)})")
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
        "whether it is a reservation (no TTL). When some lease has an IPv6 part, IPV6 SUBNET "
        "and PUBLIC IPV6 columns are added; an IPv6-only lease (key 0.0.0.0-0&<IPv6 subnet>) "
        "shows no IPv4 subnet, and a cluster of IPv6-only leases no IPv4 columns (--json: "
        '"subnet" is the IPv6 subnet and "public_ip" null; every row has "ipv6_subnet", '
        '"public_ipv6" and "vtep_mac_v6", null when absent). '
        "Keys that overlayd ignores (malformed, or not "
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
    revoke.add_argument("subnet", metavar="SUBNET",
                        help="the lease's IPv4 subnet, e.g. 10.1.7.0/24, or its IPv6 subnet, "
                        "e.g. fd00:1:0:7::/64 (an IPv6-only or dual-stack lease)")  # fmt: skip
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
        description="Write a lease without a TTL: SUBNET stays with PUBLIC_IP until unreserved. "
        "IPv4: `reserve 10.1.7.0/24 192.168.1.20` (key 10.1.7.0-24). Dual stack: add "
        "--ipv6-subnet and --public-ipv6 (key 10.1.7.0-24&fd00:1:0:7::-64). IPv6-only "
        "(EnableIPv4 false): `reserve fd00:1:0:7::/64 fd00::20`, an IPv6 SUBNET with the "
        "host's public IPv6 address (key 0.0.0.0-0&fd00:1:0:7::-64, PublicIP 0.0.0.0, as "
        "flannel writes it). Checked against the network config in etcd as overlayd would "
        "take it (the families it enables, each subnet inside its range with its length, "
        "usable public addresses): a misfit is refused with exit 2 and nothing is written. A "
        "subnet already named by another key is refused with exit 1.",
    )
    for flag, metavar, text in (
        ("subnet", "SUBNET", "e.g. 10.1.7.0/24, or fd00:1:0:7::/64 for IPv6-only"),
        ("public_ip", "PUBLIC_IP", "the host's public IPv4 address (IPv6 with an IPv6 SUBNET)"),
        ("--ipv6-subnet", "SUBNET6", "dual stack: the host's IPv6 subnet, e.g. fd00:1:0:7::/64"),
        ("--public-ipv6", "IP6", "dual stack: the host's public IPv6 address, e.g. fd00::20"),
    ):
        reserve.add_argument(flag, metavar=metavar, help=text)
    reserve.set_defaults(func=_etcd_command(cmd_reserve))

    unreserve = sub.add_parser(
        "unreserve",
        help="remove a reservation",
        description="Delete every reservation whose key names SUBNET, IPv4 or IPv6: "
        "10.1.7.0/24 finds 10.1.7.0-24 and 10.1.7.0-24&fd00:1:0:7::-64, fd00:1:0:7::/64 "
        "finds the dual-stack key and 0.0.0.0-0&fd00:1:0:7::-64. Leases are left alone.",
    )
    unreserve.add_argument("subnet", metavar="SUBNET",
                           help="e.g. 10.1.7.0/24 or fd00:1:0:7::/64")  # fmt: skip
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
