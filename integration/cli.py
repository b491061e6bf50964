"""`overlayctl lab up|status|down`: a thin command line over integration.lab.

overlay/ctl.py calls `register(subparsers)`; each command sets `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from integration.containers import ATTACH_MODES
from integration.lab import (
    BACKENDS,
    DEFAULT_NETWORK,
    DEFAULT_NETWORK6,
    PROVIDERS,
    STATE_ROOT,
    Lab,
    LabError,
    MatrixEntry,
    open_lab,
)


def _progress(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `lab` with its `up`, `status` and `down` commands to an argparse subparsers object."""
    lab: argparse.ArgumentParser = subparsers.add_parser(
        "lab",
        help="a multi-node overlay lab in network namespaces or Docker containers",
        description="Run several overlayd hosts on one machine (network namespaces, or Docker "
        "containers running overlayd under systemd), with a local etcd, containers and real "
        "traffic between them.",
    )
    sub = lab.add_subparsers(dest="lab_cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", default="lab", help="lab name, 1-10 of [a-z0-9] (default: lab)")
        p.add_argument(
            "--state-root", type=Path, default=STATE_ROOT, help=f"(default: {STATE_ROOT})"
        )

    up = sub.add_parser("up", help="build the lab, start the daemons, probe every container")
    common(up)
    up.add_argument(
        "--provider",
        choices=PROVIDERS,
        default="netns",
        help="hosts as network namespaces (netns, default) or as Docker containers with "
        "systemd (containers; starts dockerd when none answers, builds its image locally)",
    )
    up.add_argument("--nodes", type=int, default=3, help="number of hosts (default: 3)")
    up.add_argument("--backend", choices=BACKENDS, default="vxlan", help="(default: vxlan)")
    up.add_argument(
        "--containers-per-node", type=int, default=1, help="containers per host (default: 1)"
    )
    up.add_argument(
        "--etcd-endpoints",
        default=None,
        help="use this etcd instead of starting one; it must be reachable from the underlay "
        "(the root namespace is the lab's .254 address)",
    )
    up.add_argument("--etcd-prefix", default=None)
    up.add_argument("--network", default=DEFAULT_NETWORK, help=f"(default: {DEFAULT_NETWORK})")
    up.add_argument("--resync-period", default=None, help="passed on to every overlayd")
    up.add_argument(
        "--lease-ttl", default=None, help="passed on to every overlayd as --subnet-lease-ttl"
    )
    up.add_argument(
        "--attach",
        choices=ATTACH_MODES,
        default="cni",
        help="attach containers with our flannel CNI plugin (cni, default) or with iproute2 "
        "commands laying out what the bridge plugin would (bridge)",
    )
    up.add_argument(
        "--ipv6",
        action="store_true",
        help="dual stack: IPv6 underlay addresses (a ULA /64 of the lab's own), EnableIPv6 in "
        "the network config, containers with both families, the matrix probes both (vxlan, "
        "host-gw or alloc)",
    )
    up.add_argument(
        "--ipv6-only",
        action="store_true",
        help="IPv6 only (EnableIPv4 false): hosts without IPv4 addresses, etcd on the lab's "
        "IPv6 underlay, leases in flannel's 0.0.0.0-0&<IPv6 subnet> form, IPv6-only "
        "containers (vxlan, host-gw or alloc; implies --ipv6)",
    )
    up.add_argument(
        "--network6",
        default=DEFAULT_NETWORK6,
        help=f"with --ipv6 or --ipv6-only (default: {DEFAULT_NETWORK6})",
    )
    up.add_argument("--no-matrix", action="store_true", help="skip the connectivity matrix")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="nodes, leases, daemons, containers")
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    matrix = sub.add_parser("matrix", help="probe every container from every other one again")
    common(matrix)
    matrix.set_defaults(func=cmd_matrix)

    down = sub.add_parser("down", help="remove everything the lab made")
    common(down)
    down.set_defaults(func=cmd_down)
    return lab


