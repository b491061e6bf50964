"""The lab's container provider: hosts are Docker containers running overlayd under systemd.

`overlayctl lab up --provider containers` builds the same lab as the netns provider (same
options, same output, same connectivity matrix) with these differences:

- the underlay is a Docker bridge network `ovl-NAME` (internal: no route out), its subnet the
  first free /24 of 198.18.0.0/15 as for the netns lab, its gateway (the root namespace's end,
  where etcdctl, /readyz probes and relays come from) the .254;
- etcd runs in its own container `ovl-NAME-etcd` (.253, Debian's etcd-server from the image);
- each host `ovl-NAME-hI` is a container (own network, mount, PID and UTS namespaces) with
  real systemd as PID 1; overlayd is installed there by scripts/install-overlayd.sh (the steps
  of docs/daemon.md) and runs as overlayd.service (Type=notify, Restart=always,
  /etc/default/overlayd), writing its own /run/flannel/subnet.env;
- the host's network namespace gets a named handle in the root namespace (`ip netns attach
  ovl-NAME-hI PID`), so everything that works on a netns host (iproute2 checks, the CNI
  attach of integration.containers, the probe) works on a container host unchanged. Workload
  containers are network namespaces attached to the host container's network through our
  flannel CNI plugin, exactly as on a netns host (the plugin reads the host container's
  subnet.env through /proc/PID/root).

With `ipv6` (`--ipv6`, dual stack) the Docker network also gets the lab's ULA /64 (gateway
`::fe` on the root namespace's bridge), each host `<ULA /64>::<index>` beside its IPv4 address,
and the containers IPv6 enabled (Docker 20.10 turns `disable_ipv6` on for every interface
but eth0), DAD off and IPv6 forwarding on, as `_dual_stack_sysctls` does on a netns host.
With `ipv6_only` (`--ipv6-only`) Docker still gives every endpoint an IPv4 address (its bridge
driver needs an IPv4 pool; Docker 28's `--ipv4=false` is ignored by Debian's 20.10 engine,
tried): the lab removes it (`ip -4 addr flush dev eth0`, which takes the IPv4 routes
with it) from every host container and from etcd's right after the container starts, before
anything in it uses the network; etcd listens on `[::]` and is reached at `<ULA /64>::fd`, the
daemons answer /readyz on `::`.

The image is built locally, in three cached layers keyed by content hashes (see
`ensure_image`), and the Docker engine is started when none answers (`ensure_engine`).
Everything the lab makes in Docker carries the labels `org.overlay.lab=NAME` and
`org.overlay.lab.state-dir=DIR`; `down` removes only what carries both.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING, Any

from integration.lab import (
    HEALTH_PORT,
    STATE_ROOT,
    Lab,
    LabError,
    NodeState,
    Progress,
    _underlay6,
    free_underlay,
    http_status,
    machine_lock,
)
from integration.netns import CommandError, delete_netns, ip_json, netns_exists, run

if TYPE_CHECKING:
    import docker

# testcontainers' reaper (Ryuk) is an image from a registry, which the lab cannot pull; the lab
# removes what it made itself (`down`, by label). Read by testcontainers when it is imported.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

SOURCE_ROOT = Path(__file__).resolve().parent.parent
IMAGE_CONTEXT = SOURCE_ROOT / "lab-image"
LABEL = "org.overlay.lab"
LABEL_STATE = "org.overlay.lab.state-dir"
IMAGE_LABEL = "org.overlay.lab.image"
IMAGE_REPO = "overlay-lab"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DOCKERD_LOG = Path("/var/log/overlay-lab-dockerd.log")
# No iptables rules, no ip_forward change in the root namespace: the lab's networks are
# internal bridges and need neither, and other users of this machine keep their firewall.
DOCKERD_ARGS = ("--iptables=false", "--ip6tables=false", "--ip-forward=false")
# The packages of overlay's wheel that go into the code layer (with pyproject.toml and README).
CODE_PACKAGES = ("overlay", "subnetmgr", "backends", "cni", "integration")
CODE_FILES = (
    "pyproject.toml",
    "README.md",
    "systemd/overlayd.service",
    "systemd/overlayd.env.example",
    "scripts/install-overlayd.sh",
    "scripts/vagrant-provision.sh",
)
ETCD_PORT = 2379
ETCD_HOST_ID = 0xFD
"""etcd's address on the IPv6 underlay: `<ULA /64>::fd` (the IPv4 one is the .253)."""
# No SYS_ADMIN: with it, systemd in the container remounts /sys/fs/cgroup read-only, and on a
# cgroup v1 host that mount is a bind of the host's own tmpfs: its superblock (the host's
# /sys/fs/cgroup) turned read-only, which broke crun/podman on the host. Seen here, fixed.
HOST_CAPS = ["NET_ADMIN", "NET_RAW"]
_SETTING_KEY = re.compile(r"FLANNELD_[A-Z0-9_]+")
# Debian policy 5.6.1: lower case letters, digits, + - . ; at least two, starting alphanumeric.
_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")


def _quiet(_: str) -> None:
    return None


# --------------------------------------------------------------------------- the engine


