"""scripts/install-production.sh (issue 12, the operator's path): a venv under /opt with its
own pip, the hardened unit and the environment file, run in a container-lab host where systemd
is PID 1, as an operator runs it; and its argument checks.

The lab host has no route to a package index, so the wheels (overlay's and its dependencies')
are built here with pip and handed over with --wheels, as an offline install would do it. The
host container came with the lab's own install (scripts/install-overlayd.sh): the production
install refuses to overwrite its different unit without --force, then replaces it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.docker_lab import ContainerLab
from integration.lab import NodeState
from integration.netns import CommandError
from tests.labtools import eventually
from tests.test_lab_containers import (
    cgroup_superblock_before,
    clab,
    image,
)

__all__ = ["cgroup_superblock_before", "clab", "image"]  # fixtures used here

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "install-production.sh"


@pytest.mark.parametrize(
    ("argv", "words"),
    [(["--bogus"], "unknown argument '--bogus'"),
     (["--prefix", "opt/overlay"], "an absolute path without spaces, not /"),
     (["--prefix", "/"], "not /"),
     (["--prefix", "/opt/my overlay"], "without spaces"),
     (["--source", "/nonexistent-ovl-src"], "does not exist"),
     (["--wheels", "/nonexistent-ovl-wheels"], "is not a directory"),
     (["--prefix"], "--prefix needs a directory")],
)  # fmt: skip
def test_bad_arguments_exit_2_before_anything(argv: list[str], words: str) -> None:
    done = subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip
    assert done.returncode != 0
    assert words in done.stderr


def test_shellcheck_is_clean() -> None:
    binary = shutil.which("shellcheck")
    if binary is None:  # fail, never skip: CI has it (the clab Vagrantfile test uses it too)
        raise RuntimeError("shellcheck is not installed: apt-get install shellcheck")
    done = subprocess.run([binary, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """overlay's wheel and its dependencies', built from this checkout; and overlay's name."""
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=600)  # fmt: skip
    (wheel,) = (p.name for p in out.glob("overlay-*.whl"))
    yield out, wheel


async def _sh(lab: ContainerLab, node: NodeState, script: str) -> str:
    return await lab.exec(node, "sh", "-c", script, limit=60)


@pytest.mark.root
@pytest.mark.slow
async def test_production_install_in_a_systemd_host(
    clab: ContainerLab, wheels: tuple[Path, str]
) -> None:
    lab = clab
    wheel_dir, wheel = wheels
    prefix = f"/prod-{uuid.uuid4().hex[:8]}/coreos.com/network"
    node = await lab.add_host_container()  # the lab's install, not started
    root = Path(f"/proc/{lab._init_pid(node)}/root")
    try:
        # Hand the script, the docs and the wheels over, as an operator copies a release.
        dest = root / "root" / "overlay-release"
        for part in ("scripts", "docs"):
            shutil.copytree(REPO / part, dest / part)
        shutil.copytree(wheel_dir, dest / "wheels")
        config = {"Network": "10.8.0.0/16", "Backend": {"Type": "vxlan"}}
        await lab.etcdctl("put", f"{prefix}/config", json.dumps(config))
        settings = [s for s in lab.daemon_settings() if not s.startswith("FLANNELD_ETCD_PREFIX=")]
        args = [a for s in [*settings, f"FLANNELD_ETCD_PREFIX={prefix}"] for a in ("--env", s)]
        # A root shell of that host: its own environment, not this test process's (pip
        # settings of the build machine must not leak in).
        run = [
            "env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root", "LANG=C.UTF-8",
            "/root/overlay-release/scripts/install-production.sh", "--prefix", "/opt/ovl-prod",
            "--source", f"/root/overlay-release/wheels/{wheel}",
            "--wheels", "/root/overlay-release/wheels", *args,
        ]  # fmt: skip
        unit_before = (root / "etc/systemd/system/overlayd.service").read_text()

        # The lab's own (different) unit is there: refused, nothing replaced, nothing started.
        with pytest.raises(CommandError) as refused:
            await lab.exec(node, *run, limit=300)
        assert "differ from what would be written" in str(refused.value), str(refused.value)[-3000:]
        assert (root / "etc/systemd/system/overlayd.service").read_text() == unit_before
        assert await lab.daemon_state(node.index) in ("inactive", "unknown")

        out = await lab.exec(node, *run, "--force", limit=300)
        assert "replaced  /etc/systemd/system/overlayd.service" in out
        assert "systemctl daemon-reload: done" in out  # install-systemd saw systemd running
        assert out.splitlines()[-2].strip() == "active"  # systemctl is-active

        # The venv is its own: pip inside, overlay installed as a regular package there.
        show = await lab.exec(node, "/opt/ovl-prod/bin/pip", "show", "-f", "overlay")
        assert "Location: /opt/ovl-prod/lib/python3" in show
        assert "Editable project location" not in show
        main = "/proc/$(systemctl show -p MainPID --value overlayd)"
        exe = await _sh(lab, node, f"readlink {main}/exe")
        cmdline = await _sh(lab, node, f"tr '\\0' ' ' < {main}/cmdline")
        assert (
            exe.strip().startswith("/usr/bin/python3") and "/opt/ovl-prod/bin/overlayd" in cmdline
        )
        assert (await _sh(lab, node, "readlink /usr/local/bin/overlayctl")).strip() == (
            "/opt/ovl-prod/bin/overlayctl"
        )
        # The hardened unit, as systemd loaded it.
        props = await lab.exec(node, "systemctl", "show", "overlayd", "-p",
                               "CapabilityBoundingSet,NoNewPrivileges,ProtectSystem,"
                               "ExecStart,Documentation,RestrictAddressFamilies")  # fmt: skip
        assert "CapabilityBoundingSet=cap_net_admin cap_net_raw" in props
        assert "NoNewPrivileges=yes" in props and "ProtectSystem=strict" in props
        assert "/opt/ovl-prod/bin/overlayd" in props
        assert "Documentation=file:///usr/share/doc/overlay/overlayd.txt" in props
        assert (root / "usr/share/doc/overlay/overlayd.txt").read_text().count("usage: overlayd")
        assert (root / "usr/share/doc/overlay/daemon.md").is_file()
        caps = await _sh(lab, node, f"grep CapBnd {main}/status")
        assert int(caps.split()[1], 16) == (1 << 12) | (1 << 13)  # NET_ADMIN, NET_RAW only
        env_file = root / "etc/default/overlayd"
        assert oct(env_file.stat().st_mode & 0o777) == "0o644"  # no password in it
        assert f"FLANNELD_ETCD_PREFIX={prefix}" in env_file.read_text()

        # And it works: a lease, subnet.env, ready.
        async def has_env() -> bool:
            return lab.subnet_file(node.index).exists()

        await eventually(has_env, "subnet.env of the production install", 60)
        assert "FLANNEL_NETWORK=10.8.0.0/16" in lab.subnet_file(node.index).read_text()
        leases = await lab.etcdctl("get", "--prefix", "--keys-only", f"{prefix}/subnets/")
        assert leases.strip().count("/subnets/") == 1
        journal = await lab.daemon_log(node.index)
        assert "acquired lease" in journal and "Traceback" not in journal
        # A second run with the same settings: everything unchanged, still running.
        again = await lab.exec(node, *run, limit=300)
        assert again.count("unchanged") == 3
        assert await lab.daemon_state(node.index) == "active"
    finally:
        await lab.remove_node(node.index)
        await lab.etcdctl("del", "--prefix", prefix)
