"""The vxlan backend against the real kernel, in throwaway namespaces; asserts with `ip -j`."""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from backends.base import BackendError, ExternalInterface
from backends.vxlan import VxlanBackend
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig, Subnet
from tests.netns import Netns, NetnsLab, netns_lab

pytestmark = pytest.mark.root

NETWORK = "10.5.0.0/16"
OWN = IPv4Network("10.5.1.0/24")
HOST_IP = IPv4Address("192.168.90.1")


@dataclass
class Host:
    ns: Netns
    ext: ExternalInterface


def underlay_host(lab: NetnsLab) -> Host:
    """A host namespace whose external interface is a veth (192.168.90.1/24) to an underlay ns."""
    h = lab.netns("h")
    u = lab.netns("u")
    veth, _ = lab.veth(h, u, f"{HOST_IP}/24", "192.168.90.254/24")
    ext = ExternalInterface(veth, h.ifindex(veth), HOST_IP, HOST_IP, 1500)
    return Host(h, ext)


async def closing_backends() -> AsyncIterator[list[VxlanBackend]]:
    """For a fixture: backends made by a test; closed (sockets only, kernel state stays) at the
    end."""
    made: list[VxlanBackend] = []
    try:
        yield made
    finally:
        for b in made:
            await b.close()


lab = pytest.fixture(netns_lab, name="lab")
host = pytest.fixture(underlay_host, name="host")
backends = pytest.fixture(closing_backends, name="backends")


def config(**backend: Any) -> NetworkConfig:
    return NetworkConfig.from_dict({"Network": NETWORK, "Backend": {"Type": "vxlan", **backend}})


def lease(subnet: str | IPv4Network, ip: str, mac: str | None, btype: str = "vxlan") -> Lease:
    data = {"VNI": 1, "VtepMAC": mac} if mac is not None else None
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), None, btype, data))


def own_lease(mac: str) -> Lease:
    return lease(OWN, str(HOST_IP), mac)


def peers(*leases: Lease) -> dict[Subnet, Lease]:
    return {le.subnet: le for le in leases}


async def started(
    host: Host, backends: list[VxlanBackend], cfg: NetworkConfig | None = None
) -> VxlanBackend:
    b = VxlanBackend(cfg or config(), host.ext, netns=host.ns.name)
    backends.append(b)
    attrs = await b.prepare()
    await b.start(own_lease(attrs.backend_data["VtepMAC"]))  # type: ignore[index]
    return b


def kernel_state(ns: Netns, dev: str = "flannel.1") -> dict[str, Any]:
    """What `ip -j`/`bridge -j` show for the device: neighbours, FDB and routes, sorted."""
    return {
        "neigh": sorted(
            (n["dst"], n.get("lladdr"), tuple(n["state"]))
            for n in ns.ip_json("neigh", "show", "dev", dev)
        ),
        "fdb": sorted(
            (f["mac"], f.get("dst"), tuple(f.get("flags", [])), f.get("state"))
            for f in ns.bridge_json("fdb", "show", "dev", dev)
        ),
        "routes": sorted(
            (r["dst"], r.get("gateway"), tuple(r.get("flags", [])))
            for r in ns.ip_json("route", "show", "dev", dev)
        ),
    }


def expected(*entries: tuple[str, str, str]) -> dict[str, Any]:
    """FLANNEL-COMPAT.md's three entries per (subnet, VtepMAC, PublicIP)."""
    out: dict[str, Any] = {"neigh": [], "fdb": [], "routes": []}
    for subnet, mac, ip in entries:
        net = IPv4Network(subnet)
        out["neigh"].append((str(net.network_address), mac, ("PERMANENT",)))
        out["fdb"].append((mac, ip, ("self",), "permanent"))
        out["routes"].append((str(net), str(net.network_address), ("onlink",)))
    return {k: sorted(v) for k, v in out.items()}


PEER_A = ("10.5.2.0/24", "0a:00:00:00:00:02", "192.168.90.2")
PEER_B = ("10.5.3.0/24", "0a:00:00:00:00:03", "192.168.77.3")


def lease_of(entry: tuple[str, str, str]) -> Lease:
    subnet, mac, ip = entry
    return lease(subnet, ip, mac)


