"""`overlayctl doctor`: one PASS/FAIL/WARN line per check, each failing line with its fix.

    overlayctl doctor [--json] [--healthz-port PORT] [--subnet-file FILE] [--cni-data-dir DIR]

Run on a host (or in a host's network namespace, `ip netns exec NS overlayctl doctor`); it
takes the local daemon's flags and FLANNELD_* variables as `overlayctl status` does. The
checks, in order:

- `daemon`: /readyz of the local overlayd (and its reason when not ready);
- `ip_forward`: net.ipv4.ip_forward of this namespace (with EnableIPv6 also, and in an
  IPv6-only network only, net.ipv6.conf.all.forwarding);
- `forward`: a FORWARD policy of DROP needs our forward rules (iptables chain FLANNEL-FWD
  jumped to from FORWARD; the nftables table's forward chain does not override iptables'
  drop); another nftables base chain on the forward hook with policy drop is a WARN (an
  accept in one table does not override a drop in another); for an IPv6Network the same with
  ip6tables and table ip6 flannel-ipv6 (one line per network);
- `mtu`: the backend's device MTU against the external interface's (flannel's rule: vxlan
  -50 (-70 for flannel-v6.N alone in an IPv6-only network), udp -28, host-gw the same),
  subnet.env's FLANNEL_MTU against the device's (dual stack: flannel-v6.N's). Flannel's
  lease format carries no MTU, so other hosts' MTUs cannot be compared from here;
- `tx_checksum` (vxlan): when our PublicIP is on no local interface (the underlay looks
  NATed), tx-checksum-ip-generic should be off on the device (flannel's NAT checksum bug);
- `peer <subnet>`, one line per valid lease of another host: a real probe through the data
  path. vxlan and udp: an ICMP echo from our device address to the peer's (the subnet's first
  address, on the peer's flannel.N / flannel0): our kernel encapsulates it (udp: our packet
  loop), so it crosses the underlay on the encapsulation port and only the peer's kernel
  answers; all peers from one raw socket, bounded by --probe-timeout (past 20 peers, one
  summary line and a line per peer that did not answer). host-gw has no encapsulation: an
  echo to the PublicIP. IPv6 (EnableIPv6; the only family of an IPv6-only network): one more
  line per peer, `peer <IPv6 subnet>`, an ICMPv6 echo from our IPv6 subnet's first address to
  the peer's on flannel-v6.N (vxlan over the IPv6 underlay), or to the PublicIPv6 (host-gw);
- `etcd`: reachability and the latency of one read (WARN over --etcd-slow-ms);
- `subnet_env`: subnet.env against our lease (subnet) and the network config (network);
- `duplicate_public_ip`: two leases naming one PublicIP (an IPv6-only lease: one PublicIPv6);
- `lease_renewals`: every host renews its lease `--subnet-lease-renew-margin` minutes before it
  expires (half the TTL when the margin is not below the TTL), with a new etcd lease each time.
  So from one look: a lease whose time left is below that point (with a little slack) missed
  its renewal, and its host is dead or cut off from etcd; a lease with any time left above it
  may be a live host. A reservation never expires and is not judged;
- `cni_state`: saved delegate confs in the flannel plugin's dataDir (--cni-data-dir, else the
  flannel plugin's in the runtime's configs in --cni-conf-dir, else its default) whose
  container has no host-local address any more, an address outside our subnet, or an address
  that nobody answers ARP for on the bridge (its network namespace is gone); host-local
  addresses whose container has no saved conf.

Exit 1 when any check fails (WARN does not), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any, TypeGuard, TypeVar, cast

from overlay.status import (
    SCHEMA,
    EtcdView,
    add_local_flags,
    command_json,
    daemon_subnet,
    device_name,
    device_state,
    local_addresses,
    own_lease,
    read_daemon,
    read_etcd,
    read_subnet_env,
    resolve_local,
)
from overlay.subnetenv import SubnetEnv
from subnetmgr.model import Lease, NetworkConfig, printable, subnet_order

PASS, FAIL, WARN = "PASS", "FAIL", "WARN"
PROBE_TIMEOUT = 2.0
"""Seconds one peer probe may take (all peers are probed at once)."""
ETCD_SLOW_MS = 500.0
DEFAULT_CNI_DATA_DIR = Path("/var/lib/cni/flannel")
"""The flannel plugin's dataDir default (cni/flannel.py DEFAULT_DATA_DIR)."""
CNI_CONF_DIR = Path("/etc/cni/net.d")
HOST_LOCAL_DIR = Path("/var/lib/cni/networks")
"""host-local's dataDir default."""
MAX_SAVED_CONF = 2 << 20
MAX_IP_FILE = 4096
MAX_ENTRIES = 10000
"""Files looked at in one directory (saved confs, host-local addresses)."""
ARP_TIMEOUT = 1.0
OVERHEAD = {"vxlan": 50, "udp": 28, "host-gw": 0}
ATTACHMENT_KEY = "overlay.attachment"


@dataclass(frozen=True)
class Check:
    name: str
    result: str
    message: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.result} {self.name}: {self.message}"
        return f"{text} -- fix: {self.fix}" if self.fix and self.result != PASS else text


@dataclass
class Host:
    """What every check may need, read once."""

    local: dict[str, Any]
    etcd: EtcdView
    config: NetworkConfig | None
    lease: Lease | None
    addresses: dict[IPv4Address | IPv6Address, str]
    env_error: str | None
    env: SubnetEnv | None = None


# --------------------------------------------------------------------------- checks


def check_ip_forward(proc: Path | None = None, *, ipv6: bool = False) -> Check:
    """net.ipv4.ip_forward, or with `ipv6` net.ipv6.conf.all.forwarding (the IPv6 side of dual
    stack, or an IPv6-only network)."""
    key = "net.ipv6.conf.all.forwarding" if ipv6 else "net.ipv4.ip_forward"
    proc = proc or Path("/proc/sys") / key.replace(".", "/")
    try:
        value = proc.read_text().strip()
    except OSError as e:
        return Check(
            "ip_forward",
            FAIL,
            f"cannot read {proc}: {e.strerror}",
            "run doctor as root on the host",
        )
    if value == "1":
        return Check("ip_forward", PASS, f"{key} = 1")
    return Check(
        "ip_forward",
        FAIL,
        f"{key} = {printable(value, 20)}: this host drops traffic between its "
        "containers and other hosts",
        f"sysctl -w {key}=1 (and put {key}=1 in /etc/sysctl.d/90-overlay.conf)",
    )


