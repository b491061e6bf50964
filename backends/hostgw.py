"""flannel's host-gw data path: one plain route per remote host, no encapsulation.

For every remote lease whose BackendType is "host-gw" the kernel gets
`<remote subnet> via <remote PublicIP> dev <external interface>` in the main table, so every host
must sit on one L2 segment with the others. The lease publishes
`{"PublicIP":"...","PublicIPv6":null,"BackendType":"host-gw"}` (no BackendData) and subnet.env
gets the external interface's MTU.

Our routes carry their own protocol number (`proto 77`, RTPROT_HOSTGW): that is how a pass tells
them from the operator's, so it never deletes a route it did not make. `reconcile()` is
level-triggered like the vxlan backend's: a full pass dumps the main table, compares and applies
the difference in one netlink batch; a pass for changed subnets reads only their routes with
targeted lookups (`ip route get fibmatch`). A route that is already right is never touched, so a
restarted daemon adopts its routes without cutting traffic; a route flannel made (the same
destination, gateway and device, another protocol) is adopted by rewriting it with ours.

Skipped, each logged once per lease and reason: a lease whose PublicIP is not on-link from the
external interface (no network of its addresses covers it, or the kernel refuses the route),
whose PublicIP is our own, whose subnet is not inside the network, or whose subnet already has
a route at metric 0 that is not ours and goes elsewhere (the operator's: left alone).

Dual stack (`EnableIPv6`): per remote dual-stack host-gw lease also
`<remote v6 subnet> via <remote PublicIPv6> dev <external interface> proto 77`, when the
PublicIPv6 is on-link (inside a network of the interface's global IPv6 addresses); else logged
once and skipped. backends/ipv6.py makes them: a full pass when the IPv4 side's is full, else
only the difference to the previous pass.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from backends import links
from backends import netlink as nl
from backends.base import BackendAttrs, BackendError, ExternalInterface, ipv4_keys
from backends.ipv6 import V6Pass, desired_v6
from subnetmgr.model import Lease, NetworkConfig, Subnet

log = logging.getLogger(__name__)

BACKEND_TYPE = "host-gw"
RTPROT_HOSTGW = 77
"""The protocol number of our routes (`ip route show proto 77`); unassigned in iproute2's
rt_protos. Name it with `echo '77 overlay-hostgw' > /etc/iproute2/rt_protos.d/overlay.conf`."""
MAX_ROUNDS = 4
"""A pass for changed subnets looks again at a subnet after deleting a route there (a lookup
shows only the lowest-metric route); at most this many times."""
_IGNORED_DELETE_ERRORS = {errno.ENOENT, errno.ESRCH}


# --------------------------------------------------------------------------- the plan


class SkipLog:
    """Leases left out, each logged once per reason; a lease that is fine again is forgotten."""

    def __init__(self) -> None:
        self.reasons: dict[IPv4Network, str] = {}

    def skip(self, subnet: IPv4Network, reason: str) -> None:
        if self.reasons.get(subnet) != reason:
            self.reasons[subnet] = reason
            log.warning("host-gw: skipping lease %s: %s", subnet, reason)

    def forget(self, subnets: Iterable[IPv4Network]) -> None:
        """Leases that are gone: no log line."""
        for subnet in subnets:
            self.reasons.pop(subnet, None)

    def keep_only(self, subnets: Collection[IPv4Network]) -> None:
        self.reasons = {s: r for s, r in self.reasons.items() if s in subnets}

    def clear(self, subnet: IPv4Network) -> None:
        if self.reasons.pop(subnet, None) is not None:
            log.info("host-gw: lease %s is no longer skipped", subnet)


def desired_routes(
    peers: Mapping[Subnet, Lease],
    *,
    own_subnet: IPv4Network | None,
    own_ip: IPv4Address,
    network: IPv4Network,
    onlink: list[IPv4Network],
    skipped: SkipLog,
) -> dict[IPv4Network, IPv4Address]:
    """The gateway of each remote host-gw lease we can route to; the others are skipped (and
    logged once). Leases of other backend types are ignored silently, as flannel does."""
    out: dict[IPv4Network, IPv4Address] = {}
    for lease in peers.values():
        subnet = lease.subnet
        if lease.attrs.backend_type != BACKEND_TYPE or subnet == own_subnet or lease.ipv6_only:
            continue
        gw = lease.attrs.public_ip
        if not (subnet.subnet_of(network) and subnet != network):
            skipped.skip(subnet, f"subnet is not inside the network {network}")
        elif gw == own_ip:
            skipped.skip(subnet, f"its PublicIP {gw} is our own (an older lease of this host?)")
        elif (segment := _segment_of(gw, onlink)) is None:
            nets = ", ".join(map(str, onlink)) or "none"
            skipped.skip(
                subnet,
                f"PublicIP {gw} is not on-link from the external interface (its networks: "
                f"{nets}); host-gw needs every host on one L2 segment",
            )
        elif segment.prefixlen < 31 and gw in (segment.network_address, segment.broadcast_address):
            skipped.skip(subnet, f"PublicIP {gw} is the network or broadcast address of {segment}")
        else:
            out[subnet] = gw
    return out


def _segment_of(ip: IPv4Address, onlink: list[IPv4Network]) -> IPv4Network | None:
    """The on-link network holding `ip` (a /32 is an address, not a segment), or None."""
    return next((net for net in onlink if net.prefixlen < 32 and ip in net), None)


@dataclass
class RoutePlan:
    """The requests that make the kernel's routes match, and what they are for."""

    adds: list[tuple[nl.Request, IPv4Network]] = field(default_factory=list)
    deletes: list[tuple[nl.Request, IPv4Network]] = field(default_factory=list)
    conflicts: dict[IPv4Network, nl.Route] = field(default_factory=dict)
    """Subnets whose metric-0 route is someone else's and goes elsewhere: left alone."""

    def requests(self) -> list[nl.Request]:
        return [r for r, _ in self.deletes] + [r for r, _ in self.adds]

    def __len__(self) -> int:
        return len(self.adds) + len(self.deletes)


