"""Overlay benchmarks on the namespace lab (integration.lab), side by side in one run.

1. Throughput: iperf3 TCP, container to container across the overlay (h1c0 -> h2c0), against
   the raw underlay (host h1 -> host h2 over the same veth/bridge underlay), rounds alternating,
   reported as medians and the overlay/underlay ratio. Once per backend (vxlan, udp).
2. Lease-event-to-route latency through the real daemon, full vs incremental reconcile side by
   side: two vxlan hosts in one lab, h1's overlayd with OVERLAYD_FULL_RECONCILE=1 (every lease
   event makes a full pass, as before incremental reconcile) and h2's with the default
   (incremental passes over the changed subnets). With N leases already in etcd (and programmed
   on both), write one more lease and time until its route appears in each host namespace
   (`ip monitor route`), M times; p50/p99 per host. Both daemons see each event at the same
   moment and share the machine, so drift hits both alike (but the full host's passes also take
   CPU from the incremental one: `--modes incremental` runs that host alone).

    .venv/bin/python bench/bench_overlay.py                       # both, vxlan and udp
    .venv/bin/python bench/bench_overlay.py --backends vxlan --seconds 5 --rounds 3
    .venv/bin/python bench/bench_overlay.py --skip-throughput --leases 1000 --events 50
    .venv/bin/python bench/bench_overlay.py --skip-throughput --leases 1000,10000 --events 100
    .venv/bin/python bench/bench_overlay.py --skip-throughput --leases 10000 --modes incremental
    .venv/bin/python bench/bench_overlay.py --realtime   # iperf3 under SCHED_FIFO: less noise

Root only. Every lab is torn down at the end, also on failure. Not a test: no asserts on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.lab import Lab
from integration.netns import in_ns, netns_pids, run
from overlay.daemon import FULL_RECONCILE_ENV

IPERF_PORT = 5201


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


async def wait_listening(ns: str, port: int) -> None:
    for _ in range(200):
        if (await run("ss", "-Htln", f"sport = :{port}", ns=ns, check=False)).strip():
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"iperf3 server in {ns} did not start")


async def iperf(ns: str, target: str, seconds: int, rt: list[str]) -> float:
    """Gbit/s received by the server of one iperf3 TCP run from namespace `ns`."""
    out = await run(
        *rt, "iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
        ns=ns, limit=seconds + 30,
    )  # fmt: skip
    doc = json.loads(out)
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9


async def throughput(backend: str, seconds: int, rounds: int, realtime: bool) -> dict[str, Any]:
    rt = ["chrt", "--fifo", "10"] if realtime else []
    lab = Lab(f"b{uuid.uuid4().hex[:6]}", progress=log)
    servers: list[asyncio.subprocess.Process] = []
    try:
        await lab.up(nodes=2, backend=backend, containers_per_node=1)
        h1, h2 = lab.state.nodes
        c1, c2 = h1.containers[0], h2.containers[0]
        if realtime:
            # The daemons too (all their threads and children): the udp backend's data path is
            # in them, and an iperf3 under SCHED_FIFO would otherwise starve it.
            for ns in (h1.ns, h2.ns):
                for pid in await netns_pids(ns):
                    await run("chrt", "--all-tasks", "--fifo", "-p", "10", str(pid))
        assert c2.ip is not None
        for ns in (h2.ns, c2.ns):
            servers.append(
                await asyncio.create_subprocess_exec(
                    *in_ns(ns, [*rt, "iperf3", "-s", "-p", str(IPERF_PORT)]),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
            await wait_listening(ns, IPERF_PORT)
        under: list[float] = []
        over: list[float] = []
        for r in range(rounds):
            under.append(await iperf(h1.ns, h2.ip, seconds, rt))
            over.append(await iperf(c1.ns, c2.ip, seconds, rt))
            log(f"{backend} round {r + 1}: underlay {under[-1]:.2f}, overlay {over[-1]:.2f} Gbit/s")
        mtu = (await run("cat", str(lab.subnet_file(h1.index)))).strip().splitlines()
        return {
            "backend": backend,
            "underlay_gbps": round(statistics.median(under), 2),
            "overlay_gbps": round(statistics.median(over), 2),
            "ratio": round(statistics.median(over) / statistics.median(under), 2),
            "rounds": rounds,
            "seconds": seconds,
            "realtime": realtime,
            "underlay_runs": [round(x, 2) for x in under],
            "overlay_runs": [round(x, 2) for x in over],
            "subnet_env": mtu,
        }
    finally:
        for s in servers:
            if s.returncode is None:
                s.terminate()
                await s.wait()
        await lab.down()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def fake_vxlan_value(i: int) -> bytes:
    mac = bytearray(random.randbytes(6))
    mac[0] = (mac[0] & 0xFE) | 0x02
    # Public IPs in the lab's benchmark range that no namespace holds: routes and FDB entries
    # only, nothing is ever sent to them (no container talks to these subnets).
    ip = IPv4Address("198.19.0.0") + i
    mac_text = ":".join(f"{b:02x}" for b in mac)
    return (
        f'{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan",'
        f'"BackendData":{{"VNI":1,"VtepMAC":"{mac_text}"}}}}'
    ).encode()


async def route_count(ns: str) -> int:
    out = await run("ip", "route", "show", "dev", "flannel.1", ns=ns)
    return len(out.splitlines())


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(samples, 50), 1),
        "p99_ms": round(percentile(samples, 99), 1),
        "max_ms": round(max(samples), 1),
    }


async def lease_latency(
    leases: int, events: int, modes: tuple[str, ...] = ("full", "incremental")
) -> dict[str, Any]:
    import aetcd

    lab = Lab(f"b{uuid.uuid4().hex[:6]}", progress=log)
    monitors: list[asyncio.subprocess.Process] = []
    client: Any = None
    saved = os.environ.pop(FULL_RECONCILE_ENV, None)
    try:
        # One host per mode; a daemon inherits this process's environment: "full" hosts get
        # OVERLAYD_FULL_RECONCILE=1 (every event a full pass), "incremental" ones the default.
        for k, mode in enumerate(modes):
            os.environ.pop(FULL_RECONCILE_ENV, None)
            if mode == "full":
                os.environ[FULL_RECONCILE_ENV] = "1"
            if k == 0:
                await lab.up(
                    nodes=1, backend="vxlan", containers_per_node=0, network="10.128.0.0/9"
                )
            else:
                await lab.add_node()
        os.environ.pop(FULL_RECONCILE_ENV, None)
        nodes = dict(zip(modes, lab.state.nodes, strict=True))
        host, _, port = lab.state.etcd_endpoint.removeprefix("http://").rpartition(":")
        client = aetcd.Client(host=host, port=int(port), timeout=10)
        owns = {IPv4Network(n.subnet) for n in nodes.values()}
        pool = [s for s in IPv4Network("10.192.0.0/10").subnets(new_prefix=24) if s not in owns]
        prefix = f"{lab.state.prefix}/subnets/"
        grant = await client.lease(86400)

        async def put(i: int) -> IPv4Network:
            sub = pool[i]
            key = f"{prefix}{sub.network_address}-{sub.prefixlen}".encode()
            await asyncio.wait_for(client.put(key, fake_vxlan_value(i), lease=grant), 10)
            return sub

        log(f"writing {leases} leases ...")
        t0 = time.monotonic()
        for first in range(0, leases, 100):
            await asyncio.gather(*(put(i) for i in range(first, min(first + 100, leases))))
        for node in nodes.values():  # leases + the other hosts' subnets
            while await route_count(node.ns) < leases + len(nodes) - 1:
                if time.monotonic() - t0 > 600:
                    raise RuntimeError("the daemons did not program the initial leases in 600 s")
                await asyncio.sleep(0.2)
        initial = time.monotonic() - t0
        log(f"{leases} leases written and programmed on every host in {initial:.1f} s")
        streams: dict[str, asyncio.StreamReader] = {}
        for mode, node in nodes.items():
            mon = await asyncio.create_subprocess_exec(
                *in_ns(node.ns, ["ip", "monitor", "route"]), stdout=asyncio.subprocess.PIPE
            )
            monitors.append(mon)
            assert mon.stdout is not None
            streams[mode] = mon.stdout
        await asyncio.sleep(0.3)
        samples: dict[str, list[float]] = {mode: [] for mode in nodes}

        async def seen(mode: str, needle: bytes, t_put: float) -> None:
            while True:
                line = await asyncio.wait_for(streams[mode].readline(), 30)
                if line.startswith(needle):
                    samples[mode].append((time.monotonic() - t_put) * 1000)
                    return

        for e in range(events):
            i = leases + e
            needle = f"{pool[i]} via".encode()
            t_put = time.monotonic()
            await put(i)
            await asyncio.gather(*(seen(mode, needle, t_put) for mode in nodes))
            await asyncio.sleep(0.05)
        out: dict[str, Any] = {
            "leases_present": leases,
            "events": events,
            "initial_program_s": round(initial, 2),
            **{mode: summary(values) for mode, values in samples.items()},
        }
        if len(samples) == 2:
            full, incr = samples["full"], samples["incremental"]
            for p in (50, 99):
                out[f"p{p}_ratio"] = round(percentile(full, p) / percentile(incr, p), 1)
        return out
    finally:
        os.environ.pop(FULL_RECONCILE_ENV, None)
        if saved is not None:
            os.environ[FULL_RECONCILE_ENV] = saved
        for mon in monitors:
            if mon.returncode is None:
                mon.terminate()
                await mon.wait()
        if client is not None:
            await client.close()
        await lab.down()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"throughput": [], "latency": []}
    if not args.skip_throughput:
        for backend in args.backends.split(","):
            try:
                result["throughput"].append(
                    await throughput(backend, args.seconds, args.rounds, args.realtime)
                )
            except Exception as e:  # report the other backend's figures anyway
                log(f"{backend}: failed: {e}")
                result["throughput"].append({"backend": backend, "error": str(e)})
    if not args.skip_latency:
        for n in (int(x) for x in str(args.leases).split(",")):
            modes = tuple(args.modes.split(","))
            result["latency"].append(await lease_latency(n, args.events, modes))
            log(f"latency: {json.dumps(result['latency'][-1])}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="vxlan,udp")
    parser.add_argument("--seconds", type=int, default=5, help="per iperf3 run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--leases", default="1000", help="leases present; a comma-separated list runs each"
    )
    parser.add_argument("--events", type=int, default=50, help="lease events timed")
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="run iperf3 (client and server) under SCHED_FIFO (chrt) so that other load on a "
        "busy machine does not dominate the figures",
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--modes",
        default="full,incremental",
        help="latency: one host per reconcile mode, side by side (full, incremental or both)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_overlay: run as root (network namespaces)", file=sys.stderr)
        return 2
    result = asyncio.run(main_async(args))
    for t in result["throughput"]:
        if "error" in t:
            print(f"{t['backend']:6} throughput: FAILED: {t['error']}")
        else:
            print(
                f"{t['backend']:6} iperf3 TCP: underlay {t['underlay_gbps']:.2f} Gbit/s, "
                f"overlay {t['overlay_gbps']:.2f} Gbit/s, ratio {t['ratio']:.2f} "
                f"(median of {t['rounds']} x {t['seconds']} s)"
            )
    for lat in result["latency"]:
        for mode in ("full", "incremental"):
            if mode not in lat:
                continue
            m = lat[mode]
            print(
                f"lease event -> route, {mode:>11} reconcile: p50 {m['p50_ms']} ms, "
                f"p99 {m['p99_ms']} ms, max {m['max_ms']} ms over {lat['events']} events with "
                f"{lat['leases_present']} leases present"
            )
        if "p50_ratio" not in lat:
            continue
        print(
            f"  full/incremental: p50 x{lat['p50_ratio']}, p99 x{lat['p99_ratio']} "
            f"(initial {lat['leases_present']} programmed on both in {lat['initial_program_s']} s)"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
