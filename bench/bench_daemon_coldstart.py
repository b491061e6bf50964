"""Cold start of the real overlayd with N remote vxlan leases already in etcd, and its memory.

For each size N (default 1,000 and 10,000), in one namespace lab (integration.lab) with no other
host: N vxlan leases are written into etcd first (each with its own 24 h etcd lease, as N real
hosts would hold them; `--shared-etcd-lease` puts them all on one), then, --repeats times:

  * daemon:    a fresh host namespace is made, then the clock starts and `overlayd` is spawned in
               it exactly as the lab runs it (`ip netns exec ... python -m overlay.daemon`); the
               clock stops when the kernel of that namespace holds all 3N entries (N permanent
               neighbours, N FDB entries, N routes on flannel.1), polled with `ip`/`bridge` every
               --poll seconds (the resolution). Phases come from the daemon's own log lines
               (millisecond timestamps): process start + imports + interface choice, etcd
               config read, backend prepare + lease acquisition, backend start + subnet.env +
               iptables (ready), the mirror's first list, the per-lease "peer added" events, the
               first full reconcile. The daemon's VmRSS/VmHWM and CPU time (from /proc) are
               read once the kernel holds everything, again after --settle seconds. The host
               is then removed (daemon stopped, its lease deleted, namespace deleted).
  * ip -batch: the same number of entries (N neighbours + N routes by `ip -batch`, N FDB
               entries by `bridge -batch`) in a fresh namespace with the same flannel.1
               (bench_vxlan_program.run_batch);
  * backend:   VxlanBackend.reconcile() alone, in-process, same entries
               (bench_vxlan_program.run_ours).

The three alternate per repeat, so that drift hits them alike; medians and ratios are printed.

Then, where the mirror-list time goes: a fresh EtcdRegistry (from the root namespace) lists
all N leases as the daemon does at start (acquire's list without expirations, then the
mirror's list with `expirations=True`, the daemon's default: one TTL lookup per etcd lease),
against the same with `expirations=False`, interleaved --repeats times.

`--variants default,no-expirations` also times a what-if through the real daemon: the same
overlay.daemon main(), started with LeaseMirror defaulting to expirations=False (a two-line
shim given to `python -c`, see NO_EXPIRATIONS_SHIM; overlay/ is not changed).

    .venv/bin/python bench/bench_daemon_coldstart.py                      # 1,000 and 10,000
    .venv/bin/python bench/bench_daemon_coldstart.py --sizes 10000 --repeats 3 \\
        --variants default,no-expirations

Root only. Every namespace, process and the etcd are removed at the end, also on failure.
Nothing is sent anywhere: the leases' public IPs (198.19.0.0/16) are held by no namespace and
no traffic is generated. Not a test: no asserts on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from datetime import datetime
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_overlay import fake_vxlan_value
from bench.bench_vxlan_program import run_batch, run_ours
from integration.containers import SubnetEnv
from integration.lab import Lab, NodeState
from integration.netns import run
from subnetmgr.etcdconn import EtcdOptions
from subnetmgr.registry import EtcdRegistry

NETWORK = "10.128.0.0/9"
POOL = IPv4Network("10.192.0.0/10")  # 16,384 /24s for the remote leases, inside NETWORK
SETTLE = 1.5
"""Seconds after a namespace holding 3N entries is deleted: the kernel tears it down in the
background (holding the rtnl lock), which must not land in the next timing."""

NO_EXPIRATIONS_SHIM = (
    "import functools, sys; import subnetmgr.manager as m; "
    "m.LeaseMirror.__init__ = functools.partialmethod(m.LeaseMirror.__init__, "
    "expirations=False); from overlay.daemon import main; sys.exit(main())"
)

# Phases: (name, the log line that ends it). The first starts at the spawn.
PHASES = (
    ("start+imports+iface", "overlayd: using interface "),
    ("etcd+config", "overlayd: network "),
    ("prepare+acquire", "overlayd: acquired lease "),
    ("start+subnet.env+masq", "overlayd: ready"),
    ("mirror list", " leases at revision "),
    ("peer events", "overlayd: peer added: "),  # the last one
    ("first full reconcile", "vxlan reconcile (full): "),
)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class ColdStartLab(Lab):
    """The lab, with the daemon's command line swapped for the what-if variant when asked."""

    variant = "default"

    def daemon_argv(self, node: NodeState) -> list[str]:
        argv = super().daemon_argv(node)
        if self.variant == "no-expirations":
            at = argv.index("-m")
            assert argv[at + 1] == "overlay.daemon"
            argv[at : at + 2] = ["-c", NO_EXPIRATIONS_SHIM]
        return argv


