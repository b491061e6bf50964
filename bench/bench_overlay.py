"""Overlay benchmarks on the namespace lab (integration.lab), side by side in one run.

1. Throughput: iperf3 TCP, container to container across the overlay (h1c0 -> h2c0), against
   the raw underlay (host h1 -> host h2 over the same veth/bridge underlay), rounds alternating,
   reported as medians and the overlay/underlay ratio. Once per backend (vxlan, udp, host-gw:
   host-gw has no encapsulation, so it should sit close to direct_c2c below). In the
   same rounds, to say where the gap goes (PATHS): the underlay at the overlay's MSS, host to
   host through the overlay device (encapsulation alone), and container to container without
   encapsulation (host-gw style /32 routes: the container path alone). `--split-cpus` repeats
   every path with one CPU per host; `--ablations` measures the overlay with one setting
   changed on both hosts (ABLATIONS), applied and reverted within each round.
2. Lease-event-to-route latency through the real daemon, full vs incremental reconcile side by
   side: two vxlan hosts in one lab, h1's overlayd with OVERLAYD_FULL_RECONCILE=1 (every lease
   event makes a full pass, as before incremental reconcile) and h2's with the default
   (incremental passes over the changed subnets). With N leases already in etcd (and programmed
   on both), write one more lease and time until its route appears in each host namespace
   (`ip monitor route`), M times; p50/p99 per host. Both daemons see each event at the same
   moment and share the machine, so drift hits both alike (but the full host's passes also take
   CPU from the incremental one: `--modes incremental` runs that host alone).

    .venv/bin/python bench/bench_overlay.py                       # both, vxlan, udp, host-gw
    .venv/bin/python bench/bench_overlay.py --backends vxlan,host-gw --skip-latency
    .venv/bin/python bench/bench_overlay.py --backends vxlan --seconds 5 --rounds 3
    .venv/bin/python bench/bench_overlay.py --skip-throughput --leases 1000 --events 50
    .venv/bin/python bench/bench_overlay.py --skip-throughput --leases 1000,10000 --events 100
    .venv/bin/python bench/bench_overlay.py --skip-throughput --leases 10000 --modes incremental
    .venv/bin/python bench/bench_overlay.py --realtime   # iperf3 under SCHED_FIFO: less noise
    .venv/bin/python bench/bench_overlay.py --backends vxlan --skip-latency --realtime \
        --split-cpus --ablations no-br-nf,eth0-gro,no-tx-csum,notrack,no-masq-rules

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

from integration.containers import SubnetEnv
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


async def iperf(ns: str, target: str, seconds: int, rt: list[str], *extra: str) -> float:
    """Gbit/s received by the server of one iperf3 TCP run from namespace `ns`."""
    out = await run(
        *rt, "iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", *extra,
        ns=ns, limit=seconds + 30,
    )  # fmt: skip
    doc = json.loads(out)
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9


PATHS = ("underlay", "overlay", "underlay_mss", "overlay_host", "direct_c2c")
"""What `throughput` measures, one iperf3 run each per round, in this order:

- underlay: host h1 -> host h2 on the underlay (eth0 -> br0 -> eth0), MSS from MTU 1500.
- overlay: container h1c0 -> container h2c0 across the overlay (the headline figure).
- underlay_mss: the underlay again with the overlay's MSS (`-M`, overlay MTU - 52): how much of
  the gap is the smaller payload per packet alone.
- overlay_host: host h1 -> h2's overlay address (the lease's network address on flannel.1 or
  flannel0; with host-gw, which has no device, h2's cni0 address): the encapsulation alone,
  without the container veths, cni0 and forwarding.
- direct_c2c: container -> container without encapsulation: for this run only, a /32 route
  to the other container via the other host's underlay address on each host (as host-gw
  would route), so the same veths, cni0, forwarding and --ip-masq rules, minus the overlay.
"""


async def _direct_routes(lab: Lab, add: bool) -> None:
    """/32 routes container -> other host's eth0 (host-gw style) on both hosts, or remove them."""
    h1, h2 = lab.state.nodes
    for here, there in ((h1, h2), (h2, h1)):
        dst = there.containers[0].ip
        if add:
            await run("ip", "route", "replace", f"{dst}/32", "via", there.ip, "dev", "eth0",
                      ns=here.ns)  # fmt: skip
        else:
            await run("ip", "route", "del", f"{dst}/32", ns=here.ns, check=False)


