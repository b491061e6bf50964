"""The VXLAN data path, as flannel builds it, through kernel devices.

One device `flannel.<VNI>` (kind vxlan, learning off) carries the overlay. For every remote lease
whose BackendType is "vxlan" the kernel gets, in this order:

1. a permanent neighbour `<remote subnet address> lladdr <remote VtepMAC> dev flannel.N`,
2. a permanent FDB entry `<remote VtepMAC> dst <remote PublicIP> self dev flannel.N`,
3. a route `<remote subnet> via <remote subnet address> dev flannel.N onlink`.

With DirectRouting, a peer whose PublicIP is on-link on the external interface gets only a route
`<remote subnet> via <PublicIP> dev <ext>` instead.

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
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import shutil
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any

from backends import netlink as nl
from backends import nftset
from backends.base import BackendAttrs, BackendError, ExternalInterface
from subnetmgr.model import ConfigError, Lease, NetworkConfig, Subnet

log = logging.getLogger(__name__)

DEFAULT_VNI = 1
DEFAULT_PORT = 8472
"""The Linux kernel's VXLAN port (IANA's is 4789); flannel's `Port: 0` means this."""
VXLAN_OVERHEAD_V4 = 50
VXLAN_OVERHEAD_V6 = 70
"""Outer IPv6 header: flannel subtracts 50 whatever the underlay; 50 would be too little."""
MIN_DEVICE_MTU = 68
"""IPv4's minimum MTU (RFC 791)."""
MIN_UNDERLAY_MTU = MIN_DEVICE_MTU + VXLAN_OVERHEAD_V4
TX_CHECKSUM_KEY = "DisableTxChecksumOffload"
"""Our Backend key (not flannel's): turn tx-checksum-ip-generic off on the device."""
FILTER_PEERS_KEY = "FilterPeers"
"""Our Backend key (not flannel's): admit the VXLAN port only from lease PublicIPs (nftables)."""
FILTER_TABLE = "overlay_vxlan"
"""The nftables table (family ip) of the peer filter."""
FILTER_COMMENT = "overlay vxlan: admit only lease PublicIPs (FilterPeers)"
COMMAND_TIMEOUT = 10.0
"""Seconds allowed for a helper command (ethtool) or a pyroute2 request."""

MAX_LOGGED_FAILURES = 20
"""Refused entries logged one by one per reconcile; the rest are counted in one line."""

_IGNORED_DELETE_ERRORS = {errno.ENOENT, errno.ESRCH}
RTPROT_KERNEL = 2
_ZERO_MAC = "00:00:00:00:00:00"
_CANONICAL_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class VxlanOptions:
    """The vxlan keys of the config's Backend object, validated, flannel's defaults applied."""

    vni: int = DEFAULT_VNI
    port: int = DEFAULT_PORT
    gbp: bool = False
    learning: bool = False
    mtu: int = 0
    """The underlay MTU, as flannel's `MTU` key means it; 0: the external interface's. The
    device (and subnet.env's FLANNEL_MTU) get this minus the encapsulation overhead."""
    direct_routing: bool = False
    disable_tx_checksum: bool = False
    filter_peers: bool = False

    @property
    def device(self) -> str:
        return f"flannel.{self.vni}"

    @classmethod
    def from_backend(cls, backend: Mapping[str, Any]) -> VxlanOptions:
        """Parse the Backend object (keys already lower-cased); ConfigError on bad values."""
        doc = {k.lower(): v for k, v in backend.items()}
        vni = _int_opt(doc, "vni", "Backend.VNI", DEFAULT_VNI, 0, (1 << 24) - 1)
        if len(f"flannel.{vni}") > 15:
            raise ConfigError(
                "Backend.VNI",
                vni,
                "the device name flannel.<VNI> would exceed 15 characters; "
                "use a VNI below 10000000",
            )
        port = _int_opt(doc, "port", "Backend.Port", 0, 0, 65535) or DEFAULT_PORT
        mtu = _int_opt(doc, "mtu", "Backend.MTU", 0, 0, 65535)
        if 0 < mtu < MIN_UNDERLAY_MTU:
            raise ConfigError(
                "Backend.MTU",
                mtu,
                f"is the underlay MTU (the device gets {VXLAN_OVERHEAD_V4} less); must be 0 "
                f"(the external interface's) or at least {MIN_UNDERLAY_MTU}",
            )
        return cls(
            vni=vni,
            port=port,
            gbp=_bool_opt(doc, "gbp", "Backend.GBP"),
            learning=_bool_opt(doc, "learning", "Backend.Learning"),
            mtu=mtu,
            direct_routing=_bool_opt(doc, "directrouting", "Backend.DirectRouting"),
            disable_tx_checksum=_bool_opt(
                doc, TX_CHECKSUM_KEY.lower(), f"Backend.{TX_CHECKSUM_KEY}"
            ),
            filter_peers=_bool_opt(doc, FILTER_PEERS_KEY.lower(), f"Backend.{FILTER_PEERS_KEY}"),
        )