# --------------------------------------------------------------------------- leases in etcd


async def write_leases(lab: Lab, first: int, last: int, shared: bool) -> None:
    """Leases pool[first:last], each with its own etcd lease (or one shared), 100 in flight."""
    import aetcd

    host, _, port = lab.state.etcd_endpoint.removeprefix("http://").rpartition(":")
    client = aetcd.Client(host=host, port=int(port), timeout=10)
    prefix = f"{lab.state.prefix}/subnets/"
    subnets = list(POOL.subnets(new_prefix=24))
    try:
        common = await asyncio.wait_for(client.lease(86400), 10) if shared else None

        async def put(i: int) -> None:
            grant = common or await asyncio.wait_for(client.lease(86400), 10)
            sub = subnets[i]
            key = f"{prefix}{sub.network_address}-{sub.prefixlen}".encode()
            await asyncio.wait_for(client.put(key, fake_vxlan_value(i), lease=grant), 10)

        for start in range(first, last, 100):
            await asyncio.gather(*(put(i) for i in range(start, min(start + 100, last))))
    finally:
        await client.close()


# --------------------------------------------------------------------------- the daemon


async def kernel_counts(ns: str) -> tuple[int, int, int]:
    """(permanent neighbours, FDB entries with a dst, routes) on flannel.1 in `ns`."""
    neigh = await run("ip", "neigh", "show", "dev", "flannel.1", "nud", "permanent", ns=ns)
    fdb = await run("bridge", "fdb", "show", "dev", "flannel.1", ns=ns)
    routes = await run("ip", "route", "show", "dev", "flannel.1", ns=ns)
    return (
        len(neigh.splitlines()),
        sum(1 for line in fdb.splitlines() if " dst " in line),
        len(routes.splitlines()),
    )


async def route_count(ns: str) -> int:
    out = await run("ip", "route", "show", "dev", "flannel.1", ns=ns, check=False)
    return len(out.splitlines())