# --------------------------------------------------------------------------- device


async def test_device_created_with_flannel_attributes(
    host: Host, backends: list[VxlanBackend]
) -> None:
    b = VxlanBackend(config(), host.ext, netns=host.ns.name)
    backends.append(b)
    attrs = await b.prepare()
    assert attrs.backend_type == "vxlan"
    assert attrs.backend_data is not None
    mac = attrs.backend_data["VtepMAC"]
    assert dict(attrs.backend_data) == {"VNI": 1, "VtepMAC": mac}
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01, "locally administered unicast"

    mtu = await b.start(own_lease(mac))
    assert mtu == 1450

    (link,) = host.ns.ip_json("-d", "link", "show", "flannel.1")
    assert link["address"] == mac
    assert link["mtu"] == 1450
    assert "UP" in link["flags"]
    info = link["linkinfo"]
    assert info["info_kind"] == "vxlan"
    data = info["info_data"]
    assert data["id"] == 1
    assert data["local"] == str(HOST_IP)
    assert data["link"] == host.ext.name
    assert data["port"] == 8472
    assert data["learning"] is False
    addrs = host.ns.ip_json("-4", "addr", "show", "dev", "flannel.1")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs] == [("10.5.1.0", 32)]


async def test_options_reach_the_device(host: Host, backends: list[VxlanBackend]) -> None:
    # Backend.MTU is the underlay MTU, as in flannel: the device gets 50 less.
    cfg = config(VNI=7, Port=4789, Learning=True, GBP=True, MTU=1350)
    b = VxlanBackend(cfg, host.ext, netns=host.ns.name)
    backends.append(b)
    attrs = await b.prepare()
    assert attrs.backend_data is not None and attrs.backend_data["VNI"] == 7
    assert await b.start(own_lease(attrs.backend_data["VtepMAC"])) == 1300
    (link,) = host.ns.ip_json("-d", "link", "show", "flannel.7")
    data = link["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data["learning"], link["mtu"]) == (7, 4789, True, 1300)
    assert data.get("gbp") is True


async def test_mtu_follows_the_external_interface(
    lab: NetnsLab, backends: list[VxlanBackend]
) -> None:
    h, u = lab.netns("h"), lab.netns("u")
    veth, _ = lab.veth(h, u, f"{HOST_IP}/24", "192.168.90.254/24", mtu=9000)
    ext = ExternalInterface(veth, h.ifindex(veth), HOST_IP, HOST_IP, 9000)
    b = VxlanBackend(config(), ext, netns=h.name)
    backends.append(b)
    attrs = await b.prepare()
    assert await b.start(own_lease(attrs.backend_data["VtepMAC"])) == 8950  # type: ignore[index]
    assert h.ip_json("link", "show", "flannel.1")[0]["mtu"] == 8950
    with pytest.raises(BackendError, match=r"MTU 18 .*below 68"):
        VxlanBackend(
            config(), ExternalInterface(veth, ext.index, HOST_IP, HOST_IP, 68), netns=h.name
        )


async def test_tx_checksum_offload_option(host: Host, backends: list[VxlanBackend]) -> None:
    def tx_csum(dev: str) -> str:
        out = host.ns.run("ethtool", "-k", dev)
        line = next(x for x in out.splitlines() if "tx-checksum-ip-generic:" in x)
        return line.split(":")[1].split()[0]

    await started(host, backends, config(VNI=1))
    assert tx_csum("flannel.1") == "on"  # the kernel's default: the option really changes it
    await started(host, backends, config(VNI=2, DisableTxChecksumOffload=True))
    assert tx_csum("flannel.2") == "off"


async def test_missing_namespace_is_a_clear_error(host: Host) -> None:
    b = VxlanBackend(config(), host.ext, netns="no-such-ns-x1")
    try:
        with pytest.raises(BackendError, match="no-such-ns-x1"):
            await b.prepare()
    finally:
        await b.close()


# --------------------------------------------------------------------------- peers


async def test_peers_programmed_as_flannel_does(host: Host, backends: list[VxlanBackend]) -> None:
    b = await started(host, backends)
    await b.reconcile(
        peers(
            lease_of(PEER_A),
            lease_of(PEER_B),
            lease("10.5.4.0/24", "192.168.90.4", None, "host-gw"),
            lease("10.5.5.0/24", "192.168.90.5", None, ""),  # flannel's udp writes no type
            lease("10.5.6.0/24", "192.168.90.6", "zz:not:a:mac"),  # logged and skipped
        )
    )
    assert kernel_state(host.ns) == expected(PEER_A, PEER_B)
    # Nothing for the ignored leases anywhere in the namespace.
    all_routes = {r["dst"] for r in host.ns.ip_json("route", "show")}
    assert not {"10.5.4.0/24", "10.5.5.0/24", "10.5.6.0/24"} & all_routes
    assert b.last.peers == 2 and b.last.failed == 0

    # Idempotent: a second pass changes nothing.
    await b.reconcile(peers(lease_of(PEER_A), lease_of(PEER_B)))
    assert b.last.applied == 0
    assert kernel_state(host.ns) == expected(PEER_A, PEER_B)


async def test_peer_removal_deletes_all_three(host: Host, backends: list[VxlanBackend]) -> None:
    b = await started(host, backends)
    await b.reconcile(peers(lease_of(PEER_A), lease_of(PEER_B)))
    await b.reconcile(peers(lease_of(PEER_B)))
    assert kernel_state(host.ns) == expected(PEER_B)
    await b.reconcile({})
    assert kernel_state(host.ns) == expected()


async def test_changed_mac_and_public_ip_replace_the_entries(
    host: Host, backends: list[VxlanBackend]
) -> None:
    b = await started(host, backends)
    await b.reconcile(peers(lease_of(PEER_A)))
    moved = (PEER_A[0], "0a:00:00:00:00:99", "192.168.90.99")
    await b.reconcile(peers(lease_of(moved)))
    assert kernel_state(host.ns) == expected(moved)


async def test_hand_deleted_and_stale_entries_are_repaired(
    host: Host, backends: list[VxlanBackend]
) -> None:
    b = await started(host, backends)
    await b.reconcile(peers(lease_of(PEER_A), lease_of(PEER_B)))
    ns = host.ns
    ns.ip("neigh", "del", "10.5.2.0", "dev", "flannel.1")
    ns.run("bridge", "fdb", "del", "0a:00:00:00:00:03", "dst", "192.168.77.3", "dev", "flannel.1")
    ns.ip("route", "del", "10.5.3.0/24")
    # Wrong MAC by hand, and leftovers of a host that is gone.
    ns.ip("neigh", "replace", "10.5.3.0", "lladdr", "0a:bb:bb:bb:bb:bb", "nud", "permanent",
          "dev", "flannel.1")  # fmt: skip
    ns.ip("neigh", "add", "10.5.9.0", "lladdr", "0a:00:00:00:00:09", "nud", "permanent",
          "dev", "flannel.1")  # fmt: skip
    ns.run("bridge", "fdb", "append", "0a:00:00:00:00:09", "dst", "192.168.90.9", "self",
           "permanent", "dev", "flannel.1")  # fmt: skip
    ns.ip("route", "add", "10.5.9.0/24", "via", "10.5.9.0", "dev", "flannel.1", "onlink")
    assert kernel_state(ns) != expected(PEER_A, PEER_B)

    await b.reconcile(peers(lease_of(PEER_A), lease_of(PEER_B)))
    assert kernel_state(ns) == expected(PEER_A, PEER_B)
    assert b.last.failed == 0


async def test_deleted_device_is_recreated_with_the_same_mac(
    host: Host, backends: list[VxlanBackend]
) -> None:
    b = await started(host, backends)
    mac = b.mac
    await b.reconcile(peers(lease_of(PEER_A)))
    host.ns.ip("link", "del", "flannel.1")
    await b.reconcile(peers(lease_of(PEER_A)))
    assert b.last.device_created
    (link,) = host.ns.ip_json("link", "show", "flannel.1")
    assert link["address"] == mac and "UP" in link["flags"]
    addrs = host.ns.ip_json("-4", "addr", "show", "dev", "flannel.1")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs] == [("10.5.1.0", 32)]
    assert kernel_state(host.ns) == expected(PEER_A)


