"""Incremental reconcile of the vxlan backend (`reconcile(peers, changed)`) against the kernel.

An incremental pass reads and fixes only the entries of the changed subnets, with the same rules
as a full pass; entries of other subnets stay as they are, even when wrong, until the next full
pass. Real devices in throwaway namespaces; assertions with `ip -j` / `bridge -j`.
"""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from backends.vxlan import VxlanBackend
from subnetmgr.model import Lease, Subnet
from tests.netns import netns_lab
from tests.test_vxlan_kernel import (
    PEER_A,
    PEER_B,
    Host,
    closing_backends,
    config,
    expected,
    kernel_state,
    lease,
    lease_of,
    peers,
    started,
    underlay_host,
)

pytestmark = pytest.mark.root

PEER_C = ("10.5.4.0/24", "0a:00:00:00:00:04", "192.168.90.4")
PEER_D = ("10.5.5.0/24", "0a:00:00:00:00:05", "192.168.77.5")


lab = pytest.fixture(netns_lab, name="lab")
host = pytest.fixture(underlay_host, name="host")
backends = pytest.fixture(closing_backends, name="backends")


def subnet(entry: tuple[str, str, str]) -> Subnet:
    return IPv4Network(entry[0])


async def test_changed_adds_removes_and_replaces_only_those(
    host: Host, backends: list[VxlanBackend]
) -> None:
    b = await started(host, backends)
    await b.reconcile(peers(lease_of(PEER_A), lease_of(PEER_B), lease_of(PEER_C)))
    assert b.last.full
    ns = host.ns
    # PEER_B's entries go wrong by hand: not one of the changed subnets, so left alone.
    ns.ip("neigh", "del", "10.5.3.0", "dev", "flannel.1")
    ns.ip("route", "del", "10.5.3.0/24")
    broken = kernel_state(ns)

    moved_c = (PEER_C[0], "0a:00:00:00:00:44", "192.168.77.44")
    now = peers(lease_of(PEER_B), lease_of(moved_c), lease_of(PEER_D))  # A gone, C moved, D new
    changed = {subnet(PEER_A), subnet(PEER_C), subnet(PEER_D)}
    await b.reconcile(now, changed)
    assert not b.last.full and b.last.failed == 0
    state = kernel_state(ns)
    # Exactly A's three entries removed, C's three replaced, D's three added...
    want = expected(moved_c, PEER_D)
    for kind in ("neigh", "fdb", "routes"):
        b_entries = [e for e in broken[kind] if "10.5.3.0" in str(e) or "192.168.77.3" in str(e)]
        assert sorted(want[kind] + b_entries) == state[kind], kind
    # ...and B still broken (no neighbour, no route): the incremental pass did not look at it.
    assert not any(n[0] == "10.5.3.0" for n in state["neigh"])
    assert not any(r[0] == "10.5.3.0/24" for r in state["routes"])

    # The next full pass repairs B, and finds nothing else to do: for the changed subnets the
    # incremental pass left what a full pass would have.
    await b.reconcile(now)
    assert b.last.full
    assert b.last.applied == 2  # B's neighbour and route
    assert kernel_state(ns) == expected(PEER_B, moved_c, PEER_D)


async def test_an_event_reads_only_its_entries(host: Host, backends: list[VxlanBackend]) -> None:
    b = await started(host, backends)

    def many(n: int) -> dict[Subnet, Lease]:
        return {
            le.subnet: le
            for i in range(n)
            for le in [
                lease(f"10.5.{10 + i}.0/24", f"192.168.77.{i + 10}", f"0a:00:00:01:00:{i:02x}")
            ]
        }

    present = many(200)
    await b.reconcile(present)
    assert b.last.full and b.last.applied == 600
    await b.reconcile({**present, **peers(lease_of(PEER_A))}, {subnet(PEER_A)})
    assert not b.last.full
    assert b.last.applied == 3
    # A route lookup, a neighbour and an FDB entry (and a second look after nothing): not 600.
    assert b.last.reads <= 4
    await b.reconcile(present, {subnet(PEER_A)})
    assert b.last.applied == 3 and b.last.reads <= 8
    state = kernel_state(host.ns)
    assert [len(state[k]) for k in ("neigh", "fdb", "routes")] == [200, 200, 200]
    # Nothing changed is nothing to do.
    await b.reconcile(present, {subnet(PEER_A), IPv4Network("10.5.10.0/24")})
    assert b.last.applied == 0 and not b.last.full


