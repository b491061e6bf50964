"""A real 3-member etcd cluster whose members live in network namespaces of their own, so that
a partition is a real one (packets dropped, links down), not a stopped process.

Layout of a cluster with token TAG (namespaces `oc-TAG-*`):

    root ns: ocm-TAG (X.254/24)            the cluster's management address: etcdctl, checks
       |  veth
    oc-TAG-b: bridge br0, ports mgmt, m1, m2, m3
       |  veth
    oc-TAG-m1: eth0 X.1/24, etcd (client :2379 on every address, peer :2380 on X.1)
    oc-TAG-m2: eth0 X.2/24 ...                  oc-TAG-m3: eth0 X.3/24 ...

X is a /24 of the lab's pool (198.18.0.0/15), picked under the same lock as a lab's underlay.
`attach(lab)` gives every member a second interface, eth1, on the lab's underlay bridge (the
last free addresses of the lab's /24), so that the lab's hosts reach all three members as
clients while peer traffic stays on the cluster's own bridge; `lab_endpoints` are the URLs for
the daemons. Faults:

- `kill(i)` / `start(i)`: SIGKILL a member, start it again on its data;
- `partition(i)`: iptables in the member's namespace drops its peer traffic (port 2380) both
  ways; clients still reach it, as a member cut off from its peers by a real network fault;
- `isolate(i)`: the member's links go down: neither peers nor clients reach it;
- `heal(i)`: undo partition/isolate.

Every namespace and link is named from TAG and recorded before it is made; `down()` removes
them all (and anything else with the prefix), kills every member, and deletes the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import aetcd
import aetcd.exceptions

from integration.etcdserver import EtcdServer
from integration.lab import Lab, free_underlay, underlay_pool_lock
from integration.netns import CommandError, add_netns, delete_netns, list_netns, netns_exists, run
from subnetmgr.model import LeaseAttrs, MalformedLease, parse_subnet_key

CLIENT_PORT = 2379
PEER_PORT = 2380
NS_PREFIX = "oc-"


class ClusterError(RuntimeError):
    pass


@dataclass
class Member:
    index: int
    ns: str
    ip: str
    server: EtcdServer
    lab_ip: str | None = None
    partitioned: bool = False
    isolated: bool = False

    @property
    def endpoint(self) -> str:
        """As reached from the root namespace (over the cluster's management address)."""
        return f"http://{self.ip}:{CLIENT_PORT}"

    @property
    def lab_endpoint(self) -> str:
        """As reached from the hosts of the attached lab."""
        if self.lab_ip is None:
            raise ClusterError(f"member m{self.index} is not attached to a lab")
        return f"http://{self.lab_ip}:{CLIENT_PORT}"

    @property
    def running(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    @property
    def reachable(self) -> bool:
        """Running, and neither partitioned nor isolated: it can answer a linearizable read."""
        return self.running and not self.partitioned and not self.isolated


@dataclass
class EtcdCluster:
    size: int = 3
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    members: list[Member] = field(default_factory=list)
    network: IPv4Network | None = None
    data_root: Path | None = None
    namespaces: list[str] = field(default_factory=list)
    links: list[tuple[str | None, str]] = field(default_factory=list)
    """(namespace or None for the root one, link name) made by us outside our namespaces."""

    # ------------------------------------------------------------------ names

    @property
    def ns_prefix(self) -> str:
        return f"{NS_PREFIX}{self.tag}-"

    @property
    def bridge_ns(self) -> str:
        return f"{self.ns_prefix}b"

    @property
    def mgmt_link(self) -> str:
        return f"ocm-{self.tag}"

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def lab_endpoints(self) -> list[str]:
        return [m.lab_endpoint for m in self.members]

    def member(self, index: int) -> Member:
        for m in self.members:
            if m.index == index:
                return m
        raise ClusterError(f"the cluster has no member m{index}")

    # ------------------------------------------------------------------ up / down

    async def up(self, limit: float = 30.0) -> EtcdCluster:
        """Make the namespaces and links, start every member, wait until all are healthy.

        On any failure everything made so far is removed before the error propagates."""
        try:
            await self._up(limit)
        except BaseException:
            await self.down()
            raise
        return self

    async def _up(self, limit: float) -> None:
        self.data_root = Path(tempfile.mkdtemp(prefix=f"overlay-etcdcluster-{self.tag}-"))
        b = self.bridge_ns
        with underlay_pool_lock():
            self.network = await free_underlay()
            mgmt = IPv4Interface(f"{self.network.broadcast_address - 1}/24")
            self.namespaces.append(b)
            await add_netns(b)
            await run("ip", "link", "add", "br0", "type", "bridge", ns=b)
            await run("ip", "link", "set", "br0", "up", ns=b)
            self.links.append((None, self.mgmt_link))
            await run(
                "ip", "link", "add", self.mgmt_link, "type", "veth",
                "peer", "name", "mgmt", "netns", b,
            )  # fmt: skip
            await run("ip", "link", "set", "mgmt", "master", "br0", "up", ns=b)
            await run("ip", "addr", "add", str(mgmt), "dev", self.mgmt_link)
            await run("ip", "link", "set", self.mgmt_link, "up")
        for i in range(1, self.size + 1):
            ns = f"{self.ns_prefix}m{i}"
            ip = str(self.network.network_address + i)
            self.namespaces.append(ns)
            await add_netns(ns)
            await run(
                "ip", "link", "add", f"m{i}", "netns", b, "type", "veth",
                "peer", "name", "eth0", "netns", ns,
            )  # fmt: skip
            await run("ip", "link", "set", f"m{i}", "master", "br0", "up", ns=b)
            await run("ip", "addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
            await run("ip", "link", "set", "eth0", "up", ns=ns)
            data = self.data_root / f"m{i}"
            data.mkdir()
            server = EtcdServer(
                host=ip,
                data_dir=data,
                log_path=data / "etcd.log",
                client_port=CLIENT_PORT,
                peer_port=PEER_PORT,
                name=f"m{i}-{self.tag}",
                netns=ns,
                listen_host="0.0.0.0",
            )
            self.members.append(Member(i, ns, ip, server))
        initial = ",".join(f"{m.server.name}=http://{m.ip}:{PEER_PORT}" for m in self.members)
        for m in self.members:
            m.server.initial_cluster = initial
            m.server.start(wait=False)
        await asyncio.gather(*(asyncio.to_thread(m.server.wait_ready, limit) for m in self.members))

    async def down(self) -> None:
        """Kill every member, remove every namespace and link, delete the data. Idempotent."""
        for m in self.members:
            m.server.kill()
        for name in list(dict.fromkeys([*reversed(self.namespaces), *list_netns(self.ns_prefix)])):
            await delete_netns(name)
        for ns, link in self.links:
            if ns is None or netns_exists(ns):
                await run("ip", "link", "del", link, ns=ns, check=False)
        self.namespaces.clear()
        self.links.clear()
        if self.data_root is not None:
            shutil.rmtree(self.data_root, ignore_errors=True)
            self.data_root = None

    # ------------------------------------------------------------------ a lab as client

    async def attach(self, lab: Lab) -> list[str]:
        """Give every member an address on `lab`'s underlay (eth1, a port of the lab's bridge);
        return the member URLs as the lab's hosts reach them.

        The addresses are the lab's .253, .252, ... (its management address is .254)."""
        net = IPv4Network(lab.state.underlay)
        for m in self.members:
            lab_ip = IPv4Interface(f"{net.broadcast_address - 1 - m.index}/{net.prefixlen}")
            port = f"e{self.tag}m{m.index}"
            self.links.append((lab.underlay_ns, port))
            await run(
                "ip", "link", "add", port, "netns", lab.underlay_ns, "type", "veth",
                "peer", "name", "eth1", "netns", m.ns,
            )  # fmt: skip
            await run("ip", "link", "set", port, "master", "br0", "up", ns=lab.underlay_ns)
            await run("ip", "addr", "add", str(lab_ip), "dev", "eth1", ns=m.ns)
            await run("ip", "link", "set", "eth1", "up", ns=m.ns)
            m.lab_ip = str(lab_ip.ip)
        return self.lab_endpoints

    # ------------------------------------------------------------------ faults

    async def kill(self, index: int) -> None:
        """SIGKILL member `index` (its data stays for `start`)."""
        await asyncio.to_thread(self.member(index).server.kill)

    async def start(self, index: int, wait: bool = True, limit: float = 30.0) -> None:
        """Start member `index` again on its data; with `wait`, until it is healthy (which
        needs a quorum: start the others with wait=False first, then `wait_healthy`)."""
        server = self.member(index).server
        server.start(wait=False)
        if wait:
            await asyncio.to_thread(server.wait_ready, limit)

    async def wait_healthy(self, *indexes: int, limit: float = 30.0) -> None:
        members = [self.member(i) for i in indexes] if indexes else self.members
        await asyncio.gather(*(asyncio.to_thread(m.server.wait_ready, limit) for m in members))

    async def partition(self, index: int) -> None:
        """Cut member `index` off from its peers (iptables DROP of everything from or to port
        2380, in and out); clients still reach it."""
        m = self.member(index)
        # Both ports in both directions: etcd streams messages over connections either peer
        # dialled, so dropping only what goes to port 2380 leaves the replies on them.
        rules = [(c, p) for c in ("INPUT", "OUTPUT") for p in ("--dport", "--sport")]
        for chain, match in rules:
            await run(
                "iptables", "-w", "-A", chain, "-p", "tcp", match, str(PEER_PORT), "-j", "DROP",
                ns=m.ns,
            )  # fmt: skip
        m.partitioned = True

    async def isolate(self, index: int) -> None:
        """Take member `index`'s links down: neither peers nor clients reach it."""
        m = self.member(index)
        for link in ("eth0", "eth1") if m.lab_ip else ("eth0",):
            await run("ip", "link", "set", link, "down", ns=m.ns)
        m.isolated = True

    async def heal(self, index: int) -> None:
        m = self.member(index)
        if m.partitioned:
            await run("iptables", "-w", "-F", ns=m.ns)
            m.partitioned = False
        if m.isolated:
            for link in ("eth0", "eth1") if m.lab_ip else ("eth0",):
                await run("ip", "link", "set", link, "up", ns=m.ns)
            m.isolated = False

    async def restore(self, limit: float = 30.0) -> None:
        """Undo every fault: heal every member, start the stopped ones, wait until all are
        healthy."""
        for m in self.members:
            await self.heal(m.index)
            if not m.running:
                await self.start(m.index, wait=False)
        await self.wait_healthy(limit=limit)

    # ------------------------------------------------------------------ status

    async def etcdctl(self, *args: str, endpoints: list[str] | None = None) -> str:
        env = dict(os.environ, ETCDCTL_API="3")
        eps = ",".join(endpoints or [m.endpoint for m in self.members if m.reachable])
        return await run(
            "etcdctl", f"--endpoints={eps}", "--command-timeout=3s", *args, env=env, limit=10
        )

    async def status(self) -> dict[int, dict[str, Any]]:
        """`endpoint status` of every member that answers: {index: {"id", "leader", ...}}."""
        out: dict[int, dict[str, Any]] = {}
        for m in self.members:
            if not m.running or m.isolated:
                continue
            with contextlib.suppress(CommandError, ValueError, KeyError, IndexError, TypeError):
                doc = json.loads(
                    await self.etcdctl("endpoint", "status", "-w", "json", endpoints=[m.endpoint])
                )
                st = doc[0]["Status"]
                out[m.index] = {
                    "id": int(st["header"]["member_id"]),
                    "leader": int(st["leader"]),
                    "raft_term": int(st["raftTerm"]),
                    "revision": int(st["header"]["revision"]),
                }
        return out

    async def leader(self, limit: float = 20.0, avoid: int | None = None) -> int:
        """The index of the member that leads (as its reachable peers agree), once there is one
        (and it is not member `avoid`: after a fault to the leader, wait for the next one)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            st = await self.status()
            leaders = {s["leader"] for i, s in st.items() if self.member(i).reachable}
            if len(leaders) == 1:
                (lead,) = leaders
                for i, s in st.items():
                    if s["id"] == lead and i != avoid:
                        return i
            if loop.time() > deadline:
                raise ClusterError(f"no agreed leader within {limit}s: {st}")
            await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- invariant


def lease_conflicts(leases: Sequence[tuple[IPv4Network, IPv4Address]]) -> list[str]:
    """What is wrong with a set of live leases (subnet, public IP): two subnets that overlap,
    or two leases held by one public IP (a host holds exactly one). Empty when all is well."""
    found: list[str] = []
    ordered = sorted(leases, key=lambda x: (int(x[0].network_address), x[0].prefixlen))
    widest: tuple[IPv4Network, IPv4Address] | None = None
    for subnet, ip in ordered:
        # Sorted by first address, a subnet overlaps an earlier one iff it starts before the
        # end of the one reaching furthest so far.
        if widest is not None and subnet.network_address <= widest[0].broadcast_address:
            found.append(f"{subnet} ({ip}) overlaps {widest[0]} ({widest[1]})")
        if widest is None or subnet.broadcast_address > widest[0].broadcast_address:
            widest = (subnet, ip)
    holders: dict[IPv4Address, list[IPv4Network]] = {}
    for subnet, ip in ordered:
        holders.setdefault(ip, []).append(subnet)
    for ip, subnets in holders.items():
        if len(subnets) > 1:
            found.append(f"{ip} holds {len(subnets)} leases: {', '.join(map(str, subnets))}")
    return found


@dataclass
class InvariantChecker:
    """Reads the leases under `prefix` from a reachable member every `interval` seconds
    (linearizable reads, aetcd's own client, independent of the code under test) and records
    every violation of `lease_conflicts`, with the revision it was seen at.

    Run it as a task while a fault happens; `samples` counts the reads that answered,
    `unavailable` the ones that did not (no member with a quorum)."""

    cluster: EtcdCluster
    prefix: str
    interval: float = 0.1
    samples: int = 0
    unavailable: int = 0
    malformed: int = 0
    violations: list[str] = field(default_factory=list)
    _clients: dict[int, aetcd.Client] = field(default_factory=dict)

    async def _read(self) -> tuple[int, list[tuple[IPv4Network, IPv4Address]]] | None:
        for m in self.cluster.members:
            if not m.reachable:
                continue
            client = self._clients.get(m.index)
            if client is None:
                client = aetcd.Client(host=m.ip, port=CLIENT_PORT, timeout=1)
                self._clients[m.index] = client
            try:
                got = await asyncio.wait_for(
                    client.get_prefix(f"{self.prefix}/subnets/".encode()), 2
                )
            except (aetcd.exceptions.ClientError, TimeoutError, OSError):
                continue
            leases = []
            for kv in got:
                try:
                    subnet, _ = parse_subnet_key(kv.key.decode().rsplit("/", 1)[-1])
                    attrs = LeaseAttrs.from_json(kv.value)
                except (MalformedLease, UnicodeDecodeError):
                    self.malformed += 1
                    continue
                leases.append((subnet, attrs.public_ip))
            return got.header.revision, leases
        return None

    async def run(self) -> None:
        try:
            while True:
                got = await self._read()
                if got is None:
                    self.unavailable += 1
                else:
                    self.samples += 1
                    revision, leases = got
                    for problem in lease_conflicts(leases):
                        self.violations.append(f"revision {revision}: {problem}")
                await asyncio.sleep(self.interval)
        finally:
            for client in self._clients.values():
                with contextlib.suppress(Exception):
                    await client.close()
            self._clients.clear()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[InvariantChecker]:
        """Check while the block runs; the task is cancelled at its end (also on failure)."""
        task = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
