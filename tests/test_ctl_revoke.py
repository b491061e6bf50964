"""overlayctl leases revoke against a real etcd: the dead-host rule, whose lease it was, the
etcd lease revoked with the key, refusals (renewed on time, reservation, missing, changed)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integration.etcdserver import EtcdServer
from overlay.ctl import RENEW_GRACE, looks_dead, main
from subnetmgr.model import LeaseAttrs
from subnetmgr.registry import EtcdOptions, EtcdRegistry

VXLAN = LeaseAttrs(
    IPv4Address("192.168.1.11"), None, "vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
)


def ctl(server: EtcdServer, prefix: str, *args: str) -> int:
    return main(["--etcd-endpoints", server.endpoint, "--etcd-prefix", prefix, *args],
                environ={}, plugin_modules=())  # fmt: skip


def etcdctl(server: EtcdServer, *args: str) -> str:
    out = subprocess.run(
        ["etcdctl", "--endpoints", server.endpoint, *args],
        env={**os.environ, "ETCDCTL_API": "3"},
        check=True, capture_output=True, text=True, timeout=15,
    )  # fmt: skip
    return out.stdout.strip()


async def _create(server: EtcdServer, prefix: str, subnet: str, attrs: LeaseAttrs, ttl: int) -> int:
    """Create a lease as overlayd does; returns its etcd lease ID."""
    registry = await EtcdRegistry.connect(EtcdOptions(endpoints=(server.endpoint,), prefix=prefix))
    try:
        assert await registry.create_lease(IPv4Network(subnet), attrs, ttl) is not None
        record = await registry.inspect_key(IPv4Network(subnet))
        assert record is not None
        return record.lease_id
    finally:
        await registry.close()


def lease_alive(server: EtcdServer, lease_id: int) -> bool:
    out = etcdctl(server, "lease", "timetolive", f"{lease_id:x}")
    return "already expired" not in out


@pytest.fixture
def cleanup(etcd_server: EtcdServer, etcd_prefix: str) -> Iterator[None]:
    yield
    etcdctl(etcd_server, "del", "--prefix", etcd_prefix)


def test_revoke_a_dead_hosts_lease(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # 20 minutes left: a live host would have renewed with 60 left.
    lease_id = asyncio.run(_create(etcd_server, etcd_prefix, "10.1.5.0/24", VXLAN, 1200))
    assert ctl(etcd_server, etcd_prefix, "leases", "revoke", "10.1.5.0/24") == 0
    out = capsys.readouterr().out
    assert "revoked 10.1.5.0/24: it was the lease of 192.168.1.11 (backend vxlan, " in out
    assert "VtepMAC c6:d2:32:6f:8f:44" in out and "ago for 20m00s" in out
    assert etcdctl(etcd_server, "get", "--prefix", f"{etcd_prefix}/subnets/") == ""
    assert not lease_alive(etcd_server, lease_id)  # the etcd lease is revoked, not left over


def test_refuses_a_lease_renewed_on_time_unless_forced(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str]
) -> None:
    lease_id = asyncio.run(_create(etcd_server, etcd_prefix, "10.1.6.0/24", VXLAN, 86400))
    assert ctl(etcd_server, etcd_prefix, "leases", "revoke", "10.1.6.0/24") == 1
    err = capsys.readouterr().err
    assert "refusing to revoke 10.1.6.0/24, the lease of 192.168.1.11" in err
    assert "for 24h00m00s" in err and "looks alive" in err and "--force" in err
    key = f"{etcd_prefix}/subnets/10.1.6.0-24"
    assert etcdctl(etcd_server, "get", "--print-value-only", key) == VXLAN.to_json()
    assert lease_alive(etcd_server, lease_id)

    # Hosts that renew with 1450 minutes left (more than 24 h + the grace) would have renewed
    # even this fresh 24 h lease already: it looks dead.
    assert ctl(etcd_server, etcd_prefix, "leases", "revoke", "10.1.6.0/24",
               "--renew-margin", "1450") == 0  # fmt: skip
    asyncio.run(_create(etcd_server, etcd_prefix, "10.1.6.0/24", VXLAN, 86400))
    # The same margin given to `leases` holds for `revoke` too.
    assert ctl(etcd_server, etcd_prefix, "leases", "--renew-margin", "1450", "revoke",
               "10.1.6.0/24") == 0  # fmt: skip
    capsys.readouterr()
    lease_id = asyncio.run(_create(etcd_server, etcd_prefix, "10.1.6.0/24", VXLAN, 86400))
    assert ctl(etcd_server, etcd_prefix, "leases", "revoke", "10.1.6.0/24", "--force") == 0
    assert "revoked 10.1.6.0/24 (--force)" in capsys.readouterr().out
    assert etcdctl(etcd_server, "get", key) == ""
    assert not lease_alive(etcd_server, lease_id)


def test_refuses_reservations_missing_and_bad_subnets(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(etcd_server, etcd_prefix, "reserve", "10.1.7.0/24", "192.168.1.20") == 0
    capsys.readouterr()
    assert ctl(etcd_server, etcd_prefix, "leases", "revoke", "10.1.7.0/24", "--force") == 1
    err = capsys.readouterr().err
    assert "is a reservation for 192.168.1.20" in err and "overlayctl unreserve" in err
    assert etcdctl(etcd_server, "get", "--print-value-only", f"{etcd_prefix}/subnets/10.1.7.0-24")

    assert ctl(etcd_server, etcd_prefix, "leases", "revoke", "10.1.8.0/24") == 1
    assert "no lease for 10.1.8.0/24" in capsys.readouterr().err
    for bad in ("10.1.8.1/24", "10.1.8.0/33", "10.1.8.0", "x" * 5000, "10.1.8.0/24\n"):
        assert ctl(etcd_server, etcd_prefix, "leases", "revoke", bad) == 2
        assert "is not a subnet such as 10.1.7.0/24" in capsys.readouterr().err
    assert ctl(etcd_server, etcd_prefix, "leases", "revoke", "fd00::/64") == 1
    assert "no lease for fd00::/64" in capsys.readouterr().err
    assert ctl(etcd_server, etcd_prefix, "leases", "revoke", "0.0.0.0/0") == 2
    assert "0.0.0.0/0 names no lease" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        ctl(etcd_server, etcd_prefix, "leases", "revoke", "10.1.8.0/24", "--renew-margin", "-1")
    assert exc.value.code == 2
    assert "must be 0 or more" in capsys.readouterr().err


def test_revoke_a_malformed_value_and_a_dual_stack_key(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Garbage under a lease key of an expiring etcd lease: revoked, and said to be malformed."""
    grant = etcdctl(etcd_server, "lease", "grant", "600")  # "lease 694d... granted with TTL(600s)"
    lease_hex = grant.split()[1]
    subnets = f"{etcd_prefix}/subnets/"
    etcdctl(etcd_server, "put", f"{subnets}10.1.9.0-24", "\x7f{{{{[[", "--lease", lease_hex)
    etcdctl(etcd_server, "put", f"{subnets}10.1.10.0-24&fd00:1::-64", VXLAN.to_json(),
            "--lease", lease_hex)  # fmt: skip
    assert ctl(etcd_server, etcd_prefix, "leases", "revoke", "10.1.9.0/24") == 0
    out = capsys.readouterr().out
    assert "it was the lease of a malformed value" in out
    # Another key uses the same etcd lease: only the key goes, the etcd lease stays for it.
    assert lease_alive(etcd_server, int(lease_hex, 16))
    assert ctl(etcd_server, etcd_prefix, "leases", "revoke", "10.1.10.0/24") == 0
    assert "192.168.1.11" in capsys.readouterr().out
    assert etcdctl(etcd_server, "get", "--prefix", subnets) == ""
    assert not lease_alive(etcd_server, int(lease_hex, 16))