@dataclass(frozen=True)
class ForwardRules:
    policy: str | None
    """iptables FORWARD policy (ACCEPT, DROP, ...); None when unreadable."""
    jump: bool
    """FORWARD jumps to FLANNEL-FWD."""
    accepts: bool
    """FLANNEL-FWD accepts both -s NETWORK and -d NETWORK."""


def parse_forward(forward: str, chain: str, network: IPv4Network | IPv6Network) -> ForwardRules:
    """`iptables -S FORWARD` and `iptables -S FLANNEL-FWD` output (ip6tables' for an IPv6
    network) -> what matters to us."""
    from overlay.masq import FWD_CHAIN

    policy = None
    jump = False
    for line in forward.splitlines():
        words = line.split()
        if words[:2] == ["-P", "FORWARD"] and len(words) == 3:
            policy = words[2]
        elif words[:2] == ["-A", "FORWARD"] and words[-2:] == ["-j", FWD_CHAIN]:
            jump = True
    src = dst = False
    for line in chain.splitlines():
        words = line.split()
        if words[:2] != ["-A", FWD_CHAIN] or words[-2:] != ["-j", "ACCEPT"]:
            continue
        if len(words) < 4 or words[2] not in ("-s", "-d"):
            continue
        try:
            net = ip_network(words[3], strict=False)
        except ValueError:
            continue
        if net == network:
            src = src or words[2] == "-s"
            dst = dst or words[2] == "-d"
    return ForwardRules(policy, jump, src and dst)


def forward_drop_chains(ruleset: Any) -> list[str]:
    """nftables base chains on the forward hook with policy drop, from `nft -j list chains`,
    except iptables' and ip6tables' own `ip filter FORWARD`, `ip6 filter FORWARD` (judged by
    their policy)."""
    out = []
    items = ruleset.get("nftables") if isinstance(ruleset, dict) else None
    for item in items if isinstance(items, list) else []:
        chain = item.get("chain") if isinstance(item, dict) else None
        if not isinstance(chain, dict) or chain.get("hook") != "forward":
            continue
        if chain.get("policy") != "drop":
            continue
        name = f"{chain.get('family')} {chain.get('table')} {chain.get('name')}"
        if chain.get("family") not in ("ip", "ip6") or (chain.get("table"), chain.get("name")) != (
            "filter",
            "FORWARD",
        ):
            out.append(printable(name, 80))
    return out


async def check_forward(network: IPv4Network | IPv6Network | None) -> list[Check]:
    """`network`: the config's, else subnet.env's FLANNEL_NETWORK (etcd may be down); an IPv6
    network (IPv6Network, FLANNEL_IPV6_NETWORK) is judged by ip6tables and table ip6
    flannel-ipv6."""
    from overlay.masq import FWD_CHAIN, IptablesError, run_command

    if network is None:
        return [Check("forward", WARN, "not checked: the network is unknown (no valid config "
                      "in etcd, no subnet.env)")]  # fmt: skip
    net = network
    v6 = net.version == 6
    tool, family, table = ("ip6tables", "ip6", "flannel-ipv6") if v6 else (
        "iptables", "ip", "flannel-ipv4"
    )  # fmt: skip
    try:
        rc, forward, err = await run_command([tool, "-S", "FORWARD"], check=False)
        _, chain, _ = await run_command([tool, "-S", FWD_CHAIN], check=False)
    except IptablesError as e:
        return [Check("forward", WARN, f"cannot read {tool}: {e}")]
    if rc != 0:
        return [Check("forward", WARN, f"{tool} -S FORWARD failed: {printable(err, 200)}")]
    rules = parse_forward(forward, chain, net)
    nft = await command_json("nft", "-j", "list", "chains")
    drops = [d for d in forward_drop_chains(nft) if d.split()[0] in (family, "inet")] if nft else []
    ours_nft = bool(await command_json("nft", "-j", "list", "chain", family, table, "forward"))
    checks = []
    if rules.policy == "DROP" or rules.policy == "REJECT":
        if rules.jump and rules.accepts:
            checks.append(
                Check(
                    "forward",
                    PASS,
                    f"FORWARD policy {rules.policy}, and our chain {FWD_CHAIN} accepts {net}",
                )
            )
        else:
            what = (
                f"nftables table {family} {table} accepts it, which does not override {tool}' drop"
                if ours_nft
                else "no rule of ours accepts it"
            )
            checks.append(
                Check(
                    "forward",
                    FAIL,
                    f"FORWARD policy {rules.policy} and {what}: traffic of {net} between hosts and "
                    "containers is dropped",
                    f"run overlayd with --iptables-forward-rules (the default; iptables mode), or: "
                    f"{tool} -I FORWARD -s {net} -j ACCEPT && {tool} -I FORWARD -d {net} "
                    "-j ACCEPT",
                )
            )
    else:
        how = (
            f"our chain {FWD_CHAIN}"
            if rules.jump
            else f"nftables table {family} {table}"
            if ours_nft
            else "no rules of ours (not needed)"
        )
        checks.append(
            Check("forward", PASS, f"FORWARD policy {rules.policy or 'unknown'}; {how} ({net})")
        )
    for name in drops:
        checks.append(
            Check(
                "forward",
                WARN,
                f"nftables chain {name} has policy drop on the forward hook: an accept in another "
                f"table does not override it",
                f"add `{family} saddr {net} accept` and `{family} daddr {net} accept` to {name}",
            )
        )
    return checks


