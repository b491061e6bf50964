"""Throughput of the udp backend against a C baseline and kernel VXLAN, side by side in one run.

    .venv/bin/python bench/bench_udp.py [--seconds 5] [--rounds 3] [--variants ours,c,vxlan,...]
        [--rev GIT_REVISION]

Two namespaces joined by a veth pair (MTU 1500, 192.168.x.0/24) stand for two hosts. For each
data path in turn, the overlay addresses 10.99.1.0 (A) and 10.99.2.0 (B) are reached through it
and iperf3 measures, from A to B:
  - TCP throughput (one stream),
  - UDP throughput with 1400-byte datagrams, unlimited rate (received rate, loss),
  - UDP packets per second with 64-byte datagrams (received packets per second).
Data paths:
  ours        UdpBackend with its default loop options: TUN offloads (TSO super-packets cut in
              Python, GSO writes into the TUN device), UDP_SEGMENT sends, UDP_GRO receives
  ours-notso  as ours, but the kernel segments TCP before the TUN device (one packet per read)
  ours-batch  no TUN offloads (the kernel cuts TSO before the TUN device, one packet per TUN
              read and write), but UDP_SEGMENT batches and UDP_GRO
  ours-vnet   TUN offloads and UDP_GRO, but one sendmsg per packet (no UDP_SEGMENT)
  ours-gro    UDP_GRO on receive only, otherwise one packet per system call
  ours-plain  one packet per system call everywhere (no offloads, no batching)
  c           bench/udp_baseline.c: flannel's C proxy design, one packet per system call
  vxlan       the kernel's VXLAN device (a reference only: no userspace)
  ours@REV    with --rev REV: `ours` as of that git revision (side by side with the current code)
Ratios are against `c`. Root needed; everything is created under unique names and removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
NETWORK = "10.99.0.0/16"
A_SUBNET, B_SUBNET = "10.99.1.0/24", "10.99.2.0/24"
A_ADDR, B_ADDR = "10.99.1.0", "10.99.2.0"

DRIVER_FLAGS = {
    "ours": [],
    "ours-notso": ["--no-tso"],
    "ours-batch": ["--no-vnet"],
    "ours-vnet": ["--no-gso"],
    "ours-gro": ["--no-vnet", "--no-gso"],
    "ours-plain": ["--plain"],
}


def sh(*cmd: str, check: bool = True) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    return res.stdout


def nsx(ns: str, *cmd: str, check: bool = True) -> str:
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


@dataclass
class Lab:
    a: str
    b: str
    a_ip: str
    b_ip: str
    a_if: str
    b_if: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    tag = uuid.uuid4().hex[:6]
    third = 100 + int(tag[:2], 16) % 100
    lab = Lab(f"ubA{tag}", f"ubB{tag}", f"192.168.{third}.1", f"192.168.{third}.2",
              f"ua{tag}", f"ub{tag}")  # fmt: skip
    try:
        sh("ip", "netns", "add", lab.a)
        sh("ip", "netns", "add", lab.b)
        sh("ip", "link", "add", lab.a_if, "netns", lab.a, "type", "veth",
           "peer", "name", lab.b_if, "netns", lab.b)  # fmt: skip
        for ns, ifname, ip in ((lab.a, lab.a_if, lab.a_ip), (lab.b, lab.b_if, lab.b_ip)):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
            sh("ip", "-n", ns, "link", "set", ifname, "up")
        yield lab
    finally:
        stop(lab)
        sh("ip", "netns", "del", lab.a, check=False)
        sh("ip", "netns", "del", lab.b, check=False)


def stop(lab: Lab) -> None:
    for p in lab.procs:
        if p.poll() is None:
            if p.stdin:
                p.stdin.close()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    lab.procs.clear()
    # The udp backend's flannel0 is persistent (it outlives its daemon, as a restart needs):
    # remove it so that the next variant starts from clean namespaces.
    for ns in (lab.a, lab.b):
        sh("ip", "-n", ns, "link", "del", "flannel0", check=False)


def start_ours(lab: Lab, flags: list[str], tree: Path = ROOT) -> None:
    """Our backend in both namespaces; `tree` holds the code it runs (python -m from there)."""
    for ns, ifname, subnet, peer_subnet, peer_ip in (
        (lab.a, lab.a_if, A_SUBNET, B_SUBNET, lab.b_ip),
        (lab.b, lab.b_if, B_SUBNET, A_SUBNET, lab.a_ip),
    ):
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-m", "backends.udp_driver", "--iface", ifname,
             "--network", NETWORK, "--subnet", subnet, *flags],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tree,
        )  # fmt: skip
        lab.procs.append(p)
        assert p.stdin and p.stdout
        if not json.loads(p.stdout.readline()).get("ready"):
            raise RuntimeError("udp_driver did not start")
        p.stdin.write(json.dumps({"peers": [[peer_subnet, peer_ip, ""]]}) + "\n")
        p.stdin.flush()
        json.loads(p.stdout.readline())


def start_c(lab: Lab, binary: str) -> None:
    for ns, ip, addr, peer_net, peer_ip in (
        (lab.a, lab.a_ip, A_ADDR, B_ADDR, lab.b_ip),
        (lab.b, lab.b_ip, B_ADDR, A_ADDR, lab.a_ip),
    ):
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, binary, "cbase0", ip, "8285", peer_net, "24", peer_ip],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        lab.procs.append(p)
        assert p.stdout
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("udp_baseline did not start")
        sh("ip", "-n", ns, "link", "set", "cbase0", "mtu", "1472", "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "cbase0")
        sh("ip", "-n", ns, "route", "add", NETWORK, "dev", "cbase0")


def start_vxlan(lab: Lab) -> None:
    for ns, ifname, ip, addr, peer_ip in (
        (lab.a, lab.a_if, lab.a_ip, A_ADDR, lab.b_ip),
        (lab.b, lab.b_if, lab.b_ip, B_ADDR, lab.a_ip),
    ):
        sh("ip", "-n", ns, "link", "add", "vxb0", "type", "vxlan", "id", "1", "local", ip,
           "remote", peer_ip, "dev", ifname, "dstport", "8472", "nolearning")  # fmt: skip
        sh("ip", "-n", ns, "link", "set", "vxb0", "mtu", "1450", "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "vxb0")
        sh("ip", "-n", ns, "route", "add", NETWORK, "dev", "vxb0")


def stop_vxlan(lab: Lab) -> None:
    for ns in (lab.a, lab.b):
        sh("ip", "-n", ns, "link", "del", "vxb0", check=False)


def iperf(lab: Lab, seconds: int, *client_args: str) -> dict[str, float]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", lab.b, "iperf3", "-s", "-1", "-B", B_ADDR],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out = ""
        for _ in range(50):
            time.sleep(0.1)
            res = subprocess.run(
                ["ip", "netns", "exec", lab.a, "iperf3", "-J", "-c", B_ADDR, "-B", A_ADDR,
                 "-t", str(seconds), *client_args],
                capture_output=True, text=True, timeout=seconds + 30,
            )  # fmt: skip
            out = res.stdout
            if res.returncode == 0:
                break
        doc = json.loads(out)
        if "error" in doc:
            raise RuntimeError(f"iperf3: {doc['error']}")
        end = doc["end"]
        if "-u" not in client_args:
            return {"bps": end["sum_received"]["bits_per_second"]}
        s = end["sum"]
        received = s["packets"] - s["lost_packets"]
        return {
            "bps": s["bits_per_second"] * received / max(s["packets"], 1),
            "pps": received / s["seconds"],
            "loss": s["lost_percent"],
        }
    finally:
        server.wait(timeout=seconds + 30)


def measure(lab: Lab, seconds: int) -> dict[str, float]:
    tcp = iperf(lab, seconds)
    udp = iperf(lab, seconds, "-u", "-b", "0", "-l", "1400")
    small = iperf(lab, seconds, "-u", "-b", "0", "-l", "64")
    return {
        "tcp_gbps": tcp["bps"] / 1e9,
        "udp_gbps": udp["bps"] / 1e9,
        "udp_loss": udp["loss"],
        "pps_k": small["pps"] / 1e3,
        "pps_loss": small["loss"],
    }


def batching(lab: Lab) -> str:
    """Packets per system call in host A's tun->udp loop and host B's udp->tun loop."""
    counters = []
    for p in lab.procs:
        assert p.stdin and p.stdout
        p.stdin.write('{"counters": true}\n')
        p.stdin.flush()
        counters.append(json.loads(p.stdout.readline())["counters"])
    a, b = counters

    def per(packets: int, calls: int) -> str:
        return f"{packets / max(calls, 1):.1f}"

    return (
        f"A: {per(a['tx_packets'], a['tun_reads'])} pkt/TUN read, "
        f"{per(a['tx_packets'], a['tx_syscalls'])} pkt/sendmsg; "
        f"B: {per(b['rx_packets'], b['rx_syscalls'])} pkt/recvmsg, "
        f"{per(b['rx_packets'], b['tun_writes'])} pkt/TUN write"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians kept")
    parser.add_argument(
        "--variants", default="ours,ours-notso,ours-batch,ours-vnet,ours-gro,ours-plain,c,vxlan"
    )
    parser.add_argument(
        "--rev",
        help="also run `ours` as of this git revision (e.g. the commit before a change), "
        "exported with git archive into a temporary directory, as the variant ours@REV",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_udp needs root (network namespaces, TUN devices)")
    variants = args.variants.split(",")
    known = [*DRIVER_FLAGS, "c", "vxlan"]
    for v in variants:
        if v not in known:
            sys.exit(f"unknown variant {v!r}; known: {', '.join(known)}")
    old = f"ours@{args.rev}" if args.rev else ""
    if old:
        variants.insert(variants.index("ours") + 1 if "ours" in variants else 0, old)
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp, lab() as lb:
        binary = os.path.join(tmp, "udp_baseline")
        if "c" in variants:
            gcc = shutil.which("gcc") or sys.exit("gcc not found")
            sh(gcc, "-O2", "-Wall", "-o", binary, str(ROOT / "bench" / "udp_baseline.c"))
        old_tree = Path(tmp) / "rev"
        if old:
            old_tree.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.rev, "backends", "subnetmgr"],
                capture_output=True, check=True,
            )  # fmt: skip
            subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
        for rnd in range(args.rounds):
            for v in variants:
                if v == old:
                    start_ours(lb, [], old_tree)
                elif v in DRIVER_FLAGS:
                    start_ours(lb, DRIVER_FLAGS[v])
                elif v == "c":
                    start_c(lb, binary)
                else:
                    start_vxlan(lb)
                try:
                    r = measure(lb, args.seconds)
                    extra = f"  [{batching(lb)}]" if v in DRIVER_FLAGS or v == old else ""
                finally:
                    stop(lb)
                    stop_vxlan(lb)
                runs[v].append(r)
                shown = {k: round(x, 3) for k, x in r.items()}
                print(f"# round {rnd + 1} {v}: {json.dumps(shown)}{extra}", flush=True)
    results = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    base = results.get("c")
    print(f"\nmedians of {args.rounds} interleaved rounds of {args.seconds} s, A -> B")
    print(f"{'path':<14} {'TCP Gbit/s':>10} {'UDP Gbit/s':>10} {'loss%':>6} {'64B kpps':>9} "
          f"{'loss%':>6}   ratios to c (TCP, UDP, pps)")  # fmt: skip
    for v, r in results.items():
        ratio = ""
        if base:
            ratio = "  ".join(f"{r[k] / base[k]:.2f}x" for k in ("tcp_gbps", "udp_gbps", "pps_k"))
        print(f"{v:<14} {r['tcp_gbps']:>10.2f} {r['udp_gbps']:>10.2f} {r['udp_loss']:>6.1f} "
              f"{r['pps_k']:>9.0f} {r['pps_loss']:>6.1f}   {ratio}")  # fmt: skip


if __name__ == "__main__":
    main()
