"""overlayd end to end: the real binary in a network namespace, real etcd, the alloc backend.

Layout: a namespace `ovd<unique>` joined to the root namespace by a veth pair on a private /30
(100.64.0.0/10, chosen per run). etcd and mosquitto listen on the root side of that pair; the
daemon runs in the namespace (default route over the veth) and serves /healthz on its side.
Everything is torn down at the end, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from integration.etcdserver import EtcdServer, free_port
from integration.netns import kill_group
from tests.test_events import Broker, receive, subscriber

pytestmark = [pytest.mark.root, pytest.mark.slow]

OVERLAYD = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "overlayd")
HEALTHZ_PORT = 8471
NETWORK = "10.77.0.0/16"
# Daemons take subnets from 10.77.100.0 up (flannel picks at random among the first 100 free):
# the peers the tests write below that never collide with a daemon's own lease.
SUBNET_MIN = "10.77.100.0"
ALLOC_CONFIG = json.dumps(
    {"Network": NETWORK, "SubnetMin": SUBNET_MIN, "Backend": {"Type": "alloc"}}
)


@dataclass
class Site:
    ns: str
    host_ip: str  # root side of the veth: etcd, mosquitto
    node_ip: str  # namespace side: the daemon's public IP and health server
    etcd: EtcdServer


@contextlib.contextmanager
def namespace_link() -> Iterator[tuple[str, str, str]]:
    """A fresh namespace with an `eth0` joined to the root namespace by its own /30 (unique per
    run, inside 100.64.0.0/10): yields (namespace, root-side IP, namespace-side IP); both ends
    are removed afterwards, also when the set-up fails half way."""
    token = os.urandom(3).hex()
    ns, veth = f"ovd{token}", f"ovd{token}h"
    base = random.Random(token).randrange(0, 1 << 20) * 4  # a /30 inside 100.64.0.0/10
    net = IPv4Network((int(IPv4Interface("100.64.0.0/10").ip) + base, 30))
    host_ip, node_ip = str(net.network_address + 1), str(net.network_address + 2)

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    ip("netns", "add", ns)
    try:
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", veth)
        ip("link", "set", veth, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", f"{node_ip}/30", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "route", "add", "default", "via", host_ip)
        yield ns, host_ip, node_ip
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with namespace_link() as (ns, host_ip, node_ip):
        etcd = EtcdServer(host=host_ip).start()
        try:
            yield Site(ns, host_ip, node_ip, etcd)
        finally:
            etcd.stop()


def etcdctl(site: Site, *args: str) -> str:
    out = subprocess.run(
        ["etcdctl", "--endpoints", site.etcd.endpoint, "--command-timeout=5s", *args],
        env={**os.environ, "ETCDCTL_API": "3"},
        check=True, capture_output=True, text=True, timeout=15,
    )  # fmt: skip
    return out.stdout


def leases(site: Site, prefix: str) -> dict[str, str]:
    lines = etcdctl(site, "get", "--prefix", f"{prefix}/subnets/").splitlines()
    return {k.rsplit("/", 1)[1]: v for k, v in zip(lines[::2], lines[1::2], strict=True)}


@dataclass
class Daemon:
    site: Site
    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.site.ns, OVERLAYD, *self.args],
                stdout=log, stderr=log, start_new_session=True, env={**os.environ, **self.env},
            )  # fmt: skip

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # stacks into the log, for the failure
            time.sleep(1)
            pytest.fail(f"overlayd did not stop on signal {sig}:\n{self.tail()}")
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
        self.proc = None

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://{self.site.node_ip}:{HEALTHZ_PORT}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_for(self, what: str, check: object, timeout: float = 20.0) -> None:
        assert callable(check)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"overlayd exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(OSError):
                if check():
                    return
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")

    def wait_ready(self) -> None:
        self.wait_for("/readyz 200", lambda: self.get("/readyz")[0] == 200)

    def metric(self, name: str) -> str | None:
        for line in self.get("/metrics")[1].splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return line
        return None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def daemon_factory(site: Site, etcd_prefix: str, tmp_path: Path) -> Iterator[object]:
    made: list[Daemon] = []

    def make(*extra: str) -> Daemon:
        d = Daemon(
            site,
            [
                "--etcd-endpoints", site.etcd.endpoint,
                "--etcd-prefix", etcd_prefix,
                "--subnet-file", str(tmp_path / "run" / "subnet.env"),
                "--healthz-ip", site.node_ip, "--healthz-port", str(HEALTHZ_PORT),
                "--metrics", "--resync-period", "1", "--log-level", "debug",
                *extra,
            ],
            tmp_path / f"overlayd-{len(made)}.log",
        )  # fmt: skip
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.kill()
        # etcd keys under the unique prefix die with the module's etcd server.


def iptables_nat(site: Site) -> str:
    out = subprocess.run(
        ["ip", "netns", "exec", site.ns, "iptables", "-w", "5", "-t", "nat", "-S"],
        check=True, capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    return out.stdout


def cleanup_iptables(site: Site) -> None:
    for table, parent, comment, chain in (
        ("nat", "POSTROUTING", "flanneld masq", "FLANNEL-POSTRTG"),
        ("filter", "FORWARD", "flanneld forward", "FLANNEL-FWD"),
    ):
        cmd = ["ip", "netns", "exec", site.ns, "iptables", "-w", "5", "-t", table]
        subprocess.run([*cmd, "-D", parent, "-m", "comment", "--comment", comment, "-j", chain],
                       capture_output=True, timeout=10)  # fmt: skip
        subprocess.run([*cmd, "-F", chain], capture_output=True, timeout=10)
        subprocess.run([*cmd, "-X", chain], capture_output=True, timeout=10)


def test_lifecycle_lease_subnet_env_ready_restart_and_reacquire(
    site: Site, etcd_prefix: str, daemon_factory: object, tmp_path: Path
) -> None:
    assert callable(daemon_factory)
    d: Daemon = daemon_factory("--ip-masq", "--iptables-resync", "1")
    subnet_env = tmp_path / "run" / "subnet.env"
    try:
        d.start()
        # No config yet: alive, not ready, nothing written.
        d.wait_for("/healthz", lambda: d.get("/healthz")[0] == 200)
        assert d.get("/readyz")[0] == 503
        assert not subnet_env.exists()

        etcdctl(site, "put", f"{etcd_prefix}/config", ALLOC_CONFIG)
        d.wait_ready()
        env = dict(line.split("=", 1) for line in subnet_env.read_text().splitlines())
        assert env["FLANNEL_NETWORK"] == NETWORK
        assert env["FLANNEL_MTU"] == "1500"  # the veth's MTU (alloc adds no overhead)
        assert env["FLANNEL_IPMASQ"] == "true"
        subnet = IPv4Interface(env["FLANNEL_SUBNET"]).network
        assert subnet.subnet_of(IPv4Network(NETWORK)) and subnet.prefixlen == 24
        assert IPv4Interface(env["FLANNEL_SUBNET"]).ip == subnet.network_address + 1
        key = f"{subnet.network_address}-24"
        assert leases(site, etcd_prefix) == {
            key: f'{{"PublicIP":"{site.node_ip}","PublicIPv6":null,"BackendType":"alloc"}}'
        }
        assert f"-s {subnet} -d {NETWORK}" in iptables_nat(site)
        info = d.metric("overlay_lease_info")
        assert info is not None and f'subnet="{subnet}"' in info
        assert d.metric("overlay_ready") == "overlay_ready 1"

        # SIGTERM: exit 0, leave the rules (kernel state) and the lease in place.
        assert d.stop() == 0
        assert f"-s {subnet} -d {NETWORK}" in iptables_nat(site)
        assert key in leases(site, etcd_prefix)

        # A restart keeps the subnet.
        d.start()
        d.wait_ready()
        assert (
            IPv4Interface(
                dict(line.split("=", 1) for line in subnet_env.read_text().splitlines())[
                    "FLANNEL_SUBNET"
                ]
            ).network
            == subnet
        )

        # Deleting our lease in etcd: the daemon notices and takes the same subnet again.
        etcdctl(site, "del", f"{etcd_prefix}/subnets/{key}")
        d.wait_for(
            "re-acquisition",
            lambda: (
                d.metric("overlay_lease_acquisitions_total") == "overlay_lease_acquisitions_total 2"
            ),
        )
        assert key in leases(site, etcd_prefix)
        assert d.get("/readyz")[0] == 200
        assert "LOST our lease" in d.tail()

        # The iptables resync puts back a rule deleted by hand.
        subprocess.run(
            ["ip", "netns", "exec", site.ns, "iptables", "-w", "5", "-t", "nat", "-F",
             "FLANNEL-POSTRTG"], check=True, timeout=10,
        )  # fmt: skip
        d.wait_for("iptables repair", lambda: f"-s {subnet} -d {NETWORK}" in iptables_nat(site))
        assert d.stop(signal.SIGINT) == 0
    finally:
        d.kill()
        cleanup_iptables(site)


def test_previous_subnet_from_subnet_env_and_peers(
    site: Site, etcd_prefix: str, daemon_factory: object, tmp_path: Path
) -> None:
    assert callable(daemon_factory)
    etcdctl(site, "put", f"{etcd_prefix}/config", ALLOC_CONFIG)
    run = tmp_path / "run"
    run.mkdir()
    (run / "subnet.env").write_text(
        "FLANNEL_NETWORK=10.77.0.0/16\nFLANNEL_SUBNET=10.77.200.1/24\n"
        "FLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n"
    )
    # A peer reserved by hand, and a malformed lease that must be skipped, not fatal.
    peer = '{"PublicIP":"192.0.2.77","PublicIPv6":null,"BackendType":"alloc"}'
    etcdctl(site, "put", f"{etcd_prefix}/subnets/10.77.9.0-24", peer)
    etcdctl(site, "put", f"{etcd_prefix}/subnets/10.77.10.0-24", "{not json")
    d: Daemon = daemon_factory()
    # systemd's Type=notify: READY=1 arrives on $NOTIFY_SOCKET (a path socket: reachable from
    # inside the network namespace).
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(20)
        d.env["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
        d.start()
        assert notify.recv(200).startswith(b"READY=1\nSTATUS=lease 10.77.200.0/24")
    finally:
        notify.close()
    d.wait_ready()
    assert "FLANNEL_SUBNET=10.77.200.1/24\n" in (run / "subnet.env").read_text()
    assert "10.77.200.0-24" in leases(site, etcd_prefix)
    d.wait_for("one peer", lambda: d.metric("overlay_peers") == "overlay_peers 1")
    etcdctl(site, "del", f"{etcd_prefix}/subnets/10.77.9.0-24")
    d.wait_for("no peers", lambda: d.metric("overlay_peers") == "overlay_peers 0")
    assert d.stop() == 0


async def test_events_from_the_daemon(
    site: Site, etcd_prefix: str, daemon_factory: object, tmp_path: Path, unique: str
) -> None:
    assert callable(daemon_factory)
    broker = Broker(tmp_path, free_port(site.host_ip), host=site.host_ip)
    d: Daemon | None = None
    try:
        broker.start()
        etcdctl(site, "put", f"{etcd_prefix}/config", ALLOC_CONFIG)
        # A peer that exists before the daemon starts, on an etcd lease as a real host's: its
        # expiry is not looked up at the first list, and its event must still be valid JSON.
        grant = etcdctl(site, "lease", "grant", "600").split()
        early = '{"PublicIP":"192.0.2.77","PublicIPv6":null,"BackendType":"alloc"}'
        etcdctl(site, "put", f"--lease={grant[1]}", f"{etcd_prefix}/subnets/10.77.10.0-24", early)
        topic = f"ev{unique}/{site.node_ip}/events"
        async with subscriber(broker.port, topic, f"sub{unique}", host=site.host_ip) as sub:
            d = daemon_factory("--mqtt-broker", f"{site.host_ip}:{broker.port}",
                               "--mqtt-topic-prefix", f"ev{unique}")  # fmt: skip
            d.start()
            got = await receive(sub, 3)
            assert [m["event"] for m in got] == ["lease_acquired", "ready", "peer_added"]
            assert got[2]["subnet"] == "10.77.10.0/24" and got[2]["public_ip"] == "192.0.2.77"
            assert got[2]["expiration"] is None or got[2]["expiration"] > time.time()
            own = got[0]["subnet"]
            assert got[0]["public_ip"] == site.node_ip
            peer = '{"PublicIP":"192.0.2.78","PublicIPv6":null,"BackendType":"alloc"}'
            etcdctl(site, "put", f"{etcd_prefix}/subnets/10.77.11.0-24", peer)
            got = await receive(sub, 1)
            assert got[0]["event"] == "peer_added" and got[0]["subnet"] == "10.77.11.0/24"
            etcdctl(site, "del", f"{etcd_prefix}/subnets/10.77.11.0-24")
            got = await receive(sub, 1)
            assert got[0] == {**got[0], "event": "peer_removed", "subnet": "10.77.11.0/24"}
            key = own.replace("/", "-")
            etcdctl(site, "del", f"{etcd_prefix}/subnets/{key}")
            got = await receive(sub, 2)
            assert [m["event"] for m in got] == ["lease_lost", "lease_reacquired"]
            assert got[1]["subnet"] == own
            assert await asyncio.to_thread(d.stop) == 0
    finally:
        if d is not None:
            d.kill()
        broker.stop()


def test_no_interface_exits_1_with_a_clear_error(daemon_factory: object) -> None:
    assert callable(daemon_factory)
    d: Daemon = daemon_factory("--iface", "nosuch0", "--iface-regex", "^zz")
    d.start()
    assert d.proc is not None
    assert d.proc.wait(timeout=20) == 1
    d.proc = None
    assert "tried --iface nosuch0; --iface-regex ^zz" in d.tail()


def test_broker_down_does_not_stall_and_unknown_backend_waits_for_a_fix(
    site: Site, etcd_prefix: str, daemon_factory: object
) -> None:
    assert callable(daemon_factory)
    etcdctl(site, "put", f"{etcd_prefix}/config", ALLOC_CONFIG)
    # Nothing listens on this port (a free one on the root side of our own veth).
    d: Daemon = daemon_factory("--mqtt-broker", f"{site.host_ip}:{free_port(site.host_ip)}")
    d.start()
    d.wait_ready()
    d.wait_for("a broker retry in the log", lambda: "MQTT broker" in d.tail())
    assert d.get("/healthz")[0] == 200
    assert d.stop() == 0

    etcdctl(site, "put", f"{etcd_prefix}/config",
            json.dumps({"Network": NETWORK, "Backend": {"Type": "bogus"}}))  # fmt: skip
    # An unknown Backend.Type is an invalid config (issue 12): the daemon neither exits (which
    # systemd's Restart=always would loop) nor takes a lease; it waits for a fixed config.
    before = leases(site, etcd_prefix)  # the first daemon's lease, left in place by SIGTERM
    bad: Daemon = daemon_factory()
    bad.start()
    bad.wait_for("the config refused in the log", lambda: "unknown backend type" in bad.tail())
    assert "Backend.Type='bogus'" in bad.tail() and "waiting for a fix" in bad.tail()
    assert leases(site, etcd_prefix) == before  # nothing acquired, nothing renewed
    assert bad.get("/readyz")[0] != 200
    # The fix carries a misspelt key: accepted, and the daemon's log names it.
    fixed = {"Network": NETWORK, "Backend": {"Type": "alloc"}, "SubnetLength": 24}
    etcdctl(site, "put", f"{etcd_prefix}/config", json.dumps(fixed))
    bad.wait_ready()
    assert leases(site, etcd_prefix).keys() == before.keys()  # the same host's lease, kept
    assert "unknown key at the top level, ignored: 'SubnetLength'" in bad.tail()
    assert "did you mean 'SubnetLen'?" in bad.tail()
    assert bad.stop() == 0
