"""`overlayctl trace SRC DST`: what actually crosses the underlay between two containers.

SRC and DST are container addresses (any address inside a lease's subnet). The leases in etcd
say which host holds each one (its PublicIP) and the network config which encapsulation the
hosts use (vxlan: VNI and Backend.Port, 8472 by default; udp: Backend.Port, 8285; host-gw:
plain IP). SRC and DST may be IPv6 addresses (dual stack or IPv6-only networks): the leases
are then found by their IPv6 subnet, the hosts are their PublicIPv6s, and the encapsulation is
VXLAN over the IPv6 underlay (flannel-v6.<VNI>) or plain IPv6 (host-gw). The trace captures,
bounded by --timeout and --count, at up to three points:

    source:      the source host's underlay interface (the one holding its PublicIP)
    destination: the destination host's underlay interface
    delivered:   the destination host's device towards DST (`ip route get DST` there: the
                 container bridge), i.e. the packet was decapsulated and forwarded

Each point is a `tcpdump -w -` (in `--src-netns`/`--dst-netns` when given, as in the lab;
else in this namespace, which must then hold SRC's or DST's host), with a BPF filter on the two
hosts and the encapsulation port. The pcap stream is read with scapy and every frame decoded
here (decode_frame): outer and inner IPv4 or IPv6 addresses, TTLs or hop limits, sizes,
ports, the VNI. A frame that does not decode (truncated, garbage on the port) is shown as
undecodable with the reason.

Last seen: for the packets from SRC to DST, the furthest point any reached. `--probe` sends UDP
datagrams from SRC (in `--probe-netns`, SRC's container namespace) to DST while capturing;
without it the trace only watches. Exit 0 when a SRC->DST packet reached the last point
captured, 3 when none did, 1 when the trace could not run, 2 for bad input.

scapy is imported only here, and only when a trace runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import json
import math
import os
import shutil
import signal
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any, cast

VXLAN_HEADER = 8
ETHERNET_HEADER = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPV6_HEADER = 40
IPV6_EXTENSIONS = (0, 43, 60)
"""Hop-by-hop, routing and destination options: (next header, length in 8 bytes - 1, ...)."""
IPV6_FRAGMENT = 44
MAX_EXTENSIONS = 8
"""Extension headers walked before the transport header; past this the packet is refused."""
VLAN_TYPES = (0x8100, 0x88A8)
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = (12, 14, 101)  # DLT_RAW as tcpdump writes it on a TUN device (and variants)
LINKTYPE_LINUX_SLL = 113
STAGES = ("source", "destination", "delivered")
STAGE_TEXT = {
    "source": "left the source host",
    "destination": "reached the destination host",
    "delivered": "delivered towards DST on the destination host",
}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6"}
MAX_FRAME = 65535
"""The snap length of the captures, and the most of a frame decoded."""


Address = IPv4Address | IPv6Address


class TraceError(Exception):
    """The trace cannot run: exit 1 with this message."""


# ---------------------------------------------------------------------- decoding (pure)


@dataclass(frozen=True)
class IPInfo:
    """The fields of an IPv4 or IPv6 header (and of the TCP/UDP ports or ICMP type after it).

    IPv6: `ttl` is the hop limit, `length` the whole packet (40 + payload length), `proto` the
    transport header's number after any extension headers, and `ident` (IPv6 has no
    identification field) a CRC-32 of the transport payload: it tells one packet from the next
    at every capture point, as IPv4's identification does."""

    src: str
    dst: str
    proto: int
    ttl: int
    length: int
    ident: int
    sport: int | None = None
    dport: int | None = None
    icmp: tuple[int, int] | None = None
    payload: bytes = field(default=b"", repr=False, compare=False)
    """The transport payload (UDP: after its 8-byte header), cut at the IP total length."""
    version: int = 4

    def brief(self) -> str:
        name = PROTOCOLS.get(self.proto, f"proto {self.proto}")
        host = (lambda a: f"[{a}]") if self.version == 6 else (lambda a: a)
        src = self.src if self.sport is None else f"{host(self.src)}:{self.sport}"
        dst = self.dst if self.dport is None else f"{host(self.dst)}:{self.dport}"
        icmp = "" if self.icmp is None else f" type {self.icmp[0]} code {self.icmp[1]}"
        ttl = "hlim" if self.version == 6 else "ttl"
        return f"{src} > {dst} {name}{icmp} {ttl} {self.ttl} len {self.length}"

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("payload")
        doc["icmp"] = list(self.icmp) if self.icmp is not None else None
        return doc


