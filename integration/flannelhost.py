"""A host configured by hand exactly as flannel's vxlan or host-gw backend would configure it.

Nothing here uses overlay's own code: the lease value is written byte for byte in flannel's
format, and the data path is made with plain iproute2 commands (vxlan: flannel.1, then per remote
lease neighbour, FDB entry and onlink route, in flannel's order; host-gw: per remote lease one
route via its PublicIP on the external interface). The lab uses it to prove that an overlayd
host and a flannel host interoperate, and to test the lab without the daemon.

Dual stack as flannel has it: the lease also carries PublicIPv6 (and, vxlan, BackendV6Data with
the VTEP MAC of flannel-v6.<VNI>, VXLAN over the IPv6 underlay); per remote dual-stack lease the
same neighbour, FDB and onlink route on flannel-v6.<VNI> (host-gw: a route via its PublicIPv6).
iproute2 takes the family from the addresses, so the same commands serve both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from integration.netns import run

VXLAN_PORT = 8472

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


def device_name(vni: int = 1, v6: bool = False) -> str:
    """flannel.<VNI>, or flannel-v6.<VNI> for the IPv6 side of dual stack."""
    return f"flannel-v6.{vni}" if v6 else f"flannel.{vni}"


def _v6_fields(public_ipv6: IPv6Address | None) -> str:
    return f'"{public_ipv6}"' if public_ipv6 is not None else "null"


def random_vtep_mac() -> str:
    """A random locally administered unicast MAC, as flannel makes for flannel.<VNI>."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def flannel_vxlan_lease_value(
    public_ip: IPv4Address,
    vtep_mac: str | None,
    vni: int = 1,
    public_ipv6: IPv6Address | None = None,
    vtep_mac6: str | None = None,
) -> str:
    """The lease value flannel v0.28 writes for a vxlan host, spelled out literally (dual
    stack: with PublicIPv6 and BackendV6Data; IPv6-only: PublicIP 0.0.0.0 and no BackendData,
    `vtep_mac` None, as flannel's newSubnetAttrs leaves them without an IPv4 device)."""
    v4_data = (
        f',"BackendData":{{"VNI":{vni},"VtepMAC":"{vtep_mac}"}}' if vtep_mac is not None else ""
    )
    v6_data = (
        f',"BackendV6Data":{{"VNI":{vni},"VtepMAC":"{vtep_mac6}"}}' if vtep_mac6 is not None else ""
    )
    return (
        f'{{"PublicIP":"{public_ip}","PublicIPv6":{_v6_fields(public_ipv6)},'
        f'"BackendType":"vxlan"{v4_data}{v6_data}}}'
    )


def flannel_hostgw_lease_value(
    public_ip: IPv4Address, public_ipv6: IPv6Address | None = None
) -> str:
    """The lease value flannel v0.28 writes for a host-gw host (no BackendData)."""
    return (
        f'{{"PublicIP":"{public_ip}","PublicIPv6":{_v6_fields(public_ipv6)},'
        '"BackendType":"host-gw"}'
    )


async def enable_forwarding(ns: str, ipv6: bool = False) -> None:
    """The host routes its containers' traffic (flannel's hosts have ip_forward on)."""
    await run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=ns)
    if ipv6:
        await run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=ns)


async def add_hostgw_peer(ns: str, iface: str, subnet: Network, public_ip: Address) -> None:
    """flannel's host-gw route for one remote lease."""
    await run(
        "ip", "route", "replace", str(subnet), "via", str(public_ip), "dev", iface, ns=ns
    )  # fmt: skip


async def remove_hostgw_peer(ns: str, subnet: Network) -> None:
    await run("ip", "route", "del", str(subnet), ns=ns, check=False)


@dataclass(frozen=True)
class VxlanPeer:
    subnet: Network
    public_ip: Address
    vtep_mac: str


async def setup_flannel_device(
    ns: str,
    iface: str,
    public_ip: Address,
    subnet: Network,
    vtep_mac: str,
    mtu: int,
    vni: int = 1,
) -> str:
    """Create flannel.<VNI> as flannel does (an IPv6 `public_ip`: flannel-v6.<VNI>, VXLAN over
    the IPv6 underlay, with the subnet's address as /128); return the device name."""
    v6 = public_ip.version == 6
    dev = device_name(vni, v6)
    await run(
        "ip", "link", "add", dev, "type", "vxlan", "id", str(vni), "local", str(public_ip),
        "dev", iface, "dstport", str(VXLAN_PORT), "nolearning", ns=ns,
    )  # fmt: skip
    await run("ip", "link", "set", dev, "address", vtep_mac, "mtu", str(mtu), ns=ns)
    host = f"{subnet.network_address}/{subnet.max_prefixlen}"
    await run("ip", "addr", "add", host, "dev", dev, *(["nodad"] if v6 else []), ns=ns)
    await run("ip", "link", "set", dev, "up", ns=ns)
    await enable_forwarding(ns, ipv6=v6)
    return dev


async def add_peer(ns: str, peer: VxlanPeer, vni: int = 1) -> None:
    """Neighbour, FDB entry, onlink route: flannel's three steps for one remote lease (on
    flannel-v6.<VNI> for an IPv6 peer)."""
    dev = device_name(vni, peer.subnet.version == 6)
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
    dev = device_name(vni, peer.subnet.version == 6)
    gw = str(peer.subnet.network_address)
    await run("ip", "route", "del", str(peer.subnet), "dev", dev, ns=ns, check=False)
    await run(
        "bridge", "fdb", "del", peer.vtep_mac, "dst", str(peer.public_ip), "self", "dev", dev,
        ns=ns, check=False,
    )  # fmt: skip
    await run("ip", "neigh", "del", gw, "dev", dev, ns=ns, check=False)
