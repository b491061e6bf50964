"""The IPv6 half of dual stack, shared by vxlan and host-gw: the plan and a level-triggered pass.

With `EnableIPv6` a lease's key names an IPv6 subnet too (`10.1.5.0-24&fd00:1:0:5::-64`) and
its value a `PublicIPv6`. A vxlan peer also publishes `BackendV6Data` (`{"VNI":1,"VtepMAC":...}`,
the VTEP MAC of its second device `flannel-v6.<VNI>`). Per remote lease the kernel gets:

- vxlan (on flannel-v6.N, as for IPv4 on flannel.N): a permanent neighbour
  `<remote v6 subnet address> lladdr <remote v6 VtepMAC>`, a permanent FDB entry
  `<remote v6 VtepMAC> dst <remote PublicIPv6> self`, and a route
  `<remote v6 subnet> via <remote v6 subnet address> dev flannel-v6.N onlink`; with
  DirectRouting, a peer whose PublicIPv6 is on-link on the external interface (inside one of its
  global IPv6 prefixes) gets only `<remote v6 subnet> via <remote PublicIPv6> dev <external
  interface>` instead (flannel's `v6Dev.directRouting`). A peer that moves on or off link
  changes kind: its old entries go and the new ones come in the same pass;
- host-gw: a route `<remote v6 subnet> via <remote PublicIPv6> dev <external interface>`
  (proto 77), only when the PublicIPv6 is on-link.

`desired_v6()` is the pure plan. `V6Pass` applies it in two kinds of pass:

- full (`full=True`: start, every --resync-period, after an error or a failed entry, a new
  device): reads what the kernel has through the raw netlink client (backends/netlink.py, as the
  IPv4 side does: three dumps at most, the neighbours and FDB entries of one device and the IPv6
  routes, parsed by hand) and applies the difference in batches (one send per 256 requests). It
  is idempotent, repairs entries deleted by hand, removes stale ones and leaves entries that are
  already right untouched;
- on lease events (`full=False`): compares the desired peers with those the previous pass left
  in the kernel and applies only that difference, reading nothing (a few pyroute2 requests per
  event whatever the number of peers). Damage by hand waits for the next full pass, as with the
  IPv4 side's incremental passes (which read their keys back: the raw client's targeted reads
  are IPv4 only).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from socket import AF_INET6
from typing import Any

from backends import netlink as nl
from backends.links import LinkClient, check_netns
from backends.vxlan_plan import ZERO_MAC, on_link, vtep_mac_of
from subnetmgr.model import Lease, Subnet
from subnetmgr.validate import ipv6_owners

log = logging.getLogger(__name__)

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x4
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_KERNEL = 2
RTPROT_RA = 9
IFA_F_NODAD = 0x02
_GONE = {errno.ENOENT, errno.ESRCH}


@dataclass(frozen=True)
class V6Peer:
    """One remote host's IPv6 side: its v6 subnet, PublicIPv6 and (vxlan) v6 VTEP MAC."""

    subnet: IPv6Network
    public_ipv6: IPv6Address
    vtep_mac: str | None
    direct: bool = False
    """True (vxlan with DirectRouting): the PublicIPv6 is on-link, only a route via it."""


def desired_v6(
    peers: Mapping[Subnet, Lease],
    own: Lease | None,
    backend_type: str,
    *,
    need_mac: bool,
    skipped: set[tuple[str, str]],
    onlink: Sequence[IPv6Network] | None = None,
) -> dict[IPv6Network, V6Peer]:
    """The IPv6 peers to program among `peers` (already checked by subnetmgr.validate).

    Leases of other backend types and IPv4-only leases are left out silently. A dual-stack lease
    without PublicIPv6, or (vxlan) without a valid BackendV6Data VtepMAC, is logged once (per
    key and reason, via `skipped`) and left out; its IPv4 side is unaffected. Of two leases
    naming one IPv6 subnet the older keeps it (validate.ipv6_owners); our own IPv6 subnet is
    never a peer's. `onlink`: the external interface's IPv6 networks when DirectRouting is on
    (a peer whose PublicIPv6 is inside one is `direct`), else None."""
    out: dict[IPv6Network, V6Peer] = {}
    mine = [lease for lease in peers.values() if lease.attrs.backend_type == backend_type]
    owners = ipv6_owners(mine, own)
    for lease in mine:
        sub6 = lease.ipv6_subnet
        if sub6 is None:
            continue
        why = None
        mac = None
        if owners.get(sub6) is not lease:
            why = (
                f"its IPv6 subnet {sub6} is ours"
                if own is not None and own.ipv6_subnet == sub6
                else f"its IPv6 subnet {sub6} belongs to the older lease {owners[sub6].key}"
            )
        elif lease.attrs.public_ipv6 is None:
            why = "it has an IPv6 subnet but no PublicIPv6"
        elif need_mac:
            try:
                mac = vtep_mac_of(lease, v6=True)
            except ValueError as e:
                why = str(e)
        if why is not None:
            token = (lease.key, why)
            if token not in skipped:
                skipped.add(token)
                log.warning("%s: skipping the IPv6 side of lease %s: %s", backend_type,
                            lease.key, why)  # fmt: skip
            continue
        assert lease.attrs.public_ipv6 is not None
        pub6 = lease.attrs.public_ipv6
        out[sub6] = V6Peer(sub6, pub6, mac, on_link(pub6, onlink))
    return out