IPv4Info = IPInfo
"""The name before IPv6 was decoded."""


class Undecodable(ValueError):
    """A frame or packet that does not decode; the message says what is wrong."""


def decode_ipv4(data: bytes) -> IPInfo:
    """An IPv4 packet (header and transport ports), checked against the bytes there are."""
    if len(data) < 20:
        raise Undecodable(f"truncated IPv4 header: {len(data)} of 20 bytes")
    version, ihl = data[0] >> 4, (data[0] & 0x0F) * 4
    if version != 4:
        raise Undecodable(f"not IPv4: version {version}")
    if ihl < 20 or ihl > len(data):
        raise Undecodable(f"bad IPv4 header length {ihl} ({len(data)} bytes captured)")
    total, ident, frag, ttl, proto = struct.unpack_from("!2xHHHBB", data)
    if total < ihl:
        raise Undecodable(f"IPv4 total length {total} is shorter than its header ({ihl})")
    if total > len(data):
        raise Undecodable(f"truncated IPv4 packet: total length {total}, {len(data)} bytes")
    src, dst = str(IPv4Address(data[12:16])), str(IPv4Address(data[16:20]))
    body = data[ihl:total]
    sport = dport = None
    icmp = None
    payload = b""
    if frag & 0x1FFF == 0 and proto != 58:  # the first fragment (or none): transport header
        sport, dport, icmp, payload = _transport(proto, body)
    return IPInfo(src, dst, proto, ttl, total, ident, sport, dport, icmp, payload)


def _transport(
    proto: int, body: bytes
) -> tuple[int | None, int | None, tuple[int, int] | None, bytes]:
    """(sport, dport, icmp type and code, UDP payload) of a transport header at `body`."""
    if proto in (6, 17):
        need = 8 if proto == 17 else 4
        if len(body) < need:
            raise Undecodable(f"truncated {PROTOCOLS[proto]} header: {len(body)} bytes")
        sport, dport = struct.unpack_from("!HH", body)
        return sport, dport, None, body[8:] if proto == 17 else b""
    if proto in (1, 58) and len(body) >= 2:
        return None, None, (body[0], body[1]), b""
    return None, None, None, b""


@functools.lru_cache(maxsize=4096)
def _ipv6_text(packed: bytes) -> str:
    """An IPv6 address as ipaddress writes it (as the path's addresses are compared), cached:
    a capture repeats a few addresses, and formatting one costs more than the rest of a
    header."""
    return str(IPv6Address(packed))


def decode_ipv6(data: bytes) -> IPInfo:
    """An IPv6 packet (header, extension headers, transport ports), checked against the bytes
    there are. A jumbogram (payload length 0) is refused: no link here carries one."""
    if len(data) < IPV6_HEADER:
        raise Undecodable(f"truncated IPv6 header: {len(data)} of {IPV6_HEADER} bytes")
    version = data[0] >> 4
    if version != 6:
        raise Undecodable(f"not IPv6: version {version}")
    payload_len, proto, hlim = struct.unpack_from("!HBB", data, 4)
    if payload_len == 0:
        raise Undecodable("IPv6 payload length 0 (a jumbogram or nothing) is not decoded")
    total = IPV6_HEADER + payload_len
    if total > len(data):
        raise Undecodable(f"truncated IPv6 packet: total length {total}, {len(data)} bytes")
    src, dst = _ipv6_text(data[8:24]), _ipv6_text(data[24:40])
    body = data[IPV6_HEADER:total]
    first = True
    for _ in range(MAX_EXTENSIONS):
        if proto in IPV6_EXTENSIONS:
            if len(body) < 8:
                raise Undecodable(f"truncated IPv6 extension header {proto}: {len(body)} bytes")
            size = (body[1] + 1) * 8
            if size > len(body):
                raise Undecodable(f"IPv6 extension header {proto} of {size} bytes has "
                                  f"{len(body)}")  # fmt: skip
            proto, body = body[0], body[size:]
        elif proto == IPV6_FRAGMENT:
            if len(body) < 8:
                raise Undecodable(f"truncated IPv6 fragment header: {len(body)} bytes")
            first = struct.unpack_from("!H", body, 2)[0] >> 3 == 0
            proto, body = body[0], body[8:]
        else:
            break
    else:
        raise Undecodable(f"more than {MAX_EXTENSIONS} IPv6 extension headers")
    sport = dport = icmp = None
    payload = b""
    if first:  # only the first fragment (or none) carries the transport header
        sport, dport, icmp, payload = _transport(proto, body)
    ident = zlib.crc32(body)
    return IPInfo(src, dst, proto, hlim, total, ident, sport, dport, icmp, payload, version=6)


