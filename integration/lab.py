"""A multi-node overlay lab in network namespaces, as a library (`overlayctl lab` is a thin CLI).

Layout of a lab named NAME (all namespaces are named `ovl-NAME-*`):

    root ns: ovm-NAME (198.18.X.254/24), etcd listens there
       |  veth
    ovl-NAME-u: bridge br0 (the underlay "switch"), ports mgmt, h1, h2, ...
       |  veth                                  |
    ovl-NAME-h1: eth0 198.18.X.1/24, overlayd,  ovl-NAME-h2: eth0 198.18.X.2/24 ...
                 cni0 = subnet gateway
       |  veth
    ovl-NAME-h1c0: eth0 = next address of h1's subnet, default route via cni0, probe server

The underlay /24 is the first one of 198.18.0.0/15 (RFC 2544 benchmark range) that the root
namespace does not use yet. The root namespace holds one end of a management veth on the
underlay bridge: etcd listens on it (so every host reaches etcd over the underlay, like a real
cluster), and the lab reads /readyz of every daemon through it. Host namespaces have no default
route: nothing they send can leave the lab.

With `ipv6=True` (`overlayctl lab up --ipv6`) underlay and overlay are dual stack: each host's
eth0 also gets `<ULA /64>::<index>` (a /64 of fdXX:XXXX:XXXX::/48 derived from the lab's name
and underlay, so two labs never share one), the network config gets EnableIPv6 with
IPv6Network (default fd10:1::/48), the daemons find their PublicIPv6 on eth0, the flannel
CNI plugin gives every container an IPv4 and an IPv6 address, and the matrix probes both
families. DAD is off in the lab's namespaces (addresses are usable at once); IPv6 forwarding is
on in the hosts. The udp backend and `attach="bridge"` stay IPv4 only (LabError).

With `ipv6_only=True` (`--ipv6-only`) the lab is IPv6 from end to end: the hosts' eth0 has only
the ULA address (no IPv4 at all), the management link gets `<ULA /64>::fe`, where etcd listens
and the daemons' /readyz is read, the network config has `EnableIPv4: false` with IPv6Network,
every lease is flannel's IPv6-only form (`0.0.0.0-0&<IPv6 subnet>`, PublicIP 0.0.0.0), the
containers get IPv6 addresses only and the matrix probes IPv6 only. It starts its own etcd.

State lives in /run/overlay-lab/NAME/ (state.json, etcd data, per node subnet.env and logs) and
is written before each thing is created, so `down()` also cleans up after a crashed `up()`;
it additionally removes anything named with the lab's prefix and any process whose command
line names the state directory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path
from typing import Any

from integration import flannelhost
from integration.containers import ATTACH_MODES, CniSetup, attach_container
from integration.etcdserver import EtcdServer, free_port
from integration.netns import (
    CommandError,
    add_netns,
    delete_netns,
    in_ns,
    ip_json,
    list_netns,
    pid_alive,
    pid_cmdline,
    run,
    stop_pid,
    wait_pid_gone,
)
from integration.probe import DEFAULT_PORT as PROBE_PORT
from overlay.subnetenv import SubnetEnv, write_subnet_env
from subnetmgr.model import (
    NO_IPV4,
    LeaseAttrs,
    MalformedLease,
    Subnet,
    parse_subnet_key,
    subnet_key,
)

STATE_ROOT = Path("/run/overlay-lab")
UNDERLAY_POOL = IPv4Network("198.18.0.0/15")
HEALTH_PORT = 8286
DEFAULT_NETWORK = "10.1.0.0/16"
DEFAULT_NETWORK6 = "fd10:1::/48"
DEFAULT_PREFIX = "/coreos.com/network"
BACKENDS = ("vxlan", "udp", "alloc", "host-gw")
_NAME_RE = re.compile(r"^[a-z0-9]{1,10}$")

Progress = Callable[[str], None]


class LabError(RuntimeError):
    pass


def _quiet(_: str) -> None:
    return None


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise LabError(
            f"lab name {name!r} is not valid: use 1-10 lower-case letters or digits "
            "(it becomes part of kernel names, which are limited to 15 characters)"
        )
    return name


# --------------------------------------------------------------------------- state


@dataclass
class ContainerState:
    ns: str
    ip: str | None = None
    probe_pid: int | None = None
    ip6: str | None = None


@dataclass
class NodeState:
    index: int
    ns: str
    ip: str
    kind: str = "overlayd"
    """"overlayd" (our daemon) or "flannel" (configured by hand, see integration.flannelhost)."""
    daemon_pid: int | None = None
    subnet: str | None = None
    vtep_mac: str | None = None
    containers: list[ContainerState] = field(default_factory=list)
    container: str | None = None
    """The Docker container of the host (provider "containers")."""
    container_pid: int | None = None
    """The host pid of that container's init (systemd)."""
    ip6: str | None = None
    """The underlay IPv6 address on eth0 (`ipv6` labs)."""
    subnet6: str | None = None


@dataclass
class LabState:
    name: str
    provider: str = "netns"
    """Where hosts live: "netns" (network namespaces) or "containers" (integration.docker_lab)."""
    underlay: str = ""
    network: str = DEFAULT_NETWORK
    backend: str = "vxlan"
    prefix: str = DEFAULT_PREFIX
    etcd_endpoint: str = ""
    """The endpoint(s) as reached from the root namespace (etcdctl, status)."""
    daemon_endpoints: str = ""
    """The endpoint(s) as the daemons in the host namespaces reach them."""
    etcd_external: bool = False
    relay_pids: list[int] = field(default_factory=list)
    """socat relays from the management address to an external etcd on loopback."""
    etcd_pid: int | None = None
    resync_period: str | None = None
    lease_ttl: str | None = None
    containers_per_node: int = 1
    attach: str = "cni"
    """How containers are attached: "cni" (our flannel plugin) or "bridge" (iproute2)."""
    namespaces: list[str] = field(default_factory=list)
    nodes: list[NodeState] = field(default_factory=list)
    image: str = ""
    """The image of the hosts and etcd (provider "containers")."""
    docker_network: str = ""
    etcd_container: str = ""
    ipv6: bool = False
    """Dual stack: IPv6 underlay addresses and EnableIPv6 (see the module docstring)."""
    underlay6: str = ""
    network6: str = ""
    ipv6_only: bool = False
    """No IPv4 anywhere in the lab: EnableIPv4 false (see the module docstring)."""

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> LabState:
        nodes = []
        for n in doc.pop("nodes", []):
            conts = [ContainerState(**c) for c in n.pop("containers", [])]
            nodes.append(NodeState(**n, containers=conts))
        return cls(**doc, nodes=nodes)