def test_a_renewal_between_check_and_delete_wins(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None
) -> None:
    async def go() -> None:
        opts = EtcdOptions(endpoints=(etcd_server.endpoint,), prefix=etcd_prefix)
        registry = await EtcdRegistry.connect(opts)
        try:
            subnet = IPv4Network("10.1.11.0/24")
            lease = await registry.create_lease(subnet, VXLAN, 1200)
            assert lease is not None
            record = await registry.inspect_key(subnet)
            assert record is not None and 1190 <= record.ttl <= 1200
            assert record.granted_ttl == 1200 and record.attached_keys == 1
            await registry.renew_lease(lease, 86400)  # the host came back meanwhile
            assert not await registry.revoke_key(record)
            current, _ = await registry.get_lease(subnet)
            assert current is not None and current.attrs == VXLAN
        finally:
            await registry.close()

    asyncio.run(go())


@given(
    left=st.one_of(st.none(), st.integers(-10, 200_000)),
    margin=st.integers(0, 100_000),
)
def test_looks_dead_rule(left: int | None, margin: int) -> None:
    """A lease looks dead exactly when it has less left than the margin minus the grace; a
    reservation never does; more time left never makes a lease look more dead."""
    dead = looks_dead(left, margin)
    if left is None:
        assert not dead
        return
    assert dead == (left < margin - RENEW_GRACE)
    if dead:
        assert looks_dead(left - 1, margin)
    else:
        assert not looks_dead(left + 1, margin)


