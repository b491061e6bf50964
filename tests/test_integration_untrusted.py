"""Integration: hostile keys and values written into the real etcd of a running 3-host vxlan lab
(real overlayd daemons in namespaces, real traffic).

One lab, every case written into it at once: deeply nested JSON, a 1 MiB value, a key and a
value that are not UTF-8, JSON of the wrong types, `0.0.0.0-0`, a lease outside Network, a /25
inside a host's subnet, a second (newer) key for another host's subnet, PublicIPs 127.0.0.1,
224.0.0.1 and 0.0.0.0, and invalid configs written over the good one. Then: every daemon stays
up and ready, the good hosts still reach each other, no host's kernel has a route, neighbour or
FDB entry for anything hostile, /metrics counts each key once by reason, `overlayctl leases
--json` shows them as ignored, each daemon logs each key once and its config verdicts, and a
host that joins afterwards is programmed everywhere and reached.

The daemons serve /metrics (FLANNELD_METRICS=true in their environment, as in
tests/test_integration_udp.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Iterator
from ipaddress import IPv4Network

import aetcd
import pytest

from integration.lab import HEALTH_PORT, Lab, http_status
from integration.netns import ip_json, pid_alive, run
from subnetmgr.model import subnet_key
from tests.labtools import (
    assert_full_connectivity,
    eventually,
    full_passes,
    remote_subnets,
    running_lab,
    wait_full_passes,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

NESTED = b"[" * 1024 + b"]" * 1024  # about 2 KiB; json.loads alone raised RecursionError
HUGE = b'{"PublicIP":"192.0.2.9","BackendType":"vxlan","BackendData":{"x":"' + b"a" * (1 << 20)
HUGE += b'"}}'


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLANNELD_METRICS", "true")
        yield from running_lab(tmp_path_factory, "t", "vxlan", "1")


def vxlan_value(ip: str, mac: str = "0e:00:00:00:00:99") -> bytes:
    return json.dumps(
        {"PublicIP": ip, "PublicIPv6": None, "BackendType": "vxlan",
         "BackendData": {"VNI": 1, "VtepMAC": mac}},
        separators=(",", ":"),
    ).encode()  # fmt: skip


def client(lab: Lab) -> aetcd.Client:
    host, _, port = lab.state.etcd_endpoint.removeprefix("http://").rpartition(":")
    return aetcd.Client(host=host, port=int(port), timeout=10)


async def ignored_metrics(lab: Lab, index: int) -> dict[str, int]:
    """overlay_leases_ignored_total of host `index`, by reason."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(lab.node(index).ip, HEALTH_PORT), 5
    )
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.split()[1] == "200", head
    out = {}
    for line in body.splitlines():
        if line.startswith('overlay_leases_ignored_total{reason="'):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('"')[1]] = int(float(value))
    return out


async def kernel_view(
    lab: Lab, index: int
) -> tuple[set[str], dict[str, str], dict[str, str], list[str]]:
    """Host `index`: the routes over flannel.1, its neighbours (address -> MAC) and FDB entries
    (MAC -> destination), and every route destination of all the host's routing tables."""
    ns = lab.node(index).ns
    routes = {r["dst"] for r in await ip_json("route", "show", "dev", "flannel.1", ns=ns)}
    neigh = {
        n["dst"]: n.get("lladdr", "")
        for n in await ip_json("neigh", "show", "dev", "flannel.1", ns=ns)
    }
    out = await run("bridge", "-j", "fdb", "show", "dev", "flannel.1", ns=ns)
    fdb = {e["mac"]: e["dst"] for e in json.loads(out or "[]") if "dst" in e}
    everything = [r["dst"] for r in await ip_json("route", "show", "table", "all", ns=ns)]
    return routes, neigh, fdb, everything