def _int_opt(doc: Mapping[str, Any], key: str, name: str, default: int, lo: int, hi: int) -> int:
    value = doc.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, f"must be an integer between {lo} and {hi}")
    if not lo <= value <= hi:
        raise ConfigError(name, value, f"must be between {lo} and {hi}")
    return value


def _bool_opt(doc: Mapping[str, Any], key: str, name: str) -> bool:
    value = doc.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(name, value, "must be true or false")
    return value


def device_mtu(options: VxlanOptions, ext: ExternalInterface) -> int:
    """The device's MTU (and subnet.env's FLANNEL_MTU): the underlay MTU (Backend.MTU, else the
    external interface's) minus the encapsulation overhead, as flannel computes it."""
    overhead = VXLAN_OVERHEAD_V6 if isinstance(ext.iface_addr, IPv6Address) else VXLAN_OVERHEAD_V4
    return (options.mtu or ext.mtu) - overhead


def random_mac() -> str:
    """A random, locally administered, unicast MAC (flannel's rule)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return nl.mac_str(bytes(raw))


# --------------------------------------------------------------------------- desired state


@dataclass(frozen=True)
class Peer:
    """One remote vxlan host as the kernel must know it."""

    subnet: IPv4Network
    vtep_mac: str
    public_ip: IPv4Address
    direct: bool
    """True: DirectRouting applies (PublicIP on-link), only a route via the PublicIP."""


def vtep_mac_of(lease: Lease) -> str:
    """The lease's VtepMAC, normalised; ValueError naming the lease when it is missing or bad."""
    data = lease.attrs.backend_data or {}
    mac = data.get("VtepMAC")
    if not isinstance(mac, str):
        raise ValueError(f"lease {lease.key}: BackendData has no VtepMAC string: {dict(data)!r}")
    if _CANONICAL_MAC.match(mac) and int(mac[:2], 16) & 1 == 0 and mac != _ZERO_MAC:
        return mac  # the common case, cheap: flannel writes lower-case colon-separated MACs
    try:
        raw = nl.mac_bytes(mac)
    except ValueError as e:
        raise ValueError(f"lease {lease.key}: BackendData.VtepMAC: {e}") from None
    if raw[0] & 1 or raw == b"\0" * 6:
        raise ValueError(f"lease {lease.key}: BackendData.VtepMAC {mac!r} is not a unicast MAC")
    return nl.mac_str(raw)


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
    for subnet, lease in peers.items():
        if lease.attrs.backend_type != "vxlan" or subnet == own_subnet:
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
        direct = onlink is not None and any(ip in net for net in onlink)
        out[subnet] = Peer(subnet, mac, ip, direct)
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
    have = {(f.lladdr, f.dst): f for f in fdb if f.ifindex == vx_index and f.lladdr != _ZERO_MAC}
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
        self.device = self.options.device
        self.mtu = device_mtu(self.options, ext)
        if self.mtu < MIN_DEVICE_MTU:
            raise BackendError(
                f"vxlan MTU {self.mtu} (external interface {ext.name} MTU {ext.mtu}) is below "
                f"{MIN_DEVICE_MTU}; use an external interface with a larger MTU or set "
                "Backend.MTU (the underlay MTU)"
            )
        if self.options.mtu > ext.mtu:
            log.warning(
                "Backend.MTU %d is larger than the MTU %d of %s: full-size packets will not "
                "fit the underlay unless its path MTU really is %d",
                self.options.mtu,
                ext.mtu,
                ext.name,
                self.options.mtu,
            )
        self.mac: str | None = None
        self.ifindex: int | None = None
        self.own: Lease | None = None
        self.last = ReconcileStats()
        self._ipr: Any = None
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

    # ----------------------------------------------------------------------- protocol

    async def prepare(self) -> BackendAttrs:
        """Create (or reuse) flannel.<VNI>; publish {"VNI": n, "VtepMAC": mac}."""
        async with self._lock:
            await self._ensure_device()
            if not self.options.filter_peers:
                await self._remove_filter()
        assert self.mac is not None
        return BackendAttrs(self.type, {"VNI": self.options.vni, "VtepMAC": self.mac})

    async def start(self, own: Lease) -> int:
        """Give the device our subnet's network address as /32; return the overlay MTU."""
        async with self._lock:
            self.own = own
            index = await self._ensure_device()
            await self._ensure_address(index)
        return self.mtu

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
        async with self._lock:
            stats = ReconcileStats()
            before = self.ifindex
            index = await self._ensure_device()
            stats.device_created = before is not None and index != before
            if self.own is not None:
                await self._ensure_address(index)
            onlink = await self._onlink_networks() if self.options.direct_routing else None
            own_subnet = self.own.subnet if self.own is not None else None
            key = (index, own_subnet, tuple(onlink) if onlink is not None else None)
            if changed is not None and self._desired is not None and key == self._desired_for:
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
                    assert self._desired is not None and changed is not None
                    candidates = self._public_ips(changed)  # the old peers' ...
                    todo, result = await self._changed_pass(
                        sock, index, peers, set(changed), own_subnet, onlink, stats
                    )
                    candidates |= self._public_ips(changed)  # ... and the new ones'
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

    def _public_ips(self, subnets: Collection[Subnet]) -> set[IPv4Address]:
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
            raise BackendError(
                f"{FILTER_PEERS_KEY}: cannot program nft table {nftset.FAMILY} {FILTER_TABLE}: {e}"
            ) from e
        self._filter_synced = True
        admitted = len(state.by_ip) - (own in state.by_ip)
        if result.rebuilt:
            log.warning(
                "peer filter: nft table %s %s replaced (%d peers): %s",
                nftset.FAMILY,
                FILTER_TABLE,
                admitted,
                "; ".join(result.rebuilt),
            )
        elif result.transactions:
            log.info("peer filter (%d peers): %s", admitted, nftset.describe(result))
        return result

    async def _remove_filter(self) -> None:
        """FilterPeers is off: delete a peer filter table left from an earlier run."""
        try:
            if await self.filter.delete():
                log.warning(
                    "%s is off: deleted the leftover nft table %s %s",
                    FILTER_PEERS_KEY,
                    nftset.FAMILY,
                    FILTER_TABLE,
                )
        except nftset.NftError as e:
            if nftset.nft_command() is None:
                log.debug("nft is not installed, so no peer filter table to remove: %s", e)
                return
            raise BackendError(
                f"{FILTER_PEERS_KEY} is off but the nft table {nftset.FAMILY} {FILTER_TABLE} "
                f"could not be checked or removed ({e}); it would keep dropping VXLAN from new "
                f"peers: delete it by hand (nft delete table {nftset.FAMILY} {FILTER_TABLE})"
            ) from e

    def counters(self) -> dict[str, int]:
        """The peer filter's drop counter, read now (one netlink request, bounded time); empty
        when FilterPeers is off or the table is missing. Published as overlay_vxlan_<name>."""
        if not self.options.filter_peers:
            return {}
        counter = self.filter.counter()
        if counter is None:
            return {}
        return {
            "peer_filter_dropped_packets_total": counter.packets,
            "peer_filter_dropped_bytes_total": counter.bytes,
        }

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
            network=self.config.network,
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
        changed: set[Subnet],
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
                    if entry.lladdr is not None and entry.lladdr != _ZERO_MAC:
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
                network=self.config.network,
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
        if self._nl is not None:
            self._nl.close()
            self._nl = None
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    # ----------------------------------------------------------------------- helpers

    def _socket(self) -> nl.RtnlSocket:
        if self._nl is None:
            self._nl = nl.RtnlSocket(self.netns)
        return self._nl

    async def _iproute(self) -> Any:
        if self._ipr is None:
            from pyroute2 import AsyncIPRoute

            if self.netns is not None and not os.path.exists(f"/run/netns/{self.netns}"):  # noqa: ASYNC240 (a stat of a tmpfs)
                raise BackendError(
                    f"network namespace {self.netns!r} does not exist; create it or pass no netns"
                )
            ipr = AsyncIPRoute(netns=self.netns, flags=0) if self.netns else AsyncIPRoute()
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await ipr.setup_endpoint()
            self._ipr = ipr
        return self._ipr

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        ipr = await self._iproute()
        async with asyncio.timeout(COMMAND_TIMEOUT):
            result = await getattr(ipr, method)(*args, **kwargs)
            if hasattr(result, "__aiter__"):
                return [item async for item in result]
            return result

    async def _get_link(self, name: str) -> Any | None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            links = await self._call("link", "get", ifname=name)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return None
            raise
        return links[0] if links else None

    def _incompatibility(self, link: Any) -> str | None:
        """Why an existing device cannot be reused, or None when it can."""
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "vxlan":
            return f"kind {kind!r}, not vxlan"
        data = info.get_attr("IFLA_INFO_DATA")
        have = {
            "VNI": data.get_attr("IFLA_VXLAN_ID"),
            "port": data.get_attr("IFLA_VXLAN_PORT"),
            "local": data.get_attr("IFLA_VXLAN_LOCAL"),
            "link": data.get_attr("IFLA_VXLAN_LINK"),
            "GBP": bool(data.get_attr("IFLA_VXLAN_GBP")),
        }
        want = {
            "VNI": self.options.vni,
            "port": self.options.port,
            "local": str(self.ext.iface_addr),
            "link": self.ext.index,
            "GBP": self.options.gbp,
        }
        diffs = [f"{k} {have[k]!r} (want {want[k]!r})" for k in want if have[k] != want[k]]
        return ", ".join(diffs) or None

    async def _ensure_device(self) -> int:
        """The device's index; creates, adopts, repairs or replaces flannel.<VNI> as needed."""
        try:
            link = await self._get_link(self.device)
            if link is not None:
                why = self._incompatibility(link)
                if why is not None:
                    log.warning("replacing incompatible device %s: %s", self.device, why)
                    await self._call("link", "del", index=link["index"])
                    link = None
            if link is None:
                return await self._create_device()
            return await self._adopt_device(link)
        except (OSError, TimeoutError) as e:
            raise BackendError(
                f"cannot set up vxlan device {self.device} on {self.ext.name} "
                f"(local {self.ext.iface_addr}): {e}"
            ) from e

    async def _create_device(self) -> int:
        if self.mac is None:
            self.mac = random_mac()
        await self._call(
            "link",
            "add",
            ifname=self.device,
            kind="vxlan",
            vxlan_id=self.options.vni,
            vxlan_local=str(self.ext.iface_addr),
            vxlan_link=self.ext.index,
            vxlan_port=self.options.port,
            vxlan_learning=int(self.options.learning),
            **({"vxlan_gbp": True} if self.options.gbp else {}),
            address=self.mac,
            mtu=self.mtu,
        )
        link = await self._get_link(self.device)
        if link is None:
            raise BackendError(f"vxlan device {self.device} vanished right after creation")
        index = int(link["index"])
        log.info(
            "created %s (VNI %d, port %d, local %s, dev %s, MAC %s, MTU %d)",
            self.device,
            self.options.vni,
            self.options.port,
            self.ext.iface_addr,
            self.ext.name,
            self.mac,
            self.mtu,
        )
        await self._tune(index)
        await self._call("link", "set", index=index, state="up")
        self.ifindex = index
        return index

    async def _adopt_device(self, link: Any) -> int:
        index = int(link["index"])
        mac = link.get_attr("IFLA_ADDRESS")
        if self.mac is None:
            self.mac = mac
            log.info("reusing existing %s with MAC %s", self.device, mac)
        changes: dict[str, Any] = {}
        if mac != self.mac:
            changes["address"] = self.mac
        if link.get_attr("IFLA_MTU") != self.mtu:
            changes["mtu"] = self.mtu
        if not link["flags"] & 1:  # IFF_UP
            changes["state"] = "up"
        data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        if bool(data.get_attr("IFLA_VXLAN_LEARNING")) != self.options.learning:
            await self._call(
                "link",
                "set",
                index=index,
                kind="vxlan",
                vxlan_learning=int(self.options.learning),
            )
        if changes:
            log.info("updating %s: %s", self.device, changes)
            await self._call("link", "set", index=index, **changes)
        if index != self.ifindex:
            await self._tune(index)
        self.ifindex = index
        return index

    async def _tune(self, index: int) -> None:
        """ethtool settings: tx-checksum-ip-generic off when DisableTxChecksumOffload is set."""
        if not self.options.disable_tx_checksum:
            return
        ethtool = shutil.which("ethtool")
        if ethtool is None:
            raise BackendError(
                f"Backend.{TX_CHECKSUM_KEY} is set but ethtool is not installed; "
                "install it (apt-get install ethtool) or drop the key"
            )
        cmd = [ethtool, "-K", self.device, "tx-checksum-ip-generic", "off"]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                _out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise BackendError(f"{' '.join(cmd)} did not finish in {COMMAND_TIMEOUT} s") from None
        if proc.returncode != 0:
            raise BackendError(
                f"{' '.join(cmd)} failed ({err.decode(errors='replace').strip()}); "
                f"Backend.{TX_CHECKSUM_KEY} needs it"
            )
        log.info("%s: tx-checksum-ip-generic off", self.device)

    async def _ensure_address(self, index: int) -> None:
        """Exactly our subnet's network address /32 on the device (IPv4)."""
        assert self.own is not None
        want = self.own.subnet.network_address
        addrs = await self._call("get_addr", family=2, index=index)
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in addrs}
        if (str(want), 32) not in have:
            await self._call("addr", "add", index=index, address=str(want), prefixlen=32)
            log.info("address %s/32 on %s", want, self.device)
        for addr, plen in have:
            if (addr, plen) != (str(want), 32):
                log.info("removing stale address %s/%d from %s", addr, plen, self.device)
                await self._call("addr", "del", index=index, address=addr, prefixlen=plen)

    async def _onlink_networks(self) -> list[IPv4Network]:
        """IPv4 networks directly attached to the external interface (DirectRouting)."""
        addrs = await self._call("get_addr", family=2, index=self.ext.index)
        return [
            IPv4Network(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}", strict=False)
            for a in addrs
        ]
