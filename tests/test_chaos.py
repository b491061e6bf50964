"""Chaos: real overlayd daemons and real traffic against a real 3-member etcd cluster whose
members live in network namespaces of their own (integration.etcdcluster), under faults.

One cluster and one 3-host vxlan lab are shared by the tests of this module; each test makes
one fault, undoes it and leaves the cluster healthy and the lab at its three hosts. Throughout
each fault:

- an invariant checker reads the leases from a reachable member (aetcd, linearizable) every
  100 ms and records any two live leases that overlap or share a public IP;
- two probe streams (UDP, every 10 ms) run between containers of different hosts; the vxlan
  data path does not depend on etcd, so no probe may be lost. Each fault's longest gap is
  printed (`-s`) and recorded in docs/faults.md.

After each fault: every host keeps its subnet (subnet.env and its lease), every host routes
every other one, all containers reach each other, and a host that joins afterwards is
programmed everywhere.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from integration.containers import SubnetEnv
from integration.etcdcluster import CLIENT_PORT, EtcdCluster, InvariantChecker, lease_conflicts
from integration.lab import HEALTH_PORT, Lab, http_status
from integration.netns import CommandError, ip_json, run
from subnetmgr.model import LeaseAttrs
from tests.labtools import assert_full_connectivity, eventually, probe_stream

pytestmark = [pytest.mark.root, pytest.mark.slow]

RESYNC = "1"
LEASE_TTL = 40
"""Seconds: the daemons' lease TTL (--subnet-lease-ttl), so that an outage can outlast it.