async def test_shared_vtep_survives_the_removal_of_one_lease(
    host: Host, backends: list[VxlanBackend]
) -> None:
    """A host that re-acquired another subnet keeps its VtepMAC and PublicIP while its old
    lease lives on: removing the old lease must keep the FDB entry the new one needs."""
    b = await started(host, backends)
    old = lease_of(PEER_A)
    new = lease("10.5.8.0/24", PEER_A[2], PEER_A[1])
    await b.reconcile(peers(old))
    await b.reconcile(peers(old, new), {new.subnet})
    await b.reconcile(peers(new), {old.subnet})
    assert kernel_state(host.ns) == expected(("10.5.8.0/24", PEER_A[1], PEER_A[2]))
    await b.reconcile(peers(new))
    assert b.last.applied == 0


async def test_removal_finds_routes_hidden_behind_the_first(
    host: Host, backends: list[VxlanBackend]
) -> None:
    """A route lookup shows one route per destination; after deleting it the pass looks again,
    so a stale second route (another metric) goes too, as in a full pass."""
    b = await started(host, backends)
    await b.reconcile(peers(lease_of(PEER_A), lease_of(PEER_B)))
    host.ns.ip("route", "add", "10.5.2.0/24", "via", "10.5.2.0", "dev", "flannel.1", "onlink",
               "metric", "100")  # fmt: skip
    host.ns.run("bridge", "fdb", "append", PEER_A[1], "dst", "192.168.90.66", "self",
                "permanent", "dev", "flannel.1")  # fmt: skip
    await b.reconcile(peers(lease_of(PEER_B)), {subnet(PEER_A)})
    assert kernel_state(host.ns) == expected(PEER_B)
    assert b.last.failed == 0


async def test_changed_from_the_start_and_after_a_lost_device_is_a_full_pass(
    host: Host, backends: list[VxlanBackend]
) -> None:
    b = await started(host, backends)
    # Entries left by someone else for a subnet not in `changed`: a first pass is always full.
    host.ns.ip("route", "add", "10.5.9.0/24", "via", "10.5.9.0", "dev", "flannel.1", "onlink")
    await b.reconcile(peers(lease_of(PEER_A)), {subnet(PEER_A)})
    assert b.last.full
    assert kernel_state(host.ns) == expected(PEER_A)
    host.ns.ip("link", "del", "flannel.1")
    await b.reconcile(peers(lease_of(PEER_A), lease_of(PEER_B)), {subnet(PEER_B)})
    assert b.last.full and b.last.device_created
    assert kernel_state(host.ns) == expected(PEER_A, PEER_B)
    await b.reconcile(peers(lease_of(PEER_B)), {subnet(PEER_A)})
    assert not b.last.full
    assert kernel_state(host.ns) == expected(PEER_B)


async def test_direct_routing_incremental(host: Host, backends: list[VxlanBackend]) -> None:
    b = await started(host, backends, config(DirectRouting=True))
    await b.reconcile(peers(lease_of(PEER_B)))
    # PEER_B's host moves onto the external interface's /24: only a route via its PublicIP.
    moved = (PEER_B[0], PEER_B[1], "192.168.90.3")
    await b.reconcile(peers(lease_of(moved)), {subnet(PEER_B)})
    assert not b.last.full
    assert kernel_state(host.ns) == expected()
    assert host.ns.ip_json("route", "show", PEER_B[0]) == [
        {"dst": PEER_B[0], "gateway": "192.168.90.3", "dev": host.ext.name, "flags": []}
    ]
    # ...and away again: back onto flannel.1, the direct route gone.
    await b.reconcile(peers(lease_of(PEER_B)), {subnet(PEER_B)})
    assert kernel_state(host.ns) == expected(PEER_B)
    assert [r["dev"] for r in host.ns.ip_json("route", "show", PEER_B[0])] == ["flannel.1"]
    await b.reconcile(peers(), {subnet(PEER_B)})
    assert kernel_state(host.ns) == expected()
    assert host.ns.ip_json("route", "show", PEER_B[0]) == []
