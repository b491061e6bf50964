"""Run one `UdpBackend` in the current network namespace, driven by JSON lines on stdin.

    ip netns exec NS python -m backends.udp_driver --iface eth0 --network 10.5.0.0/16 \
        --subnet 10.5.1.0/24 [--port 8285] [--plain]

Prints {"ready": true, "mtu": N, "backend_type": ""} once the loop runs, then answers each
command line with one JSON line:
    {"peers": [["10.5.2.0/24", "192.168.7.2", ""], ...]}  -> reconcile, {"ok": true}
    {"counters": true}                                    -> {"counters": {...}}
    {"own": "10.5.9.0/24"}                 -> start() again with that lease, {"ok": true}
EOF on stdin closes the backend and exits. Tests and benchmarks use it to run the backend
inside a namespace; the daemon does not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from ipaddress import IPv4Address, IPv4Network

from backends.base import ExternalInterface
from backends.udp import LoopOptions, UdpBackend
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig, Subnet


async def _external(name: str) -> ExternalInterface:
    from pyroute2 import AsyncIPRoute

    async with asyncio.timeout(5), AsyncIPRoute() as ipr:
        idx = (await ipr.link_lookup(ifname=name))[0]
        mtu = 0
        for link in await ipr.link("get", index=idx):
            mtu = int(link.get("IFLA_MTU"))
        addr = None
        async for msg in await ipr.addr("dump", index=idx):
            if msg["family"] == socket.AF_INET:
                addr = IPv4Address(msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS"))
                break
    if addr is None:
        raise SystemExit(f"interface {name!r} has no IPv4 address")
    return ExternalInterface(name, idx, addr, addr, mtu)


async def amain(args: argparse.Namespace) -> None:
    ext = await _external(args.iface)
    backend_doc: dict[str, object] = {"Type": "udp"}
    if args.port:
        backend_doc["Port"] = args.port
    config = NetworkConfig.from_dict({"Network": args.network, "Backend": backend_doc})
    options = (
        LoopOptions(vnet_hdr=False, udp_segment=False, udp_gro=False)
        if args.plain
        else LoopOptions(
            vnet_hdr=not args.no_vnet,
            tso=not args.no_tso,
            udp_segment=not args.no_gso,
            udp_gro=not args.no_gro,
        )
    )
    backend = UdpBackend(config, ext, options=options)
    attrs = await backend.prepare()
    own = Lease(IPv4Network(args.subnet), LeaseAttrs(ext.public_ip, backend_type=""))
    mtu = await backend.start(own)
    out = sys.stdout
    out.write(json.dumps({"ready": True, "mtu": mtu, "backend_type": attrs.backend_type}) + "\n")
    out.flush()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            reply: dict[str, object]
            if "peers" in cmd:
                peers: dict[Subnet, Lease] = {
                    IPv4Network(net): Lease(
                        IPv4Network(net), LeaseAttrs(IPv4Address(ip), backend_type=btype)
                    )
                    for net, ip, btype in cmd["peers"]
                }
                await backend.reconcile(peers)
                reply = {"ok": True}
            elif "own" in cmd:
                subnet = IPv4Network(cmd["own"])
                await backend.start(Lease(subnet, LeaseAttrs(ext.public_ip, backend_type="")))
                reply = {"ok": True}
            elif "counters" in cmd:
                reply = {
                    "counters": backend.counters(),
                    "running": backend.running,
                    "pids": backend.worker_pids,
                }
            else:
                reply = {"error": f"unknown command {cmd!r}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
    finally:
        await backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="run a UdpBackend in this network namespace")
    parser.add_argument("--iface", required=True)
    parser.add_argument("--network", required=True)
    parser.add_argument("--subnet", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="no offloads: one packet per call")
    parser.add_argument("--no-vnet", action="store_true")
    parser.add_argument("--no-tso", action="store_true")
    parser.add_argument("--no-gso", action="store_true")
    parser.add_argument("--no-gro", action="store_true")
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
