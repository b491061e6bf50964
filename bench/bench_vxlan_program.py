"""How fast the vxlan backend programs the kernel, side by side with iproute2's batch mode.

Run as root:  .venv/bin/python bench/bench_vxlan_program.py [--repeats 3] [--sizes 1000,10000]

For each size N, in a fresh network namespace each time (a veth as the external interface and a
flannel.1 device, set up before the clock starts):
  * ours:     VxlanBackend.reconcile() with N remote vxlan leases (reads the kernel's state,
              plans, applies 3N neighbour/FDB/route operations over batched raw netlink);
  * baseline: `ip -batch` (N neighbours + N routes) and `bridge -batch` (N FDB entries) of the
              same entries, command files written before the clock starts;
  * pyroute2: (N <= 1000 only) AsyncIPRoute, one awaited request at a time (the obvious loop),
              and with 16 peers in flight at once (asyncio.gather behind a semaphore).
The clock stops when the tool returns; the entries are then counted in the kernel (not timed)
and a run that left any out fails the benchmark.

Then, with 1,000 and 10,000 leases present (--latency-sizes), the event-to-kernel latency of one
lease event: adding one lease, then removing it again, each by a full pass (reconcile(peers): three
dumps, everything compared) and by an incremental pass (reconcile(peers, {subnet}): targeted
reads of that subnet's entries only), interleaved event by event so that drift hits both alike;
p50/p99 over --events events per mode. And the process's resident memory after programming
10,000 leases.

Everything happens inside namespaces created here and deleted at the end; no packet is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends import netlink as nl
from backends.base import ExternalInterface
from backends.vxlan import VxlanBackend
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig, Subnet

CONFIG = NetworkConfig.from_dict(
    {"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}
)
EXT_IP = IPv4Address("172.16.0.1")
OWN = IPv4Network("10.0.1.0/24")
SETTLE = 1.0


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


@contextmanager
def namespace() -> Iterator[tuple[str, ExternalInterface]]:
    """A fresh namespace with a veth (172.16.0.1/12) as the external interface."""
    name = f"bvx-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "add", "ext0", "type", "veth", "peer", "name", "ext1")
        sh("ip", "-n", name, "addr", "add", f"{EXT_IP}/12", "dev", "ext0")
        sh("ip", "-n", name, "link", "set", "ext0", "up")
        sh("ip", "-n", name, "link", "set", "ext1", "up")
        index = int(sh("ip", "netns", "exec", name, "cat", "/sys/class/net/ext0/ifindex"))
        yield name, ExternalInterface("ext0", index, EXT_IP, EXT_IP, 1500)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=60)
        # The kernel tears a namespace down in the background, holding the rtnl lock for a
        # while (10,000 routes); let it finish so that it does not land in the next timing.
        time.sleep(SETTLE)


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def leases(n: int, offset: int = 0) -> dict[Subnet, Lease]:
    out: dict[Subnet, Lease] = {}
    base_net = int(IPv4Address("10.0.2.0"))
    base_ip = int(IPv4Address("172.16.0.2"))
    for i in range(offset, offset + n):
        subnet = IPv4Network((base_net + (i << 8), 24))
        mac = f"0a:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}:01"
        attrs = LeaseAttrs(IPv4Address(base_ip + i), None, "vxlan", {"VNI": 1, "VtepMAC": mac})
        out[subnet] = Lease(subnet, attrs)
    return out


async def count_entries(ns: str, dev: str = "flannel.1") -> tuple[int, int, int]:
    async with nl.RtnlSocket(ns) as sock:
        index = int(sh("ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/ifindex"))
        neigh = sum(1 for n in await sock.neighbours(index) if n.permanent)
        fdb = len(await sock.fdb(index))
        routes = sum(1 for r in await sock.routes() if r.oif == index)
    return neigh, fdb, routes


async def new_backend(ns: str, ext: ExternalInterface) -> VxlanBackend:
    b = VxlanBackend(CONFIG, ext, netns=ns)
    attrs = await b.prepare()
    own = Lease(OWN, LeaseAttrs(EXT_IP, None, "vxlan", attrs.backend_data))
    await b.start(own)
    return b


async def run_ours(n: int) -> float:
    peers = leases(n)
    with namespace() as (ns, ext):
        b = await new_backend(ns, ext)
        try:
            gc.collect()
            t0 = time.perf_counter()
            await b.reconcile(peers)
            elapsed = time.perf_counter() - t0
        finally:
            await b.close()
        check(await count_entries(ns), n, "ours")
    return elapsed


async def run_batch(n: int) -> float:
    peers = leases(n)
    with namespace() as (ns, ext), tempfile.TemporaryDirectory() as tmp:
        # The same device as ours, made by ip(8).
        b = await new_backend(ns, ext)
        await b.close()
        ip_file, br_file = Path(tmp, "ip.batch"), Path(tmp, "bridge.batch")
        ip_lines, br_lines = [], []
        for subnet, lease in peers.items():
            gw = subnet.network_address
            mac = lease.attrs.backend_data["VtepMAC"]  # type: ignore[index]
            ip_lines.append(f"neigh replace {gw} lladdr {mac} nud permanent dev flannel.1")
            br_lines.append(
                f"fdb replace {mac} dst {lease.attrs.public_ip} self permanent dev flannel.1"
            )
        ip_lines += [
            f"route replace {s} via {s.network_address} dev flannel.1 onlink" for s in peers
        ]
        write_lines(ip_file, ip_lines)
        write_lines(br_file, br_lines)
        t0 = time.perf_counter()
        sh("ip", "-n", ns, "-batch", str(ip_file))
        sh("bridge", "-n", ns, "-batch", str(br_file))
        elapsed = time.perf_counter() - t0
        check(await count_entries(ns), n, "ip/bridge -batch")
    return elapsed


async def run_pyroute2(n: int, concurrency: int) -> float:
    """pyroute2's AsyncIPRoute: 1 = the obvious awaited loop; more = peers in flight at once."""
    from pyroute2 import AsyncIPRoute

    peers = leases(n)
    with namespace() as (ns, ext):
        b = await new_backend(ns, ext)
        index = b.ifindex
        await b.close()
        ipr = AsyncIPRoute(netns=ns, flags=0)
        gate = asyncio.Semaphore(concurrency)

        async def program(subnet: Subnet, lease: Lease) -> None:
            gw = str(subnet.network_address)
            mac = lease.attrs.backend_data["VtepMAC"]  # type: ignore[index]
            async with gate:
                await ipr.neigh("replace", dst=gw, lladdr=mac, ifindex=index, state=0x80)
                await ipr.fdb(
                    "replace",
                    ifindex=index,
                    lladdr=mac,
                    dst=str(lease.attrs.public_ip),
                    state=0x80,
                    flags=nl.NTF_SELF,
                )
                await ipr.route("replace", dst=str(subnet), gateway=gw, oif=index, flags=4)

        try:
            t0 = time.perf_counter()
            if concurrency == 1:
                for subnet, lease in peers.items():
                    await program(subnet, lease)
            else:
                await asyncio.gather(*(program(s, le) for s, le in peers.items()))
            elapsed = time.perf_counter() - t0
        finally:
            ipr.close()
        check(await count_entries(ns), n, f"pyroute2 x{concurrency}")
    return elapsed


