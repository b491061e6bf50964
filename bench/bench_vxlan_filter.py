"""What the vxlan backend's FilterPeers costs, measured side by side with it off, in one run.

Run as root:  .venv/bin/python bench/bench_vxlan_filter.py [--peers 10000] [--repeats 3]
              [--events 50] [--seconds 5] [--rounds 3] [--skip-throughput] [--realtime]
              [--only alone,program,events,counter,throughput] [--ipv6]

1. Programming N peers (fresh namespace each time, as bench_vxlan_program.py builds it):
   a cold full reconcile with FilterPeers off and on (on = the same plus one nft transaction
   creating the table with N elements), medians of --repeats; and a steady full pass (nothing to
   change) off and on (on adds `nft -j list table` of N elements and the comparison).
2. One lease event with N present: an incremental reconcile adding one lease then removing it,
   off and on interleaved event by event (on adds one `nft -f -` of one element); p50/p99.
3. Reading the drop counter with N elements in the set: one NFT_MSG_GETOBJ over netlink (what
   counters() does at scrape time) vs `nft -j list counter` (which loads the set first).
4. Throughput (unless --skip-throughput): two hosts on a veth underlay, VxlanBackends with each
   other's lease plus N-1 other peers in the set; iperf3 TCP host to host through flannel.1
   (h1's flannel address -> h2's), rounds alternating filter off / on (the table deleted and
   recreated on both hosts between runs), medians and the on/off ratio.

With --ipv6 the "alone" section runs the ip6 table (FilterPeers over the IPv6 underlay: an
ipv6_addr set of N addresses) side by side with the ip one and prints the ip6/ip ratios.

Everything happens inside namespaces created here and deleted at the end; traffic stays inside
them. Not a test: no asserts on speed; a run where the filter did not do its job fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_vxlan_program as prog

from backends import nftset
from backends.base import ExternalInterface
from backends.vxlan import FILTER_TABLE, VxlanBackend
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig, Subnet

IPERF_PORT = 5201
SECTIONS = ("alone", "program", "events", "counter", "throughput")


def config(filter_peers: bool) -> NetworkConfig:
    return NetworkConfig.from_dict(
        {
            "Network": "10.0.0.0/8",
            "SubnetLen": 24,
            "Backend": {"Type": "vxlan", "FilterPeers": filter_peers},
        }
    )


async def new_backend(ns: str, ext: ExternalInterface, filter_peers: bool) -> VxlanBackend:
    b = VxlanBackend(config(filter_peers), ext, netns=ns)
    attrs = await b.prepare()
    own = Lease(prog.OWN, LeaseAttrs(prog.EXT_IP, None, "vxlan", attrs.backend_data))
    await b.start(own)
    return b


def set_size(ns: str, family: str = "ip") -> int:
    out = prog.sh(
        "ip", "netns", "exec", ns, "nft", "-j", "list", "set", family, FILTER_TABLE, "peers"
    )
    for item in json.loads(out)["nftables"]:
        if "set" in item:
            return len(item["set"].get("elem", []))
    return -1


async def programming(n: int, repeats: int) -> dict[str, list[float]]:
    peers = prog.leases(n)
    out: dict[str, list[float]] = {
        k: [] for k in ("cold off", "cold on", "steady off", "steady on")
    }
    for r in range(repeats):
        for on in (False, True) if r % 2 == 0 else (True, False):
            tag = "on" if on else "off"
            with prog.namespace() as (ns, ext):
                b = await new_backend(ns, ext, on)
                try:
                    t0 = time.perf_counter()
                    await b.reconcile(peers)
                    out[f"cold {tag}"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    await b.reconcile(peers)
                    out[f"steady {tag}"].append(time.perf_counter() - t0)
                    if on and (b.last.filter is None or b.last.filter.transactions != 0):
                        raise SystemExit("a steady full pass changed the filter")
                finally:
                    await b.close()
                prog.check(await prog.count_entries(ns), n, f"filter {tag}")
                if on and set_size(ns) != n:
                    raise SystemExit(f"the set holds {set_size(ns)} elements, not {n}")
    return out


async def events(n: int, count: int) -> dict[str, list[float]]:
    peers = prog.leases(n)
    out: dict[str, list[float]] = {f"{k} {t}": [] for k in ("add", "remove") for t in ("off", "on")}
    with prog.namespace() as (ns_off, ext_off), prog.namespace() as (ns_on, ext_on):
        backs = {
            "off": await new_backend(ns_off, ext_off, False),
            "on": await new_backend(ns_on, ext_on, True),
        }
        try:
            for b in backs.values():
                await b.reconcile(peers)
            for i in range(count):
                extra = prog.leases(1, offset=n + i)
                (subnet,) = extra
                more: dict[Subnet, Lease] = {**peers, **extra}
                for tag in ("off", "on") if i % 2 else ("on", "off"):
                    b = backs[tag]
                    t0 = time.perf_counter()
                    await b.reconcile(more, {subnet})
                    out[f"add {tag}"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    await b.reconcile(peers, {subnet})
                    out[f"remove {tag}"].append(time.perf_counter() - t0)
                    if b.last.full or b.last.applied != 3:
                        raise SystemExit(f"{tag}: the event pass was not incremental")
                    if tag == "on" and (b.last.filter is None or b.last.filter.removed != 1):
                        raise SystemExit("the filter did not drop the removed peer")
            if set_size(ns_on) != n:
                raise SystemExit(f"the set holds {set_size(ns_on)} elements, not {n}")
        finally:
            for b in backs.values():
                await b.close()
    return out


async def filter_alone(n: int, repeats: int, family: str = "ip") -> dict[str, list[float]]:
    """The nft part by itself (no vxlan device work): create the table with n elements, a full
    pass with nothing to change (list + compare), one element in and out (incremental), and
    for scale the cost of entering the namespace (`ip netns exec NS true`), which every nft
    run here pays and a daemon in its own namespace does not."""
    peers: frozenset[nftset.Address]
    if family == "ip":
        peers = frozenset(IPv4Address(int(prog.EXT_IP) + 1 + i) for i in range(n))
        extra: nftset.Address = IPv4Address("198.18.0.1")
    else:
        peers = frozenset(IPv6Address(int(IPv6Address("fd93::")) + 1 + i) for i in range(n))
        extra = IPv6Address("fd18::1")
    spec = nftset.PortFilter(FILTER_TABLE, 8472, "bench", family=family)
    out: dict[str, list[float]] = {
        k: [] for k in ("create", "steady", "one in", "one out", "netns exec")
    }
    for _ in range(repeats):
        with prog.namespace() as (ns, _ext):
            table = nftset.NftTable(spec, ns)
            t0 = time.perf_counter()
            result = await table.sync(peers)
            out["create"].append(time.perf_counter() - t0)
            if not result.created or set_size(ns, family) != n:
                raise SystemExit("the table was not created with every element")
            t0 = time.perf_counter()
            result = await table.sync(peers)
            out["steady"].append(time.perf_counter() - t0)
            if result.transactions:
                raise SystemExit("a steady pass changed the table")
            for _ in range(10):
                t0 = time.perf_counter()
                await table.update(frozenset({extra}), frozenset())
                out["one in"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await table.update(frozenset(), frozenset({extra}))
                out["one out"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await run("ip", "netns", "exec", ns, "true")
                out["netns exec"].append(time.perf_counter() - t0)
            table.close()
    return out


async def counter_reads(n: int) -> dict[str, list[float]]:
    with prog.namespace() as (ns, ext):
        b = await new_backend(ns, ext, True)
        try:
            await b.reconcile(prog.leases(n))
            b.counters()  # open the netlink socket
            netlink = []
            for _ in range(1000):
                t0 = time.perf_counter()
                values = b.counters()
                netlink.append(time.perf_counter() - t0)
            if set(values) != {
                "peer_filter_dropped_packets_total",
                "peer_filter_dropped_bytes_total",
            }:
                raise SystemExit(f"counters() gave {values}")
            command = []
            argv = ["ip", "netns", "exec", ns, "nft", "-j", "list", "counter", "ip", FILTER_TABLE]
            for _ in range(20):
                t0 = time.perf_counter()
                await run(*argv, nftset.COUNTER)
                command.append(time.perf_counter() - t0)
        finally:
            await b.close()
    return {"netlink GETOBJ": netlink, "nft -j list counter": command}


async def iperf(ns: str, target: str, seconds: int, rt: list[str]) -> float:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, *rt, "iperf3", "-c", target, "-p", str(IPERF_PORT),
        "-t", str(seconds), "-J",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"iperf3 failed: {err.decode()} {out.decode()[:500]}")
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


async def throughput(n: int, seconds: int, rounds: int, realtime: bool) -> dict[str, list[float]]:
    rt = ["chrt", "--fifo", "10"] if realtime else []
    token = uuid.uuid4().hex[:6]
    h1, h2 = f"bvf1-{token}", f"bvf2-{token}"
    ips = {h1: IPv4Address("172.16.0.1"), h2: IPv4Address("172.16.0.2")}
    subnets = {h1: IPv4Network("10.0.1.0/24"), h2: IPv4Network("10.0.2.0/24")}
    server = None
    backs: dict[str, VxlanBackend] = {}
    leases: dict[str, Lease] = {}
    out: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for ns in (h1, h2):
            prog.sh("ip", "netns", "add", ns)
            prog.sh("ip", "-n", ns, "link", "set", "lo", "up")
        prog.sh("ip", "-n", h1, "link", "add", "ext0", "type", "veth", "peer", "name", "ext0",
                "netns", h2)  # fmt: skip
        for ns in (h1, h2):
            prog.sh("ip", "-n", ns, "addr", "add", f"{ips[ns]}/24", "dev", "ext0")
            prog.sh("ip", "-n", ns, "link", "set", "ext0", "up")
            index = int(prog.sh("ip", "netns", "exec", ns, "cat", "/sys/class/net/ext0/ifindex"))
            ext = ExternalInterface("ext0", index, ips[ns], ips[ns], 1500)
            for on in (False, True):
                b = VxlanBackend(config(on), ext, netns=ns)
                backs[f"{ns} {on}"] = b
                attrs = await b.prepare()
                leases[ns] = Lease(
                    subnets[ns], LeaseAttrs(ips[ns], None, "vxlan", attrs.backend_data)
                )
                await b.start(leases[ns])
        others = prog.leases(n - 1, offset=100)  # 10.0.102.0/24 and up, not our two subnets

        def peers_of(ns: str) -> dict[Subnet, Lease]:
            other = h2 if ns == h1 else h1
            return {**others, subnets[other]: leases[other]}

        server = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", h2, *rt, "iperf3", "-s", "-p", str(IPERF_PORT),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.sleep(0.5)
        target = str(subnets[h2].network_address)
        for r in range(rounds):
            for on in (False, True) if r % 2 == 0 else (True, False):
                for ns in (h1, h2):
                    b = backs[f"{ns} {on}"]
                    if on:
                        await b.reconcile(peers_of(ns))
                    else:
                        await b.prepare()  # FilterPeers off: deletes the table
                        await b.reconcile(peers_of(ns))
                if on and set_size(h2) != n:
                    raise SystemExit(f"h2's set holds {set_size(h2)} elements, not {n}")
                gbps = await iperf(h1, target, seconds, rt)
                out["on" if on else "off"].append(gbps)
                print(f"bench: round {r + 1} filter {'on' if on else 'off'}: {gbps:.2f} Gbit/s",
                      file=sys.stderr, flush=True)  # fmt: skip
        drops = backs[f"{h2} True"].counters()
        if drops.get("peer_filter_dropped_packets_total", 0):
            raise SystemExit(f"the filter dropped legitimate traffic: {drops}")
    finally:
        if server is not None and server.returncode is None:
            server.terminate()
            await server.wait()
        for b in backs.values():
            await b.close()
        for ns in (h1, h2):
            await run("ip", "netns", "del", ns, check=False)
    return out


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def run(*argv: str, check: bool = True) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {err.decode().strip()}")


def ms(values: list[float], q: float) -> float:
    return prog.pct(values, q) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma list of sections: {','.join(SECTIONS)}"
    )
    parser.add_argument("--realtime", action="store_true", help="iperf3 under SCHED_FIFO")
    parser.add_argument(
        "--ipv6", action="store_true", help="section alone: the ip6 table too, side by side"
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        parser.error(f"unknown sections {sorted(only - set(SECTIONS))}; use {SECTIONS}")
    if args.skip_throughput:
        only.discard("throughput")
    n = args.peers
    print(f"load average at start: {loadavg()}")

    if "alone" in only and not args.ipv6:
        alone = await filter_alone(n, args.repeats)
        print(f"\nthe nft part alone, {n} elements, medians (ms)")
        for name, values in alone.items():
            print(f"{name:12} {statistics.median(values) * 1000:8.2f}  ({len(values)} runs)")
    elif "alone" in only:
        v4, v6 = {}, {}
        for _ in range(args.repeats):  # interleaved, one repeat of each at a time
            for into, family in ((v4, "ip"), (v6, "ip6")):
                for k, v in (await filter_alone(n, 1, family)).items():
                    into.setdefault(k, []).extend(v)
        print(f"\nthe nft part alone, {n} elements, medians (ms): table ip vs table ip6")
        for name in v4:
            a, b = statistics.median(v4[name]) * 1000, statistics.median(v6[name]) * 1000
            print(f"{name:12} {a:8.2f} {b:8.2f}  ip6/ip {b / a:5.2f}  ({len(v4[name])} runs)")

    if "program" in only:
        prog_times = await programming(n, args.repeats)
        med = {k: statistics.median(v) * 1000 for k, v in prog_times.items()}
        print(f"\nfull reconcile of {n} peers, median of {args.repeats} (ms)")
        print("pass      filter off  filter on   on/off")
        for kind in ("cold", "steady"):
            off, on = med[f"{kind} off"], med[f"{kind} on"]
            print(f"{kind:8} {off:11.1f} {on:10.1f} {on / off:8.2f}")

    if "events" in only:
        await print_events(n, args.events)
    if "counter" in only:
        await print_counter(n)
    if "throughput" in only:
        await print_throughput(n, args.seconds, args.rounds, args.realtime)


async def print_events(n: int, count: int) -> None:
    ev = await events(n, count)
    print(f"\none lease event with {n} present, incremental pass, {count} events (ms)")
    print("event   off p50  off p99   on p50   on p99  p50 on/off")
    for kind in ("add", "remove"):
        off, on = ev[f"{kind} off"], ev[f"{kind} on"]
        print(
            f"{kind:6} {ms(off, 0.5):8.2f} {ms(off, 0.99):8.2f} {ms(on, 0.5):8.2f} "
            f"{ms(on, 0.99):8.2f} {ms(on, 0.5) / ms(off, 0.5):11.2f}"
        )


async def print_counter(n: int) -> None:
    reads = await counter_reads(n)
    print(f"\nreading the drop counter with {n} elements in the set (median)")
    for name, values in reads.items():
        print(f"{name:22} {statistics.median(values) * 1e6:10.1f} us  ({len(values)} reads)")
    a, b = (statistics.median(v) for v in reads.values())
    print(f"{'ratio':22} {b / a:10.0f}x")


async def print_throughput(n: int, seconds: int, rounds: int, realtime: bool) -> None:
    tp = await throughput(n, seconds, rounds, realtime)
    off, on = statistics.median(tp["off"]), statistics.median(tp["on"])
    print(f"\niperf3 TCP host to host through flannel.1, {rounds} rounds of "
          f"{seconds} s{' (SCHED_FIFO)' if realtime else ''}, {n} elements in the set "
          "(Gbit/s)")  # fmt: skip
    print(f"filter off {off:.2f} (runs {[round(x, 2) for x in tp['off']]})")
    print(f"filter on  {on:.2f} (runs {[round(x, 2) for x in tp['on']]})")
    paired = [a / b for a, b in zip(tp["on"], tp["off"], strict=True)]
    print(f"on/off     {on / off:.2f} (medians); per round {[round(x, 2) for x in paired]}, "
          f"median {statistics.median(paired):.2f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
