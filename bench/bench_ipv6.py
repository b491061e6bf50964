"""What dual stack costs the vxlan backend: the IPv6 side's full pass beside the IPv4 side.

Run as root:  .venv/bin/python bench/bench_ipv6.py [--sizes 100,1000] [--events 20]

For each size N, in a fresh network namespace (a veth with an IPv4 and an IPv6 address as the
external interface), with N remote dual-stack vxlan leases:
  * cold: the first reconcile(peers) of a single-stack backend (IPv4 entries only) and of a
    dual-stack one (the IPv4 entries, flannel-v6.1 and the IPv6 entries);
  * steady: a second full pass, nothing to change (what every --resync-period costs);
  * one lease event with N present: reconcile(peers, {subnet}) adding one lease, then removing
    it again, single-stack vs dual-stack, interleaved event by event. The IPv4 side is an
    incremental pass in both; the dual-stack backend's IPv6 side is a full pass (three pyroute2
    dumps of flannel-v6.1 and the changes).
Ratios dual/single are printed; absolute times are noisy on a shared machine.

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

from backends.base import ExternalInterface
from backends.vxlan import VxlanBackend
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig, Subnet

BASE = {"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}
SINGLE = NetworkConfig.from_dict(BASE)
DUAL = NetworkConfig.from_dict({**BASE, "EnableIPv6": True, "IPv6Network": "fd00:b::/32"})
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


def lease(i: int) -> Lease:
    sub = IPv4Network((int(IPv4Address("10.1.0.0")) + (i << 8), 24))
    mac = f"02:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}:01"
    mac6 = mac[:-2] + "06"
    return Lease(
        sub,
        LeaseAttrs(
            IPv4Address(int(IPv4Address("172.17.0.0")) + i),
            IPv6Address(int(EXT_IP6) + 1 + i),
            "vxlan",
            {"VNI": 1, "VtepMAC": mac},
            {"VNI": 1, "VtepMAC": mac6},
        ),
        IPv6Network((int(IPv6Network("fd00:b:0:1::/64").network_address) + (i << 64), 64)),
    )


async def started(cfg: NetworkConfig, ns: str, ext: ExternalInterface) -> VxlanBackend:
    b = VxlanBackend(cfg, ext, netns=ns)
    attrs = await b.prepare()
    own = Lease(
        IPv4Network("10.0.1.0/24"),
        LeaseAttrs(EXT_IP, EXT_IP6, "vxlan", attrs.backend_data, attrs.backend_v6_data),
        IPv6Network("fd00:b::/64") if cfg.enable_ipv6 else None,
    )
    await b.start(own)
    return b


async def one(size: int, events: int) -> None:
    peers: dict[Subnet, Lease] = {x.subnet: x for x in (lease(i) for i in range(size))}
    extra = lease(size + 1)
    cold: dict[str, float] = {}
    steady: dict[str, float] = {}
    backends: dict[str, VxlanBackend] = {}
    with namespace() as (ns1, ext1), namespace() as (ns2, ext2):
        for label, cfg, ns, ext in (("single", SINGLE, ns1, ext1), ("dual", DUAL, ns2, ext2)):
            b = await started(cfg, ns, ext)
            backends[label] = b
            t = time.perf_counter()
            await b.reconcile(peers)
            cold[label] = time.perf_counter() - t
            t = time.perf_counter()
            await b.reconcile(peers)
            steady[label] = time.perf_counter() - t
        times: dict[str, list[float]] = {"single": [], "dual": []}
        for _ in range(events):
            for label, b in backends.items():
                t = time.perf_counter()
                await b.reconcile({**peers, extra.subnet: extra}, {extra.subnet})
                await b.reconcile(peers, {extra.subnet})
                times[label].append((time.perf_counter() - t) / 2)
        for b in backends.values():
            await b.close()
    s, d = cold["single"], cold["dual"]
    print(f"N={size:>6}  cold full pass: single {s * 1000:8.1f} ms  dual {d * 1000:8.1f} ms"
          f"  dual/single {d / s:5.2f}")  # fmt: skip
    s, d = steady["single"], steady["dual"]
    print(f"N={size:>6}  steady full pass (nothing to do): single {s * 1000:8.1f} ms  dual "
          f"{d * 1000:8.1f} ms  dual/single {d / s:5.2f}")  # fmt: skip
    ms, md = (statistics.median(times[k]) * 1000 for k in ("single", "dual"))
    print(f"N={size:>6}  one lease event (median of {events}): single {ms:8.2f} ms"
          f"  dual {md:8.2f} ms  dual/single {md / ms:6.1f}")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="100,1000")
    p.add_argument("--events", type=int, default=20)
    args = p.parse_args()
    for size in (int(x) for x in args.sizes.split(",")):
        asyncio.run(one(size, args.events))
    return 0


if __name__ == "__main__":
    sys.exit(main())
