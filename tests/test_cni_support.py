"""Helpers for the CNI tests: an installed plugin, a CNI call, throwaway namespaces.

No tests here. The plugin is always the installed copy (as a runtime would exec it), the
delegates are Debian's reference plugins in /usr/lib/cni.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from cni.install import install_cni
from overlay.subnetenv import SubnetEnv
from overlay.subnetenv import write_subnet_env as write_env_file

REFERENCE_PLUGINS = Path("/usr/lib/cni")
CALL_TIMEOUT = 60.0


@dataclass
class CNIReply:
    rc: int
    out: dict[str, Any]
    raw: str
    stderr: str

    @property
    def code(self) -> int | None:
        code = self.out.get("code")
        return code if isinstance(code, int) else None


def call(
    plugin: Path | str,
    command: str,
    conf: dict[str, Any] | bytes,
    *,
    container_id: str = "",
    ifname: str = "eth0",
    netns: str = "",
    host_ns: str | None = None,
    cni_path: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> CNIReply:
    """Exec the plugin once, like a runtime: env + conf on stdin; `host_ns` runs it inside a
    namespace so that its bridge and iptables rules live (and die) there."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_IFNAME": ifname,
        "CNI_NETNS": netns,
        "CNI_PATH": cni_path or f"{Path(plugin).parent}:{REFERENCE_PLUGINS}",
    }
    if extra_env:
        env.update(extra_env)
    argv = [str(plugin)]
    if host_ns:
        argv = ["ip", "netns", "exec", host_ns, *argv]
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    proc = subprocess.run(
        argv, input=data, env=env, capture_output=True, timeout=CALL_TIMEOUT, check=False
    )
    raw = proc.stdout.decode()
    try:
        out = json.loads(raw) if raw.strip() else {}
    except ValueError:
        out = {"unparsable": raw}
    return CNIReply(proc.returncode, out, raw, proc.stderr.decode())


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    """The plugin as `overlayctl install-cni` installs it, in a private bin dir."""
    result = install_cni(tmp_path / "bin", tmp_path / "net.d", force=False)
    return result.plugin


def write_subnet_env(
    path: Path,
    network: str = "10.244.0.0/16",
    subnet: str = "10.244.7.1/24",
    mtu: int = 1400,
    ipmasq: bool = True,
) -> Path:
    """subnet.env as overlayd writes it (the daemon's codec); `subnet` as in the file."""
    env = SubnetEnv(IPv4Network(network), IPv4Interface(subnet).network, mtu, ipmasq)
    write_env_file(path, env)
    return path


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.decode().strip()}")
    return proc.stdout.decode()


def ip_json(*argv: str, ns: str | None = None) -> list[dict[str, Any]]:
    full = ["ip", "-j", *(["-n", ns] if ns else []), *argv]
    out = sh(*full)
    doc = json.loads(out) if out.strip() else []
    return doc if isinstance(doc, list) else []


@dataclass
class Namespaces:
    """Named network namespaces made by one test; all deleted at its end."""

    prefix: str
    made: list[str] = field(default_factory=list)

    def add(self, suffix: str) -> str:
        name = f"{self.prefix}{suffix}"
        assert len(name) <= 15, name
        sh("ip", "netns", "add", name)
        self.made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def remove(self, name: str) -> None:
        sh("ip", "netns", "del", name, check=False)
        if name in self.made:
            self.made.remove(name)

    def cleanup(self) -> None:
        for name in list(self.made):
            self.remove(name)


@pytest.fixture
def netns(unique: str) -> Iterator[Namespaces]:
    spaces = Namespaces(prefix=f"cn{unique}")
    try:
        yield spaces
    finally:
        spaces.cleanup()


@dataclass
class Net:
    """One test network: a host namespace, a subnet.env, private data dirs, a conf."""

    plugin: Path
    host: str
    subnet_env: Path
    data_dir: Path
    ipam_dir: Path
    bridge: str
    name: str

    def conf(self, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "cniVersion": version,
            "name": self.name,
            "type": "flannel",
            "subnetFile": str(self.subnet_env),
            "dataDir": str(self.data_dir),
            "ipam": {"dataDir": str(self.ipam_dir)},
            "delegate": {"bridge": self.bridge},
        }
        conf.update(extra)
        return conf

    def call(self, command: str, container_id: str, netns: str = "", **kw: Any) -> CNIReply:
        conf = kw.pop("conf", None) or self.conf(kw.pop("version", "1.0.0"))
        path = f"/run/netns/{netns}" if netns else kw.pop("netns_path", "")
        return call(
            self.plugin,
            command,
            conf,
            container_id=container_id,
            netns=path,
            host_ns=self.host,
            **kw,
        )

    def allocations(self) -> dict[str, str]:
        """host-local's store: allocated IP -> the attachment it records."""
        return allocations(self.ipam_dir, self.name)


def allocations(ipam_dir: Path, network: str) -> dict[str, str]:
    """host-local's store in `ipam_dir` for `network`: allocated IP -> the attachment it records
    (empty when there is no store)."""
    store = ipam_dir / network
    if not store.is_dir():
        return {}
    return {
        p.name: p.read_bytes().decode()
        for p in store.iterdir()
        if p.name[0].isdigit() and p.name.count(".") == 3
    }


@pytest.fixture
def net(plugin: Path, netns: Namespaces, tmp_path: Path, unique: str) -> Net:
    host = netns.add("h")
    return Net(
        plugin=plugin,
        host=host,
        subnet_env=write_subnet_env(tmp_path / "subnet.env"),
        data_dir=tmp_path / "flannel",
        ipam_dir=tmp_path / "ipam",
        bridge=f"cnb{unique}",
        name=f"t{unique}",
    )
