"""The lab library itself: names, subnet.env, the probe, and a lab built without overlayd.

The lab tests here use hosts configured by hand as flannel would configure them (iproute2 and
etcdctl only), so that the underlay, etcd, containers, probe matrix and teardown are proven on
their own. The daemon runs in tests/test_integration.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from integration import cli
from integration.containers import SubnetEnv, SubnetEnvError, container_address
from integration.lab import Lab, LabError, open_lab, validate_name
from integration.netns import list_netns, run
from integration.probe import check, stream
from tests.labtools import LAB_PROVIDERS, LabCrash, crash_on


def test_lab_names_are_checked() -> None:
    assert validate_name("a1") == "a1"
    for bad in ("", "Lab", "a-b", "x" * 11, "a/b"):
        with pytest.raises(LabError, match="lower-case letters or digits"):
            validate_name(bad)


def test_subnet_env_parse_and_container_addresses() -> None:
    env = SubnetEnv.parse(
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.7.1/24\nFLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=true\n"
    )
    assert str(env.subnet) == "10.1.7.0/24"
    assert env.mtu == 1450 and env.ipmasq
    assert str(container_address(env, 0)) == "10.1.7.2/24"
    assert str(container_address(env, 252)) == "10.1.7.254/24"
    with pytest.raises(ValueError, match="does not fit"):
        container_address(env, 253)
    with pytest.raises(SubnetEnvError, match="missing FLANNEL_MTU, FLANNEL_IPMASQ"):
        SubnetEnv.parse("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.7.1/24\n", "x.env")


@pytest.fixture
def probe_server() -> Iterator[int]:
    """The real probe server as a process on loopback, on a free port."""
    from integration.etcdserver import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "integration.probe", "serve", "--host", "127.0.0.1", "--port",
         str(port)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert b"serving" in proc.stdout.readline()
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_probe_tcp_and_udp_on_loopback(probe_server: int) -> None:
    results = await check(["127.0.0.1"], probe_server, 2.0)
    assert {(r.proto, r.ok) for r in results} == {("tcp", True), ("udp", True)}
    assert all(r.rtt_ms is not None and r.rtt_ms > 0 for r in results)


async def test_probe_reports_failure_when_nothing_listens() -> None:
    from integration.etcdserver import free_port

    results = await check(["127.0.0.1"], free_port(), 0.6)
    assert [r.ok for r in results] == [False, False]
    assert all(r.error for r in results)


async def test_probe_stream_counts_answers(probe_server: int) -> None:
    summary = await stream("127.0.0.1", probe_server, 0.01, 0.5)
    assert summary.sent > 10
    assert summary.received == summary.sent and summary.lost == 0


# --------------------------------------------------------------------------- root: a real lab


@pytest.fixture(params=LAB_PROVIDERS)
async def hand_lab(
    request: pytest.FixtureRequest, unique: str, tmp_path: Path
) -> AsyncIterator[Lab]:
    """A lab with etcd and no overlayd host yet, on each provider."""
    if request.param == "containers":
        request.getfixturevalue("docker_engine")
    lab = open_lab(f"t{unique}", state_root=tmp_path / "labs", provider=request.param)
    try:
        # "bridge": containers wired by iproute2 here; the CNI plugin path runs in the CLI test
        # below and in tests/test_integration.py.
        await lab.up(nodes=0, containers_per_node=2, attach="bridge")
        yield lab
    finally:
        await lab.down()


def _lab_leftovers(lab: Lab) -> list[str]:
    found = list_netns(lab.ns_prefix)
    if Path(f"/sys/class/net/{lab.mgmt_link}").exists():
        found.append(lab.mgmt_link)
    if lab.dir.exists():
        found.append(str(lab.dir))
    return found


@pytest.mark.root
@pytest.mark.slow
async def test_hand_made_flannel_hosts_reach_each_other(hand_lab: Lab) -> None:
    lab = hand_lab
    a = await lab.add_flannel_host()
    b = await lab.add_flannel_host()
    await lab.sync_flannel_host(a.index)  # a was made before b's lease existed
    leases = await lab.leases()
    assert {str(s) for s in leases} == {a.subnet, b.subnet}
    # The lease bytes are flannel's, exactly.
    raw = await lab.etcdctl("get", "--print-value-only", f"{lab.state.prefix}/subnets/"
                            f"{str(a.subnet).replace('/', '-')}")  # fmt: skip
    assert raw.strip() == (
        f'{{"PublicIP":"{a.ip}","PublicIPv6":null,"BackendType":"vxlan",'
        f'"BackendData":{{"VNI":1,"VtepMAC":"{a.vtep_mac}"}}}}'
    )
    entries = await lab.matrix()
    # 4 containers, each probes the 3 others, TCP and UDP.
    assert len(entries) == 4 * 3 * 2
    assert [e for e in entries if not e.ok] == []
    status = await lab.status()
    assert [n["subnet"] for n in status["nodes"]] == [a.subnet, b.subnet]
    assert len(status["leases"]) == 2
    text = cli.format_matrix(lab, entries)
    assert "24/24 probes passed" in text
    assert not any("FAIL" in line for line in text.splitlines()[1:])

    # The matrix sees a broken path: without h1's route to h2's subnet, no answer crosses.
    await run("ip", "route", "del", str(b.subnet), "dev", "flannel.1", ns=a.ns)
    entries = await lab.matrix(probe_limit=1.0)
    failed = {(e.src, e.dst) for e in entries if not e.ok}
    cross = {(s.ns, d.ns) for s in a.containers for d in b.containers}
    assert failed == cross | {(d, s) for s, d in cross}
    assert "8/24 probes passed" in cli.format_matrix(lab, entries)


@pytest.mark.root
@pytest.mark.slow
async def test_down_cleans_up_after_a_crashed_up(unique: str, tmp_path: Path) -> None:
    name = f"t{unique}"
    root = tmp_path / "labs"
    lab = Lab(name, state_root=root, progress=crash_on("h1: namespace"))
    try:
        with pytest.raises(LabCrash):
            await lab.up(nodes=2)
        # Something the state file does not know about but that carries the lab's prefix.
        await run("ip", "netns", "add", f"{lab.ns_prefix}h9")
        etcd_pid = lab.state.etcd_pid
        assert etcd_pid is not None
        assert _lab_leftovers(lab)
        # A fresh process knows only the name: it reads the state dir and scans by prefix.
        done = await Lab(name, state_root=root).down()
        assert any("etcd" in d for d in done)
        assert _lab_leftovers(lab) == []
        with pytest.raises(ProcessLookupError):
            os.kill(etcd_pid, 0)
    finally:
        await Lab(name, state_root=root).down()


@pytest.mark.root
async def test_second_up_with_the_same_name_is_refused(hand_lab: Lab) -> None:
    for provider in LAB_PROVIDERS:  # whichever provider the second one asks for
        with pytest.raises(LabError, match=r"already exists.*lab down"):
            await open_lab(hand_lab.name, hand_lab.dir.parent, provider=provider).up(nodes=0)


@pytest.mark.root
@pytest.mark.slow
def test_cli_status_and_down(unique: str, tmp_path: Path) -> None:
    """The CLI over a lab made by the library: status shows it, down removes it."""
    name = f"t{unique}"
    root = tmp_path / "labs"
    lab = Lab(name, state_root=root)
    try:
        asyncio.run(_up_with_hand_host(lab))
        common = ["--name", name, "--state-root", str(root)]
        out = subprocess.run(
            [sys.executable, "-m", "integration.cli", "status", "--json", *common],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        st = json.loads(out.stdout)
        assert st["etcd_alive"] is True
        assert len(st["nodes"]) == 1 and st["nodes"][0]["kind"] == "flannel"
        assert st["leases"][0]["public_ip"] == st["nodes"][0]["public_ip"]
        out = subprocess.run(
            [sys.executable, "-m", "integration.cli", "down", *common],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert "deleted namespace" in out.stdout
        assert _lab_leftovers(lab) == []
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(Lab(name, state_root=root).down())


async def _up_with_hand_host(lab: Lab) -> None:
    await lab.up(nodes=0, containers_per_node=1)
    await lab.add_flannel_host()
    # The etcd child must outlive this event loop, as it does after `overlayctl lab up`.
    assert lab.state.etcd_pid is not None
    os.kill(lab.state.etcd_pid, 0)
