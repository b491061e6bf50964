"""A host configured by hand exactly as flannel's vxlan or host-gw backend would configure it.

Nothing here uses overlay's own code: the lease value is written byte for byte in flannel's
format, and the data path is made with plain iproute2 commands (vxlan: flannel.1, then per remote
lease neighbour, FDB entry and onlink route, in flannel's order; host-gw: per remote lease one
route via its PublicIP on the external interface). The lab uses it to prove that an overlayd
host and a flannel host interoperate, and to test the lab without the daemon.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from integration.netns import run

VXLAN_PORT = 8472


def random_vtep_mac() -> str:
    """A random locally administered unicast MAC, as flannel makes for flannel.<VNI>."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def flannel_vxlan_lease_value(public_ip: IPv4Address, vtep_mac: str, vni: int = 1) -> str:
    """The lease value flannel v0.28 writes for a vxlan host, spelled out literally."""
    return (
        f'{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan",'
        f'"BackendData":{{"VNI":{vni},"VtepMAC":"{vtep_mac}"}}}}'
    )


def flannel_hostgw_lease_value(public_ip: IPv4Address) -> str:
    """The lease value flannel v0.28 writes for a host-gw host (no BackendData)."""
    return f'{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"host-gw"}}'


async def enable_forwarding(ns: str) -> None:
    """The host routes its containers' traffic (flannel's hosts have ip_forward on)."""
    await run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=ns)


async def add_hostgw_peer(ns: str, iface: str, subnet: IPv4Network, public_ip: IPv4Address) -> None:
    """flannel's host-gw route for one remote lease."""
    await run(
        "ip", "route", "replace", str(subnet), "via", str(public_ip), "dev", iface, ns=ns
    )  # fmt: skip


async def remove_hostgw_peer(ns: str, subnet: IPv4Network) -> None:
    await run("ip", "route", "del", str(subnet), ns=ns, check=False)


@dataclass(frozen=True)
class VxlanPeer:
    subnet: IPv4Network
    public_ip: IPv4Address
    vtep_mac: str


async def setup_flannel_device(
    ns: str,
    iface: str,
    public_ip: IPv4Address,
    subnet: IPv4Network,
    vtep_mac: str,
    mtu: int,
    vni: int = 1,
) -> str:
    """Create flannel.<VNI> as flannel does; return the device name."""
    dev = f"flannel.{vni}"
    await run(
        "ip", "link", "add", dev, "type", "vxlan", "id", str(vni), "local", str(public_ip),
        "dev", iface, "dstport", str(VXLAN_PORT), "nolearning", ns=ns,
    )  # fmt: skip
    await run("ip", "link", "set", dev, "address", vtep_mac, "mtu", str(mtu), ns=ns)
    await run("ip", "addr", "add", f"{subnet.network_address}/32", "dev", dev, ns=ns)
    await run("ip", "link", "set", dev, "up", ns=ns)
    await enable_forwarding(ns)
    return dev


async def add_peer(ns: str, peer: VxlanPeer, vni: int = 1) -> None:
    """Neighbour, FDB entry, onlink route: flannel's three steps for one remote lease."""
    dev = f"flannel.{vni}"
    gw = str(peer.subnet.network_address)
    await run(
        "ip", "neigh", "replace", gw, "lladdr", peer.vtep_mac, "nud", "permanent", "dev", dev,
        ns=ns,
    )  # fmt: skip
    await run(
        "bridge", "fdb", "replace", peer.vtep_mac, "dst", str(peer.public_ip), "self",
        "permanent", "dev", dev, ns=ns,
    )  # fmt: skip
    await run("ip", "route", "replace", str(peer.subnet), "via", gw, "dev", dev, "onlink", ns=ns)


async def remove_peer(ns: str, peer: VxlanPeer, vni: int = 1) -> None:
    dev = f"flannel.{vni}"
    gw = str(peer.subnet.network_address)
    await run("ip", "route", "del", str(peer.subnet), "dev", dev, ns=ns, check=False)
    await run(
        "bridge", "fdb", "del", peer.vtep_mac, "dst", str(peer.public_ip), "self", "dev", dev,
        ns=ns, check=False,
    )  # fmt: skip
    await run("ip", "neigh", "del", gw, "dev", dev, ns=ns, check=False)