@dataclass
class V6Stats:
    """What the last IPv6 pass did."""

    peers: int = 0
    applied: int = 0
    failed: int = 0
    full: bool = True
    """False: only the difference to the previous pass was applied (nothing read)."""


class V6Pass:
    """The passes over the IPv6 entries of one data path (see the module docstring): `vxlan()`
    for flannel-v6.<VNI>'s entries, `hostgw()` for IPv6 routes on the external interface."""

    def __init__(self, links: LinkClient, name: str, netns: str | None = None) -> None:
        self.links = links
        self.name = name
        self.netns = netns
        self.last = V6Stats()
        self._nl: nl.RtnlSocket | None = None
        self._queue: list[tuple[nl.Request, bool]] = []
        """A full pass's writes (request, is a delete), sent in one batch by _flush()."""
        self._applied: dict[IPv6Network, V6Peer] | None = None
        """What the previous pass left in the kernel; None: the next pass must be full."""
        self._applied_for: tuple[str, object] | None = None
        """(kind, device indexes ...) that `_applied` is about."""

    async def _run(
        self,
        kind: str,
        index: object,
        desired: Mapping[IPv6Network, V6Peer],
        full: bool,
        full_pass: Callable[[V6Stats], Awaitable[None]],
        diff_pass: Callable[[dict[IPv6Network, V6Peer], V6Stats], Awaitable[None]],
    ) -> V6Stats:
        previous = self._applied
        self._applied = None  # an exception leaves it so: the next pass is a full one
        stats = V6Stats(peers=len(desired), full=True)
        if full or previous is None or self._applied_for != (kind, index):
            self._queue = []
            try:
                await full_pass(stats)
                await self._flush(stats)
            except (OSError, TimeoutError):
                self._drop_socket()  # a fresh socket for the next pass
                raise
            finally:
                self._queue = []
        else:
            stats.full = False
            await diff_pass(previous, stats)
        if not stats.failed:
            self._applied = dict(desired)
            self._applied_for = (kind, index)
        self._log(stats)
        return stats

    def _socket(self) -> nl.RtnlSocket:
        """The raw netlink socket of the full passes (opened on first use)."""
        if self._nl is None:
            check_netns(self.netns)
            self._nl = nl.RtnlSocket(self.netns)
        return self._nl

    def _drop_socket(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    async def _flush(self, stats: V6Stats) -> None:
        """Send the queued writes in batches; count and log what the kernel refused."""
        if not self._queue:
            return
        deletes = {id(req) for req, delete in self._queue if delete}
        result = await self._socket().apply([req for req, _ in self._queue])
        failed = 0
        for req, code in result.failed:
            if id(req) in deletes and code in _GONE:
                continue
            failed += 1
            log.warning("%s: %s failed: %s", self.name, req.what, errno.errorcode.get(code, code))
        stats.failed += failed
        stats.applied += result.sent - len(result.failed)

    def close(self) -> None:
        """Close our sockets (kernel state stays)."""
        self._drop_socket()
        self.links.close()

    async def _try(self, what: str, stats: V6Stats, method: str, *args: Any, **kw: Any) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            await self.links.call(method, *args, **kw)
            stats.applied += 1
        except NetlinkError as e:
            if args and args[0] == "del" and e.code in _GONE:
                return
            stats.failed += 1
            log.warning("%s: %s failed: %s", self.name, what, e)

    async def ensure_address(self, index: int, address: IPv6Address) -> None:
        """Exactly `address`/128 as the device's global IPv6 addresses (link-local ones stay),
        without duplicate address detection (flannel's /128 on flannel-v6.N)."""
        addrs = await self.links.call("get_addr", family=AF_INET6, index=index)
        have = {
            (IPv6Address(a.get_attr("IFA_ADDRESS")), a["prefixlen"])
            for a in addrs
            if a.get_attr("IFA_ADDRESS") and a["scope"] == 0
        }
        want = (address, 128)
        if want not in have:
            await self.links.call(
                "addr", "add", index=index, address=str(address), prefixlen=128,
                flags=IFA_F_NODAD,
            )  # fmt: skip
            log.info("address %s/128 on %s", address, self.name)
        for addr, plen in have - {want}:
            log.info("removing stale address %s/%d from %s", addr, plen, self.name)
            await self.links.call("addr", "del", index=index, address=str(addr), prefixlen=plen)

    async def routes(
        self,
        want: Mapping[IPv6Network, tuple[IPv6Address, int, bool]],
        ours: Callable[[nl.Route6], bool],
        protocol: int,
    ) -> None:
        """Main-table IPv6 routes: `want` maps destination -> (gateway, oif, onlink); `ours(route)`
        says which unicast routes of the dump this pass owns (the others are never touched).
        Queued for the pass's batch (see _flush): the deletes first, as a replace must not land
        on a route that is then deleted."""
        have: dict[IPv6Network, list[nl.Route6]] = {}
        for route in await self._socket().routes6(RT_TABLE_MAIN):
            if route.type == RTN_UNICAST and ours(route):
                have.setdefault(route.dst, []).append(route)
        replaces: list[nl.Request] = []
        deletes: list[nl.Route6] = []
        for dst, (gw, oif, onlink) in want.items():
            group = have.pop(dst, [])
            right = [r for r in group if (r.gateway, r.oif, r.onlink) == (gw, oif, onlink)]
            if not right:
                replaces.append(nl.route_replace(dst, gw, oif, onlink=onlink, protocol=protocol))
            deletes.extend(r for r in group if not right or r is not right[0])
        for group in have.values():
            deletes.extend(group)
        self._queue[:0] = [(nl.route_delete(r), True) for r in deletes]
        self._queue.extend((req, False) for req in replaces)

    async def vxlan(
        self,
        index: int,
        desired: Mapping[IPv6Network, V6Peer],
        *,
        full: bool = True,
        ext_index: int | None = None,
        network: IPv6Network | None = None,
    ) -> V6Stats:
        """flannel-v6.N's neighbours, FDB entries and onlink routes for `desired`, and (with
        DirectRouting) the direct routes of its `direct` peers on the external interface
        `ext_index`. Ours there: main-table routes with a gateway to a subnet strictly inside
        the cluster's IPv6 `network`, as on the IPv4 side."""
        if any(p.direct for p in desired.values()) and (ext_index is None or network is None):
            raise ValueError("direct IPv6 peers need the external interface and the network")

        async def full_pass(stats: V6Stats) -> None:
            await self._vxlan_full(index, desired, stats, ext_index, network)

        async def diff_pass(previous: dict[IPv6Network, V6Peer], stats: V6Stats) -> None:
            gone, new = _diff(previous, desired)
            still = {(p.vtep_mac, p.public_ipv6) for p in desired.values() if not p.direct}
            for p in gone:
                if p.direct:
                    await self._direct_route("del", p, ext_index, stats)
                    continue
                await self._try(f"route {p.subnet} (delete)", stats, "route", "del",
                                dst=str(p.subnet), oif=index, family=AF_INET6)  # fmt: skip
                addr = str(p.subnet.network_address)
                await self._try(f"neighbour {addr} (delete)", stats, "neigh", "del",
                                family=AF_INET6, ifindex=index, dst=addr)  # fmt: skip
                if (p.vtep_mac, p.public_ipv6) not in still:
                    await self._try(f"fdb {p.vtep_mac} dst {p.public_ipv6} (delete)", stats,
                                    "fdb", "del", ifindex=index, lladdr=p.vtep_mac,
                                    dst=str(p.public_ipv6), flags=NTF_SELF)  # fmt: skip
            for p in new:
                if p.direct:
                    await self._direct_route("replace", p, ext_index, stats)
                else:
                    await self._vxlan_add(index, p, stats)

        key = (index, ext_index, network)
        return await self._run("vxlan", key, desired, full, full_pass, diff_pass)

    async def _direct_route(
        self, verb: str, p: V6Peer, ext_index: int | None, stats: V6Stats
    ) -> None:
        """DirectRouting's `<v6 subnet> via <PublicIPv6> dev <external interface>`."""
        assert ext_index is not None
        what = f"route {p.subnet} via {p.public_ipv6} dev #{ext_index}"
        extra: dict[str, Any] = {"proto": 3} if verb == "replace" else {}
        await self._try(what + (" (delete)" if verb == "del" else ""), stats, "route", verb,
                        dst=str(p.subnet), gateway=str(p.public_ipv6), oif=ext_index,
                        family=AF_INET6, **extra)  # fmt: skip

    async def _vxlan_add(self, index: int, p: V6Peer, stats: V6Stats) -> None:
        addr = str(p.subnet.network_address)
        await self._try(f"neighbour {addr} lladdr {p.vtep_mac}", stats, "neigh", "replace",
                        family=AF_INET6, ifindex=index, dst=addr, lladdr=p.vtep_mac,
                        state=NUD_PERMANENT)  # fmt: skip
        await self._try(f"fdb {p.vtep_mac} dst {p.public_ipv6}", stats, "fdb", "replace",
                        ifindex=index, lladdr=p.vtep_mac, dst=str(p.public_ipv6),
                        state=NUD_PERMANENT, flags=NTF_SELF)  # fmt: skip
        await self._try(f"route {p.subnet} via {addr} dev #{index} onlink", stats, "route",
                        "replace", dst=str(p.subnet), gateway=addr, oif=index,
                        flags=RTNH_F_ONLINK, proto=3, family=AF_INET6)  # fmt: skip

    async def _vxlan_full(
        self,
        index: int,
        desired: Mapping[IPv6Network, V6Peer],
        stats: V6Stats,
        ext_index: int | None,
        network: IPv6Network | None,
    ) -> None:
        macs = {
            p.subnet: p.vtep_mac
            for p in desired.values()
            if p.vtep_mac is not None and not p.direct
        }
        want_neigh = {sub.network_address: mac for sub, mac in macs.items()}
        want_fdb = {(mac, desired[sub].public_ipv6) for sub, mac in macs.items()}
        # Neighbours (flannel's order: neighbour, FDB, route).
        sock = self._socket()
        have_neigh: dict[IPv6Address, str | None] = {
            n.dst: n.lladdr for n in await sock.neighbours6(index) if n.permanent
        }
        for addr, mac in want_neigh.items():
            if have_neigh.get(addr) != mac:
                self._queue.append((nl.neigh_replace(index, addr, mac), False))
        # FDB entries.
        have_fdb: set[tuple[str, IPv6Address]] = set()
        for entry in await sock.fdb6(index):  # entries with an IPv4 dst are not ours: left out
            if entry.lladdr != ZERO_MAC and entry.dst is not None and entry.state & NUD_PERMANENT:
                have_fdb.add((entry.lladdr, entry.dst))
        for mac, ip6 in want_fdb - have_fdb:
            self._queue.append((nl.fdb_replace(index, mac, ip6), False))
        # Routes.
        want_routes = {
            p.subnet: (p.public_ipv6, ext_index, False)
            if p.direct and ext_index is not None
            else (p.subnet.network_address, index, True)
            for p in desired.values()
        }

        def ours(r: nl.Route6) -> bool:
            if r.protocol in (RTPROT_KERNEL, RTPROT_RA) or r.dst.prefixlen == 0:
                return False
            if r.oif == index:
                return True
            if ext_index is None or network is None or r.oif != ext_index:
                return False
            return r.gateway is not None and r.dst.subnet_of(network) and r.dst != network

        await self.routes(want_routes, ours, protocol=3)
        for mac, ip6 in have_fdb - want_fdb:
            self._queue.append((nl.fdb_delete(index, mac, ip6), True))
        for addr in have_neigh.keys() - want_neigh.keys():
            self._queue.append((nl.neigh_delete(index, addr), True))

    async def hostgw(
        self,
        ext_index: int,
        desired: Mapping[IPv6Network, V6Peer],
        protocol: int,
        *,
        full: bool = True,
    ) -> V6Stats:
        """host-gw's IPv6 routes via each PublicIPv6 on the external interface."""

        async def full_pass(stats: V6Stats) -> None:
            want = {p.subnet: (p.public_ipv6, ext_index, False) for p in desired.values()}
            await self.routes(want, lambda r: r.protocol == protocol, protocol)

        async def diff_pass(previous: dict[IPv6Network, V6Peer], stats: V6Stats) -> None:
            gone, new = _diff(previous, desired)
            for p in gone:
                await self._try(f"route {p.subnet} (delete)", stats, "route", "del",
                                dst=str(p.subnet), oif=ext_index, proto=protocol,
                                family=AF_INET6)  # fmt: skip
            for p in new:
                await self._try(f"route {p.subnet} via {p.public_ipv6}", stats, "route",
                                "replace", dst=str(p.subnet), gateway=str(p.public_ipv6),
                                oif=ext_index, proto=protocol, family=AF_INET6)  # fmt: skip

        return await self._run("host-gw", ext_index, desired, full, full_pass, diff_pass)

    def _log(self, stats: V6Stats) -> None:
        self.last = stats
        if stats.applied or stats.failed:
            log.info("%s IPv6 %s pass: %d peers, %d changes, %d failed", self.name,
                     "full" if stats.full else "incremental", stats.peers, stats.applied,
                     stats.failed)  # fmt: skip


def _diff(
    previous: Mapping[IPv6Network, V6Peer], desired: Mapping[IPv6Network, V6Peer]
) -> tuple[list[V6Peer], list[V6Peer]]:
    """(peers whose entries go, peers whose entries come): a changed peer is in both."""
    gone = [p for s, p in previous.items() if desired.get(s) != p]
    new = [p for s, p in desired.items() if previous.get(s) != p]
    return gone, new