def check(counts: tuple[int, int, int], n: int, who: str) -> None:
    if counts != (n, n, n):
        raise SystemExit(f"{who}: kernel holds {counts} (neigh, fdb, routes), expected {n} each")


async def latency(present: int, events: int) -> dict[str, dict[str, list[float]]]:
    """Per mode ("full", "incremental") and kind ("add", "remove"): seconds per event."""
    peers = leases(present)
    out: dict[str, dict[str, list[float]]] = {
        mode: {"add": [], "remove": []} for mode in ("full", "incremental")
    }
    with namespace() as (ns, ext):
        b = await new_backend(ns, ext)
        try:
            await b.reconcile(peers)
            for i in range(events):
                extra = leases(1, offset=present + i)
                (subnet,) = extra
                more = {**peers, **extra}  # built before the clock starts
                for mode in ("full", "incremental") if i % 2 else ("incremental", "full"):
                    changed = None if mode == "full" else {subnet}
                    t0 = time.perf_counter()
                    await b.reconcile(more, changed)
                    out[mode]["add"].append(time.perf_counter() - t0)
                    if b.last.applied != 3 or b.last.full != (mode == "full"):
                        raise SystemExit(f"{mode}: adding one lease applied {b.last.applied}")
                    t0 = time.perf_counter()
                    await b.reconcile(peers, changed)
                    out[mode]["remove"].append(time.perf_counter() - t0)
                    if b.last.applied != 3:
                        raise SystemExit(f"{mode}: removing one lease applied {b.last.applied}")
            check(await count_entries(ns), present, "latency")
        finally:
            await b.close()
    return out


