"""The VXLAN data path, as flannel builds it, through kernel devices.

One device `flannel.<VNI>` (kind vxlan, learning off) carries the overlay. For every remote lease
whose BackendType is "vxlan" the kernel gets, in this order:

1. a permanent neighbour `<remote subnet address> lladdr <remote VtepMAC> dev flannel.N`,
2. a permanent FDB entry `<remote VtepMAC> dst <remote PublicIP> self dev flannel.N`,
3. a route `<remote subnet> via <remote subnet address> dev flannel.N onlink`.

With DirectRouting, a peer whose PublicIP is on-link on the external interface gets only a route
`<remote subnet> via <PublicIP> dev <ext>` instead.

As flannel splits a backend: the pure plan is backends/vxlan_plan.py, the options and the device
are backends/vxlan_device.py, and this module holds the backend's passes.

`reconcile()` is level-triggered: it reads what the kernel has (three netlink dumps), computes the
difference with the desired set and applies it in bulk (see backends/netlink.py), so it is
idempotent, repairs entries deleted by hand, removes stale ones and never touches entries that
are already right. `reconcile(peers, changed)` does the same for the changed subnets only,
reading their entries with targeted netlink GETs, so a lease event costs the same with 10,000
leases as with one; the periodic full pass repairs the rest. A device deleted by hand is
recreated with the same MAC; on restart an existing compatible device (same VNI, port, local
address, link, GBP) is reused with its MAC.

`FilterPeers: true` (ours, not flannel's) admits the VXLAN port only from the PublicIPs of the
vxlan leases, through an nftables table of our own (`table ip overlay_vxlan`, see
backends/nftset.py): a full pass makes the table and its set match the peers, an incremental
pass adds or deletes only the changed peers' addresses, each in one nft transaction. With the
option off, a table left from an earlier run is deleted in `prepare()`.

Dual stack (`EnableIPv6`): a second device `flannel-v6.<VNI>` (VXLAN over the IPv6 underlay,
`local` = the interface's IPv6 address, its own random VTEP MAC published as BackendV6Data, MTU =
underlay MTU - 70) gets our IPv6 subnet's address as /128 and, per remote dual-stack vxlan lease,
the same neighbour, FDB and onlink route triple as IPv4 (backends/ipv6.py: a full pass when the
IPv4 side's is full or the external interface's IPv6 networks changed, else only the difference
to the previous pass). Both options cover the IPv6 underlay too:

- DirectRouting: a peer whose PublicIPv6 lies in one of the external interface's global IPv6
  prefixes gets only `<remote v6 subnet> via <PublicIPv6> dev <ext>` (the same `on_link` test as
  IPv4, backends/vxlan_plan.py); a peer moving on or off link swaps its entries.
- FilterPeers: a second table of the same name in family ip6, `table ip6 overlay_vxlan`, admits
  the leases' PublicIPv6s (ours left out). A separate table rather than one `inet` table keeps
  the IPv4 table exactly as it was (no migration on upgrade, its counter and the documented
  `nft delete table ip overlay_vxlan` unchanged) and costs hosts without EnableIPv6 nothing;
  each table changes in one nft transaction (a lease event that changes addresses of both
  families runs two). A full pass reads and repairs the table; a lease event sends only the
  difference to the previous pass's addresses (no nft run when there is none). Its drops are
  published as `overlay_vxlan_peer_filter_ipv6_dropped_{packets,bytes}_total`. The ip6 table is
  deleted at start when FilterPeers or EnableIPv6 is off, and left in place on SIGTERM.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from backends import netlink as nl
from backends import nftset
from backends.base import BackendAttrs, BackendError, ExternalInterface, ipv4_keys
from backends.ipv6 import V6Pass, V6Stats, desired_v6
from backends.links import LinkClient
from backends.vxlan_device import FILTER_PEERS_KEY, VxlanDevice, VxlanOptions
from backends.vxlan_plan import ZERO_MAC, DesiredIndex, Peer, Plan, desired_peers, plan
from subnetmgr.model import Lease, NetworkConfig, Subnet

log = logging.getLogger(__name__)

FILTER_TABLE = "overlay_vxlan"
"""The nftables table of the peer filter: family ip, and family ip6 with EnableIPv6."""
FILTER_COMMENT = "overlay vxlan: admit only lease PublicIPs (FilterPeers)"
FILTER_COMMENT6 = "overlay vxlan: admit only lease PublicIPv6s (FilterPeers)"
MAX_LOGGED_FAILURES = 20
"""Refused entries logged one by one per reconcile; the rest are counted in one line."""

_IGNORED_DELETE_ERRORS = {errno.ENOENT, errno.ESRCH}


# --------------------------------------------------------------------------- the backend


@dataclass
class ReconcileStats:
    """What the last reconcile did; for logs, metrics and tests."""

    peers: int = 0
    applied: int = 0
    failed: int = 0
    device_created: bool = False
    full: bool = True
    """False: an incremental pass (only the changed subnets' entries were read and compared)."""
    reads: int = 0
    """Targeted kernel reads of an incremental pass (a full pass reads three whole tables)."""
    filter: nftset.SyncResult | None = None
    """What the pass did to the peer filter's table (None: FilterPeers is off)."""
    filter6: nftset.SyncResult | None = None
    """What the pass did to the IPv6 peer filter's table (None: FilterPeers or EnableIPv6 off)."""


MAX_ROUNDS = 4
"""An incremental pass looks again at a key after deleting an entry there (a route with another
metric or another FDB destination may have been hidden behind it); at most this many times."""


class VxlanBackend:
    """flannel's vxlan backend: one device, neighbour + FDB + route per remote lease."""

    type = "vxlan"

    def __init__(
        self, config: NetworkConfig, ext: ExternalInterface, *, netns: str | None = None
    ) -> None:
        self.config = config
        self.ext = ext
        self.netns = netns
        self.options = VxlanOptions.from_backend(config.backend)
        self.links = LinkClient(netns)
        self.dev = VxlanDevice(self.options, ext, self.links, netns)
        self.dev6: VxlanDevice | None = None
        """flannel-v6.<VNI> with EnableIPv6, else None."""
        if config.enable_ipv6:
            self.dev6 = VxlanDevice(self.options, ext, self.links, netns, ipv6=True)
        self.v6 = V6Pass(self.links, f"flannel-v6.{self.options.vni}", netns)
        self._skipped6: set[tuple[str, str]] = set()
        self.own: Lease | None = None
        self.last = ReconcileStats()
        self._nl: nl.RtnlSocket | None = None
        self._lock = asyncio.Lock()
        self._skipped: set[tuple[str, str]] = set()
        self._desired: DesiredIndex | None = None
        """The desired peers of the passes so far; None until a full pass succeeded (an
        incremental pass needs it to know which entries other peers still want)."""
        self._desired_for: tuple[int, IPv4Network | None, tuple[IPv4Network, ...] | None] = (
            -1,
            None,
            None,
        )
        """(device index, own subnet, on-link networks) that `_desired` was built for."""
        self.filter = nftset.NftTable(
            nftset.PortFilter(FILTER_TABLE, self.options.port, FILTER_COMMENT), netns
        )
        """The peer filter's table (FilterPeers); with the option off only ever deleted."""
        self._filter_synced = False
        """True once a full filter pass succeeded; an incremental one needs it."""
        self.filter6 = nftset.NftTable(
            nftset.PortFilter(FILTER_TABLE, self.options.port, FILTER_COMMENT6, family="ip6"),
            netns,
        )
        """The peer filter over the IPv6 underlay (FilterPeers with EnableIPv6), else only ever
        deleted."""
        self._filter6_applied: frozenset[IPv6Address] | None = None
        """The PublicIPv6s the last IPv6 filter pass left admitted; None: the next one is full."""
        self._onlink6_for: tuple[IPv6Network, ...] | None = None
        """The external interface's IPv6 networks the last IPv6 pass was planned with."""

    @property
    def device(self) -> str:
        """The device's name, flannel.<VNI>."""
        return self.dev.name

    @property
    def ipv4(self) -> bool:
        """False in an IPv6-only network: no flannel.<VNI>, only flannel-v6.<VNI>."""
        return self.config.enable_ipv4

    @property
    def _network(self) -> IPv4Network:
        """Network, for the IPv4 passes (which an IPv6-only network never runs)."""
        assert self.config.network is not None
        return self.config.network

    @property
    def mtu(self) -> int:
        """The device's MTU, also subnet.env's FLANNEL_MTU."""
        return self.dev.mtu

    @property
    def mac(self) -> str | None:
        """The VTEP MAC, once the device was made or adopted."""
        return self.dev.mac

    @property
    def ifindex(self) -> int | None:
        return self.dev.ifindex

    # ----------------------------------------------------------------------- protocol

    async def prepare(self) -> BackendAttrs:
        """Create (or reuse) flannel.<VNI>; publish {"VNI": n, "VtepMAC": mac}."""
        async with self._lock:
            if self.ipv4:
                await self.dev.ensure()
            if self.dev6 is not None:
                await self.dev6.ensure()
            if not self.options.filter_peers or not self.ipv4:
                await self._remove_filter(self.filter)
            if not self.options.filter_peers or self.dev6 is None:
                await self._remove_filter(self.filter6)
        v6_data = None
        if self.dev6 is not None:
            assert self.dev6.mac is not None
            v6_data = {"VNI": self.options.vni, "VtepMAC": self.dev6.mac}
        if not self.ipv4:  # flannel leaves BackendData out when it has no IPv4 device
            return BackendAttrs(self.type, None, v6_data)
        assert self.mac is not None
        return BackendAttrs(self.type, {"VNI": self.options.vni, "VtepMAC": self.mac}, v6_data)

    async def start(self, own: Lease) -> int:
        """Give the device our subnet's network address as /32; return the overlay MTU."""
        async with self._lock:
            self.own = own
            if self.ipv4:
                index = await self.dev.ensure()
                await self.dev.ensure_address(index, self.own.subnet.network_address)
            await self._ensure_v6_device()
        if self.dev6 is not None and not self.ipv4:
            return self.dev6.mtu
        if self.dev6 is not None:
            return min(self.mtu, self.dev6.mtu)  # one FLANNEL_MTU for both families
        return self.mtu

    async def _ensure_v6_device(self) -> int | None:
        """flannel-v6.<VNI> made or adopted, with our IPv6 subnet's address as /128."""
        if self.dev6 is None:
            return None
        try:
            index6 = await self.dev6.ensure()
            own6 = self.own.ipv6_subnet if self.own is not None else None
            if own6 is not None:
                await self.v6.ensure_address(index6, own6.network_address)
        except Exception as e:  # pyroute2's NetlinkError is no OSError
            if isinstance(e, BackendError):
                raise
            raise BackendError(f"setting up {self.dev6.name}: {e}") from e
        return index6

    async def reconcile(
        self, peers: Mapping[Subnet, Lease], changed: Collection[Subnet] | None = None
    ) -> None:
        """Make the kernel hold exactly the entries for `peers` (vxlan leases only).

        `changed=None`: a full pass (three dumps, everything compared). A collection: only these
        subnets may differ from the previous call; only their neighbour, FDB entry and route
        are read (targeted netlink GETs) and fixed, with the same rules as a full pass. Entries
        of other subnets are not looked at, even when wrong: that is the periodic full pass's
        job. The first pass, a pass after an error, a recreated device, a new own lease or
        changed on-link networks (DirectRouting) are always full."""
        if not self.ipv4:
            await self._reconcile_v6_only(peers, changed)
            return
        # The IPv4 passes key peers by IPv4 subnet (IPv6-only leases never reach them).
        changed4 = ipv4_keys(changed)
        async with self._lock:
            stats = ReconcileStats()
            before = self.ifindex
            index = await self.dev.ensure()
            stats.device_created = before is not None and index != before
            if self.own is not None:
                await self.dev.ensure_address(index, self.own.subnet.network_address)
            onlink = None
            if self.options.direct_routing:
                onlink = await self.links.onlink_networks(self.ext.index)
            own_subnet = self.own.subnet if self.own is not None else None
            key = (index, own_subnet, tuple(onlink) if onlink is not None else None)
            if changed4 is not None and self._desired is not None and key == self._desired_for:
                stats.full = False
            self._desired_for = key
            sock = self._socket()
            try:
                if stats.full:
                    self._desired = None
                    desired = desired_peers(peers, own_subnet, onlink, self._skipped)
                    desired_index = DesiredIndex.build(desired)
                    todo, result = await self._full_pass(sock, index, desired, desired_index)
                    self._desired = desired_index
                    candidates = None
                else:
                    assert self._desired is not None and changed4 is not None
                    v4 = changed4
                    candidates = self._public_ips(v4)  # the old peers' ...
                    todo, result = await self._changed_pass(
                        sock, index, peers, v4, own_subnet, onlink, stats
                    )
                    candidates |= self._public_ips(v4)  # ... and the new ones'
            except BaseException as e:
                self._desired = None  # the next pass is a full one
                if isinstance(e, (OSError, TimeoutError)):
                    # Start over with a fresh socket next time (a half-read answer stays behind).
                    sock.close()
                    self._nl = None
                    raise BackendError(f"reading or programming {self.device}'s peers: {e}") from e
                raise
            stats.peers = len(self._desired.peers) if self._desired is not None else 0
            self._account(todo, result, stats)
            if self.options.filter_peers:
                stats.filter = await self._filter_pass(candidates)
            self.last = stats
            index6 = await self._ensure_v6_device()
            if index6 is not None:
                await self._v6_pass(index6, peers, stats.full)

    async def _v6_pass(self, index6: int, peers: Mapping[Subnet, Lease], full: bool) -> V6Stats:
        """flannel-v6.N's entries (DirectRouting's routes too), then the IPv6 peer filter. A
        change of the external interface's IPv6 networks makes the pass full."""
        try:
            onlink6 = None
            if self.options.direct_routing:
                onlink6 = await self.links.onlink_networks6(self.ext.index)
                key = tuple(onlink6)
                full = full or key != self._onlink6_for
                self._onlink6_for = key
            want6 = desired_v6(peers, self.own, self.type, need_mac=True,
                               skipped=self._skipped6, onlink=onlink6)  # fmt: skip
            result = await self.v6.vxlan(index6, want6, full=full, ext_index=self.ext.index,
                                         network=self.config.ipv6_network)  # fmt: skip
        except Exception as e:  # pyroute2's NetlinkError is no OSError
            self._onlink6_for = None
            raise BackendError(f"programming {self.v6.name}'s peers: {e}") from e
        if self.options.filter_peers:
            own6 = self.ext.public_ipv6
            await self._filter6_pass(
                frozenset(p.public_ipv6 for p in want6.values() if p.public_ipv6 != own6), full
            )
        return result

    async def _filter6_pass(self, want: frozenset[IPv6Address], full: bool) -> None:
        """Make the IPv6 peer filter admit exactly `want`: a full pass reads and repairs the
        table; otherwise only the difference to the previous pass is sent (nothing when none),
        and a failed update (table or set deleted by hand) is followed by a full pass."""
        previous, self._filter6_applied = self._filter6_applied, None
        table = self.filter6
        try:
            if full or previous is None:
                result = await table.sync(want)
            else:
                try:
                    result = await table.update(want - previous, previous - want)
                except nftset.NftError as e:
                    log.warning("IPv6 peer filter: incremental update failed, running a full "
                                "pass: %s", e)  # fmt: skip
                    result = await table.sync(want)
        except nftset.NftError as e:
            raise self._filter_error(table, e) from e
        self._filter6_applied = want
        self.last.filter6 = result
        self._filter_log(table, result, len(want))

    async def _reconcile_v6_only(
        self, peers: Mapping[Subnet, Lease], changed: Collection[Subnet] | None
    ) -> None:
        """An IPv6-only network: flannel-v6.<VNI> and its peers alone (V6Pass decides when an
        incremental pass must be a full one)."""
        async with self._lock:
            index6 = await self._ensure_v6_device()
            assert index6 is not None
            self.last = ReconcileStats()
            result = await self._v6_pass(index6, peers, changed is None)
            last = self.last
            last.peers, last.applied, last.failed = result.peers, result.applied, result.failed
            last.full = result.full

    def _public_ips(self, subnets: Collection[IPv4Network]) -> set[IPv4Address]:
        state = self._desired
        assert state is not None
        return {p.public_ip for s in subnets if (p := state.peers.get(s)) is not None}

    async def _filter_pass(self, candidates: set[IPv4Address] | None) -> nftset.SyncResult:
        """Make the peer filter admit exactly the desired peers' PublicIPs (not our own).

        `candidates=None`: a full pass (read the table, repair it, fix every element); else
        only these addresses are put in or taken out, per the desired index. An incremental
        update that fails (the set or table was deleted by hand) is followed by a full pass."""
        state = self._desired
        assert state is not None
        own = self.ext.public_ip

        def want() -> set[IPv4Address]:  # O(peers): full passes only
            return {ip for ip in state.by_ip if ip != own}

        try:
            if candidates is None or not self._filter_synced:
                result = await self.filter.sync(want())
            else:
                admit = {ip for ip in candidates if ip != own and ip in state.by_ip}
                try:
                    result = await self.filter.update(admit, candidates - admit)
                except nftset.NftError as e:
                    log.warning(
                        "peer filter: incremental update failed, running a full pass: %s", e
                    )
                    result = await self.filter.sync(want())
        except nftset.NftError as e:
            self._filter_synced = False
            self._desired = None  # the next pass is a full one
            raise self._filter_error(self.filter, e) from e
        self._filter_synced = True
        self._filter_log(self.filter, result, len(state.by_ip) - (own in state.by_ip))
        return result

    @staticmethod
    def _filter_error(table: nftset.NftTable, e: nftset.NftError) -> BackendError:
        return BackendError(
            f"{FILTER_PEERS_KEY}: cannot program nft table {table.spec.family} {FILTER_TABLE}: {e}"
        )

    @staticmethod
    def _filter_log(table: nftset.NftTable, result: nftset.SyncResult, admitted: int) -> None:
        family = table.spec.family
        name = "peer filter" if family == nftset.FAMILY else "IPv6 peer filter"
        if result.rebuilt:
            log.warning("%s: nft table %s %s replaced (%d peers): %s", name, family,
                        FILTER_TABLE, admitted, "; ".join(result.rebuilt))  # fmt: skip
        elif result.transactions:
            log.info("%s (%d peers): %s", name, admitted, nftset.describe(result))

    async def _remove_filter(self, table: nftset.NftTable) -> None:
        """FilterPeers is off (for the ip6 table: or EnableIPv6 is): delete a peer filter table
        left from an earlier run."""
        family = table.spec.family
        off = FILTER_PEERS_KEY if not self.options.filter_peers else "EnableIPv6"
        try:
            if await table.delete():
                log.warning("%s is off: deleted the leftover nft table %s %s", off, family,
                            FILTER_TABLE)  # fmt: skip
        except nftset.NftError as e:
            if nftset.nft_command() is None:
                log.debug("nft is not installed, so no peer filter table to remove: %s", e)
                return
            raise BackendError(
                f"{off} is off but the nft table {family} {FILTER_TABLE} "
                f"could not be checked or removed ({e}); it would keep dropping VXLAN from new "
                f"peers: delete it by hand (nft delete table {family} {FILTER_TABLE})"
            ) from e

    def counters(self) -> dict[str, int]:
        """The peer filters' drop counters, read now (one netlink request per table, bounded
        time); empty when FilterPeers is off or a table is missing. Published as
        overlay_vxlan_<name>: `peer_filter_...` for the IPv4 underlay (the name it always had),
        `peer_filter_ipv6_...` for the IPv6 one."""
        if not self.options.filter_peers:
            return {}
        out: dict[str, int] = {}
        tables = [("peer_filter", self.filter)]
        if self.dev6 is not None:
            tables.append(("peer_filter_ipv6", self.filter6))
        for prefix, table in tables:
            counter = table.counter()
            if counter is not None:
                out[f"{prefix}_dropped_packets_total"] = counter.packets
                out[f"{prefix}_dropped_bytes_total"] = counter.bytes
        return out

    async def _full_pass(
        self,
        sock: nl.RtnlSocket,
        index: int,
        desired: dict[IPv4Network, Peer],
        desired_index: DesiredIndex,
    ) -> tuple[Plan, nl.BatchResult]:
        neighbours = await sock.neighbours(index)
        fdb = await sock.fdb(index)
        routes = await sock.routes()
        todo = plan(
            desired,
            vx_index=index,
            ext_index=self.ext.index,
            network=self._network,
            neighbours=neighbours,
            fdb=fdb,
            routes=routes,
            index=desired_index,
        )
        result = await sock.apply([*todo.adds, *todo.deletes]) if todo else nl.BatchResult()
        return todo, result

    async def _changed_pass(
        self,
        sock: nl.RtnlSocket,
        index: int,
        peers: Mapping[Subnet, Lease],
        changed: set[IPv4Network],
        own_subnet: IPv4Network | None,
        onlink: list[IPv4Network] | None,
        stats: ReconcileStats,
    ) -> tuple[Plan, nl.BatchResult]:
        """Read, compare and fix only the entries of `changed` (see reconcile)."""
        state = self._desired
        assert state is not None
        new = desired_peers(
            {s: peers[s] for s in changed if s in peers}, own_subnet, onlink, self._skipped
        )
        # The MACs whose FDB entries may change: the old and the new peer's.
        mac_keys = {
            p.vtep_mac for s in changed if (p := state.peers.get(s)) is not None and not p.direct
        }
        mac_keys |= {p.vtep_mac for p in new.values() if not p.direct}
        for s in changed:
            state.put(s, new.get(s))
        route_keys: set[IPv4Network] = set(changed)
        neigh_keys = {s.network_address for s in changed}
        total = Plan()
        result = nl.BatchResult()
        for _round in range(MAX_ROUNDS):
            rkeys, nkeys = sorted(route_keys), sorted(neigh_keys)
            answers = await sock.query(
                [nl.route_get(k.network_address) for k in rkeys]
                + [nl.neigh_get(index, a) for a in nkeys]
            )
            routes: dict[tuple[object, ...], nl.Route] = {}
            for answer in answers[: len(rkeys)]:
                route = None if isinstance(answer, int) else nl.parse_route(answer)
                # The lookup may match a less specific route: only routes to these keys count.
                if route is not None and route.dst in route_keys:
                    ident = (route.dst, route.oif, route.gateway, route.priority, route.table)
                    routes[ident] = route
            neighbours: list[nl.Neighbour] = []
            for answer in answers[len(rkeys) :]:
                entry = None if isinstance(answer, int) else nl.parse_neighbour(answer)
                if isinstance(entry, nl.Neighbour):
                    neighbours.append(entry)
                    if entry.lladdr is not None and entry.lladdr != ZERO_MAC:
                        mac_keys.add(entry.lladdr)  # a MAC set by hand or by an older lease
            mkeys = sorted(mac_keys)
            fdb: list[nl.FdbEntry] = []
            for answer in await sock.query([nl.fdb_get(index, m) for m in mkeys]):
                entry = None if isinstance(answer, int) else nl.parse_neighbour(answer)
                if isinstance(entry, nl.FdbEntry):
                    fdb.append(entry)
            stats.reads += len(answers) + len(mkeys)
            todo = plan(
                {s: p for s in route_keys if (p := state.peers.get(s)) is not None},
                vx_index=index,
                ext_index=self.ext.index,
                network=self._network,
                neighbours=neighbours,
                fdb=fdb,
                routes=list(routes.values()),
                index=state,
                neigh_keys=neigh_keys,
                mac_keys=mac_keys,
            )
            if not todo:
                break
            step = await sock.apply([*todo.adds, *todo.deletes])
            for name in ("adds", "deletes", "route_deletes", "fdb_deletes"):
                getattr(total, name).extend(getattr(todo, name))
            result.sent += step.sent
            result.failed.extend(step.failed)
            # Look again where an entry was deleted: another one may have been behind it.
            refused = {id(req) for req, _code in step.failed}
            route_keys = {k for req, k in todo.route_deletes if id(req) not in refused}
            mac_keys = {m for req, m in todo.fdb_deletes if id(req) not in refused}
            neigh_keys = set()
            if not route_keys and not mac_keys:
                break
        return total, result

    def _account(self, todo: Plan, result: nl.BatchResult, stats: ReconcileStats) -> None:
        """Count and log what a pass applied and what the kernel refused."""
        if not result.sent:
            return
        deletes = {id(r) for r in todo.deletes}
        for req, code in result.failed:
            if id(req) in deletes and code in _IGNORED_DELETE_ERRORS:
                continue
            stats.failed += 1
            if stats.failed <= MAX_LOGGED_FAILURES:
                log.warning("%s on %s failed: %s", req.what, self.device, os.strerror(code))
        if stats.failed > MAX_LOGGED_FAILURES:
            log.warning(
                "%d more entries on %s failed (not logged one by one)",
                stats.failed - MAX_LOGGED_FAILURES,
                self.device,
            )
        stats.applied = result.sent - stats.failed
        log.info(
            "vxlan reconcile (%s): %d peers, %d changes (%d added/replaced, %d removed), %d failed",
            "full" if stats.full else f"{stats.reads} entries read",
            stats.peers,
            len(todo),
            len(todo.adds),
            len(todo.deletes),
            stats.failed,
        )

    async def close(self) -> None:
        """Close our sockets; devices, neighbours, FDB entries, routes and the peer filter stay
        in place."""
        self.filter.close()
        self.filter6.close()
        if self._nl is not None:
            self._nl.close()
            self._nl = None
        self.v6.close()  # closes self.links too

    # ----------------------------------------------------------------------- helpers

    def _socket(self) -> nl.RtnlSocket:
        if self._nl is None:
            self._nl = nl.RtnlSocket(self.netns)
        return self._nl
