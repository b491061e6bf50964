"""Benchmark: what `overlayctl status` and `doctor` cost in etcd reads, against a real local etcd
holding M leases, each with its own etcd lease (as every flannel host has).

Side by side in one run, against the same etcd:

1. status's etcd read (`overlay.status.read_etcd`: config, every lease decoded and validated,
   expiry lookups through the subnet manager's registry). Baseline: one raw aetcd get_prefix of
   the same range, values left undecoded.
2. doctor's read (`read_etcd(ttls=True)`: the same, plus each etcd lease's time to live and
   granted TTL for the renewal check) with TTL_LOOKUPS_IN_FLIGHT lookups at once. Baseline: the
   same read with one lookup at a time.

Run:  .venv/bin/python bench/bench_doctor.py [--leases 2000] [--rounds 3]
Prints one table (best of the rounds); quote the ratios, single figures are noisy on a shared
2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

import aetcd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_leases import fill

import overlay.status as status
from integration.etcdserver import EtcdServer
from overlay.options import EtcdFlags

PREFIX = "/bench-doctor/coreos.com/network"


def flags(server: EtcdServer) -> EtcdFlags:
    return EtcdFlags((server.endpoint,), PREFIX, None, None, None, None, None, 30.0)


async def best(rounds: int, fn: object) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return min(times)


async def main(leases: int, rounds: int) -> None:
    with EtcdServer() as server:
        t0 = time.perf_counter()
        await fill(server, PREFIX, leases)
        print(
            f"(writing {leases} leases with their etcd leases took {time.perf_counter() - t0:.1f}s)"
        )
        host, port = server.endpoint.rsplit("//", 1)[1].rsplit(":", 1)

        async def raw() -> None:
            async with aetcd.Client(host=host, port=int(port), timeout=30) as c:
                got = await c.get_prefix(f"{PREFIX}/subnets/".encode())
                assert len(got) == leases

        async def status_read() -> None:
            view = await status.read_etcd(flags(server))
            assert view.reachable and len(view.leases) == leases, view.error

        async def doctor_read() -> None:
            view = await status.read_etcd(flags(server), ttls=True)
            assert view.ttl_error is None and len(view.ttls) == leases, view.ttl_error

        base = await best(rounds, raw)
        ours = await best(rounds, status_read)
        in_flight = status.TTL_LOOKUPS_IN_FLIGHT
        doctor_t = await best(rounds, doctor_read)
        status.TTL_LOOKUPS_IN_FLIGHT = 1
        try:
            serial_t = await best(rounds, doctor_read)
        finally:
            status.TTL_LOOKUPS_IN_FLIGHT = in_flight
    rows = [
        ("measure", "ours", "baseline", "ratio ours/baseline"),
        (f"status etcd read, {leases} leases", f"{ours * 1e3:.0f} ms",
         f"{base * 1e3:.1f} ms (raw get_prefix)", f"{ours / base:.1f}x"),
        (f"doctor etcd read (+TTLs, {in_flight} in flight)", f"{doctor_t * 1e3:.0f} ms",
         f"{serial_t * 1e3:.0f} ms (1 in flight)", f"{doctor_t / serial_t:.2f}x"),
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for line in rows:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leases", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    asyncio.run(main(args.leases, args.rounds))
