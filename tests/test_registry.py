"""EtcdRegistry against a real etcd: key/value bytes, the create transaction, reservations,
renewal, malformed entries, and the connection: TLS, username/password, endpoint failover.

Raw reads and writes go through aetcd's own client, independent of the code under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import aetcd
import pytest

from integration.etcdserver import EtcdServer, TLSFiles, free_port
from subnetmgr.model import LeaseAttrs
from subnetmgr.registry import EtcdOptions, EtcdRegistry, LeaseLost, RegistryError
from tests.conftest import raw_client
from tests.tls import make_pki

VXLAN = LeaseAttrs(
    IPv4Address("192.168.64.3"), None, "vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
)
VXLAN_BYTES = (
    b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
    b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
)
S1 = IPv4Network("10.5.52.0/24")


@pytest.fixture
async def registry(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[EtcdRegistry]:
    reg = await EtcdRegistry.connect(
        EtcdOptions(endpoints=(etcd_server.endpoint,), prefix=etcd_prefix)
    )
    async with reg:
        yield reg


async def test_config_round_trip(
    registry: EtcdRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    assert await registry.get_config_text() is None
    text = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
    await registry.put_config_text(text)
    got = await raw.get(f"{etcd_prefix}/config".encode())
    assert got is not None and got.value == text.encode()
    assert await registry.get_config_text() == text


async def test_create_lease_writes_flannel_bytes_with_a_24h_etcd_lease(
    registry: EtcdRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    lease = await registry.create_lease(S1, VXLAN, 86400)
    assert lease is not None and lease.subnet == S1 and lease.attrs == VXLAN
    kv = await raw.get(f"{etcd_prefix}/subnets/10.5.52.0-24".encode())
    assert kv is not None
    assert kv.value == VXLAN_BYTES
    assert kv.lease != 0
    info = await raw.get_lease_info(kv.lease)
    assert info.grantedTTL == 86400
    assert 86390 <= info.TTL <= 86400
    assert lease.expiration is not None and not lease.reserved


async def test_create_lease_is_atomic_against_an_existing_key(
    registry: EtcdRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    key = f"{etcd_prefix}/subnets/10.5.52.0-24".encode()
    await raw.put(key, b'{"PublicIP":"10.0.0.9","PublicIPv6":null}')
    assert await registry.create_lease(S1, VXLAN, 60) is None
    kv = await raw.get(key)
    assert kv is not None and kv.value == b'{"PublicIP":"10.0.0.9","PublicIPv6":null}'
    # Two racers for one free subnet: exactly one wins.
    s2 = IPv4Network("10.5.53.0/24")
    a = LeaseAttrs(IPv4Address("10.0.0.1"))
    b = LeaseAttrs(IPv4Address("10.0.0.2"))
    results = await asyncio.gather(*(registry.create_lease(s2, x, 60) for x in (a, b) * 5))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    kv = await raw.get(f"{etcd_prefix}/subnets/10.5.53.0-24".encode())
    assert kv is not None and kv.value == winners[0].attrs.to_json().encode()


async def test_list_leases_skips_malformed_entries_and_logs_them(
    registry: EtcdRegistry,
    raw: aetcd.Client,
    etcd_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sub = f"{etcd_prefix}/subnets/"
    await raw.put(f"{sub}10.5.1.0-24".encode(), b'{"PublicIP":"10.0.0.1","PublicIPv6":null}')
    await raw.put(f"{sub}10.5.2.0-24".encode(), b"not json")
    await raw.put(f"{sub}10.5.3.7-24".encode(), b'{"PublicIP":"10.0.0.3"}')  # host bits
    await raw.put(f"{sub}garbage".encode(), b'{"PublicIP":"10.0.0.4"}')
    await raw.put(f"{sub}10.5.5.0-24".encode(), b'{"PublicIP":"10.0.0.5"}')
    await raw.put(f"{sub}10.5.6.0-24".encode(), b'{"PublicIP":12}')
    await raw.put(f"{etcd_prefix}/config".encode(), b"{}")
    with caplog.at_level(logging.WARNING, logger="overlay.subnetmgr"):
        leases, revision = await registry.list_leases()
    assert sorted(str(x.subnet) for x in leases) == ["10.5.1.0/24", "10.5.5.0/24"]
    assert all(x.reserved for x in leases)
    assert revision > 0
    text = caplog.text
    for bad in ("10.5.2.0-24", "10.5.3.7-24", "garbage", "10.5.6.0-24"):
        assert f"{sub}{bad}" in text


async def test_reservation_has_no_etcd_lease_and_unreserve_spares_leases(
    registry: EtcdRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    await registry.reserve(S1, IPv4Address("10.0.0.7"))
    kv = await raw.get(f"{etcd_prefix}/subnets/10.5.52.0-24".encode())
    assert kv is not None and kv.lease == 0
    assert kv.value == b'{"PublicIP":"10.0.0.7","PublicIPv6":null}'
    (lease,), _ = await registry.list_leases()
    assert lease.reserved and lease.attrs.public_ip == IPv4Address("10.0.0.7")
    s2 = IPv4Network("10.5.53.0/24")
    assert await registry.create_lease(s2, VXLAN, 60) is not None
    assert not await registry.unreserve(s2)  # a lease, not a reservation: left alone
    assert await registry.get_lease(s2) != (None, 0)
    assert await registry.unreserve(S1)
    assert await raw.get(f"{etcd_prefix}/subnets/10.5.52.0-24".encode()) is None
    assert not await registry.unreserve(S1)


async def test_reserve_makes_an_existing_lease_of_that_host_permanent(
    registry: EtcdRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    assert await registry.create_lease(S1, VXLAN, 60) is not None
    await registry.reserve(S1, VXLAN.public_ip)
    kv = await raw.get(f"{etcd_prefix}/subnets/10.5.52.0-24".encode())
    assert kv is not None and kv.lease == 0 and kv.value == VXLAN_BYTES


async def test_renew_keeps_the_value_bytes_and_grants_a_fresh_ttl(
    registry: EtcdRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    key = f"{etcd_prefix}/subnets/10.5.52.0-24".encode()
    # A value written by another flannel-compatible writer, spaced differently: kept verbatim.
    odd = b'{"PublicIP": "192.168.64.3", "PublicIPv6": null, "BackendType": "vxlan"}'
    grant = await raw.lease(30)
    await raw.put(key, odd, lease=grant.id)
    lease, _ = await registry.get_lease(S1)
    assert lease is not None and lease.expiration is not None
    renewed = await registry.renew_lease(lease, 600)
    kv = await raw.get(key)
    assert kv is not None and kv.value == odd
    assert kv.lease not in (0, grant.id)
    info = await raw.get_lease_info(kv.lease)
    assert info.grantedTTL == 600
    assert renewed.attrs == lease.attrs
    assert renewed.expiration is not None and renewed.expiration > lease.expiration + 500
    old = await raw.get_lease_info(grant.id)
    assert old.TTL == -1  # the replaced etcd lease was revoked


async def test_a_watcher_forgets_the_expiry_of_an_etcd_lease_a_renewal_replaced(
    registry: EtcdRegistry, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Renewals put the value on a fresh etcd lease. A host watching the leases caches each new
    lease's expiry, and must drop the old one's, or the cache grows by one entry per renewal of
    every host for as long as the daemon runs (the expiry cache is otherwise only pruned by a
    full list, which a following mirror never makes)."""
    watcher = await EtcdRegistry.connect(
        EtcdOptions(endpoints=(etcd_server.endpoint,), prefix=etcd_prefix)
    )
    async with watcher:
        lease = await registry.create_lease(S1, VXLAN, 60)
        assert lease is not None
        _, revision = await watcher.list_leases()
        seen: list[float | None] = []
        all_seen = asyncio.Event()

        async def follow() -> None:
            async for event in watcher.watch_leases(revision + 1):
                seen.append(event.lease.expiration)
                if len(seen) >= 20:
                    all_seen.set()

        task = asyncio.create_task(follow())
        try:
            for _ in range(20):
                lease = await registry.renew_lease(lease, 60)
            await asyncio.wait_for(all_seen.wait(), 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert all(e is not None and e > 0 for e in seen)  # each renewal's expiry was known
        assert len(watcher._expiry) <= 2, watcher._expiry  # not one entry per renewal


async def test_renew_raises_lease_lost_when_gone_or_changed(
    registry: EtcdRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    lease = await registry.create_lease(S1, VXLAN, 60)
    assert lease is not None
    key = f"{etcd_prefix}/subnets/10.5.52.0-24".encode()
    await raw.put(key, b'{"PublicIP":"10.9.9.9","PublicIPv6":null}')
    with pytest.raises(LeaseLost, match=r"10\.5\.52\.0/24"):
        await registry.renew_lease(lease, 60)
    await raw.delete(key)
    with pytest.raises(LeaseLost, match="gone"):
        await registry.renew_lease(lease, 60)


async def test_unreachable_etcd_error_names_every_endpoint() -> None:
    dead = (f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}")
    async with await EtcdRegistry.connect(EtcdOptions(endpoints=dead, timeout=2)) as reg:
        with pytest.raises(RegistryError) as info:
            await reg.get_config_text()
    for url in dead:
        assert url in str(info.value)
    assert "--etcd-endpoints" in str(info.value)


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (EtcdOptions(endpoints=("ftp://h:1",)), "ftp://h:1"),
        (EtcdOptions(endpoints=("http://h",)), "http://h"),
        (EtcdOptions(endpoints=()), "no etcd endpoints"),
        (EtcdOptions(cert_file="/x.crt"), "both a certificate and a key"),
        (EtcdOptions(username="u"), "both a username and a password"),
        (
            EtcdOptions(endpoints=("https://h:1",), ca_file="/nonexistent/ca.pem"),
            "/nonexistent/ca.pem",
        ),
    ],
)
async def test_bad_options_are_named(opts: EtcdOptions, match: str) -> None:
    with pytest.raises(RegistryError, match=match):
        await EtcdRegistry.connect(opts)


