"""Benchmark: the cost of keeping the traffic rules, iptables mode against nftables mode, side
by side in one throwaway network namespace (needs root).

For each mode, with masquerade and forward rules (IPv4, plus IPv6 with --ipv6):
1. check: ensure() when nothing changed, what every --iptables-resync period (5 s) costs;
2. repair: ensure() after one rule was deleted by hand;
3. rewrite: ensure() after a new lease (every rule rewritten).
Each figure is the median of --runs calls; the two modes take turns, --rounds times, and the
ratio nftables/iptables is printed per figure (quote ratios: single figures are noisy on a
shared 2-core machine). Also counts the commands one check runs.

Run:  sudo .venv/bin/python bench/bench_traffic_rules.py [--runs 20] [--rounds 3] [--ipv6]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from tempfile import TemporaryDirectory

from overlay.masq import IptablesRules, TrafficRules
from overlay.nftrules import NftRules

NETWORK, LEASES = IPv4Network("10.50.0.0/16"), (IPv4Network("10.50.3.0/24"),
                                                 IPv4Network("10.50.9.0/24"))  # fmt: skip
NET6, LEASE6 = IPv6Network("fd00:50::/56"), IPv6Network("fd00:50:0:3::/64")


def sh(ns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True)


async def median_of(runs: int, prepare: Callable[[], None], call: Callable[[], Awaitable[bool]],
                    expect: bool) -> float:  # fmt: skip
    times = []
    for _ in range(runs):
        prepare()
        t = time.perf_counter()
        changed = await call()
        times.append(time.perf_counter() - t)
        assert changed is expect, "the benchmark did not measure what it says"
    return statistics.median(times)


def spoiler(ns: str, kind: str) -> Callable[[], None]:
    """Delete one rule by hand (the forward chain's first)."""
    if kind == "iptables":
        return lambda: sh(ns, "iptables", "-w", "5", "-D", "FLANNEL-FWD", "1")
    return lambda: sh(ns, "nft", "flush", "chain", "ip", "flannel-ipv4", "forward")


def logged(log: Path) -> list[str]:
    """The command lines logged since the last call (the log is emptied)."""
    lines = log.read_text().splitlines() if log.exists() else []
    log.write_text("")
    return lines


async def measure(ns: str, kind: str, runs: int, ipv6: bool, log: Path) -> dict[str, float]:
    wrapper = log.with_suffix(".sh")
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec "$@"\n')
    wrapper.chmod(0o755)
    prefix = (str(wrapper), "ip", "netns", "exec", ns)
    v6 = (NET6, LEASE6) if ipv6 else None
    rules: TrafficRules
    if kind == "iptables":
        rules = IptablesRules(NETWORK, LEASES[0], ipv6=v6, prefix=prefix)
    else:
        rules = NftRules(NETWORK, LEASES[0], ipv6=v6, prefix=prefix)
    await rules.ensure()
    logged(log)
    await rules.ensure()
    commands = len(logged(log))
    out = {"check": await median_of(runs, lambda: None, rules.ensure, False)}
    out["repair"] = await median_of(runs, spoiler(ns, kind), rules.ensure, True)
    turn = iter(range(1, 10**9))  # LEASES[1] first: LEASES[0] is in place

    def new_lease() -> None:
        rules.set_lease(LEASES[next(turn) % 2], LEASE6 if ipv6 else None)

    out["rewrite"] = await median_of(runs, new_lease, rules.ensure, True)
    out["commands per check"] = commands
    await rules.remove()
    return out


async def rounds(ns: str, tmp: Path, args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {"iptables": [], "nftables": []}
    for _ in range(args.rounds):
        for kind in results:
            results[kind].append(await measure(ns, kind, args.runs, args.ipv6, tmp / kind))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ipv6", action="store_true")
    args = ap.parse_args()
    ns = f"ovbench{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with TemporaryDirectory() as tmp:
            results = asyncio.run(rounds(ns, Path(tmp), args))
        print(f"{'figure':<20}{'iptables':>12}{'nftables':>12}{'nft/ipt':>10}")
        for figure in ("check", "repair", "rewrite", "commands per check"):
            ipt = statistics.median(r[figure] for r in results["iptables"])
            nft = statistics.median(r[figure] for r in results["nftables"])
            unit = 1 if figure.startswith("commands") else 1000
            print(f"{figure + (' (ms)' if unit > 1 else ''):<20}{ipt * unit:>12.1f}"
                  f"{nft * unit:>12.1f}{nft / ipt:>10.2f}")  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
