"""SubnetManager against a real etcd: config wait, concurrent acquisition, restarts,
reservations, renewal and re-acquisition of a lost lease."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from ipaddress import IPv4Address, IPv4Network

import aetcd
import pytest

from integration.etcdserver import EtcdServer
from subnetmgr.manager import OutOfSubnets, OwnLeaseEvent, SubnetManager
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig
from subnetmgr.registry import EtcdOptions, EtcdRegistry
from tests.conftest import raw_client
from tests.labtools import eventually
from tests.tcprelay import TcpRelay

MakeRegistry = Callable[[], Awaitable[EtcdRegistry]]


@pytest.fixture
async def make_registry(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[MakeRegistry]:
    """A new registry (its own gRPC channel, like a separate host) per call."""
    async with AsyncExitStack() as stack:

        async def make() -> EtcdRegistry:
            opts = EtcdOptions(endpoints=(etcd_server.endpoint,), prefix=etcd_prefix)
            return await stack.enter_async_context(await EtcdRegistry.connect(opts))

        yield make
    async with raw_client(etcd_server) as client:
        await client.delete_prefix(etcd_prefix.encode())


def host(i: int, mac_tail: int = 0) -> LeaseAttrs:
    return LeaseAttrs(
        IPv4Address(f"192.168.{i // 250}.{i % 250 + 1}"),
        None,
        "vxlan",
        {"VNI": 1, "VtepMAC": f"02:00:00:00:{i % 256:02x}:{mac_tail:02x}"},
    )


def config(network: str) -> NetworkConfig:
    return NetworkConfig.from_dict({"Network": network, "Backend": {"Type": "vxlan"}})


async def test_wait_for_config_logs_what_to_write_then_returns_it(
    make_registry: MakeRegistry, etcd_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    reg = await make_registry()
    mgr = SubnetManager(reg)
    with caplog.at_level(logging.INFO, logger="overlay.subnetmgr"):
        waiter = asyncio.create_task(mgr.wait_for_config(retry_interval=0.05))
        await asyncio.sleep(0.3)
        assert not waiter.done()
        await reg.put_config_text('{"Network":"10.1.0.0/29"}')
        await asyncio.sleep(0.3)
        assert not waiter.done()
        await reg.put_config_text('{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}')
        got = await asyncio.wait_for(waiter, 5)
    assert got == config("10.1.0.0/16")
    missing = [r for r in caplog.records if "no network config" in r.getMessage()]
    assert len(missing) == 1  # logged once, not every poll
    assert f"{etcd_prefix}/config" in missing[0].getMessage()
    assert "overlayctl config set" in missing[0].getMessage()
    invalid = [r for r in caplog.records if "invalid network config" in r.getMessage()]
    assert len(invalid) == 1 and "Network='10.1.0.0/29'" in invalid[0].getMessage()


async def test_fifty_hosts_in_a_slash_18_all_get_distinct_subnets(
    make_registry: MakeRegistry,
) -> None:
    cfg = config("10.20.0.0/18")  # 63 free /24s
    managers = [SubnetManager(await make_registry()) for _ in range(50)]
    leases = await asyncio.gather(*(m.acquire(cfg, host(i)) for i, m in enumerate(managers)))
    subnets = {lease.subnet for lease in leases}
    assert len(subnets) == 50
    assert all(cfg.contains(s) for s in subnets)
    stored, _ = await managers[0].registry.list_leases()
    assert {(x.subnet, x.attrs) for x in stored} == {(x.subnet, x.attrs) for x in leases}


async def test_fifty_hosts_in_a_slash_20_exactly_fifteen_win(make_registry: MakeRegistry) -> None:
    cfg = config("10.30.0.0/20")  # 15 free /24s
    managers = [SubnetManager(await make_registry()) for _ in range(50)]
    results = await asyncio.gather(
        *(m.acquire(cfg, host(i)) for i, m in enumerate(managers)), return_exceptions=True
    )
    won = [r for r in results if isinstance(r, Lease)]
    lost = [r for r in results if not isinstance(r, Lease)]
    assert len(won) == 15
    assert len({x.subnet for x in won}) == 15
    assert len(lost) == 35
    for err in lost:
        assert isinstance(err, OutOfSubnets), err
        assert str(err).startswith("out of subnets: ")
        assert "10.30.0.0/20" in str(err)


async def test_restart_reuses_the_subnet_and_updates_the_value(
    make_registry: MakeRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    cfg = config("10.40.0.0/16")
    first = await SubnetManager(await make_registry()).acquire(cfg, host(1, mac_tail=1))
    # A restarted daemon: new connection, new VTEP MAC; other hosts came meanwhile.
    for i in range(2, 6):
        await SubnetManager(await make_registry()).acquire(cfg, host(i))
    again = await SubnetManager(await make_registry()).acquire(cfg, host(1, mac_tail=2))
    assert again.subnet == first.subnet
    kv = await raw.get(f"{etcd_prefix}/subnets/{first.key}".encode())
    assert kv is not None and kv.value == host(1, mac_tail=2).to_json().encode()
    assert kv.lease != 0


async def test_previous_subnet_from_subnet_env_is_used_when_free(
    make_registry: MakeRegistry,
) -> None:
    cfg = config("10.41.0.0/16")
    mgr = SubnetManager(await make_registry())
    prev = IPv4Network("10.41.77.0/24")
    assert (await mgr.acquire(cfg, host(1), previous=prev)).subnet == prev
    # Taken by host 1 now: host 2 with the same previous gets another one.
    other = await mgr.acquire(cfg, host(2), previous=prev)
    assert other.subnet != prev


async def test_reservation_is_honoured(
    make_registry: MakeRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    cfg = config("10.50.0.0/22")  # three subnets: .1, .2, .3
    reg = await make_registry()
    reserved = IPv4Network("10.50.2.0/24")
    await reg.reserve(reserved, host(9).public_ip)
    mgr = SubnetManager(reg)
    others = [await mgr.acquire(cfg, host(i), previous=reserved) for i in (1, 2)]
    assert reserved not in {x.subnet for x in others}
    with pytest.raises(OutOfSubnets):
        await mgr.acquire(cfg, host(3))
    mine = await mgr.acquire(cfg, host(9))
    assert mine.subnet == reserved and mine.reserved
    kv = await raw.get(f"{etcd_prefix}/subnets/10.50.2.0-24".encode())
    assert kv is not None and kv.lease == 0  # still permanent
    assert kv.value == host(9).to_json().encode()  # with our backend data now


class Keeper:
    """keep() running in a task, with every OwnLeaseEvent it reported, in order."""

    def __init__(self, mgr: SubnetManager, cfg: NetworkConfig, own: Lease) -> None:
        self.events: list[OwnLeaseEvent] = []
        self._new = asyncio.Condition()
        self.task = asyncio.create_task(mgr.keep(cfg, own, self._on_event))

    async def _on_event(self, ev: OwnLeaseEvent) -> None:
        async with self._new:
            self.events.append(ev)
            self._new.notify_all()

    def kinds(self, *, renewals: bool = False) -> list[str]:
        return [e.kind for e in self.events if renewals or e.kind != "renewed"]

    async def wait_for(self, kind: str, count: int = 1, limit: float = 20) -> OwnLeaseEvent:
        """The `count`-th event of `kind` (waiting for it up to `limit` seconds)."""
        async with asyncio.timeout(limit), self._new:
            await self._new.wait_for(lambda: self.kinds(renewals=True).count(kind) >= count)
        return [e for e in self.events if e.kind == kind][count - 1]

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@pytest.mark.slow
async def test_renewal_keeps_the_value_and_outlives_the_ttl(
    make_registry: MakeRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    cfg = config("10.60.0.0/16")
    mgr = SubnetManager(await make_registry(), ttl=3, renew_margin=2)
    own = await mgr.acquire(cfg, host(1))
    key = f"{etcd_prefix}/subnets/{own.key}".encode()
    before = await raw.get(key)
    assert before is not None
    keeper = Keeper(mgr, cfg, own)
    try:
        # Three renewals: the key outlives its 3 s TTL twice over only by being renewed.
        third = await keeper.wait_for("renewed", 3)
        assert third.lease.expiration is not None and own.expiration is not None
        assert third.lease.expiration > own.expiration + 1
        after = await raw.get(key)
        assert after is not None
        assert after.value == before.value
        assert after.lease != before.lease  # renewed with a fresh etcd lease
        info = await raw.get_lease_info(after.lease)
        assert info.grantedTTL == 3
        assert keeper.kinds() == []  # renewals only: nothing lost, nothing expiring
    finally:
        await keeper.stop()


async def test_deleted_own_lease_is_reacquired_loudly(
    make_registry: MakeRegistry,
    raw: aetcd.Client,
    etcd_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = config("10.70.0.0/16")
    mgr = SubnetManager(await make_registry())
    own = await mgr.acquire(cfg, host(1))
    keeper = Keeper(mgr, cfg, own)
    try:
        await asyncio.sleep(0.3)  # let keep() start watching
        with caplog.at_level(logging.WARNING, logger="overlay.subnetmgr"):
            await raw.delete(f"{etcd_prefix}/subnets/{own.key}".encode())
            new = (await keeper.wait_for("reacquired")).lease
        assert keeper.kinds() == ["lost", "reacquired"]
        assert "the key is gone" in keeper.events[0].reason
        assert new.subnet == own.subnet  # the same subnet, still free
        assert new.attrs == own.attrs
        kv = await raw.get(f"{etcd_prefix}/subnets/{own.key}".encode())
        assert kv is not None and kv.value == own.attrs.to_json().encode() and kv.lease != 0
        lost = [r for r in caplog.records if "LOST our lease" in r.getMessage()]
        assert lost and lost[0].levelno == logging.ERROR
        # Revoking its etcd lease is noticed as well.
        await raw.revoke_lease(kv.lease)
        again = await keeper.wait_for("reacquired", 2)
        assert again.lease.subnet == own.subnet
        assert keeper.kinds() == ["lost", "reacquired"] * 2
    finally:
        await keeper.stop()


async def test_a_subnet_taken_by_another_host_is_reported_and_waited_for(
    make_registry: MakeRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    """Policy "wait" (the default): no other subnet is taken behind the operator's back; the
    taker is named, and the subnet is ours again as soon as its key is gone."""
    cfg = config("10.71.0.0/16")
    mgr = SubnetManager(await make_registry())
    own = await mgr.acquire(cfg, host(1))
    key = f"{etcd_prefix}/subnets/{own.key}".encode()
    keeper = Keeper(mgr, cfg, own)
    try:
        await asyncio.sleep(0.3)
        thief = host(2).to_json().encode()
        await raw.put(key, thief)
        taken = await keeper.wait_for("taken")
        assert taken.holder == host(2) and taken.lease.subnet == own.subnet
        assert str(host(2).public_ip) in taken.reason and str(own.subnet) in taken.reason
        leases, _ = await mgr.registry.list_leases()
        assert [(x.subnet, x.attrs) for x in leases] == [(own.subnet, host(2))]  # nothing else
        # The other host renews (a rewrite of its key): still taken, not reported again. keep()
        # handles the key's changes in order, so a second report would come before the
        # re-acquisition that the deletion below causes (no sleep needed to see it).
        await raw.put(key, thief)
        await raw.delete(key)  # the other host leaves
        back = await keeper.wait_for("reacquired")
        assert back.lease.subnet == own.subnet and back.lease.attrs == own.attrs
        assert keeper.kinds() == ["lost", "taken", "reacquired"]
    finally:
        await keeper.stop()


async def test_a_hostile_takers_value_is_shown_bounded_and_on_one_line(
    make_registry: MakeRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    """The taker's value comes from etcd: 60 KiB of BackendData with escape sequences, line
    breaks and non-ASCII text. The reason (for the log, /readyz and MQTT) stays short,
    printable ASCII on one line."""
    cfg = config("10.76.0.0/16")
    mgr = SubnetManager(await make_registry())
    own = await mgr.acquire(cfg, host(1))
    keeper = Keeper(mgr, cfg, own)
    try:
        await asyncio.sleep(0.3)
        data = {"VNI": 1, "VtepMAC": "02:00:00:00:00:07", "x": "\x1b[31m\n\r\u2028é" * 1500}
        value = LeaseAttrs(IPv4Address("192.0.2.7"), None, "vxlan", data).to_json()
        assert 30_000 < len(value.encode()) < 64 * 1024
        await raw.put(f"{etcd_prefix}/subnets/{own.key}".encode(), value.encode())
        taken = await keeper.wait_for("taken")
        assert len(taken.reason) < 600
        assert taken.reason.isascii() and taken.reason.isprintable()
        assert "192.0.2.7" in taken.reason and "characters)" in taken.reason
    finally:
        await keeper.stop()


class CountingRegistry(EtcdRegistry):
    """The real registry, counting the writes keep() attempts (a failed create writes nothing
    to etcd, so only counting the attempts shows a loop of them)."""

    writes = 0

    async def create_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int) -> Lease | None:
        self.writes += 1
        return await super().create_lease(subnet, attrs, ttl)

    async def update_lease(self, lease: Lease, attrs: LeaseAttrs, ttl: int) -> Lease | None:
        self.writes += 1
        return await super().update_lease(lease, attrs, ttl)


async def test_garbage_over_our_key_is_reported_and_waited_out_without_a_write_loop(
    etcd_server: EtcdServer, raw: aetcd.Client, etcd_prefix: str
) -> None:
    """Our key overwritten with a value that is not a lease (get_lease skips it, creating the
    key fails): reported once as taken, no write attempt of ours while it stays, ours again
    once it is deleted."""
    cfg = config("10.77.0.0/16")
    opts = EtcdOptions(endpoints=(etcd_server.endpoint,), prefix=etcd_prefix)
    async with CountingRegistry(opts) as reg:
        mgr = SubnetManager(reg)
        own = await mgr.acquire(cfg, host(1))
        key = f"{etcd_prefix}/subnets/{own.key}".encode()
        keeper = Keeper(mgr, cfg, own)
        try:
            await asyncio.sleep(0.3)
            await raw.put(key, b"\x00{not a lease" + b"[" * 5000)
            taken = await keeper.wait_for("taken")
            assert "not a valid lease" in taken.reason and taken.holder is None
            attempts = reg.writes
            await asyncio.sleep(1.0)  # a write loop would show within this second
            assert reg.writes == attempts and attempts <= 2
            assert keeper.kinds() == ["lost", "taken"]
            await raw.delete(key)
            back = await keeper.wait_for("reacquired")
            assert back.lease.subnet == own.subnet
        finally:
            await keeper.stop()


async def test_a_subnet_taken_by_another_host_moves_with_policy_move(
    make_registry: MakeRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    cfg = config("10.73.0.0/16")
    mgr = SubnetManager(await make_registry(), on_taken="move")
    own = await mgr.acquire(cfg, host(1))
    keeper = Keeper(mgr, cfg, own)
    try:
        await asyncio.sleep(0.3)
        thief = host(2).to_json().encode()
        await raw.put(f"{etcd_prefix}/subnets/{own.key}".encode(), thief)
        new = (await keeper.wait_for("reacquired")).lease
        assert keeper.kinds() == ["lost", "taken", "reacquired"]
        assert new.subnet != own.subnet
        assert new.attrs == own.attrs
        kv = await raw.get(f"{etcd_prefix}/subnets/{own.key}".encode())
        assert kv is not None and kv.value == thief  # the other host's key is left alone
    finally:
        await keeper.stop()


async def test_a_host_with_our_public_ip_is_not_fought_over(
    make_registry: MakeRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    """Two hosts with one PublicIP (each behind its own NAT, both 10.0.2.15): the second one's
    acquisition rewrites our lease with its VtepMAC. We report it once, write nothing, and
    take the subnet back only when its key is gone."""
    cfg = config("10.74.0.0/16")
    registry = await make_registry()
    mgr = SubnetManager(registry)
    own = await mgr.acquire(cfg, host(1))
    keeper = Keeper(mgr, cfg, own)
    try:
        await asyncio.sleep(0.3)
        twin = SubnetManager(await make_registry())
        theirs = await twin.acquire(cfg, host(1, mac_tail=0x99))  # same PublicIP, other MAC
        assert theirs.subnet == own.subnet  # flannel's rule: "a lease with my PublicIP is mine"
        dup = await keeper.wait_for("duplicate")
        assert dup.holder == host(1, mac_tail=0x99)
        assert str(own.attrs.public_ip) in dup.reason
        assert "--public-ip" in dup.reason and "--iface" in dup.reason
        key = f"{etcd_prefix}/subnets/{own.key}".encode()
        kv = await raw.get(key)
        assert kv is not None
        await asyncio.sleep(1.0)
        later = await raw.get(key)
        assert later is not None and later.mod_revision == kv.mod_revision  # no write of ours
        assert later.value == host(1, mac_tail=0x99).to_json().encode()
        assert keeper.kinds() == ["lost", "duplicate"]
        await raw.delete(key)  # the twin is gone: the subnet is ours again
        back = await keeper.wait_for("reacquired")
        assert back.lease.subnet == own.subnet and back.lease.attrs == own.attrs
    finally:
        await keeper.stop()


def test_manager_rejects_a_margin_not_below_the_ttl_and_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="renew margin 100"):
        SubnetManager(None, ttl=100, renew_margin=100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_taken"):
        SubnetManager(None, on_taken="fight")  # type: ignore[arg-type]


@pytest.mark.slow
async def test_keep_rides_out_an_etcd_restart_across_a_renewal_deadline(
    etcd_factory: Callable[..., EtcdServer], etcd_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 6 s TTL renewed 3 s before expiry: etcd is down for 4 s, so a renewal falls in the
    outage (reported as expiring); the lease has not expired, etcd comes back, the renewal goes
    through and nothing is lost."""
    server = etcd_factory()
    opts = EtcdOptions(endpoints=(server.endpoint,), prefix=etcd_prefix, timeout=1)
    cfg = config("10.72.0.0/16")
    async with await EtcdRegistry.connect(opts) as reg:
        mgr = SubnetManager(reg, ttl=6, renew_margin=3)
        own = await mgr.acquire(cfg, host(1))
        keeper = Keeper(mgr, cfg, own)
        try:
            await keeper.wait_for("renewed")  # a renewal just happened: the next is due in ~3 s
            with caplog.at_level(logging.WARNING, logger="overlay.subnetmgr"):
                server.kill()
                await keeper.wait_for("expiring")  # the renewal deadline passed while down
                server.start()
                renewed = len([e for e in keeper.events if e.kind == "renewed"])
                after = await keeper.wait_for("renewed", renewed + 1)
            assert keeper.kinds() == ["expiring"]
            assert after.lease.subnet == own.subnet and after.lease.attrs == own.attrs
            assert not [r for r in caplog.records if "LOST" in r.getMessage()]
            # Still watching after the restart: a deletion now is noticed and repaired.
            assert await reg.delete_lease(own.subnet)
            new = await keeper.wait_for("reacquired")
            assert new.lease.subnet == own.subnet
        finally:
            await keeper.stop()