def ensure_engine(
    progress: Progress = _quiet, start_limit: float = 60.0, base_url: str | None = None
) -> docker.DockerClient:
    """A client of a Docker engine that answers; start `dockerd` when none does.

    `base_url` (default: DOCKER_HOST, else the local socket) is where the engine is asked."""
    return engine_and_starter(progress, start_limit, base_url)[0]


def engine_and_starter(
    progress: Progress = _quiet, start_limit: float = 60.0, base_url: str | None = None
) -> tuple[docker.DockerClient, subprocess.Popen[bytes] | None]:
    """`ensure_engine`, and the dockerd process when this call started it (else None), for a
    caller that owns the engine's lifetime (the test session)."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        raise LabError(
            "the container provider needs the Python packages testcontainers and docker: "
            "pip install 'testcontainers>=4.8,<5' (or run scripts/bootstrap.sh)"
        ) from None

    def connect() -> docker.DockerClient:
        if base_url is not None:
            return docker.DockerClient(base_url=base_url, timeout=30)
        return docker.from_env(timeout=30)

    try:
        client = connect()
        client.ping()
        return client, None
    except DockerException:
        pass
    if base_url is None and os.environ.get("DOCKER_HOST"):
        raise LabError(
            f"no Docker engine answers at DOCKER_HOST={os.environ['DOCKER_HOST']}; "
            "start it, or unset DOCKER_HOST to let the lab start a local dockerd"
        )
    running = _dockerd_pid() if base_url is None else None  # the pid file is the local one's
    if running is not None:
        # A dockerd is starting or shutting down: wait for it rather than start a second one
        # (which would fail on its pid file).
        progress(f"dockerd (pid {running}) does not answer yet; waiting for it")
        deadline = time.monotonic() + start_limit
        while time.monotonic() < deadline and _dockerd_pid() == running:
            try:
                client = connect()
                client.ping()
                return client, None
            except DockerException:
                time.sleep(0.2)
        if _dockerd_pid() == running:
            raise LabError(f"dockerd (pid {running}) did not answer within {start_limit}s")
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise LabError(
            "no Docker engine answers and dockerd is not installed: "
            "apt-get install docker.io (or run scripts/bootstrap.sh)"
        )
    host = [] if base_url is None else ["--host", base_url]
    with open(DOCKERD_LOG, "ab") as log:
        proc = subprocess.Popen(
            [dockerd, *DOCKERD_ARGS, *host],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    progress(
        f"no Docker engine answered: started dockerd (pid {proc.pid}, {' '.join(DOCKERD_ARGS)}, "
        f"log {DOCKERD_LOG}); it keeps running after the lab (stop it with: kill {proc.pid})"
    )
    deadline = time.monotonic() + start_limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(
                f"dockerd exited with {proc.returncode}; last lines of {DOCKERD_LOG}:\n"
                + _tail(DOCKERD_LOG)
            )
        try:
            client = connect()
            client.ping()
            return client, proc
        except DockerException:
            time.sleep(0.2)
    raise LabError(f"dockerd did not answer within {start_limit}s; see {DOCKERD_LOG}")


def _dockerd_pid(pidfile: Path = Path("/var/run/docker.pid")) -> int | None:
    """The pid of a running dockerd named by its pid file, if any."""
    try:
        pid = int(pidfile.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == "dockerd" else None


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- the image


@dataclass(frozen=True)
class ImageLayers:
    base: str
    deps: str
    code: str


def base_packages(context: Path = IMAGE_CONTEXT) -> list[str]:
    """The base image's Debian packages (lab-image/packages.txt), checked to be package names."""
    path = context / "packages.txt"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LabError(f"{path}: not UTF-8 text ({e})") from None
    names = []
    for line in text.split("\n"):  # lines end at \n only, whatever Unicode calls a break
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if not _PACKAGE_NAME.fullmatch(name):
            raise LabError(f"{path}: {name!r} is not a Debian package name")
        names.append(name)
    return names


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:16]


def runtime_requirements(root: Path = SOURCE_ROOT) -> list[str]:
    """What the deps layer installs: pyproject.toml's [project] dependencies, and its
    [build-system] requires plus `wheel` (the code layer builds the checkout in the image)."""
    import tomllib

    doc = tomllib.loads((root / "pyproject.toml").read_text())
    deps = doc.get("project", {}).get("dependencies", [])
    build = doc.get("build-system", {}).get("requires", [])
    both = [*deps, *build, "wheel"]
    if not all(isinstance(d, str) for d in both):
        raise LabError(f"{root / 'pyproject.toml'}: dependencies are not a list of strings")
    return both


def code_files(root: Path = SOURCE_ROOT) -> list[Path]:
    """The working-tree files of the code layer, relative to `root`, sorted."""
    files = [Path(f) for f in CODE_FILES]
    for pkg in CODE_PACKAGES:
        files += [p.relative_to(root) for p in (root / pkg).rglob("*.py")]
    return sorted(f for f in files if "__pycache__" not in f.parts)


