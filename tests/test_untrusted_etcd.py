"""Hostile keys and values in a real etcd: the registry, the lease mirror, allocation,
wait_for_config and overlayctl each give a logged skip or a clear error, never a crash, and
hand on only leases that fit the network config. (The same values against running daemons:
tests/test_integration_untrusted.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Network

import aetcd
import pytest

from integration.etcdserver import EtcdServer
from overlay.ctl import main as ctl_main
from subnetmgr.manager import LeaseMirror, SubnetManager
from subnetmgr.model import ConfigError, LeaseAttrs, NetworkConfig, printable, subnet_key
from subnetmgr.registry import EtcdOptions, EtcdRegistry
from tests.labtools import eventually
from tests.test_mirror import Recorder, running

CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
NESTED = b"[" * 1024 + b"]" * 1024  # 2 KiB: json.loads alone raised RecursionError on it
HUGE = b'{"PublicIP":"192.168.1.9","BackendData":{"x":"' + b"a" * (1 << 20) + b'"}}'


def value(ip: str, mac: str = "02:00:00:00:00:01") -> bytes:
    return LeaseAttrs(IPv4Address(ip), None, "vxlan", {"VNI": 1, "VtepMAC": mac}).to_json().encode()


def key(prefix: str, text: str) -> bytes:
    return f"{prefix}/subnets/{text}".encode()


@asynccontextmanager
async def registry_for(server: EtcdServer, prefix: str) -> AsyncIterator[EtcdRegistry]:
    opts = EtcdOptions(endpoints=(server.endpoint,), prefix=prefix, timeout=5)
    async with await EtcdRegistry.connect(opts) as reg:
        yield reg


# Keys that do not decode, each with the reason it must be recorded under.
UNDECODABLE: list[tuple[bytes, bytes, str]] = [
    (b"10.5.2.0-24", NESTED, "too_deep"),
    (b"10.5.3.0-24", HUGE, "too_large"),
    (b"10.5.4.0-24\xff", b'{"PublicIP":"192.168.1.9"}', "key_not_utf8"),
    (b"10.5.5.0-24", b'{"PublicIP":"192.168.1.9","BackendType":"\xff"}', "not_utf8"),
    (b"10.5.6.0-24", b'{"PublicIP":["192.168.1.9"]}', "bad_public_ip"),
    (b"10.5.7.0-24", b'{"PublicIP":"192.168.1.9","BackendData":[1]}', "bad_backend_data"),
    (b"10.5.8.0-24", b'"just a string"', "not_object"),
    (b"10.5.9.0-024", b'{"PublicIP":"192.168.1.9"}', "bad_key"),
    (b"10.5.10.0-24", b'{"PublicIP":"192.168.1.9","BackendType":"v\\nx"}', "bad_backend_type"),
    (b"10.5.11.0-24\x1b[2J", b'{"PublicIP":"192.168.1.9"}', "bad_key"),  # a terminal escape
]
# Keys that decode but do not fit CONFIG.
UNFIT: list[tuple[str, bytes, str]] = [
    ("0.0.0.0-0", value("192.168.1.20"), "outside_network"),
    ("10.6.0.0-24", value("192.168.1.21"), "outside_network"),
    ("10.5.1.0-25", value("192.168.1.22"), "wrong_prefix_len"),
    ("10.5.20.0-24", value("127.0.0.1"), "unusable_public_ip"),
    ("10.5.21.0-24", value("224.0.0.1"), "unusable_public_ip"),
    ("10.5.22.0-24", value("0.0.0.0"), "unusable_public_ip"),
]


async def test_hostile_keys_are_skipped_logged_once_and_cleared(
    etcd_server: EtcdServer, etcd_prefix: str, raw: aetcd.Client, caplog: pytest.LogCaptureFixture
) -> None:
    good = IPv4Network("10.5.1.0/24")
    await raw.put(key(etcd_prefix, "10.5.1.0-24"), value("192.168.1.10"))
    for k, v, _ in UNDECODABLE:
        await raw.put(f"{etcd_prefix}/subnets/".encode() + k, v)
    for text, v, _ in UNFIT:
        await raw.put(key(etcd_prefix, text), v)
    config = NetworkConfig.from_json(CONFIG)
    counted: list[str] = []
    with caplog.at_level(logging.INFO, logger="overlay.subnetmgr"):
        async with registry_for(etcd_server, etcd_prefix) as reg:
            reg.ignored.on_new = lambda ig: counted.append(ig.reason)
            for _ in range(3):  # several lists: each key is still logged and counted once
                leases, _rev = await reg.list_leases()
                assert {x.subnet for x in leases} == {good} | {
                    IPv4Network(t.replace("-", "/")) for t, _, _ in UNFIT
                }
            mirror, rec = LeaseMirror(reg, config=config), Recorder()
            async with running(mirror, rec):
                assert set(mirror.snapshot) == {good}
                expected = {k.decode("utf-8", "backslashreplace"): r for k, _, r in UNDECODABLE}
                expected |= {t: r for t, _, r in UNFIT}
                assert {k: ig.reason for k, ig in reg.ignored.current.items()} == expected
                assert sorted(counted) == sorted(expected.values())
                # The watch meets them again (rewritten with the same bytes): nothing new.
                await raw.put(key(etcd_prefix, "10.5.2.0-24"), NESTED)
                await raw.put(key(etcd_prefix, "0.0.0.0-0"), value("192.168.1.20"))
                await raw.put(key(etcd_prefix, "10.5.30.0-24"), value("192.168.1.30"))
                await rec.wait_for(lambda s: IPv4Network("10.5.30.0/24") in s)
                assert sorted(counted) == sorted(expected.values())
                # A fixed value and a deleted key leave the ignored set (visible: `changes`).
                changes = reg.ignored.changes
                await raw.put(key(etcd_prefix, "10.5.6.0-24"), value("192.168.1.6"))
                await raw.delete(key(etcd_prefix, "0.0.0.0-0"))
                await raw.delete(f"{etcd_prefix}/subnets/".encode() + b"10.5.4.0-24\xff")
                await rec.wait_for(lambda s: IPv4Network("10.5.6.0/24") in s)
                await _until(lambda: "10.5.4.0-24\\xff" not in reg.ignored.current)
                assert "10.5.6.0-24" not in reg.ignored.current
                assert "0.0.0.0-0" not in reg.ignored.current
                assert reg.ignored.changes >= changes + 3
                # A valid lease overwritten with a hostile value leaves the data path.
                await raw.put(key(etcd_prefix, "10.5.30.0-24"), b"{" * 5000)
                await rec.wait_for(lambda s: IPv4Network("10.5.30.0/24") not in s)
                assert reg.ignored.current["10.5.30.0-24"].reason == "too_deep"
                assert set(mirror.snapshot) == {good, IPv4Network("10.5.6.0/24")}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for text, reason in expected.items():
        shown = printable(text, 100)  # as logged: control characters escaped
        hits = [m for m in warnings if f"/subnets/{shown} " in m and f"[{reason}]" in m]
        assert len(hits) == 1, (text, hits)
    assert all(len(m) < 600 for m in warnings)  # a 1 MiB value is not copied into the log
    assert "\x1b" not in caplog.text  # nor a terminal escape sequence from a key


async def _until(check: Callable[[], bool], within: float = 10.0) -> None:
    async def holds() -> bool:
        return check()

    await eventually(holds, "the condition", within)


async def test_the_older_key_wins_and_our_own_lease_is_never_dropped(
    etcd_server: EtcdServer, etcd_prefix: str, raw: aetcd.Client
) -> None:
    config = NetworkConfig.from_json(CONFIG)
    async with registry_for(etcd_server, etcd_prefix) as reg:
        await reg.put_config_text(CONFIG)
        own = await SubnetManager(reg).acquire(config, LeaseAttrs(IPv4Address("192.168.1.1")))
        other = IPv4Network("10.5.200.0/24")
        await raw.put(key(etcd_prefix, subnet_key(other)), value("192.168.1.2"))
        mirror, rec = LeaseMirror(reg, config=config), Recorder()
        mirror.set_own(own)
        async with running(mirror, rec):
            # Later keys for the same subnets (the dual-stack spelling is a second key for one
            # IPv4 subnet), and a /25 inside our own subnet.
            dup_other = f"{subnet_key(other)}&fd00::-56"
            dup_own = f"{own.key}&fd00:1::-56"
            inside = f"{own.subnet.network_address}-25"
            await raw.put(key(etcd_prefix, dup_other), value("192.168.1.66"))
            await raw.put(key(etcd_prefix, dup_own), value("192.168.1.67"))
            await raw.put(key(etcd_prefix, inside), value("192.168.1.68"))
            await _until(lambda: {dup_other, dup_own, inside} <= set(reg.ignored.current))
            reasons = {k: reg.ignored.current[k].reason for k in (dup_other, dup_own, inside)}
            assert reasons == {dup_other: "overlaps_older", dup_own: "overlaps_own",
                               inside: "wrong_prefix_len"}  # fmt: skip
            assert mirror.snapshot[other].attrs.public_ip == IPv4Address("192.168.1.2")
            assert mirror.snapshot[own.subnet].key == own.key
            # The older key goes: the newer one is the lease for that subnet now (every host
            # makes the same switch), and the change is reported.
            await raw.delete(key(etcd_prefix, subnet_key(other)))
            await rec.wait_for(
                lambda s: other in s and s[other].attrs.public_ip == IPv4Address("192.168.1.66")
            )
            assert dup_other not in reg.ignored.current
            # Our own key deleted: nothing else takes our subnet in the data path.
            await raw.delete(key(etcd_prefix, own.key))
            await rec.wait_for(lambda s: own.subnet not in s)
            assert reg.ignored.current[dup_own].reason == "overlaps_own"


async def test_acquire_next_to_rogue_keys(
    etcd_server: EtcdServer, etcd_prefix: str, raw: aetcd.Client
) -> None:
    """`0.0.0.0-0` and the whole network as a key do not make a small network "out of
    subnets"; a valid lease and a key of another length still block what they overlap."""
    config = NetworkConfig.from_json('{"Network":"10.9.0.0/22","SubnetLen":24}')
    for text in ("0.0.0.0-0", "10.9.0.0-22", "10.0.0.0-8", "10.9.0.0-23"):
        await raw.put(key(etcd_prefix, text), value("192.168.1.50"))
    await raw.put(key(etcd_prefix, "10.9.1.0-24"), value("192.168.1.51"))
    await raw.put(key(etcd_prefix, "10.9.2.0-25"), value("192.168.1.52"))
    await raw.put(key(etcd_prefix, "10.9.3.0-24"), NESTED)
    async with registry_for(etcd_server, etcd_prefix) as reg:
        mgr = SubnetManager(reg)
        with pytest.raises(Exception, match="out of subnets"):
            await mgr.acquire(config, LeaseAttrs(IPv4Address("192.168.1.53")))
        await raw.delete(key(etcd_prefix, "10.9.3.0-24"))  # the undecodable key goes
        got = await mgr.acquire(config, LeaseAttrs(IPv4Address("192.168.1.53")))
        assert got.subnet == IPv4Network("10.9.3.0/24") and got.create_revision > 0


