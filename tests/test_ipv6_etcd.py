"""Dual-stack leases against a real etcd: flannel's key form, the value, renewal, a restart
keeping both subnets, a deleted dual-stack key noticed, and 20 hosts joining at once."""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address, IPv6Address, IPv6Network

import aetcd

from subnetmgr.manager import AcquireConflict, OutOfSubnets, SubnetManager
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig, parse_subnet_key
from tests.test_manager import Keeper, MakeRegistry, make_registry

__all__ = ["make_registry"]  # the fixture, imported for pytest


def dual_config(v4: str, v6: str) -> NetworkConfig:
    return NetworkConfig.from_dict(
        {"Network": v4, "EnableIPv6": True, "IPv6Network": v6, "Backend": {"Type": "vxlan"}}
    )


def dual_host(i: int) -> LeaseAttrs:
    return LeaseAttrs(
        IPv4Address(f"192.168.7.{i}"),
        IPv6Address(f"fd99::{i}"),
        "vxlan",
        {"VNI": 1, "VtepMAC": f"02:00:00:00:04:{i:02x}"},
        {"VNI": 1, "VtepMAC": f"02:00:00:00:06:{i:02x}"},
    )


async def test_dual_stack_lease_key_value_restart_and_renewal(
    make_registry: MakeRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    cfg = dual_config("10.61.0.0/16", "fd00:61::/48")
    mgr = SubnetManager(await make_registry(), ttl=3, renew_margin=2)
    own = await mgr.acquire(cfg, dual_host(1))
    assert own.ipv6_subnet is not None and cfg.contains_ipv6(own.ipv6_subnet)
    key = f"{etcd_prefix}/subnets/{own.key}".encode()
    assert "&fd00:61:" in own.key
    assert parse_subnet_key(own.key) == (own.subnet, own.ipv6_subnet)
    stored = await raw.get(key)
    assert stored is not None
    value = json.loads(stored.value)
    assert value["PublicIPv6"] == "fd99::1"
    assert value["BackendV6Data"] == {"VNI": 1, "VtepMAC": "02:00:00:00:06:01"}
    assert list(value) == ["PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data"]

    keeper = Keeper(mgr, cfg, own)
    try:
        await asyncio.sleep(4.5)  # past the 3 s TTL: renewals of the dual-stack key keep it
        after = await raw.get(key)
        assert after is not None and after.value == stored.value
        assert keeper.kinds(renewals=True).count("renewed") >= 1
        assert keeper.kinds() == []  # renewing (and watching) the dual-stack key is no loss
    finally:
        await keeper.stop()

    # A restarted host (new manager, same PublicIP) gets the same two subnets back.
    again = await SubnetManager(await make_registry()).acquire(cfg, dual_host(1))
    assert (again.subnet, again.ipv6_subnet) == (own.subnet, own.ipv6_subnet)


async def test_deleted_dual_stack_key_is_reacquired_with_both_subnets(
    make_registry: MakeRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    cfg = dual_config("10.62.0.0/16", "fd00:62::/48")
    mgr = SubnetManager(await make_registry())
    own = await mgr.acquire(cfg, dual_host(2))
    keeper = Keeper(mgr, cfg, own)
    try:
        await asyncio.sleep(0.5)
        await raw.delete(f"{etcd_prefix}/subnets/{own.key}".encode())
        new = (await keeper.wait_for("reacquired", limit=10)).lease
        assert keeper.kinds() == ["lost", "reacquired"]
        # The same subnets when free (the previous IPv4 and IPv6 subnet, as flannel does).
        assert (new.subnet, new.ipv6_subnet) == (own.subnet, own.ipv6_subnet)
        assert await raw.get(f"{etcd_prefix}/subnets/{new.key}".encode()) is not None
    finally:
        await keeper.stop()


async def test_twenty_dual_stack_hosts_get_distinct_subnets_in_both_families(
    make_registry: MakeRegistry,
) -> None:
    cfg = dual_config("10.63.0.0/16", "fd00:63::/56")  # /64s: 255 candidates
    managers = [SubnetManager(await make_registry()) for _ in range(20)]
    leases = await asyncio.gather(
        *(m.acquire(cfg, dual_host(i + 1)) for i, m in enumerate(managers))
    )
    v4 = {lease.subnet for lease in leases}
    v6 = {lease.ipv6_subnet for lease in leases}
    assert len(v4) == len(v6) == 20
    assert all(isinstance(s, IPv6Network) and cfg.contains_ipv6(s) for s in v6)


async def test_the_ipv6_part_is_claimed_once_even_when_the_keys_differ(
    make_registry: MakeRegistry,
) -> None:
    """Six hosts at once, plenty of IPv4 subnets but three IPv6 ones: etcd's transaction alone
    would let all six in (their keys differ by the IPv4 part); exactly three get a lease, each
    with its own IPv6 subnet, the others are told they are out of subnets."""
    cfg = dual_config("10.64.0.0/16", "fd00:64::/62")  # /64s :1, :2, :3
    managers = [SubnetManager(await make_registry()) for _ in range(6)]
    results = await asyncio.gather(
        *(m.acquire(cfg, dual_host(i + 1)) for i, m in enumerate(managers)),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, Lease)]
    lost = [r for r in results if not isinstance(r, Lease)]
    assert len(won) == 3 and {x.ipv6_subnet for x in won} == {
        IPv6Network(f"fd00:64:0:{i}::/64") for i in (1, 2, 3)
    }
    assert all(isinstance(e, (OutOfSubnets, AcquireConflict)) for e in lost), lost