def _lab(args: argparse.Namespace) -> Lab:
    if os.geteuid() != 0:
        raise SystemExit(
            "overlayctl lab: run as root (it creates network namespaces, veth and vxlan devices)"
        )
    try:
        # `up` names the provider; the other commands read it from the lab's state.
        provider = getattr(args, "provider", None)
        return open_lab(args.name, state_root=args.state_root, progress=_progress,
                        provider=provider)  # fmt: skip
    except LabError as e:
        raise SystemExit(f"overlayctl lab: {e}") from None


def cmd_up(args: argparse.Namespace) -> int:
    lab = _lab(args)
    try:
        return asyncio.run(_up(lab, args))
    except (RuntimeError, OSError, ValueError) as e:  # LabError, CommandError, AttachError
        print(f"lab up failed: {e}", file=sys.stderr)
        print(
            f"whatever was built is recorded; remove it with: overlayctl lab down --name "
            f"{args.name}",
            file=sys.stderr,
        )
        return 2


async def _up(lab: Lab, args: argparse.Namespace) -> int:
    await lab.up(
        nodes=args.nodes,
        backend=args.backend,
        containers_per_node=args.containers_per_node,
        etcd_endpoints=args.etcd_endpoints,
        network=args.network,
        etcd_prefix=args.etcd_prefix,
        resync_period=args.resync_period,
        lease_ttl=args.lease_ttl,
        attach=args.attach,
        ipv6=args.ipv6,
        network6=args.network6,
        ipv6_only=args.ipv6_only,
    )
    rc = 0
    if not args.no_matrix:
        _progress("probing every container from every other one (TCP and UDP) ...")
        entries = await lab.matrix()
        print(format_matrix(lab, entries))
        rc = 0 if all(e.ok for e in entries) else 1
    print(
        f"\nlab {lab.name!r} is running. Inspect: overlayctl lab status --name {lab.name}   "
        f"Tear down: overlayctl lab down --name {lab.name}"
    )
    return rc


def format_matrix(lab: Lab, entries: list[MatrixEntry]) -> str:
    """A table per address family: rows are sources, columns destinations, cells `tcp/udp`
    round trips in ms. Then the total and each failure."""
    lines = []
    for family in sorted({e.family for e in entries} or {4}):
        lines += _family_table(lab, [e for e in entries if e.family == family], family)
    ok = sum(e.ok for e in entries)
    lines.append(f"{ok}/{len(entries)} probes passed")
    for e in entries:
        if not e.ok:
            lines.append(f"  FAIL {e.proto} {e.src_ip} -> {e.dst_ip}: {e.error}")
    return "\n".join(lines)


