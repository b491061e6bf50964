"""What an IPv6-only network costs next to dual stack: container to container over IPv6.

Run as root:  .venv/bin/python bench/bench_ipv6_only.py [--rounds 5] [--seconds 4]

For vxlan and host-gw: two 2-host labs up at once (integration.lab), one `--ipv6` (dual stack,
the baseline) and one `--ipv6-only` (EnableIPv4 false, hosts without IPv4), and iperf3 TCP from
h1c0 to h2c0 over IPv6 in each, alternating lab by lab for --rounds rounds of --seconds; then
the time one `Lab.add_node()` takes in each (a daemon start to /readyz and its container: the
lease, the device, subnet.env, the CNI ADD). Medians, and the ratio IPv6-only / dual stack.
Everything happens inside namespaces the labs create and delete; traffic stays inside them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overlay import IPERF_PORT, iperf, wait_listening

from integration.lab import Lab
from integration.netns import in_ns


async def _server(lab: Lab) -> tuple[asyncio.subprocess.Process, str, str]:
    (_, c1), (_, c2) = lab.containers()[:2]
    assert c2.ip6 is not None
    proc = await asyncio.create_subprocess_exec(
        *in_ns(c2.ns, ["iperf3", "-s", "-p", str(IPERF_PORT)]),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await wait_listening(c2.ns, IPERF_PORT)
    return proc, c1.ns, c2.ip6


async def compare(backend: str, rounds: int, seconds: int, joins: int) -> None:
    labs = {
        "dual": Lab(f"bd{uuid.uuid4().hex[:6]}"),
        "only6": Lab(f"bo{uuid.uuid4().hex[:6]}"),
    }
    servers: list[asyncio.subprocess.Process] = []
    try:
        await labs["dual"].up(nodes=2, backend=backend, ipv6=True)
        await labs["only6"].up(nodes=2, backend=backend, ipv6_only=True)
        ends = {}
        for name, lab in labs.items():
            proc, src, dst = await _server(lab)
            servers.append(proc)
            ends[name] = (src, dst)
        gbits: dict[str, list[float]] = {name: [] for name in labs}
        for _ in range(rounds):
            for name, (src, dst) in ends.items():
                gbits[name].append(await iperf(src, dst, seconds, []))
        join: dict[str, list[float]] = {name: [] for name in labs}
        for _ in range(joins):
            for name, lab in labs.items():
                start = time.perf_counter()
                node = await lab.add_node()
                join[name].append(time.perf_counter() - start)
                await lab.remove_node(node.index)
        d, o = (statistics.median(gbits[n]) for n in ("dual", "only6"))
        jd, jo = (statistics.median(join[n]) for n in ("dual", "only6"))
        print(f"{backend:8} TCP c2c over IPv6: dual stack {d:6.2f} Gbit/s, IPv6-only {o:6.2f} "
              f"Gbit/s, IPv6-only/dual {o / d:4.2f}  (runs dual {_r(gbits['dual'])}, "
              f"IPv6-only {_r(gbits['only6'])})")  # fmt: skip
        print(f"{backend:8} a host joining (daemon to /readyz, its container): dual stack "
              f"{jd:5.2f} s, IPv6-only {jo:5.2f} s, IPv6-only/dual {jo / jd:4.2f}  "
              f"(runs dual {_r(join['dual'])}, IPv6-only {_r(join['only6'])})")  # fmt: skip
    finally:
        for proc in servers:
            proc.kill()
            await proc.wait()
        for lab in labs.values():
            await lab.down()


def _r(values: list[float]) -> list[float]:
    return [round(v, 2) for v in values]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--joins", type=int, default=3, help="hosts joined and removed per lab")
    p.add_argument("--backends", default="vxlan,host-gw")
    args = p.parse_args()
    for backend in args.backends.split(","):
        asyncio.run(compare(backend, args.rounds, args.seconds, args.joins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
