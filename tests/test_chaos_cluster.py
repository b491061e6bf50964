"""integration.etcdcluster itself: the faults it makes are real ones, and it leaves nothing
behind, also when it cannot start."""

from __future__ import annotations

import asyncio
import glob
import json
import tempfile

import pytest

from integration.etcdcluster import EtcdCluster
from integration.netns import CommandError, list_netns, pid_alive, run

pytestmark = [pytest.mark.root]


async def nothing_left(cluster: EtcdCluster, pids: list[int]) -> None:
    """No namespace, management link, member process or data directory of `cluster` left."""
    assert list_netns(cluster.ns_prefix) == []
    assert not (await run("ip", "-o", "link", "show", cluster.mgmt_link, check=False)).strip()
    assert [p for p in pids if pid_alive(p)] == []
    pattern = f"{tempfile.gettempdir()}/overlay-etcdcluster-{cluster.tag}-*"
    assert await asyncio.to_thread(glob.glob, pattern) == []


async def test_a_cluster_that_cannot_start_leaves_nothing_behind() -> None:
    cluster = EtcdCluster()
    with pytest.raises(TimeoutError):
        await cluster.up(limit=0.001)  # no member can be healthy that fast
    await nothing_left(cluster, [])


async def test_partition_isolate_heal_and_down() -> None:
    cluster = await EtcdCluster().up()
    pids = [m.server.proc.pid for m in cluster.members if m.server.proc is not None]
    assert len(pids) == 3
    try:
        leader = await cluster.leader()
        await cluster.partition(leader)
        new = await cluster.leader(avoid=leader)
        assert new != leader
        cut = cluster.member(leader)
        # Clients still reach the partitioned member (a serializable read answers there), but
        # nothing can commit through it: it has no peers.
        out = await cluster.etcdctl(
            "get", "--consistency=s", "anything", "-w", "json", endpoints=[cut.endpoint]
        )
        assert "header" in json.loads(out)
        with pytest.raises(CommandError):
            await cluster.etcdctl("put", "k", "v", endpoints=[cut.endpoint])
        await cluster.etcdctl("put", "k", "during the partition")  # through the others
        await cluster.heal(leader)
        await cluster.wait_healthy(leader)
        got = await cluster.etcdctl("get", "k", "--print-value-only", endpoints=[cut.endpoint])
        assert got.strip() == "during the partition"  # it caught up

        await cluster.isolate(new)
        with pytest.raises(CommandError):
            await cluster.etcdctl("get", "k", endpoints=[cluster.member(new).endpoint])
        await cluster.restore()
        assert len(await cluster.status()) == 3
    finally:
        await cluster.down()
    await nothing_left(cluster, pids)