HOSTILE_CONFIGS: list[bytes] = [
    b"[" * 2048 + b"]" * 2048,
    b'{"Network":"10.1.0.0/16","Backend":' + b"{" * 3000 + b"}" * 3000 + b"}",
    b'{"Network":"10.1.0.0/16","Padding":"' + b"x" * (1 << 20) + b'"}',
    b'{"Network":"10.1.0.0/16","Backend":{"Type":"vx\xfflan"}}',
    b'{"Network":10}',
    b'{"Network":"10.1.0.0/16","SubnetLen":"24"}',
    b'{"Network":"10.1.0.0/16","SubnetLen":1e999}',
    b'{"Network":"10.1.0.0/16","EnableIPv4":NaN}',
]


async def test_hostile_configs_wait_and_overlayctl_refuses_them_with_the_same_message(
    etcd_server: EtcdServer, etcd_prefix: str, caplog: pytest.LogCaptureFixture, tmp_path: object
) -> None:
    async with registry_for(etcd_server, etcd_prefix) as reg:
        mgr = SubnetManager(reg)
        for bad in HOSTILE_CONFIGS:
            with pytest.raises(ConfigError) as e:
                NetworkConfig.from_json(bad)
            message = str(e.value)
            await reg.put_config_text(bad)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="overlay.subnetmgr"):
                waiter = asyncio.create_task(mgr.wait_for_config(retry_interval=0.05))
                await _until(lambda: "invalid network config" in caplog.text)
                assert not waiter.done()  # still waiting: a bad config is not fatal
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
            assert message in caplog.text
            assert len(caplog.text) < 2000
            # overlayctl refuses the same bytes with the same message, and writes nothing.
            path = tmp_path / "net.json"  # type: ignore[operator]
            path.write_bytes(bad)
            err = await asyncio.to_thread(_ctl_err, etcd_server, etcd_prefix, "config", "set",
                                          f"@{path}")  # fmt: skip
            assert err[0] == 2 and message in err[1]
        await reg.put_config_text(CONFIG)
        assert (await mgr.wait_for_config()).network == IPv4Network("10.5.0.0/16")