async def external_mtu(host: Host) -> tuple[str | None, int | None]:
    """The external interface: the one holding our PublicIP, else the route to a peer."""
    name = None
    if host.lease is not None:
        name = host.addresses.get(host.lease.attrs.address)
        if name is None:
            for peer in host.etcd.valid.values():
                if peer.ident != host.lease.ident:
                    route = await command_json("ip", "-j", "route", "get", str(peer.attrs.address))
                    if route and isinstance(route[0], dict):
                        name = route[0].get("dev")
                    break
    if not isinstance(name, str):
        return None, None
    dev = await device_state(name)
    return name, dev.mtu


async def check_mtu(host: Host) -> Check:
    from backends.vxlan_device import VXLAN_OVERHEAD_V4, VXLAN_OVERHEAD_V6

    config = host.config
    if config is None or config.backend_type not in OVERHEAD:
        return Check("mtu", WARN, "not checked: no valid network config (or alloc backend)")
    ext, ext_mtu = await external_mtu(host)
    if ext_mtu is None:
        return Check(
            "mtu", WARN, "not checked: the external interface is unknown (no lease of ours)"
        )
    overhead = OVERHEAD[config.backend_type]
    vxlan = config.backend_type == "vxlan"
    if vxlan and config.ipv6_only:  # flannel-v6.<VNI> alone: VXLAN over IPv6
        overhead = VXLAN_OVERHEAD_V6
    underlay = ext_mtu
    options = vxlan_options(config)
    if options is not None and options.mtu > 0:  # Backend.MTU: the underlay's, as flannel's
        underlay = options.mtu
    expected = underlay - overhead
    problems = []
    name = device_name(config)
    dev_mtu = None
    if name is not None:
        dev = await device_state(name)
        dev_mtu = dev.mtu
        if dev_mtu is None:
            problems.append(f"{name} does not exist")
        elif dev_mtu != expected:
            problems.append(f"{name} has MTU {dev_mtu}, {ext} {ext_mtu} - {overhead} = {expected}")
    env = host.env
    carried = dev_mtu or expected
    if vxlan and config.enable_ipv6 and not config.ipv6_only:
        # Dual stack: one FLANNEL_MTU for both families, flannel-v6.<VNI>'s (20 bytes less).
        carried -= VXLAN_OVERHEAD_V6 - VXLAN_OVERHEAD_V4
    if env is not None and env.mtu != carried:
        problems.append(f"subnet.env FLANNEL_MTU {env.mtu}, but {name or ext} carries {carried}")
    if underlay > ext_mtu:
        problems.append(f"Backend.MTU {underlay} is larger than {ext}'s MTU {ext_mtu}")
    if not problems:
        what = f"{name} {dev_mtu}, " if name else ""
        return Check(
            "mtu", PASS, f"{ext} {ext_mtu}, {what}subnet.env {env.mtu if env is not None else '?'}"
        )
    return Check(
        "mtu",
        FAIL,
        "; ".join(problems),
        f"restart overlayd so it rewrites {name or 'the device'} and subnet.env with MTU "
        f"{expected} (containers made since keep the old MTU: recreate them)",
    )


async def check_tx_checksum(host: Host) -> Check | None:
    from overlay.masq import IptablesError, run_command

    config = host.config
    if config is None or config.backend_type != "vxlan" or host.lease is None:
        return None
    public = host.lease.attrs.address
    if public in host.addresses:
        return Check(
            "tx_checksum",
            PASS,
            f"public address {public} is on {host.addresses[public]}: no NAT in the way",
        )
    name = device_name(config) or "flannel.1"
    try:
        rc, out, err = await run_command(["ethtool", "-k", name], check=False)
    except IptablesError:
        return Check("tx_checksum", WARN, "ethtool is not installed", "apt-get install ethtool")
    state = None
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "tx-checksum-ip-generic":
            state = value.split()[0] if value.split() else None
    if rc != 0 or state is None:
        return Check("tx_checksum", WARN, f"cannot read {name}'s offloads: {printable(err, 200)}")
    if state == "off":
        return Check(
            "tx_checksum",
            PASS,
            f"PublicIP {public} is not local (NAT), and tx-checksum-ip-generic is off on {name}",
        )
    return Check(
        "tx_checksum",
        FAIL,
        f"PublicIP {public} is on no local interface (the underlay looks NATed) and "
        f"{name} computes checksums in hardware: NAT'd VXLAN packets can arrive with bad inner "
        "checksums",
        f'set "{"DisableTxChecksumOffload"}": true in the config\'s Backend (or now: '
        f"ethtool -K {name} tx-checksum-ip-generic off)",
    )


# --------------------------------------------------------------------------- peer probe


def icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes = b"overlayctl doctor") -> bytes:
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    csum = icmp_checksum(head + payload)
    return struct.pack("!BBHHH", 8, 0, csum, ident, seq) + payload


