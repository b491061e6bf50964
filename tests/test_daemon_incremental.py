"""overlayd feeds the vxlan backend incrementally: the real binary in a network namespace, real
etcd, real kernel devices (see tests/test_daemon.py for the layout).

A lease event makes a pass over the changed subnets only: an entry of another subnet deleted by
hand stays deleted until the periodic full pass (--resync-period) puts it back.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from overlay.daemon import FULL_RECONCILE_ENV
from tests import test_daemon as td

pytestmark = [pytest.mark.root, pytest.mark.slow]

# The module-scoped namespace + etcd and the daemon factory of tests/test_daemon.py (a separate
# instance for this module).
site = td.site
daemon_factory = td.daemon_factory

VXLAN_CONFIG = json.dumps(
    {"Network": td.NETWORK, "SubnetMin": td.SUBNET_MIN, "Backend": {"Type": "vxlan"}}
)  # the peers written below lie under SubnetMin: never the daemon's own lease
RESYNC = 4.0


def vxlan_lease(n: int) -> str:
    # PublicIPs in TEST-NET-1: FDB entries only, nothing is ever sent to them (no traffic enters
    # the overlay in this test).
    return json.dumps(
        {"PublicIP": f"192.0.2.{n}", "PublicIPv6": None, "BackendType": "vxlan",
         "BackendData": {"VNI": 1, "VtepMAC": f"0a:00:00:00:00:{n:02x}"}},
        separators=(",", ":"),
    )  # fmt: skip


def flannel_routes(site: td.Site) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", site.ns, "-j", "route", "show", "dev", "flannel.1"],
        check=True, capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    return {r["dst"] for r in json.loads(out.stdout or "[]")}


def kernel_entries(site: td.Site) -> dict[str, Any]:
    def run(*cmd: str) -> Any:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=10)
        return json.loads(out.stdout or "[]")

    neigh = run("ip", "-n", site.ns, "-j", "neigh", "show", "dev", "flannel.1")
    fdb = run("bridge", "-n", site.ns, "-j", "fdb", "show", "dev", "flannel.1")
    return {
        "neigh": {n["dst"] for n in neigh},
        "fdb": {(f["mac"], f.get("dst")) for f in fdb if f["mac"] != "00:00:00:00:00:00"},
        "routes": flannel_routes(site),
    }


def count(d: td.Daemon, trigger: str) -> int:
    line = d.metric(f'overlay_reconciles_total{{trigger="{trigger}"}}')
    return int(line.rsplit(" ", 1)[1]) if line else 0


def test_events_reconcile_only_what_changed_and_the_full_pass_repairs(
    site: td.Site, etcd_prefix: str, daemon_factory: object
) -> None:
    assert callable(daemon_factory)
    td.etcdctl(site, "put", f"{etcd_prefix}/config", VXLAN_CONFIG)
    subnets = f"{etcd_prefix}/subnets"
    d: td.Daemon = daemon_factory("--resync-period", str(RESYNC))
    try:
        d.start()
        d.wait_ready()
        td.etcdctl(site, "put", f"{subnets}/10.77.20.0-24", vxlan_lease(20))
        td.etcdctl(site, "put", f"{subnets}/10.77.21.0-24", vxlan_lease(21))
        d.wait_for("A and B", lambda: {"10.77.20.0/24", "10.77.21.0/24"} <= flannel_routes(site))

        # Right after a full pass (the next one is RESYNC s away): B's route goes by hand, and
        # a lease event for C arrives. The event's pass programs C and leaves B alone.
        full = count(d, "full")
        d.wait_for("a full pass", lambda: count(d, "full") > full, timeout=2 * RESYNC + 5)
        changes = count(d, "change")
        subprocess.run(["ip", "-n", site.ns, "route", "del", "10.77.21.0/24"], check=True,
                       timeout=10)  # fmt: skip
        td.etcdctl(site, "put", f"{subnets}/10.77.22.0-24", vxlan_lease(22))
        d.wait_for("C", lambda: "10.77.22.0/24" in flannel_routes(site))
        assert "10.77.21.0/24" not in flannel_routes(site)
        assert count(d, "change") > changes
        assert "reconciled 3 peers (1 changed)" in d.tail()

        # The periodic full pass puts B's route back.
        d.wait_for("B repaired", lambda: "10.77.21.0/24" in flannel_routes(site),
                   timeout=2 * RESYNC + 5)  # fmt: skip

        # A lease removed: its three entries go with the event.
        td.etcdctl(site, "del", f"{subnets}/10.77.20.0-24")
        d.wait_for("A gone", lambda: "10.77.20.0/24" not in flannel_routes(site))
        state = kernel_entries(site)
        assert state == {
            "neigh": {"10.77.21.0", "10.77.22.0"},
            "fdb": {("0a:00:00:00:00:15", "192.0.2.21"), ("0a:00:00:00:00:16", "192.0.2.22")},
            "routes": {"10.77.21.0/24", "10.77.22.0/24"},
        }
        assert d.stop() == 0
    finally:
        d.kill()


def test_full_reconcile_env_makes_every_event_a_full_pass(
    site: td.Site, etcd_prefix: str, daemon_factory: object
) -> None:
    assert callable(daemon_factory)
    td.etcdctl(site, "put", f"{etcd_prefix}/config", VXLAN_CONFIG)
    d: td.Daemon = daemon_factory("--resync-period", "60")
    d.env[FULL_RECONCILE_ENV] = "1"
    try:
        d.start()
        d.wait_ready()
        full = count(d, "full")
        td.etcdctl(site, "put", f"{etcd_prefix}/subnets/10.77.30.0-24", vxlan_lease(30))
        d.wait_for("the route", lambda: "10.77.30.0/24" in flannel_routes(site))
        d.wait_for("a full pass for the event", lambda: count(d, "full") > full)
        assert count(d, "change") == 0
        assert f"{FULL_RECONCILE_ENV} is set" in d.tail()
        assert d.stop() == 0
    finally:
        d.kill()
