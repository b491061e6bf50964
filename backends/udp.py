"""Flannel's `udp` backend: a TUN device and a userspace loop that carries raw IPv4 in UDP.

Wire compatible with flannel (shared/FLANNEL-COMPAT.md, "UDP backend"): TUN device `flannel0`
(IFF_TUN | IFF_NO_PI on the outside), address = our lease's network address /32, MTU = external
MTU - 28, one route for the whole Network via flannel0, a UDP socket on <iface addr>:Port (8285),
the raw inner IPv4 packet as the whole UDP payload, TTL decremented both ways with an RFC 1624
checksum update and dropped at zero, ICMP net unreachable for a destination no lease covers.

Beyond flannel: a datagram is accepted only from a lease's PublicIP and our Port, and each inner
packet only when its source lies in that lease's subnet and its destination in ours; everything
else, and malformed packets, is dropped and counted by reason (`counters()`).

The packet loop runs in two worker processes (tun->udp and udp->tun, see `backends.udp_worker`
for why processes) and gets the peer table over a socket, so reconcile() never restarts it.
flannel0 is persistent (TUNSETPERSIST): a daemon that stops or dies leaves it, its address and
its route in place, and the next one attaches to it (replacing it only when its flags differ).
By default the TUN device uses virtio-net offloads (the kernel hands over 64 KiB TCP super-packets
that the loop cuts into MTU-sized packets itself), the socket sends them with UDP_SEGMENT and
receives with UDP_GRO. On the wire it is still one raw IP packet per datagram.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import socket
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from backends import udp_worker
from backends.base import BackendAttrs, BackendError, ExternalInterface
from backends.links import LinkClient
from backends.tun import TunBusy, open_tun
from subnetmgr.model import Lease, NetworkConfig, Subnet

log = logging.getLogger(__name__)

DEFAULT_PORT = 8285
DEVICE = "flannel0"
ENCAP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8)
ACCEPTED_TYPES = frozenset({"", "udp"})
"""Flannel's udp backend writes no BackendType; we accept that and an explicit "udp"."""

ROLES = ("tx", "rx")
"""One worker process per direction; its index is its stats slot."""
BUSY_WAIT = 5.0
"""Seconds to wait for a flannel0 still held by a previous loop (its workers exit on EOF)."""
IFF_TUN_TYPE = 1  # IFLA_TUN_TYPE of a TUN (not TAP) device
APPLY_TIMEOUT = 5.0
SOCKET_BUFFER = 4 << 20
SO_SNDBUFFORCE = 32  # Linux values; the socket module does not export them
SO_RCVBUFFORCE = 33


@dataclass(frozen=True)
class LoopOptions:
    """How the packet loop moves packets (all on by default; measured in bench/bench_udp.py)."""

    vnet_hdr: bool = True
    """TUN offloads: virtio_net_hdr on every read and write; GSO writes of coalesced packets."""
    tso: bool = True
    """With vnet_hdr: read 64 KiB TSO super-packets and segment them here (else the kernel does)."""
    udp_segment: bool = True
    """Send a super-packet's segments, or a run of same-size packets to one peer, with one
    sendmsg (UDP_SEGMENT)."""
    udp_gro: bool = True
    """Receive coalesced datagrams with one recvmsg (UDP_GRO)."""


def _port(config: NetworkConfig) -> int:
    raw = config.backend.get("port", 0)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 65535:
        raise BackendError(
            f"udp backend: Backend.Port={raw!r} is not a UDP port; use 1..65535 (0 or absent "
            f"means {DEFAULT_PORT})"
        )
    return raw or DEFAULT_PORT


def _disable_ipv6(device: str) -> None:
    """flannel0 carries IPv4 only; keep the kernel's IPv6 router solicitations off it.

    A sysctl write in /proc: it never blocks on I/O, so it is fine on the event loop.
    """
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{device}/disable_ipv6").write_text("1")