def layer_tags(root: Path = SOURCE_ROOT, context: Path = IMAGE_CONTEXT) -> ImageLayers:
    """Image tags named by the content hash of what goes into each layer.

    base: the Debian suite, mirror and package list. deps: base + the dependency list + the
    Python version. code: deps + every file of the code layer (path and bytes).
    """
    base = _digest(SUITE.encode(), MIRROR.encode(), "\n".join(base_packages(context)).encode())
    deps = _digest(
        base.encode(),
        (context / "Dockerfile.deps").read_bytes(),
        "\n".join(runtime_requirements(root)).encode(),
        f"{sys.version_info[:2]}".encode(),
    )
    parts = [deps.encode(), (context / "Dockerfile.code").read_bytes()]
    for f in code_files(root):
        parts += [str(f).encode(), (root / f).read_bytes()]
    code = _digest(*parts)
    return ImageLayers(
        f"{IMAGE_REPO}-base:{base}", f"{IMAGE_REPO}-deps:{deps}", f"{IMAGE_REPO}:{code}"
    )


def _has_image(client: docker.DockerClient, tag: str) -> bool:
    from docker.errors import ImageNotFound

    try:
        client.images.get(tag)
    except ImageNotFound:
        return False
    return True


def ensure_image(
    client: docker.DockerClient,
    progress: Progress = _quiet,
    root: Path = SOURCE_ROOT,
    context: Path = IMAGE_CONTEXT,
) -> str:
    """The lab image's tag, building whichever layers are missing (base, deps, code)."""
    if not (root / "pyproject.toml").exists() or not context.is_dir():
        raise LabError(
            f"the container provider builds its image from a source checkout; {root} has no "
            "pyproject.toml or lab-image/ (run overlayctl from the checkout's .venv)"
        )
    tags = layer_tags(root, context)
    with machine_lock("image"):
        if _has_image(client, tags.code):
            progress(f"image {tags.code} (cached)")
            return tags.code
        started = time.monotonic()
        if not _has_image(client, tags.base):
            _build_base(tags.base, context, progress)
        if not _has_image(client, tags.deps):
            _build_deps(client, tags, root, context, progress)
        _build_code(client, tags, root, context, progress)
        progress(f"image {tags.code} built in {time.monotonic() - started:.1f}s")
        _prune(client, tags, progress)
    return tags.code


def _prune(client: docker.DockerClient, keep: ImageLayers, progress: Progress) -> None:
    """Remove the lab's older images (labelled org.overlay.lab.image) that no container uses;
    the ones in use (a running lab of an older image) stay."""
    from docker.errors import APIError

    wanted = {keep.base, keep.deps, keep.code}
    removed: list[str] = []
    # Newest layers first: a code image goes before the deps image it was built on.
    for kind in ("code", "deps", "base"):
        for image in client.images.list(filters={"label": f"{IMAGE_LABEL}={kind}"}):
            if wanted & set(image.tags):
                continue
            try:
                client.images.remove(image.id)
            except APIError:
                continue  # in use by a container, or the parent of a kept image
            removed += image.tags or [image.short_id]
    if removed:
        progress(f"removed older lab images: {', '.join(removed)}")


def _build_base(tag: str, context: Path, progress: Progress) -> None:
    if shutil.which("debootstrap") is None:
        raise LabError(
            "building the lab's base image needs debootstrap: apt-get install debootstrap "
            "(or run scripts/bootstrap.sh)"
        )
    started = time.monotonic()
    progress(f"building the base image {tag} with debootstrap (first time only, about a minute)")
    with tempfile.TemporaryDirectory(prefix="overlay-lab-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        argv = [
            "debootstrap", "--variant=minbase", f"--include={','.join(base_packages(context))}",
            SUITE, str(rootfs), MIRROR,
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        last_report = 0.0
        lines: list[str] = []
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            now = time.monotonic()
            if now - last_report > 5 or "Base system installed" in line:
                progress(f"  debootstrap {now - started:4.0f}s: {line}")
                last_report = now
        if proc.wait() != 0:
            raise LabError(f"debootstrap exited with {proc.returncode}:\n" + "\n".join(lines[-15:]))
        # A smaller image: no package cache, documentation or translations; etcd runs only in
        # the etcd container, started by hand, never as the hosts' service.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                    "usr/share/man", "usr/share/locale"):  # fmt: skip
            shutil.rmtree(rootfs / sub, ignore_errors=True)
        subprocess.run(
            ["systemctl", f"--root={rootfs}", "mask", "etcd.service"],
            check=True, capture_output=True,
        )  # fmt: skip
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(
            ["docker", "import", "--change", f"LABEL {IMAGE_LABEL}=base",
             "--change", "ENV container=docker", "-", tag],
            stdin=tar.stdout, capture_output=True,
        )  # fmt: skip
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or imp.returncode != 0:
            raise LabError(f"docker import of the base image failed: {imp.stderr.decode()}")
    progress(f"base image {tag} built in {time.monotonic() - started:.1f}s")


def _docker_build(
    client: docker.DockerClient, ctx: Path, dockerfile: str, tag: str, buildargs: dict[str, str]
) -> None:
    from docker.errors import BuildError

    try:
        client.images.build(
            path=str(ctx),
            dockerfile=dockerfile,
            tag=tag,
            buildargs=buildargs,
            rm=True,
            forcerm=True,
            network_mode="none",
        )
    except BuildError as e:
        log = "".join(str(x.get("stream", x.get("error", ""))) for x in e.build_log)
        raise LabError(f"building {tag} failed: {e.msg}\n{log[-2000:]}") from None


def _build_deps(
    client: docker.DockerClient, tags: ImageLayers, root: Path, context: Path, progress: Progress
) -> None:
    started = time.monotonic()
    reqs = runtime_requirements(root)
    progress(f"building the dependency layer {tags.deps}: {', '.join(reqs)}")
    with tempfile.TemporaryDirectory(prefix="overlay-lab-deps-") as tmp:
        ctx = Path(tmp)
        shutil.copy(context / "Dockerfile.deps", ctx / "Dockerfile.deps")
        wheels = ctx / "wheels"
        out = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), *reqs],
            capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode != 0:
            raise LabError(f"pip wheel of the dependencies failed: {out.stderr[-2000:]}")
        _docker_build(client, ctx, "Dockerfile.deps", tags.deps, {"BASE": tags.base})
    progress(f"dependency layer {tags.deps} built in {time.monotonic() - started:.1f}s")