@dataclass(frozen=True)
class MatrixEntry:
    src: str
    dst: str
    src_ip: str
    dst_ip: str
    proto: str
    ok: bool
    rtt_ms: float | None
    error: str = ""
    family: int = 4


# --------------------------------------------------------------------------- the lab


class Lab:
    provider = "netns"
    """Where hosts live; integration.docker_lab.ContainerLab is the "containers" provider."""

    def __init__(
        self, name: str = "lab", state_root: Path = STATE_ROOT, progress: Progress = _quiet
    ) -> None:
        self.name = validate_name(name)
        self.dir = state_root / name
        self.progress = progress
        self.state = LabState(name)
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        if (self.dir / "state.json").exists():
            self.state = LabState.from_dict(json.loads((self.dir / "state.json").read_text()))

    # ------------------------------------------------------------------ names

    @property
    def ns_prefix(self) -> str:
        return f"ovl-{self.name}-"

    @property
    def underlay_ns(self) -> str:
        return f"{self.ns_prefix}u"

    @property
    def mgmt_link(self) -> str:
        return f"ovm-{self.name}"

    def host_ns(self, index: int) -> str:
        return f"{self.ns_prefix}h{index}"

    def container_ns(self, index: int, j: int) -> str:
        return f"{self.ns_prefix}h{index}c{j}"

    def node_dir(self, index: int) -> Path:
        return self.dir / f"h{index}"

    @property
    def cni_bin(self) -> Path:
        return self.dir / "cni-bin"

    def subnet_file(self, index: int) -> Path:
        return self.node_dir(index) / "subnet.env"

    @property
    def mgmt_ip(self) -> IPv4Interface:
        net = IPv4Network(self.state.underlay)
        return IPv4Interface(f"{net.broadcast_address - 1}/{net.prefixlen}")

    @property
    def mgmt_ip6(self) -> IPv6Interface:
        """The management link's address in an IPv6-only lab: `<ULA /64>::fe`."""
        net6 = IPv6Network(self.state.underlay6)
        return IPv6Interface((int(net6.network_address) + 0xFE, net6.prefixlen))

    def mgmt_address(self, node: NodeState) -> str:
        """The address the lab reaches host `node` at (its /readyz): the IPv6 one in an
        IPv6-only lab, else the IPv4 one."""
        if self.state.ipv6_only:
            assert node.ip6 is not None
            return node.ip6
        return node.ip

    def node(self, index: int) -> NodeState:
        for n in self.state.nodes:
            if n.index == index:
                return n
        raise LabError(f"lab {self.name!r} has no node h{index}")

    @property
    def exists(self) -> bool:
        return self.dir.exists() or bool(list_netns(self.ns_prefix))

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self.state), indent=1))
        tmp.rename(self.dir / "state.json")

    # ------------------------------------------------------------------ up

    async def up(
        self,
        nodes: int = 3,
        backend: str = "vxlan",
        containers_per_node: int = 1,
        etcd_endpoints: str | None = None,
        network: str = DEFAULT_NETWORK,
        etcd_prefix: str | None = None,
        resync_period: str | None = None,
        lease_ttl: str | None = None,
        ready_timeout: float = 60.0,
        attach: str = "cni",
        ipv6: bool = False,
        network6: str = DEFAULT_NETWORK6,
        ipv6_only: bool = False,
    ) -> None:
        """Build the underlay, etcd, the network config, `nodes` daemons and their containers."""
        if ipv6_only:
            if etcd_endpoints is not None:
                raise LabError("--ipv6-only: the lab starts its own etcd (on its IPv6 underlay)")
            if backend == "udp":
                raise LabError("--ipv6-only: the udp backend carries IPv4 only (as flannel's)")
            ipv6 = True
        if ipv6 and backend == "udp":
            raise LabError("--ipv6: the udp backend carries IPv4 only (as flannel's)")
        if ipv6 and attach != "cni":
            raise LabError("--ipv6 needs --attach cni (the bridge mode is IPv4 only)")
        if ipv6:
            try:
                net6 = IPv6Network(network6, strict=True)
            except ValueError as e:
                raise LabError(f"--network6 {network6!r} is not an IPv6 CIDR: {e}") from None
        if backend not in BACKENDS:
            raise LabError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if attach not in ATTACH_MODES:
            raise LabError(f"attach mode {attach!r} is not one of {', '.join(ATTACH_MODES)}")
        if not 0 <= nodes <= 200:
            raise LabError(f"--nodes {nodes}: use 0 to 200")
        if not 0 <= containers_per_node <= 50:
            raise LabError(f"--containers-per-node {containers_per_node}: use 0 to 50")
        try:
            net = IPv4Network(network, strict=True)
        except ValueError as e:
            raise LabError(f"--network {network!r} is not an IPv4 network CIDR: {e}") from None
        if self.exists:
            raise LabError(
                f"lab {self.name!r} already exists ({self.dir}); "
                f"run `overlayctl lab down --name {self.name}` first"
            )
        self.state = LabState(
            self.name,
            provider=self.provider,
            network=str(net),
            backend=backend,
            etcd_external=etcd_endpoints is not None,
            resync_period=resync_period,
            lease_ttl=lease_ttl,
            containers_per_node=containers_per_node,
            attach=attach,
            ipv6=ipv6,
            network6=str(net6) if ipv6 else "",
            ipv6_only=ipv6_only,
        )
        if etcd_prefix is not None:
            self.state.prefix = etcd_prefix
        elif etcd_endpoints is not None:
            # Never share the default prefix of someone else's etcd: `down` deletes this prefix.
            self.state.prefix = f"/overlay-lab/{self.name}{DEFAULT_PREFIX}"
        self.save()
        if attach == "cni":
            CniSetup.install(self.cni_bin)
        await self._make_underlay()
        if etcd_endpoints is None:
            await self._start_local_etcd()
        else:
            self.state.etcd_endpoint = etcd_endpoints
            self.save()
            self.state.daemon_endpoints = await self._reachable_endpoints(etcd_endpoints)
            self.save()
        config: dict[str, Any] = {"Network": str(net), "Backend": {"Type": backend}}
        if ipv6_only:
            config = {"EnableIPv4": False, "Backend": {"Type": backend}}
        if ipv6:
            config.update(EnableIPv6=True, IPv6Network=self.state.network6)
        await self.etcdctl("put", f"{self.state.prefix}/config", json.dumps(config))
        self.progress(f"network config written to {self.state.prefix}/config: {config}")
        await self.add_nodes(nodes, ready_timeout=ready_timeout)

    async def _make_underlay(self) -> None:
        with self._pool_lock():
            self.state.underlay = str(await free_underlay())
            if self.state.ipv6:
                self.state.underlay6 = str(_underlay6(self.name, self.state.underlay))
            self.state.namespaces.append(self.underlay_ns)
            self.save()
            u = self.underlay_ns
            await add_netns(u)
            await run("ip", "link", "add", "br0", "type", "bridge", ns=u)
            await run("ip", "link", "set", "br0", "up", ns=u)
            await run(
                "ip", "link", "add", self.mgmt_link, "type", "veth",
                "peer", "name", "mgmt", "netns", u,
            )  # fmt: skip
            await run("ip", "link", "set", "mgmt", "master", "br0", "up", ns=u)
            await run("ip", "addr", "add", str(self.mgmt_ip), "dev", self.mgmt_link)
            if self.state.ipv6_only:
                await run("ip", "addr", "add", str(self.mgmt_ip6), "dev", self.mgmt_link, "nodad")
            await run("ip", "link", "set", self.mgmt_link, "up")
        self.progress(f"underlay {self.state.underlay} on bridge br0 in {u}")

    def _pool_lock(self) -> contextlib.AbstractContextManager[None]:
        return underlay_pool_lock()

    async def _start_local_etcd(self) -> None:
        """The lab's own etcd (provider hook)."""
        self._start_etcd()

    def _start_etcd(self) -> None:
        host = str(self.mgmt_ip6.ip if self.state.ipv6_only else self.mgmt_ip.ip)
        server = EtcdServer(
            host=host,
            data_dir=self.dir / "etcd",
            log_path=self.dir / "etcd.log",
            name=f"lab-{self.name}",
            client_port=free_port(host),
            peer_port=free_port(host),
        )
        (self.dir / "etcd").mkdir(parents=True, exist_ok=True)
        server.start()
        assert server.proc is not None
        self._procs[server.proc.pid] = server.proc
        self.state.etcd_pid = server.proc.pid
        self.state.etcd_endpoint = server.endpoint
        self.state.daemon_endpoints = server.endpoint
        self.save()
        self.progress(f"etcd listening on {server.endpoint} (data in {self.dir / 'etcd'})")

    async def _reachable_endpoints(self, endpoints: str) -> str:
        """Endpoints for the daemons: one on loopback gets a relay on the management address.

        A host namespace cannot reach the root namespace's 127.0.0.1, so for each endpoint on
        loopback a socat in the root namespace listens on the management address (the lab's
        .254, only reachable from inside the lab) and forwards to it.
        """
        out = []
        for ep in endpoints.split(","):
            m = re.fullmatch(r"(https?)://(127\.\d+\.\d+\.\d+|localhost):(\d+)/?", ep.strip())
            if m is None:
                out.append(ep.strip())
                continue
            scheme, host, port = m[1], m[2], int(m[3])
            listen = free_port(str(self.mgmt_ip.ip))
            target = "127.0.0.1" if host == "localhost" else host
            pid = self._spawn(
                ["socat", f"TCP-LISTEN:{listen},bind={self.mgmt_ip.ip},fork,reuseaddr",
                 f"TCP:{target}:{port}"],
                self.dir / f"relay-{port}.log",
            )  # fmt: skip
            self.state.relay_pids.append(pid)
            self.save()
            await self._wait_listening(None, listen)
            out.append(f"{scheme}://{self.mgmt_ip.ip}:{listen}")
            self.progress(f"relay {self.mgmt_ip.ip}:{listen} -> {ep.strip()} for the daemons")
        return ",".join(out)

    async def _wait_listening(self, ns: str | None, port: int, limit: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while loop.time() < deadline:
            if (await run("ss", "-Htln", f"sport = :{port}", ns=ns, check=False)).strip():
                return
            await asyncio.sleep(0.05)
        raise LabError(f"nothing listens on port {port} in {ns or 'the root namespace'}")

    async def add_nodes(self, count: int, ready_timeout: float = 60.0) -> list[NodeState]:
        """Add `count` overlayd hosts: namespaces and links first, then all daemons at once."""
        added = [await self._make_host() for _ in range(count)]
        await self._start_daemons(added, ready_timeout)
        if added:
            self.progress(f"waiting for /readyz of {len(added)} overlayd ...")
        await asyncio.gather(*(self.wait_ready(n.index, ready_timeout) for n in added))
        for node in added:
            env = SubnetEnv.read(self.subnet_file(node.index))
            node.subnet = str(env.subnet) if env.subnet is not None else None
            node.subnet6 = str(env.ipv6_subnet) if env.ipv6_subnet is not None else None
            self.save()
            self.progress(
                f"h{node.index}: ready, subnet {env.subnet or env.ipv6_subnet}, MTU {env.mtu}"
            )
            await self._add_containers(node, env)
        return added

    async def add_node(self, ready_timeout: float = 60.0) -> NodeState:
        return (await self.add_nodes(1, ready_timeout))[0]

    async def _make_host(self, kind: str = "overlayd") -> NodeState:
        index = max((n.index for n in self.state.nodes), default=0) + 1
        net = IPv4Network(self.state.underlay)
        if index >= net.num_addresses - 2:
            raise LabError(f"the underlay {net} has no room for host h{index}")
        ip = IPv4Interface(f"{net.network_address + index}/{net.prefixlen}")
        # An IPv6-only lab's hosts have no IPv4 address: ip "" (mgmt_address() reaches them).
        node = NodeState(index, self.host_ns(index), "" if self.state.ipv6_only else str(ip.ip),
                         kind=kind)  # fmt: skip
        self.state.nodes.append(node)
        self.state.namespaces.append(node.ns)
        self.save()
        self.node_dir(index).mkdir(parents=True, exist_ok=True)
        await add_netns(node.ns)
        if self.state.ipv6:  # before eth0 exists: its link-local address skips DAD too
            await _dual_stack_sysctls(node.ns, forwarding=True)
        port = f"h{index}"
        await run(
            "ip", "link", "add", port, "netns", self.underlay_ns, "type", "veth",
            "peer", "name", "eth0", "netns", node.ns,
        )  # fmt: skip
        await run("ip", "link", "set", port, "master", "br0", "up", ns=self.underlay_ns)
        if not self.state.ipv6_only:
            await run("ip", "addr", "add", str(ip), "dev", "eth0", ns=node.ns)
        if self.state.ipv6:
            net6 = IPv6Network(self.state.underlay6)
            node.ip6 = str(net6.network_address + index)
            self.save()
            addr6 = f"{node.ip6}/{net6.prefixlen}"
            await run("ip", "addr", "add", addr6, "dev", "eth0", "nodad", ns=node.ns)
        await run("ip", "link", "set", "eth0", "up", ns=node.ns)
        self.progress(
            f"h{index}: namespace {node.ns}, underlay address "
            + (str(node.ip6) if self.state.ipv6_only else str(ip))
            + (f" and {node.ip6}" if node.ip6 and not self.state.ipv6_only else "")
        )
        return node

    def daemon_argv(self, node: NodeState) -> list[str]:
        argv = [
            sys.executable, "-m", "overlay.daemon",
            "--etcd-endpoints", self.state.daemon_endpoints,
            "--etcd-prefix", self.state.prefix,
            "--iface", "eth0",
            "--subnet-file", str(self.subnet_file(node.index)),
            "--healthz-ip", "::" if self.state.ipv6_only else "0.0.0.0",
            "--healthz-port", str(HEALTH_PORT),
            "--log-level", "debug",
            # As kube-flannel runs flanneld: the daemon masquerades traffic leaving the overlay
            # network, so subnet.env says FLANNEL_IPMASQ=true and the CNI delegate does not
            # masquerade (container to container keeps its source address).
            "--ip-masq",
            "--metrics",  # what `overlayctl status` reads: peers, ignored leases, errors
        ]  # fmt: skip
        if self.state.resync_period is not None:
            argv += ["--resync-period", self.state.resync_period]
        if self.state.lease_ttl is not None:
            argv += ["--subnet-lease-ttl", self.state.lease_ttl]
        return argv

    async def _start_daemons(self, nodes: list[NodeState], ready_timeout: float) -> None:
        """Start the daemons of freshly made hosts (provider hook; readiness is awaited later)."""
        for node in nodes:
            self._start_daemon(node)

    def _spawn(self, argv: list[str], log_path: Path, cwd: Path | None = None) -> int:
        """Start a long-lived process of the lab (own session, output appended to a log).

        A plain Popen, not asyncio's: these processes outlive the event loop (and the
        `overlayctl lab up` process); the Popen is kept so that this process can reap them.
        """
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )
        self._procs[proc.pid] = proc
        return proc.pid

    def _start_daemon(self, node: NodeState) -> None:
        node.daemon_pid = self._spawn(
            in_ns(node.ns, self.daemon_argv(node)),
            self.node_dir(node.index) / "overlayd.log",
            cwd=self.node_dir(node.index),
        )
        self.save()

    LOG_NAME = "log"
    """What the daemon's log is called in messages (a file here; a journal on containers)."""

    def _check_daemon_running(self, index: int) -> None:
        """Raise when host `index`'s daemon is gone (no point waiting for it to be ready)."""
        node = self.node(index)
        if node.daemon_pid is None or not pid_alive(node.daemon_pid):
            raise LabError(
                f"overlayd of h{index} is not running; last lines of its log:\n"
                + self.log_tail(index)
            )

    async def wait_ready(self, index: int, limit: float = 60.0) -> None:
        """Poll the daemon's /readyz over the management link until it answers 200."""
        node = self.node(index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            self._check_daemon_running(index)
            code = await http_status(self.mgmt_address(node), HEALTH_PORT, "/readyz")
            if code == 200:
                return
            if loop.time() > deadline:
                raise LabError(
                    f"overlayd of h{index} not ready within {limit}s (/readyz: {code}); "
                    f"last lines of its {self.LOG_NAME}:\n" + self.log_tail(index)
                )
            await asyncio.sleep(0.1)

    async def daemon_log(self, index: int) -> str:
        """Everything host `index`'s overlayd has logged so far (its log file here)."""
        path = self.node_dir(index) / "overlayd.log"
        try:
            return await asyncio.to_thread(path.read_text, errors="replace")
        except OSError:
            return ""

    def log_tail(self, index: int, lines: int = 20) -> str:
        path = self.node_dir(index) / "overlayd.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def _add_containers(self, node: NodeState, env: SubnetEnv) -> None:
        for j in range(self.state.containers_per_node):
            cont = ContainerState(self.container_ns(node.index, j))
            node.containers.append(cont)
            self.state.namespaces.append(cont.ns)
            self.save()
            await add_netns(cont.ns)
            if self.state.ipv6:
                await _dual_stack_sysctls(cont.ns, forwarding=False)
            if self.state.attach == "cni":
                attached = await attach_container(
                    node.ns, cont.ns, env, j,
                    cni=CniSetup(self.cni_bin),
                    subnet_file=self.subnet_file(node.index),
                    state_dir=self.node_dir(node.index) / "cni",
                )  # fmt: skip
            else:
                attached = await attach_container(node.ns, cont.ns, env, j)
            cont.ip = str(attached.ip) if attached.ip is not None else None
            cont.ip6 = str(attached.ip6) if attached.ip6 is not None else None
            cont.probe_pid = self._start_probe_server(node.index, cont.ns)
            self.save()
            shown = [a for a in (cont.ip, cont.ip6) if a]
            self.progress(f"h{node.index}: container {cont.ns} at {' and '.join(shown)}")
        for cont in node.containers:
            await self._wait_probe_server(cont)

    def _start_probe_server(self, index: int, ns: str) -> int:
        return self._spawn(
            in_ns(ns, [sys.executable, "-m", "integration.probe", "serve"]),
            self.node_dir(index) / f"probe-{ns}.log",
        )

    async def _wait_probe_server(self, cont: ContainerState) -> None:
        await self._wait_listening(cont.ns, PROBE_PORT)

    # ------------------------------------------------------------------ daemons

    async def stop_daemon(self, index: int, sig: int = signal.SIGTERM) -> None:
        """Signal the host's overlayd and wait until it is gone (SIGKILL after 10 s)."""
        node = self.node(index)
        if node.daemon_pid is None:
            return
        pid = node.daemon_pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if not await wait_pid_gone(pid, 10.0):
            await stop_pid(pid, 1.0)
        self._procs.pop(pid, None)
        node.daemon_pid = None
        self.save()

    async def start_daemon(self, index: int, ready_timeout: float = 60.0) -> None:
        node = self.node(index)
        if node.daemon_pid is not None and pid_alive(node.daemon_pid):
            raise LabError(f"overlayd of h{index} already runs (pid {node.daemon_pid})")
        self._start_daemon(node)
        await self.wait_ready(index, ready_timeout)

    async def remove_node(self, index: int, delete_lease: bool = True) -> None:
        """A host leaves: its daemon stops (SIGTERM), its lease is deleted, its namespaces go."""
        node = self.node(index)
        await self.stop_daemon(index)
        if delete_lease and (node.subnet is not None or node.subnet6 is not None):
            sub6 = IPv6Network(node.subnet6) if node.subnet6 else None
            sub4 = IPv4Network(node.subnet) if node.subnet else NO_IPV4
            await self.etcdctl("del", self.lease_key(sub4, sub6))
        for cont in node.containers:
            await delete_netns(cont.ns)
            self._forget_ns(cont.ns)
        await self._delete_host(node)
        self.state.nodes.remove(node)
        self.save()
        shutil.rmtree(self.node_dir(index), ignore_errors=True)

    async def _delete_host(self, node: NodeState) -> None:
        """The host itself goes: its namespace and its port on the underlay (provider hook)."""
        await delete_netns(node.ns)
        self._forget_ns(node.ns)
        await run("ip", "link", "del", f"h{node.index}", ns=self.underlay_ns, check=False)

    async def underlay_port(self, index: int) -> tuple[str | None, str]:
        """(namespace, device) of host `index`'s port on the underlay switch, for captures."""
        return self.underlay_ns, f"h{index}"

    def _forget_ns(self, ns: str) -> None:
        if ns in self.state.namespaces:
            self.state.namespaces.remove(ns)

    # ------------------------------------------------------------------ hand-made flannel host

    async def add_flannel_host(self, subnet: IPv4Network | None = None) -> NodeState:
        """A host set up with iproute2 and etcdctl exactly as flannel would set it up.

        It takes a free subnet (the highest free one unless given), writes its lease in
        flannel's exact bytes with a 24 h etcd lease, makes flannel.1 (vxlan labs; a host-gw lab
        needs no device), writes its subnet.env, programs every current lease of the lab's
        backend as a peer, and gets its containers.
        """
        node = await self._make_host(kind="flannel")
        leases = await self.leases()
        only6 = self.state.ipv6_only
        # IPv6-only: flannel's zero IPv4 subnet in the key and PublicIP 0.0.0.0 in the value.
        if only6:
            subnet = NO_IPV4
        elif subnet is None:
            subnet = self._free_subnet_from_top({lease.subnet for lease in leases.values()})
        node.subnet = None if only6 else str(subnet)
        public_ip = IPv4Address(0) if only6 else IPv4Address(node.ip)
        # Dual stack: an IPv6 subnet from the top too, the PublicIPv6 on eth0, flannel-v6.1.
        subnet6 = None
        ip6 = IPv6Address(node.ip6) if node.ip6 else None
        vtep_mac6 = None
        if self.state.ipv6:
            subnet6 = _free_subnet6_from_top(
                IPv6Network(self.state.network6), {x.subnet6 for x in leases.values()}
            )
            node.subnet6 = str(subnet6)
        hostgw = self.state.backend == "host-gw"
        if hostgw:
            value = flannelhost.flannel_hostgw_lease_value(public_ip, ip6)
        else:
            node.vtep_mac = None if only6 else flannelhost.random_vtep_mac()
            vtep_mac6 = flannelhost.random_vtep_mac() if subnet6 is not None else None
            value = flannelhost.flannel_vxlan_lease_value(
                public_ip, node.vtep_mac, public_ipv6=ip6, vtep_mac6=vtep_mac6
            )
        self.save()
        out = await self.etcdctl("lease", "grant", "86400")
        lease_id = out.split()[1]
        await self.etcdctl("put", f"--lease={lease_id}", self.lease_key(subnet, subnet6), value)
        if hostgw:
            mtu = 1500
            await flannelhost.enable_forwarding(node.ns, ipv6=subnet6 is not None)
        else:
            mtu = 1500 - 50
            if not only6:
                assert node.vtep_mac is not None
                await flannelhost.setup_flannel_device(
                    node.ns, "eth0", public_ip, subnet, node.vtep_mac, mtu
                )
            if subnet6 is not None and ip6 is not None and vtep_mac6 is not None:
                mtu = 1500 - 70  # one FLANNEL_MTU for both families, as overlayd writes it
                await flannelhost.setup_flannel_device(
                    node.ns, "eth0", ip6, subnet6, vtep_mac6, mtu
                )
        # IPMASQ=true as flanneld --ip-masq (kube-flannel) writes it, like the overlayd hosts:
        # the CNI delegate then keeps container source addresses. (The masquerade rules for
        # traffic leaving the network are not made here: nothing leaves the lab.)
        env = SubnetEnv(
            None if only6 else IPv4Network(self.state.network), None if only6 else subnet,
            mtu, ipmasq=True,
            ipv6_network=IPv6Network(self.state.network6) if subnet6 else None,
            ipv6_subnet=subnet6,
        )  # fmt: skip
        write_subnet_env(self.subnet_file(node.index), env)
        await self.sync_flannel_host(node.index)
        what = "host-gw" if hostgw else f"VTEP {node.vtep_mac or vtep_mac6}"
        self.progress(
            f"h{node.index}: flannel host by hand, subnet {subnet6 if only6 else subnet}, {what}"
        )
        await self._add_containers(node, env)
        return node

    def _free_subnet_from_top(self, taken: set[IPv4Network]) -> IPv4Network:
        net = IPv4Network(self.state.network)
        length = 24 if net.prefixlen <= 22 else net.prefixlen + 2
        for sub in reversed(list(net.subnets(new_prefix=length))[1:]):
            if sub not in taken:
                return sub
        raise LabError(f"no free subnet left in {net}")

    async def sync_flannel_host(self, index: int) -> None:
        """Program the hand-made host's peers from the leases of the lab's backend now in etcd."""
        node = self.node(index)
        own = IPv4Network(node.subnet) if node.subnet else None
        own6 = IPv6Network(node.subnet6) if node.subnet6 else None
        for lease in (await self.leases()).values():
            if lease.attrs.backend_type != self.state.backend:
                continue
            if (own is not None and lease.subnet == own) or (own6 and lease.subnet6 == own6):
                continue
            ip6 = lease.attrs.public_ipv6
            dual = self.state.ipv6 and lease.subnet6 is not None and ip6 is not None
            v4 = lease.subnet != NO_IPV4  # an IPv6-only lease has no IPv4 side
            if self.state.backend == "host-gw":
                if v4:
                    await flannelhost.add_hostgw_peer(
                        node.ns, "eth0", lease.subnet, lease.attrs.public_ip
                    )
                if dual:
                    assert lease.subnet6 is not None and ip6 is not None
                    await flannelhost.add_hostgw_peer(node.ns, "eth0", lease.subnet6, ip6)
                continue
            data = lease.attrs.backend_data or {}
            mac = data.get("VtepMAC")
            if v4 and not isinstance(mac, str):
                continue
            if v4 and isinstance(mac, str):
                peer = flannelhost.VxlanPeer(lease.subnet, lease.attrs.public_ip, mac)
                await flannelhost.add_peer(node.ns, peer)
            mac6 = (lease.attrs.backend_v6_data or {}).get("VtepMAC")
            if dual and isinstance(mac6, str):
                assert lease.subnet6 is not None and ip6 is not None
                await flannelhost.add_peer(node.ns, flannelhost.VxlanPeer(lease.subnet6, ip6, mac6))

    # ------------------------------------------------------------------ etcd

    def lease_key(self, subnet: IPv4Network, subnet6: IPv6Network | None = None) -> str:
        """The etcd key of `subnet`'s lease (dual stack: with `subnet6`), through the one lease
        key codec (subnetmgr.model)."""
        return f"{self.state.prefix}/subnets/{subnet_key(subnet, subnet6)}"

    async def etcdctl(self, *args: str, limit: float = 10.0) -> str:
        env = dict(os.environ, ETCDCTL_API="3")
        return await run(
            "etcdctl", f"--endpoints={self.state.etcd_endpoint}", "--command-timeout=5s", *args,
            limit=limit, env=env,
        )  # fmt: skip

    async def leases(self) -> dict[Subnet, LeaseView]:
        """The leases now in etcd (malformed ones are skipped, as the daemon does)."""
        out = await self.etcdctl("get", "--prefix", f"{self.state.prefix}/subnets/", "-w", "json")
        doc = json.loads(out)
        result: dict[Subnet, LeaseView] = {}
        for kv in doc.get("kvs", []):
            key = base64.b64decode(kv["key"]).decode(errors="replace")
            value = base64.b64decode(kv.get("value", ""))
            try:
                subnet, subnet6 = parse_subnet_key(key.rsplit("/", 1)[-1])
                attrs = LeaseAttrs.from_json(value)
            except MalformedLease:
                continue
            view = LeaseView(subnet, attrs, int(kv.get("lease", 0)), subnet6)
            result[view.ident] = view
        return result

    # ------------------------------------------------------------------ traffic

    def containers(self) -> list[tuple[NodeState, ContainerState]]:
        return [(n, c) for n in self.state.nodes for c in n.containers if c.ip or c.ip6]

    async def matrix(self, probe_limit: float = 2.0) -> list[MatrixEntry]:
        """Probe every container from every other one, TCP and UDP, all sources at once."""
        conts = self.containers()
        alloc = self.state.backend == "alloc"

        async def from_one(src_node: NodeState, src: ContainerState) -> list[MatrixEntry]:
            targets = [
                (dn, dc)
                for dn, dc in conts
                if dc.ns != src.ns and (not alloc or dn.index == src_node.index)
            ]
            if not targets:
                return []
            ips = [str(dc.ip) for _, dc in targets if dc.ip and src.ip]
            by_ip = {str(dc.ip): dc.ns for _, dc in targets if dc.ip and src.ip}
            if self.state.ipv6 and src.ip6:  # both families (a container without one: IPv4)
                ips += [dc.ip6 for _, dc in targets if dc.ip6]
                by_ip.update((dc.ip6, dc.ns) for _, dc in targets if dc.ip6)
            try:
                out = await run(
                    sys.executable, "-m", "integration.probe", "check",
                    "--timeout", str(probe_limit), *ips,
                    ns=src.ns, check=False, limit=probe_limit * 3 + 10,
                )  # fmt: skip
                results = json.loads(out)
            except (CommandError, ValueError) as e:
                # The probe client itself failed: every probe from this container failed.
                return [
                    MatrixEntry(src.ns, by_ip[ip], _src_ip(src, ip), ip, proto, False, None,
                                f"probe client failed: {e}", _family(ip))
                    for ip in ips for proto in ("tcp", "udp")
                ]  # fmt: skip
            entries = []
            for r in results:
                entries.append(
                    MatrixEntry(
                        src.ns,
                        by_ip[r["target"]],
                        _src_ip(src, r["target"]),
                        r["target"],
                        r["proto"],
                        r["ok"],
                        r["rtt_ms"],
                        r["error"],
                        _family(r["target"]),
                    )
                )
            return entries

        parts = await asyncio.gather(*(from_one(n, c) for n, c in conts))
        return [e for part in parts for e in part]

    # ------------------------------------------------------------------ status

    async def status(self) -> dict[str, Any]:
        nodes = []
        for n in self.state.nodes:
            alive = n.daemon_pid is not None and pid_alive(n.daemon_pid)
            ready = alive and await http_status(self.mgmt_address(n), HEALTH_PORT, "/readyz") == 200
            nodes.append(
                {
                    "node": f"h{n.index}",
                    "namespace": n.ns,
                    "public_ip": n.ip or None,
                    "kind": n.kind,
                    "daemon_pid": n.daemon_pid,
                    "alive": alive if n.kind == "overlayd" else None,
                    "ready": ready if n.kind == "overlayd" else None,
                    "subnet": n.subnet,
                    "containers": [
                        {"namespace": c.ns, "ip": c.ip, **({"ip6": c.ip6} if c.ip6 else {})}
                        for c in n.containers
                    ],
                    **({"public_ipv6": n.ip6, "subnet6": n.subnet6} if n.ip6 else {}),
                }
            )
        leases: list[dict[str, Any]] = []
        error = None
        try:
            for lease in (await self.leases()).values():
                leases.append(
                    {
                        "subnet": str(lease.ident),
                        **({"subnet6": str(lease.subnet6)} if lease.subnet6 else {}),
                        "public_ip": str(lease.attrs.address),
                        "backend_type": lease.attrs.backend_type,
                        "backend_data": dict(
                            lease.attrs.backend_data or lease.attrs.backend_v6_data or {}
                        ),
                    }
                )
        except (CommandError, ValueError) as e:
            error = str(e)
        return {
            "name": self.name,
            "provider": self.state.provider,
            "state_dir": str(self.dir),
            "underlay": self.state.underlay,
            "network": self.state.network,
            **(
                {"underlay6": self.state.underlay6, "network6": self.state.network6}
                if self.state.ipv6
                else {}
            ),
            "ipv6_only": self.state.ipv6_only,
            "backend": self.state.backend,
            "etcd": self.state.etcd_endpoint,
            "etcd_prefix": self.state.prefix,
            "etcd_alive": (
                pid_alive(self.state.etcd_pid) if self.state.etcd_pid is not None else None
            ),
            "etcd_error": error,
            "nodes": nodes,
            "leases": leases,
        }

    # ------------------------------------------------------------------ down

    async def down(self) -> list[str]:
        """Remove everything this lab made, from its state and by name; return what was done."""
        done: list[str] = []
        pids = [c.probe_pid for n in self.state.nodes for c in n.containers]
        pids += [n.daemon_pid for n in self.state.nodes]
        pids += self.state.relay_pids
        for pid in pids:
            if pid is not None and self._ours(pid):
                await stop_pid(pid)
                done.append(f"stopped pid {pid}")
        if self.state.etcd_external and self.state.etcd_endpoint:
            with contextlib.suppress(CommandError):
                await self.etcdctl("del", "--prefix", f"{self.state.prefix}/")
                done.append(f"deleted {self.state.prefix}/ from {self.state.etcd_endpoint}")
        if self.state.etcd_pid is not None and self._ours(self.state.etcd_pid):
            await stop_pid(self.state.etcd_pid)
            done.append(f"stopped etcd pid {self.state.etcd_pid}")
        # Anything else still naming our state directory (e.g. a daemon of a crashed `up`).
        for pid in self._pids_naming_state_dir():
            await stop_pid(pid)
            done.append(f"stopped leftover pid {pid}")
        names = list(dict.fromkeys([*reversed(self.state.namespaces), *list_netns(self.ns_prefix)]))
        for ns in sorted(names, key=lambda s: s == self.underlay_ns):
            await delete_netns(ns)
            done.append(f"deleted namespace {ns}")
        if (await run("ip", "-o", "link", "show", self.mgmt_link, check=False)).strip():
            await run("ip", "link", "del", self.mgmt_link, check=False)
            done.append(f"deleted link {self.mgmt_link}")
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self._procs.clear()
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
            done.append(f"removed {self.dir}")
        self.state = LabState(self.name)
        return done

    def _ours(self, pid: int) -> bool:
        """A pid from the state file is only killed if it still runs one of our programs."""
        if not pid_alive(pid):
            return False
        cmd = " ".join(pid_cmdline(pid))
        return (
            str(self.dir) in cmd
            or "integration.probe" in cmd
            or (pid in self.state.relay_pids and "socat" in cmd)
            or (pid == self.state.etcd_pid and "etcd" in cmd)
        )

    def _pids_naming_state_dir(self) -> list[int]:
        marker = str(self.dir) + "/"
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                if any(marker in a or a == str(self.dir) for a in pid_cmdline(int(entry.name))):
                    if pid_alive(int(entry.name)):
                        found.append(int(entry.name))
        return found


PROVIDERS = ("netns", "containers")


def open_lab(
    name: str = "lab",
    state_root: Path = STATE_ROOT,
    progress: Progress = _quiet,
    provider: str | None = None,
) -> Lab:
    """The lab `name` with the provider its state records (or `provider` for a new one)."""
    validate_name(name)
    state = state_root / name / "state.json"
    if provider is None:
        provider = "netns"
        with contextlib.suppress(OSError, ValueError, AttributeError):
            recorded = json.loads(state.read_text()).get("provider", "netns")
            provider = recorded if isinstance(recorded, str) else "netns"
    if provider == "netns":
        return Lab(name, state_root, progress)
    if provider == "containers":
        from integration.docker_lab import ContainerLab

        return ContainerLab(name, state_root, progress)
    raise LabError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}")


