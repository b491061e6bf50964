"""Benchmark: what checking etcd's keys and values costs (subnetmgr.model limits,
subnetmgr.validate), each figure side by side with a baseline in the same run.

1. Decoding one lease value as flannel writes it: LeaseAttrs.from_json (size, UTF-8 and depth
   checks, then json.loads and the field checks) against json.loads alone.
2. Refusing hostile values: 64 KiB of "[" (our depth check) against json.loads on it (which
   raises RecursionError), and a 64 KiB string full of brackets (the depth check's worst case:
   it has to walk every bracket) against json.loads of that same value.
3. A fresh LeaseMirror over N leases, in memory (no etcd): with the network config (every
   lease checked, one per subnet) against without a config.
4. The same against a real local etcd: a fresh mirror listing N leases, with the config
   against without.

Run:  .venv/bin/python bench/bench_untrusted.py [--leases 10000]
Quote the ratios; single figures are noisy on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

import aetcd

from integration.etcdserver import EtcdServer
from subnetmgr.manager import LeaseMirror
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig, load_json, subnet_key
from subnetmgr.registry import EtcdOptions, EtcdRegistry
from subnetmgr.validate import IgnoredLeases

CONFIG = NetworkConfig.from_json('{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}')


def value(i: int) -> bytes:
    return (
        LeaseAttrs(
            IPv4Address(int(IPv4Address("172.16.0.1")) + i),
            None,
            "vxlan",
            {"VNI": 1, "VtepMAC": f"02:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01"},
        )
        .to_json()
        .encode()
    )


def per_call(fn: Callable[[], object], n: int) -> float:
    """Best of 5 rounds of `n` calls: seconds per call."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def refuse(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        try:
            return fn()
        except (ValueError, RecursionError):
            return None

    return call


class _Store:
    """What LeaseMirror reads from its registry when it is only fed lists (no etcd)."""

    def __init__(self) -> None:
        self.ignored = IgnoredLeases()


def leases(n: int) -> list[Lease]:
    return [
        Lease(
            IPv4Network((0x0A000000 + (i + 1) * 256, 24)),
            LeaseAttrs.from_json(value(i)),
            None,
            None,
            i + 1,
        )
        for i in range(n)
    ]


def row(name: str, ours: float, base: float, unit: str = "us") -> None:
    scale = 1e6 if unit == "us" else 1e3
    print(f"{name:<46} {ours * scale:>10.1f} {unit}  {base * scale:>10.1f} {unit}  "
          f"{ours / base:>6.2f}x")  # fmt: skip


async def etcd_rows(n: int) -> None:
    server = EtcdServer().start()
    try:
        host, port = server.endpoint.rsplit("//", 1)[1].rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port), timeout=30) as c:
            sem = asyncio.Semaphore(100)

            async def put(i: int) -> None:
                async with sem:
                    subnet = IPv4Network((0x0A000000 + (i + 1) * 256, 24))
                    key = f"/b/coreos.com/network/subnets/{subnet_key(subnet)}"
                    await c.put(key.encode(), value(i))

            await asyncio.gather(*(put(i) for i in range(n)))
        opts = EtcdOptions(endpoints=(server.endpoint,), prefix="/b/coreos.com/network")
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(3):
            for with_config in (False, True):
                async with await EtcdRegistry.connect(opts) as reg:
                    mirror = LeaseMirror(reg, expirations=False,
                                         config=CONFIG if with_config else None)  # fmt: skip
                    t0 = time.perf_counter()
                    task = asyncio.create_task(mirror.run(_noop))
                    await mirror.ready.wait()
                    times[with_config].append(time.perf_counter() - t0)
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    assert len(mirror.snapshot) == n
        row(f"fresh mirror over etcd, {n} leases (best of 3)", min(times[True]),
            min(times[False]), "ms")  # fmt: skip
    finally:
        server.stop()


async def _noop(*_: object) -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leases", type=int, default=10_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"{'measure':<46} {'ours':>13}  {'baseline':>13}  ratio")
    typical = value(7)
    row("decode a flannel lease value (from_json/loads)",
        per_call(lambda: LeaseAttrs.from_json(typical), 20_000),
        per_call(lambda: json.loads(typical), 20_000))  # fmt: skip
    brackets = b"[" * 65_000
    row("refuse 64 KiB of '[' (depth check/loads)",
        per_call(refuse(lambda: load_json(brackets)), 200),
        per_call(refuse(lambda: json.loads(brackets)), 200))  # fmt: skip
    in_string = b'{"PublicIP":"10.0.0.1","x":"' + b"[]{}" * 16_000 + b'"}'
    row("64 KiB string of brackets (load_json/loads)",
        per_call(lambda: load_json(in_string), 50),
        per_call(lambda: json.loads(in_string), 50))  # fmt: skip
    listed = leases(args.leases)
    own = listed[0]

    def fresh(config: NetworkConfig | None) -> Callable[[], object]:
        def go() -> object:
            mirror = LeaseMirror(_Store(), config=config)  # type: ignore[arg-type]
            mirror.set_own(own)
            return mirror._replace(listed)

        return go

    row(f"fresh mirror in memory, {args.leases} leases (config/none)",
        per_call(fresh(CONFIG), 3), per_call(fresh(None), 3), "ms")  # fmt: skip
    asyncio.run(etcd_rows(args.leases))


if __name__ == "__main__":
    main()