async def test_second_endpoint_takes_over_while_the_first_is_down(
    etcd_factory: Callable[..., EtcdServer], etcd_prefix: str
) -> None:
    first = etcd_factory()
    second = etcd_factory()
    opts = EtcdOptions(endpoints=(first.endpoint, second.endpoint), prefix=etcd_prefix, timeout=2)
    async with await EtcdRegistry.connect(opts) as reg:
        await reg.put_config_text("on-first")
        assert await reg.get_config_text() == "on-first"
        async with raw_client(second) as c:
            await c.put(f"{etcd_prefix}/config".encode(), b"on-second")
        first.kill()
        assert await reg.get_config_text() == "on-second"
        assert await reg.create_lease(S1, VXLAN, 60) is not None
        async with raw_client(second) as c:
            kv = await c.get(f"{etcd_prefix}/subnets/10.5.52.0-24".encode())
            assert kv is not None and kv.value == VXLAN_BYTES
        # Back to the first when the second goes down too.
        first.start()
        second.kill()
        assert await reg.get_config_text() == "on-first"


@pytest.fixture(scope="module")
def pki() -> Iterator[object]:
    """Certificates in a directory of their own, removed afterwards (keys included)."""
    with tempfile.TemporaryDirectory(prefix="overlay-pki-") as d:
        yield make_pki(Path(d))