def _monitor_socket(ns: Netns) -> socket.socket:
    """A netlink socket in `ns` subscribed to neighbour (incl. FDB), route and link events."""
    from pyroute2 import netns as pr_netns

    sock: socket.socket = pr_netns.create_socket(
        ns.name, socket.AF_NETLINK, socket.SOCK_RAW, 0, flags=0
    )
    rtmgrp_link, rtmgrp_neigh, rtmgrp_ipv4_route = 0x1, 0x4, 0x40
    sock.bind((0, rtmgrp_link | rtmgrp_neigh | rtmgrp_ipv4_route))
    sock.setblocking(False)
    return sock


def _events(sock: socket.socket) -> list[int]:
    """Message types of every queued notification (RTM_NEWNEIGH=28, RTM_DELROUTE=25, ...)."""
    types: list[int] = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return types
        off = 0
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, off)
            types.append(kind)
            off += (length + 3) & ~3


async def test_restart_reuses_device_and_leaves_working_entries_alone(
    host: Host, backends: list[VxlanBackend]
) -> None:
    first = await started(host, backends)
    await first.reconcile(peers(lease_of(PEER_A), lease_of(PEER_B)))
    await first.close()
    index = host.ns.ifindex("flannel.1")

    monitor = _monitor_socket(host.ns)
    try:
        # A new daemon: new backend object, same config.
        second = VxlanBackend(config(), host.ext, netns=host.ns.name)
        backends.append(second)
        attrs = await second.prepare()
        assert attrs.backend_data is not None
        assert attrs.backend_data["VtepMAC"] == first.mac
        await second.start(own_lease(first.mac or ""))
        await second.reconcile(peers(lease_of(PEER_A), lease_of(PEER_B)))
        # The kernel applies netlink requests synchronously, so every notification the restart
        # caused is queued by now: there must be none (no link, neighbour, FDB or route change).
        assert _events(monitor) == []
        assert second.last.applied == 0
        # The control: the same socket does see a real change (a peer leaving).
        await second.reconcile(peers(lease_of(PEER_B)))
        seen = _events(monitor)
        rtm_delneigh, rtm_delroute = 29, 25
        assert seen.count(rtm_delneigh) == 2 and seen.count(rtm_delroute) == 1  # neigh+fdb, route
        await second.reconcile(peers(lease_of(PEER_A), lease_of(PEER_B)))
    finally:
        monitor.close()
    assert host.ns.ifindex("flannel.1") == index
    assert kernel_state(host.ns) == expected(PEER_A, PEER_B)