def plan_routes(
    desired: Mapping[IPv4Network, IPv4Address],
    routes: list[nl.Route],
    *,
    ext_index: int,
    keys: Collection[IPv4Network] | None = None,
) -> RoutePlan:
    """The difference between the kernel's main-table routes and the desired ones.

    `keys=None`: a full pass, `routes` is the whole main table. Else only these destinations are
    considered and `routes` holds what the kernel has for them. Ours (protocol RTPROT_HOSTGW)
    are deleted when not wanted or at another metric; a wanted route is replaced in place at
    metric 0 unless an equal one of ours is there, or a route that is not ours holds metric 0
    with another gateway or device (a conflict: nothing is done there)."""
    by_dst: dict[IPv4Network, list[nl.Route]] = {}
    for r in routes:
        if r.table == nl.RT_TABLE_MAIN and r.type == nl.RTN_UNICAST:
            by_dst.setdefault(r.dst, []).append(r)
    if keys is None:
        ours = {d for d, group in by_dst.items() if any(_ours(r) for r in group)}
        keys = set(desired) | ours
    out = RoutePlan()
    for dst in sorted(keys):
        group = by_dst.get(dst, [])
        gw = desired.get(dst)
        if gw is not None:
            first = [r for r in group if not r.priority]
            good = [r for r in first if r.oif == ext_index and r.gateway == gw and not r.onlink]
            foreign = [r for r in first if not _ours(r) and r not in good]
            if any(_ours(r) for r in good):
                pass
            elif foreign:
                out.conflicts[dst] = foreign[0]
            else:
                req = nl.route_replace(dst, gw, ext_index, onlink=False, protocol=RTPROT_HOSTGW)
                out.adds.append((req, dst))
        for r in group:
            if _ours(r) and (gw is None or r.priority):
                out.deletes.append((nl.route_delete(r), dst))
    return out


def _ours(route: nl.Route) -> bool:
    return route.protocol == RTPROT_HOSTGW


# --------------------------------------------------------------------------- the backend


@dataclass
class RouteStats:
    """What the last reconcile did; for logs and tests."""

    routes: int = 0
    """Routes wanted (remote host-gw leases we can route to)."""
    applied: int = 0
    failed: int = 0
    skipped: int = 0
    full: bool = True
    reads: int = 0
    """Targeted kernel reads of a pass for changed subnets (a full pass dumps one table)."""