class UdpBackend:
    type = "udp"

    def __init__(
        self,
        config: NetworkConfig,
        ext: ExternalInterface,
        *,
        device: str = DEVICE,
        options: LoopOptions | None = None,
        persist: bool = True,
    ) -> None:
        """`persist`: flannel0 outlives the daemon (TUNSETPERSIST), see `prepare`."""
        if not config.enable_ipv4:
            raise BackendError(
                "the udp backend carries IPv4 only (as flannel's), but the network config is "
                f"IPv6-only (EnableIPv4 false, IPv6Network {config.ipv6_network}): use "
                'Backend {"Type": "vxlan"} or {"Type": "host-gw"}'
            )
        if config.enable_ipv6:
            raise BackendError(
                "the udp backend carries IPv4 only (as flannel's), but the network config sets "
                f"EnableIPv6 (IPv6Network {config.ipv6_network}): remove EnableIPv6, or use "
                'Backend {"Type": "vxlan"} or {"Type": "host-gw"} for dual stack'
            )
        self.config = config
        self.ext = ext
        self.device = device
        self.port = _port(config)
        self.options = options or LoopOptions()
        self.mtu = ext.mtu - ENCAP_OVERHEAD
        self.persist = persist
        self.reused_device = False
        """Whether prepare() attached to a flannel0 that was already there (kept as it was)."""
        self._tun: int | None = None
        self._sock: socket.socket | None = None
        self._stats_fd: int | None = None
        self._stats: mmap.mmap | None = None
        self._words: memoryview | None = None
        self._workers: list[tuple[asyncio.subprocess.Process, socket.socket]] = []
        self._gen = 0
        self._peers: dict[Subnet, IPv4Address] = {}
        self._own: Subnet | None = None
        """Our lease's subnet: the rx worker accepts only inner destinations inside it."""

    # ------------------------------------------------------------------ Backend protocol

    async def prepare(self) -> BackendAttrs:
        """Create flannel0 (MTU, up) and bind the UDP socket; publish what flannel publishes.

        flannel0 is persistent: stopping or killing the daemon leaves it, its address and its
        route in place (packets to remote subnets queue and drop there instead of taking
        another route), and the next prepare() attaches to it. An existing flannel0 that is
        not a TUN device with our flags (IFF_NO_PI, IFF_VNET_HDR as LoopOptions.vnet_hdr says,
        single queue) is deleted and created anew, with a log line."""
        if self.mtu < 68:
            raise BackendError(
                f"udp backend: external interface {self.ext.name} has MTU {self.ext.mtu}; "
                f"flannel0 needs at least {68 + ENCAP_OVERHEAD}"
            )
        if self._tun is None:
            self.reused_device = await self._check_existing_device()
            self._tun = await self._open_device()
            try:
                self._sock = self._bind()
            except BackendError:
                os.close(self._tun)
                self._tun = None
                raise
        await self._configure_link()
        return BackendAttrs("")

    async def start(self, own: Lease) -> int:
        """Address flannel0 with our lease, route the Network through it, start the loop."""
        if self._tun is None:
            raise BackendError("udp backend: start() called before prepare()")
        await self._configure_address(own)
        self._own = own.subnet
        if not self._workers:
            await self._start_workers()
        else:
            await self._revive()
        await self._send_table()  # also when the loop runs: our subnet may have changed
        log.info(
            "udp backend: %s up, %s/32, MTU %d, UDP %s:%d, loop options %s",
            self.device,
            own.subnet.network_address,
            self.mtu,
            self.ext.iface_addr,
            self.port,
            self.options,
        )
        return self.mtu

    async def reconcile(
        self, peers: Mapping[Subnet, Lease], changed: Collection[Subnet] | None = None
    ) -> None:
        """Hand the loop the new peer table; return once every worker has applied it.

        `changed` (the subnets a lease event touched) is ignored: every pass rebuilds the whole
        table in memory and hands it to the workers, no kernel state is read, so a pass costs
        microseconds per peer and an incremental variant would save little."""
        table: dict[Subnet, IPv4Address] = {}
        for subnet, lease in peers.items():
            if lease.attrs.backend_type not in ACCEPTED_TYPES:
                log.debug(
                    "udp backend: ignoring lease %s with BackendType %r",
                    subnet,
                    lease.attrs.backend_type,
                )
                continue
            table[subnet] = lease.attrs.public_ip
        if table != self._peers:
            added = table.keys() - self._peers.keys()
            removed = self._peers.keys() - table.keys()
            log.info("udp backend: %d peers (+%d -%d)", len(table), len(added), len(removed))
        self._peers = table
        if self._workers:
            await self._revive()
            await self._send_table()

    async def close(self) -> None:
        """Stop the loop (EOF on its control sockets) and release our descriptors.

        A persistent flannel0 stays, with its address and route, for the next daemon."""
        for _proc, ctl in self._workers:
            ctl.close()
        for proc, _ctl in self._workers:
            try:
                async with asyncio.timeout(3):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self._workers = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._tun is not None:
            os.close(self._tun)
            self._tun = None
        if self._words is not None:
            self._words.release()
            self._words = None
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if self._stats_fd is not None:
            os.close(self._stats_fd)
            self._stats_fd = None

    # ------------------------------------------------------------------ counters

    def counters(self) -> dict[str, int]:
        """All loop counters summed over the workers (see udp_worker.COUNTERS)."""
        result = dict.fromkeys(udp_worker.COUNTERS, 0)
        words = self._words
        if words is None:
            return result
        for slot in range(len(self._workers)):
            base = slot * udp_worker.SLOT_WORDS
            for i, name in enumerate(udp_worker.COUNTERS):
                result[name] += words[base + i + 1]
        return result

    @property
    def tx_packets(self) -> int:
        return self.counters()["tx_packets"]

    @property
    def rx_packets(self) -> int:
        return self.counters()["rx_packets"]

    @property
    def dropped_unknown_source(self) -> int:
        return self.counters()["dropped_unknown_source"]

    @property
    def dropped_malformed(self) -> int:
        return self.counters()["dropped_malformed"]

    @property
    def dropped_ttl(self) -> int:
        return self.counters()["dropped_ttl"]

    @property
    def dropped_no_route(self) -> int:
        return self.counters()["dropped_no_route"]

    @property
    def dropped_source_port(self) -> int:
        return self.counters()["dropped_source_port"]

    @property
    def dropped_inner_source(self) -> int:
        return self.counters()["dropped_inner_source"]

    @property
    def dropped_inner_destination(self) -> int:
        return self.counters()["dropped_inner_destination"]

    @property
    def worker_pids(self) -> list[int]:
        """The packet loop's processes (tx, rx): unchanged across reconcile()."""
        return [proc.pid for proc, _ in self._workers]

    @property
    def running(self) -> bool:
        return bool(self._workers) and all(p.returncode is None for p, _ in self._workers)

    # ------------------------------------------------------------------ internals

    async def _check_existing_device(self) -> bool:
        """True when a compatible flannel0 exists (we attach to it); delete an incompatible one."""
        from pyroute2.netlink.exceptions import NetlinkError

        want_vnet = 1 if self.options.vnet_hdr else 0
        links = LinkClient()
        try:
            link = await links.get_link(self.device)
            if link is None:
                log.info("udp backend: creating %s", self.device)
                return False
            info = link.get("IFLA_LINKINFO")
            kind = info.get("IFLA_INFO_KIND") if info else None
            data = info.get("IFLA_INFO_DATA") if info else None
            found = {
                "kind": kind,
                "type": data.get("IFLA_TUN_TYPE") if data else None,
                "pi": data.get("IFLA_TUN_PI") if data else None,
                "vnet_hdr": data.get("IFLA_TUN_VNET_HDR") if data else None,
                "multi_queue": data.get("IFLA_TUN_MULTI_QUEUE") if data else None,
                "persist": data.get("IFLA_TUN_PERSIST") if data else None,
            }
            want = {"kind": "tun", "type": IFF_TUN_TYPE, "pi": 0, "vnet_hdr": want_vnet,
                    "multi_queue": 0}  # fmt: skip
            if all(found[k] == v for k, v in want.items()):
                log.info(
                    "udp backend: attaching to the existing %s (index %d, persistent %s), "
                    "keeping its address and routes",
                    self.device,
                    link["index"],
                    bool(found["persist"]),
                )
                return True
            log.warning(
                "udp backend: replacing the existing %s: it is %s, we need %s",
                self.device,
                {k: found[k] for k in want},
                want,
            )
            await links.call("link", "del", index=link["index"])
            return False
        except (OSError, TimeoutError, NetlinkError) as e:
            raise BackendError(
                f"udp backend: cannot inspect or replace the existing {self.device}: {e!r}; "
                f"delete it with `ip link del {self.device}`"
            ) from None
        finally:
            links.close()

    async def _open_device(self) -> int:
        """open_tun, waiting up to BUSY_WAIT s for a previous loop's workers to let go."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_WAIT
        while True:
            try:
                return open_tun(
                    self.device,
                    vnet_hdr=self.options.vnet_hdr,
                    tso=self.options.tso,
                    persist=self.persist,
                )
            except TunBusy:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for opt, fallback in (
                (SO_RCVBUFFORCE, socket.SO_RCVBUF),
                (SO_SNDBUFFORCE, socket.SO_SNDBUF),
            ):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, fallback, SOCKET_BUFFER)
            sock.bind((str(self.ext.iface_addr), self.port))
        except OSError as e:
            sock.close()
            raise BackendError(
                f"udp backend: cannot bind UDP {self.ext.iface_addr}:{self.port}: {e}; "
                "is another flannel running, or set Backend.Port to a free port"
            ) from None
        return sock

    async def _link_index(self, links: LinkClient) -> int:
        link = await links.get_link(self.device)
        if link is None:
            raise OSError(f"{self.device} does not exist")
        index: int = link["index"]
        return index

    async def _configure_link(self) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        links = LinkClient()
        try:
            idx = await self._link_index(links)
            await links.call("link", "set", index=idx, mtu=self.mtu)
            await links.call("link", "set", index=idx, state="up")
        except (OSError, TimeoutError, NetlinkError) as e:
            raise BackendError(f"udp backend: cannot set up {self.device}: {e!r}") from None
        finally:
            links.close()
        _disable_ipv6(self.device)

    async def _configure_address(self, own: Lease) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        addr = own.subnet.network_address
        network = self.config.network
        assert network is not None  # __init__ refuses EnableIPv6, so IPv6-only too
        links = LinkClient()
        try:
            idx = await self._link_index(links)
            await links.ensure_host_address(idx, addr, self.device)
            await links.call(
                "route",
                "replace",
                dst=str(network.network_address),
                dst_len=network.prefixlen,
                oif=idx,
            )
        except (OSError, TimeoutError, NetlinkError) as e:
            raise BackendError(
                f"udp backend: cannot address {self.device} with {addr}/32 and route "
                f"{self.config.network}: {e!r}"
            ) from None
        finally:
            links.close()

    async def _start_workers(self) -> None:
        self._stats_fd = os.memfd_create("overlay-udp-stats", os.MFD_CLOEXEC)
        size = len(ROLES) * udp_worker.SLOT_WORDS * 8
        os.ftruncate(self._stats_fd, size)
        self._stats = mmap.mmap(self._stats_fd, size)
        self._words = memoryview(self._stats).cast("Q")
        for slot in range(len(ROLES)):
            self._workers.append(await self._spawn(slot))

    async def _spawn(self, slot: int) -> tuple[asyncio.subprocess.Process, socket.socket]:
        assert self._tun is not None and self._sock is not None and self._stats_fd is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        fds = (self._tun, self._sock.fileno(), theirs.fileno(), self._stats_fd)
        args = [
            "--role", ROLES[slot],
            "--tun", str(fds[0]),
            "--sock", str(fds[1]),
            "--ctl", str(fds[2]),
            "--stats", str(fds[3]),
            "--slot", str(slot),
            "--mtu", str(self.mtu),
        ]  # fmt: skip
        opts = self.options
        if opts.vnet_hdr:
            args.append("--vnet")
        if opts.udp_segment:
            args.append("--gso")
        if opts.udp_gro:
            args.append("--gro")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "backends.udp_worker", *args, pass_fds=fds
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        return proc, ours

    async def _revive(self) -> None:
        """Restart any worker that died (a bug, an OOM kill): the next reconcile heals the loop."""
        for slot, (proc, ctl) in enumerate(self._workers):
            if proc.returncode is None:
                continue
            log.error(
                "udp backend: %s worker (pid %d) exited with %s; restarting it",
                ROLES[slot],
                proc.pid,
                proc.returncode,
            )
            ctl.close()
            self._workers[slot] = await self._spawn(slot)

    async def _send_table(self) -> None:
        self._gen += 1
        gen = self._gen
        peers = [
            [int(subnet.network_address), subnet.prefixlen, str(ip)]
            for subnet, ip in self._peers.items()
        ]
        own = None if self._own is None else [int(self._own.network_address), self._own.prefixlen]
        doc = {"gen": gen, "port": self.port, "peers": peers, "own": own}
        line = json.dumps(doc).encode() + b"\n"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(APPLY_TIMEOUT):
                for _proc, ctl in self._workers:
                    await loop.sock_sendall(ctl, line)
                await self._wait_applied(gen)
        except (OSError, TimeoutError) as e:
            dead = [p.returncode for p, _ in self._workers if p.returncode is not None]
            raise BackendError(
                f"udp backend: the packet loop did not take peer table {gen} ({e!r}); "
                f"exited workers: {dead}; restart the daemon"
            ) from None

    async def _wait_applied(self, gen: int) -> None:
        words = self._words
        assert words is not None
        while True:
            if all(
                words[slot * udp_worker.SLOT_WORDS + udp_worker.GEN] >= gen
                for slot in range(len(self._workers))
            ):
                return
            for proc, _ in self._workers:
                if proc.returncode is not None:
                    raise OSError(f"worker {proc.pid} exited with {proc.returncode}")
            await asyncio.sleep(0.002)
