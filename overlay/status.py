"""`overlayctl status`: this host's overlayd as it sees itself, from its health endpoint, etcd
and the kernel.

    overlayctl status [--json] [--healthz-ip IP] [--healthz-port PORT] [--subnet-file FILE]

What is read, and from where:

- the daemon's health server (`--healthz-ip`/`--healthz-port`, the daemon's flags and
  FLANNELD_* variables, so the same environment file serves both): `/readyz` (ready, and the
  one-line reason when not), `/status` when the daemon serves it (lease, etcd health as the
  daemon sees it), `/metrics` when it serves them (our lease, peers handed to the backend,
  ignored leases by reason, error counters);
- etcd (the --etcd-* flags): the network config, every lease (ours, valid peers, ignored ones
  with the reason, checked as `overlayctl leases` checks them), reachability and latency;
- the kernel of the namespace it runs in: the backend's device (exists, up, MTU, addresses),
  its routes and FDB entries against the valid leases of other hosts;
- subnet.env (`--subnet-file`).

Everything read is untrusted: an answer that is not HTTP, not JSON, too large, or of the wrong
types is reported as a problem (and the field left null), never a crash.

Exit codes: 0 healthy (ready, etcd reachable, every peer programmed), 1 not ready or a problem
(each listed under "problems"), 2 usage. `--json` prints `status_json()`'s schema, documented
in docs/operations.md ("## status"); `"schema": 1` is bumped when a field changes meaning.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path
from typing import Any

from overlay.options import DAEMON_FLAGS, EtcdFlags, Flag, add_flags, resolve
from overlay.subnetenv import SubnetEnv, SubnetEnvError
from subnetmgr.model import ConfigError, Lease, NetworkConfig, Subnet, printable, subnet_order
from subnetmgr.validate import select_leases

SCHEMA = 1
HTTP_TIMEOUT = 2.0
"""Seconds for one request to the daemon's health server (connect, send, read)."""
MAX_ANSWER = 4 << 20
"""Bytes of one answer from the health server; a longer one is an error (/metrics of a daemon
with 10,000 peers is a few KiB: the counters are not per peer)."""
COMMAND_LIMIT = 8 << 20
"""Bytes of `ip -j` / `bridge -j` output read (10,000 peers is about 3 MiB of FDB JSON)."""
SHOWN = 200
TTL_LOOKUPS_IN_FLIGHT = 32
"""etcd lease time-to-live lookups of `doctor` in flight at once."""
"""Characters of an outside value quoted in a message."""

LOCAL_FLAG_NAMES = (
    "--healthz-ip",
    "--healthz-port",
    "--subnet-file",
    "--public-ip",
    "--subnet-lease-renew-margin",
)
"""The daemon flags `status` and `doctor` take (same names, defaults and FLANNELD_* variables
as overlayd's), so that both commands find what the local daemon uses."""


def local_flags(names: Sequence[str] = LOCAL_FLAG_NAMES) -> tuple[Flag, ...]:
    by_name = {f.name: f for f in DAEMON_FLAGS}
    return tuple(by_name[n] for n in names)


# --------------------------------------------------------------------------- the health server


class AnswerError(ValueError):
    """An answer from the health server that is not usable (not HTTP, too large, bad JSON)."""