def decode_ip(ethertype: int, data: bytes) -> IPInfo:
    """The IPv4 or IPv6 packet an ethertype names."""
    return decode_ipv6(data) if ethertype == ETH_P_IPV6 else decode_ipv4(data)


def ethernet_payload(frame: bytes) -> tuple[int, bytes]:
    """(ethertype, payload) of an Ethernet frame, through VLAN tags."""
    if len(frame) < ETHERNET_HEADER:
        raise Undecodable(f"truncated Ethernet frame: {len(frame)} bytes")
    offset = 12
    (ethertype,) = struct.unpack_from("!H", frame, offset)
    while ethertype in VLAN_TYPES:
        offset += 4
        if len(frame) < offset + 2:
            raise Undecodable("truncated VLAN tag")
        (ethertype,) = struct.unpack_from("!H", frame, offset)
    return ethertype, frame[offset + 2 :]


def link_payload(linktype: int, frame: bytes) -> tuple[int, bytes]:
    """(ethertype, network-layer bytes) of a captured frame of this pcap link type."""
    if linktype == LINKTYPE_ETHERNET:
        return ethernet_payload(frame)
    if linktype in LINKTYPE_RAW:
        version = frame[0] >> 4 if frame else 0
        return {4: ETH_P_IP, 6: ETH_P_IPV6}.get(version, 0), frame
    if linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            raise Undecodable(f"truncated Linux cooked header: {len(frame)} bytes")
        return struct.unpack_from("!H", frame, 14)[0], frame[16:]
    raise Undecodable(f"link type {linktype} is not decoded")


@dataclass(frozen=True)
class Encapsulated:
    """What a datagram on the encapsulation port carries."""

    vni: int | None
    inner: IPInfo | None
    note: str | None = None
    """Why there is no inner IP packet (not an error: e.g. an inner ARP frame)."""


def decode_vxlan(payload: bytes) -> Encapsulated:
    """A VXLAN datagram's payload (RFC 7348): the header, then an inner Ethernet frame."""
    if len(payload) < VXLAN_HEADER:
        raise Undecodable(f"truncated VXLAN header: {len(payload)} of {VXLAN_HEADER} bytes")
    flags = payload[0]
    if not flags & 0x08:
        raise Undecodable(f"not VXLAN: the I flag is clear (flags 0x{flags:02x})")
    vni = int.from_bytes(payload[4:7], "big")
    try:
        ethertype, inner = ethernet_payload(payload[VXLAN_HEADER:])
    except Undecodable as e:
        raise Undecodable(f"VXLAN VNI {vni}: inner frame: {e}") from None
    if ethertype not in (ETH_P_IP, ETH_P_IPV6):
        return Encapsulated(vni, None, f"inner ethertype 0x{ethertype:04x}")
    try:
        return Encapsulated(vni, decode_ip(ethertype, inner))
    except Undecodable as e:
        raise Undecodable(f"VXLAN VNI {vni}: inner packet: {e}") from None


def decode_flannel_udp(payload: bytes) -> Encapsulated:
    """flannel's udp backend: the datagram's payload is the inner IPv4 packet, nothing else."""
    try:
        return Encapsulated(None, decode_ipv4(payload))
    except Undecodable as e:
        raise Undecodable(f"flannel udp: inner packet: {e}") from None


@dataclass(frozen=True)
class Decoded:
    """One captured frame, decoded."""

    point: str
    time: float
    size: int
    outer: IPInfo | None = None
    """The underlay packet (None on the delivered point, and for host-gw: no encapsulation)."""
    encap: str = "none"
    """"vxlan", "udp" (flannel's), "none" (plain IP) or "other" (neither IPv4 nor IPv6)."""
    vni: int | None = None
    inner: IPInfo | None = None
    error: str | None = None
    """Why the frame did not decode (then `inner` is None)."""
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "point": self.point, "time": self.time, "size": self.size,
            "outer": self.outer.to_json() if self.outer else None, "encap": self.encap,
            "vni": self.vni, "inner": self.inner.to_json() if self.inner else None,
            "error": self.error, "note": self.note,
        }  # fmt: skip