async def test_hostile_etcd_disturbs_no_daemon_and_no_data_path(lab: Lab) -> None:
    prefix = f"{lab.state.prefix}/subnets/"
    nodes = list(lab.state.nodes)
    h1, h2 = nodes[0], nodes[1]
    s1, s2 = IPv4Network(h1.subnet), IPv4Network(h2.subnet)
    # key -> (value, reason every host records; None: decodes and is left to the backend)
    hostile: dict[bytes, tuple[bytes, str | None]] = {
        b"10.1.250.0-24": (NESTED, "too_deep"),
        b"10.1.251.0-24": (HUGE, "too_large"),
        b"10.1.252.0-24\xff": (vxlan_value("192.0.2.10"), "key_not_utf8"),
        b"10.1.253.0-24": (b'{"PublicIP":"192.0.2.11","BackendType":"vx\xfflan"}', "not_utf8"),
        b"10.1.254.0-24": (b'{"PublicIP":5,"BackendType":"vxlan"}', "bad_public_ip"),
        b"10.1.249.0-24": (b'{"PublicIP":"192.0.2.12","BackendData":[1,2]}', "bad_backend_data"),
        b"10.1.248.0-24": (b'{"PublicIP":"192.0.2.13","BackendType":{"a":1}}', "bad_backend_type"),
        # Decodes and fits, but its VtepMAC is no MAC: the vxlan backend skips it (logged).
        b"10.1.247.0-24": (
            b'{"PublicIP":"192.0.2.14","BackendType":"vxlan",'
            b'"BackendData":{"VNI":"1","VtepMAC":7}}',
            None,
        ),
        b"0.0.0.0-0": (vxlan_value("192.0.2.15"), "outside_network"),
        b"10.200.0.0-24": (vxlan_value("192.0.2.16"), "outside_network"),
        f"{s1.network_address}-25".encode(): (vxlan_value(nodes[2].ip), "wrong_prefix_len"),
        b"10.1.240.0-24": (vxlan_value("127.0.0.1"), "unusable_public_ip"),
        b"10.1.241.0-24": (vxlan_value("224.0.0.1"), "unusable_public_ip"),
        b"10.1.242.0-24": (vxlan_value("0.0.0.0"), "unusable_public_ip"),
        # A second, newer key for h2's subnet (the dual-stack spelling), pointing elsewhere.
        f"{subnet_key(s2)}&fd00::-56".encode(): (vxlan_value(h1.ip), "overlaps_older"),
    }
    dup_key = f"{subnet_key(s2)}&fd00::-56"
    hostile_subnets = {"0.0.0.0/0", "default", "10.200.0.0/24", f"{s1.network_address}/25"} | {
        f"10.1.{i}.0/24" for i in range(240, 255)
    }
    macs = {
        str(s): str((lease.attrs.backend_data or {})["VtepMAC"])
        for s, lease in (await lab.leases()).items()
    }
    config_key = f"{lab.state.prefix}/config".encode()
    etcd = client(lab)
    await etcd.connect()
    good_config = (await etcd.get(config_key)).value
    try:
        for k, (v, _) in hostile.items():
            await etcd.put(prefix.encode() + k, v)
        for bad in (NESTED, b'{"Network":"10.1.0.0/16","x":"' + b"y" * (1 << 20) + b'"}',
                    b'{"Network":"10.1.0.0/16","Backend":{"Type":"vx\xfflan"}}',
                    b'{"Network":["10.1.0.0/16"]}'):  # fmt: skip
            await etcd.put(config_key, bad)
        await etcd.put(config_key, b'{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","VNI":7}}')
        await etcd.delete(config_key)
        await etcd.put(config_key, good_config)

        def expected(index: int) -> Counter[str]:
            reasons = Counter(r for r in (r for _, r in hostile.values()) if r is not None)
            if lab.node(index).subnet == h2.subnet:  # h2 itself: over its own lease
                reasons["overlaps_older"] -= 1
                reasons["overlaps_own"] += 1
            return +reasons

        async def all_counted() -> bool:
            for n in lab.state.nodes:
                if await ignored_metrics(lab, n.index) != expected(n.index):
                    return False
            return True

        await eventually(all_counted, "every daemon counts each hostile key once, by reason")
        await wait_full_passes(lab, await full_passes(lab), 2)  # two more full passes ran
        for n in lab.state.nodes:
            assert n.daemon_pid is not None and pid_alive(n.daemon_pid), n.index
            assert await http_status(n.ip, HEALTH_PORT, "/readyz") == 200
            assert await ignored_metrics(lab, n.index) == expected(n.index)  # still once
            routes, neigh, fdb, everything = await kernel_view(lab, n.index)
            assert routes == remote_subnets(lab, n.index)
            # Each remote subnet's neighbour and FDB entry are its real host's: the newer key
            # for h2's subnet (VtepMAC 0e:..:99, h1's address) is not used anywhere.
            assert neigh == {str(IPv4Network(s).network_address): macs[s] for s in routes}
            by_ip = {m.ip: macs[m.subnet] for m in nodes}
            assert fdb == {mac: ip for ip, mac in by_ip.items() if ip != n.ip}
            assert hostile_subnets.isdisjoint(everything), everything
            log = (lab.node_dir(n.index) / "overlayd.log").read_text(errors="replace")
            assert "Traceback" not in log
            for k in hostile:
                text = k.decode("utf-8", "backslashreplace")
                if hostile[k][1] is not None:
                    assert log.count(f"ignoring lease key {prefix}{text} ") == 1, (n.index, text)
            assert log.count("changed to an invalid one") == 4
            assert "nested deeper than 32 levels" in log and "too large: 1048" in log
            assert "keeps the running config" in log and "was deleted" in log
            assert "it applies when overlayd restarts" in log
        await assert_full_connectivity(lab)

        out = await run(sys.executable, "-m", "overlay.ctl", "--etcd-endpoints",
                        lab.state.etcd_endpoint, "--etcd-prefix", lab.state.prefix,
                        "leases", "--json", limit=30)  # fmt: skip
        rows = {r["key"]: r for r in json.loads(out)}
        for k, (_, reason) in hostile.items():
            text = k.decode("utf-8", "backslashreplace")
            assert rows[text]["ignored"] == reason, (text, rows[text])
        assert rows[dup_key]["ignored"] == "overlaps_older"
        for n in nodes:
            assert rows[subnet_key(IPv4Network(n.subnet))]["ignored"] is None

        # A host joining now, with all of it in etcd, is programmed everywhere and reached.
        joined = await lab.add_node()
        try:

            async def everyone_routes_to_it() -> bool:
                for n in lab.state.nodes:
                    routes, _, _, _ = await kernel_view(lab, n.index)
                    if routes != remote_subnets(lab, n.index):
                        return False
                return True

            await eventually(everyone_routes_to_it, "every host routes to the joined host")
            assert await ignored_metrics(lab, joined.index) == expected(joined.index)
            _, neigh, fdb, everything = await kernel_view(lab, joined.index)
            assert hostile_subnets.isdisjoint(everything)
            assert set(fdb.values()) == {n.ip for n in lab.state.nodes} - {joined.ip}
            assert "0e:00:00:00:00:99" not in set(fdb) | set(neigh.values())
            await assert_full_connectivity(lab)
        finally:
            await lab.remove_node(joined.index)
    finally:
        for k in hostile:
            await etcd.delete(prefix.encode() + k)
        await etcd.put(config_key, good_config)
        await etcd.close()