class HostGwBackend:
    """flannel's host-gw backend: a route via each remote host's PublicIP on the underlay."""

    type = BACKEND_TYPE

    def __init__(
        self, config: NetworkConfig, ext: ExternalInterface, *, netns: str | None = None
    ) -> None:
        if ext.public_ip != ext.iface_addr:
            raise BackendError(
                f"host-gw: the public IP {ext.public_ip} differs from the address "
                f"{ext.iface_addr} of {ext.name} (a NAT?); host-gw routes to other hosts' "
                "interface addresses on one L2 segment: drop --public-ip or use vxlan"
            )
        if config.enable_ipv6 and ext.public_ipv6 != ext.iface_addr6:
            raise BackendError(
                f"host-gw: the public IPv6 {ext.public_ipv6} differs from the address "
                f"{ext.iface_addr6} of {ext.name}; host-gw routes to other hosts' interface "
                "addresses on one L2 segment: drop --public-ipv6 or use vxlan"
            )
        self.config = config
        self.ext = ext
        self.netns = netns
        self.own: Lease | None = None
        self.last = RouteStats()
        self.v6 = V6Pass(links.LinkClient(netns), "host-gw", netns)
        self._skipped6: set[tuple[str, str]] = set()
        self.skipped = SkipLog()
        self._links = links.LinkClient(netns)
        self._nl: nl.RtnlSocket | None = None
        self._lock = asyncio.Lock()
        self._desired: dict[IPv4Network, IPv4Address] | None = None
        """The routes of the passes so far; None until a full pass succeeded."""
        self._desired_for: tuple[IPv4Network | None, tuple[IPv4Network, ...]] | None = None

    async def prepare(self) -> BackendAttrs:
        """Nothing to create; check the external interface can be read. No BackendData."""
        async with self._lock:
            await self._onlink()
        return BackendAttrs(self.type)

    async def start(self, own: Lease) -> int:
        """Remember our lease; the overlay MTU is the external interface's (no encapsulation)."""
        self.own = own
        return self.ext.mtu

    async def reconcile(
        self, peers: Mapping[Subnet, Lease], changed: Collection[Subnet] | None = None
    ) -> None:
        """Make the main table hold exactly our routes for `peers` (host-gw leases only).

        `changed=None`: a full pass (one route dump). A collection: only these subnets' routes
        are read (targeted lookups) and fixed by the same rules. The first pass, a pass after an
        error, a new own lease or changed networks on the external interface are always full."""
        if not self.config.enable_ipv4:  # IPv6-only: the IPv6 routes alone
            async with self._lock:
                await self._v6_pass(peers, changed is None)
            return
        network = self.config.network
        assert network is not None
        # The IPv4 pass keys peers by IPv4 subnet.
        changed4 = ipv4_keys(changed)
        async with self._lock:
            stats = RouteStats()
            onlink = await self._onlink()
            own_subnet = self.own.subnet if self.own is not None else None
            key = (own_subnet, tuple(onlink))
            stats.full = changed4 is None or self._desired is None or key != self._desired_for
            self._desired_for = key
            if changed4 is None or stats.full:
                subset = peers
                self.skipped.keep_only({x.subnet for x in peers.values()})
            else:
                subset = {s: peers[s] for s in changed4 if s in peers}
                self.skipped.forget(s for s in changed4 if s not in peers)
            wanted = desired_routes(
                subset,
                own_subnet=own_subnet,
                own_ip=self.ext.iface_addr,
                network=network,
                onlink=onlink,
                skipped=self.skipped,
            )
            sock = self._socket()
            try:
                if stats.full:
                    self._desired = None
                    todo, result = await self._full_pass(sock, wanted)
                    self._desired = wanted
                else:
                    assert self._desired is not None and changed4 is not None
                    for s in changed4:
                        self._desired.pop(s, None)
                    self._desired.update(wanted)
                    todo, result = await self._changed_pass(sock, changed4, stats)
            except BaseException as e:
                self._desired = None  # the next pass is a full one
                if isinstance(e, (OSError, TimeoutError)):
                    sock.close()
                    self._nl = None
                    raise BackendError(f"host-gw: reading or programming routes: {e}") from e
                raise
            refused = self._account(todo, result, stats)
            for subnet, route in todo.conflicts.items():
                self.skipped.skip(
                    subnet,
                    f"a route to it that is not ours is already there (via {route.gateway}, "
                    f"dev #{route.oif}, proto {route.protocol}); delete it to let host-gw "
                    "route this lease",
                )
            for subnet in wanted.keys() - todo.conflicts.keys() - refused:
                self.skipped.clear(subnet)
            stats.routes = len(self._desired) if self._desired is not None else 0
            stats.skipped = len(self.skipped.reasons)
            self.last = stats
            if self.config.enable_ipv6:
                await self._v6_pass(peers, stats.full)

    async def _v6_pass(self, peers: Mapping[Subnet, Lease], full: bool) -> None:
        """The IPv6 routes of every dual-stack host-gw peer whose PublicIPv6 is on-link."""
        try:
            nets = await self.v6.links.onlink_networks6(self.ext.index)
            want = desired_v6(peers, self.own, self.type, need_mac=False, skipped=self._skipped6)
            for sub6, peer in list(want.items()):
                if not any(peer.public_ipv6 in net for net in nets):
                    why = f"PublicIPv6 {peer.public_ipv6} is not on-link from {self.ext.name}"
                    if (str(sub6), why) not in self._skipped6:
                        self._skipped6.add((str(sub6), why))
                        log.warning("host-gw: skipping IPv6 subnet %s: %s (host-gw needs every "
                                    "host on one L2 segment)", sub6, why)  # fmt: skip
                    del want[sub6]
            await self.v6.hostgw(self.ext.index, want, RTPROT_HOSTGW, full=full)
        except Exception as e:  # pyroute2's NetlinkError is no OSError
            raise BackendError(f"host-gw: IPv6 routes: {e}") from e

    async def _onlink(self) -> list[IPv4Network]:
        try:
            return await self._links.onlink_networks(self.ext.index)
        except (OSError, TimeoutError) as e:
            raise BackendError(
                f"host-gw: cannot read the addresses of {self.ext.name} (index {self.ext.index}):"
                f" {e}"
            ) from e

    async def _full_pass(
        self, sock: nl.RtnlSocket, wanted: dict[IPv4Network, IPv4Address]
    ) -> tuple[RoutePlan, nl.BatchResult]:
        todo = plan_routes(wanted, await sock.routes(), ext_index=self.ext.index)
        result = await sock.apply(todo.requests()) if todo else nl.BatchResult()
        return todo, result

    async def _changed_pass(
        self, sock: nl.RtnlSocket, changed: set[IPv4Network], stats: RouteStats
    ) -> tuple[RoutePlan, nl.BatchResult]:
        """Read, compare and fix only the routes of `changed`."""
        desired = self._desired
        assert desired is not None
        total = RoutePlan()
        result = nl.BatchResult()
        keys = changed
        for _round in range(MAX_ROUNDS):
            ordered = sorted(keys)
            answers = await sock.query([nl.route_get(k.network_address) for k in ordered])
            stats.reads += len(answers)
            routes: list[nl.Route] = []
            for answer in answers:
                route = None if isinstance(answer, int) else nl.parse_route(answer)
                # The lookup may match a less specific route: only routes to these keys count.
                if route is not None and route.dst in keys:
                    routes.append(route)
            todo = plan_routes(
                {k: gw for k in keys if (gw := desired.get(k)) is not None},
                routes,
                ext_index=self.ext.index,
                keys=keys,
            )
            total.conflicts.update(todo.conflicts)
            if not todo:
                break
            step = await sock.apply(todo.requests())
            total.adds.extend(todo.adds)
            total.deletes.extend(todo.deletes)
            result.sent += step.sent
            result.failed.extend(step.failed)
            # Look again where a route was deleted: another one may have been behind it.
            refused = {id(req) for req, _code in step.failed}
            keys = {k for req, k in todo.deletes if id(req) not in refused}
            if not keys:
                break
        return total, result

    def _account(
        self, todo: RoutePlan, result: nl.BatchResult, stats: RouteStats
    ) -> set[IPv4Network]:
        """Count and log what a pass applied; a refused route skips its lease (logged once).
        Returns the subnets whose route the kernel refused."""
        refused: set[IPv4Network] = set()
        deletes = {id(r) for r, _ in todo.deletes}
        subnet_of = {id(r): s for r, s in todo.adds}
        for req, code in result.failed:
            if id(req) in deletes:
                if code not in _IGNORED_DELETE_ERRORS:
                    stats.failed += 1
                    log.warning("host-gw: %s failed: %s", req.what, os.strerror(code))
                continue
            stats.failed += 1
            subnet = subnet_of[id(req)]
            refused.add(subnet)
            hint = " (host-gw needs every host on one L2 segment)"
            self.skipped.skip(
                subnet,
                f"the kernel refused {req.what}: {os.strerror(code)}"
                f"{hint if code == errno.ENETUNREACH else ''}",
            )
            if self._desired is not None:
                self._desired.pop(subnet, None)  # a later pass tries again (the skip stays)
        stats.applied = result.sent - stats.failed
        if result.sent:
            log.info(
                "host-gw reconcile (%s): %d changes (%d added/replaced, %d removed), %d failed",
                "full" if stats.full else f"{stats.reads} routes read",
                len(todo),
                len(todo.adds),
                len(todo.deletes),
                stats.failed,
            )
        return refused

    def _socket(self) -> nl.RtnlSocket:
        if self._nl is None:
            links.check_netns(self.netns)
            self._nl = nl.RtnlSocket(self.netns)
        return self._nl

    async def close(self) -> None:
        """Close our sockets; the routes stay in place (a restart adopts them)."""
        if self._nl is not None:
            self._nl.close()
            self._nl = None
        self._links.close()
        self.v6.close()