@pytest.mark.slow
async def test_lease_expired_while_cut_off_and_taken_meanwhile_is_reported_not_replaced(
    etcd_server: EtcdServer, etcd_prefix: str, raw: aetcd.Client
) -> None:
    """Our host loses etcd (a relay cut: other hosts still reach it) for longer than the 5 s
    TTL; another host takes the subnet meanwhile. Back in touch, we report the lease lost as
    expired, then taken by that host, and take no other subnet (policy wait)."""
    cfg = config("10.75.0.0/16")
    async with TcpRelay("127.0.0.1", int(etcd_server.endpoint.rsplit(":", 1)[1])) as relay:
        opts = EtcdOptions(endpoints=(relay.endpoint,), prefix=etcd_prefix, timeout=1)
        async with await EtcdRegistry.connect(opts) as reg:
            mgr = SubnetManager(reg, ttl=5, renew_margin=2)
            own = await mgr.acquire(cfg, host(1))
            keeper = Keeper(mgr, cfg, own)
            try:
                await asyncio.sleep(0.3)
                relay.cut()
                lost = await keeper.wait_for("lost")
                assert lost.reason == "lease expired while etcd was unreachable"
                key = f"{etcd_prefix}/subnets/{own.key}".encode()

                async def expired_in_etcd() -> bool:
                    return await raw.get(key) is None

                await eventually(expired_in_etcd, "etcd expired the lease on its side too")
                await raw.put(key, host(2).to_json().encode())  # another host takes it
                relay.restore()
                taken = await keeper.wait_for("taken")
                assert taken.holder == host(2)
                assert keeper.kinds()[-2:] == ["lost", "taken"]
                assert "expiring" in keeper.kinds()
                leases, _ = await reg.list_leases()
                assert [x.attrs for x in leases] == [host(2)]  # no other subnet taken
                assert reg.health.errors > 0 and reg.health.up
            finally:
                await keeper.stop()