def proc_figures(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (MiB) and CPU time (user + system, s) of a process."""
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    stat = Path(f"/proc/{pid}/stat").read_text()
    ticks = stat.rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    return {
        "rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "hwm_mib": round(int(fields["VmHWM"].split()[0]) / 1024, 1),
        "cpu_s": round((int(ticks[11]) + int(ticks[12])) / hz, 2),
    }


def log_time(line: str) -> float | None:
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def phases(log_text: str, spawned: float) -> dict[str, float]:
    """Seconds per phase from the daemon's log (a phase whose line is missing is left out)."""
    ends: dict[str, float] = {}
    for line in log_text.splitlines():
        for name, marker in PHASES:
            if marker in line and (name == "peer events" or name not in ends):
                t = log_time(line)
                if t is not None:
                    ends[name] = t
    out: dict[str, float] = {}
    prev = spawned
    for name, _ in PHASES:
        if name in ends:
            out[name] = round(ends[name] - prev, 3)
            prev = ends[name]
    return out


async def cold_start(lab: ColdStartLab, n: int, poll: float, settle: float) -> dict[str, Any]:
    """Start overlayd in a fresh host; seconds until its kernel holds all 3N entries."""
    # Namespace, underlay veth and address: made before the clock starts. (_make_host is the
    # lab's own step of add_nodes; add_nodes itself would also wait for readiness.)
    node = await lab._make_host()
    ns = node.ns
    spawned = time.time()
    t0 = time.monotonic()
    starting = asyncio.create_task(lab.start_daemon(node.index, ready_timeout=120))
    try:
        while True:
            if starting.done() and starting.exception() is not None:
                raise starting.exception()  # type: ignore[misc]
            if await route_count(ns) >= n and await kernel_counts(ns) == (n, n, n):
                break
            if time.monotonic() - t0 > 300:
                raise RuntimeError(f"{ns}: the daemon did not program {n} leases in 300 s")
            await asyncio.sleep(poll)
        elapsed = time.monotonic() - t0
        await starting
        assert node.daemon_pid is not None
        at_done = proc_figures(node.daemon_pid)
        await asyncio.sleep(settle)
        later = proc_figures(node.daemon_pid)
        log_text = (lab.node_dir(node.index) / "overlayd.log").read_text(errors="replace")
        bad = [line for line in log_text.splitlines() if " ERROR " in line or "Traceback" in line]
        if bad:  # a start that went wrong is no figure
            raise RuntimeError(f"{ns}: overlayd logged errors:\n" + "\n".join(bad[:10]))
        env = SubnetEnv.read(lab.subnet_file(node.index))
        node.subnet = str(env.subnet)  # so that remove_node deletes its lease
        lab.save()
        return {
            "total_s": round(elapsed, 3),
            "phases_s": phases(log_text, spawned),
            "at_done": at_done,
            "after_settle": later,
        }
    finally:
        if not starting.done():
            starting.cancel()
        await lab.remove_node(node.index)
        await asyncio.sleep(SETTLE)


# --------------------------------------------------------------------------- the mirror's list


async def list_like_daemon(lab: Lab, expirations: bool) -> tuple[float, float, int]:
    """A fresh registry: acquire's list (no expirations), then the mirror's list, timed:
    (wall seconds, this process's CPU seconds, leases listed)."""
    opts = EtcdOptions(endpoints=(lab.state.etcd_endpoint,), prefix=lab.state.prefix, timeout=30)
    registry = await EtcdRegistry.connect(opts)
    try:
        await registry.list_leases(expirations=False)
        t0, c0 = time.perf_counter(), time.process_time()
        leases, _revision = await registry.list_leases(expirations=expirations)
        return time.perf_counter() - t0, time.process_time() - c0, len(leases)
    finally:
        await registry.close()


async def import_figures() -> tuple[float, float]:
    """A fresh interpreter importing overlay.daemon (what every start pays): seconds, and its
    RSS in MiB after the import (the part of the daemon's memory that no lease adds)."""
    # VmRSS, not getrusage's ru_maxrss: that one keeps the forking parent's peak across exec.
    code = (
        "import overlay.daemon; print(open('/proc/self/status').read()"
        ".split('VmRSS:')[1].split()[0])"
    )
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError("importing overlay.daemon failed")
    return elapsed, int(out) / 1024


# --------------------------------------------------------------------------- main


def med(values: list[float]) -> float:
    return round(statistics.median(values), 3)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    sizes = sorted(int(x) for x in args.sizes.split(","))
    variants = args.variants.split(",")
    for v in variants:
        if v not in ("default", "no-expirations"):
            raise SystemExit(f"--variants: {v!r} is not one of default, no-expirations")
    if sizes[0] < 1:
        raise SystemExit("--sizes: at least 1 lease (the clock stops on the kernel's entries)")
    if sizes[-1] > POOL.num_addresses // 256:
        raise SystemExit(f"--sizes: at most {POOL.num_addresses // 256} leases")
    lab = ColdStartLab(f"cs{uuid.uuid4().hex[:6]}", progress=log)
    results: list[dict[str, Any]] = []
    try:
        await lab.up(
            nodes=0,
            backend="vxlan",
            containers_per_node=0,
            network=NETWORK,
            resync_period=args.resync_period,
        )
        written = 0
        for n in sizes:
            log(f"writing leases {written}..{n} into etcd ...")
            await write_leases(lab, written, n, args.shared_etcd_lease)
            written = n
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
            batch: list[float] = []
            backend: list[float] = []
            imports: list[float] = []
            import_rss: list[float] = []
            for r in range(args.repeats):
                for v in variants:
                    lab.variant = v
                    got = await cold_start(lab, n, args.poll, args.settle)
                    runs[v].append(got)
                    log(f"N={n} run {r + 1} {v}: {json.dumps(got)}")
                batch.append(await run_batch(n))
                backend.append(await run_ours(n))
                seconds, mib = await import_figures()
                imports.append(seconds)
                import_rss.append(mib)
                log(f"N={n} run {r + 1}: ip -batch {batch[-1]:.3f} s, backend {backend[-1]:.3f} s")
            lists: dict[str, list[float]] = {"expirations": [], "no expirations": []}
            list_cpu: dict[str, list[float]] = {"expirations": [], "no expirations": []}
            for _ in range(args.repeats):
                for key, exp in (("expirations", True), ("no expirations", False)):
                    seconds, cpu, count = await list_like_daemon(lab, exp)
                    if count != n:
                        raise RuntimeError(f"listed {count} leases, expected {n}")
                    lists[key].append(seconds)
                    list_cpu[key].append(cpu)
            entry: dict[str, Any] = {
                "leases": n,
                "repeats": args.repeats,
                "ip_batch_s": med(batch),
                "backend_s": med(backend),
                "import_s": med(imports),
                "import_rss_mib": round(statistics.median(import_rss), 1),
                "list_s": {k: med(v) for k, v in lists.items()},
                "list_cpu_s": {k: med(v) for k, v in list_cpu.items()},
                "variants": {},
            }
            for v, vr in runs.items():
                names = [name for name, _ in PHASES]
                entry["variants"][v] = {
                    "total_s": med([x["total_s"] for x in vr]),
                    "totals_s": [x["total_s"] for x in vr],
                    # spawn until the daemon logged the end of its first full pass (the
                    # kernel had acknowledged every entry): no poll delay in it
                    "logged_s": med([sum(x["phases_s"].values()) for x in vr]),
                    "phases_s": {
                        name: med([x["phases_s"][name] for x in vr if name in x["phases_s"]])
                        for name in names
                        if any(name in x["phases_s"] for x in vr)
                    },
                    "rss_mib_at_done": med([x["at_done"]["rss_mib"] for x in vr]),
                    "rss_mib": med([x["after_settle"]["rss_mib"] for x in vr]),
                    "hwm_mib": med([x["after_settle"]["hwm_mib"] for x in vr]),
                    "cpu_s_at_done": med([x["at_done"]["cpu_s"] for x in vr]),
                }
            results.append(entry)
    finally:
        await lab.down()
    return {"load_at_end": [round(x, 2) for x in os.getloadavg()], "sizes": results}


def report(result: dict[str, Any], poll: float) -> None:
    for e in result["sizes"]:
        n = e["leases"]
        print(f"\n{n} remote vxlan leases ({3 * n} kernel entries), median of {e['repeats']}")
        print(
            f"  baseline ip -batch + bridge -batch: {e['ip_batch_s']:.3f} s; "
            f"backend alone (in-process reconcile): {e['backend_s']:.3f} s; "
            f"python -c 'import overlay.daemon': {e['import_s']:.3f} s, "
            f"{e['import_rss_mib']} MiB RSS"
        )
        for v, d in e["variants"].items():
            t = d["total_s"]
            print(
                f"  daemon ({v}): {t:.3f} s from spawn until the kernel held all entries "
                f"(poll {poll} s; runs {d['totals_s']}); x{t / e['ip_batch_s']:.1f} ip -batch, "
                f"x{t / e['backend_s']:.1f} backend alone"
            )
            print(f"    until the first full pass was logged: {d['logged_s']:.3f} s")
            print(
                f"    when the kernel held everything: RSS {d['rss_mib_at_done']} MiB, CPU "
                f"{d['cpu_s_at_done']} s; --settle s later: RSS {d['rss_mib']} MiB, peak "
                f"(VmHWM) {d['hwm_mib']} MiB"
            )
            for name, secs in d["phases_s"].items():
                print(f"    {name:>22}: {secs:.3f} s")
        ls = e["list_s"]
        print(
            f"  mirror list after acquire's list (fresh registry): with expirations "
            f"{ls['expirations']:.3f} s, without {ls['no expirations']:.3f} s "
            f"(x{ls['expirations'] / max(ls['no expirations'], 1e-9):.1f}); client CPU "
            f"{e['list_cpu_s']['expirations']:.3f} s vs {e['list_cpu_s']['no expirations']:.3f} s"
        )
    print(f"\nload average at the end: {result['load_at_end']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="remote leases, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--poll", type=float, default=0.1, help="kernel poll interval, s")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="s after completion before the 2nd RSS read"
    )
    parser.add_argument(
        "--resync-period",
        default=None,
        help="passed to overlayd (e.g. 1 with --settle 5: the 2nd RSS read follows a few "
        "periodic full passes)",
    )
    parser.add_argument(
        "--variants",
        default="default",
        help="default (the daemon as it is) and/or no-expirations (what-if, see the docstring)",
    )
    parser.add_argument(
        "--shared-etcd-lease",
        action="store_true",
        help="all remote leases on one etcd lease (one TTL lookup instead of N)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_daemon_coldstart: run as root (network namespaces)", file=sys.stderr)
        return 2
    result = asyncio.run(main_async(args))
    report(result, args.poll)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
