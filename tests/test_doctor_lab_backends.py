"""`overlayctl doctor` and `status` on udp and host-gw labs. udp: the peer probe goes through
flannel0 and the packet loops (udp 8285), and a DROP of udp 8285 on a peer fails exactly that
peer's line. host-gw: no device, routes via each PublicIP, the probe on the underlay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest

from integration.lab import Lab
from tests.labtools import running_lab
from tests.test_doctor_lab import doctor, failed, overlayctl, peer_name, sh

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab(tmp_path_factory, "u", "udp", "5")


@pytest.fixture(scope="module")
def hostgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab(tmp_path_factory, "g", "host-gw", "5")


def test_udp_lab_healthy_then_a_peer_drops_8285(lab: Lab) -> None:
    rc, checks = doctor(lab)
    assert failed(checks) == {} and rc == 0
    assert "tx_checksum" not in checks  # a vxlan matter only
    assert checks["mtu"][0]["message"] == "eth0 1500, flannel0 1472, subnet.env 1472"
    net2 = IPv4Network(lab.node(2).subnet)
    assert checks[peer_name(lab, 2)][0]["message"].startswith(
        f"{lab.node(2).ip}: {net2.network_address} answered an ICMP echo through flannel0 "
        "(udp 8285) in "
    )
    rule = ["INPUT", "-p", "udp", "--dport", "8285", "-j", "DROP"]
    sh(lab.node(2).ns, "iptables", "-I", *rule)
    try:
        rc, checks = doctor(lab)
    finally:
        sh(lab.node(2).ns, "iptables", "-D", *rule)
    assert rc == 1
    assert set(failed(checks)) == {peer_name(lab, 2)}
    assert "iptables -I INPUT -p udp --dport 8285 -j ACCEPT" in checks[peer_name(lab, 2)][0]["fix"]


def test_udp_lab_status(lab: Lab) -> None:
    rc, out, err = overlayctl(lab, 1, "status", "--json")
    assert rc == 0, out + err
    doc = json.loads(out)
    assert doc["backend"] == "udp"
    assert doc["device"]["name"] == "flannel0" and doc["device"]["up"]
    assert doc["device"]["mtu"] == 1472
    assert doc["peers"]["leases"] == 2 and doc["peers"]["programmed"] == 2
    assert doc["peers"]["kernel_routes"] == 1  # one route for the whole network via flannel0


def test_hostgw_lab(hostgw: Lab) -> None:
    rc, checks = doctor(hostgw)
    assert failed(checks) == {} and rc == 0
    assert checks["mtu"][0]["message"] == "eth0 1500, subnet.env 1500"
    assert checks[peer_name(hostgw, 2)][0]["message"].startswith(
        f"{hostgw.node(2).ip}: {hostgw.node(2).ip} answered an ICMP echo on the underlay "
        "(host-gw has no encapsulation) in "
    )
    rc, out, err = overlayctl(hostgw, 1, "status", "--json")
    assert rc == 0, out + err
    doc = json.loads(out)
    assert doc["backend"] == "host-gw" and doc["device"] is None
    assert doc["peers"]["leases"] == 2 and doc["peers"]["kernel_routes"] == 2
    assert doc["peers"]["missing"] == []
    # A peer route deleted by hand (overlayd stopped, so that no pass repairs it): a problem.
    sub2 = hostgw.node(2).subnet
    asyncio.run(hostgw.stop_daemon(1))
    try:
        sh(hostgw.node(1).ns, "ip", "route", "del", str(sub2))
        rc, out, _ = overlayctl(hostgw, 1, "status", "--json")
    finally:
        asyncio.run(hostgw.start_daemon(1))
    doc = json.loads(out)
    assert rc == 1 and doc["peers"]["missing"] == [sub2]
    assert f"1 peer subnet(s) without a route: {sub2}" in doc["problems"]
    assert doc["peers"]["kernel_routes"] == 1