def decode_frame(
    point: str, stamp: float, linktype: int, frame: bytes, encap: str, port: int
) -> Decoded:
    """Decode one captured frame at `point`. `encap` is what the hosts use ("vxlan", "udp",
    "none"); a UDP datagram to or from `port` is decoded as that encapsulation. Never raises
    for any bytes: what does not decode comes back with `error` set."""
    size = len(frame)
    try:
        ethertype, network = link_payload(linktype, frame)
        if ethertype not in (ETH_P_IP, ETH_P_IPV6):
            return Decoded(point, stamp, size, encap="other", note=f"ethertype 0x{ethertype:04x}")
        packet = decode_ip(ethertype, network)
    except Undecodable as e:
        return Decoded(point, stamp, size, error=str(e))
    carried = packet.proto == 17 and port in (packet.sport, packet.dport)
    if encap in ("vxlan", "udp") and carried:
        try:
            if encap == "vxlan":
                inner = decode_vxlan(packet.payload)
            else:
                inner = decode_flannel_udp(packet.payload)
        except Undecodable as e:
            return Decoded(point, stamp, size, packet, encap, error=str(e))
        return Decoded(point, stamp, size, packet, encap, inner.vni, inner.inner, note=inner.note)
    return Decoded(point, stamp, size, None, "none", inner=packet)


def read_pcap(point: str, data: bytes, encap: str, port: int) -> tuple[list[Decoded], str | None]:
    """Every frame of a pcap stream (as tcpdump -w - writes it), decoded; and why the stream
    ended early when it did (a truncated or malformed capture file)."""
    from scapy.utils import RawPcapReader

    if not data:
        return [], None
    out: list[Decoded] = []
    try:
        reader = RawPcapReader(cast(Any, io.BytesIO(data)))
    except Exception as e:  # scapy raises Scapy_Exception and others for a bad header
        return [], f"not a pcap stream: {e}"
    linktype = int(reader.linktype)
    problem = None
    with contextlib.closing(reader):
        while True:
            try:
                # scapy's iterator cuts each frame to 1500 bytes: ask for up to 64 KiB (GRO).
                item = reader._read_packet(MAX_FRAME)
            except EOFError:
                break
            except Exception as e:
                problem = f"capture cut short: {e}"
                break
            frame, meta = item
            if len(frame) < int(meta.caplen):
                problem = f"capture cut short: a frame of {meta.caplen} bytes has {len(frame)}"
            stamp = float(meta.sec) + float(meta.usec) / 1e6
            out.append(decode_frame(point, stamp, linktype, bytes(frame), encap, port))
    return out, problem


# ---------------------------------------------------------------------- the path


@dataclass(frozen=True)
class Path:
    """Where SRC and DST live, from etcd."""

    src: Address
    dst: Address
    src_host: Address
    dst_host: Address
    """The hosts' PublicIP, or their PublicIPv6 when SRC and DST are IPv6 addresses."""
    src_subnet: IPv4Network | IPv6Network
    dst_subnet: IPv4Network | IPv6Network
    backend: str
    encap: str
    port: int
    vni: int | None

    @property
    def version(self) -> int:
        return self.src.version

    @property
    def device(self) -> str:
        """The host's overlay device this traffic crosses (vxlan: flannel-v6.<VNI> for IPv6)."""
        if self.encap == "vxlan":
            return f"flannel-v6.{self.vni}" if self.version == 6 else f"flannel.{self.vni}"
        return "flannel0"


def _subnet_of(lease: Any, version: int) -> IPv4Network | IPv6Network | None:
    """The lease's subnet of that family (an IPv6-only lease has no IPv4 subnet)."""
    if version == 6:
        return cast(IPv6Network | None, lease.ipv6_subnet)
    return None if lease.ipv6_only else cast(IPv4Network, lease.subnet)


def _host_of(
    leases: Sequence[Any], ip: Address, name: str
) -> tuple[IPv4Network | IPv6Network, Address]:
    """(the lease subnet holding `ip`, its host's underlay address of that family)."""
    for lease in leases:
        subnet = _subnet_of(lease, ip.version)
        if subnet is not None and ip in subnet:
            host = lease.attrs.public_ipv6 if ip.version == 6 else lease.attrs.public_ip
            if host is None:
                raise TraceError(f"{name} {ip} is in {subnet}, whose lease has no PublicIPv6")
            return subnet, cast(Address, host)
    raise TraceError(
        f"{name} {ip} is in no usable lease's {'IPv6 ' if ip.version == 6 else ''}subnet: give "
        "container addresses (see `overlayctl leases`)"
    )


