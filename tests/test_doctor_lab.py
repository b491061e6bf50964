"""`overlayctl doctor` and `overlayctl status` against a real 3-host vxlan lab, run inside host
h1's namespace (`ip netns exec`) as an operator would run them on the host. Each fault is
injected on purpose and undone afterwards; the test asserts the failing line and its fix.

The tests share one lab (module fixture) and run in file order; the last one destroys a
container for good.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from integration.lab import HEALTH_PORT, Lab
from overlay.subnetenv import SubnetEnv, write_subnet_env
from subnetmgr.model import subnet_key
from tests.labtools import running_lab

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab(tmp_path_factory, "d", "vxlan", "5")


def overlayctl(
    lab: Lab,
    index: int,
    *argv: str,
    port: int = HEALTH_PORT,
    prefix: str | None = None,
    subnet_file: Path | None = None,
    limit: float = 60,
) -> tuple[int, str, str]:
    """Run `overlayctl ARGV` in host h<index>'s namespace with that host's daemon flags."""
    node = lab.node(index)
    cmd = [
        "ip",
        "netns",
        "exec",
        node.ns,
        sys.executable,
        "-m",
        "overlay.ctl",
        "--etcd-endpoints",
        lab.state.daemon_endpoints,
        "--etcd-prefix",
        prefix or lab.state.prefix,
        "--etcd-timeout",
        "1",
        *argv,
        "--healthz-port",
        str(port),
        "--subnet-file",
        str(subnet_file or lab.subnet_file(index)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def doctor(lab: Lab, index: int = 1, *extra: str) -> tuple[int, dict[str, list[dict[str, Any]]]]:
    """(exit code, checks by name) of `overlayctl doctor --json` on host h<index>."""
    cni = lab.node_dir(index) / "cni" / "flannel"
    rc, out, err = overlayctl(
        lab, index, "doctor", "--json", "--cni-data-dir", str(cni), "--probe-timeout", "1.5", *extra
    )
    assert rc in (0, 1), err
    doc = json.loads(out)
    assert doc["schema"] == 1 and doc["ok"] == (rc == 0)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for check in doc["checks"]:
        assert check["result"] in ("PASS", "FAIL", "WARN")
        assert check["result"] == "PASS" or check["message"]
        if check["result"] == "FAIL":
            assert check["fix"], check  # every failing line says what to do
        by_name.setdefault(check["name"], []).append(check)
    return rc, by_name


def failed(checks: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {
        n: [c for c in cs if c["result"] == "FAIL"]
        for n, cs in checks.items()
        if any(c["result"] == "FAIL" for c in cs)
    }


def sh(ns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=30, check=True
    ).stdout


def free_subnet(lab: Lab) -> IPv4Network:
    taken = {IPv4Network(n.subnet) for n in lab.state.nodes if n.subnet}
    taken |= set(asyncio.run(lab.leases()))
    net = IPv4Network(lab.state.network)
    return next(
        s
        for s in net.subnets(new_prefix=24)
        if s not in taken and s != next(net.subnets(new_prefix=24))
    )


def peer_name(lab: Lab, index: int) -> str:
    return f"peer {lab.node(index).subnet}"


CHECKS = {
    "daemon",
    "ip_forward",
    "forward",
    "mtu",
    "tx_checksum",
    "etcd",
    "subnet_env",
    "duplicate_public_ip",
    "lease_renewals",
    "cni_state",
}


def test_healthy_lab_every_check_passes(lab: Lab) -> None:
    rc, checks = doctor(lab)
    assert failed(checks) == {}
    assert rc == 0
    assert CHECKS | {peer_name(lab, 2), peer_name(lab, 3)} <= set(checks)
    assert [c["result"] for cs in checks.values() for c in cs] == ["PASS"] * sum(
        len(cs) for cs in checks.values()
    )
    assert (
        "answered an ICMP echo through flannel.1 (udp 8472)"
        in checks[peer_name(lab, 2)][0]["message"]
    )
    # The text form: one line per check.
    rc, out, _ = overlayctl(
        lab, 1, "doctor", "--cni-data-dir", str(lab.node_dir(1) / "cni" / "flannel")
    )
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == sum(len(cs) for cs in checks.values())
    assert all(line.startswith("PASS ") for line in lines)


def test_status_of_a_ready_daemon(lab: Lab) -> None:
    rc, out, err = overlayctl(lab, 1, "status", "--json")
    assert rc == 0, out + err
    doc = json.loads(out)
    assert doc["schema"] == 1 and doc["healthy"] and doc["ready"] is True
    assert doc["problems"] == []
    node = lab.node(1)
    assert doc["lease"]["subnet"] == node.subnet
    assert doc["lease"]["public_ip"] == node.ip
    assert doc["lease"]["backend"] == "vxlan"
    assert 0 < doc["lease"]["ttl_seconds"] <= 24 * 3600
    assert doc["subnet_env"]["subnet"] == node.subnet and doc["subnet_env"]["mtu"] == 1450
    dev = doc["device"]
    assert dev["name"] == "flannel.1" and dev["exists"] and dev["up"] and dev["mtu"] == 1450
    assert dev["addresses"] == [f"{IPv4Network(node.subnet).network_address}/32"]
    assert doc["peers"] == {
        "leases": 2,
        "programmed": 2,
        "kernel_routes": 2,
        "kernel_fdb": 2,
        "missing": [],
    }
    assert doc["etcd"]["reachable"] and doc["etcd"]["latency_ms"] is not None
    assert doc["errors"]["overlay_reconcile_errors_total"] == 0
    assert doc["ignored_leases"] == []
    rc, out, _ = overlayctl(lab, 1, "status")
    assert rc == 0
    assert out.splitlines()[0] == "overlayd:    ready"
    assert f"lease:       {node.subnet} for {node.ip}, backend vxlan" in out


def test_status_and_doctor_take_the_running_daemons_flags(lab: Lab, tmp_path: Path) -> None:
    """No flag at all: the etcd endpoints and prefix, health port and subnet file are those of
    the overlayd running in the namespace (its argv in /proc); the CNI dataDir is the flannel
    plugin's in the runtime's network configs."""
    node = lab.node(1)
    bare = ["ip", "netns", "exec", node.ns, sys.executable, "-m", "overlay.ctl"]
    proc = subprocess.run([*bare, "status", "--json"], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["daemon"]["pid"] == node.daemon_pid
    assert doc["lease"]["subnet"] == node.subnet
    assert doc["subnet_env"]["path"] == str(lab.subnet_file(1))
    conflist = {"cniVersion": "1.0.0", "name": "overlay-lab", "plugins": [
        {"type": "flannel", "dataDir": str(lab.node_dir(1) / "cni" / "flannel")},
        {"type": "portmap"}]}  # fmt: skip
    (tmp_path / "10-flannel.conflist").write_text(json.dumps(conflist))
    (tmp_path / "00-junk.conf").write_bytes(b"\xff{")
    proc = subprocess.run([*bare, "doctor", "--cni-conf-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (f"PASS cni_state: 1 saved confs in {lab.node_dir(1) / 'cni' / 'flannel'}, each "
            "with a live address") in proc.stdout.splitlines()  # fmt: skip


def test_ip_forward_off(lab: Lab) -> None:
    ns = lab.node(1).ns
    sh(ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    try:
        rc, checks = doctor(lab)
    finally:
        sh(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    assert rc == 1
    assert set(failed(checks)) == {"ip_forward"}
    line = checks["ip_forward"][0]
    assert line["message"].startswith("net.ipv4.ip_forward = 0")
    assert line["fix"].startswith("sysctl -w net.ipv4.ip_forward=1")


def test_forward_drop_with_and_without_our_rules(lab: Lab) -> None:
    ns = lab.node(1).ns
    net = lab.state.network
    sh(ns, "iptables", "-P", "FORWARD", "DROP")
    try:
        rc, checks = doctor(lab)  # our daemon's FLANNEL-FWD accepts the network
        assert rc == 0, failed(checks)
        assert checks["forward"][0]["message"] == (
            f"FORWARD policy DROP, and our chain FLANNEL-FWD accepts {net}"
        )
        asyncio.run(lab.stop_daemon(1))  # else its resync puts the jump back
        sh(
            ns,
            "iptables",
            "-D",
            "FORWARD",
            "-m",
            "comment",
            "--comment",
            "flanneld forward",
            "-j",
            "FLANNEL-FWD",
        )
        rc, checks = doctor(lab)
    finally:
        sh(ns, "iptables", "-P", "FORWARD", "ACCEPT")
        if lab.node(1).daemon_pid is None:
            asyncio.run(lab.start_daemon(1))
    assert rc == 1
    assert set(failed(checks)) == {"forward", "daemon"}
    line = checks["forward"][0]
    assert line["message"].startswith("FORWARD policy DROP and no rule of ours accepts it")
    assert f"iptables -I FORWARD -s {net} -j ACCEPT" in line["fix"]
    assert doctor(lab)[0] == 0  # the restarted daemon put its rules back


def rewrite_env(lab: Lab, index: int, **changes: Any) -> SubnetEnv:
    path = lab.subnet_file(index)
    before = SubnetEnv.read(path)
    write_subnet_env(path, dataclasses.replace(before, **changes))
    return before


def test_mtu_mismatch_in_subnet_env(lab: Lab) -> None:
    before = rewrite_env(lab, 1, mtu=1400)
    try:
        rc, checks = doctor(lab)
        src, out, _ = overlayctl(lab, 1, "status", "--json")
    finally:
        write_subnet_env(lab.subnet_file(1), before)
    assert rc == 1
    assert set(failed(checks)) == {"mtu"}
    assert checks["mtu"][0]["message"] == "subnet.env FLANNEL_MTU 1400, but flannel.1 carries 1450"
    assert "restart overlayd" in checks["mtu"][0]["fix"]
    assert src == 1
    assert json.loads(out)["problems"] == ["subnet.env says MTU 1400, flannel.1 has 1450"]


def test_status_lists_ignored_leases(lab: Lab) -> None:
    subnet = free_subnet(lab)
    key = f"{lab.state.prefix}/subnets/{subnet_key(subnet)}"
    asyncio.run(lab.etcdctl("put", key, "not json \x1b[2J"))
    try:
        deadline = time.monotonic() + 20
        while True:  # the daemon's gauge follows its watch
            rc, out, _ = overlayctl(lab, 1, "status", "--json")
            doc = json.loads(out)
            if doc["ignored_by_daemon"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        _, text, _ = overlayctl(lab, 1, "status")
    finally:
        asyncio.run(lab.etcdctl("del", key))
    assert rc == 0  # an ignored key is reported, not a problem of this host
    assert doc["ignored_by_daemon"] == {"not_json": 1}
    [row] = doc["ignored_leases"]
    assert row["key"] == subnet_key(subnet) and row["reason"] == "not_json"
    assert "ignored:     1 lease key(s) (overlayd ignores not_json 1):" in text
    assert "\x1b" not in text  # the value's escape sequence is not printed raw


def test_mtu_mismatch_on_the_device(lab: Lab) -> None:
    ns = lab.node(1).ns
    sh(ns, "ip", "link", "set", "flannel.1", "mtu", "1300")
    try:
        rc, checks = doctor(lab)
    finally:
        sh(ns, "ip", "link", "set", "flannel.1", "mtu", "1450")
    assert rc == 1
    assert "mtu" in failed(checks)
    assert checks["mtu"][0]["message"].startswith("flannel.1 has MTU 1300, eth0 1500 - 50 = 1450")


def test_subnet_env_not_matching_our_lease(lab: Lab) -> None:
    other = IPv4Network(lab.node(2).subnet)
    before = rewrite_env(lab, 1, subnet=other)
    try:
        rc, checks = doctor(lab)
    finally:
        write_subnet_env(lab.subnet_file(1), before)
    assert rc == 1
    assert "subnet_env" in failed(checks)
    line = checks["subnet_env"][0]
    assert (
        f"FLANNEL_SUBNET is {other.network_address + 1}/24, our lease is "
        f"{lab.node(1).subnet}" in line["message"]
    )
    assert line["fix"].startswith("restart overlayd")
    # The CNI state no longer matches either: the container's address is outside FLANNEL_SUBNET.
    assert "outside our subnet" in checks["cni_state"][0]["message"]


def test_duplicate_public_ip(lab: Lab) -> None:
    h2 = lab.node(2)
    subnet = free_subnet(lab)
    key = f"{lab.state.prefix}/subnets/{subnet_key(subnet)}"
    value = json.dumps(
        {
            "PublicIP": h2.ip,
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:42"},
        }
    )
    asyncio.run(lab.etcdctl("put", key, value))
    try:
        rc, checks = doctor(lab)
    finally:
        asyncio.run(lab.etcdctl("del", key))
    assert rc == 1
    line = checks["duplicate_public_ip"][0]
    assert line["result"] == "FAIL"
    assert (
        line["message"]
        == f"{h2.ip} holds {', '.join(sorted([h2.subnet, str(subnet)], key=IPv4Network))}"
    )
    assert line["fix"].endswith(f"etcdctl del {key}")  # the newer key


def test_dead_lease(lab: Lab) -> None:
    """A lease granted 20 s and never renewed: from one look, it is past the point where a live
    host renews (half its TTL, as the default 60 min margin is not below 20 s)."""
    subnet = free_subnet(lab)
    ghost = str(IPv4Network(lab.state.underlay).network_address + 77)
    key = f"{lab.state.prefix}/subnets/{subnet_key(subnet)}"
    out = asyncio.run(lab.etcdctl("lease", "grant", "20"))
    lease_id = out.split()[1]
    value = json.dumps(
        {
            "PublicIP": ghost,
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:77"},
        }
    )
    asyncio.run(lab.etcdctl("put", f"--lease={lease_id}", key, value))
    try:
        rc, checks = doctor(lab)  # fresh: 20 s left of 20, renewal due at 10 s left
        assert checks["lease_renewals"][0]["result"] == "PASS"
        time.sleep(12.5)  # past the renewal point (10 s left) and its 2 s slack
        rc, checks = doctor(lab)
    finally:
        asyncio.run(lab.etcdctl("lease", "revoke", lease_id))
    assert rc == 1
    line = checks["lease_renewals"][0]
    assert line["result"] == "FAIL"
    assert f"{subnet} of {ghost}:" in line["message"]
    assert "renewal was due at 10 s left" in line["message"]
    assert line["fix"] == (
        f"check overlayd on {ghost}; if that host is gone, free its subnet: etcdctl del {key}"
    )
    # Nobody answers through the overlay for that lease either.
    peer = checks[f"peer {subnet}"][0]
    assert peer["result"] == "FAIL" and f"{ghost}: no answer from" in peer["message"]


def test_stale_cni_saved_conf(lab: Lab) -> None:
    data_dir = lab.node_dir(1) / "cni" / "flannel"
    real = next(p for p in data_dir.iterdir() if not p.name.startswith("."))
    doc = json.loads(real.read_text())
    doc["overlay.attachment"] = {"containerID": "ghost", "ifname": "eth0"}
    stale = data_dir / "ghost-eth0"
    stale.write_text(json.dumps(doc))
    try:
        rc, checks = doctor(lab)
    finally:
        stale.unlink()
    assert rc == 1
    assert set(failed(checks)) == {"cni_state"}
    line = checks["cni_state"][0]
    assert line["message"] == "1 stale: ghost-eth0: host-local holds no address for container ghost"
    assert line["fix"].endswith(f"rm -f {stale}")


def test_peer_unreachable_on_the_encapsulation_port(lab: Lab) -> None:
    ns2 = lab.node(2).ns
    rule = ["INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP"]
    sh(ns2, "iptables", "-I", *rule)
    try:
        rc, checks = doctor(lab)
    finally:
        sh(ns2, "iptables", "-D", *rule)
    assert rc == 1
    assert set(failed(checks)) == {peer_name(lab, 2)}
    line = checks[peer_name(lab, 2)][0]
    net2 = IPv4Network(lab.node(2).subnet)
    assert line["message"] == (
        f"{lab.node(2).ip}: no answer from {net2.network_address} through "
        "flannel.1 (udp 8472) within 1.5 s"
    )
    assert "iptables -I INPUT -p udp --dport 8472 -j ACCEPT" in line["fix"]
    assert checks[peer_name(lab, 3)][0]["result"] == "PASS"


def test_status_of_a_daemon_waiting_for_config(lab: Lab, tmp_path: Path) -> None:
    """A second overlayd in h1 on an etcd prefix without a network config: not ready."""
    node = lab.node(1)
    prefix = f"{lab.state.prefix}-empty"
    env_file = tmp_path / "run" / "subnet.env"
    port = HEALTH_PORT + 13
    argv = [
        sys.executable,
        "-m",
        "overlay.daemon",
        "--etcd-endpoints",
        lab.state.daemon_endpoints,
        "--etcd-prefix",
        prefix,
        "--iface",
        "eth0",
        "--subnet-file",
        str(env_file),
        "--healthz-port",
        str(port),
        "--metrics",
    ]
    with open(tmp_path / "overlayd.log", "wb") as log:
        daemon = subprocess.Popen(
            ["ip", "netns", "exec", node.ns, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            rc, out, _err = overlayctl(
                lab, 1, "status", "--json", port=port, prefix=prefix, subnet_file=env_file
            )
            doc = json.loads(out)
            if doc["daemon"]["reachable"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        rc2, text, _ = overlayctl(lab, 1, "status", port=port, prefix=prefix, subnet_file=env_file)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(10)
    assert rc == 1 and rc2 == 1
    assert doc["daemon"]["reachable"] and doc["ready"] is False and doc["reason"]
    assert not doc["healthy"]
    assert doc["lease"] is None
    assert f"overlayd is not ready: {doc['reason']}" in doc["problems"]
    assert f"no network config at {prefix}/config" in doc["problems"]
    assert text.startswith("overlayd:    NOT READY (")


TX_CHECK = """
import asyncio, json, sys
from ipaddress import IPv4Address, IPv4Network
from overlay.doctor import Host, check_tx_checksum
from overlay.status import EtcdView, local_addresses
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig

async def main():
    config = NetworkConfig.from_json(sys.argv[1])
    attrs = LeaseAttrs(IPv4Address(sys.argv[3]), backend_type="vxlan")
    host = Host({}, EtcdView("e"), config, Lease(IPv4Network(sys.argv[2]), attrs),
                await local_addresses(), None, None)
    check = await check_tx_checksum(host)
    print(json.dumps([check.result, check.message, check.fix]))

asyncio.run(main())
"""


def test_tx_checksum_behind_nat(lab: Lab) -> None:
    """A PublicIP that is on no interface of the host (as behind NAT; here a lease naming an
    underlay address nobody has) with tx checksum offload on flannel.1: FAIL, until it is off.
    The device and ethtool are the real ones of h1."""
    node = lab.node(1)
    config = json.dumps({"Network": lab.state.network, "Backend": {"Type": "vxlan"}})
    nat_ip = str(IPv4Network(lab.state.underlay).network_address + 200)

    def check() -> list[str]:
        out = sh(node.ns, sys.executable, "-c", TX_CHECK, config, str(node.subnet), nat_ip)
        result: list[str] = json.loads(out)
        return result

    result, message, fix = check()
    assert result == "FAIL"
    assert message.startswith(f"PublicIP {nat_ip} is on no local interface")
    assert fix == (
        'set "DisableTxChecksumOffload": true in the config\'s Backend (or now: '
        "ethtool -K flannel.1 tx-checksum-ip-generic off)"
    )
    sh(node.ns, "ethtool", "-K", "flannel.1", "tx-checksum-ip-generic", "off")
    try:
        result, message, _ = check()
    finally:
        sh(node.ns, "ethtool", "-K", "flannel.1", "tx-checksum-ip-generic", "on")
    assert result == "PASS"
    assert message == (
        f"PublicIP {nat_ip} is not local (NAT), and tx-checksum-ip-generic is off on flannel.1"
    )


def test_etcd_down(lab: Lab) -> None:
    pid = lab.state.etcd_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # etcd stops answering (connections hang), as a dead host's
    try:
        rc, checks = doctor(lab)
        rc2, out, _ = overlayctl(lab, 1, "status", "--json")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert rc == 1
    line = checks["etcd"][0]
    assert line["result"] == "FAIL" and line["message"].startswith("unreachable: ")
    assert line["fix"].startswith("start etcd or fix --etcd-endpoints")
    for name in ("subnet_env", "duplicate_public_ip", "lease_renewals", "peers"):
        assert checks[name][0] == {
            "name": name,
            "result": "WARN",
            "message": "not checked: etcd is unreachable",
            "fix": "",
        }
    # What does not need etcd is still checked: FORWARD against subnet.env's network.
    assert checks["forward"][0]["result"] == "PASS"
    assert checks["ip_forward"][0]["result"] == "PASS"
    doc = json.loads(out)
    assert rc2 == 1 and doc["etcd"]["reachable"] is False
    # Our lease as the daemon reports it (its /metrics), since etcd cannot say.
    assert doc["lease"]["subnet"] == lab.node(1).subnet and doc["lease"]["found_by"] == "daemon"
    assert any(p.startswith("etcd: ") for p in doc["problems"])


def test_container_whose_namespace_is_gone(lab: Lab) -> None:
    """Last: the container's namespace is deleted without CNI DEL (its veth goes with it);
    its saved conf and host-local address stay behind, and nobody answers ARP for it."""
    node = lab.node(1)
    cont = node.containers[0]
    assert cont.probe_pid is not None
    os.kill(cont.probe_pid, signal.SIGKILL)  # the container's last process: the netns goes
    subprocess.run(["ip", "netns", "del", cont.ns], check=True, timeout=30)
    deadline = time.monotonic() + 20
    while json.loads(sh(node.ns, "ip", "-j", "link", "show", "master", "cni0")):
        assert time.monotonic() < deadline, "the container's veth outlived its namespace"
        time.sleep(0.1)
    rc, checks = doctor(lab)
    assert rc == 1
    assert set(failed(checks)) == {"cni_state"}
    assert checks["cni_state"][0]["message"] == (
        f"1 stale: {cont.ns}-eth0: nobody answers ARP for {cont.ip} on cni0: the container's "
        "network namespace is gone"
    )
