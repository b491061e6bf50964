"""Soak: one real overlayd (vxlan, in a namespace) while a few hundred simulated hosts join,
renew, crash and leave for N minutes against a real etcd that is restarted a few times.

Setup: a one-member etcd in a namespace of its own (integration.etcdcluster) attached to a
one-host namespace lab (integration.lab) with network 10.128.0.0/14 (1,023 free /24s). The
simulated hosts are leases written straight to etcd through aetcd from the root namespace,
each with its own etcd lease of --ttl seconds, exactly as a flannel host writes them (public
IPs in 198.19.200.0/21, held by no namespace: nothing is ever sent to them).

Every --step seconds (the first one --step seconds after the initial join):
  * renew:  every live host renews (one keepalive each);
  * crash:  --churn // 2 hosts stop renewing (their key expires --ttl seconds later);
  * leave:  --churn hosts revoke their etcd lease (their key goes at once);
  * join:   as many new hosts as bring the count back to --hosts (--churn, plus the crashed
            ones etcd has expired since; lease grant + put);
then, from the last write, the clock runs until the kernel of the daemon's namespace matches
etcd: the routes on flannel.1 are exactly the live leases' subnets (ours excepted) and
flannel.1 has one permanent neighbour per remote lease (polled every 0.1 s; "converged" in
the table). The crashed hosts' keys expire later, so a later step's check also covers their
removal.
--restarts times, spread over the run, a step begins with etcd SIGKILLed, left down --down
seconds and started again on its data; that step's writes then go to the restarted etcd, so
its convergence says the daemon's watch resumed.

Each row also has the daemon's RSS (/proc), open fds (/proc), live asyncio tasks (its
/metrics: overlay_asyncio_tasks) and etcd's request rate (etcd's /metrics:
grpc_server_msg_received_total, all methods, per second since the previous row: messages,
so the ones on long-lived streams (watch, keepalive) count as they come; the simulated
hosts' requests are in it, the same number every step, so a slope is the daemon's). At the
end: the first and last rows and a least-squares slope per minute of each.

    .venv/bin/python bench/bench_soak.py                   # 10 minutes, 300 hosts, 3 restarts
    .venv/bin/python bench/bench_soak.py --minutes 4 --hosts 300 --restarts 2

Root only. Not a test: no asserts. Everything it made (namespaces, links, processes, the
etcd data) is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aetcd
import aetcd.exceptions

from integration.etcdcluster import EtcdCluster
from integration.lab import HEALTH_PORT, Lab
from integration.netns import ip_json
from subnetmgr.model import LeaseAttrs, subnet_key

T = TypeVar("T")

NETWORK = IPv4Network("10.128.0.0/14")
PUBLIC_BASE = IPv4Address("198.19.200.0")


@dataclass
class SimHost:
    subnet: IPv4Network
    public_ip: IPv4Address
    lease_id: int
    crashed: bool = False


@dataclass
class Row:
    t: float
    step: str
    hosts: int
    converged: float | None
    rss_mib: float
    fds: int
    tasks: int
    etcd_rps: float


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.cluster = EtcdCluster(size=1)
        self.state_root = Path(tempfile.mkdtemp(prefix="overlay-soak-"))
        self.lab = Lab(f"s{uuid.uuid4().hex[:6]}", state_root=self.state_root)
        self.hosts: dict[IPv4Network, SimHost] = {}
        self.free: list[IPv4Network] = []
        self.client: aetcd.Client | None = None
        self.rows: list[Row] = []
        self.start = time.monotonic()
        self._etcd_count = 0.0
        self._etcd_at = time.monotonic()
        self._next_ip = 1

    # ------------------------------------------------------------------ setup

    async def up(self) -> None:
        await self.cluster.up()
        os.environ["FLANNELD_METRICS"] = "true"  # the daemon inherits it: /metrics served
        await self.lab.up(
            nodes=0,
            etcd_endpoints=",".join(self.cluster.endpoints),
            network=str(NETWORK),
            containers_per_node=0,
        )
        self.lab.state.daemon_endpoints = ",".join(await self.cluster.attach(self.lab))
        self.lab.save()
        await self.lab.add_nodes(1)
        own = IPv4Network(str(self.lab.node(1).subnet))
        self.free = [s for s in NETWORK.subnets(new_prefix=24)][1:]
        self.free.remove(own)
        self.rng.shuffle(self.free)
        m = self.cluster.members[0]
        self.client = aetcd.Client(host=m.ip, port=2379, timeout=5)

    async def down(self) -> None:
        if self.client is not None:
            await self.client.close()
        await self.lab.down()
        await self.cluster.down()
        shutil.rmtree(self.state_root, ignore_errors=True)

    # ------------------------------------------------------------------ etcd, retried

    async def etcd(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run an aetcd call, retrying while etcd restarts (up to 30 s)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return await fn()
            except (aetcd.exceptions.ClientError, OSError) as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd {what} kept failing: {e}") from None
                await asyncio.sleep(0.2)

    def key(self, subnet: IPv4Network) -> bytes:
        return f"{self.lab.state.prefix}/subnets/{subnet_key(subnet)}".encode()

    async def join(self, count: int) -> None:
        assert self.client is not None
        client = self.client
        for _ in range(count):
            subnet = self.free.pop()
            ip = PUBLIC_BASE + self._next_ip
            self._next_ip = self._next_ip % 2000 + 1
            mac = "0e:" + ":".join(f"{self.rng.randrange(256):02x}" for _ in range(5))
            value = LeaseAttrs(ip, None, "vxlan", {"VNI": 1, "VtepMAC": mac}).to_json()
            lease = await self.etcd("grant", partial(client.lease, self.args.ttl))
            await self.etcd("put", partial(client.put, self.key(subnet), value.encode(), lease))
            self.hosts[subnet] = SimHost(subnet, ip, lease.id)

    def pick(self, count: int) -> list[SimHost]:
        live = [h for h in self.hosts.values() if not h.crashed]
        return self.rng.sample(live, min(count, len(live)))

    async def leave(self, count: int) -> None:
        assert self.client is not None
        client = self.client
        for h in self.pick(count):
            await self.etcd("revoke", partial(client.revoke_lease, h.lease_id))
            del self.hosts[h.subnet]
            self.free.insert(0, h.subnet)

    def crash(self, count: int) -> None:
        for h in self.pick(count):
            h.crashed = True

    async def renew(self) -> None:
        assert self.client is not None
        client = self.client
        for h in list(self.hosts.values()):
            if not h.crashed:
                await self.etcd("keepalive", partial(client.refresh_lease, h.lease_id))

    async def forget_expired(self) -> None:
        """Crashed hosts whose key etcd has expired: their subnet is free again."""
        assert self.client is not None
        client = self.client
        got = await self.etcd(
            "list", lambda: client.get_prefix(f"{self.lab.state.prefix}/subnets/".encode())
        )
        present = {kv.key for kv in got}
        for h in list(self.hosts.values()):
            if h.crashed and self.key(h.subnet) not in present:
                del self.hosts[h.subnet]
                self.free.insert(0, h.subnet)

    # ------------------------------------------------------------------ measuring

    async def etcd_subnets(self) -> set[str]:
        assert self.client is not None
        client = self.client
        prefix = f"{self.lab.state.prefix}/subnets/"
        got = await self.etcd("list", lambda: client.get_prefix(prefix.encode()))
        own = str(self.lab.node(1).subnet)
        out = set()
        for kv in got:
            cidr = kv.key.decode().rsplit("/", 1)[-1].replace("-", "/")
            if cidr != own:
                out.add(cidr)
        return out

    async def kernel_matches(self) -> bool:
        ns = self.lab.node(1).ns
        want = await self.etcd_subnets()
        routes = {r["dst"] for r in await ip_json("route", "show", "dev", "flannel.1", ns=ns)}
        if routes != want:
            return False
        neigh = await ip_json("neigh", "show", "dev", "flannel.1", "nud", "permanent", ns=ns)
        return len(neigh) == len(want)

    async def converge(self, limit: float = 90.0) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if await self.kernel_matches():
                return time.monotonic() - t0
            await asyncio.sleep(0.1)
        return None

    def daemon_proc(self) -> tuple[float, int]:
        pid = self.lab.node(1).daemon_pid
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kib = next(int(line.split()[1]) for line in status.splitlines()
                       if line.startswith("VmRSS:"))  # fmt: skip
        return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))

    def daemon_tasks(self) -> int:
        url = f"http://{self.lab.node(1).ip}:{HEALTH_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("overlay_asyncio_tasks "):
                    return int(float(line.split()[1]))
        return -1

    def etcd_rate(self) -> float:
        """etcd's gRPC requests per second since the last call (counters restart with etcd)."""
        total = 0.0
        try:
            url = f"{self.cluster.members[0].endpoint}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("grpc_server_msg_received_total{"):
                        total += float(line.rsplit(" ", 1)[1])
        except OSError:
            return float("nan")
        now = time.monotonic()
        delta = total - self._etcd_count if total >= self._etcd_count else total
        rate = delta / max(now - self._etcd_at, 1e-6)
        self._etcd_count, self._etcd_at = total, now
        return rate

    async def record(self, step: str, converged: float | None) -> None:
        rss, fds = self.daemon_proc()
        tasks = await asyncio.to_thread(self.daemon_tasks)
        rps = await asyncio.to_thread(self.etcd_rate)
        row = Row(time.monotonic() - self.start, step, len(self.hosts), converged, rss, fds,
                  tasks, rps)  # fmt: skip
        self.rows.append(row)
        conv = f"{converged:8.2f}" if converged is not None else "  NEVER "
        print(f"{row.t:7.1f} {step:<14} {row.hosts:6d} {conv} {rss:8.1f} {fds:5d} "
              f"{tasks:6d} {rps:9.1f}", flush=True)  # fmt: skip

    # ------------------------------------------------------------------ the run

    async def run(self) -> None:
        a = self.args
        print(f"soak: {a.minutes} min, {a.hosts} simulated hosts, TTL {a.ttl}s, step {a.step}s, "
              f"churn {a.churn}/step, {a.restarts} etcd restarts ({a.down}s down)")  # fmt: skip
        print("      t step             hosts converged  RSS MiB   fds  tasks  etcd req/s")
        self.etcd_rate()
        await self.join(a.hosts)
        await self.record("initial join", await self.converge())
        self.etcd_rate()
        end = self.start + a.minutes * 60
        restarts = [self.start + a.minutes * 60 * (i + 1) / (a.restarts + 1)
                    for i in range(a.restarts)]  # fmt: skip
        while time.monotonic() + a.step < end:
            await asyncio.sleep(a.step)
            step = "churn"
            if restarts and time.monotonic() >= restarts[0]:
                restarts.pop(0)
                step = "etcd restart"
                await self.cluster.kill(1)
                await asyncio.sleep(a.down)
                await self.cluster.start(1)
            # Renewals first, then the step's writes: the clock starts at the last write.
            await self.forget_expired()
            await self.renew()
            self.crash(a.churn // 2)
            await self.leave(a.churn)
            await self.join(max(0, a.hosts - len(self.hosts)))
            await self.record(step, await self.converge())
            if step != "churn":
                self.etcd_rate()  # the next churn row's rate starts here
        self.summary()

    def summary(self) -> None:
        rows = [r for r in self.rows if r.step == "churn"]
        if len(rows) < 2:
            return
        first, last = rows[0], rows[-1]
        print("\nfirst vs last churn row, and the least-squares slope over all churn rows:")
        for name in ("rss_mib", "fds", "tasks", "etcd_rps"):
            xs = [r.t / 60 for r in rows]
            ys = [float(getattr(r, name)) for r in rows]
            slope = _slope(xs, ys)
            print(f"  {name:<9} first {getattr(first, name):9.1f}  last {getattr(last, name):9.1f}"
                  f"  slope {slope:+9.2f}/min")  # fmt: skip
        conv = [r.converged for r in self.rows if r.converged is not None]
        never = sum(1 for r in self.rows if r.converged is None)
        if conv:
            conv.sort()
            print(f"  converged: median {conv[len(conv) // 2]:.2f}s, max {conv[-1]:.2f}s over "
                  f"{len(conv)} steps; never within 90 s: {never}")  # fmt: skip
        restarts = [r.converged for r in self.rows if r.step == "etcd restart"]
        print(f"  after each etcd restart: {restarts}")


def _slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--hosts", type=int, default=300, help="simulated hosts at the start")
    p.add_argument("--ttl", type=int, default=30, help="their etcd lease TTL, seconds")
    p.add_argument("--step", type=float, default=10.0, help="seconds between churn steps")
    p.add_argument("--churn", type=int, default=20, help="joins and leaves per step")
    p.add_argument("--restarts", type=int, default=3, help="etcd restarts during the run")
    p.add_argument("--down", type=float, default=3.0, help="seconds etcd stays down")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench_soak needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.hosts + 3 * args.churn > 1000:
        print("--hosts plus churn must stay below the network's 1,023 subnets", file=sys.stderr)
        return 2

    async def go() -> None:
        soak = Soak(args)
        try:
            await soak.up()
            await soak.run()
        finally:
            await soak.down()

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    sys.exit(main())
