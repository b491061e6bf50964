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
are already right. A device deleted by hand is recreated with the same MAC; on restart an
existing compatible device (same VNI, port, local address, link, GBP) is reused with its MAC.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any

from backends import netlink as nl
from backends.base import BackendAttrs, BackendError, ExternalInterface
from subnetmgr.model import ConfigError, Lease, NetworkConfig, Subnet

log = logging.getLogger(__name__)

DEFAULT_VNI = 1
DEFAULT_PORT = 8472
"""The Linux kernel's VXLAN port (IANA's is 4789); flannel's `Port: 0` means this."""
VXLAN_OVERHEAD_V4 = 50
VXLAN_OVERHEAD_V6 = 70
TX_CHECKSUM_KEY = "DisableTxChecksumOffload"
"""Our Backend key (not flannel's): turn tx-checksum-ip-generic off on the device."""
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
    """0: derived from the external interface (MTU - 50, or - 70 on an IPv6 underlay)."""
    direct_routing: bool = False
    disable_tx_checksum: bool = False

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
        if 0 < mtu < 68:
            raise ConfigError("Backend.MTU", mtu, "must be 0 (automatic) or at least 68")
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
    """The configured MTU, else the external MTU minus the encapsulation overhead."""
    if options.mtu:
        return options.mtu
    overhead = VXLAN_OVERHEAD_V6 if isinstance(ext.iface_addr, IPv6Address) else VXLAN_OVERHEAD_V4
    return ext.mtu - overhead


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
class Plan:
    """The requests that make the kernel match, and what they are (for logs and tests)."""

    adds: list[nl.Request] = field(default_factory=list)
    deletes: list[nl.Request] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.adds) + len(self.deletes)


def plan(
    desired: Mapping[IPv4Network, Peer],
    *,
    vx_index: int,
    ext_index: int,
    network: IPv4Network,
    neighbours: list[nl.Neighbour],
    fdb: list[nl.FdbEntry],
    routes: list[nl.Route],
) -> Plan:
    """The difference between the kernel's entries and the desired peers, as requests.

    Adds come in flannel's order (neighbours, FDB, routes); deletes remove routes first.
    Which kernel entries are ours: permanent neighbours and non-zero-MAC FDB entries on the vxlan
    device; main-table routes through the vxlan device (but not the kernel's own routes for
    addresses, protocol "kernel"); main-table routes with a gateway on the
    external interface to a subnet strictly inside the cluster network (DirectRouting's).
    """
    neigh_adds: list[nl.Request] = []
    fdb_adds: list[nl.Request] = []
    route_adds: list[nl.Request] = []
    neigh_deletes: list[nl.Request] = []
    fdb_deletes: list[nl.Request] = []
    route_deletes: list[nl.Request] = []

    # Neighbours: keyed by the remote subnet's network address.
    have_neigh = {n.dst: n for n in neighbours if n.ifindex == vx_index}
    want_neigh = {
        peer.subnet.network_address: peer.vtep_mac for peer in desired.values() if not peer.direct
    }
    for dst, mac in want_neigh.items():
        cur = have_neigh.get(dst)
        if cur is None or cur.lladdr != mac or not cur.permanent:
            neigh_adds.append(nl.neigh_replace(vx_index, dst, mac))
    for dst, cur in have_neigh.items():
        if dst not in want_neigh and cur.permanent:
            neigh_deletes.append(nl.neigh_delete(vx_index, dst))

    # FDB: keyed by (MAC, destination); a replace rewrites the MAC's first destination.
    have_fdb = {
        (f.lladdr, f.dst): f for f in fdb if f.ifindex == vx_index and f.lladdr != _ZERO_MAC
    }
    want_fdb = {(peer.vtep_mac, peer.public_ip) for peer in desired.values() if not peer.direct}
    for mac, ip in want_fdb:
        cur_fdb = have_fdb.get((mac, ip))
        if cur_fdb is None or not cur_fdb.state & nl.NUD_PERMANENT:
            fdb_adds.append(nl.fdb_replace(vx_index, mac, ip))
    for mac, dst_ip in have_fdb:
        if (mac, dst_ip) not in want_fdb:
            fdb_deletes.append(nl.fdb_delete(vx_index, mac, dst_ip))

    # Routes: keyed by destination.
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
            route_adds.append(nl.route_replace(subnet, gw, oif, onlink=onlink))
        # A replace overwrites the metric-0 route; routes with other metrics are stale.
        route_deletes.extend(nl.route_delete(r) for r in group if r is not keep and r.priority)
    for group in by_dst.values():
        route_deletes.extend(nl.route_delete(r) for r in group)

    return Plan(
        adds=neigh_adds + fdb_adds + route_adds,
        deletes=route_deletes + neigh_deletes + fdb_deletes,
    )


# --------------------------------------------------------------------------- the backend


@dataclass
class ReconcileStats:
    """What the last reconcile did; for logs, metrics and tests."""

    peers: int = 0
    applied: int = 0
    failed: int = 0
    device_created: bool = False


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
        if self.mtu < 68:
            raise BackendError(
                f"vxlan MTU {self.mtu} (external interface {ext.name} MTU {ext.mtu}) is below "
                "68; use an external interface with a larger MTU or set Backend.MTU"
            )
        self.mac: str | None = None
        self.ifindex: int | None = None
        self.own: Lease | None = None
        self.last = ReconcileStats()
        self._ipr: Any = None
        self._nl: nl.RtnlSocket | None = None
        self._lock = asyncio.Lock()
        self._skipped: set[tuple[str, str]] = set()

    # ----------------------------------------------------------------------- protocol

    async def prepare(self) -> BackendAttrs:
        """Create (or reuse) flannel.<VNI>; publish {"VNI": n, "VtepMAC": mac}."""
        async with self._lock:
            await self._ensure_device()
        assert self.mac is not None
        return BackendAttrs(self.type, {"VNI": self.options.vni, "VtepMAC": self.mac})

    async def start(self, own: Lease) -> int:
        """Give the device our subnet's network address as /32; return the overlay MTU."""
        async with self._lock:
            self.own = own
            index = await self._ensure_device()
            await self._ensure_address(index)
        return self.mtu

    async def reconcile(self, peers: Mapping[Subnet, Lease]) -> None:
        """Make the kernel hold exactly the entries for `peers` (vxlan leases only)."""
        async with self._lock:
            stats = ReconcileStats()
            before = self.ifindex
            index = await self._ensure_device()
            stats.device_created = before is not None and index != before
            if self.own is not None:
                await self._ensure_address(index)
            onlink = await self._onlink_networks() if self.options.direct_routing else None
            own_subnet = self.own.subnet if self.own is not None else None
            desired = desired_peers(peers, own_subnet, onlink, self._skipped)
            sock = self._socket()
            try:
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
                )
                result = await sock.apply([*todo.adds, *todo.deletes]) if todo else None
            except (OSError, TimeoutError) as e:
                # Start over with a fresh socket next time (a half-read answer stays behind).
                sock.close()
                self._nl = None
                raise BackendError(f"reading or programming {self.device}'s peers: {e}") from e
            stats.peers = len(desired)
            if result is not None:
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
                    "vxlan reconcile: %d peers, %d changes (%d added/replaced, %d removed), "
                    "%d failed",
                    len(desired),
                    len(todo),
                    len(todo.adds),
                    len(todo.deletes),
                    stats.failed,
                )
            self.last = stats

    async def close(self) -> None:
        """Close our sockets; devices, neighbours, FDB entries and routes stay in place."""
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