async def test_incompatible_device_is_replaced(host: Host, backends: list[VxlanBackend]) -> None:
    dev = host.ext.name
    host.ns.ip("link", "add", "flannel.1", "address", "0a:cc:cc:cc:cc:cc", "type", "vxlan",
               "id", "1", "local", str(HOST_IP), "dev", dev, "dstport", "4789")  # fmt: skip
    b = await started(host, backends)
    (link,) = host.ns.ip_json("-d", "link", "show", "flannel.1")
    assert link["linkinfo"]["info_data"]["port"] == 8472
    assert link["address"] == b.mac != "0a:cc:cc:cc:cc:cc"


async def test_direct_routing(host: Host, backends: list[VxlanBackend]) -> None:
    b = await started(host, backends, config(DirectRouting=True))
    # PEER_A's PublicIP is on the external interface's /24; PEER_B's is not.
    await b.reconcile(peers(lease_of(PEER_A), lease_of(PEER_B)))
    assert kernel_state(host.ns) == expected(PEER_B)
    direct = host.ns.ip_json("route", "show", "10.5.2.0/24")
    assert direct == [
        {"dst": "10.5.2.0/24", "gateway": "192.168.90.2", "dev": host.ext.name, "flags": []}
    ]
    # The same host without DirectRouting moves the route onto flannel.1.
    await b.close()
    plain = await started(host, backends)
    await plain.reconcile(peers(lease_of(PEER_A), lease_of(PEER_B)))
    assert kernel_state(host.ns) == expected(PEER_A, PEER_B)
    assert [r["dev"] for r in host.ns.ip_json("route", "show", "10.5.2.0/24")] == ["flannel.1"]
    # ...and back: the vxlan entries for PEER_A go away again.
    direct_again = await started(host, backends, config(DirectRouting=True))
    await direct_again.reconcile(peers(lease_of(PEER_A), lease_of(PEER_B)))
    assert kernel_state(host.ns) == expected(PEER_B)


