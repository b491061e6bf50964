"""Endpoint failover against a real three-member etcd cluster: when the member we talk to dies,
calls and the lease watch move to the next endpoint and resume from the same revision."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from integration.etcdserver import EtcdServer, free_port
from subnetmgr.manager import LeaseMirror, SubnetManager
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig, Subnet
from subnetmgr.registry import EtcdOptions, EtcdRegistry


@pytest.fixture
def cluster() -> Iterator[list[EtcdServer]]:
    tag = uuid.uuid4().hex[:6]
    members = [
        EtcdServer(name=f"m{i}-{tag}", client_port=free_port(), peer_port=free_port())
        for i in range(3)
    ]
    initial = ",".join(f"{m.name}=http://{m.host}:{m.peer_port}" for m in members)
    try:
        for m in members:
            m.initial_cluster = initial
            m.start(wait=False)
        for m in members:
            m.wait_ready(30)
        yield members
    finally:
        for m in members:
            m.stop()


def attrs(i: int) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"192.168.9.{i}"), None, "vxlan", {"VNI": 1})


@pytest.mark.slow
async def test_member_death_moves_calls_and_the_watch_to_the_next_endpoint(
    cluster: list[EtcdServer], etcd_prefix: str
) -> None:
    first, _, third = cluster
    endpoints = tuple(m.endpoint for m in cluster)
    opts = EtcdOptions(endpoints=endpoints, prefix=etcd_prefix, timeout=3)
    writer_opts = EtcdOptions(endpoints=(third.endpoint,), prefix=etcd_prefix, timeout=3)
    cfg = NetworkConfig.from_dict({"Network": "10.9.0.0/16"})
    async with (
        await EtcdRegistry.connect(opts) as reg,
        await EtcdRegistry.connect(writer_opts) as writer,
    ):
        own = await SubnetManager(reg).acquire(cfg, attrs(1))
        mirror = LeaseMirror(reg)
        seen: asyncio.Queue[set[Subnet]] = asyncio.Queue()

        async def on_change(snapshot: object, changed: set[Subnet]) -> None:
            await seen.put(changed)

        task = asyncio.create_task(mirror.run(on_change))
        try:
            assert await asyncio.wait_for(seen.get(), 10) == {own.subnet}
            first.kill()  # the member both the calls and the watch use
            third.wait_ready(30)  # healthy again once the other two elected a leader
            other = await writer.create_lease(IPv4Network("10.9.200.0/24"), attrs(2), 600)
            assert other is not None
            assert await writer.delete_lease(own.subnet)
            got: set[Subnet] = set()
            while got != {own.subnet, other.subnet}:
                got |= await asyncio.wait_for(seen.get(), 20)
            assert set(mirror.snapshot) == {other.subnet}
            assert mirror.relists == 1  # resumed on the next member from the same revision
            # Unary calls moved on as well: acquire works with the first endpoint dead.
            again = await SubnetManager(reg).acquire(cfg, attrs(1), previous=own.subnet)
            assert isinstance(again, Lease) and again.subnet == own.subnet
            leases, _ = await writer.list_leases()
            assert {x.subnet for x in leases} == {own.subnet, other.subnet}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