def parse_echo_reply(packet: bytes) -> tuple[IPv4Address, int] | None:
    """(source, identifier) of an IPv4 packet carrying an ICMP echo reply; None otherwise."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or len(packet) < ihl + 8 or packet[9] != 1:
        return None
    icmp_type, _code, _csum, ident, _seq = struct.unpack_from("!BBHHH", packet, ihl)
    if icmp_type != 0:
        return None
    return IPv4Address(packet[12:16]), ident


def echo6_request(ident: int, seq: int, payload: bytes = b"overlayctl doctor") -> bytes:
    """An ICMPv6 echo request (RFC 4443). The checksum is left 0: on a raw ICMPv6 socket the
    kernel computes it (it covers the IPv6 pseudo-header, RFC 3542 3.1)."""
    return struct.pack("!BBHHH", 128, 0, 0, ident, seq) + payload


def parse_echo6_reply(message: bytes) -> int | None:
    """The identifier of an ICMPv6 echo reply (a raw ICMPv6 socket reads the message without
    its IPv6 header); None for anything else."""
    if len(message) < 8 or message[0] != 129 or message[1] != 0:
        return None
    ident: int = struct.unpack_from("!H", message, 4)[0]
    return ident


PROBE_TRIES = 3
PEER_LINES = 20
"""Peers shown one line each when all answer; past this, the answers are one summary line
(a failing peer always has its own line)."""


async def _receive_reply(
    sock: socket.socket, loop: asyncio.AbstractEventLoop, version: int
) -> tuple[IPv4Address | IPv6Address, int] | None:
    """(source, identifier) of the next echo reply on a raw socket of that family, None for
    another packet."""
    if version == 4:
        return parse_echo_reply(await loop.sock_recv(sock, 65535))
    message, peer = await loop.sock_recvfrom(sock, 65535)
    ident = parse_echo6_reply(message)
    if ident is None or not isinstance(peer, tuple) or not peer:
        return None
    try:
        source = IPv6Address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return None
    return source, ident


A = TypeVar("A", IPv4Address, IPv6Address)


async def ping(src: A | None, targets: Sequence[A], limit: float) -> dict[A, float | None]:
    """Round trip in ms of an ICMP echo (ICMPv6 for IPv6 targets) from `src` to each target,
    None for no answer.

    One raw socket for all targets (a cluster of 10,000 hosts is 10,000 probes, not 10,000
    sockets): PROBE_TRIES echoes to each target not yet answered, spread over `limit` s; a reply
    counts when it comes from a target and carries our identifier. OSError when `src` is not an
    address of this host."""
    loop = asyncio.get_running_loop()
    wanted = set(targets)
    rtt: dict[A, float | None] = dict.fromkeys(targets)
    sent: dict[A, float] = {}
    if not targets:
        return rtt
    version = targets[0].version
    if version == 6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        request = echo6_request
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        request = echo_request
    sock.setblocking(False)
    ident = random.randrange(1, 0xFFFF)
    try:
        if src is not None:
            sock.bind((str(src), 0))
        start = time.monotonic()
        deadline = start + limit
        for attempt in range(PROBE_TRIES):
            for target in targets:
                if rtt[target] is None:
                    sent.setdefault(target, time.monotonic())
                    # A full buffer or no route to one target: it goes unanswered.
                    with contextlib.suppress(OSError):
                        sock.sendto(request(ident, attempt), (str(target), 0))
            round_end = min(deadline, start + limit * (attempt + 1) / PROBE_TRIES)
            while any(v is None for v in rtt.values()):
                left = round_end - time.monotonic()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):
                        reply = await _receive_reply(sock, loop, version)
                except TimeoutError:
                    break
                if reply is not None and reply[1] == ident and reply[0] in wanted:
                    source = cast(A, reply[0])
                    if rtt[source] is None:
                        rtt[source] = round((time.monotonic() - sent[source]) * 1000, 2)
            if all(v is not None for v in rtt.values()):
                break
    finally:
        sock.close()
    return rtt


def vxlan_options(config: NetworkConfig) -> Any:
    """The vxlan Backend options, validated as the backend validates them (None: another
    backend, or options the backend would refuse: then the daemon is not running vxlan)."""
    if config.backend_type != "vxlan":
        return None
    from backends.vxlan_device import VxlanOptions
    from subnetmgr.model import ConfigError

    try:
        return VxlanOptions.from_backend(config.backend)
    except ConfigError:
        return None


def _port(backend: Mapping[str, Any], default: int) -> int:
    for key in ("Port", "port"):
        value = backend.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
            return value
    return default


@dataclass(frozen=True)
class Family:
    """How the peers are probed in one address family."""

    version: int
    src: IPv4Address | IPv6Address | None
    """Our address the echoes leave from (our subnet's on the device), None on the underlay."""
    how: str
    port: int
    """The encapsulation port (0: host-gw)."""

    def target(self, peer: Lease) -> IPv4Address | IPv6Address | None:
        """The address probed on `peer` (its subnet's on its device, else its underlay
        address), None when the peer has none of this family."""
        if self.version == 6:
            if self.src is not None:
                return None if peer.ipv6_subnet is None else peer.ipv6_subnet.network_address
            return peer.attrs.public_ipv6
        if peer.ipv6_only:
            return None
        return peer.subnet.network_address if self.src is not None else peer.attrs.public_ip

    def host(self, peer: Lease) -> IPv4Address | IPv6Address:
        return (peer.attrs.public_ipv6 or peer.attrs.address) if self.version == 6 else (
            peer.attrs.public_ip)  # fmt: skip

    def name(self, peer: Lease) -> str:
        return f"peer {peer.ipv6_subnet if self.version == 6 else peer.subnet}"

    @property
    def echo(self) -> str:
        return "an ICMPv6 echo" if self.version == 6 else "an ICMP echo"

    def fix(self, peer: Lease) -> str:
        host = self.host(peer)
        if self.port:
            tables = "ip6tables" if self.version == 6 else "iptables"
            return (f"let udp {self.port} from this host's underlay address in on {host} (e.g. "
                    f"{tables} -I INPUT -p udp --dport {self.port} -j ACCEPT there; cloud "
                    "security groups too), and check overlayd runs there")  # fmt: skip
        if self.version == 6:
            return (f"check the IPv6 route to {host} and net.ipv6.conf.all.forwarding on that "
                    "host")  # fmt: skip
        return f"check the route to {host} and ip_forward on that host"


def probe_families(config: NetworkConfig, own: Lease) -> list[Family]:
    """The families the peers are probed in: IPv4 unless the network is IPv6-only, IPv6 with
    EnableIPv6 (vxlan through flannel-v6.<VNI>, host-gw on the IPv6 underlay)."""
    from backends.udp import DEFAULT_PORT as UDP_PORT

    families = []
    encapsulated = config.backend_type in ("vxlan", "udp")
    if encapsulated:
        options = vxlan_options(config)
        port = options.port if options is not None else _port(config.backend, UDP_PORT)
    else:
        port = 0
    underlay = "on the underlay (host-gw has no encapsulation)"
    if not config.ipv6_only and not own.ipv6_only:
        src4 = own.subnet.network_address if encapsulated else None
        how = f"through {device_name(config)} (udp {port})" if encapsulated else underlay
        families.append(Family(4, src4, how, port))
    if config.enable_ipv6 and config.backend_type != "udp":  # udp carries IPv4 only
        if encapsulated:
            if own.ipv6_subnet is None:
                return families
            vni = options.vni if options is not None else 1
            how = f"through flannel-v6.{vni} (udp {port})"
            families.append(Family(6, own.ipv6_subnet.network_address, how, port))
        else:
            families.append(Family(6, None, underlay, 0))
    return families


async def _probe_family(
    family: Family, peers: Sequence[Lease], limit: float
) -> tuple[list[Check], list[float], int]:
    """(one line per peer, or one FAIL line when the probe cannot run; the round trips of the
    peers that answered; the peers probed)."""
    probed = [(p, t) for p in peers if (t := family.target(p)) is not None]
    targets = sorted({t for _, t in probed}, key=lambda a: (a.version, int(a)))
    kind = "ICMPv6" if family.version == 6 else "ICMP"
    try:
        rtts: dict[Any, float | None] = await ping(family.src, targets, limit)
    except PermissionError as e:
        text = f"cannot open a raw {kind} socket: {e.strerror or e}"
        fix = "run overlayctl doctor as root (or with CAP_NET_RAW)"
        return [Check("peers", FAIL, text, fix)], [], len(probed)
    except OSError as e:
        return (
            [
                Check(
                    "peers",
                    FAIL,
                    f"cannot send a probe from {family.src}: {e.strerror or e}",
                    "check that overlayd runs and its device has our subnet's address",
                )
            ],
            [],
            len(probed),
        )
    checks = []
    answered = []
    for peer, dst in probed:
        rtt = rtts.get(dst)
        host = family.host(peer)
        if rtt is not None:
            answered.append(rtt)
            text = f"{host}: {dst} answered {family.echo} {family.how} in {rtt} ms"
            checks.append(Check(family.name(peer), PASS, text))
            continue
        text = f"{host}: no answer from {dst} {family.how} within {limit:g} s"
        checks.append(Check(family.name(peer), FAIL, text, family.fix(peer)))
    return checks, answered, len(probed)


async def check_peers(host: Host, limit: float) -> list[Check]:
    config = host.config
    if config is None or host.lease is None:
        return [Check("peers", WARN, "not checked: no network config or no lease of ours")]
    own = host.lease.ident
    peers = sorted(
        (
            x
            for s, x in host.etcd.valid.items()
            if s != own and (x.attrs.backend_type or "udp") == config.backend_type
        ),
        key=lambda x: subnet_order(x.ident),
    )
    if not peers:
        return [Check("peers", PASS, "no other host holds a lease")]
    if config.backend_type == "alloc":
        return [Check("peers", PASS, "alloc backend: no data path between hosts")]
    families = probe_families(config, host.lease)
    if not families:
        return [Check("peers", WARN, "not checked: our lease has no subnet of the network's "
                      "families")]  # fmt: skip
    results = await asyncio.gather(*(_probe_family(f, peers, limit) for f in families))
    checks: list[Check] = []
    for family, (lines, answered, probed) in zip(families, results, strict=True):
        if probed > PEER_LINES and any(c.name != "peers" for c in lines):
            median = sorted(answered)[len(answered) // 2] if answered else None
            summary = Check(
                "peers",
                PASS if len(answered) == probed else FAIL,
                f"{len(answered)} of {probed} peers answered {family.echo} {family.how}"
                + (f", median {median} ms" if median is not None else ""),
                "see the peer lines",
            )
            lines = [summary, *(c for c in lines if c.result != PASS)]
        checks += lines
    return checks


# --------------------------------------------------------------------------- etcd checks


def check_etcd(etcd: EtcdView, slow_ms: float) -> Check:
    if not etcd.reachable:
        return Check(
            "etcd",
            FAIL,
            f"unreachable: {etcd.error}",
            f"start etcd or fix --etcd-endpoints ({etcd.endpoints}); "
            f"`etcdctl --endpoints={etcd.endpoints} endpoint health` shows why",
        )
    latency = etcd.latency_ms or 0.0
    if latency > slow_ms:
        return Check(
            "etcd",
            WARN,
            f"{etcd.endpoints}: one read took {latency} ms",
            "check etcd's disk and network (etcdctl check perf)",
        )
    return Check("etcd", PASS, f"{etcd.endpoints}: one read in {latency} ms")


def check_subnet_env(host: Host) -> Check:
    path = host.local["subnet_file"]
    if host.env is None:
        return Check(
            "subnet_env",
            FAIL,
            host.env_error or f"{path}: not read",
            f"start overlayd (it writes the file once it holds a lease) with --subnet-file {path}",
        )
    env = host.env
    problems = []
    if host.lease is not None and env.subnet != (
        None if host.lease.ipv6_only else host.lease.subnet
    ):
        problems.append(f"FLANNEL_SUBNET is {env.gateway}, our lease is {host.lease.ident}")
    if host.lease is not None and env.ipv6_subnet != host.lease.ipv6_subnet:
        problems.append(
            f"FLANNEL_IPV6_SUBNET is {env.ipv6_subnet}, our lease's IPv6 subnet is "
            f"{host.lease.ipv6_subnet}"
        )
    if host.config is not None and env.network != host.config.network:
        problems.append(f"FLANNEL_NETWORK is {env.network}, the config's is {host.config.network}")
    if host.lease is None and host.etcd.reachable:
        problems.append("no lease in etcd belongs to this host")
    if problems:
        return Check(
            "subnet_env",
            FAIL,
            f"{path}: " + "; ".join(problems),
            f"restart overlayd so that it rewrites {path} from its lease",
        )
    return Check("subnet_env", PASS, f"{path} matches our lease {env.subnet or env.ipv6_subnet}")


def _by_address(address: IPv4Address | IPv6Address) -> tuple[int, int]:
    return address.version, int(address)


def _by_subnet(lease: Lease) -> tuple[int, int, str]:
    """IPv4 and dual-stack leases by IPv4 subnet, then IPv6-only ones by IPv6 subnet."""
    return (*_by_address(lease.ident.network_address), lease.key)


def check_duplicates(leases: Sequence[Lease], prefix: str) -> Check:
    by_ip: dict[IPv4Address | IPv6Address, list[Lease]] = {}
    for lease in leases:
        by_ip.setdefault(lease.attrs.address, []).append(lease)
    dups = sorted(((ip, xs) for ip, xs in by_ip.items() if len(xs) > 1),
                  key=lambda d: _by_address(d[0]))  # fmt: skip
    if not dups:
        return Check("duplicate_public_ip", PASS, f"{len(by_ip)} leases, each PublicIP once")
    parts = [
        f"{ip} holds {', '.join(str(x.ident) for x in sorted(xs, key=_by_subnet))}"
        for ip, xs in dups
    ]
    ip, xs = dups[0]
    newest = max(xs, key=lambda x: x.create_revision)
    return Check(
        "duplicate_public_ip",
        FAIL,
        "; ".join(parts),
        f"delete the lease the host at {ip} does not use (its subnet.env names the "
        f"other): etcdctl del {shlex.quote(f'{prefix}/subnets/{newest.key}')}",
    )


def renewal_point(granted: int, margin_minutes: int) -> float:
    """Seconds left at which a live host renews a lease granted `granted` seconds (overlayd's
    rule: the margin, or half the TTL when the margin is not below it)."""
    margin = margin_minutes * 60
    return margin if margin < granted else granted / 2


def overdue(left: int, granted: int, margin_minutes: int) -> bool:
    """Whether a lease with `left` seconds to live out of `granted` missed its renewal."""
    if left < 0:
        return True
    slack = min(60.0, max(2.0, granted / 20))
    return left < renewal_point(granted, margin_minutes) - slack


def check_renewals(etcd: EtcdView, margin_minutes: int, prefix: str) -> Check:
    if etcd.ttl_error is not None:
        return Check("lease_renewals", WARN, f"cannot read the leases' TTLs: {etcd.ttl_error}")
    dead = []
    judged = 0
    for lease in sorted(etcd.leases, key=_by_subnet):
        lease_id = etcd.lease_ids.get(lease.key)
        if not lease_id or lease_id not in etcd.ttls:
            continue
        left, granted = etcd.ttls[lease_id]
        judged += 1
        if overdue(left, granted, margin_minutes):
            point = renewal_point(granted, margin_minutes)
            dead.append((lease, left, granted, point))
    if not dead:
        return Check(
            "lease_renewals",
            PASS,
            f"{judged} leases with a TTL, none past its renewal "
            f"point (margin {margin_minutes} min)",
        )
    parts = [
        f"{x.ident} of {x.attrs.address}: {left} s left of {granted} s, renewal was due "
        f"at {point:g} s left"
        for x, left, granted, point in dead
    ]
    first = dead[0][0]
    return Check(
        "lease_renewals",
        FAIL,
        "never renewed, host dead or cut off from etcd: " + "; ".join(parts),
        f"check overlayd on {first.attrs.address}; if that host is gone, free its "
        f"subnet: etcdctl del {shlex.quote(f'{prefix}/subnets/{first.key}')}",
    )


# --------------------------------------------------------------------------- CNI state


@dataclass(frozen=True)
class SavedConf:
    path: Path
    container_id: str
    ifname: str | None
    network: str
    bridge: str
    ipam_dir: Path | None
    """host-local's directory for this network (None: another IPAM plugin)."""


def _safe_name(text: Any) -> TypeGuard[str]:
    return (
        isinstance(text, str)
        and 0 < len(text) <= 255
        and "/" not in text
        and text not in (".", "..")
        and "\0" not in text
    )


def parse_saved_conf(path: Path, data: bytes) -> SavedConf | str:
    """A saved delegate conf of the flannel plugin, or why it is not one."""
    if len(data) > MAX_SAVED_CONF:
        return f"larger than {MAX_SAVED_CONF} bytes"
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        return f"not JSON ({printable(str(e), 80)})"
    if not isinstance(doc, dict):
        return "not a JSON object"
    att = doc.get(ATTACHMENT_KEY)
    cid: Any = path.name
    ifname: Any = None
    if isinstance(att, dict):
        cid, ifname = att.get("containerID"), att.get("ifname")
        if not _safe_name(cid) or (ifname is not None and not _safe_name(ifname)):
            return "its attachment names no valid container ID and interface"
    name = doc.get("name")
    if not _safe_name(name):
        return "no valid network name"
    bridge = doc.get("bridge", "cni0")
    if not _safe_name(bridge) or len(bridge) > 15:
        return "no valid bridge name"
    ipam = doc.get("ipam")
    ipam_dir = None
    if isinstance(ipam, dict) and ipam.get("type") == "host-local":
        base = ipam.get("dataDir", str(HOST_LOCAL_DIR))
        if not isinstance(base, str) or not base.startswith("/") or "\0" in base:
            return "ipam.dataDir is not an absolute path"
        ipam_dir = Path(base) / name
    return SavedConf(path, cid, ifname, name, bridge, ipam_dir)


def conf_data_dir(data: bytes) -> Path | None:
    """The flannel plugin's dataDir in a CNI network config or conflist (its default when the
    plugin is there without one); None when no flannel plugin is in it."""
    if len(data) > MAX_SAVED_CONF:
        return None
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    plugins = doc.get("plugins")
    for conf in plugins if isinstance(plugins, list) else [doc]:
        if isinstance(conf, dict) and conf.get("type") == "flannel":
            found = conf.get("dataDir")
            if isinstance(found, str) and found.startswith("/") and "\0" not in found:
                return Path(found)
            return DEFAULT_CNI_DATA_DIR
    return None


def flannel_data_dir(conf_dir: Path) -> Path:
    """The dataDir of the first flannel plugin in the runtime's configs (file name order, as
    runtimes pick them), else the plugin's default."""
    try:
        names = sorted(os.listdir(conf_dir))[:MAX_ENTRIES]
    except OSError:
        return DEFAULT_CNI_DATA_DIR
    for name in names:
        if name.endswith((".conf", ".conflist", ".json")):
            data = _read_small(conf_dir / name, MAX_SAVED_CONF)
            found = conf_data_dir(data) if data is not None else None
            if found is not None:
                return found
    return DEFAULT_CNI_DATA_DIR


def parse_ip_file(data: bytes) -> tuple[str, str | None] | None:
    """host-local's reservation file: `<containerID>\\r\\n<ifname>` (or the ID alone)."""
    if len(data) > MAX_IP_FILE:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = [x.strip() for x in text.splitlines()]
    if not lines or not _safe_name(lines[0]):
        return None
    return lines[0], (lines[1] if len(lines) > 1 and lines[1] else None)


def _read_small(path: Path, limit: int) -> bytes | None:
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
            return f.read(limit + 1)
    except OSError:
        return None


def host_local_addresses(
    directory: Path,
) -> dict[IPv4Address | IPv6Address, tuple[str, str | None]]:
    """host-local's reservations in `directory`: one file per address (IPv4 and IPv6) naming
    the container ID and ifname."""
    out: dict[IPv4Address | IPv6Address, tuple[str, str | None]] = {}
    try:
        names = sorted(os.listdir(directory))[:MAX_ENTRIES]
    except OSError:
        return out
    for name in names:
        try:
            ip = ip_address(name)
        except ValueError:
            continue  # lock, last_reserved_ip.0, ...
        data = _read_small(directory / name, MAX_IP_FILE)
        parsed = parse_ip_file(data) if data is not None else None
        if parsed is not None:
            out[ip] = parsed
    return out


def arp_request(mac: bytes, ip: IPv4Address, target: IPv4Address) -> bytes:
    eth = b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip.packed + b"\0" * 6 + target.packed
    return eth + arp


def parse_arp_reply(frame: bytes) -> IPv4Address | None:
    """The sender address of an ARP reply frame; None for anything else."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, 14)
    if (htype, ptype, hlen, plen, op) != (1, 0x0800, 6, 4, 2):
        return None
    return IPv4Address(frame[28:32])


async def arp_answers(
    bridge: str, targets: Sequence[IPv4Address], limit: float
) -> set[IPv4Address]:
    """The targets that answer an ARP request on `bridge` within `limit` s (two requests each)."""
    links = await command_json("ip", "-j", "addr", "show", "dev", bridge)
    if not links or not isinstance(links[0], dict):
        return set()
    try:
        mac = bytes.fromhex(str(links[0]["address"]).replace(":", ""))
        own = next(
            IPv4Address(a["local"]) for a in links[0]["addr_info"] if a.get("family") == "inet"
        )
    except (KeyError, TypeError, ValueError, AttributeError, StopIteration):
        return set()
    if len(mac) != 6:
        return set()
    loop = asyncio.get_running_loop()
    answered: set[IPv4Address] = set()
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    try:
        sock.bind((bridge, 0x0806))
        sock.setblocking(False)
        deadline = time.monotonic() + limit
        for rnd in range(2):
            for t in targets:
                if t not in answered:
                    sock.send(arp_request(mac, own, t))
            round_end = min(deadline, time.monotonic() + limit / 2) if rnd == 0 else deadline
            while time.monotonic() < round_end and len(answered) < len(targets):
                try:
                    async with asyncio.timeout(max(round_end - time.monotonic(), 0.01)):
                        frame = await loop.sock_recv(sock, 2048)
                except TimeoutError:
                    break
                sender = parse_arp_reply(frame)
                if sender is not None and sender in targets:
                    answered.add(sender)
    finally:
        sock.close()
    return answered


async def check_cni(host: Host, data_dir: Path) -> Check:
    try:
        names = sorted(n for n in os.listdir(data_dir) if not n.startswith("."))[:MAX_ENTRIES]
    except FileNotFoundError:
        return Check("cni_state", PASS, f"{data_dir} does not exist: no saved CNI state")
    except OSError as e:
        return Check("cni_state", WARN, f"cannot list {data_dir}: {e.strerror}")
    confs: list[SavedConf] = []
    stale: list[tuple[Path, str]] = []
    for name in names:
        path = data_dir / name
        data = _read_small(path, MAX_SAVED_CONF)
        if data is None:
            continue
        conf = parse_saved_conf(path, data)
        if isinstance(conf, str):
            stale.append((path, f"unreadable saved conf: {conf}"))
        else:
            confs.append(conf)
    env = host.env
    stores: dict[Path, dict[IPv4Address | IPv6Address, tuple[str, str | None]]] = {}
    probe: dict[str, list[tuple[SavedConf, IPv4Address]]] = {}
    unprobed = 0
    """Confs with IPv6 addresses only (an IPv6-only network): ARP cannot ask for them."""
    for conf in confs:
        if conf.ipam_dir is None:
            continue
        store = stores.setdefault(conf.ipam_dir, host_local_addresses(conf.ipam_dir))
        mine = [
            ip
            for ip, (cid, ifn) in store.items()
            if cid == conf.container_id and (conf.ifname is None or ifn in (None, conf.ifname))
        ]
        if not mine:
            stale.append(
                (
                    conf.path,
                    f"host-local holds no address for container {printable(conf.container_id, 60)}",
                )
            )
            continue
        for ip in mine:
            subnet = None if env is None else env.subnet if ip.version == 4 else env.ipv6_subnet
            if subnet is not None and ip not in subnet:
                stale.append((conf.path, f"its address {ip} is outside our subnet {subnet}"))
            elif isinstance(ip, IPv4Address):
                probe.setdefault(conf.bridge, []).append((conf, ip))
        if not any(isinstance(ip, IPv4Address) for ip in mine):
            unprobed += 1
    saved_ids = {c.container_id for c in confs}
    for directory, store in stores.items():
        for ip, (cid, _ifn) in sorted(store.items(), key=lambda kv: (kv[0].version, kv[0])):
            if cid not in saved_ids:
                stale.append(
                    (
                        directory / str(ip),
                        f"host-local address {ip} of container "
                        f"{printable(cid, 60)}, which has no saved conf",
                    )
                )
    for bridge, items in probe.items():
        try:
            answered = await arp_answers(bridge, [ip for _, ip in items], ARP_TIMEOUT)
        except OSError as e:
            return Check("cni_state", WARN, f"cannot send ARP on {bridge}: {e.strerror or e}",
                         "run overlayctl doctor as root (or with CAP_NET_RAW)")  # fmt: skip
        for conf, ip in items:
            if ip not in answered:
                stale.append(
                    (
                        conf.path,
                        f"nobody answers ARP for {ip} on {bridge}: the "
                        "container's network namespace is gone",
                    )
                )
    if not stale:
        if unprobed:
            return Check(
                "cni_state",
                PASS,
                f"{len(confs)} saved confs in {data_dir}, each with a host-local address; "
                f"{unprobed} with IPv6 addresses only, not probed (ARP is IPv4)",
            )
        return Check(
            "cni_state", PASS, f"{len(confs)} saved confs in {data_dir}, each with a live address"
        )
    what = "; ".join(f"{p.name}: {why}" for p, why in stale[:5])
    more = f" (and {len(stale) - 5} more)" if len(stale) > 5 else ""
    paths = " ".join(str(p) for p, _ in stale[:5])
    return Check(
        "cni_state",
        FAIL,
        f"{len(stale)} stale: {what}{more}",
        f"the runtime never ran CNI DEL for these; once their containers are gone: rm -f {paths}",
    )


# --------------------------------------------------------------------------- the command


async def run_checks(args: argparse.Namespace) -> list[Check]:
    local = args.local
    daemon, etcd, addresses = await asyncio.gather(
        read_daemon(local["healthz_ip"], local["healthz_port"]),
        read_etcd(args.etcd, ttls=True),
        local_addresses(),
    )
    env, env_error = read_subnet_env(local["subnet_file"])
    lease, _ = own_lease(
        etcd.valid, etcd.leases, daemon_subnet(daemon), env, addresses, local["public_ip"]
    )
    host = Host(local, etcd, etcd.config, lease, addresses, env_error, env)
    checks: list[Check] = []
    if daemon.error:
        checks.append(
            Check(
                "daemon",
                FAIL,
                daemon.error,
                "start overlayd (systemctl start overlayd) and check its log",
            )
        )
    elif daemon.ready:
        checks.append(Check("daemon", PASS, f"{daemon.endpoint}/readyz: ready"))
    else:
        checks.append(
            Check(
                "daemon",
                FAIL,
                f"not ready: {daemon.reason}",
                "see `overlayctl status` and overlayd's log (journalctl -u overlayd)",
            )
        )
    config = host.config
    v4 = config.enable_ipv4 if config is not None else env is None or env.network is not None
    v6 = (
        config.enable_ipv6
        if config is not None
        else env is not None and env.ipv6_network is not None
    )
    if v4:
        checks.append(check_ip_forward())
    if v6:
        checks.append(check_ip_forward(ipv6=True))
    network = config.network if config is not None else env.network if env is not None else None
    network6 = (
        config.ipv6_network if config is not None else env.ipv6_network if env is not None else None
    )
    if v4 or network6 is None:
        checks += await check_forward(network)
    if network6 is not None:
        checks += await check_forward(network6)
    checks.append(await check_mtu(host))
    tx = await check_tx_checksum(host)
    if tx is not None:
        checks.append(tx)
    checks.append(check_etcd(etcd, args.etcd_slow_ms))
    prefix = args.etcd.prefix
    if etcd.reachable:
        checks += await check_peers(host, args.probe_timeout)
        checks.append(check_subnet_env(host))
        checks.append(check_duplicates(etcd.leases, prefix))
        checks.append(check_renewals(etcd, local["subnet_lease_renew_margin"], prefix))
    else:
        for name in ("peers", "subnet_env", "duplicate_public_ip", "lease_renewals"):
            checks.append(Check(name, WARN, "not checked: etcd is unreachable"))
    data_dir = args.cni_data_dir or flannel_data_dir(args.cni_conf_dir)
    checks.append(await check_cni(host, data_dir))
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    args.local = resolve_local(args)
    checks = asyncio.run(run_checks(args))
    failed = any(c.result == FAIL for c in checks)
    if args.json:
        doc = {"schema": SCHEMA, "ok": not failed, "checks": [asdict(c) for c in checks]}
        print(json.dumps(doc, indent=2))
    else:
        for c in checks:
            print(c.line())
    return 1 if failed else 0


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and at most 3600")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check this host for what stops pods from talking; one line per check, with fixes",
        description="Check this host: the local overlayd's readiness, ip_forward, the FORWARD "
        "policy and our forward rules, MTU consistency, the vxlan tx checksum offload behind "
        "NAT, a real probe of every peer through the encapsulation port, etcd health and "
        "latency, subnet.env against our lease, duplicate PublicIPs, leases whose hosts stopped "
        "renewing, stale CNI state. One PASS/FAIL/WARN line per check, each FAIL with its fix. "
        "Run on the host (or `ip netns exec NS overlayctl doctor`), as root (raw sockets, "
        "iptables). Exit 1 when a check fails, 2 on usage errors.",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print JSON: {"schema": 1, "ok": bool, "checks": [{"name", '
        '"result", "message", "fix"}]}',
    )
    parser.add_argument(
        "--cni-data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the flannel CNI plugin's dataDir (default: the dataDir of the flannel plugin "
        f"in --cni-conf-dir's network configs, else {DEFAULT_CNI_DATA_DIR})",
    )
    parser.add_argument(
        "--cni-conf-dir",
        type=Path,
        default=CNI_CONF_DIR,
        metavar="DIR",
        help="where the runtime's CNI network configs are (default: %(default)s)",
    )
    parser.add_argument(
        "--probe-timeout",
        type=_positive,
        default=PROBE_TIMEOUT,
        metavar="SECONDS",
        help="seconds allowed for each peer probe (default: %(default)s)",
    )
    parser.add_argument(
        "--etcd-slow-ms",
        type=_positive,
        default=ETCD_SLOW_MS,
        metavar="MS",
        help="WARN when one etcd read takes longer (default: %(default)s)",
    )
    add_local_flags(parser)
    parser.set_defaults(func=cmd_doctor)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as `overlayctl doctor`")
