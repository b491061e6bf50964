"""overlayd picks the traffic rules from the network config and keeps them: the real binary in
a namespace (fixtures of tests/test_daemon.py), EnableNFTables true, then false again.

nftables mode: the table flannel-ipv4 with our lease, no iptables chains, a blackhole route
for the lease (--ip-blackhole-route); the table deleted by hand comes back with the resync.
Back to iptables mode (restart with EnableNFTables false): the table is gone, the forward chain
is there without --ip-masq (default on) and no nat chain.
"""

from __future__ import annotations

import json
import subprocess
from ipaddress import IPv4Interface
from pathlib import Path

import pytest

from tests.test_daemon import NETWORK, Daemon, Site, daemon_factory, etcdctl, site

pytestmark = [pytest.mark.root, pytest.mark.slow]
__all__ = ["daemon_factory", "site"]  # fixtures used here


def in_ns(site: Site, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", site.ns, *argv], check=True,
                          capture_output=True, text=True, timeout=10).stdout  # fmt: skip


def our_chains(site: Site) -> str:
    return "\n".join(line for table in ("nat", "filter")
                     for line in in_ns(site, "iptables", "-w", "5", "-t", table, "-S").splitlines()
                     if "FLANNEL" in line)  # fmt: skip


def nft_table(site: Site) -> str:
    out = subprocess.run(["ip", "netns", "exec", site.ns, "nft", "list", "table", "ip",
                          "flannel-ipv4"], capture_output=True, text=True, timeout=10)  # fmt: skip
    return out.stdout if out.returncode == 0 else ""


def config(nft: bool) -> str:
    return json.dumps({"Network": NETWORK, "Backend": {"Type": "alloc"}, "EnableNFTables": nft})


def test_nftables_mode_from_the_config_and_back_to_iptables(
    site: Site, etcd_prefix: str, daemon_factory: object, tmp_path: Path
) -> None:
    assert callable(daemon_factory)
    etcdctl(site, "put", f"{etcd_prefix}/config", config(True))
    d: Daemon = daemon_factory("--ip-masq", "--iptables-resync", "1", "--ip-blackhole-route")
    try:
        d.start()
        d.wait_ready()
        env = dict(line.split("=", 1) for line in (tmp_path / "run" / "subnet.env")
                   .read_text().splitlines())  # fmt: skip
        subnet = IPv4Interface(env["FLANNEL_SUBNET"]).network
        table = nft_table(site)
        assert f"ip saddr {subnet} ip daddr {NETWORK} return" in table
        assert "chain forward" in table and "masquerade fully-random" in table
        assert our_chains(site) == ""
        routes = json.loads(in_ns(site, "ip", "-j", "route", "show", "exact", str(subnet)))
        assert [r.get("type") for r in routes] == ["blackhole"]

        in_ns(site, "nft", "delete", "table", "ip", "flannel-ipv4")
        repaired = "nftables rules were missing or changed; restored them"
        d.wait_for("nft repair", lambda: repaired in d.log.read_text(errors="replace"))
        assert f"ip saddr {subnet} ip daddr {NETWORK} return" in nft_table(site)
        assert d.metric("overlay_masq_repairs_total") == "overlay_masq_repairs_total 1"
        assert d.stop() == 0
        assert nft_table(site) != ""  # left in place on exit, like routes

        # EnableNFTables back to false, --ip-masq off: the table goes, the forward chain
        # (default on) comes, no nat chain.
        etcdctl(site, "put", f"{etcd_prefix}/config", config(False))
        d.args = [a for a in d.args if a != "--ip-masq"]
        d.start()
        d.wait_ready()
        assert nft_table(site) == ""
        chains = our_chains(site)
        assert "-N FLANNEL-FWD" in chains and "FLANNEL-POSTRTG" not in chains
        assert f"-A FLANNEL-FWD -s {NETWORK}" in chains
        assert d.stop() == 0
    finally:
        d.kill()
        cleanup = "nft delete table ip flannel-ipv4; iptables -F FLANNEL-FWD; " \
                  "iptables -D FORWARD -m comment --comment 'flanneld forward' -j FLANNEL-FWD; " \
                  "iptables -X FLANNEL-FWD; ip route flush type blackhole"  # fmt: skip
        subprocess.run(["ip", "netns", "exec", site.ns, "sh", "-c", cleanup],
                       capture_output=True, timeout=20)  # fmt: skip