def _build_code(
    client: docker.DockerClient, tags: ImageLayers, root: Path, context: Path, progress: Progress
) -> None:
    started = time.monotonic()
    progress(f"building the code layer {tags.code} from {root}")
    with tempfile.TemporaryDirectory(prefix="overlay-lab-code-") as tmp:
        ctx = Path(tmp)
        shutil.copy(context / "Dockerfile.code", ctx / "Dockerfile.code")
        for f in code_files(root):
            dest = ctx / "src" / f
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, dest)
        _docker_build(client, ctx, "Dockerfile.code", tags.code, {"DEPS": tags.deps})
    progress(f"code layer {tags.code} built in {time.monotonic() - started:.1f}s")


# --------------------------------------------------------------------------- the lab


def nsenter(pid: int) -> list[str]:
    """A command prefix that runs inside the container whose init has host pid `pid`."""
    return ["nsenter", f"--target={pid}", "--mount", "--uts", "--ipc", "--net", "--pid", "--"]


class ContainerLab(Lab):
    """The lab with hosts as containers (see the module docstring)."""

    provider = "containers"

    def __init__(
        self, name: str = "lab", state_root: Path = STATE_ROOT, progress: Progress = _quiet
    ) -> None:
        super().__init__(name, state_root, progress)
        self._client: docker.DockerClient | None = None
        self._checked_pids: set[int] = set()
        """Nodes whose container pid was checked against the engine by this object."""

    # ------------------------------------------------------------------ names

    @property
    def docker_network(self) -> str:
        return f"ovl-{self.name}"

    def container_name(self, index: int) -> str:
        return f"ovl-{self.name}-h{index}"

    @property
    def etcd_container(self) -> str:
        return f"ovl-{self.name}-etcd"

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL: self.name, LABEL_STATE: str(self.dir)}

    def subnet_file(self, index: int) -> Path:
        """The host container's own /run/flannel/subnet.env, seen from the root namespace."""
        pid = self._init_pid(self.node(index))
        return Path(f"/proc/{pid}/root/run/flannel/subnet.env")

    def _init_pid(self, node: NodeState) -> int:
        """The host pid of `node`'s container init, checked once per Lab object against the
        engine (a pid from the state file may be stale: the container stopped, the pid
        reused by another process)."""
        if node.container is None or node.container_pid is None:
            raise LabError(f"h{node.index} has no container")
        if node.index in self._checked_pids:
            return node.container_pid
        from docker.errors import DockerException, NotFound

        try:
            c = self._answering_client().containers.get(node.container)
        except NotFound:
            raise LabError(f"the container {node.container} of h{node.index} is gone") from None
        except DockerException as e:
            raise LabError(f"cannot inspect {node.container}: {e}") from None
        if any(c.labels.get(k) != v for k, v in self.labels.items()):
            raise LabError(f"{node.container} does not carry this lab's labels: not ours")
        state = c.attrs.get("State", {})
        pid = state.get("Pid")
        if not state.get("Running") or not isinstance(pid, int) or pid <= 0:
            raise LabError(f"the container {node.container} of h{node.index} is not running "
                           f"({state.get('Status', 'unknown')})")  # fmt: skip
        node.container_pid = pid
        self._checked_pids.add(node.index)
        return pid

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = ensure_engine(self.progress)
        return self._client

    def _answering_client(self) -> docker.DockerClient:
        """A client of the engine if it answers; never starts one (status, matrix, tests)."""
        if self._client is not None:
            return self._client
        import docker
        from docker.errors import DockerException

        try:
            client = docker.from_env(timeout=30)
            client.ping()
        except DockerException:
            raise LabError(
                "no Docker engine answers: the lab's containers are not running "
                "(`overlayctl lab down` starts dockerd to remove them)"
            ) from None
        self._client = client
        return client

    @property
    def exists(self) -> bool:
        if super().exists:
            return True
        return bool(self._labelled("containers") or self._labelled("networks"))

    def _labelled(self, kind: str) -> list[Any]:
        """Our labelled Docker objects of `kind` (none when no engine answers)."""
        import docker
        from docker.errors import DockerException

        try:
            client = self._client or docker.from_env(timeout=30)
            filters = {"label": [f"{k}={v}" for k, v in self.labels.items()]}
            if kind == "containers":
                return list(client.containers.list(all=True, filters=filters))
            if kind == "networks":
                return list(client.networks.list(filters=filters))
            return list(client.volumes.list(filters=filters))
        except DockerException:
            return []

    # ------------------------------------------------------------------ up

    async def up(self, *args: Any, **kwargs: Any) -> None:
        """Lab.up; errors of the Docker engine become LabErrors naming what failed."""
        from docker.errors import DockerException

        try:
            await super().up(*args, **kwargs)
        except DockerException as e:
            raise LabError(f"Docker: {e}") from None

    async def _make_underlay(self) -> None:
        client = await asyncio.to_thread(lambda: self.client)
        self.state.image = await asyncio.to_thread(ensure_image, client, self.progress)
        self.save()
        import docker.types

        with self._pool_lock():
            net = await free_underlay()
            self.state.underlay = str(net)
            if self.state.ipv6:
                self.state.underlay6 = str(_underlay6(self.name, self.state.underlay))
            self.state.docker_network = self.docker_network
            self.save()
            pools = [docker.types.IPAMPool(subnet=str(net), gateway=str(self.mgmt_ip.ip))]
            if self.state.ipv6:
                pools.append(
                    docker.types.IPAMPool(
                        subnet=self.state.underlay6, gateway=str(self.mgmt_ip6.ip)
                    )
                )
            await asyncio.to_thread(
                client.networks.create,
                self.docker_network,
                driver="bridge",
                internal=True,
                check_duplicate=True,  # Docker would otherwise make a second "ovl-NAME"
                ipam=docker.types.IPAMConfig(pool_configs=pools),
                enable_ipv6=self.state.ipv6,
                labels=self.labels,
                options={"com.docker.network.bridge.name": self.bridge},
            )
        gateways = f"{self.mgmt_ip.ip}"
        if self.state.ipv6:
            # Docker adds this gateway without nodad: it stays tentative until the bridge has
            # a port (etcd's container), then DAD takes about 1 s; the wait for etcd's
            # /health covers it.
            gateways += f" and {self.mgmt_ip6.ip}"
        self.progress(
            f"underlay {self.state.underlay}"
            + (f" and {self.state.underlay6}" if self.state.ipv6 else "")
            + f" on Docker network {self.docker_network} (bridge {self.bridge}, gateway "
            f"{gateways})"
        )

    @property
    def bridge(self) -> str:
        """The Docker network's bridge in the root namespace."""
        return f"ovb-{self.name}"

    async def _wait_dad(self, pid: int, dev: str, limit: float = 10.0) -> None:
        """Until no IPv6 address of `dev` in the network namespace of `pid` is tentative."""
        prefix = ["nsenter", f"--target={pid}", "--net", "--"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            out = await run(*prefix, "ip", "-6", "-o", "addr", "show", "dev", dev, "tentative")
            if not out.strip():
                return
            if loop.time() > deadline:
                raise LabError(f"IPv6 addresses of {dev} still tentative after {limit}s: {out}")
            await asyncio.sleep(0.1)

    async def _drop_ipv4(self, pid: int, what: str) -> None:
        """An IPv6-only lab: remove the IPv4 address Docker gave eth0 in the container of
        init `pid` (its IPv4 routes go with it) and check that no IPv4 is left but loopback's."""
        net = ["nsenter", f"--target={pid}", "--net", "--"]
        await run(*net, "ip", "-4", "addr", "flush", "dev", "eth0")
        addrs = await run(*net, "ip", "-4", "-o", "addr", "show")
        left = [line for line in addrs.splitlines() if line.split()[1:2] != ["lo"]]
        routes = (await run(*net, "ip", "-4", "route", "show")).strip()
        if left or routes:
            raise LabError(f"{what}: IPv4 left after the flush: {left} {routes!r}")

    def _container(
        self, name: str, ip: str, command: list[str], hostname: str,
        ip6: str | None = None, forwarding: bool = False,
    ) -> Any:  # fmt: skip
        """A testcontainers DockerContainer of the lab image on the underlay at `ip` (and `ip6`
        in an `ipv6` lab: IPv6 enabled, DAD off, IPv6 forwarding as `forwarding` says)."""
        from docker.types import EndpointConfig
        from testcontainers.core.container import DockerContainer

        version = str(self.client.api.api_version)
        sysctls: dict[str, str] = {}
        if self.state.ipv6:
            # Docker 20.10 sets disable_ipv6 on "all" and "default" (eth0 alone gets IPv6):
            # flannel-v6.1, cni0 and the veths made later need it off. The sysctls apply
            # after eth0 is moved in, so its link-local address still goes through DAD
            # (`_make_host` waits for it); the devices made later skip it.
            for conf in ("all", "default"):
                sysctls[f"net.ipv6.conf.{conf}.disable_ipv6"] = "0"
                sysctls[f"net.ipv6.conf.{conf}.accept_dad"] = "0"
            if forwarding:
                sysctls["net.ipv6.conf.all.forwarding"] = "1"
        return (
            DockerContainer(self.state.image)
            .with_name(name)
            .with_command(command)
            .with_tmpfs_mount("/run")
            .with_tmpfs_mount("/run/lock")
            .with_volume_mapping("/sys/fs/cgroup", "/sys/fs/cgroup", "ro")
            .with_kwargs(
                hostname=hostname,
                labels=self.labels,
                network=self.docker_network,
                networking_config={
                    self.docker_network: EndpointConfig(version, ipv4_address=ip, ipv6_address=ip6)
                },
                sysctls=sysctls,
                cap_add=HOST_CAPS,
                devices=["/dev/net/tun:/dev/net/tun:rwm"],
                stop_signal="SIGRTMIN+3",
                detach=True,
            )
        )

    def _etcd_ips(self) -> tuple[str, str | None]:
        """etcd's container addresses: the underlay's .253, and `<ULA /64>::fd` (ipv6 labs)."""
        ip = str(IPv4Network(self.state.underlay).broadcast_address - 2)
        if not self.state.ipv6:
            return ip, None
        return ip, str(IPv6Network(self.state.underlay6).network_address + ETCD_HOST_ID)

    def _etcd_address(self) -> str:
        """Where the lab reaches etcd: its IPv6 address in an IPv6-only lab, else its IPv4 one."""
        ip, ip6 = self._etcd_ips()
        return ip6 if self.state.ipv6_only and ip6 is not None else ip

    async def _start_local_etcd(self) -> None:
        ip, ip6 = self._etcd_ips()
        address = self._etcd_address()
        shown = f"[{address}]" if ":" in address else address
        endpoint = f"http://{shown}:{ETCD_PORT}"
        self.state.etcd_container = self.etcd_container
        self.save()
        listen = "[::]" if self.state.ipv6_only else "0.0.0.0"
        argv = [
            "etcd", "--name", f"lab-{self.name}", "--data-dir", "/var/lib/overlay-lab-etcd",
            "--listen-client-urls", f"http://{listen}:{ETCD_PORT}",
            "--advertise-client-urls", endpoint,
            "--listen-peer-urls", "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", f"lab-{self.name}=http://127.0.0.1:2380",
        ]  # fmt: skip
        container = self._container(self.etcd_container, ip, argv, "etcd", ip6)
        await asyncio.to_thread(container.start)
        if self.state.ipv6_only:
            attrs = await asyncio.to_thread(self.client.api.inspect_container, self.etcd_container)
            await self._drop_ipv4(int(attrs["State"]["Pid"]), self.etcd_container)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while await http_status(address, ETCD_PORT, "/health") != 200:
            if loop.time() > deadline:
                logs = await asyncio.to_thread(container.get_wrapped_container().logs, tail=20)
                raise LabError(f"etcd in {self.etcd_container} not healthy within 30s:\n{logs}")
            await asyncio.sleep(0.1)
        self.state.etcd_endpoint = endpoint
        self.state.daemon_endpoints = endpoint
        self.save()
        self.progress(f"etcd listening on {endpoint} (container {self.etcd_container})")

    async def _make_host(self, kind: str = "overlayd") -> NodeState:
        index = max((n.index for n in self.state.nodes), default=0) + 1
        net = IPv4Network(self.state.underlay)
        if index >= net.num_addresses - 3:
            raise LabError(f"the underlay {net} has no room for host h{index}")
        ip = IPv4Interface(f"{net.network_address + index}/{net.prefixlen}")
        # An IPv6-only lab's hosts have no IPv4 address: ip "" (as on the netns provider).
        node = NodeState(index, self.host_ns(index), "" if self.state.ipv6_only else str(ip.ip),
                         kind=kind)  # fmt: skip
        node.container = self.container_name(index)
        if self.state.ipv6:
            node.ip6 = str(IPv6Address(IPv6Network(self.state.underlay6).network_address + index))
        self.state.nodes.append(node)
        self.state.namespaces.append(node.ns)
        self.save()
        self.node_dir(index).mkdir(parents=True, exist_ok=True)
        container = self._container(
            node.container, str(ip.ip), ["/lib/systemd/systemd"], f"h{index}", node.ip6,
            forwarding=True,
        )  # fmt: skip
        await asyncio.to_thread(container.start)
        attrs = await asyncio.to_thread(self.client.api.inspect_container, node.container)
        node.container_pid = int(attrs["State"]["Pid"])
        self._checked_pids.add(index)
        self.save()
        await run("ip", "netns", "attach", node.ns, str(node.container_pid))
        if self.state.ipv6_only:  # before overlayd (or anything) in the container starts
            await self._drop_ipv4(node.container_pid, node.container)
        if self.state.ipv6:
            await self._wait_dad(node.container_pid, "eth0")
        await self._wait_booted(node)
        (self.subnet_file(index).parent).mkdir(parents=True, exist_ok=True)
        if self.state.ipv6_only:
            shown = f"{node.ip6}/{IPv6Network(self.state.underlay6).prefixlen} (no IPv4)"
        elif self.state.ipv6:
            shown = f"{ip} and {node.ip6}"
        else:
            shown = str(ip)
        self.progress(
            f"h{index}: container {node.container} (systemd pid {node.container_pid}), "
            f"underlay address {shown}"
        )
        return node

    async def _wait_booted(self, node: NodeState, limit: float = 60.0) -> None:
        """Until systemd in the container has finished booting (running, or degraded: a
        container lacks some of a machine's units). Before its bus exists, systemctl fails."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        state = ""
        while loop.time() < deadline:
            out = await self.exec(node, "systemctl", "is-system-running", check=False)
            state = out.strip()
            if state in ("running", "degraded"):
                return
            await asyncio.sleep(0.1)
        raise LabError(f"systemd in {node.container} did not finish booting ({state!r})")

    async def exec(
        self, node: NodeState, *argv: str, check: bool = True, limit: float = 30.0,
        input: bytes | None = None,
    ) -> str:  # fmt: skip
        """Run a command inside host `node`'s container (all its namespaces)."""
        return await run(
            *nsenter(self._init_pid(node)), *argv, check=check, limit=limit, input=input
        )

    def daemon_settings(self, environ: Mapping[str, str] = os.environ) -> list[str]:
        """The FLANNELD_* lines of a host's /etc/default/overlayd: the netns lab's flags, plus
        any FLANNELD_* of `environ` (this process's: netns daemons inherit it). Variables that
        are no FLANNELD_NAME, and values with a line break or NUL, are left out."""
        settings = {
            "FLANNELD_ETCD_ENDPOINTS": self.state.daemon_endpoints,
            "FLANNELD_ETCD_PREFIX": self.state.prefix,
            "FLANNELD_IFACE": "eth0",
            "FLANNELD_SUBNET_FILE": "/run/flannel/subnet.env",
            "FLANNELD_HEALTHZ_IP": "::" if self.state.ipv6_only else "0.0.0.0",
            "FLANNELD_HEALTHZ_PORT": str(HEALTH_PORT),
            "FLANNELD_LOG_LEVEL": "debug",
            "FLANNELD_IP_MASQ": "true",
        }
        if self.state.resync_period is not None:
            settings["FLANNELD_RESYNC_PERIOD"] = self.state.resync_period
        for key, value in environ.items():
            if _SETTING_KEY.fullmatch(key) and not set(value) & {"\n", "\r", "\0"}:
                settings[key] = value
        return [f"{k}={v}" for k, v in settings.items() if not set(v) & {"\n", "\r", "\0"}]

    async def _start_daemons(self, nodes: list[NodeState], ready_timeout: float) -> None:
        """Install and start overlayd.service in each container, all at once, as an operator
        would: scripts/install-overlayd.sh (env file, daemon-reload, enable --now)."""
        args: list[str] = []
        for line in self.daemon_settings():
            args += ["--set", line]

        async def one(node: NodeState) -> None:
            try:
                await self.exec(
                    node, "/opt/overlay-src/scripts/install-overlayd.sh", "--venv",
                    "/opt/overlay", *args, limit=ready_timeout,
                )  # fmt: skip
            except CommandError as e:
                raise LabError(
                    f"overlayd of h{node.index} did not start: {e}\nlast lines of its journal:\n"
                    + self.log_tail(node.index)
                ) from None

        await asyncio.gather(*(one(n) for n in nodes))

    LOG_NAME = "journal"

    def _check_daemon_running(self, index: int) -> None:
        """Nothing to check: systemd restarts a daemon that died (Restart=always)."""

    async def daemon_log(self, index: int) -> str:
        """Everything overlayd.service of host `index` has logged (its journal)."""
        return await self.exec(
            self.node(index), "journalctl", "-u", "overlayd", "--no-pager", "-o", "cat"
        )

    def log_tail(self, index: int, lines: int = 20) -> str:
        try:
            pid = self._init_pid(self.node(index))
            out = subprocess.run(
                [*nsenter(pid), "journalctl", "-u", "overlayd", "-n", str(lines), "--no-pager"],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
        except (LabError, OSError, subprocess.TimeoutExpired) as e:
            return f"(no journal: {e})"
        return out.stdout.strip() or out.stderr.strip()

    async def add_host_container(self) -> NodeState:
        """A host container booted to systemd, overlayd installed but not started (for tests
        of the unit itself; `add_node` is the whole thing)."""
        node = await self._make_host()
        await self.exec(
            node, "/opt/overlay-src/scripts/install-overlayd.sh", "--venv", "/opt/overlay",
            "--no-start",
        )  # fmt: skip
        return node

    # ------------------------------------------------------------------ daemons

    async def daemon_main_pid(self, index: int) -> int:
        """overlayd.service's main pid inside the container (0: not running)."""
        out = await self.exec(
            self.node(index), "systemctl", "show", "-p", "MainPID", "--value", "overlayd"
        )
        return int(out.strip() or 0)

    async def daemon_state(self, index: int) -> str:
        """`systemctl is-active overlayd` in host `index`: active, activating, inactive, ..."""
        out = await self.exec(self.node(index), "systemctl", "is-active", "overlayd", check=False)
        return out.strip()

    async def stop_daemon(self, index: int, sig: int = 15) -> None:
        """SIGTERM: `systemctl stop overlayd`. Another signal: sent to the main process only
        (`systemctl kill`), which systemd then restarts (Restart=always) after RestartSec."""
        node = self.node(index)
        if sig == 15:
            await self.exec(node, "systemctl", "stop", "overlayd", limit=30)
            return
        pid = await self.daemon_main_pid(index)
        if pid == 0:
            return
        await self.exec(node, "systemctl", "kill", "--kill-who=main", f"--signal={sig}", "overlayd")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while loop.time() < deadline:
            if await self.daemon_main_pid(index) != pid:
                return
            await asyncio.sleep(0.05)
        raise LabError(f"overlayd of h{index} (pid {pid} in its container) outlived signal {sig}")

    async def start_daemon(self, index: int, ready_timeout: float = 60.0) -> None:
        """Start overlayd.service now; return once it is ready (READY=1, /readyz).

        `systemctl start` (at once when already running), except while systemd waits to
        restart a killed daemon (substate auto-restart): `start` would wait out RestartSec
        (5 s, measured), so `systemctl restart` starts it right away, as an operator would."""
        node = self.node(index)
        sub = await self.exec(node, "systemctl", "show", "-p", "SubState", "--value", "overlayd")
        verb = "restart" if sub.strip() == "auto-restart" else "start"
        await self.exec(node, "systemctl", verb, "overlayd", limit=ready_timeout)
        await self.wait_ready(index, ready_timeout)

    async def remove_node(self, index: int, delete_lease: bool = True) -> None:
        """As for netns hosts (`systemctl stop overlayd`, lease deleted, workload namespaces
        gone), then the host container is removed."""
        await super().remove_node(index, delete_lease)
        self._checked_pids.discard(index)  # the index may be given to a new host later

    async def _delete_host(self, node: NodeState) -> None:
        if node.container is not None:
            await self._remove_container(node.container)
        await delete_netns(node.ns)
        self._forget_ns(node.ns)

    async def _remove_container(self, name: str) -> bool:
        """Remove container `name` if it carries this lab's labels; whether it did."""
        from docker.errors import NotFound

        try:
            c = await asyncio.to_thread(self.client.containers.get, name)
        except NotFound:
            return False
        if any(c.labels.get(k) != v for k, v in self.labels.items()):
            return False
        await asyncio.to_thread(c.remove, force=True, v=True)
        return True

    # ------------------------------------------------------------------ tests' seam

    async def underlay_port(self, index: int) -> tuple[str | None, str]:
        """The host-side veth of host `index` on the Docker bridge (in the root namespace)."""
        node = self.node(index)
        out = await run("cat", "/sys/class/net/eth0/iflink", ns=node.ns)
        ifindex = out.strip()
        for link in await ip_json("link", "show"):
            if str(link.get("ifindex")) == ifindex:
                return None, str(link["ifname"])
        raise LabError(f"no root-namespace port for h{index}'s eth0 (ifindex {ifindex})")

    # ------------------------------------------------------------------ status, down

    async def status(self) -> dict[str, Any]:
        st = await super().status()
        for entry, node in zip(st["nodes"], self.state.nodes, strict=True):
            entry["container"] = node.container
            if node.kind != "overlayd":
                continue
            try:
                state = await self.daemon_state(node.index)
                pid = await self.daemon_main_pid(node.index)
            except (LabError, CommandError):
                state, pid = "container not running", 0
            entry["daemon_pid"] = pid or None
            entry["systemd"] = state
            entry["alive"] = state in ("active", "reloading", "deactivating")
            entry["ready"] = (
                entry["alive"]
                and await http_status(self.mgmt_address(node), HEALTH_PORT, "/readyz") == 200
            )
        if self.state.etcd_container:
            st["etcd_alive"] = await http_status(self._etcd_address(), ETCD_PORT, "/health") == 200
        st["image"] = self.state.image
        return st

    async def down(self) -> list[str]:
        done: list[str] = []
        import docker
        from docker.errors import DockerException

        client: docker.DockerClient | None = None
        made = self.state.docker_network or self.state.etcd_container
        if made or any(n.container for n in self.state.nodes):
            # The state says Docker objects were (about to be) made: they live in the engine,
            # stopped or not; start it if needed, as `up` would.
            try:
                client = self._client or ensure_engine(self.progress)
            except LabError as e:
                raise LabError(
                    f"cannot reach the Docker engine to remove the lab's containers and "
                    f"networks ({e}); nothing was removed, run `lab down` again"
                ) from None
        else:
            with contextlib.suppress(DockerException):
                answering = self._client or docker.from_env(timeout=30)
                answering.ping()
                client = answering
        if client is not None:
            self._client = client
            for c in self._labelled("containers"):
                await asyncio.to_thread(c.remove, force=True, v=True)
                done.append(f"removed container {c.name}")
            for n in self._labelled("networks"):
                await asyncio.to_thread(n.remove)
                done.append(f"removed network {n.name}")
            for v in self._labelled("volumes"):
                await asyncio.to_thread(v.remove, force=True)
                done.append(f"removed volume {v.name}")
        for node in self.state.nodes:
            node.daemon_pid = None  # systemd's business, gone with the container
        for ns in list(self.state.namespaces):
            if netns_exists(ns):
                await delete_netns(ns)
        done += await super().down()
        return done