@dataclass(frozen=True)
class LeaseView:
    subnet: IPv4Network
    attrs: LeaseAttrs
    etcd_lease: int
    """The etcd lease ID (0: a reservation without TTL)."""
    subnet6: IPv6Network | None = None
    """The IPv6 subnet of a dual-stack key."""

    @property
    def ident(self) -> Subnet:
        """What `Lab.leases()` keys it by: the IPv4 subnet, or an IPv6-only lease's IPv6 one."""
        return self.subnet6 if self.subnet == NO_IPV4 and self.subnet6 is not None else self.subnet


async def http_status(host: str, port: int, path: str, limit: float = 1.0) -> int | None:
    """The status code of GET http://host:port/path, or None when nothing answers."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), limit)
    except (OSError, TimeoutError):
        return None
    try:
        shown = f"[{host}]" if ":" in host else host
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {shown}\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), limit)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
    parts = line.split()
    if len(parts) >= 2 and parts[1].isdigit():
        return int(parts[1])
    return None


@contextlib.contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """An exclusive lock for the whole machine, a file `.NAME.lock` under STATE_ROOT (whatever
    the labs' own state roots: tests use their own), held until the block ends."""
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(STATE_ROOT / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def underlay_pool_lock() -> contextlib.AbstractContextManager[None]:
    """Two labs (or etcd clusters, integration.etcdcluster) starting at once must not pick the
    same /24 of the pool: hold this while picking one and until its address is assigned."""
    return machine_lock("underlay")


async def free_underlay() -> IPv4Network:
    """The first /24 of the pool that no address or route of the root namespace touches."""
    used: list[IPv4Network] = []
    for r in await ip_json("route", "show", "table", "all"):
        dst = r.get("dst", "")
        if dst and dst != "default" and ":" not in dst:
            with contextlib.suppress(ValueError):
                used.append(IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
    for link in await ip_json("addr", "show"):
        for a in link.get("addr_info", []):
            if a.get("family") == "inet":
                used.append(IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for cand in UNDERLAY_POOL.subnets(new_prefix=24):
        if not any(cand.overlaps(u) for u in used):
            return cand
    raise LabError(f"no free /24 left in the underlay pool {UNDERLAY_POOL}")


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4


def _src_ip(src: ContainerState, target: str) -> str:
    return str(src.ip6) if _family(target) == 6 else str(src.ip)


def _underlay6(name: str, underlay: str) -> IPv6Network:
    """The lab's IPv6 underlay: a /64 of a ULA /48 (fd + 40 bits) derived from its name and
    IPv4 underlay, so labs that exist at once (distinct underlays) never share it."""
    digest = hashlib.sha256(f"{name} {underlay}".encode()).digest()
    prefix = (0xFD << 120) | (int.from_bytes(digest[:5]) << 80)
    return IPv6Network((prefix, 64))


async def _dual_stack_sysctls(ns: str, *, forwarding: bool) -> None:
    """No duplicate address detection in a lab namespace (addresses usable at once: every
    address in the lab is unique by construction); IPv6 forwarding on a host."""
    settings = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
    if forwarding:
        settings.append("net.ipv6.conf.all.forwarding=1")
    await run("sysctl", "-qw", *settings, ns=ns)


def _free_subnet6_from_top(net6: IPv6Network, taken: set[IPv6Network | None]) -> IPv6Network:
    """The highest IPv6 subnet of the default length (64, or prefix + 2) not in `taken`."""
    length = 64 if net6.prefixlen <= 62 else net6.prefixlen + 2
    step = 1 << (128 - length)
    top = int(net6.broadcast_address) + 1 - step
    for i in range(1, 1000):  # a few taken ones at most in a lab
        sub = IPv6Network((top - i * step + step, length))
        if sub not in taken:
            return sub
    raise LabError(f"no free IPv6 subnet left at the top of {net6}")