async def test_errors_per_entry_are_logged_not_fatal(
    host: Host, backends: list[VxlanBackend], caplog: pytest.LogCaptureFixture
) -> None:
    b = await started(host, backends)
    # A gateway that is our own local address cannot be an onlink route's nexthop: the kernel
    # refuses this one entry; the others still go in.
    bad = lease("10.5.1.0/25", "192.168.90.7", "0a:00:00:00:00:07")
    await b.reconcile(peers(lease_of(PEER_A), bad))
    assert b.last.failed >= 1
    assert "10.5.1.0/25" in caplog.text
    state = kernel_state(host.ns)
    assert ("10.5.2.0/24", "10.5.2.0", ("onlink",)) in state["routes"]


async def test_thousands_of_peers_across_many_batches(
    host: Host, backends: list[VxlanBackend]
) -> None:
    b = await started(host, backends)

    def many(lo: int, hi: int) -> dict[Subnet, Lease]:
        out = {}
        for i in range(lo, hi):
            subnet = IPv4Network(f"10.5.{10 + i // 256}.{i % 256}/32")
            mac = f"0a:00:00:00:{i // 256:02x}:{i % 256:02x}"
            out[subnet] = lease(subnet, f"192.168.{100 + i // 256}.{i % 256}", mac)
        return out

    await b.reconcile(many(0, 2000))
    state = kernel_state(host.ns)
    assert [len(state[k]) for k in ("neigh", "fdb", "routes")] == [2000, 2000, 2000]
    assert ("10.5.17.207", "0a:00:00:00:07:cf", ("PERMANENT",)) in state["neigh"]
    assert b.last.failed == 0
    # Drop every other one: 3,000 deletions, the rest untouched.
    kept = {s: le for n, (s, le) in enumerate(many(0, 2000).items()) if n % 2 == 0}
    await b.reconcile(kept)
    assert b.last.applied == 3000
    state = kernel_state(host.ns)
    assert [len(state[k]) for k in ("neigh", "fdb", "routes")] == [1000, 1000, 1000]
    assert {r[0] for r in state["routes"]} == {
        str(s.network_address) for s in kept
    }  # /32: no suffix


async def test_compatible_device_keeps_mac_and_gets_mtu_and_learning_fixed(
    host: Host, backends: list[VxlanBackend]
) -> None:
    dev = host.ext.name
    host.ns.ip("link", "add", "flannel.1", "address", "0a:cc:cc:cc:cc:01", "mtu", "1300", "type",
               "vxlan", "id", "1", "local", str(HOST_IP), "dev", dev, "dstport", "8472",
               "learning")  # fmt: skip
    index = host.ns.ifindex("flannel.1")
    b = await started(host, backends)
    assert b.mac == "0a:cc:cc:cc:cc:01"
    (link,) = host.ns.ip_json("-d", "link", "show", "flannel.1")
    assert link["ifindex"] == index
    assert link["mtu"] == 1450 and "UP" in link["flags"]
    assert link["linkinfo"]["info_data"]["learning"] is False


def test_netns_lab_removes_namespaces_links_and_processes() -> None:
    with NetnsLab() as lab:
        a, b = lab.netns("alpha-long-role-name"), lab.netns("b")
        assert all(len(ns.name) <= 15 for ns in (a, b))
        va, vb = lab.veth(a, b, "192.168.95.1/24", "192.168.95.2/24")
        assert len(va) <= 15 and len(vb) <= 15
        assert b.ip_json("addr", "show", "dev", vb)[0]["addr_info"][0]["local"] == "192.168.95.2"
        sleeper = a.popen(["sleep", "600"])
        names = {a.name, b.name}
    assert sleeper.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert not names & {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