# Ablations: (command to apply, command to revert), run in both host namespaces; "{dev}" is
# the backend's device (flannel.1 or flannel0). Each is one setting an operator could change.
ABLATIONS: dict[str, tuple[list[str], list[str]]] = {
    # bridged frames on cni0 skip iptables (br_netfilter's hook); kube-proxy needs it on
    "no-br-nf": (
        ["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"],
        ["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"],
    ),
    # GRO and UDP GRO forwarding on the underlay interface (so VXLAN GRO can happen there)
    "eth0-gro": (
        ["ethtool", "-K", "eth0", "gro", "on", "rx-udp-gro-forwarding", "on"],
        ["ethtool", "-K", "eth0", "gro", "off", "rx-udp-gro-forwarding", "off"],
    ),
    # flannel's workaround for the NAT checksum bug (Backend.DisableTxChecksumOffload)
    "no-tx-csum": (
        ["ethtool", "-K", "{dev}", "tx-checksum-ip-generic", "off"],
        ["ethtool", "-K", "{dev}", "tx-checksum-ip-generic", "on"],
    ),
    # no connection tracking at all (breaks --ip-masq's NAT: a cost probe, not advice)
    "notrack": (
        [
            "sh",
            "-c",
            "iptables -t raw -I PREROUTING -j NOTRACK && iptables -t raw -I OUTPUT -j NOTRACK",
        ],
        [
            "sh",
            "-c",
            "iptables -t raw -D PREROUTING -j NOTRACK; iptables -t raw -D OUTPUT -j NOTRACK",
        ],
    ),
    # the masquerade rules' nat chain bypassed (the daemon's rules stay; -t nat only)
    "no-masq-rules": (
        ["iptables", "-t", "nat", "-I", "POSTROUTING", "-j", "ACCEPT"],
        ["iptables", "-t", "nat", "-D", "POSTROUTING", "-j", "ACCEPT"],
    ),
}


async def _ablate(lab: Lab, name: str, on: bool) -> None:
    dev = {"vxlan": "flannel.1", "udp": "flannel0"}.get(lab.state.backend)
    if dev is None and any("{dev}" in x for x in ABLATIONS[name][0]):
        raise ValueError(f"ablation {name} needs an overlay device; {lab.state.backend} has none")
    argv = [x.replace("{dev}", dev) for x in ABLATIONS[name][0 if on else 1]]
    for node in lab.state.nodes:
        await run(*argv, ns=node.ns)


async def _split_cpus(lab: Lab, servers: list[int], on: bool) -> None:
    """Host h1 (the sender) on CPU 0, host h2 (the receiver) on CPU 1, or back to any CPU.

    On two real machines the receiving host's packet processing runs on the receiver's CPUs.
    In the lab a veth delivers in the sender's context, so h2's whole receive path (underlay
    eth0, decapsulation, cni0, the container's veth) runs on the sending CPU unless receive
    packet steering (RPS) on each host's underlay eth0 hands it to that host's CPU. The iperf3
    servers (in h2 and h2c0) are pinned to CPU 1, the clients (--split-cpus: taskset) to CPU 0.
    """
    h1, h2 = lab.state.nodes
    for node, mask in ((h1, "1"), (h2, "2")):
        rps = "/sys/class/net/eth0/queues/rx-0/rps_cpus"
        await run("sh", "-c", f"echo {mask if on else 0} > {rps}", ns=node.ns)
    any_cpu = f"0-{(os.cpu_count() or 1) - 1}"
    for pid in servers:
        await run("taskset", "-a", "-p", "-c", "1" if on else any_cpu, str(pid))


