"""overlayd with EnableIPv6, the real binary in a namespace (tests/test_daemon.py's site): the
dual-stack lease, subnet.env's FLANNEL_IPV6_*, both previous subnets reused from subnet.env,
and the clear refusals (no IPv6 address, the udp backend)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_daemon import Daemon, Site, daemon_factory, etcdctl, leases, site

pytestmark = [pytest.mark.root, pytest.mark.slow]

__all__ = ["daemon_factory", "site"]  # fixtures, imported for pytest

NETWORK6 = "fd77:1::/48"


def dual_config(backend: str) -> str:
    return json.dumps(
        {
            "Network": "10.77.0.0/16",
            "EnableIPv6": True,
            "IPv6Network": NETWORK6,
            "Backend": {"Type": backend},
        }
    )


def test_dual_stack_lease_subnet_env_and_previous_subnets(
    site: Site, etcd_prefix: str, daemon_factory: object, tmp_path: Path
) -> None:
    assert callable(daemon_factory)
    etcdctl(site, "put", f"{etcd_prefix}/config", dual_config("alloc"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "subnet.env").write_text(
        "FLANNEL_NETWORK=10.77.0.0/16\nFLANNEL_SUBNET=10.77.201.1/24\n"
        f"FLANNEL_IPV6_NETWORK={NETWORK6}\nFLANNEL_IPV6_SUBNET=fd77:1:0:c9::1/64\n"
        "FLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n"
    )
    d: Daemon = daemon_factory("--public-ipv6", "fd77:99::2")
    d.start()
    d.wait_ready()
    # Both previous subnets from subnet.env, in flannel's dual-stack key.
    held = leases(site, etcd_prefix)
    assert list(held) == ["10.77.201.0-24&fd77:1:0:c9::-64"]
    value = json.loads(held["10.77.201.0-24&fd77:1:0:c9::-64"])
    assert value == {
        "PublicIP": site.node_ip,
        "PublicIPv6": "fd77:99::2",
        "BackendType": "alloc",
    }
    env = (run / "subnet.env").read_text()
    assert f"FLANNEL_IPV6_NETWORK={NETWORK6}\n" in env
    assert "FLANNEL_IPV6_SUBNET=fd77:1:0:c9::1/64\n" in env
    assert d.stop() == 0
    # A restart finds its dual-stack lease again (own lease, by PublicIP).
    again: Daemon = daemon_factory("--public-ipv6", "fd77:99::2")
    again.start()
    again.wait_ready()
    assert list(leases(site, etcd_prefix)) == ["10.77.201.0-24&fd77:1:0:c9::-64"]
    assert again.stop() == 0


def test_enable_ipv6_without_an_ipv6_address_exits_1_naming_the_fix(
    site: Site, etcd_prefix: str, daemon_factory: object
) -> None:
    assert callable(daemon_factory)
    etcdctl(site, "put", f"{etcd_prefix}/config", dual_config("alloc"))
    d: Daemon = daemon_factory()  # eth0 of the site has no global IPv6 address
    d.start()
    assert d.proc is not None
    assert d.proc.wait(timeout=30) == 1
    d.proc = None
    assert "EnableIPv6, but interface eth0 has no global IPv6 address" in d.tail()
    assert "--public-ipv6 (FLANNELD_PUBLIC_IPV6)" in d.tail()
    assert leases(site, etcd_prefix) == {}


def test_udp_with_enable_ipv6_exits_1_naming_the_option(
    site: Site, etcd_prefix: str, daemon_factory: object
) -> None:
    assert callable(daemon_factory)
    etcdctl(site, "put", f"{etcd_prefix}/config", dual_config("udp"))
    d: Daemon = daemon_factory("--public-ipv6", "fd77:99::2")
    d.start()
    assert d.proc is not None
    assert d.proc.wait(timeout=30) == 1
    d.proc = None
    assert "udp backend carries IPv4 only" in d.tail() and "EnableIPv6" in d.tail()
    assert leases(site, etcd_prefix) == {}
