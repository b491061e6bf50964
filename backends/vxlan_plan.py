"""The vxlan backend's plan: pure functions from leases and the kernel's entries to requests.

`desired_peers()` turns the leases into the peers to program (a bad VtepMAC is logged once and
skipped); `DesiredIndex` indexes them by the kernel keys they own (neighbour address, FDB MAC);
`plan()` compares them with the neighbours, FDB entries and routes the kernel has and returns
the requests (backends/netlink.py) that make the kernel match. Nothing here does I/O: the
backend's passes (backends/vxlan.py) read the kernel and apply the plan.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from backends import netlink as nl
from subnetmgr.model import Lease, Subnet, brief

log = logging.getLogger("backends.vxlan")
"""The backend's logger: the skip lines read as the vxlan backend's, as before the split."""

RTPROT_KERNEL = 2
ZERO_MAC = "00:00:00:00:00:00"
_CANONICAL_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class Peer:
    """One remote vxlan host as the kernel must know it."""

    subnet: IPv4Network
    vtep_mac: str
    public_ip: IPv4Address
    direct: bool
    """True: DirectRouting applies (PublicIP on-link), only a route via the PublicIP."""


def vtep_mac_of(lease: Lease, *, v6: bool = False) -> str:
    """The lease's VtepMAC (`v6`: BackendV6Data's), normalised; ValueError naming the lease
    when it is missing or bad."""
    name = "BackendV6Data" if v6 else "BackendData"
    data = (lease.attrs.backend_v6_data if v6 else lease.attrs.backend_data) or {}
    mac = data.get("VtepMAC")
    if not isinstance(mac, str):
        raise ValueError(f"lease {lease.key}: {name} has no VtepMAC string: {brief(dict(data))}")
    if _CANONICAL_MAC.match(mac) and int(mac[:2], 16) & 1 == 0 and mac != ZERO_MAC:
        return mac  # the common case, cheap: flannel writes lower-case colon-separated MACs
    try:
        raw = nl.mac_bytes(mac)
    except ValueError as e:
        raise ValueError(f"lease {lease.key}: {name}.VtepMAC: {e}") from None
    if raw[0] & 1 or raw == b"\0" * 6:
        raise ValueError(f"lease {lease.key}: {name}.VtepMAC {mac!r} is not a unicast MAC")
    return nl.mac_str(raw)


def on_link(
    ip: IPv4Address | IPv6Address, onlink: Sequence[IPv4Network | IPv6Network] | None
) -> bool:
    """DirectRouting's test, for either family: `ip` lies inside one of the external interface's
    networks (`onlink`; None when DirectRouting is off), so it is reached without a gateway."""
    return onlink is not None and any(ip.version == net.version and ip in net for net in onlink)


def desired_peers(
    peers: Mapping[Subnet, Lease],
    own_subnet: IPv4Network | None,
    onlink: list[IPv4Network] | None,
    skipped: set[tuple[str, str]] | None = None,
) -> dict[IPv4Network, Peer]:
    """The peers to program: vxlan leases with a valid VtepMAC, other than our own subnet.

    `onlink` is the list of networks on the external interface when DirectRouting is on, else
    None. Leases with a bad VtepMAC are logged (once per lease and value, via `skipped`) and left
    out; leases of other backend types are ignored silently, as flannel does.
    """
    out: dict[IPv4Network, Peer] = {}
    for lease in peers.values():
        subnet = lease.subnet
        if lease.attrs.backend_type != "vxlan" or subnet == own_subnet or lease.ipv6_only:
            continue
        try:
            mac = vtep_mac_of(lease)
        except ValueError as e:
            token = (lease.key, repr(lease.attrs.backend_data))
            if skipped is None or token not in skipped:
                log.warning("skipping malformed vxlan lease: %s", e)
                if skipped is not None:
                    skipped.add(token)
            continue
        ip = lease.attrs.public_ip
        out[subnet] = Peer(subnet, mac, ip, on_link(ip, onlink))
    return out


@dataclass
class DesiredIndex:
    """The desired peers, indexed by the kernel keys they own: the neighbour's address and the
    FDB entry's MAC. Two leases may share one (a host that re-acquired another subnet keeps its
    VtepMAC and PublicIP while its old lease lives on): an entry stays while any peer wants it.
    """

    peers: dict[IPv4Network, Peer] = field(default_factory=dict)
    by_addr: dict[IPv4Address, set[IPv4Network]] = field(default_factory=dict)
    by_mac: dict[str, set[IPv4Network]] = field(default_factory=dict)
    by_ip: dict[IPv4Address, set[IPv4Network]] = field(default_factory=dict)
    """Every peer (DirectRouting's too) by PublicIP: the addresses the peer filter admits."""

    @classmethod
    def build(cls, desired: Mapping[IPv4Network, Peer]) -> DesiredIndex:
        index = cls()
        for subnet, peer in desired.items():
            index.put(subnet, peer)
        return index

    def put(self, subnet: IPv4Network, peer: Peer | None) -> None:
        """Record `peer` as the desired state of `subnet` (None: nothing wanted)."""
        old = self.peers.pop(subnet, None)
        if old is not None:
            _discard(self.by_ip, old.public_ip, subnet)
        if old is not None and not old.direct:
            _discard(self.by_addr, subnet.network_address, subnet)
            _discard(self.by_mac, old.vtep_mac, subnet)
        if peer is None:
            return
        self.peers[subnet] = peer
        self.by_ip.setdefault(peer.public_ip, set()).add(subnet)
        if not peer.direct:
            self.by_addr.setdefault(subnet.network_address, set()).add(subnet)
            self.by_mac.setdefault(peer.vtep_mac, set()).add(subnet)

    def want_neigh(self, addr: IPv4Address) -> str | None:
        """The MAC the neighbour at `addr` must have, or None when no peer wants one."""
        users = self.by_addr.get(addr)
        return self.peers[min(users)].vtep_mac if users else None

    def want_fdb(self, mac: str) -> set[IPv4Address]:
        """The destinations the FDB entry of `mac` must have."""
        return {self.peers[s].public_ip for s in self.by_mac.get(mac, ())}


def _discard(
    index: dict[Any, set[IPv4Network]], key: IPv4Address | str, subnet: IPv4Network
) -> None:
    users = index.get(key)
    if users is not None:
        users.discard(subnet)
        if not users:
            del index[key]


@dataclass
class Plan:
    """The requests that make the kernel match, and what they are (for logs and tests)."""

    adds: list[nl.Request] = field(default_factory=list)
    deletes: list[nl.Request] = field(default_factory=list)
    route_deletes: list[tuple[nl.Request, IPv4Network]] = field(default_factory=list)
    """The route deletes again, with their destination (an incremental pass looks again)."""
    fdb_deletes: list[tuple[nl.Request, str]] = field(default_factory=list)
    """The FDB deletes again, with their MAC (an incremental pass looks again)."""

    def __len__(self) -> int:
        return len(self.adds) + len(self.deletes)


def plan_neighbours(
    want: Mapping[IPv4Address, str], neighbours: list[nl.Neighbour], vx_index: int
) -> tuple[list[nl.Request], list[nl.Request]]:
    """Neighbours keyed by the remote subnet's network address: (replaces, deletes).

    `neighbours` are the kernel's entries for the keys considered; ours are the permanent ones on
    the vxlan device."""
    adds: list[nl.Request] = []
    deletes: list[nl.Request] = []
    have = {n.dst: n for n in neighbours if n.ifindex == vx_index}
    for dst, mac in want.items():
        cur = have.get(dst)
        if cur is None or cur.lladdr != mac or not cur.permanent:
            adds.append(nl.neigh_replace(vx_index, dst, mac))
    for dst, cur in have.items():
        if dst not in want and cur.permanent:
            deletes.append(nl.neigh_delete(vx_index, dst))
    return adds, deletes


def plan_fdb(
    want: set[tuple[str, IPv4Address]], fdb: list[nl.FdbEntry], vx_index: int
) -> tuple[list[nl.Request], list[tuple[nl.Request, str]]]:
    """FDB entries keyed by (MAC, destination): (replaces, deletes with their MAC).

    A replace rewrites the MAC's first destination; ours are the non-zero MACs on the device."""
    adds: list[nl.Request] = []
    deletes: list[tuple[nl.Request, str]] = []
    have = {(f.lladdr, f.dst): f for f in fdb if f.ifindex == vx_index and f.lladdr != ZERO_MAC}
    for mac, ip in want:
        cur = have.get((mac, ip))
        if cur is None or not cur.state & nl.NUD_PERMANENT:
            adds.append(nl.fdb_replace(vx_index, mac, ip))
    for mac, dst_ip in have:
        if (mac, dst_ip) not in want:
            deletes.append((nl.fdb_delete(vx_index, mac, dst_ip), mac))
    return adds, deletes


def plan_routes(
    desired: Mapping[IPv4Network, Peer],
    routes: list[nl.Route],
    *,
    vx_index: int,
    ext_index: int,
    network: IPv4Network,
) -> tuple[list[nl.Request], list[tuple[nl.Request, IPv4Network]]]:
    """Routes keyed by destination: (replaces, deletes with their destination).

    Ours: main-table routes through the vxlan device (but not the kernel's own routes for
    addresses, protocol "kernel"); main-table routes with a gateway on the external interface to
    a subnet strictly inside the cluster network (DirectRouting's)."""
    adds: list[nl.Request] = []
    deletes: list[tuple[nl.Request, IPv4Network]] = []
    by_dst: dict[IPv4Network, list[nl.Route]] = {}
    for r in routes:
        if r.table != nl.RT_TABLE_MAIN or r.type != nl.RTN_UNICAST or r.protocol == RTPROT_KERNEL:
            continue  # the kernel's own routes (for addresses) come and go with the addresses
        ours = r.oif == vx_index or (
            r.oif == ext_index
            and r.gateway is not None
            and r.dst.subnet_of(network)
            and r.dst != network
        )
        if ours:
            by_dst.setdefault(r.dst, []).append(r)
    for subnet, peer in desired.items():
        if peer.direct:
            oif, gw, onlink = ext_index, peer.public_ip, False
        else:
            oif, gw, onlink = vx_index, subnet.network_address, True
        group = by_dst.pop(subnet, [])
        keep = next(
            (
                r
                for r in group
                if r.oif == oif and r.gateway == gw and r.onlink == onlink and not r.priority
            ),
            None,
        )
        if keep is None:
            adds.append(nl.route_replace(subnet, gw, oif, onlink=onlink))
        # A replace overwrites the metric-0 route; routes with other metrics are stale.
        deletes.extend((nl.route_delete(r), subnet) for r in group if r is not keep and r.priority)
    for dst, group in by_dst.items():
        deletes.extend((nl.route_delete(r), dst) for r in group)
    return adds, deletes


def plan(
    desired: Mapping[IPv4Network, Peer],
    *,
    vx_index: int,
    ext_index: int,
    network: IPv4Network,
    neighbours: list[nl.Neighbour],
    fdb: list[nl.FdbEntry],
    routes: list[nl.Route],
    index: DesiredIndex | None = None,
    neigh_keys: set[IPv4Address] | None = None,
    mac_keys: set[str] | None = None,
) -> Plan:
    """The difference between the kernel's entries and the desired peers, as requests.

    Adds come in flannel's order (neighbours, FDB, routes); deletes remove routes first.
    A full pass passes every entry the kernel has and every desired peer. An incremental pass
    restricts all three to the keys that may differ: `desired` holds the peers of the changed
    subnets, `neigh_keys` and `mac_keys` name the neighbours and FDB MACs considered (wanted
    values come from `index`, the whole desired set), and the kernel lists hold what the kernel
    has for those keys; the same rules then give the same result as a full pass for those keys.
    """
    if index is None:
        index = DesiredIndex.build(desired)
    if neigh_keys is None:
        neigh_keys = set(index.by_addr)
    if mac_keys is None:
        mac_keys = set(index.by_mac)
    want_neigh: dict[IPv4Address, str] = {}
    for addr in neigh_keys:
        mac = index.want_neigh(addr)
        if mac is not None:
            want_neigh[addr] = mac
    want_fdb = {(mac, ip) for mac in mac_keys for ip in index.want_fdb(mac)}
    neigh_adds, neigh_deletes = plan_neighbours(want_neigh, neighbours, vx_index)
    fdb_adds, fdb_deletes = plan_fdb(want_fdb, fdb, vx_index)
    route_adds, route_deletes = plan_routes(
        desired, routes, vx_index=vx_index, ext_index=ext_index, network=network
    )
    return Plan(
        adds=neigh_adds + fdb_adds + route_adds,
        deletes=[r for r, _ in route_deletes] + neigh_deletes + [r for r, _ in fdb_deletes],
        route_deletes=route_deletes,
        fdb_deletes=fdb_deletes,
    )