async def throughput(
    backend: str,
    seconds: int,
    rounds: int,
    realtime: bool,
    split: bool = False,
    ablations: tuple[str, ...] = (),
) -> dict[str, Any]:
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}: use some of {', '.join(ABLATIONS)}")
    if split and (os.cpu_count() or 1) < 2:
        raise ValueError(f"--split-cpus needs 2 CPUs, this machine has {os.cpu_count()}")
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
        assert c2.ip is not None and c1.ip is not None and h2.subnet is not None
        for ns in (h2.ns, c2.ns):
            servers.append(
                await asyncio.create_subprocess_exec(
                    *in_ns(ns, [*rt, "iperf3", "-s", "-p", str(IPERF_PORT)]),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
            await wait_listening(ns, IPERF_PORT)
        env = SubnetEnv.read(lab.subnet_file(h1.index))
        overlay_mss = str(env.mtu - 52)  # IPv4 + TCP headers with timestamps
        # host-gw has no overlay device: h2's own address in its subnet is cni0's (.1).
        h2_overlay_ip = str(
            IPv4Network(h2.subnet).network_address + (1 if backend == "host-gw" else 0)
        )
        # With --split-cpus every round measures all paths twice, as is and with one CPU per
        # host, side by side.
        settings = ("", "+split") if split else ("",)
        server_pids = [srv.pid for srv in servers]
        rt_all = rt
        runs: dict[str, list[float]] = {p + st: [] for st in settings for p in PATHS}
        runs |= {f"overlay:{a}": [] for a in ablations}
        for r in range(rounds):
            for st in settings:
                await _split_cpus(lab, server_pids, on=bool(st))
                rt = [*rt_all, "taskset", "-c", "0"] if st else rt_all
                runs["underlay" + st].append(await iperf(h1.ns, h2.ip, seconds, rt))
                runs["overlay" + st].append(await iperf(c1.ns, c2.ip, seconds, rt))
                runs["underlay_mss" + st].append(
                    await iperf(h1.ns, h2.ip, seconds, rt, "-M", overlay_mss)
                )
                runs["overlay_host" + st].append(await iperf(h1.ns, h2_overlay_ip, seconds, rt))
                await _direct_routes(lab, add=True)
                try:
                    runs["direct_c2c" + st].append(await iperf(c1.ns, c2.ip, seconds, rt))
                finally:
                    await _direct_routes(lab, add=False)
                log(
                    f"{backend} round {r + 1}{st}: "
                    + ", ".join(f"{p} {runs[p + st][-1]:.2f}" for p in PATHS)
                    + " Gbit/s"
                )
            await _split_cpus(lab, server_pids, on=False)
            rt = rt_all
            for a in ablations:
                await _ablate(lab, a, on=True)
                try:
                    runs[f"overlay:{a}"].append(await iperf(c1.ns, c2.ip, seconds, rt))
                finally:
                    await _ablate(lab, a, on=False)
                log(f"{backend} round {r + 1}: overlay with {a}: {runs[f'overlay:{a}'][-1]:.2f}")
        med = {p: statistics.median(v) for p, v in runs.items()}
        under = med["underlay"]
        ratios: dict[str, float] = {}
        for st in settings:
            m = {p: med[p + st] for p in PATHS}
            ratios |= {
                f"overlay/underlay{st}": round(m["overlay"] / m["underlay"], 2),
                f"underlay_mss/underlay{st}": round(m["underlay_mss"] / m["underlay"], 2),
                f"overlay_host/underlay{st}": round(m["overlay_host"] / m["underlay"], 2),
                f"direct_c2c/underlay{st}": round(m["direct_c2c"] / m["underlay"], 2),
                f"overlay/direct_c2c{st}": round(m["overlay"] / m["direct_c2c"], 2),
            }
        for a in ablations:
            ratios[f"overlay:{a}/overlay"] = round(med[f"overlay:{a}"] / med["overlay"], 2)
        return {
            "backend": backend,
            "underlay_gbps": round(under, 2),
            "overlay_gbps": round(med["overlay"], 2),
            "ratio": round(med["overlay"] / under, 2),
            "medians_gbps": {p: round(v, 2) for p, v in med.items()},
            "ratios": ratios,
            "round_ratios": [
                round(o / u, 2) for o, u in zip(runs["overlay"], runs["underlay"], strict=True)
            ],
            "rounds": rounds,
            "seconds": seconds,
            "realtime": realtime,
            "split_cpus": split,
            "runs_gbps": {p: [round(x, 2) for x in v] for p, v in runs.items()},
            "overlay_mss": int(overlay_mss),
            "subnet_env": {"mtu": env.mtu, "ipmasq": env.ipmasq},
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
    ablations = tuple(a for a in args.ablations.split(",") if a)
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise SystemExit(f"--ablations: unknown {unknown}; use some of {', '.join(ABLATIONS)}")
    if not args.skip_throughput:
        for backend in args.backends.split(","):
            try:
                result["throughput"].append(
                    await throughput(
                        backend,
                        args.seconds,
                        args.rounds,
                        args.realtime,
                        args.split_cpus,
                        ablations,
                    )
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


def ablations_of(t: dict[str, Any]) -> list[str]:
    return [k.split(":", 1)[1] for k in t["medians_gbps"] if k.startswith("overlay:")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="vxlan,udp,host-gw")
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
    parser.add_argument(
        "--split-cpus",
        action="store_true",
        help="also measure every path with one CPU per host, side by side: sender h1 on CPU 0, "
        "receiver h2 on CPU 1 (iperf3 pinned, RPS on each host's underlay eth0), as on two real "
        "machines; needs 2 CPUs (see docs/lab.md)",
    )
    parser.add_argument(
        "--ablations",
        default="",
        help=f"comma-separated, each applied on both hosts, measured (overlay) and reverted "
        f"within every round: {', '.join(ABLATIONS)}",
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
            print(f"{t['backend']:7} throughput: FAILED: {t['error']}")
        else:
            print(
                f"{t['backend']:7} iperf3 TCP: underlay {t['underlay_gbps']:.2f} Gbit/s, "
                f"overlay {t['overlay_gbps']:.2f} Gbit/s, ratio {t['ratio']:.2f} "
                f"(median of {t['rounds']} x {t['seconds']} s)"
            )
            m = t["medians_gbps"]
            for st in ("", "+split") if t["split_cpus"] else ("",):
                print(
                    f"       {st or 'as is'}: underlay {m['underlay' + st]:.2f}, "
                    f"overlay {m['overlay' + st]:.2f}, underlay at MSS {t['overlay_mss']} "
                    f"{m['underlay_mss' + st]:.2f}, overlay host->host "
                    f"{m['overlay_host' + st]:.2f}, container->container without "
                    f"encapsulation {m['direct_c2c' + st]:.2f} Gbit/s"
                )
            for a in ablations_of(t):
                print(f"       overlay with {a}: {m['overlay:' + a]:.2f} Gbit/s")
            print("       ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in t["ratios"].items()))
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