def rss_kib() -> tuple[int, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


async def memory(n: int) -> tuple[int, int, int]:
    gc.collect()
    before, _ = rss_kib()
    peers = leases(n)
    with namespace() as (ns, ext):
        b = await new_backend(ns, ext)
        try:
            await b.reconcile(peers)
            await b.reconcile(peers)  # a steady-state pass: reads 3N entries back
        finally:
            await b.close()
        after, peak = rss_kib()
    return before, after, peak


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--events", type=int, default=100, help="lease events per mode and size")
    ap.add_argument("--latency-sizes", default="1000,10000")
    ap.add_argument("--skip-cold", action="store_true", help="latency only")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")

    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(
        f"event-to-kernel latency of one lease event ({args.events} events per mode, "
        "full and incremental interleaved)"
    )
    print(
        f"{'present':>7} {'event':>6} {'full p50':>9} {'full p99':>9} {'incr p50':>9} "
        f"{'incr p99':>9} {'p50 ratio':>9} {'p99 ratio':>9}   (ms; ratio = full / incremental)"
    )
    for present in (int(x) for x in args.latency_sizes.split(",")):
        got = await latency(present, args.events)
        for kind in ("add", "remove"):
            f, inc = got["full"][kind], got["incremental"][kind]
            f50, f99, i50, i99 = pct(f, 0.5), pct(f, 0.99), pct(inc, 0.5), pct(inc, 0.99)
            print(
                f"{present:>7} {kind:>6} {f50 * 1e3:9.2f} {f99 * 1e3:9.2f} {i50 * 1e3:9.2f} "
                f"{i99 * 1e3:9.2f} {f50 / i50:9.1f} {f99 / i99:9.1f}"
            )
    if args.skip_cold:
        return

    print(f"\ncold start, median of {args.repeats} runs, each in a fresh namespace")
    print(
        f"{'leases':>7} {'ours s':>8} {'ip -batch s':>12} {'ratio':>6}"
        f" {'pyroute2 loop s':>16} {'pyroute2 x16 s':>15}"
    )
    for n in (int(x) for x in args.sizes.split(",")):
        ours, base = [], []
        for _ in range(args.repeats):  # interleaved so that drift hits both alike
            ours.append(await run_ours(n))
            base.append(await run_batch(n))
        if n <= 1000:  # 10,000 would take 15 s each
            extra = f"{await run_pyroute2(n, 1):16.2f} {await run_pyroute2(n, 16):15.2f}"
        else:
            extra = f"{'-':>16} {'-':>15}"
        o, bl = statistics.median(ours), statistics.median(base)
        print(f"{n:>7} {o:8.3f} {bl:12.3f} {o / bl:6.2f} {extra}")

    before, after, peak = await memory(10000)
    print("\nmemory with 10000 leases (this process, after two reconciles)")
    mib = [f"{x / 1024:.1f}" for x in (before, after, peak)]
    print(f"  RSS before {mib[0]} MiB, after {mib[1]} MiB, peak {mib[2]} MiB")


if __name__ == "__main__":
    asyncio.run(main())
