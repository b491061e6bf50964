"""What dual stack costs the vxlan backend: the IPv6 side's full pass beside the IPv4 side.

Run as root:  .venv/bin/python bench/bench_ipv6.py [--sizes 100,1000] [--events 20]
                 [--repeat 5] [--backend vxlan|host-gw]

For each size N, in a fresh network namespace (a veth with an IPv4 and an IPv6 address as the
external interface), with N remote dual-stack vxlan leases:
  * cold: the first reconcile(peers) of a single-stack backend (IPv4 entries only) and of a
    dual-stack one (the IPv4 entries, flannel-v6.1 and the IPv6 entries);
  * steady: further full passes, nothing to change (what every --resync-period costs); the
    median of --repeat passes per backend, single-stack and dual-stack interleaved;
  * one lease event with N present: reconcile(peers, {subnet}) adding one lease, then removing
    it again, single-stack vs dual-stack, interleaved event by event. The IPv4 side is an
    incremental pass in both, and so is the dual-stack backend's IPv6 side (the difference to
    its previous pass, nothing read).
With --backend host-gw the same for host-gw (routes on the external interface only; the IPv6
side's full pass is one dump of the IPv6 routes).
Ratios dual/single are printed; absolute times are noisy on a shared machine.

With --throughput (vxlan and host-gw): a 2-host `--ipv6` lab (integration.lab), and iperf3 TCP
from h1c0 to h2c0 over IPv4 and over IPv6 (VXLAN over the IPv6 underlay / plain IPv6 routes),
alternating run by run for --rounds rounds of --seconds; medians and the ratio IPv6/IPv4.

Everything happens inside namespaces created here and deleted at the end; no packet is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overlay import IPERF_PORT, iperf, wait_listening

from backends.base import Backend, ExternalInterface
from backends.hostgw import HostGwBackend
from backends.vxlan import VxlanBackend
from integration.lab import Lab
from integration.netns import in_ns
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig, Subnet


def configs(backend: str) -> tuple[NetworkConfig, NetworkConfig]:
    """(single-stack, dual-stack) network configs for a backend type."""
    base = {"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": backend}}
    dual = {**base, "EnableIPv6": True, "IPv6Network": "fd00:b::/32"}
    return NetworkConfig.from_dict(base), NetworkConfig.from_dict(dual)


EXT_IP = IPv4Address("172.16.0.1")
EXT_IP6 = IPv6Address("fd16::1")


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


@contextmanager
def namespace() -> Iterator[tuple[str, ExternalInterface]]:
    name = f"bv6-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "add", "ext0", "type", "veth", "peer", "name", "ext1")
        sh("ip", "-n", name, "addr", "add", f"{EXT_IP}/12", "dev", "ext0")
        sh("ip", "-n", name, "addr", "add", f"{EXT_IP6}/64", "dev", "ext0", "nodad")
        sh("ip", "-n", name, "link", "set", "ext0", "up")
        sh("ip", "-n", name, "link", "set", "ext1", "up")
        index = int(sh("ip", "netns", "exec", name, "cat", "/sys/class/net/ext0/ifindex"))
        yield name, ExternalInterface("ext0", index, EXT_IP, EXT_IP, 1500, EXT_IP6, EXT_IP6)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=60)
        time.sleep(1.0)  # let the kernel finish the teardown outside the next timing


def lease(i: int, backend: str = "vxlan") -> Lease:
    sub = IPv4Network((int(IPv4Address("10.1.0.0")) + (i << 8), 24))
    mac = f"02:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}:01"
    mac6 = mac[:-2] + "06"
    vxlan = backend == "vxlan"
    return Lease(
        sub,
        LeaseAttrs(
            IPv4Address(int(IPv4Address("172.17.0.0")) + i),
            IPv6Address(int(EXT_IP6) + 1 + i),
            backend,
            {"VNI": 1, "VtepMAC": mac} if vxlan else None,
            {"VNI": 1, "VtepMAC": mac6} if vxlan else None,
        ),
        IPv6Network((int(IPv6Network("fd00:b:0:1::/64").network_address) + (i << 64), 64)),
    )


async def started(cfg: NetworkConfig, ns: str, ext: ExternalInterface) -> Backend:
    b: Backend = (VxlanBackend if cfg.backend_type == "vxlan" else HostGwBackend)(
        cfg, ext, netns=ns
    )
    attrs = await b.prepare()
    own = Lease(
        IPv4Network("10.0.1.0/24"),
        LeaseAttrs(EXT_IP, EXT_IP6, cfg.backend_type, attrs.backend_data, attrs.backend_v6_data),
        IPv6Network("fd00:b::/64") if cfg.enable_ipv6 else None,
    )
    await b.start(own)
    return b


async def one(size: int, events: int, repeat: int, backend: str) -> None:
    peers: dict[Subnet, Lease] = {x.subnet: x for x in (lease(i, backend) for i in range(size))}
    extra = lease(size + 1, backend)
    single, dual = configs(backend)
    cold: dict[str, float] = {}
    steady: dict[str, list[float]] = {"single": [], "dual": []}
    backends: dict[str, Backend] = {}
    with namespace() as (ns1, ext1), namespace() as (ns2, ext2):
        for label, cfg, ns, ext in (("single", single, ns1, ext1), ("dual", dual, ns2, ext2)):
            b = await started(cfg, ns, ext)
            backends[label] = b
            t = time.perf_counter()
            await b.reconcile(peers)
            cold[label] = time.perf_counter() - t
        for _ in range(repeat):
            for label, b in backends.items():
                t = time.perf_counter()
                await b.reconcile(peers)
                steady[label].append(time.perf_counter() - t)
        times: dict[str, list[float]] = {"single": [], "dual": []}
        for _ in range(events):
            for label, b in backends.items():
                t = time.perf_counter()
                await b.reconcile({**peers, extra.subnet: extra}, {extra.subnet})
                await b.reconcile(peers, {extra.subnet})
                times[label].append((time.perf_counter() - t) / 2)
        for b in backends.values():
            await b.close()
    print(f"{backend}:")
    s, d = cold["single"], cold["dual"]
    print(f"N={size:>6}  cold full pass: single {s * 1000:8.1f} ms  dual {d * 1000:8.1f} ms"
          f"  dual/single {d / s:5.2f}")  # fmt: skip
    s, d = (statistics.median(steady[k]) for k in ("single", "dual"))
    print(f"N={size:>6}  steady full pass (nothing to do, median of {repeat}): single "
          f"{s * 1000:8.1f} ms  dual {d * 1000:8.1f} ms  dual/single {d / s:5.2f}")  # fmt: skip
    ms, md = (statistics.median(times[k]) * 1000 for k in ("single", "dual"))
    print(f"N={size:>6}  one lease event (median of {events}): single {ms:8.2f} ms"
          f"  dual {md:8.2f} ms  dual/single {md / ms:6.1f}")  # fmt: skip


def _r(values: list[float]) -> list[float]:
    return [round(v, 2) for v in values]


async def throughput(backend: str, rounds: int, seconds: int) -> None:
    lab = Lab(f"b6{uuid.uuid4().hex[:6]}")
    server = None
    try:
        await lab.up(nodes=2, backend=backend, ipv6=True)
        (_, c1), (_, c2) = lab.containers()[:2]
        assert c2.ip is not None and c2.ip6 is not None
        server = await asyncio.create_subprocess_exec(
            *in_ns(c2.ns, ["iperf3", "-s", "-p", str(IPERF_PORT)]),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_listening(c2.ns, IPERF_PORT)
        runs: dict[int, list[float]] = {4: [], 6: []}
        for _ in range(rounds):
            for family, target in ((4, c2.ip), (6, c2.ip6)):
                runs[family].append(await iperf(c1.ns, target, seconds, []))
        v4, v6 = (statistics.median(runs[f]) for f in (4, 6))
        print(f"{backend:8} TCP c2c over IPv4 {v4:6.2f} Gbit/s  over IPv6 {v6:6.2f} Gbit/s  "
              f"IPv6/IPv4 {v6 / v4:4.2f}  (runs v4 {_r(runs[4])}, v6 {_r(runs[6])})")  # fmt: skip
    finally:
        if server is not None:
            server.kill()
            await server.wait()
        await lab.down()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="100,1000")
    p.add_argument("--events", type=int, default=20)
    p.add_argument("--repeat", type=int, default=5, help="steady full passes per backend")
    p.add_argument("--backend", choices=("vxlan", "host-gw"), default="vxlan")
    p.add_argument("--throughput", action="store_true", help="iperf3 IPv4 vs IPv6 in a lab")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=4)
    args = p.parse_args()
    if args.throughput:
        for backend in ("vxlan", "host-gw"):
            asyncio.run(throughput(backend, args.rounds, args.seconds))
        return 0
    for size in (int(x) for x in args.sizes.split(",")):
        asyncio.run(one(size, args.events, args.repeat, args.backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