Not shorter, so that the daemon's own timings stay well inside it, as they are inside the
production 24 h: its renewals come at TTL/2 = 20 s left, far more than an etcd call's 5 s
timeout and a failover; after an outage it retries getting its lease back at most 30 s apart
(its back-off's cap), while etcd, once it has a leader again, gives every lease a full TTL.
With a 6 s TTL both were seen to fail: a renewal stuck 5 s on an isolated member let the
lease expire (2 s of lost probes), and a retry 7 s after etcd came back found the key
expired (3.5 s of lost probes): see docs/faults.md."""


@dataclass
class Chaos:
    cluster: EtcdCluster
    lab: Lab
    lease_ttl: int
    """The daemons' lease TTL (--subnet-lease-ttl), seconds."""
    gaps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    followed: dict[str, float] = field(default_factory=dict)
    """Per fault: seconds from writing a new lease during the fault until every host routed it."""


async def _build(cluster: EtcdCluster, lab: Lab, ttl: int) -> None:
    await cluster.up()
    # The config is written through the root namespace's view of the members; the daemons
    # reach them on the lab's own underlay once the cluster is attached to it.
    await lab.up(
        nodes=0,
        etcd_endpoints=",".join(cluster.endpoints),
        resync_period=RESYNC,
        lease_ttl=str(ttl),
    )
    lab.state.daemon_endpoints = ",".join(await cluster.attach(lab))
    lab.save()
    await lab.add_nodes(3)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    cluster = EtcdCluster()
    lab = Lab(f"x{uuid.uuid4().hex[:6]}", state_root=tmp_path_factory.mktemp("labs"))
    state = Chaos(cluster, lab, LEASE_TTL)
    try:
        asyncio.run(_build(cluster, lab, LEASE_TTL))
        yield state
    finally:
        asyncio.run(lab.down())
        asyncio.run(cluster.down())
        for fault, streams in state.gaps.items():
            followed = state.followed.get(fault)
            print(f"\nchaos gap, {fault}: " + "; ".join(json.dumps(s) for s in streams)
                  + f"; new lease routed everywhere after {followed}s")  # fmt: skip


# --------------------------------------------------------------------------- helpers


async def overlay_routes(lab: Lab, index: int) -> set[str]:
    routes = await ip_json("route", "show", "dev", "flannel.1", ns=lab.node(index).ns)
    return {r["dst"] for r in routes}


async def etcd_member_of(chaos: Chaos, index: int) -> set[int]:
    """The members host `index`'s daemon has an established connection to (from `ss`)."""
    out = await run(
        "ss", "-Htn", "state", "established", f"dport = :{CLIENT_PORT}", ns=chaos.lab.node(index).ns
    )
    by_ip = {m.lab_ip: m.index for m in chaos.cluster.members}
    found = set()
    for line in out.splitlines():
        # gRPC's sockets are IPv6 ones: the peer reads [::ffff:198.18.X.Y]:2379.
        peer = line.split()[-1].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
        if peer in by_ip:
            found.add(by_ip[peer])
    return found


async def routes_match(lab: Lab, subnets: set[str]) -> bool:
    """Every host routes exactly `subnets` minus its own over flannel.1."""
    for node in lab.state.nodes:
        if await overlay_routes(lab, node.index) != subnets - {str(node.subnet)}:
            return False
    return True


async def assert_converged(chaos: Chaos) -> None:
    """Every host kept its subnet and lease, routes every other host, and reaches it."""
    lab = chaos.lab
    await chaos.cluster.wait_healthy()
    leases = await lab.leases()
    for node in lab.state.nodes:
        env = SubnetEnv.read(lab.subnet_file(node.index))
        assert str(env.subnet) == node.subnet, f"h{node.index} changed its subnet"
        lease = leases.get(IPv4Network(node.subnet))
        assert lease is not None, f"h{node.index}'s lease {node.subnet} is gone from etcd"
        assert lease.attrs.public_ip == IPv4Address(node.ip)
    assert {str(s) for s in leases} == {str(n.subnet) for n in lab.state.nodes}
    subnets = {str(n.subnet) for n in lab.state.nodes}

    async def programmed() -> bool:
        return await routes_match(lab, subnets)

    await eventually(programmed, "every host routes every other host", 30)
    await assert_full_connectivity(lab)


async def assert_join_programmed_everywhere(chaos: Chaos) -> None:
    """A host joining now is programmed on every host and reaches every container; it then
    leaves again (lease deleted) and every host drops it."""
    lab = chaos.lab
    node = await lab.add_node()
    subnets = {str(n.subnet) for n in lab.state.nodes}

    async def programmed() -> bool:
        return await routes_match(lab, subnets)

    await eventually(programmed, f"h{node.index} ({node.subnet}) routed everywhere", 30)
    await assert_full_connectivity(lab)
    await lab.remove_node(node.index)
    left = {str(n.subnet) for n in lab.state.nodes}

    async def dropped() -> bool:
        return await routes_match(lab, left)

    await eventually(dropped, f"h{node.index} ({node.subnet}) dropped everywhere", 30)


async def write_peer_lease(chaos: Chaos, subnet: IPv4Network, ttl: int = 120) -> None:
    """A lease of a simulated vxlan host, written through a reachable member (it is never sent
    any traffic: its public IP is a free underlay address)."""
    net = IPv4Network(chaos.lab.state.underlay)
    attrs = LeaseAttrs(
        net.network_address + 200, None, "vxlan", {"VNI": 1, "VtepMAC": "0e:00:00:00:c4:05"}
    )
    lease_id = (await chaos.cluster.etcdctl("lease", "grant", str(ttl))).split()[1]
    await chaos.cluster.etcdctl(
        "put", f"--lease={lease_id}", chaos.lab.lease_key(subnet), attrs.to_json()
    )


async def assert_daemons_follow_changes(chaos: Chaos, fault: str) -> None:
    """A lease added (and then deleted) through a reachable member reaches every daemon.
    How long until every host routed it is printed and recorded with the fault's gaps."""
    lab = chaos.lab
    loop = asyncio.get_running_loop()
    start = loop.time()
    taken = {IPv4Network(str(n.subnet)) for n in lab.state.nodes}
    network = IPv4Network(lab.state.network)
    subnet = next(s for s in reversed(list(network.subnets(new_prefix=24))) if s not in taken)
    await write_peer_lease(chaos, subnet)
    with_peer = {str(s) for s in taken} | {str(subnet)}

    async def added() -> bool:
        return await routes_match(lab, with_peer)

    await eventually(added, f"every daemon routes the new lease {subnet}", 40)
    followed = round(loop.time() - start, 2)
    chaos.followed[fault] = followed
    print(f"\nchaos {fault}: a new lease was routed by every host after {followed}s")
    await chaos.cluster.etcdctl("del", lab.lease_key(subnet))

    async def removed() -> bool:
        return await routes_match(lab, {str(s) for s in taken})

    await eventually(removed, f"every daemon dropped the deleted lease {subnet}", 40)


async def assert_all_healthz(lab: Lab) -> None:
    for node in lab.state.nodes:
        assert await http_status(node.ip, HEALTH_PORT, "/healthz") == 200, f"h{node.index}"


async def daemon_status(lab: Lab, index: int) -> dict[str, Any]:
    """Host `index`'s /status (readiness and its reason, lease, etcd health) as JSON."""
    url = f"http://{lab.node(index).ip}:{HEALTH_PORT}/status"

    def get() -> dict[str, Any]:
        with urllib.request.urlopen(url, timeout=3) as r:
            doc: dict[str, Any] = json.load(r)
            return doc

    return await asyncio.to_thread(get)


async def assert_all_ready(lab: Lab) -> None:
    for node in lab.state.nodes:
        st = await daemon_status(lab, node.index)
        assert st["ready"] is True, f"h{node.index}: {st}"


async def assert_all_say_lease_expired(lab: Lab) -> None:
    """Every daemon says, on /readyz and /status, that its lease expired while etcd was away."""
    for node in lab.state.nodes:
        st = await daemon_status(lab, node.index)
        assert st["ready"] is False and "expired" in st["reason"], f"h{node.index}: {st}"
        assert not st["etcd"]["up"], f"h{node.index}: {st}"
        assert await http_status(node.ip, HEALTH_PORT, "/readyz") == 503


async def wait_all_ready(lab: Lab, fault: str) -> None:
    """Until every /readyz is 200 again; prints how long that took (etcd is whole by now)."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def ready() -> bool:
        for node in lab.state.nodes:
            if await http_status(node.ip, HEALTH_PORT, "/readyz") != 200:
                return False
        return True

    await eventually(ready, "every daemon ready again", 60)
    print(f"\nchaos {fault}: every daemon ready {loop.time() - start:.2f}s after etcd was whole")


@asynccontextmanager
async def under_watch(chaos: Chaos, fault: str) -> AsyncIterator[InvariantChecker]:
    """Probe streams h1 -> h2 and h3 -> h1 and the lease invariant checker while the block
    runs; afterwards: no violation, no probe lost (the gaps are recorded for the docs)."""
    checker = InvariantChecker(chaos.cluster, chaos.lab.state.prefix)
    async with (
        checker.running(),
        probe_stream(chaos.lab, 1, 2) as s12,
        probe_stream(chaos.lab, 3, 1) as s31,
    ):
        yield checker
    chaos.gaps[fault] = [s12, s31]
    print(f"\nchaos {fault}: probes {s12} {s31}; invariant reads {checker.samples} "
          f"answered, {checker.unavailable} without quorum")  # fmt: skip
    assert checker.violations == []
    assert checker.samples > 0
    logs = "\n".join(
        f"--- h{n.index}:\n{chaos.lab.log_tail(n.index, 40)}" for n in chaos.lab.state.nodes
    )
    for s in (s12, s31):
        assert s["sent"] > 0 and s["lost"] == 0, f"{s}; the daemons' last log lines:\n{logs}"


@asynccontextmanager
async def fault(chaos: Chaos, name: str) -> AsyncIterator[InvariantChecker]:
    """`under_watch`; whatever happens in the block, the cluster is whole again afterwards
    (the block undoes its fault itself, as part of the scenario; this only catches a failure)."""
    try:
        async with under_watch(chaos, name) as checker:
            yield checker
    finally:
        await chaos.cluster.restore()


# --------------------------------------------------------------------------- faults


async def test_lab_on_the_cluster_and_invariant_holds(chaos: Chaos) -> None:
    """The starting point: three hosts on the three-member cluster, every member healthy."""
    assert len(chaos.lab.state.nodes) == 3
    assert chaos.lab.state.daemon_endpoints.count(",") == 2
    for node in chaos.lab.state.nodes:
        assert await etcd_member_of(chaos, node.index), f"h{node.index} has no etcd connection"
    leases = await chaos.lab.leases()
    assert lease_conflicts([(s, v.attrs.public_ip) for s, v in leases.items()]) == []
    await assert_converged(chaos)


async def test_leader_killed(chaos: Chaos) -> None:
    cluster = chaos.cluster
    leader = await cluster.leader()
    async with fault(chaos, "leader killed"):
        await cluster.kill(leader)
        new = await cluster.leader(avoid=leader)
        assert new != leader
        await assert_all_healthz(chaos.lab)
        await assert_daemons_follow_changes(chaos, "leader killed")
        await assert_all_ready(chaos.lab)
        await cluster.start(leader)
    await assert_converged(chaos)
    await assert_join_programmed_everywhere(chaos)


async def test_member_partitioned_from_its_peers(chaos: Chaos) -> None:
    """The member the daemons talk to loses its peers (iptables DROP of the peer port) but
    still accepts clients, and serves a watch that never delivers another event unless it
    requires a leader: the daemons must notice and move to a member with a quorum.

    One extra host runs with the production lease TTL (24 h): its renewals are hours apart,
    so only its watch can notice the partition."""
    cluster, lab = chaos.cluster, chaos.lab
    short_ttl, lab.state.lease_ttl = lab.state.lease_ttl, None
    try:
        watcher = await lab.add_node()
    finally:
        lab.state.lease_ttl = short_ttl
        lab.save()
    try:
        used = await etcd_member_of(chaos, watcher.index)
        assert used, f"h{watcher.index} has no etcd connection"
        target = min(used)
        async with fault(chaos, "member partitioned"):
            await cluster.partition(target)
            await cluster.leader(avoid=target)
            await assert_all_healthz(lab)
            await assert_daemons_follow_changes(chaos, "member partitioned")

            async def moved() -> bool:
                for node in lab.state.nodes:
                    if target in await etcd_member_of(chaos, node.index):
                        return False
                return True

            await eventually(moved, f"no daemon talks to the partitioned member m{target}", 30)
            await assert_all_ready(lab)
            await cluster.heal(target)
    finally:
        await cluster.restore()
        await lab.remove_node(watcher.index)
    await assert_converged(chaos)
    await assert_join_programmed_everywhere(chaos)


async def test_member_isolated(chaos: Chaos) -> None:
    """The member the daemons talk to loses its links: neither peers nor clients reach it."""
    cluster, lab = chaos.cluster, chaos.lab
    used = set().union(*[await etcd_member_of(chaos, n.index) for n in lab.state.nodes])
    target = min(used)
    async with fault(chaos, "member isolated"):
        await cluster.isolate(target)
        await cluster.leader(avoid=target)
        await assert_daemons_follow_changes(chaos, "member isolated")
        await cluster.heal(target)
    await assert_converged(chaos)
    await assert_join_programmed_everywhere(chaos)


async def test_quorum_lost_longer_than_the_lease_ttl(chaos: Chaos) -> None:
    """Two of three members cut off from their peers: no member has a quorum, for longer than
    the daemons' lease TTL; then the partition heals."""
    cluster, lab = chaos.cluster, chaos.lab
    leader = await cluster.leader()
    other = next(m.index for m in cluster.members if m.index != leader)
    async with fault(chaos, "quorum lost") as checker:
        await cluster.partition(leader)
        await cluster.partition(other)
        # No quorum anywhere: a write through the one unpartitioned member cannot commit.
        rest = [m.endpoint for m in cluster.members if m.index not in (leader, other)]
        with pytest.raises(CommandError):
            await cluster.etcdctl("put", f"{lab.state.prefix}/chaos-probe", "x", endpoints=rest)
        await asyncio.sleep(chaos.lease_ttl + 3)
        await assert_all_healthz(lab)
        await assert_all_say_lease_expired(lab)
        assert checker.unavailable > 0
        await cluster.heal(leader)
        await cluster.heal(other)
        await cluster.leader()
        await wait_all_ready(lab, "quorum lost")
        await assert_daemons_follow_changes(chaos, "quorum lost")
    await assert_converged(chaos)
    await assert_join_programmed_everywhere(chaos)


async def test_whole_cluster_down_and_back(chaos: Chaos) -> None:
    cluster, lab = chaos.cluster, chaos.lab
    async with fault(chaos, "whole cluster down"):
        for m in cluster.members:
            await cluster.kill(m.index)
        await asyncio.sleep(chaos.lease_ttl + 3)
        await assert_all_healthz(lab)
        await assert_all_say_lease_expired(lab)
        restart = asyncio.get_running_loop().time()
        for m in cluster.members:
            await cluster.start(m.index, wait=False)
        await cluster.wait_healthy()
        took = asyncio.get_running_loop().time() - restart
        print(f"\nchaos whole cluster down: members started and healthy in {took:.2f}s")
        await cluster.leader()
        await wait_all_ready(lab, "whole cluster down")
        await assert_daemons_follow_changes(chaos, "whole cluster down")
    await assert_converged(chaos)
    await assert_join_programmed_everywhere(chaos)