def _ctl_err(server: EtcdServer, prefix: str, *args: str) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = ctl_main(["--etcd-endpoints", server.endpoint, "--etcd-prefix", prefix, *args],
                        environ={}, plugin_modules=())  # fmt: skip
    return code, err.getvalue()


def _ctl_out(server: EtcdServer, prefix: str, *args: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = ctl_main(["--etcd-endpoints", server.endpoint, "--etcd-prefix", prefix, *args],
                        environ={}, plugin_modules=())  # fmt: skip
    assert code == 0
    return out.getvalue()


async def test_overlayctl_leases_shows_what_is_ignored_and_why(
    etcd_server: EtcdServer, etcd_prefix: str, raw: aetcd.Client
) -> None:
    await raw.put(f"{etcd_prefix}/config".encode(), CONFIG.encode())
    await raw.put(key(etcd_prefix, "10.5.1.0-24"), value("192.168.1.10"))
    for k, v, _ in UNDECODABLE:
        await raw.put(f"{etcd_prefix}/subnets/".encode() + k, v)
    for text, v, _ in UNFIT:
        await raw.put(key(etcd_prefix, text), v)
    await raw.put(key(etcd_prefix, "10.5.1.0-24&fd00::-56"), value("192.168.1.11"))
    await raw.put(key(etcd_prefix, "10.5.40.0-24"), value("192.168.1.12", mac="\x1b[31m" * 40))
    doc = json.loads(
        await asyncio.to_thread(_ctl_out, etcd_server, etcd_prefix, "leases", "--json")
    )
    rows = {r["key"]: r for r in doc}
    assert rows["10.5.1.0-24"]["ignored"] is None
    assert rows["10.5.1.0-24"]["public_ip"] == "192.168.1.10"
    assert rows["10.5.1.0-24&fd00::-56"]["ignored"] == "overlaps_older"
    for k, _, reason in UNDECODABLE:
        row = rows[k.decode("utf-8", "backslashreplace")]
        assert row["ignored"] == reason and row["subnet"] is None and row["detail"]
    for text, _, reason in UNFIT:
        assert rows[text]["ignored"] == reason
        assert rows[text]["subnet"] == text.replace("-", "/")
    assert rows["10.5.40.0-24"]["ignored"] is None
    table = await asyncio.to_thread(_ctl_out, etcd_server, etcd_prefix, "leases")
    assert "\x1b" not in table  # control characters from etcd do not reach the terminal
    lines = table.splitlines()
    assert any(line.startswith("0.0.0.0/0") and "ignored: outside_network" in line
               for line in lines)  # fmt: skip
    assert any("key 10.5.2.0-24" in line and "ignored: too_deep" in line for line in lines)
    assert "ignored by overlayd" in table


async def test_leases_carry_the_creation_revision_the_overlap_rule_compares(
    etcd_server: EtcdServer, etcd_prefix: str, raw: aetcd.Client
) -> None:
    subnet = IPv4Network("10.5.9.0/24")
    async with registry_for(etcd_server, etcd_prefix) as reg:
        created = await reg.create_lease(subnet, LeaseAttrs(IPv4Address("192.168.1.9")), 600)
        assert created is not None and created.create_revision > 0
        (listed,), _ = await reg.list_leases()
        assert listed.create_revision == created.create_revision
        renewed = await reg.renew_lease(listed, 600)  # a renewal re-puts: still the same key
        assert renewed.create_revision == created.create_revision
        await reg.delete_lease(subnet)
        await reg.reserve(subnet, IPv4Address("192.168.1.9"))
        (first,), _ = await reg.list_leases()
        await reg.unreserve(subnet)
        await reg.reserve(subnet, IPv4Address("192.168.1.9"))  # same bytes, no etcd lease
        (again,), _ = await reg.list_leases()
        assert again.create_revision > first.create_revision
        kv = await raw.get(key(etcd_prefix, "10.5.9.0-24"))
        assert again.create_revision == kv.create_revision > created.create_revision