async def test_tls_with_client_certificates(
    etcd_factory: Callable[..., EtcdServer], etcd_prefix: str, pki: object
) -> None:
    from tests.tls import Pki

    assert isinstance(pki, Pki)
    server = etcd_factory(tls=TLSFiles(pki.server_cert, pki.server_key, pki.ca))
    assert server.endpoint.startswith("https://127.0.0.1:")
    good = EtcdOptions(
        endpoints=(server.endpoint,),
        prefix=etcd_prefix,
        ca_file=str(pki.ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
        timeout=3,
    )
    async with await EtcdRegistry.connect(good) as reg:
        await reg.put_config_text("over tls")
        assert await reg.get_config_text() == "over tls"
        assert await reg.create_lease(S1, VXLAN, 60) is not None
        (lease,), _ = await reg.list_leases()
        assert lease.attrs == VXLAN
    # Without a client certificate the server refuses us; trusting the wrong CA we refuse it.
    for bad in (
        dataclasses.replace(good, cert_file=None, key_file=None),
        dataclasses.replace(good, ca_file=str(pki.other_ca)),
    ):
        async with await EtcdRegistry.connect(bad) as reg:
            with pytest.raises(RegistryError, match=server.endpoint):
                await reg.get_config_text()
    # Plain http to a TLS-only server does not work either.
    plain = EtcdOptions(endpoints=(server.endpoint.replace("https", "http"),), timeout=3)
    async with await EtcdRegistry.connect(plain) as reg:
        with pytest.raises(RegistryError):
            await reg.get_config_text()


def _etcdctl(endpoint: str, *args: str) -> None:
    subprocess.run(
        ["etcdctl", f"--endpoints={endpoint}", *args],
        check=True,
        capture_output=True,
        timeout=30,
        env={"ETCDCTL_API": "3"},
    )


async def test_username_and_password(
    etcd_factory: Callable[..., EtcdServer], etcd_prefix: str
) -> None:
    server = etcd_factory()
    _etcdctl(server.endpoint, "user", "add", "root:rootpw")
    _etcdctl(server.endpoint, "auth", "enable")
    opts = EtcdOptions(
        endpoints=(server.endpoint,),
        prefix=etcd_prefix,
        username="root",
        password="rootpw",
        timeout=3,
    )
    async with await EtcdRegistry.connect(opts) as reg:
        await reg.put_config_text("with auth")
        assert await reg.get_config_text() == "with auth"
        assert await reg.create_lease(S1, VXLAN, 60) is not None
        (lease,), rev = await reg.list_leases()
        assert lease.subnet == S1
        events = reg.watch_leases(rev)  # a watch carries the token too
        first = await asyncio.wait_for(anext(events), 5)
        assert first.kind == "added" and first.lease.subnet == S1
        await events.aclose()
    for bad in (
        EtcdOptions(endpoints=(server.endpoint,), username="root", password="wrong", timeout=3),
    ):
        async with await EtcdRegistry.connect(bad) as reg:
            with pytest.raises(RegistryError, match=r"root.*--etcd-password"):
                await reg.get_config_text()
    # No credentials at all: etcd refuses the write.
    async with await EtcdRegistry.connect(EtcdOptions(endpoints=(server.endpoint,))) as reg:
        with pytest.raises(RegistryError):
            await reg.put_config_text("anonymous")


async def test_list_without_expirations_still_tells_leases_from_reservations(
    registry: EtcdRegistry, raw: aetcd.Client
) -> None:
    await registry.reserve(IPv4Network("10.5.60.0/24"), IPv4Address("10.0.0.60"))
    async with raw_client_for(registry) as other:
        # A lease written by another host: this registry has never seen its etcd lease.
        grant = await other.lease(600)
        key = registry.key(IPv4Network("10.5.61.0/24"))
        await other.put(key, b'{"PublicIP":"10.0.0.61","PublicIPv6":null}', lease=grant.id)
    quick, _ = await registry.list_leases(expirations=False)
    by_net = {str(x.subnet): x for x in quick}
    assert by_net["10.5.60.0/24"].reserved
    assert not by_net["10.5.61.0/24"].reserved
    assert by_net["10.5.61.0/24"].expiration == float("inf")
    full, _ = await registry.list_leases()
    by_net = {str(x.subnet): x for x in full}
    exp = by_net["10.5.61.0/24"].expiration
    assert exp is not None and exp != float("inf")
    assert by_net["10.5.60.0/24"].reserved


def raw_client_for(registry: EtcdRegistry) -> aetcd.Client:
    host, port = registry.opts.endpoints[0].rsplit("//", 1)[1].rsplit(":", 1)
    return aetcd.Client(host=host, port=int(port), timeout=5)


async def test_dual_stack_keys_from_flannel_are_read(
    registry: EtcdRegistry, raw: aetcd.Client, etcd_prefix: str
) -> None:
    value = b'{"PublicIP":"10.0.0.12","PublicIPv6":"fd00::12","BackendType":"vxlan"}'
    await raw.put(f"{etcd_prefix}/subnets/10.12.13.0-24&fd00:12:13::-56".encode(), value)
    (lease,), _ = await registry.list_leases()
    assert lease.subnet == IPv4Network("10.12.13.0/24")
    assert str(lease.ipv6_subnet) == "fd00:12:13::/56"
    assert str(lease.attrs.public_ipv6) == "fd00::12"
    assert lease.key == "10.12.13.0-24&fd00:12:13::-56"
    assert lease.attrs.to_json().encode() == value


async def test_list_created_after_a_revision_gives_only_newer_keys(
    registry: EtcdRegistry, raw: aetcd.Client
) -> None:
    old = await registry.create_lease(IPv4Network("10.5.70.0/24"), VXLAN, 600)
    gone = await registry.create_lease(IPv4Network("10.5.71.0/24"), VXLAN, 600)
    assert old is not None and gone is not None
    _, revision = await registry.list_leases(expirations=False)
    await registry.update_lease(old, LeaseAttrs(IPv4Address("192.168.64.3")), 600)  # rewritten
    await registry.delete_lease(gone.subnet)
    new = await registry.create_lease(IPv4Network("10.5.72.0/24"), VXLAN, 600)
    assert new is not None
    listed, head = await registry.list_leases(expirations=False, created_after=revision)
    assert [(x.subnet, x.attrs) for x in listed] == [(new.subnet, VXLAN)]
    assert head > revision
    assert await registry.list_leases(expirations=False, created_after=head) == ([], head)
    everything, _ = await registry.list_leases()
    assert {str(x.subnet) for x in everything} == {"10.5.70.0/24", "10.5.72.0/24"}
