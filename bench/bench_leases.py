"""Benchmark: lease acquisition and mirror catch-up against a real local etcd.

Each figure is measured side by side with a baseline in the same run, against the same etcd:

1. N hosts acquire a lease at once (SubnetManager.acquire: list, choose, grant, transaction,
   retry on conflict). Baseline: the same N keys written with a granted etcd lease by raw
   aetcd puts, no list and no transaction (the least any writer must do).
   With --serial N, also N hosts joining one after another (each with its own connection),
   against the same puts done one after another.
   For the rows of hosts at once, "client cpu" is this process's CPU time: all N simulated
   hosts run in it, so it shows what the client side costs apart from etcd.
2. A fresh LeaseMirror catches up with M existing leases, one etcd lease each (as every flannel
   host has). Baseline: one raw aetcd get_prefix of the same range, values left undecoded.

Run:  .venv/bin/python bench/bench_leases.py [--hosts 100 1000] [--serial 1000] [--leases 10000]
Prints one table; quote the ratios, single figures are noisy on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from functools import partial
from ipaddress import IPv4Address, IPv4Network

import aetcd

from integration.etcdserver import EtcdServer
from subnetmgr.manager import LeaseMirror, SubnetManager
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig, Subnet, subnet_key
from subnetmgr.registry import EtcdOptions, EtcdRegistry

CONNECTIONS = 16
"""gRPC channels shared by the simulated hosts (a real host has one; 1,000 would measure
the client machine, not the protocol)."""


def attrs(i: int) -> LeaseAttrs:
    return LeaseAttrs(
        IPv4Address(int(IPv4Address("172.16.0.1")) + i),
        None,
        "vxlan",
        {"VNI": 1, "VtepMAC": f"02:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01"},
    )


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def timed(fn: Callable[[], Awaitable[object]]) -> tuple[float, object]:
    t0 = time.perf_counter()
    try:
        result: object = await fn()
    except Exception as e:  # counted as a failure by the caller
        result = e
    return time.perf_counter() - t0, result


async def bench_acquire(server: EtcdServer, n: int, run: int) -> dict[str, float]:
    prefix = f"/bench-{run}/coreos.com/network"
    cfg = NetworkConfig.from_dict({"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}})
    regs = [
        await EtcdRegistry.connect(EtcdOptions(endpoints=(server.endpoint,), prefix=prefix))
        for _ in range(CONNECTIONS)
    ]
    try:
        managers = [SubnetManager(regs[i % CONNECTIONS]) for i in range(n)]
        c0, t0 = time.process_time(), time.perf_counter()
        results = await asyncio.gather(
            *(timed(partial(m.acquire, cfg, attrs(i))) for i, m in enumerate(managers))
        )
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        ok = [d for d, r in results if isinstance(r, Lease)]
        failed = [r for _, r in results if not isinstance(r, Lease)]
        subnets = {r.subnet for _, r in results if isinstance(r, Lease)}
        assert len(subnets) == len(ok), "two hosts got the same subnet"
        if failed:
            logging.getLogger("bench").warning("%d failed, e.g. %s", len(failed), failed[0])
        return {"total": total, "p50": pct(ok, 50), "p99": pct(ok, 99), "ok": len(ok), "cpu": cpu}
    finally:
        for reg in regs:
            await reg.close()


async def bench_acquire_serial(server: EtcdServer, n: int) -> dict[str, float]:
    """n hosts joining one after another: the cost one host pays with up to n-1 leases there."""
    prefix = "/bench-serial/coreos.com/network"
    cfg = NetworkConfig.from_dict({"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}})
    opts = EtcdOptions(endpoints=(server.endpoint,), prefix=prefix)
    times = []
    t0 = time.perf_counter()
    for i in range(n):
        # A new connection per host, as a joining host has (its TTL cache starts empty too).
        async with await EtcdRegistry.connect(opts) as reg:
            t1 = time.perf_counter()
            await SubnetManager(reg).acquire(cfg, attrs(i))
            times.append(time.perf_counter() - t1)
    total = time.perf_counter() - t0
    return {"total": total, "p50": pct(times, 50), "p99": pct(times, 99), "ok": len(times)}


async def baseline_serial(server: EtcdServer, n: int) -> dict[str, float]:
    prefix = "/base-serial/coreos.com/network/subnets/"
    host, port = server.endpoint.rsplit("//", 1)[1].rsplit(":", 1)
    times = []
    t0 = time.perf_counter()
    for i in range(n):
        async with aetcd.Client(host=host, port=int(port), timeout=5) as c:
            t1 = time.perf_counter()
            lease = await c.lease(86400)
            key = prefix + subnet_key(IPv4Network((int(IPv4Address("10.0.1.0")) + 256 * i, 24)))
            await c.put(key.encode(), attrs(i).to_json().encode(), lease=lease.id)
            times.append(time.perf_counter() - t1)
    total = time.perf_counter() - t0
    return {"total": total, "p50": pct(times, 50), "p99": pct(times, 99), "ok": len(times)}


async def baseline_acquire(server: EtcdServer, n: int, run: int) -> dict[str, float]:
    prefix = f"/base-{run}/coreos.com/network/subnets/"
    host, port = server.endpoint.rsplit("//", 1)[1].rsplit(":", 1)
    clients = [aetcd.Client(host=host, port=int(port), timeout=5) for _ in range(CONNECTIONS)]
    try:

        async def one(i: int) -> bool:
            c = clients[i % CONNECTIONS]
            lease = await c.lease(86400)
            key = prefix + subnet_key(IPv4Network((int(IPv4Address("10.0.1.0")) + 256 * i, 24)))
            await c.put(key.encode(), attrs(i).to_json().encode(), lease=lease.id)
            return True

        c0, t0 = time.process_time(), time.perf_counter()
        results = await asyncio.gather(*(timed(partial(one, i)) for i in range(n)))
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        ok = [d for d, r in results if r is True]
        return {"total": total, "p50": pct(ok, 50), "p99": pct(ok, 99), "ok": len(ok), "cpu": cpu}
    finally:
        for c in clients:
            await c.close()


async def fill(server: EtcdServer, prefix: str, m: int) -> None:
    """Write m leases (a /16 in /30s), each with its own etcd lease, as m hosts would."""
    host, port = server.endpoint.rsplit("//", 1)[1].rsplit(":", 1)
    clients = [aetcd.Client(host=host, port=int(port), timeout=10) for _ in range(CONNECTIONS)]
    sem = asyncio.Semaphore(128)
    base = int(IPv4Address("10.200.0.0"))

    async def one(i: int) -> None:
        async with sem:
            c = clients[i % CONNECTIONS]
            lease = await c.lease(86400)
            key = f"{prefix}/subnets/{subnet_key(IPv4Network((base + 4 * (i + 1), 30)))}"
            await c.put(key.encode(), attrs(i).to_json().encode(), lease=lease.id)

    try:
        await asyncio.gather(*(one(i) for i in range(m)))
    finally:
        for c in clients:
            await c.close()


async def bench_mirror(server: EtcdServer, prefix: str, m: int, expirations: bool) -> float:
    opts = EtcdOptions(endpoints=(server.endpoint,), prefix=prefix, timeout=30)
    async with await EtcdRegistry.connect(opts) as reg:
        mirror = LeaseMirror(reg, expirations=expirations)
        done = asyncio.Event()

        async def on_change(snapshot: object, changed: set[Subnet]) -> None:
            done.set()

        t0 = time.perf_counter()
        task = asyncio.create_task(mirror.run(on_change))
        await done.wait()
        elapsed = time.perf_counter() - t0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert len(mirror.snapshot) == m, (len(mirror.snapshot), m)
        return elapsed


async def baseline_mirror(server: EtcdServer, prefix: str, m: int) -> float:
    host, port = server.endpoint.rsplit("//", 1)[1].rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port), timeout=30) as c:
        t0 = time.perf_counter()
        got = await c.get_prefix(f"{prefix}/subnets/".encode())
        elapsed = time.perf_counter() - t0
        assert len(got) == m
        return elapsed


def row(name: str, ours: dict[str, float], base: dict[str, float]) -> tuple[str, str, str, str]:
    def fmt(r: dict[str, float]) -> str:
        cpu = f" client cpu {r['cpu']:.2f}s" if "cpu" in r else ""
        return (
            f"total {r['total']:.2f}s p50 {r['p50'] * 1e3:.1f}ms "
            f"p99 {r['p99'] * 1e3:.1f}ms ({r['ok']:.0f} ok){cpu}"
        )

    ratio = (
        f"total {ours['total'] / base['total']:.1f}x, p50 {ours['p50'] / base['p50']:.1f}x, "
        f"p99 {ours['p99'] / base['p99']:.1f}x"
    )
    return name, fmt(ours), fmt(base), ratio


async def main(hosts: list[int], leases: int, serial: int) -> None:
    rows: list[tuple[str, str, str, str]] = []
    with EtcdServer() as server:
        for run, n in enumerate(hosts):
            base = await baseline_acquire(server, n, run)
            ours = await bench_acquire(server, n, run)
            rows.append(row(f"acquire, {n} hosts at once", ours, base))
        if serial:
            base = await baseline_serial(server, serial)
            ours = await bench_acquire_serial(server, serial)
            rows.append(row(f"acquire, {serial} hosts one by one", ours, base))
        prefix = "/bench-mirror/coreos.com/network"
        t0 = time.perf_counter()
        await fill(server, prefix, leases)
        fill_time = time.perf_counter() - t0
        base_t = await baseline_mirror(server, prefix, leases)
        for expirations in (True, False):
            ours_t = await bench_mirror(server, prefix, leases, expirations)
            what = "with" if expirations else "without"
            rows.append(
                (
                    f"fresh mirror, {leases} leases, {what} expiry lookups",
                    f"{ours_t:.2f}s",
                    f"{base_t:.2f}s (raw get_prefix)",
                    f"{ours_t / base_t:.1f}x",
                )
            )
    print(f"(writing {leases} leases with their etcd leases took {fill_time:.1f}s)")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("measure", "overlay subnetmgr", "baseline (raw aetcd)", "ratio ours/baseline")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    for line in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--leases", type=int, default=10_000)
    parser.add_argument("--serial", type=int, default=1000, help="hosts joining one by one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # A SIGTERM unwinds like Ctrl-C, so that the etcd server and its data dir are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    asyncio.run(main(args.hosts, args.leases, args.serial))