@pytest.mark.parametrize(
    ("subnet", "ipv6_subnet", "named"),
    [
        ("0.0.0.0/0", "fd00:1:0:5::/64", "fd00:1:0:5::/64"),  # IPv6-only: by its IPv6 subnet
        ("10.1.5.0/24", "fd00:1:0:6::/64", "fd00:1:0:6::/64"),  # dual stack: by either
        ("10.1.5.0/24", "fd00:1:0:6::/64", "10.1.5.0/24"),
    ],
)
def test_revoke_an_ipv6_only_or_dual_stack_lease_by_its_ipv6_subnet(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str],
    subnet: str, ipv6_subnet: str, named: str,
) -> None:  # fmt: skip
    attrs = LeaseAttrs(
        IPv4Address("0.0.0.0" if subnet == "0.0.0.0/0" else "192.168.1.11"),
        IPv6Address("fd99::11"), "vxlan", None, {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:45"},
    )  # fmt: skip

    async def create() -> tuple[str, int]:
        registry = await EtcdRegistry.connect(
            EtcdOptions(endpoints=(etcd_server.endpoint,), prefix=etcd_prefix)
        )
        try:
            lease = await registry.create_lease(
                IPv4Network(subnet), attrs, 3600, IPv6Network(ipv6_subnet)
            )
            assert lease is not None
            record = await registry.inspect_key(IPv6Network(ipv6_subnet))
            assert record is not None and record.key == lease.key
            return lease.key, record.lease_id
        finally:
            await registry.close()

    key, lease_id = asyncio.run(create())
    # A second key that merely shares a prefix of the text is never the one found.
    etcdctl(etcd_server, "put", f"{etcd_prefix}/subnets/0.0.0.0-0&fd00:1:0:5::-640", "{}")
    capsys.readouterr()
    assert ctl(etcd_server, etcd_prefix, "leases", "revoke", named) == 1  # renewed on time
    assert f"refusing to revoke {named}" in capsys.readouterr().err
    assert ctl(etcd_server, etcd_prefix, "leases", "revoke", named, "--force") == 0
    out = capsys.readouterr()
    assert f"revoked {named} (--force)" in out.out and "fd99::11" in out.out
    assert etcdctl(etcd_server, "get", f"{etcd_prefix}/subnets/{key}") == ""
    assert not lease_alive(etcd_server, lease_id)
