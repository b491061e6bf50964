"""Switching a running cluster's backend, as docs/daemon.md ("Switching backends") tells an
operator to (issue 12, the operator's path): a 3-host namespace lab on udp with real daemons
and real traffic; the config changed to vxlan is logged by the running daemons and applied by
their restarts; flannel0 and its network route are left behind, as documented, until
`ip link del flannel0`; full connectivity all along the documented steps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from integration.lab import Lab
from integration.netns import ip_json, run
from tests.labtools import assert_full_connectivity, eventually, running_lab

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def udp_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab(tmp_path_factory, "w", "udp", "1")


async def test_udp_to_vxlan_leaves_flannel0_until_removed(udp_lab: Lab) -> None:
    lab = udp_lab
    hosts = [n.index for n in lab.state.nodes]
    await assert_full_connectivity(lab)
    key = f"{lab.state.prefix}/config"
    config = json.loads(await lab.etcdctl("get", "--print-value-only", key))
    network = config["Network"]
    config["Backend"] = {"Type": "vxlan"}
    await lab.etcdctl("put", key, json.dumps(config))

    async def logged() -> bool:
        logs = [await lab.daemon_log(i) for i in hosts]
        return all("applies when overlayd restarts" in log for log in logs)

    await eventually(logged, "every daemon logged the config change")

    for i in hosts:  # step 2: restart every host
        await lab.stop_daemon(i)
        await lab.start_daemon(i)
    await assert_full_connectivity(lab)
    leases = await lab.etcdctl(
        "get", "--prefix", "--print-value-only", f"{lab.state.prefix}/subnets/"
    )
    assert leases.count('"BackendType":"vxlan"') == len(hosts)

    for i in hosts:  # what the old backend left: flannel0 and its route for the network
        ns = lab.host_ns(i)
        links = {link["ifname"] for link in await ip_json("-n", ns, "link", "show")}
        assert {"flannel0", "flannel.1"} <= links
        routes = await ip_json("-n", ns, "route", "show", "dev", "flannel0")
        assert [r["dst"] for r in routes] == [network]

    for i in hosts:  # step 3: remove it, as documented
        await run("ip", "-n", lab.host_ns(i), "link", "del", "flannel0")
        routes = await ip_json("-n", lab.host_ns(i), "route", "show", "match", network)
        assert all(r.get("dev") != "flannel0" for r in routes)
    await assert_full_connectivity(lab)


@pytest.fixture
def vxlan_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab(tmp_path_factory, "x", "vxlan", "1")


async def test_vxlan_to_host_gw_waits_for_flannel1_to_go(vxlan_lab: Lab) -> None:
    lab = vxlan_lab
    hosts = [n.index for n in lab.state.nodes]
    key = f"{lab.state.prefix}/config"
    config = json.loads(await lab.etcdctl("get", "--print-value-only", key))
    config["Backend"] = {"Type": "host-gw"}
    await lab.etcdctl("put", key, json.dumps(config))
    for i in hosts:
        await lab.stop_daemon(i)
        await lab.start_daemon(i)
    # flannel.1 stays, with its routes to the peers that were still on vxlan when this host
    # restarted (a vxlan daemon still running removed its routes to hosts already switched);
    # host-gw leaves those subnets alone ("not ours"). The first host restarted: no host-gw
    # route at all (the last one may or may not keep some: a race with its last vxlan pass).
    stale: dict[int, set[str]] = {}
    for i in hosts:
        ns = lab.host_ns(i)
        assert "flannel.1" in {link["ifname"] for link in await ip_json("-n", ns, "link", "show")}
        stale[i] = {r["dst"] for r in await ip_json("-n", ns, "route", "show", "dev", "flannel.1")}
        ours = {r["dst"] for r in await ip_json("-n", ns, "route", "show", "proto", "77")}
        peers = {str(n.subnet) for n in lab.state.nodes if n.index != i}
        assert stale[i] | ours == peers and not stale[i] & ours, (i, stale[i], ours)
    assert len(stale[hosts[0]]) == len(hosts) - 1  # restarted first: every peer still vxlan
    for i in hosts:  # step 3, as documented
        await run("ip", "-n", lab.host_ns(i), "link", "del", "flannel.1")

    async def host_gw_routes() -> bool:
        counts = [len(await ip_json("-n", lab.host_ns(i), "route", "show", "proto", "77"))
                  for i in hosts]  # fmt: skip
        return counts == [len(hosts) - 1] * len(hosts)

    await eventually(host_gw_routes, "host-gw routes to every peer after flannel.1 went", 30)
    await assert_full_connectivity(lab)
