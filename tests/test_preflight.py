"""One overlayd per host, and its privileges checked before it changes anything (issue 12).

Unit tests of overlay/preflight.py with real files and real processes (the lock is a real
flock, its holder a real child killed with SIGKILL), then the real overlayd binary in the
test_daemon namespace against a real etcd: a second daemon refused with the first one's PID,
and a daemon without CAP_NET_ADMIN (an ordinary user; root with the capability dropped from
its bounding set by setpriv) stopping before it takes a lease or writes subnet.env.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.preflight import (
    CAP_NET_ADMIN,
    LOCK_NAME,
    HostLock,
    PreflightError,
    effective_capabilities,
    privilege_problem,
)
from tests.test_daemon import (
    ALLOC_CONFIG,
    HEALTHZ_PORT,
    OVERLAYD,
    Daemon,
    Site,
    daemon_factory,
    etcdctl,
    leases,
    site,
)

__all__ = ["daemon_factory", "site"]  # fixtures used here

ALL_CAPS = (1 << 41) - 1
NO_NET_ADMIN = ALL_CAPS & ~(1 << CAP_NET_ADMIN)


# ------------------------------------------------------------------------------ the lock


def test_second_lock_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    first = HostLock.for_subnet_file(tmp_path / "run" / "subnet.env")
    first.acquire()
    try:
        assert first.path == tmp_path / "run" / LOCK_NAME
        assert first.path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(PreflightError, match=rf"another overlayd \(PID {os.getpid()}\)"):
            HostLock.for_subnet_file(tmp_path / "run" / "subnet.env").acquire()
    finally:
        first.release()
    second = HostLock(first.path)  # released: free again
    second.acquire()
    second.release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom overlay.preflight import HostLock\n"
        f"HostLock(Path({str(path)!r})).acquire()\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        with pytest.raises(PreflightError, match=rf"\(PID {child.pid}\)"):
            HostLock(path).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    lock = HostLock(path)  # the kernel dropped the dead holder's flock; its PID is still there
    lock.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    lock.release()


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"9" * 5000, b"\xff\xfe\x00", b"-1"])
def test_a_holder_without_a_readable_pid(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / LOCK_NAME
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(PreflightError, match="a process that wrote no PID"):
            HostLock(path).acquire()
    finally:
        os.close(fd)


def test_a_symlink_at_the_lock_path_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    (tmp_path / LOCK_NAME).symlink_to(target)
    with pytest.raises(PreflightError, match="cannot open the lock file"):
        HostLock(tmp_path / LOCK_NAME).acquire()
    assert target.read_text() == "keep me"


def test_an_unwritable_directory_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(PreflightError, match=r"needs to write in .*file.*run it as root"):
        HostLock(tmp_path / "file" / LOCK_NAME).acquire()


# ------------------------------------------------------------------------ capabilities


def test_capabilities_from_status_files(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert effective_capabilities(str(status)) == 1 << CAP_NET_ADMIN
    for hostile in ("CapEff:\tzz\n", "CapEff:\n", "", "\x00" * 100, "CapEff:\t" + "f" * 9000):
        status.write_text(hostile)
        value = effective_capabilities(str(status))
        assert value == 0 or hostile.startswith("CapEff:\tf")
    assert effective_capabilities(str(tmp_path / "missing")) == 0
    assert effective_capabilities() & (1 << CAP_NET_ADMIN)  # the tests run as root


def test_privilege_problem_names_what_needs_it() -> None:
    assert privilege_problem("vxlan", False, True, False, ALL_CAPS) is None
    text = privilege_problem("vxlan", True, True, False, NO_NET_ADMIN)
    assert text is not None
    assert "lacks CAP_NET_ADMIN" in text and "backend vxlan and --ip-masq and" in text
    assert "no lease was taken" in text
    # The alloc backend alone, without rules or routes, needs nothing.
    assert privilege_problem("alloc", False, False, False, 0) is None
    assert "--iptables-forward-rules needs" in str(
        privilege_problem("alloc", False, True, False, 0)
    )


@given(
    st.sampled_from(["alloc", "vxlan", "udp", "host-gw", "ALLOC"]),
    st.booleans(), st.booleans(), st.booleans(), st.integers(0, ALL_CAPS),
)  # fmt: skip
def test_refused_exactly_when_net_admin_is_needed_and_missing(
    backend: str, masq: bool, fwd: bool, blackhole: bool, caps: int
) -> None:
    needed = backend.lower() != "alloc" or masq or fwd or blackhole
    has = bool(caps & (1 << CAP_NET_ADMIN))
    problem = privilege_problem(backend, masq, fwd, blackhole, caps)
    assert (problem is not None) == (needed and not has)


# ------------------------------------------------------------------- the real daemon


def _run_to_exit(site: Site, prefix: list[str], args: list[str], log: Path) -> tuple[int, str]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", site.ns, *prefix, OVERLAYD, *args],
            stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip
    try:
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return rc, log.read_text(errors="replace")


def _daemon_args(site: Site, etcd_prefix: str, subnet_file: Path) -> list[str]:
    return [
        "--etcd-endpoints", site.etcd.endpoint, "--etcd-prefix", etcd_prefix,
        "--subnet-file", str(subnet_file), "--healthz-ip", site.node_ip,
        "--healthz-port", str(HEALTHZ_PORT + 1), "--log-level", "debug",
    ]  # fmt: skip


@pytest.mark.root
@pytest.mark.slow
def test_a_second_daemon_is_refused_with_the_first_ones_pid(
    site: Site,
    etcd_prefix: str,
    daemon_factory: object,
    tmp_path: Path,
) -> None:
    assert callable(daemon_factory)
    etcdctl(site, "put", f"{etcd_prefix}/config", ALLOC_CONFIG)
    first: Daemon = daemon_factory()
    first.start()
    first.wait_ready()
    held = leases(site, etcd_prefix)
    lock = tmp_path / "run" / LOCK_NAME
    holder = int(lock.read_text())
    # `ip netns exec` execs overlayd, so the holder is the process we started.
    assert first.proc is not None and holder == first.proc.pid
    rc, log = _run_to_exit(site, [], _daemon_args(site, etcd_prefix, tmp_path / "run" /
                           "subnet.env"), tmp_path / "second.log")  # fmt: skip
    assert rc == 1
    assert f"another overlayd (PID {holder}) is running on this host" in log
    assert "acquired lease" not in log and "using interface" not in log
    assert leases(site, etcd_prefix) == held
    assert first.get("/readyz")[0] == 200
    assert first.stop() == 0
    assert lock.read_text() == ""  # released on a clean stop


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory the unprivileged user may write (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="ovl-nobody-"))
    try:
        os.chmod(path, 0o755)
        os.chown(path, 65534, 65534)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize(
    ("prefix", "uid"),
    [(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], 65534),
     (["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"], 0)],
    ids=["nobody", "root-without-net-admin"],
)  # fmt: skip
def test_without_net_admin_no_lease_and_no_subnet_env(
    site: Site,
    etcd_prefix: str,
    nobody_dir: Path,
    prefix: list[str],
    uid: int,
) -> None:
    etcdctl(site, "put", f"{etcd_prefix}/config", ALLOC_CONFIG)
    subnet_file = nobody_dir / "run" / "subnet.env"
    (nobody_dir / "run").mkdir()
    os.chown(nobody_dir / "run", 65534, 65534)
    rc, log = _run_to_exit(site, prefix, _daemon_args(site, etcd_prefix, subnet_file),
                           nobody_dir / "overlayd.log")  # fmt: skip
    assert rc == 1, log
    assert f"overlayd lacks CAP_NET_ADMIN (running as uid {uid})" in log
    assert "--iptables-forward-rules needs" in log and "no lease was taken" in log
    assert leases(site, etcd_prefix) == {}
    assert not subnet_file.exists()


@pytest.mark.root
def test_nobody_without_a_writable_subnet_dir_is_told_before_anything(
    site: Site,
    etcd_prefix: str,
    tmp_path: Path,
) -> None:
    rc, log = _run_to_exit(
        site, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
        _daemon_args(site, etcd_prefix, Path("/run/ovl-test-no-such-dir") / "subnet.env"),
        tmp_path / "overlayd.log",
    )  # fmt: skip
    assert rc == 1
    assert "cannot open the lock file /run/ovl-test-no-such-dir/overlayd.lock" in log
    assert "Permission denied" in log and "run it as root" in log
    assert not Path("/run/ovl-test-no-such-dir").exists()