def path_from(config: Any, leases: Sequence[Any], src: Address, dst: Address) -> Path:
    from backends.base import BackendError
    from subnetmgr.model import ConfigError

    if src.version != dst.version:
        raise TraceError(f"SRC {src} and DST {dst} are not of one address family")
    s_net, s_host = _host_of(leases, src, "SRC")
    d_net, d_host = _host_of(leases, dst, "DST")
    if s_net == d_net:
        raise TraceError(
            f"{src} and {dst} are both in {s_net} (host {s_host}): "
            "their traffic never crosses the underlay"
        )
    backend = config.backend_type
    try:
        if backend == "vxlan":
            from backends.vxlan_device import VxlanOptions

            options = VxlanOptions.from_backend(config.backend)
            encap, port, vni = "vxlan", options.port, options.vni
        elif backend == "udp":
            from backends.udp import _port as udp_port

            if src.version == 6:
                raise TraceError("the udp backend carries IPv4 only: no IPv6 traffic to trace")

            encap, port, vni = "udp", udp_port(config), None
        elif backend == "host-gw":
            encap, port, vni = "none", 0, None
        else:
            raise TraceError(f"backend {backend!r} carries no traffic between hosts to trace")
    except (ConfigError, BackendError) as e:
        raise TraceError(f"the network config's Backend: {e}") from None
    return Path(src, dst, s_host, d_host, s_net, d_net, backend, encap, port, vni)


@dataclass
class Point:
    """One capture: a stage of the path, in a namespace (None: this one), on an interface."""

    stage: str
    netns: str | None
    iface: str
    bpf: str
    encap: str = "none"
    """How to decode what is captured here: the hosts' encapsulation on the underlay,
    "none" (plain IP) on the delivered point."""
    port: int = 0
    packets: list[Decoded] = field(default_factory=list)
    problem: str | None = None

    def where(self) -> str:
        ns = f"netns {self.netns}" if self.netns else "this namespace"
        return f"{self.iface} ({ns})"


