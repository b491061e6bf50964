"""The lab's container provider (integration.docker_lab): image cache keys, the Docker engine,
overlayd under real systemd in each host container, and a teardown that touches only what
the lab labelled.

The scenarios shared with the netns provider (full matrix on vxlan and udp, joins and leaves,
restarts, repairs) run on both providers in tests/test_integration.py and
tests/test_integration_udp.py; this module holds what only containers have. Everything is
real: Docker 20.10 from Debian's docker.io, an image built here by debootstrap, systemd as
PID 1 in each host container, etcd in its own container, real traffic.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integration.docker_lab import (
    CODE_FILES,
    CODE_PACKAGES,
    IMAGE_CONTEXT,
    LABEL,
    LABEL_STATE,
    SOURCE_ROOT,
    ContainerLab,
    base_packages,
    ensure_engine,
    ensure_image,
    layer_tags,
)
from integration.lab import LabError, open_lab
from integration.netns import CommandError, ip_json, list_netns, run
from tests.labtools import (
    LabCrash,
    assert_full_connectivity,
    assert_kept_subnet_and_lease,
    crash_on,
    eventually,
    probe_stream,
    running_lab,
)

# --------------------------------------------------------------------------- pure: cache keys


def _copy_tree(dest: Path) -> Path:
    """The files that go into the image (and a few that do not), copied to `dest`."""
    for rel in [*CODE_FILES, "docs/lab.md", "tests/labtools.py"]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SOURCE_ROOT / rel, dest / rel)
    for pkg in CODE_PACKAGES:
        shutil.copytree(SOURCE_ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(IMAGE_CONTEXT, dest / "lab-image")
    return dest


def test_layer_tags_follow_what_goes_into_each_layer(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path / "src")
    ctx = root / "lab-image"
    first = layer_tags(root, ctx)
    assert first == layer_tags(root, ctx)  # a pure function of the files
    assert first.code.startswith("overlay-lab:") and first.base.startswith("overlay-lab-base:")

    # Files outside the layers change nothing: docs, tests, bytecode.
    (root / "docs" / "lab.md").write_text("changed")
    (root / "tests" / "labtools.py").write_text("changed")
    (root / "overlay" / "__pycache__").mkdir()
    (root / "overlay" / "__pycache__" / "daemon.cpython-311.pyc").write_bytes(b"\0")
    assert layer_tags(root, ctx) == first

    # A code change: only the thin code layer.
    (root / "overlay" / "daemon.py").write_text((root / "overlay" / "daemon.py").read_text() + "#")
    code_changed = layer_tags(root, ctx)
    assert (code_changed.base, code_changed.deps) == (first.base, first.deps)
    assert code_changed.code != first.code
    # A new module counts too (its path is part of the key).
    (root / "backends" / "newone.py").write_text("")
    assert layer_tags(root, ctx).code != code_changed.code

    # A dependency change: deps and code, not the base.
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"aiomqtt>=2.5,<3"', '"aiomqtt>=2.6,<3"'))
    deps_changed = layer_tags(root, ctx)
    assert deps_changed.base == first.base
    assert deps_changed.deps != first.deps and deps_changed.code != code_changed.code

    # A package list change: every layer.
    packages = ctx / "packages.txt"
    packages.write_text(packages.read_text() + "tcpdump\n")
    all_changed = layer_tags(root, ctx)
    assert all_changed.base != first.base and all_changed.deps != deps_changed.deps


_NAME = st.from_regex(r"[a-z0-9][a-z0-9+.-]{1,20}", fullmatch=True)


@given(
    names=st.lists(_NAME, max_size=12),
    comments=st.lists(
        st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\n"), max_size=20)
    ),
)
def test_package_list_round_trip(tmp_path_factory: pytest.TempPathFactory, names: list[str],
                                 comments: list[str]) -> None:  # fmt: skip
    """Names written one a line, with comments and blank lines between, read back in order."""
    ctx = tmp_path_factory.mktemp("ctx")
    lines = []
    for i, name in enumerate(names):
        note = comments[i % len(comments)] if comments else ""
        lines += [f"# {note}", "", f"  {name}   # {note}"]
    (ctx / "packages.txt").write_text("\n".join(lines) + "\n")
    assert base_packages(ctx) == names


@given(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.lists(st.sampled_from(["# c", "a,b", "ab", "Ab", "a b", "é1", "-x", "ok\r"])).map(
            lambda xs: "\n".join(xs).encode()
        ),
    )
)
def test_package_list_hostile_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    """Any bytes: a LabError naming the file and the bad entry (or that it is not UTF-8), or
    names debootstrap --include can take: no comma, space, quote, upper case or non-ASCII can
    reach its command line."""
    ctx = tmp_path_factory.mktemp("ctx")
    (ctx / "packages.txt").write_bytes(raw)
    try:
        names = base_packages(ctx)
    except LabError as e:
        assert str(ctx / "packages.txt") in str(e)
        assert "is not a Debian package name" in str(e) or "not UTF-8" in str(e)
        return
    for name in names:
        assert len(name) >= 2 and name.isascii() and name == name.lower()
        assert not set(name) - set("abcdefghijklmnopqrstuvwxyz0123456789+-.")


@given(st.dictionaries(st.text(max_size=30), st.text(max_size=40), max_size=10))
def test_daemon_settings_from_a_hostile_environment(
    tmp_path_factory: pytest.TempPathFactory, environ: dict[str, str]
) -> None:
    """Whatever the environment holds, /etc/default/overlayd gets only FLANNELD_NAME=value
    lines, one per variable, with the lab's own settings; a variable that is no FLANNELD_NAME
    or whose value has a line break or NUL is left out."""
    lab = ContainerLab("hyp", state_root=tmp_path_factory.mktemp("labs"))
    lab.state.daemon_endpoints = "http://198.18.0.253:2379"
    lines = lab.daemon_settings(environ)
    keys = [line.split("=", 1)[0] for line in lines]
    assert len(keys) == len(set(keys))
    for line in lines:
        key, _, value = line.partition("=")
        assert key.startswith("FLANNELD_") and len(key) > 9
        assert not set(key[9:]) - set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
        assert "\n" not in value and "\r" not in value and "\0" not in value
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
    for key, value in environ.items():
        ok = key.startswith("FLANNELD_") and len(key) > 9 and not set(key[9:]) - allowed
        ok = ok and not set(value) & {"\n", "\r", "\0"}
        assert (f"{key}={value}" in lines) == ok, (key, value)
    if "FLANNELD_IFACE" not in environ or set(environ["FLANNELD_IFACE"]) & {"\n", "\r", "\0"}:
        assert "FLANNELD_IFACE=eth0" in lines


def test_unknown_provider_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="provider 'vm' is not one of netns, containers"):
        open_lab("x1", state_root=tmp_path, provider="vm")
    # A state file naming an unknown provider (hand-edited, or from a newer version).
    (tmp_path / "x2").mkdir()
    (tmp_path / "x2" / "state.json").write_text(json.dumps({"name": "x2", "provider": "vm"}))
    with pytest.raises(LabError, match="provider 'vm'"):
        open_lab("x2", state_root=tmp_path)
    # A provider of the wrong type is no provider: the netns default.
    (tmp_path / "x3").mkdir()
    (tmp_path / "x3" / "state.json").write_text(json.dumps({"name": "x3", "provider": [1]}))
    assert open_lab("x3", state_root=tmp_path).provider == "netns"


def test_engine_errors_name_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No engine answers: with DOCKER_HOST set the lab says so and starts nothing; without
    dockerd on PATH it names the package to install."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nothing.sock")
    with pytest.raises(LabError, match="no Docker engine answers at DOCKER_HOST=unix://"):
        ensure_engine()
    monkeypatch.delenv("DOCKER_HOST")
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no dockerd
    with pytest.raises(LabError, match=r"dockerd is not installed: apt-get install docker\.io"):
        ensure_engine(base_url=f"unix://{tmp_path}/nothing.sock")


# --------------------------------------------------------------------------- root + Docker


@pytest.fixture(scope="module")
def image(docker_engine: None) -> str:
    """The lab image, built (or taken from the cache) once."""
    return ensure_image(ensure_engine())


@pytest.mark.root
@pytest.mark.slow
def test_install_script_refuses_hostile_settings(image: str) -> None:
    """scripts/install-overlayd.sh (the operator's steps) in a throwaway container of the
    image: --set takes FLANNELD_NAME=value on one line, replaces the key's line, and refuses
    anything else before touching the file."""
    script = (
        "s=/opt/overlay-src/scripts/install-overlayd.sh; v=/opt/overlay; "
        "$s --venv $v --no-start --set FLANNELD_IFACE=eth7 --set 'FLANNELD_ETCD_PREFIX=/a b&c' "
        "--set FLANNELD_NEW=1 >/dev/null; "
        "for bad in 'FLANNELD_X' 'PATH=/tmp' 'FLANNELD_a=1' 'FLANNELD_X=1\nFLANNELD_Y=2' "
        "'FLANNELD_X;rm=1' '=1'; do "
        '  $s --venv $v --no-start --set "$(printf "$bad")" 2>&1 >/dev/null; echo "rc=$?"; '
        "done; $s --venv /nowhere --no-start 2>&1; echo rc=$?; "
        "echo '--- file'; grep -E '^#?FLANNELD_(IFACE|ETCD_PREFIX|NEW|X|Y)=' /etc/default/overlayd"
    )
    client = ensure_engine()
    out = client.containers.run(
        image, ["/bin/bash", "-c", script], remove=True, network_mode="none",
        labels={LABEL: "install-test"},
    ).decode()  # fmt: skip
    lines = out.splitlines()
    assert lines.count("rc=2") == 7, out
    assert sum("expected FLANNELD_NAME=value on one line" in line for line in lines) == 6, out
    assert "install-overlayd.sh: /nowhere/bin/overlayd is missing" in out
    settings = lines[lines.index("--- file") + 1 :]
    assert settings == ["FLANNELD_IFACE=eth7", "FLANNELD_ETCD_PREFIX=/a b&c", "FLANNELD_NEW=1"]


def _cgroup_superblock() -> str:
    """The super options of the root namespace's /sys/fs/cgroup mount (e.g. "rw,size=...")."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/sys/fs/cgroup":
            return fields[-1]
    return ""


@pytest.fixture(scope="module")
def cgroup_superblock_before() -> str:
    return _cgroup_superblock()


@pytest.fixture(scope="module")
def clab(
    tmp_path_factory: pytest.TempPathFactory, image: str, cgroup_superblock_before: str
) -> Iterator[ContainerLab]:
    for lab in running_lab(tmp_path_factory, "s", "vxlan", "1", "containers"):
        assert isinstance(lab, ContainerLab)
        yield lab


async def _unit(lab: ContainerLab, index: int, prop: str) -> str:
    out = await lab.exec(lab.node(index), "systemctl", "show", "-p", prop, "--value", "overlayd")
    return out.strip()


@pytest.mark.root
@pytest.mark.slow
async def test_host_cgroup_mount_is_left_alone(
    clab: ContainerLab, cgroup_superblock_before: str
) -> None:
    """systemd in the host containers sees the host's /sys/fs/cgroup (cgroup v1 needs it) but
    cannot remount it: the root namespace's cgroup tmpfs keeps its options (with SYS_ADMIN,
    systemd turned that superblock read-only and broke crun on the host)."""
    assert cgroup_superblock_before
    assert _cgroup_superblock() == cgroup_superblock_before
    caps = clab.client.api.inspect_container(clab.node(1).container)["HostConfig"]["CapAdd"]
    assert "SYS_ADMIN" not in caps and "CAP_SYS_ADMIN" not in caps
    out = await clab.exec(clab.node(1), "systemctl", "is-system-running", check=False)
    assert out.strip() in ("running", "degraded")


@pytest.mark.root
@pytest.mark.slow
async def test_notify_handshake_active_only_once_subnet_env_exists(clab: ContainerLab) -> None:
    """overlayd.service (Type=notify) stays "activating" while the daemon waits for its network
    config, and whenever systemd says "active", subnet.env is already there."""
    lab = clab
    prefix = f"/handshake-{uuid.uuid4().hex[:8]}/coreos.com/network"
    node = await lab.add_host_container()
    try:
        settings = [s for s in lab.daemon_settings() if not s.startswith("FLANNELD_ETCD_PREFIX=")]
        args = [a for s in [*settings, f"FLANNELD_ETCD_PREFIX={prefix}"] for a in ("--set", s)]
        await lab.exec(
            node, "/opt/overlay-src/scripts/install-overlayd.sh", "--venv", "/opt/overlay",
            "--no-start", *args,
        )  # fmt: skip
        await lab.exec(node, "systemctl", "daemon-reload")
        await lab.exec(node, "systemctl", "start", "--no-block", "overlayd")
        probe = "systemctl is-active overlayd; test -e /run/flannel/subnet.env && echo has-env"

        async def sample() -> tuple[str, bool]:
            out = (await lab.exec(node, "sh", "-c", probe, check=False)).split()
            return out[0], "has-env" in out

        async def activating() -> bool:
            return (await sample())[0] == "activating"

        await eventually(activating, "overlayd.service activating")
        for _ in range(10):  # no config yet: it must stay activating, with no subnet.env
            assert await sample() == ("activating", False)
            await asyncio.sleep(0.1)
        assert f"no network config at {prefix}/config" in await lab.daemon_log(node.index)

        config = {"Network": "10.7.0.0/16", "Backend": {"Type": "vxlan"}}
        await lab.etcdctl("put", f"{prefix}/config", json.dumps(config))
        seen: list[tuple[str, bool]] = []

        async def active() -> bool:
            seen.append(await sample())
            return seen[-1][0] == "active"

        await eventually(active, "overlayd.service active after the config appeared", 30)
        assert all(has_env for state, has_env in seen if state == "active"), seen
        env = (lab.subnet_file(node.index)).read_text()
        assert "FLANNEL_NETWORK=10.7.0.0/16" in env
        assert await _unit(lab, node.index, "Type") == "notify"
    finally:
        await lab.remove_node(node.index)
        await lab.etcdctl("del", "--prefix", prefix)


@pytest.mark.root
@pytest.mark.slow
async def test_sigkill_restarted_by_systemd_keeps_subnet_and_traffic(clab: ContainerLab) -> None:
    """overlayd killed with SIGKILL inside its container: systemd (Restart=always) starts it
    again without any help; same subnet and lease, and traffic to the host goes on."""
    lab = clab
    h1 = lab.node(1)
    lease_before = (await lab.leases())[IPv4Network(h1.subnet)]
    restarts = int(await _unit(lab, 1, "NRestarts"))
    pid = await lab.daemon_main_pid(1)
    assert pid > 0
    async with probe_stream(lab, source=2, target=1) as summary:
        await asyncio.sleep(0.5)
        await lab.exec(h1, "kill", "-KILL", str(pid))

        async def restarted() -> bool:
            new = await lab.daemon_main_pid(1)
            return new not in (0, pid) and await lab.daemon_state(1) == "active"

        await eventually(restarted, "systemd restarted overlayd after SIGKILL", 60)
        await lab.wait_ready(1)
        await asyncio.sleep(1.0)
    print(f"\nSIGKILL, restart by systemd: {summary}")
    assert summary["received"] > 0
    assert int(await _unit(lab, 1, "NRestarts")) == restarts + 1
    await assert_kept_subnet_and_lease(lab, 1, lease_before)
    await assert_full_connectivity(lab)


@pytest.mark.root
@pytest.mark.slow
async def test_systemctl_stop_leaves_the_data_path(clab: ContainerLab) -> None:
    """`systemctl stop overlayd`: the unit is inactive, nothing it programmed goes, traffic
    between every pair of containers still passes; `systemctl start` brings it back."""
    lab = clab
    ns = lab.node(1).ns
    routes_before = await ip_json("route", "show", "dev", "flannel.1", ns=ns)
    try:
        await lab.exec(lab.node(1), "systemctl", "stop", "overlayd")
        assert await lab.daemon_state(1) == "inactive"
        assert await lab.daemon_main_pid(1) == 0
        assert await ip_json("route", "show", "dev", "flannel.1", ns=ns) == routes_before
        assert lab.subnet_file(1).exists()
        await assert_full_connectivity(lab)
    finally:
        await lab.start_daemon(1)
    assert await lab.daemon_state(1) == "active"
    await assert_full_connectivity(lab)


@pytest.mark.root
@pytest.mark.slow
async def test_state_file_pids_are_checked_against_the_engine(clab: ContainerLab) -> None:
    """A container pid from the state file is never trusted: a stale one (here this test's
    own pid, as a reused pid would be) is replaced by the engine's; a container that is gone
    or not the lab's is an error, and nothing runs in another process's namespaces."""
    fresh = open_lab(clab.name, state_root=clab.dir.parent)
    assert isinstance(fresh, ContainerLab)
    real = clab.node(1).container_pid
    fresh.node(1).container_pid = os.getpid()
    assert fresh.subnet_file(1) == Path(f"/proc/{real}/root/run/flannel/subnet.env")
    assert (await fresh.exec(fresh.node(1), "hostname")).strip() == "h1"
    gone = open_lab(clab.name, state_root=clab.dir.parent)
    assert isinstance(gone, ContainerLab)
    gone.node(2).container = f"ovl-{clab.name}-h99"
    with pytest.raises(LabError, match=f"ovl-{clab.name}-h99 of h2 is gone"):
        await gone.exec(gone.node(2), "true")
    foreign = ensure_engine().containers.create(
        clab.state.image, ["true"], name=f"ovl-{clab.name}-f{uuid.uuid4().hex[:4]}"
    )
    try:
        gone.node(3).container = foreign.name
        with pytest.raises(LabError, match="does not carry this lab's labels"):
            gone.subnet_file(3)
    finally:
        foreign.remove(force=True)
    # The real state file was not rewritten by any of this.
    assert open_lab(clab.name, state_root=clab.dir.parent).node(1).container_pid == real


@pytest.mark.root
@pytest.mark.slow
def test_cli_status_and_matrix_show_the_provider(clab: ContainerLab) -> None:
    common = ["--name", clab.name, "--state-root", str(clab.dir.parent)]
    cli = [sys.executable, "-m", "integration.cli"]
    out = subprocess.run(
        [*cli, "status", *common, "--json"], capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip
    st = json.loads(out.stdout)
    assert st["provider"] == "containers" and st["etcd_alive"] is True
    assert st["image"].startswith("overlay-lab:")
    for n in st["nodes"]:
        assert n["systemd"] == "active" and n["ready"] is True and n["daemon_pid"] > 0
        assert n["container"] == f"ovl-{clab.name}-{n['node']}"
    text = subprocess.run(
        [*cli, "status", *common], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert f"lab {clab.name} (containers): backend vxlan" in text
    assert "overlayd.service active, main pid" in text and "in the container, ready" in text
    matrix = subprocess.run(
        [*cli, "matrix", *common], capture_output=True, text=True, timeout=60
    )  # fmt: skip
    assert matrix.returncode == 0, matrix.stdout + matrix.stderr
    assert "12/12 probes passed" in matrix.stdout  # 3 containers x 2 peers x TCP, UDP


@pytest.mark.root
@pytest.mark.slow
def test_cli_up_and_down_with_containers(tmp_path: Path, image: str) -> None:
    """`overlayctl lab up --provider containers` as a user runs it (udp backend): the same
    progress, matrix and hints as the netns lab; `lab down` leaves nothing labelled."""
    name = f"c{uuid.uuid4().hex[:6]}"
    root = tmp_path / "labs"
    common = ["--name", name, "--state-root", str(root)]
    cli = [sys.executable, "-m", "integration.cli"]
    try:
        up = subprocess.run(
            [*cli, "up", *common, "--provider", "containers", "--nodes", "2",
             "--backend", "udp"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"image {image} (cached)" in up.stderr
        assert "waiting for /readyz of 2 overlayd" in up.stderr
        assert f"h1: container ovl-{name}-h1 (systemd pid" in up.stderr
        assert "4/4 probes passed" in up.stdout  # 2 containers x 1 peer x TCP, UDP
        assert f"overlayctl lab down --name {name}" in up.stdout
    finally:
        down = subprocess.run([*cli, "down", *common], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    assert down.returncode == 0, down.stderr
    assert f"removed network ovl-{name}" in down.stdout
    assert _labelled(name, root) == [] and list_netns(f"ovl-{name}-") == []


# --------------------------------------------------------------------------- teardown


def _labelled(name: str, root: Path) -> list[str]:
    client = ensure_engine()
    filters = {"label": [f"{LABEL}={name}", f"{LABEL_STATE}={root / name}"]}
    found = [c.name for c in client.containers.list(all=True, filters=filters)]
    found += [n.name for n in client.networks.list(filters=filters)]
    return found


@pytest.mark.root
@pytest.mark.slow
async def test_down_after_a_crashed_up_removes_only_what_is_labelled(
    tmp_path: Path, image: str
) -> None:
    name = f"k{uuid.uuid4().hex[:6]}"
    root = tmp_path / "labs"
    client = ensure_engine()
    foreign: list[object] = []
    lab = open_lab(name, state_root=root, progress=crash_on("h1: container"),
                   provider="containers")  # fmt: skip
    try:
        with pytest.raises(LabCrash):
            await lab.up(nodes=2)
        assert sorted(_labelled(name, root)) == sorted(
            [f"ovl-{name}", f"ovl-{name}-etcd", f"ovl-{name}-h1"]
        )
        assert list_netns(f"ovl-{name}-h") == [f"ovl-{name}-h1"]
        # Not the lab's: a container and a network named like it without its labels, and a
        # container labelled with its name by another state directory.
        foreign.append(client.networks.create(f"ovl-{name}-x", driver="bridge", internal=True))
        foreign.append(client.containers.create(image, ["true"], name=f"ovl-{name}-h9"))
        foreign.append(client.containers.create(
            image, ["true"], name=f"ovl-{name}-other",
            labels={LABEL: name, LABEL_STATE: "/elsewhere"},
        ))  # fmt: skip
        # A fresh process that knows only the name reads the provider from the state.
        fresh = open_lab(name, state_root=root)
        assert isinstance(fresh, ContainerLab)
        done = await fresh.down()
        assert f"removed container ovl-{name}-h1" in done
        assert f"removed network ovl-{name}" in done
        assert _labelled(name, root) == []
        assert list_netns(f"ovl-{name}-") == []
        assert not (root / name).exists()
        for obj in foreign:
            obj.reload()  # type: ignore[attr-defined]  # still there: raises NotFound if not
    finally:
        await open_lab(name, state_root=root, provider="containers").down()
        for obj in foreign:
            obj.remove()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- Vagrant


def test_vagrantfile_and_scripts_check() -> None:
    """The Vagrantfile parses (ruby -c), the scripts pass shellcheck, and the Vagrantfile
    provisions with a script of this repository that calls only this repository's scripts."""
    ruby = subprocess.run(["ruby", "-c", str(SOURCE_ROOT / "Vagrantfile")], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert ruby.returncode == 0 and "Syntax OK" in ruby.stdout, ruby.stderr
    scripts = ["bootstrap.sh", "install-overlayd.sh", "vagrant-provision.sh", "lab.sh", "test.sh"]
    check = subprocess.run(
        ["shellcheck", *(str(SOURCE_ROOT / "scripts" / s) for s in scripts)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout
    vagrantfile = (SOURCE_ROOT / "Vagrantfile").read_text()
    assert 'path: "scripts/vagrant-provision.sh"' in vagrantfile
    provision = (SOURCE_ROOT / "scripts" / "vagrant-provision.sh").read_text()
    called = set(re.findall(r"\./scripts/([\w.-]+)", provision))
    assert called == {"bootstrap.sh", "install-overlayd.sh"}
    assert '"$venv/bin/overlayctl" config set' in provision


@pytest.mark.root
@pytest.mark.slow
async def test_vagrant_provisioning_in_lab_containers(tmp_path: Path, image: str) -> None:
    """scripts/vagrant-provision.sh, as `vagrant up` runs it on node1 (--etcd) and node2, in
    two host containers of a lab (booted systemd, the image's packages and venv standing in
    for bootstrap.sh): etcd as a service on node1, the config written, overlayd active on
    both with leases for their private addresses and a VXLAN route to each other."""
    lab = open_lab(f"v{uuid.uuid4().hex[:6]}", state_root=tmp_path / "labs",
                   provider="containers")  # fmt: skip
    assert isinstance(lab, ContainerLab)
    try:
        await lab.up(nodes=0)
        node1, node2 = await lab.add_host_container(), await lab.add_host_container()
        etcd = f"http://{node1.ip}:2379"
        config = '{"Network":"10.9.0.0/16","Backend":{"Type":"vxlan"}}'
        env = [
            "env", "OVERLAY_REPO=/opt/overlay-src", "OVERLAY_VENV=/opt/overlay",
            "OVERLAY_SKIP_BOOTSTRAP=1", "/opt/overlay-src/scripts/vagrant-provision.sh",
        ]  # fmt: skip
        for bad in (["1.2.3.4;true", etcd, "--etcd"], [node1.ip, "file:///etc", "--etcd"],
                    [node1.ip, etcd, "--both"]):  # fmt: skip
            with pytest.raises(CommandError) as err:
                await lab.exec(node1, *env, *bad)
            assert err.value.code == 2 and "vagrant-provision.sh:" in err.value.stderr
        await lab.exec(node1, *env, node1.ip, etcd, "--etcd", config, limit=120)
        await lab.exec(node2, *env, node2.ip, etcd, "--no-etcd", limit=120)
        for node in (node1, node2):
            assert (await lab.exec(node, "systemctl", "is-active", "overlayd")).strip() == "active"
            assert "FLANNEL_NETWORK=10.9.0.0/16" in lab.subnet_file(node.index).read_text()
        assert (await lab.exec(node1, "systemctl", "is-active", "etcd")).strip() == "active"
        out = await run(
            "etcdctl", f"--endpoints={etcd}", "get", "--prefix", "/coreos.com/network/subnets/",
            "--print-value-only", env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        public_ips = sorted(json.loads(v)["PublicIP"] for v in out.split())
        assert public_ips == sorted([node1.ip, node2.ip])
        env2 = lab.subnet_file(node2.index).read_text()
        subnet2 = IPv4Network(re.findall(r"FLANNEL_SUBNET=(\S+)", env2)[0], strict=False)

        async def routed() -> bool:
            routes = await ip_json("route", "show", "dev", "flannel.1", ns=node1.ns)
            return str(subnet2) in {r["dst"] for r in routes}

        await eventually(routed, "node1 routes node2's subnet over flannel.1")
    finally:
        await lab.down()


@pytest.mark.root
@pytest.mark.slow
async def test_names_taken_by_someone_else_fail_up_and_survive_down(
    tmp_path: Path, image: str
) -> None:
    """A Docker network already called ovl-NAME (not the lab's): `up` fails saying so, and
    `down` removes what the lab made but leaves that network alone."""
    name = f"n{uuid.uuid4().hex[:6]}"
    root = tmp_path / "labs"
    client = ensure_engine()
    theirs = client.networks.create(f"ovl-{name}", driver="bridge", internal=True)
    try:
        lab = open_lab(name, state_root=root, provider="containers")
        with pytest.raises(LabError, match=f"Docker: .*ovl-{name}.*already exists"):
            await lab.up(nodes=1)
        await open_lab(name, state_root=root).down()
        theirs.reload()  # still there
        assert _labelled(name, root) == [] and not (root / name).exists()
    finally:
        await open_lab(name, state_root=root, provider="containers").down()
        theirs.remove()
