"""End to end: podman (CNI backend) runs busybox containers on a `flannel` conflist.

podman is confined to this test: a private containers.conf (CNI backend, our plugin dir, a
private network config dir), --root/--runroot/--tmpdir under tmp_path, and it runs inside a
host network namespace the test made, so the bridge it creates dies with that namespace.

It also runs in a private mount namespace: this machine mounts a cgroup2 hierarchy that holds a
controller next to the cgroup v1 ones ("hybrid" mode), which crun refuses. Unmounting that
cgroup2 mount inside our own mount namespace (never in the host's) lets crun run.
"""
# ruff: noqa: F811  (pytest fixtures imported from tests.test_cni_support are parameters)

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.test_cni_support import (  # noqa: F401  (fixtures)
    Namespaces,
    allocations,
    netns,
    plugin,
    write_subnet_env,
)

pytestmark = pytest.mark.root

PODMAN_TIMEOUT = 120.0
HYBRID_CGROUP2 = "/sys/fs/cgroup/unified"


class Podman:
    """A podman confined to private dirs, one host netns and one private mount namespace."""

    def __init__(self, base: Path, host_ns: str, plugin_dir: Path) -> None:
        self.base = base
        self.host_ns = host_ns
        self.conf_dir = base / "net.d"
        self.conf_dir.mkdir(parents=True)
        for sub in ("root", "tmp"):
            (base / sub).mkdir()
        # podman refuses a runroot longer than 50 characters: a short private dir in /tmp.
        self.runroot = Path(tempfile.mkdtemp(prefix="ovpm-", dir="/tmp"))
        self.containers_conf = base / "containers.conf"
        self.containers_conf.write_text(
            "[network]\n"
            'network_backend = "cni"\n'
            f'cni_plugin_dirs = ["{plugin_dir}", "/usr/lib/cni"]\n'
            f'network_config_dir = "{self.conf_dir}"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
        )
        self.rootfs = base / "rootfs"
        for sub in ("bin", "proc", "sys", "dev", "etc", "tmp"):
            (self.rootfs / sub).mkdir(parents=True)
        busybox = shutil.which("busybox")
        assert busybox, "busybox-static is needed (scripts/bootstrap.sh installs it)"
        shutil.copy2(busybox, self.rootfs / "bin" / "busybox")
        # The holder keeps the private mount namespace alive; podman runs are nsenter'd into it.
        script = (
            f"if mountpoint -q {HYBRID_CGROUP2} && "
            f"grep -q . {HYBRID_CGROUP2}/cgroup.controllers; then umount {HYBRID_CGROUP2}; fi; "
            "echo ready; exec sleep 3600"
        )
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        try:
            assert self.holder.stdout is not None
            line = self.holder.stdout.readline().strip()
            assert line == b"ready", f"the mount namespace holder said {line!r}"
        except BaseException:  # nobody else holds it to kill it
            self.holder.kill()
            self.holder.wait(timeout=30)
            raise

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [
            "nsenter",
            f"--target={self.holder.pid}",
            "--mount",
            f"--net=/run/netns/{self.host_ns}",
            "podman",
            "--root", str(self.base / "root"),
            "--runroot", str(self.runroot),
            "--tmpdir", str(self.base / "tmp"),
            "--network-config-dir", str(self.conf_dir),
            *args,
        ]  # fmt: skip
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CONTAINERS_CONF": str(self.containers_conf),
            "HOME": str(self.base),
        }
        proc = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=PODMAN_TIMEOUT, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc

    def run_detached(self, name: str, network: str) -> str:
        proc = self(
            "run", "-d", "--name", name,
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
            "--network", network,
            "--rootfs", str(self.rootfs),
            "/bin/busybox", "sleep", "600",
        )  # fmt: skip
        return proc.stdout.strip().splitlines()[-1]

    def sh(self, name: str, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self("exec", name, "/bin/busybox", "sh", "-c", command, check=check)

    def close(self) -> None:
        try:
            self("rm", "--all", "--force", "--time", "0", check=False)
        finally:
            self.holder.kill()
            self.holder.wait(timeout=30)
            shutil.rmtree(self.runroot, ignore_errors=True)


@contextmanager
def podman_in(base: Path, host_ns: str, plugin_dir: Path) -> Iterator[Podman]:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run scripts/bootstrap.sh")
    pm = Podman(base, host_ns, plugin_dir)
    try:
        yield pm
    finally:
        pm.close()


def flannel_conflist(
    name: str, subnet_env: Path, data_dir: Path, ipam_dir: Path, delegate: dict[str, Any]
) -> str:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [
                {
                    "type": "flannel",
                    "subnetFile": str(subnet_env),
                    "dataDir": str(data_dir),
                    "ipam": {"dataDir": str(ipam_dir)},
                    "delegate": delegate,
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
    )


def saved_confs(data_dir: Path) -> list[str]:
    if not data_dir.is_dir():
        return []
    return sorted(p.name for p in data_dir.iterdir() if not p.name.startswith("."))


def test_podman_container_on_a_flannel_network(
    plugin: Path, netns: Namespaces, tmp_path: Path, unique: str
) -> None:
    host = netns.add("h")
    network = f"t{unique}"
    subnet_env = write_subnet_env(tmp_path / "subnet.env", subnet="10.244.7.1/24", mtu=1400)
    data_dir, ipam_dir = tmp_path / "flannel", tmp_path / "ipam"
    with podman_in(tmp_path / "podman", host, plugin.parent) as podman:
        (podman.conf_dir / f"{network}.conflist").write_text(
            flannel_conflist(network, subnet_env, data_dir, ipam_dir, {"bridge": f"cnb{unique}"})
        )
        assert podman("info", "--format", "{{.Host.NetworkBackend}}").stdout.strip() == "cni"
        cid = podman.run_detached("c1", network)

        addr = podman.sh("c1", "ip -o -4 addr show eth0").stdout.split()
        address = addr[addr.index("inet") + 1]
        assert address.startswith("10.244.7.") and address.endswith("/24"), addr
        assert "mtu 1400" in podman.sh("c1", "ip link show eth0").stdout
        assert "10.244.0.0/16 via 10.244.7.1" in podman.sh("c1", "ip route").stdout
        ping = podman.sh("c1", "ping -c 1 -W 3 10.244.7.1", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr

        assert saved_confs(data_dir) == [f"{cid}-eth0"]
        assert allocations(ipam_dir, network) == {address.split("/")[0]: f"{cid}\r\neth0"}

        podman("rm", "--force", "--time", "0", "c1")
        assert saved_confs(data_dir) == []
        assert allocations(ipam_dir, network) == {}


def test_podman_container_reaches_a_lab_container_over_the_overlay(
    plugin: Path, tmp_path: Path, unique: str
) -> None:
    """A podman container on lab host h1 (flannel conflist, the lab's cni0 bridge and
    subnet.env) talks to the lab's container on host h2 through overlayd's VXLAN overlay."""
    import asyncio

    from integration.lab import Lab
    from integration.probe import DEFAULT_PORT

    lab = Lab(f"cni{unique}", state_root=tmp_path / "labs")
    try:
        asyncio.run(lab.up(nodes=2, backend="vxlan", containers_per_node=1))
        h1, h2 = lab.node(1), lab.node(2)
        target = h2.containers[0].ip
        assert target
        network = f"t{unique}"
        data_dir, ipam_dir = tmp_path / "flannel", tmp_path / "ipam"
        # The lab attached its own container on h1 by hand: tell host-local that its address
        # is taken, so that the podman container gets another one.
        store = ipam_dir / network
        store.mkdir(parents=True)
        taken = h1.containers[0].ip
        assert taken
        (store / taken).write_bytes(b"lab-container\r\neth0")
        with podman_in(tmp_path / "podman", h1.ns, plugin.parent) as podman:
            (podman.conf_dir / f"{network}.conflist").write_text(
                flannel_conflist(
                    network,
                    lab.subnet_file(1),
                    data_dir,
                    ipam_dir,
                    {"bridge": "cni0", "ipMasq": False},
                )
            )
            cid = podman.run_detached("c1", network)
            reply = podman.sh(
                "c1", f"echo overlay-hello-{unique} | nc -w 3 {target} {DEFAULT_PORT}", check=False
            )
            assert f"overlay-hello-{unique}" in reply.stdout, reply.stdout + reply.stderr
            assert saved_confs(data_dir) == [f"{cid}-eth0"]
            podman("rm", "--force", "--time", "0", "c1")
            assert saved_confs(data_dir) == []
            assert allocations(ipam_dir, network) == {taken: "lab-container\r\neth0"}
    finally:
        asyncio.run(lab.down())