def in_ns(netns: str | None, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


async def _output(argv: Sequence[str], limit: float = 10.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise TraceError(f"{' '.join(argv)} did not finish in {limit}s") from None
    if proc.returncode != 0:
        raise TraceError(f"{' '.join(argv)}: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


def _json_list(text: str, what: str) -> list[Any]:
    try:
        doc = json.loads(text or "[]")
    except ValueError:
        doc = None
    if not isinstance(doc, list):
        raise TraceError(f"{what}: not the JSON list iproute2 prints")
    return doc


async def iface_with(netns: str | None, ip: Address) -> str | None:
    """The interface holding `ip` in that namespace, or None."""
    argv = in_ns(netns, ["ip", "-j", f"-{ip.version}", "addr", "show"])
    for link in _json_list(await _output(argv), "ip addr show"):
        for addr in link.get("addr_info", []) if isinstance(link, dict) else []:
            if isinstance(addr, dict) and addr.get("local") == str(ip):
                return str(link.get("ifname"))
    return None


async def route_dev(netns: str | None, path: Path) -> str:
    """The device a packet to DST leaves through in that namespace (the local overlay device
    when DST is an address of the host itself)."""
    argv = in_ns(netns, ["ip", "-j", "route", "get", str(path.dst)])
    doc = _json_list(await _output(argv), "ip route get")
    if not doc or not isinstance(doc[0], dict):
        raise TraceError(f"no route to {path.dst} on the destination host")
    if doc[0].get("type") == "local":
        return path.device
    return str(doc[0].get("dev"))


async def plan_points(path: Path, args: argparse.Namespace) -> list[Point]:
    """The capture points this trace can reach, with their interfaces and filters."""
    ip = "ip6" if path.version == 6 else "ip"
    if path.encap == "none":
        underlay_bpf = f"{ip} and host {path.src} and host {path.dst}"
    else:
        underlay_bpf = f"udp port {path.port} and host {path.src_host} and host {path.dst_host}"
    inner_bpf = f"{ip} and host {path.src} and host {path.dst}"
    src_ns, dst_ns = args.src_netns, args.dst_netns
    here_src = here_dst = False
    if src_ns is None and dst_ns is None:  # this namespace: it must be one of the two hosts
        here_src = await iface_with(None, path.src_host) is not None
        here_dst = await iface_with(None, path.dst_host) is not None
        if not here_src and not here_dst:
            raise TraceError(
                f"this host is neither SRC's host ({path.src_host}) nor DST's "
                f"({path.dst_host}): run the trace on one of them, or give --src-netns and "
                "--dst-netns (namespaces of the hosts, as in the lab)"
            )
    points = []
    if src_ns is not None or here_src:
        iface = args.iface or await iface_with(src_ns, path.src_host)
        if iface is None:
            raise TraceError(f"no interface holds {path.src_host} in netns {src_ns}")
        points.append(Point("source", src_ns, iface, underlay_bpf, path.encap, path.port))
    if dst_ns is not None or here_dst:
        iface = args.iface or await iface_with(dst_ns, path.dst_host)
        if iface is None:
            raise TraceError(f"no interface holds {path.dst_host} in netns {dst_ns}")
        points.append(Point("destination", dst_ns, iface, underlay_bpf, path.encap, path.port))
        dev = await route_dev(dst_ns, path)
        if dev != iface:  # host-gw into a host's own address: the underlay is the last point
            points.append(Point("delivered", dst_ns, dev, inner_bpf))
    return points


# ---------------------------------------------------------------------- capturing


@dataclass
class Capture:
    point: Point
    proc: asyncio.subprocess.Process
    out: asyncio.Task[bytes]


async def start_capture(point: Point, count: int) -> Capture:
    tcpdump = shutil.which("tcpdump") or "/usr/bin/tcpdump"
    argv = in_ns(point.netns, [tcpdump, "-i", point.iface, "-n", "-U", "--immediate-mode",
                               "-s", str(MAX_FRAME), "-c", str(count), "-w", "-",
                               point.bpf])  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    out = asyncio.create_task(proc.stdout.read())
    try:
        first = await asyncio.wait_for(proc.stderr.readline(), 10)
    except TimeoutError:
        first = b""
    if b"listening on" not in first:
        rest = b""
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            proc.kill()
            rest = await asyncio.wait_for(proc.stderr.read(), 5)
        await proc.wait()
        out.cancel()
        text = (first + rest).decode(errors="replace").strip()
        raise TraceError(f"tcpdump on {point.where()}: {text or 'did not start'}")
    return Capture(point, proc, out)


async def stop_capture(capture: Capture) -> None:
    """Stop tcpdump (SIGINT: it flushes its output), read what it wrote, decode it."""
    proc = capture.proc
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
    try:
        data = await asyncio.wait_for(capture.out, 10)
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        data = b""
        capture.point.problem = "tcpdump did not stop"
    point = capture.point
    point.packets, problem = read_pcap(point.stage, data, point.encap, point.port)
    point.problem = point.problem or problem


PROBE_SCRIPT = """
import socket, sys, time
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
for n in range(int(sys.argv[3])):
    s.sendto(b"overlayctl trace probe %d" % n, (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.1)
"""


async def send_probe(netns: str | None, dst: Address, port: int, count: int) -> None:
    argv = in_ns(netns, [sys.executable, "-c", PROBE_SCRIPT, str(dst), str(port), str(count)])
    await _output(argv, limit=15)


async def capture(points: list[Point], path: Path, args: argparse.Namespace) -> None:
    """Capture at every point until each saw --count packets or --timeout passed (with
    --probe: until 2 s after the probe, at most --timeout)."""
    captures: list[Capture] = []
    loop = asyncio.get_running_loop()
    try:
        for point in points:
            captures.append(await start_capture(point, args.count))
        print(f"capturing at {len(points)} points for up to {args.timeout:g}s", file=sys.stderr,
              flush=True)  # fmt: skip
        deadline = loop.time() + args.timeout
        if args.probe:
            await send_probe(args.probe_netns, path.dst, args.probe_port, args.probe_count)
            deadline = min(deadline, loop.time() + 2.0)
        waits = [asyncio.ensure_future(c.proc.wait()) for c in captures]
        if not waits:
            return
        try:  # every capture saw --count packets, or the time is up
            await asyncio.wait(waits, timeout=max(deadline - loop.time(), 0))
        finally:
            for w in waits:
                w.cancel()
    finally:
        for c in captures:
            await stop_capture(c)


# ---------------------------------------------------------------------- the verdict


def packet_key(info: IPInfo) -> tuple[Any, ...]:
    return (info.src, info.dst, info.proto, info.ident, info.sport, info.dport)


@dataclass(frozen=True)
class Verdict:
    last_seen: str
    """The furthest stage a SRC->DST packet reached: a STAGES name, or "never"."""
    text: str
    forward: int
    """SRC->DST packets seen (distinct), at any point."""
    reached_last: bool
    """A SRC->DST packet reached the last point captured."""


def verdict(points: Sequence[Point], path: Path) -> Verdict:
    stages = [p.stage for p in points]
    seen: dict[tuple[Any, ...], set[str]] = {}
    for point in points:
        for pkt in point.packets:
            if pkt.inner is not None and (pkt.inner.src, pkt.inner.dst) == (
                str(path.src),
                str(path.dst),
            ):
                seen.setdefault(packet_key(pkt.inner), set()).add(point.stage)
    reached = {stage for got in seen.values() for stage in got}
    furthest = next((s for s in reversed(STAGES) if s in reached), None)
    route = f"{path.src} -> {path.dst}"
    if not stages:
        return Verdict("never", f"{route}: nothing captured", 0, False)
    if furthest is None:
        first = points[0]
        text = (f"{route}: never seen at any point (first: {first.stage}, {first.where()}); "
                "no packet was sent (use --probe) or the source host does not route it "
                "(see `overlayctl doctor`)")  # fmt: skip
        return Verdict("never", text, 0, False)
    last_point = stages[-1]
    counts = ", ".join(f"{sum(1 for g in seen.values() if s in g)} at {s}" for s in stages)
    text = f"{route}: last seen: {STAGE_TEXT[furthest]} ({counts})"
    if furthest != last_point:
        after = stages[stages.index(furthest) + 1]
        where = next(p for p in points if p.stage == after).where()
        text += f"; never {STAGE_TEXT[after].replace('left', 'seen leaving')} ({where})"
        if furthest == "destination":
            text += (f": dropped on the destination host (a firewall on udp/{path.port}, "
                     "the VXLAN device or FDB, rp_filter, FORWARD)")  # fmt: skip
        elif furthest == "source":
            text += ": lost on the underlay between the hosts"
    return Verdict(furthest, text, len(seen), furthest == last_point)


def render_packet(pkt: Decoded) -> str:
    when = datetime.fromtimestamp(pkt.time, UTC).strftime("%H:%M:%S.%f")[:-3]
    outer = pkt.outer.brief() if pkt.outer else "-"
    if pkt.error is not None:
        carried = f"undecodable: {pkt.error}"
    elif pkt.inner is None:
        vni = f" vni {pkt.vni}" if pkt.vni is not None else ""
        carried = f"{pkt.encap}{vni}: {pkt.note}" if pkt.outer else (pkt.note or "-")
    else:
        vni = f" vni {pkt.vni}" if pkt.vni is not None else ""
        name = "flannel-udp" if pkt.encap == "udp" else pkt.encap
        carried = f"{name}{vni}: {pkt.inner.brief()}" if pkt.outer else pkt.inner.brief()
    return f"{when}  {pkt.point:11}  {pkt.size:5}B  outer {outer}  |  {carried}"


def render_report(path: Path, points: Sequence[Point], result: Verdict) -> str:
    how = {"vxlan": f"vxlan (VNI {path.vni}, udp/{path.port})", "udp": f"flannel udp "
           f"(udp/{path.port})", "none": "host-gw (plain IP)"}[path.encap]  # fmt: skip
    lines = [
        f"trace {path.src} ({path.src_subnet} on {path.src_host}) -> {path.dst} "
        f"({path.dst_subnet} on {path.dst_host}) over {how}",
    ]
    for point in points:
        n = len(point.packets)
        lines.append(f"  {point.stage:11} {point.where()}: {n} packet{'' if n == 1 else 's'}"
                     + (f" ({point.problem})" if point.problem else ""))  # fmt: skip
    lines.append("")
    packets = sorted((p for point in points for p in point.packets), key=lambda p: p.time)
    lines += [render_packet(p) for p in packets] or ["(no packets)"]
    lines += ["", result.text]
    return "\n".join(lines)


def report_json(path: Path, points: Sequence[Point], result: Verdict) -> dict[str, Any]:
    return {
        "src": str(path.src), "dst": str(path.dst), "src_host": str(path.src_host),
        "dst_host": str(path.dst_host), "backend": path.backend, "encap": path.encap,
        "port": path.port, "vni": path.vni,
        "points": [{"stage": p.stage, "netns": p.netns, "iface": p.iface, "filter": p.bpf,
                    "packets": len(p.packets), "problem": p.problem} for p in points],
        "packets": [pkt.to_json() for p in points for pkt in p.packets],
        "last_seen": result.last_seen, "reached_last_point": result.reached_last,
        "verdict": result.text,
    }  # fmt: skip


# ---------------------------------------------------------------------- command


async def run_trace(args: argparse.Namespace) -> int:
    from subnetmgr.model import ConfigError, NetworkConfig
    from subnetmgr.registry import EtcdRegistry, RegistryError
    from subnetmgr.validate import select_leases

    try:
        async with await EtcdRegistry.connect(args.etcd.registry_options()) as registry:
            registry.ignored.quiet = True
            text, _ = await registry.get_config_value()
            leases, _ = await registry.list_leases(expirations=False)
    except RegistryError as e:
        raise TraceError(f"etcd: {e}") from None
    if text is None:
        raise TraceError(f"no network config at {args.etcd.prefix}/config")
    try:
        config = NetworkConfig.from_json(text)
    except ConfigError as e:
        raise TraceError(f"the network config is invalid: {e}") from None
    # The leases the hosts use: checked against the config, one per subnet (as overlayd).
    usable = list(select_leases(config, leases).valid.values())
    path = path_from(config, usable, args.src, args.dst)
    points = await plan_points(path, args)
    await capture(points, path, args)
    result = verdict(points, path)
    if args.json:
        print(json.dumps(report_json(path, points, result), indent=1))
    else:
        print(render_report(path, points, result))
    return 0 if result.reached_last else 3


def _address(text: str) -> Address:
    try:
        return ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


def _bounded(kind: type, low: float, high: float) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low <= value <= high) or (isinstance(value, float) and math.isnan(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be between {low:g} and {high:g}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _netns(text: str) -> str:
    if not text or len(text) > 255 or "/" in text or text in (".", "..") or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a network namespace name")
    return text


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "trace",
        help="show what crosses the underlay between two containers, and where it stops",
        description="Capture and decode the packets between container addresses SRC and DST "
        "where they cross the underlay: the hosts come from the leases in etcd, the "
        "encapsulation from the network config (vxlan: VNI and port 8472 or Backend.Port; "
        "udp: 8285; host-gw: plain IP); IPv4 or IPv6 addresses (VXLAN over the IPv6 underlay, "
        "plain IPv6). Captures (tcpdump, decoded with scapy) on the source "
        "host's underlay interface, the destination host's, and the destination host's "
        "device towards DST, and shows for each packet the outer and inner addresses, VNI, "
        "TTL or hop limit and sizes, and at the end where SRC->DST packets were last seen: left "
        "the source host, reached the destination host, delivered, or never. Frames that do not "
        "decode are shown as undecodable with the reason. Runs on one of the two hosts, or "
        "anywhere with --src-netns/--dst-netns (the hosts' network namespaces, as in the "
        "lab). Bounded by --timeout and --count. Only watches, unless --probe. Needs root "
        "(tcpdump). Exit 0: a SRC->DST packet reached the last capture point; 3: none did; "
        "1: the trace could not run.",
    )
    parser.add_argument("src", metavar="SRC", type=_address, help="source container address")
    parser.add_argument("dst", metavar="DST", type=_address, help="destination container address")
    parser.add_argument(
        "--src-netns",
        type=_netns,
        metavar="NS",
        help="capture the source host's side in this network namespace",
    )
    parser.add_argument(
        "--dst-netns",
        type=_netns,
        metavar="NS",
        help="capture the destination host's side in this network namespace",
    )
    parser.add_argument(
        "--iface",
        metavar="IFACE",
        help="underlay interface (default: the one holding the host's PublicIP)",
    )
    parser.add_argument(
        "--timeout",
        type=_bounded(float, 0.1, 3600),
        default=5.0,
        metavar="SECONDS",
        help="capture at most this long (default: 5)",
    )
    parser.add_argument(
        "--count",
        type=_bounded(int, 1, 100000),
        default=100,
        metavar="N",
        help="stop each capture point after N packets (default: 100)",
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="send UDP datagrams from SRC to DST while capturing (needs "
        "--probe-netns, SRC's container namespace, unless SRC is here)",
    )
    parser.add_argument(
        "--probe-netns",
        type=_netns,
        metavar="NS",
        help="the network namespace SRC lives in (its container)",
    )
    parser.add_argument(
        "--probe-port",
        type=_bounded(int, 1, 65535),
        default=33434,
        metavar="PORT",
        help="UDP port the probe is sent to (default: 33434)",
    )
    parser.add_argument(
        "--probe-count",
        type=_bounded(int, 1, 100),
        default=3,
        metavar="N",
        help="datagrams the probe sends, 0.1 s apart (default: 3)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")

    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(run_trace(args))
        except TraceError as e:
            print(f"overlayctl: trace: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130

    parser.set_defaults(func=run)
    return parser
