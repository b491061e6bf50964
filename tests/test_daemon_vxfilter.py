"""overlayd with Backend.FilterPeers: the real binary in a network namespace, real etcd, real
nftables (see tests/test_daemon.py for the layout).

Lease events from etcd keep the nft set in step; the drop counter is on /metrics and moves when
a host that holds no lease (the root-namespace side of the test's veth) sends to the VXLAN
port; SIGTERM leaves the table in place; a restart with the option off deletes it.
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from backends.vxlan import FILTER_TABLE
from tests import test_daemon as td
from tests.test_daemon_incremental import vxlan_lease

pytestmark = [pytest.mark.root, pytest.mark.slow]

site = td.site
daemon_factory = td.daemon_factory

METRIC = "overlay_vxlan_peer_filter_dropped_packets_total"


def config(**backend: object) -> str:
    return json.dumps({"Network": td.NETWORK, "Backend": {"Type": "vxlan", **backend}})


def elements(site: td.Site) -> set[str] | None:
    """The filter set's addresses; None when the table does not exist."""
    out = subprocess.run(
        ["ip", "netns", "exec", site.ns, "nft", "-j", "list", "set", "ip", FILTER_TABLE, "peers"],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        return None
    for item in json.loads(out.stdout)["nftables"]:
        if "set" in item:
            return set(item["set"].get("elem", []))
    return None


def dropped(d: td.Daemon) -> int | None:
    line = d.metric(METRIC)
    return int(line.rsplit(" ", 1)[1]) if line else None


def test_daemon_keeps_the_filter_in_step_publishes_drops_and_leaves_it_on_sigterm(
    site: td.Site, etcd_prefix: str, daemon_factory: object
) -> None:
    assert callable(daemon_factory)
    subnets = f"{etcd_prefix}/subnets"
    td.etcdctl(site, "put", f"{etcd_prefix}/config", config(FilterPeers=True))
    td.etcdctl(site, "put", f"{subnets}/10.77.40.0-24", vxlan_lease(40))
    udp_lease = '{"PublicIP":"192.0.2.50","PublicIPv6":null}'
    td.etcdctl(site, "put", f"{subnets}/10.77.50.0-24", udp_lease)
    d: td.Daemon = daemon_factory("--resync-period", "60")
    try:
        d.start()
        d.wait_ready()
        d.wait_for("the first peer admitted", lambda: elements(site) == {"192.0.2.40"})
        assert dropped(d) == 0

        # Lease events: one more vxlan host admitted, then the first one removed.
        td.etcdctl(site, "put", f"{subnets}/10.77.41.0-24", vxlan_lease(41))
        d.wait_for("a second peer", lambda: elements(site) == {"192.0.2.40", "192.0.2.41"})
        td.etcdctl(site, "del", f"{subnets}/10.77.40.0-24")
        d.wait_for("the first peer gone", lambda: elements(site) == {"192.0.2.41"})

        # The root namespace's end of the veth holds no lease: what it sends to UDP 8472 (a
        # VXLAN header and nothing inside) is dropped and counted on /metrics.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(3):
                s.sendto(bytes([0x08, 0, 0, 0, 0, 0, 1, 0]), (site.node_ip, 8472))
        d.wait_for("3 drops on /metrics", lambda: dropped(d) == 3)
        page = d.get("/metrics")[1]
        assert f"# TYPE {METRIC} counter" in page
        assert "overlay_vxlan_peer_filter_dropped_bytes_total " in page
        # Our lines pass Prometheus' own linter (counter names end in _total).
        ours = "".join(line + "\n" for line in page.splitlines() if "overlay_vxlan_" in line)
        lint = subprocess.run(["promtool", "check", "metrics"], input=ours, text=True,
                              capture_output=True, timeout=30, check=False)  # fmt: skip
        assert lint.returncode == 0, lint.stdout + lint.stderr

        # SIGTERM: the table stays, as the device and its entries do.
        assert d.stop() == 0
        assert elements(site) == {"192.0.2.41"}
    finally:
        d.kill()

    # Restarted with the option off: the leftover table is deleted before the daemon is ready.
    td.etcdctl(site, "put", f"{etcd_prefix}/config", config())
    d2: td.Daemon = daemon_factory("--resync-period", "60")
    try:
        d2.start()
        d2.wait_ready()
        assert elements(site) is None
        assert "deleted the leftover nft table ip overlay_vxlan" in d2.tail()
        assert dropped(d2) is None
        assert d2.stop() == 0
    finally:
        d2.kill()