class RacedRegistry(EtcdRegistry):
    """The real registry, with another host's moves injected right before our first create:
    the only way to make a race land at an exact moment. etcd and the code are all real."""

    interfere: Callable[[], Awaitable[None]] | None = None

    async def create_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int) -> Lease | None:
        interfere, self.interfere = self.interfere, None
        if interfere is not None:
            await interfere()
        return await super().create_lease(subnet, attrs, ttl)


async def test_a_lost_race_retries_with_the_keys_created_since_and_relists_when_full(
    make_registry: MakeRegistry, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    cfg = config("10.50.0.0/22")  # three free /24s: 10.50.1.0, 10.50.2.0, 10.50.3.0
    other = await make_registry()
    held = [await SubnetManager(other).acquire(cfg, host(i)) for i in (1, 2)]
    free = ({IPv4Network(f"10.50.{i}.0/24") for i in (1, 2, 3)} - {x.subnet for x in held}).pop()
    opts = EtcdOptions(endpoints=(etcd_server.endpoint,), prefix=etcd_prefix)
    async with RacedRegistry(opts) as ours:

        async def another_host_moves() -> None:
            # Takes the one subnet we saw free, and a lease we saw taken goes away.
            assert await other.create_lease(free, host(3), 600) is not None
            assert await other.delete_lease(held[0].subnet)

        ours.interfere = another_host_moves
        got = await SubnetManager(ours).acquire(cfg, host(9))
    # The keys created since our list show `free` taken; our view still holds the deleted
    # lease, so it looks full: a full list then finds the freed subnet.
    assert got.subnet == held[0].subnet and got.attrs == host(9)
    stored, _ = await other.list_leases()
    assert {(x.subnet, x.attrs.public_ip) for x in stored} == {
        (held[0].subnet, host(9).public_ip),
        (held[1].subnet, host(2).public_ip),
        (free, host(3).public_ip),
    }