def parse_http_answer(data: bytes) -> tuple[int, str]:
    """(status code, body) of a whole HTTP/1.x answer; AnswerError for anything else."""
    if len(data) > MAX_ANSWER:
        raise AnswerError(f"answer larger than {MAX_ANSWER} bytes")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    if not sep:
        raise AnswerError(f"not an HTTP answer: {printable(repr(data[:60]), 80)}")
    status_line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = status_line.split(b" ", 2)
    if (
        len(parts) < 2
        or parts[0] not in (b"HTTP/1.0", b"HTTP/1.1")
        or len(parts[1]) != 3
        or not parts[1].isdigit()
    ):
        raise AnswerError(f"not an HTTP status line: {printable(repr(status_line[:60]), 80)}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AnswerError(f"body is not UTF-8: {e}") from None
    return int(parts[1]), text


async def http_get(host: str, port: int, path: str, limit: float = HTTP_TIMEOUT) -> tuple[int, str]:
    """GET http://host:port/path (HTTP/1.0, read to EOF, bounded by `limit` seconds and MAX_ANSWER).

    OSError / TimeoutError when nothing answers; AnswerError for an unusable answer."""
    async with asyncio.timeout(limit):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read(MAX_ANSWER + 1)
            chunks = [data]
            total = len(data)
            while data and total <= MAX_ANSWER:
                data = await reader.read(MAX_ANSWER + 1 - total)
                chunks.append(data)
                total += len(data)
        finally:
            writer.close()
    return parse_http_answer(b"".join(chunks))


Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Samples:
    """Prometheus text format -> {sample name: [(labels, value), ...]} (prometheus_client's
    parser); AnswerError for text it refuses."""
    from prometheus_client.parser import text_string_to_metric_families

    if len(text) > MAX_ANSWER:
        raise AnswerError(f"metrics larger than {MAX_ANSWER} characters")
    out: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    except Exception as e:  # the parser raises ValueError, IndexError, ... on malformed text
        raise AnswerError(f"not Prometheus metrics: {printable(str(e), SHOWN)}") from None
    return out


def metric(samples: Samples | None, name: str, **labels: str) -> float | None:
    """The value of the first sample of `name` with these labels (None: absent or not finite)."""
    for have, value in (samples or {}).get(name, []):
        if all(have.get(k) == v for k, v in labels.items()):
            return value if math.isfinite(value) else None
    return None


def _typed(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = doc.get(key)
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        return None
    return value if isinstance(value, kind) else None


def parse_status_doc(text: str) -> dict[str, Any]:
    """The daemon's /status JSON, every field type-checked: a field of the wrong type is None
    (never trusted as is); AnswerError when the text is not a JSON object."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise AnswerError(f"/status is not JSON: {printable(str(e), SHOWN)}") from None
    if not isinstance(doc, dict):
        raise AnswerError(f"/status is not a JSON object but {type(doc).__name__}")
    reason = _typed(doc, "reason", str)
    out: dict[str, Any] = {
        "ready": _typed(doc, "ready", bool),
        "reason": None if reason is None else printable(reason, SHOWN),
        "lease": None,
        "etcd": None,
    }
    lease = doc.get("lease")
    if isinstance(lease, dict):
        subnet = _network(_typed(lease, "subnet", str))
        expiry = _typed(lease, "expiry_seconds", (int, float))
        out["lease"] = {
            "subnet": None if subnet is None else str(subnet),
            "public_ip": _address(_typed(lease, "public_ip", str)),
            "backend": _short(_typed(lease, "backend", str)),
            "ttl_seconds": None if expiry is None or not math.isfinite(expiry) else expiry,
        }
    etcd = doc.get("etcd")
    if isinstance(etcd, dict):
        last = _typed(etcd, "last_success", (int, float))
        out["etcd"] = {
            "up": _typed(etcd, "up", bool),
            "last_success": last if last is not None and math.isfinite(last) else None,
            "errors": _typed(etcd, "errors", int),
            "watch_lag_revisions": _typed(etcd, "watch_lag_revisions", int),
        }
    return out


def _network(text: str | None) -> Subnet | None:
    """An IPv4 or IPv6 (an IPv6-only lease's) network, None for anything else."""
    if text is None or len(text) > 43:
        return None
    try:
        return ip_network(text, strict=True)
    except ValueError:
        return None


def _address(text: str | None) -> str | None:
    if text is None or len(text) > 39:
        return None
    try:
        return str(ip_address(text))
    except ValueError:
        return None


def _short(text: str | None, limit: int = 32) -> str | None:
    return None if text is None else printable(text, limit)


@dataclass
class DaemonView:
    """What the daemon's health server said."""

    endpoint: str
    reachable: bool = False
    error: str | None = None
    ready: bool | None = None
    reason: str | None = None
    status: dict[str, Any] | None = None
    """/status, type-checked (None: the daemon does not serve it)."""
    metrics: Samples | None = None
    """/metrics (None: not served, e.g. overlayd without --metrics)."""
    notes: list[str] = field(default_factory=list)


async def read_daemon(host: IPv4Address | IPv6Address, port: int) -> DaemonView:
    """Ask the health server at host:port (0.0.0.0 or :: means this host: asked on loopback)."""
    address = str(host)
    if host.is_unspecified:
        address = "127.0.0.1" if host.version == 4 else "::1"
    shown = f"[{address}]" if ":" in address else address
    view = DaemonView(f"http://{shown}:{port}")
    if port == 0:
        view.error = (
            "the health server is off (--healthz-port 0): start overlayd with --healthz-port "
            "(and --metrics) and give the same flags here, or set FLANNELD_HEALTHZ_PORT"
        )
        return view
    try:
        code, body = await http_get(address, port, "/readyz")
    except (OSError, TimeoutError) as e:
        view.error = (
            f"nothing answers at {view.endpoint}: "
            f"{str(e) or f'timed out after {HTTP_TIMEOUT:g} s'} (is overlayd running?)"
        )
        return view
    except AnswerError as e:
        view.error = f"{view.endpoint}/readyz: {e}"
        return view
    view.reachable = True
    if code not in (200, 503):
        view.error = f"{view.endpoint}/readyz answered {code}: not an overlayd health server?"
        return view
    view.ready = code == 200
    line = body.strip().splitlines()[0] if body.strip() else ""
    if not view.ready:
        view.reason = printable(line.removeprefix("not ready:").strip(), SHOWN) or "not ready"
    for path in ("/status", "/metrics"):
        try:
            code, body = await http_get(address, port, path)
        except (OSError, TimeoutError, AnswerError) as e:
            view.notes.append(f"{path}: {printable(str(e) or 'timed out', SHOWN)}")
            continue
        if code == 404:
            continue
        if code != 200:
            view.notes.append(f"{path} answered {code}")
            continue
        try:
            if path == "/status":
                view.status = parse_status_doc(body)
            else:
                view.metrics = parse_metrics(body)
        except AnswerError as e:
            view.notes.append(f"{path}: {e}")
    if view.status is not None and view.status.get("reason") and not view.ready:
        view.reason = view.status["reason"]
    return view


# --------------------------------------------------------------------------- the kernel


async def command_json(*argv: str) -> Any:
    """`ip -j ...` / `bridge -j ...` output as JSON; None when the command fails or its output
    is not JSON (e.g. a device that does not exist)."""
    from overlay.masq import IptablesError, run_command

    try:
        rc, out, _err = await run_command(argv, check=False)
    except IptablesError:
        return None
    if rc != 0 or len(out) > COMMAND_LIMIT:
        return None
    try:
        return json.loads(out or "[]")
    except ValueError:
        return None


async def local_addresses() -> dict[IPv4Address | IPv6Address, str]:
    """Every IPv4 and IPv6 address of this namespace -> its interface."""
    out: dict[IPv4Address | IPv6Address, str] = {}
    for link in await command_json("ip", "-j", "addr", "show") or []:
        if not isinstance(link, dict):
            continue
        for a in link.get("addr_info") or []:
            try:
                out[ip_address(a["local"])] = str(link.get("ifname", "?"))
            except (KeyError, TypeError, ValueError):
                continue
    return out


@dataclass
class DeviceState:
    name: str
    exists: bool = False
    up: bool = False
    mtu: int | None = None
    addresses: list[str] = field(default_factory=list)


async def device_state(name: str) -> DeviceState:
    state = DeviceState(name)
    links = await command_json("ip", "-j", "addr", "show", "dev", name)
    if not links or not isinstance(links, list) or not isinstance(links[0], dict):
        return state
    link = links[0]
    state.exists = True
    flags = link.get("flags") or []
    state.up = isinstance(flags, list) and "UP" in flags
    mtu = link.get("mtu")
    state.mtu = mtu if isinstance(mtu, int) and not isinstance(mtu, bool) else None
    for a in link.get("addr_info") or []:
        if isinstance(a, dict) and (
            a.get("family") == "inet" or (a.get("family") == "inet6" and a.get("scope") == "global")
        ):
            state.addresses.append(f"{a.get('local')}/{a.get('prefixlen')}")
    return state


def device_name(config: NetworkConfig | None) -> str | None:
    """The backend's device: flannel.<VNI> (vxlan; flannel-v6.<VNI> in an IPv6-only network),
    flannel0 (udp), none (host-gw, alloc)."""
    if config is None:
        return None
    if config.backend_type == "vxlan":
        from backends.vxlan_device import VxlanOptions

        try:
            name = VxlanOptions.from_backend(config.backend).device
        except ConfigError:
            name = "flannel.1"
        return name.replace("flannel.", "flannel-v6.", 1) if config.ipv6_only else name
    if config.backend_type == "udp":
        return "flannel0"
    return None


async def kernel_peers(config: NetworkConfig, device: str | None) -> dict[str, Any]:
    """The peers programmed in the kernel: route destinations (and FDB entries for vxlan);
    the IPv6 ones in an IPv6-only network (`device` is then flannel-v6.<VNI>)."""
    routes: set[Subnet] = set()
    fdb: set[str] = set()
    family = "-6" if config.ipv6_only else "-4"
    if config.backend_type == "host-gw":
        found = await command_json("ip", "-j", family, "route", "show", "proto", "77")
    elif device is not None:
        found = await command_json("ip", "-j", family, "route", "show", "dev", device)
    else:
        found = []
    for r in found or []:
        try:
            routes.add(ip_network(r["dst"], strict=True))
        except (KeyError, TypeError, ValueError):
            continue
    if config.backend_type == "vxlan" and device is not None:
        for e in await command_json("bridge", "-j", "fdb", "show", "dev", device) or []:
            if isinstance(e, dict) and isinstance(e.get("dst"), str):
                fdb.add(e["dst"])
    return {"routes": routes, "fdb": fdb}


# --------------------------------------------------------------------------- etcd


@dataclass
class EtcdView:
    endpoints: str
    reachable: bool = False
    error: str | None = None
    latency_ms: float | None = None
    config: NetworkConfig | None = None
    config_error: str | None = None
    leases: list[Lease] = field(default_factory=list)
    valid: dict[Subnet, Lease] = field(default_factory=dict)
    ignored: list[dict[str, Any]] = field(default_factory=list)
    lease_ids: dict[str, int] = field(default_factory=dict)
    """Lease key -> etcd lease ID (0: a reservation)."""
    ttls: dict[int, tuple[int, int]] = field(default_factory=dict)
    """etcd lease ID -> (seconds left, granted TTL), looked up by `doctor` only."""
    ttl_error: str | None = None
    """Why the TTLs could not be read (etcd answered the lists, then failed)."""

    def ttl_left(self, lease: Lease) -> int | None:
        """Seconds left on `lease` (None: a reservation, or not looked up)."""
        found = self.ttls.get(self.lease_ids.get(lease.key, 0))
        return None if found is None else found[0]


async def read_etcd(
    etcd: EtcdFlags, *, ttls: bool = False, ttl_filter: Callable[[Lease], bool] | None = None
) -> EtcdView:
    """Config, leases (valid and ignored, as `overlayctl leases` judges them) and the latency of
    one read; with `ttls`, the time to live and granted TTL of each lease's etcd lease (of the
    leases `ttl_filter` accepts, when given: status needs only ours)."""
    from aetcd import rpc

    from subnetmgr.registry import EtcdRegistry, RegistryError

    view = EtcdView(",".join(etcd.endpoints))
    try:
        async with asyncio.timeout(etcd.timeout * 3):
            registry = await EtcdRegistry.connect(etcd.registry_options())
            try:
                registry.ignored.quiet = True
                start = time.monotonic()
                text, _ = await registry.get_config_value()
                view.latency_ms = round((time.monotonic() - start) * 1000, 2)
                view.reachable = True
                # No expiry lookups here (one per lease: 45x a plain read at 2,000 leases,
                # bench/bench_doctor.py); the TTLs needed are looked up below.
                leases, _ = await registry.list_leases(expirations=False)
                view.leases = leases
                if text is None:
                    view.config_error = f"no network config at {etcd.prefix}/config"
                else:
                    try:
                        view.config = NetworkConfig.from_json(text)
                    except ConfigError as e:
                        view.config_error = f"the network config is invalid: {e}"
                selection = select_leases(view.config, leases)
                view.valid = dict(selection.valid)
                for key, (reason, detail) in sorted(selection.ignored.items()):
                    view.ignored.append({"key": key, "reason": reason, "detail": detail})
                for key, ign in sorted(registry.ignored.current.items()):
                    view.ignored.append(
                        {"key": key, "reason": ign.reason, "detail": printable(ign.detail, SHOWN)}
                    )
            except BaseException:
                await registry.close()
                raise
    except RegistryError as e:
        view.reachable = False
        view.error = printable(str(e), 400)
        return view
    except TimeoutError:
        view.reachable = False
        view.error = f"etcd at {view.endpoints} did not answer within {etcd.timeout * 3:g} s"
        return view
    try:
        if ttls:  # outside the deadline above: one lookup per etcd lease, each with its own
            await _read_ttls(registry, view, rpc, ttl_filter)
    except RegistryError as e:
        view.ttl_error = printable(str(e), 400)
    finally:
        await registry.close()
    return view


async def _read_ttls(
    registry: Any, view: EtcdView, rpc: Any, keep: Callable[[Lease], bool] | None
) -> None:
    """Each lease key's etcd lease ID, and each ID's time to live and granted TTL.

    Through the registry's connection (its endpoints, TLS and failover): the registry itself
    only keeps expiry times, not granted TTLs."""
    conn = registry._conn
    prefix = registry._subnets

    async def get(c: Any, md: Any) -> Any:
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        req = rpc.RangeRequest(key=prefix, range_end=end, keys_only=True)
        return await c.kv.Range(req, timeout=registry.timeout, metadata=md)

    resp = await conn.call("get", get)
    for kv in resp.kvs:
        view.lease_ids[registry.key_text(kv.key)] = int(kv.lease)
    sem = asyncio.Semaphore(TTL_LOOKUPS_IN_FLIGHT)

    async def one(lease_id: int) -> None:
        async def ttl(c: Any, md: Any) -> Any:
            req = rpc.LeaseTimeToLiveRequest(ID=lease_id)
            return await c.lease.LeaseTimeToLive(req, timeout=registry.timeout, metadata=md)

        async with sem:
            answer = await conn.call("lease time-to-live", ttl)
        view.ttls[lease_id] = (int(answer.TTL), int(answer.grantedTTL))

    wanted = {x.key for x in view.leases if keep is None or keep(x)}
    ids = sorted({i for k, i in view.lease_ids.items() if i and k in wanted})
    results = await asyncio.gather(*(one(i) for i in ids), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


# --------------------------------------------------------------------------- the report


def read_subnet_env(path: Path) -> tuple[SubnetEnv | None, str | None]:
    try:
        return SubnetEnv.read(path), None
    except FileNotFoundError:
        return None, f"{path} does not exist (overlayd writes it once it holds a lease)"
    except (OSError, SubnetEnvError) as e:
        return None, printable(str(e), 400)


def env_subnet(env: SubnetEnv | None) -> Subnet | None:
    """The subnet subnet.env names as a lease's ident: FLANNEL_SUBNET, or FLANNEL_IPV6_SUBNET
    in an IPv6-only network's file."""
    if env is None:
        return None
    return env.subnet if env.subnet is not None else env.ipv6_subnet


def own_lease(
    valid: Mapping[Subnet, Lease],
    leases: Sequence[Lease],
    daemon_subnet: Subnet | None,
    env: SubnetEnv | None,
    local: Mapping[IPv4Address | IPv6Address, str],
    public_ip: IPv4Address | None,
) -> tuple[Lease | None, str]:
    """Our lease and how it was found: the daemon's word first, then subnet.env's subnet when
    its lease's PublicIP is ours, then any lease whose PublicIP is one of our addresses (an
    IPv6-only lease: its PublicIPv6)."""
    by_subnet = {lease.ident: lease for lease in leases}
    ours: set[IPv4Address | IPv6Address] = {public_ip} if public_ip is not None else set(local)
    if daemon_subnet is not None and daemon_subnet in by_subnet:
        return by_subnet[daemon_subnet], "daemon"
    from_env = env_subnet(env)
    if from_env is not None and from_env in by_subnet:
        lease = by_subnet[from_env]
        if lease.attrs.address in ours:
            return lease, "subnet.env"
    for lease in sorted(valid.values(), key=lambda x: subnet_order(x.ident)):
        if lease.attrs.address in ours:
            return lease, "public_ip"
    return None, ""


def daemon_subnet(view: DaemonView) -> Subnet | None:
    if view.status is not None and view.status.get("lease"):
        return _network(view.status["lease"].get("subnet"))
    for labels, _ in (view.metrics or {}).get("overlay_lease_info", []):
        return _network(labels.get("subnet"))
    return None


def ignored_gauge(samples: Samples | None) -> dict[str, int]:
    """The daemon's `overlay_leases_ignored` gauge: reason (printable) -> count; samples that
    are not finite are left out."""
    out: dict[str, int] = {}
    for labels, value in (samples or {}).get("overlay_leases_ignored", []):
        if math.isfinite(value):
            out[printable(labels.get("reason", "?"), 40)] = int(value)
    return out


ERROR_COUNTERS = (
    "overlay_etcd_errors_total",
    "overlay_reconcile_errors_total",
    "overlay_events_dropped_total",
)


async def collect_status(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `overlayctl status --json` prints (schema in docs/operations.md)."""
    local = args.local
    daemon, local_ips = await asyncio.gather(
        read_daemon(local["healthz_ip"], local["healthz_port"]), local_addresses()
    )
    env, env_error = read_subnet_env(local["subnet_file"])
    hints = {daemon_subnet(daemon), env_subnet(env)}
    ours: set[IPv4Address | IPv6Address] = (
        {local["public_ip"]} if local["public_ip"] is not None else set(local_ips)
    )
    etcd = await read_etcd(
        args.etcd, ttls=True, ttl_filter=lambda x: x.ident in hints or x.attrs.address in ours
    )
    problems: list[str] = []
    now = time.time()
    if daemon.error:
        problems.append(daemon.error)
    elif daemon.ready is False:
        problems.append(f"overlayd is not ready: {daemon.reason}")
    if not etcd.reachable:
        problems.append(f"etcd: {etcd.error}")
    elif etcd.config_error:
        problems.append(etcd.config_error)
    lease, source = own_lease(etcd.valid, etcd.leases, daemon_subnet(daemon), env, local_ips,
                              local["public_ip"])  # fmt: skip
    lease_doc: dict[str, Any] | None = None
    if lease is not None:
        lease_doc = {
            "subnet": str(lease.ident),
            "public_ip": str(lease.attrs.address),
            "backend": printable(lease.attrs.backend_type or "udp", 32),
            "ttl_seconds": etcd.ttl_left(lease),
            "reserved": lease.reserved,
            "found_by": source,
        }
    elif daemon.status is not None and daemon.status.get("lease"):
        lease_doc = dict(daemon.status["lease"], reserved=None, found_by="daemon")
    elif daemon.metrics is not None and daemon.metrics.get("overlay_lease_info"):
        labels = daemon.metrics["overlay_lease_info"][0][0]  # etcd unreachable: as the daemon says
        expires = metric(daemon.metrics, "overlay_lease_expiration_seconds")
        lease_doc = {
            "subnet": str(daemon_subnet(daemon)) if daemon_subnet(daemon) else None,
            "public_ip": _address(labels.get("public_ip")),
            "backend": _short(labels.get("backend")),
            "ttl_seconds": None if expires is None else int(expires - now),
            "reserved": expires is None,
            "found_by": "daemon",
        }
    elif etcd.reachable:
        problems.append("no lease in etcd belongs to this host")
    if env_error:
        problems.append(f"subnet.env: {env_error}")
    elif env is not None and lease is not None and env_subnet(env) != lease.ident:
        problems.append(f"subnet.env says {env_subnet(env)}, our lease is {lease.ident}")
    config = etcd.config
    device_doc: dict[str, Any] | None = None
    peers_doc: dict[str, Any] = {"leases": None, "programmed": None, "kernel_routes": None,
                                 "kernel_fdb": None, "missing": []}  # fmt: skip
    own_subnet = lease.ident if lease is not None else env_subnet(env)
    if config is not None:
        name = device_name(config)
        if name is not None:
            dev = await device_state(name)
            device_doc = {"name": dev.name, "exists": dev.exists, "up": dev.up, "mtu": dev.mtu,
                          "addresses": dev.addresses}  # fmt: skip
            if not dev.exists:
                problems.append(f"device {name} does not exist")
            elif not dev.up:
                problems.append(f"device {name} is down")
            elif env is not None and dev.mtu is not None and env.mtu != dev.mtu:
                problems.append(f"subnet.env says MTU {env.mtu}, {name} has {dev.mtu}")
        others = {s: x for s, x in etcd.valid.items() if s != own_subnet}
        same_backend = {s: x for s, x in others.items()
                        if (x.attrs.backend_type or "udp") == config.backend_type}  # fmt: skip
        peers_doc["leases"] = len(others)
        programmed = metric(daemon.metrics, "overlay_peers")
        peers_doc["programmed"] = None if programmed is None else int(programmed)
        kernel = await kernel_peers(config, name)
        if config.backend_type in ("vxlan", "host-gw"):
            peers_doc["kernel_routes"] = len(kernel["routes"] & set(same_backend))
            missing = sorted(set(same_backend) - kernel["routes"])
            if config.backend_type == "vxlan":
                peers_doc["kernel_fdb"] = len(kernel["fdb"])
            peers_doc["missing"] = [str(s) for s in missing]
            if missing:
                problems.append(
                    f"{len(missing)} peer subnet(s) without a route: "
                    + ", ".join(str(s) for s in missing[:5])
                )
        elif config.backend_type == "udp":
            peers_doc["kernel_routes"] = len(kernel["routes"])
            if config.network not in kernel["routes"]:
                problems.append(f"no route for {config.network} via flannel0")
        if programmed is not None and int(programmed) != len(others) and daemon.ready:
            problems.append(
                f"overlayd hands {int(programmed)} peers to the backend, etcd has {len(others)} "
                "valid leases of other hosts (it may be catching up; run again)"
            )
    ignored_now = ignored_gauge(daemon.metrics)
    errors = {n: int(v) for n in ERROR_COUNTERS
              if (v := metric(daemon.metrics, n)) is not None}  # fmt: skip
    daemon_etcd = daemon.status.get("etcd") if daemon.status is not None else None
    if daemon_etcd and daemon_etcd.get("up") is False:
        problems.append("overlayd cannot reach etcd (its /status says etcd is down)")
    return {
        "schema": SCHEMA,
        "healthy": not problems,
        "ready": daemon.ready,
        "reason": daemon.reason,
        "daemon": {
            "pid": local.get("daemon_pid"),
            "endpoint": daemon.endpoint,
            "reachable": daemon.reachable,
            "error": daemon.error,
            "status_served": daemon.status is not None,
            "metrics_served": daemon.metrics is not None,
            "notes": daemon.notes,
        },
        "lease": lease_doc,
        "subnet_env": {
            "path": str(local["subnet_file"]),
            "network": None if env is None else str(env.network),
            "subnet": None if env is None else str(env.subnet),
            "mtu": None if env is None else env.mtu,
            "error": env_error,
        },
        "backend": None if config is None else config.backend_type,
        "device": device_doc,
        "peers": peers_doc,
        "ignored_leases": etcd.ignored,
        "ignored_by_daemon": ignored_now if daemon.metrics is not None else None,
        "etcd": {
            "endpoints": etcd.endpoints,
            "reachable": etcd.reachable,
            "latency_ms": etcd.latency_ms,
            "error": etcd.error,
            "daemon_view": daemon_etcd,
        },
        "errors": errors if daemon.metrics is not None else None,
        "problems": problems,
    }


def _ttl(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "no expiry (reservation)"
    s = int(seconds)
    h, rest = divmod(abs(s), 3600)
    m, sec = divmod(rest, 60)
    text = f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"
    return text if s >= 0 else f"expired {text} ago"


def render_status(doc: Mapping[str, Any]) -> str:
    """The human-readable form of `collect_status`'s document."""
    lines = []
    ready = doc["ready"]
    state = "ready" if ready else "NOT READY" if ready is False else "UNKNOWN (daemon not reached)"
    lines.append(f"overlayd:    {state}" + (f" ({doc['reason']})" if doc["reason"] else ""))
    d = doc["daemon"]
    served = [p for p, ok in (("/status", d["status_served"]), ("/metrics", d["metrics_served"]))
              if ok]  # fmt: skip
    about = [f"overlayd pid {d['pid']}"] if d.get("pid") else ["no overlayd in this namespace"]
    about += [f"serves {', '.join(served)}"] if served else []
    lines.append(f"health:      {d['endpoint']} ({'; '.join(about)})")
    lease = doc["lease"]
    if lease:
        lines.append(f"lease:       {lease['subnet']} for {lease['public_ip']}, backend "
                     f"{lease['backend']}, TTL left {_ttl(lease['ttl_seconds'])}")  # fmt: skip
    else:
        lines.append("lease:       none found")
    env = doc["subnet_env"]
    if env["error"]:
        lines.append(f"subnet.env:  {env['error']}")
    else:
        lines.append(f"subnet.env:  {env['path']}: network {env['network']}, subnet "
                     f"{env['subnet']}, MTU {env['mtu']}")  # fmt: skip
    dev = doc["device"]
    if dev is not None:
        if dev["exists"]:
            lines.append(
                f"device:      {dev['name']} {'up' if dev['up'] else 'DOWN'}, MTU "
                f"{dev['mtu']}, address {', '.join(dev['addresses']) or 'none'}"
            )
        else:
            lines.append(f"device:      {dev['name']} MISSING")
    elif doc["backend"]:
        lines.append(f"device:      none ({doc['backend']} backend)")
    p = doc["peers"]
    if p["leases"] is not None:
        text = f"peers:       {p['leases']} valid leases of other hosts"
        if p["programmed"] is not None:
            text += f", {p['programmed']} handed to the backend"
        if p["kernel_routes"] is not None:
            text += f", {p['kernel_routes']} routes in the kernel"
        if p["kernel_fdb"] is not None:
            text += f", {p['kernel_fdb']} FDB entries"
        lines.append(text)
    ignored = doc["ignored_leases"]
    by_daemon = doc["ignored_by_daemon"]
    seen = ""
    if by_daemon:
        seen = " (overlayd ignores " + ", ".join(f"{k} {v}" for k, v in by_daemon.items()) + ")"
    lines.append(f"ignored:     {len(ignored)} lease key(s){seen}" + (":" if ignored else ""))
    for row in ignored[:20]:
        lines.append(f"  {printable(row['key'], 80)}: {row['reason']} ({row['detail']})")
    e = doc["etcd"]
    if e["reachable"]:
        lines.append(f"etcd:        {e['endpoints']} reachable, {e['latency_ms']} ms for one read")
    else:
        lines.append(f"etcd:        UNREACHABLE: {e['error']}")
    if e["daemon_view"]:
        v = e["daemon_view"]
        lines.append(f"  as overlayd sees it: up {v.get('up')}, errors {v.get('errors')}, "
                     f"watch lag {v.get('watch_lag_revisions')} revisions")  # fmt: skip
    if doc["errors"] is not None:
        lines.append("errors:      " + ", ".join(f"{k} {v}" for k, v in doc["errors"].items()))
    if doc["problems"]:
        lines.append("problems:")
        lines += [f"  - {x}" for x in doc["problems"]]
    else:
        lines.append("problems:    none")
    return "\n".join(lines)


MAX_PROC_FILE = 1 << 20
"""Bytes of /proc/PID/cmdline or environ read."""


def _read_proc(path: Path) -> list[str] | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROC_FILE)
    except OSError:
        return None
    return [x.decode("utf-8", "surrogateescape") for x in data.split(b"\0") if x]


def daemon_argv(cmdline: Sequence[str]) -> list[str] | None:
    """The flags of an overlayd command line (`overlayd ...`, `python -m overlay.daemon ...`,
    `python /path/overlayd ...`), None for any other program."""
    for i, arg in enumerate(cmdline[:4]):
        if arg == "overlay.daemon" and i > 0 and cmdline[i - 1] == "-m":
            return list(cmdline[i + 1 :])
        python = i > 0 and os.path.basename(cmdline[0]).startswith("python")
        if os.path.basename(arg) == "overlayd" and (i == 0 or python):
            return list(cmdline[i + 1 :])
    return None


def parse_daemon_flags(argv: Sequence[str], environ: Mapping[str, str]) -> dict[str, Any] | None:
    """overlayd's flags from its argv and environment, read with overlayd's own parser and
    precedence; None when overlayd itself would refuse them."""
    import contextlib
    import io

    from overlay.options import ETCD_FLAGS, build_parser

    parser = build_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ns, _unknown = parser.parse_known_args(list(argv))
            return resolve(parser, ns, ETCD_FLAGS + DAEMON_FLAGS, environ)
    except SystemExit:
        return None


def same_netns(pid: int) -> bool:
    try:
        mine, theirs = os.stat("/proc/self/ns/net"), os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def find_daemons(proc: Path = Path("/proc")) -> list[tuple[int, dict[str, Any]]]:
    """Every overlayd in this network namespace with its flags (PID order)."""
    found = []
    try:
        entries = sorted(int(e.name) for e in proc.iterdir() if e.name.isdigit())
    except OSError:
        return []
    for pid in entries:
        if pid == os.getpid():
            continue
        cmdline = _read_proc(proc / str(pid) / "cmdline")
        argv = daemon_argv(cmdline) if cmdline else None
        if argv is None or not same_netns(pid):
            continue
        env_items = _read_proc(proc / str(pid) / "environ") or []
        environ = dict(x.split("=", 1) for x in env_items if "=" in x and x.startswith("FLANNELD_"))
        values = parse_daemon_flags(argv, environ)
        if values is not None:
            found.append((pid, values))
    return found


def _given(args: argparse.Namespace, flag: Flag) -> bool:
    return getattr(args, flag.dest, None) is not None or flag.env in os.environ


def resolve_local(args: argparse.Namespace) -> dict[str, Any]:
    """The local daemon's flags: the command line, else FLANNELD_* of our environment, else
    the flags of the overlayd running in this network namespace (read from /proc: its argv
    and FLANNELD_* environment, parsed by overlayd's parser), else overlayd's defaults.

    The etcd flags are filled in the same way (args.etcd is replaced). With several overlayd
    in this namespace, the one whose --healthz-port was given wins, else the lowest PID."""
    from overlay.options import ETCD_FLAGS

    values = resolve(args.local_parser, args, local_flags(), os.environ)
    values["daemon_pid"] = None
    daemons = find_daemons()
    if getattr(args, "healthz_port", None) is not None:
        daemons = [d for d in daemons if d[1]["healthz_port"] == args.healthz_port] or daemons
    values["daemons_found"] = len(daemons)
    if not daemons:
        return values
    pid, theirs = daemons[0]
    values["daemon_pid"] = pid
    for flag in local_flags():
        if not _given(args, flag):
            values[flag.dest] = theirs[flag.dest]
    etcd = {f.dest: getattr(args.etcd, f.dest.removeprefix("etcd_")) for f in ETCD_FLAGS}
    for flag in ETCD_FLAGS:
        if not _given(args, flag):
            etcd[flag.dest] = theirs[flag.dest]
    args.etcd = EtcdFlags.from_values(etcd)
    return values


def cmd_status(args: argparse.Namespace) -> int:
    args.local = resolve_local(args)
    doc = asyncio.run(collect_status(args))
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render_status(doc))
    return 0 if doc["healthy"] else 1


def add_local_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the local overlayd (same flags and FLANNELD_* as overlayd)")
    add_flags(group, local_flags())
    parser.set_defaults(local_parser=parser)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="this host's overlayd as it sees itself (lease, device, peers, etcd, readiness)",
        description="Show this host's overlayd: readiness and why not (its /readyz, /status and "
        "/metrics), our lease and TTL left, subnet.env, the backend's device (exists, up, MTU, "
        "address), peers handed to the backend against the valid leases in etcd and the routes "
        "and FDB entries in the kernel, lease keys ignored and why, etcd reachability and "
        "latency, error counters. Run it on the host (or in the host's network namespace: "
        "`ip netns exec NS overlayctl status`). Exit 0 healthy, 1 not ready or a problem "
        "(listed), 2 usage.",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON (schema 1, docs/operations.md) instead of text",
    )
    add_local_flags(parser)
    parser.set_defaults(func=cmd_status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as `overlayctl status`")