def _family_table(lab: Lab, entries: list[MatrixEntry], family: int) -> list[str]:
    conts = lab.containers()
    if family == 6:
        conts = [(n, c) for n, c in conts if c.ip6]
    label = {
        c.ns: f"{c.ns.removeprefix(lab.ns_prefix)} {c.ip6 if family == 6 else c.ip}"
        for _, c in conts
    }
    cells: dict[tuple[str, str], dict[str, MatrixEntry]] = {}
    for e in entries:
        cells.setdefault((e.src, e.dst), {})[e.proto] = e
    width = max([len(v) for v in label.values()] + [14]) + 2
    title = "connectivity matrix" + (" IPv6" if family == 6 else "")
    lines = [f"{title} (round trip TCP/UDP in ms; FAIL = no answer; - = not probed)"]
    lines.append("from \\ to".ljust(width) + "".join(label[c.ns].ljust(width) for _, c in conts))
    for _, src in conts:
        row = label[src.ns].ljust(width)
        for _, dst in conts:
            pair = cells.get((src.ns, dst.ns))
            if src.ns == dst.ns or not pair:
                cell = "-"
            else:
                parts = []
                for proto in ("tcp", "udp"):
                    got = pair.get(proto)
                    if got is None:
                        parts.append("-")
                    elif got.ok and got.rtt_ms is not None:
                        parts.append(f"{got.rtt_ms:.1f}")
                    else:
                        parts.append("FAIL")
                cell = "/".join(parts)
            row += cell.ljust(width)
        lines.append(row)
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    lab = _lab(args)
    if not lab.exists:
        print(f"no lab named {args.name!r} (state dir {lab.dir})", file=sys.stderr)
        return 1
    st = asyncio.run(lab.status())
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    if st.get("ipv6_only"):
        print(f"lab {st['name']} ({st['provider']}): backend {st['backend']}, IPv6 only: "
              f"network {st['network6']}, underlay {st['underlay6']}")  # fmt: skip
    else:
        print(f"lab {st['name']} ({st['provider']}): backend {st['backend']}, "
              f"network {st['network']}, underlay {st['underlay']}")  # fmt: skip
    if st.get("image"):
        print(f"image {st['image']}")
    if "network6" in st and not st.get("ipv6_only"):
        print(f"dual stack: IPv6 network {st['network6']}, underlay {st['underlay6']}")
    etcd_state = {True: "running", False: "NOT RUNNING", None: "external"}[st["etcd_alive"]]
    print(f"etcd {st['etcd']} ({etcd_state}), prefix {st['etcd_prefix']}")
    if st["etcd_error"]:
        print(f"  etcd error: {st['etcd_error']}")
    print("nodes:")
    for n in st["nodes"]:
        if n["kind"] == "overlayd":
            health = "ready" if n["ready"] else ("alive, NOT ready" if n["alive"] else "DOWN")
            daemon = f"overlayd pid {n['daemon_pid']} {health}"
            if n.get("systemd"):  # a container host: the pid is the one inside its container
                daemon = (f"overlayd.service {n['systemd']}, main pid {n['daemon_pid']} "
                          f"in the container, {health}")  # fmt: skip
        else:
            daemon = "configured by hand as a flannel host"
        conts = (
            ", ".join(
                f"{c['namespace']}="
                + ",".join(str(a) for a in (c["ip"], c.get("ip6")) if a is not None)
                for c in n["containers"]
            )
            or "none"
        )
        where = n.get("container") or n["namespace"]
        if st.get("ipv6_only"):
            v4, v6 = "", f" {n.get('public_ipv6')} subnet {n.get('subnet6')}"
        else:
            v4 = f" {n['public_ip']} subnet {n['subnet']}"
            v6 = f" + {n['public_ipv6']} {n['subnet6']}" if "public_ipv6" in n else ""
        print(f"  {n['node']} {where}{v4}{v6}: {daemon}")
        print(f"     containers: {conts}")
    print("leases in etcd:")
    for lease in st["leases"]:
        data = json.dumps(lease["backend_data"]) if lease["backend_data"] else ""
        sub = lease["subnet"] + (
            f" & {lease['subnet6']}" if "subnet6" in lease and not st.get("ipv6_only") else ""
        )
        print(f"  {sub} -> {lease['public_ip']} {lease['backend_type']} {data}")
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    lab = _lab(args)
    if not lab.exists:
        print(f"no lab named {args.name!r}", file=sys.stderr)
        return 1
    entries = asyncio.run(lab.matrix())
    print(format_matrix(lab, entries))
    return 0 if all(e.ok for e in entries) else 1


def cmd_down(args: argparse.Namespace) -> int:
    lab = _lab(args)
    if not lab.exists:
        print(f"no lab named {args.name!r}: nothing to do")
        return 0
    try:
        done = asyncio.run(lab.down())
    except (RuntimeError, OSError) as e:  # LabError, CommandError
        print(f"lab down failed: {e}", file=sys.stderr)
        return 2
    for line in done:
        print(f"lab: {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the lab commands alone (`python -m integration.cli up ...`) until overlayctl exists."""
    parser = argparse.ArgumentParser(prog="overlayctl")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["lab", *(argv if argv is not None else sys.argv[1:])])
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
