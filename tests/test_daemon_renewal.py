"""Lease renewal as the daemon sees it, in-process against a real etcd with a short lease TTL.

The composition (Overlayd) runs with the alloc backend and an external interface given directly
(alloc touches no kernel state); the traffic rules (forward rules are on by default) go into a
throwaway namespace through the daemon's iptables_prefix, never the test machine's own. Only
the TTL is shortened, through the SubnetManager the daemon accepts, so that a renewal happens
within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from backends.base import ExternalInterface
from integration.etcdserver import EtcdServer
from overlay.daemon import Overlayd
from overlay.events import EventPublisher
from overlay.health import Metrics
from overlay.options import parse_options
from subnetmgr.manager import SubnetManager
from subnetmgr.registry import EtcdOptions, EtcdRegistry
from tests.netns import NetnsLab, netns_lab

lab = pytest.fixture(netns_lab, name="lab")


@pytest.mark.slow
@pytest.mark.root
async def test_renewal_is_reported_and_keeps_the_subnet(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path, lab: NetnsLab
) -> None:
    opts = parse_options(
        ["--etcd-prefix", etcd_prefix, "--subnet-file", str(tmp_path / "subnet.env"),
         "--resync-period", "0.3"],
        environ={},
    )  # fmt: skip
    registry = await EtcdRegistry.connect(
        EtcdOptions(endpoints=(etcd_server.endpoint,), prefix=etcd_prefix)
    )
    try:
        await registry.put_config_text('{"Network":"10.88.0.0/16","Backend":{"Type":"alloc"}}')
        ext = ExternalInterface("eth9", 9, IPv4Address("192.0.2.40"), IPv4Address("192.0.2.40"),
                                1500)  # fmt: skip
        metrics = Metrics()
        events = EventPublisher(None, "overlay", ext.public_ip, metrics)
        manager = SubnetManager(registry, ttl=6, renew_margin=4.0)  # renew every ~2 s
        rules_ns = lab.netns("renew")
        daemon = Overlayd(opts, registry, ext, metrics, events, manager=manager,
                          iptables_prefix=rules_ns.exec_cmd())  # fmt: skip
        task = asyncio.create_task(daemon.run())
        try:
            async with asyncio.timeout(15):
                await daemon.ready.wait()
                first = metrics.lease_expiration
                assert first is not None
                while True:
                    if metrics.events["lease_renewed"] >= 2:
                        break
                    await asyncio.sleep(0.1)
            assert metrics.lease_expiration is not None and metrics.lease_expiration > first
            assert metrics.events["lease_lost"] == 0 and metrics.lease_acquisitions == 1
            leases, _ = await registry.list_leases()
            assert [str(lease.subnet) for lease in leases] == [metrics.lease_subnet]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=10)
    finally:
        await registry.close()
