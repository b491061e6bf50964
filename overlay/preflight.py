"""What overlayd checks before it changes anything: one daemon per host, and its privileges.

- HostLock: an exclusive `flock` on `overlayd.lock` in the subnet file's directory
  (/run/flannel by default), holding the PID of the daemon that has it. A second overlayd on
  the same host (same --subnet-file directory) is refused with that PID instead of renewing
  the same lease beside the first. The kernel drops the lock when the holder dies, however it
  dies (kill -9 included), so a stale file never blocks a restart.
- missing_privileges: the capabilities the data path needs (CAP_NET_ADMIN for links, routes,
  neighbours, FDB, TUN and iptables/nftables), read from the process's effective set, so that
  a daemon started as an ordinary user stops with a message before it takes a lease or writes
  subnet.env, not afterwards on its first iptables call.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "overlayd.lock"
MAX_PID_BYTES = 32

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAPABILITY_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_NET_RAW: "CAP_NET_RAW"}


class PreflightError(RuntimeError):
    """overlayd must not start; the message says why and what to do."""


@dataclass
class HostLock:
    """The per-host daemon lock; `acquire()` or PreflightError naming the holder's PID."""

    path: Path
    _fd: int | None = None

    @classmethod
    def for_subnet_file(cls, subnet_file: Path) -> HostLock:
        return cls(subnet_file.parent / LOCK_NAME)

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a symlink planted at the lock's name is refused, never followed.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise PreflightError(
                f"cannot open the lock file {self.path}: {e.strerror}; overlayd needs to write "
                f"in {self.path.parent} (run it as root, or give --subnet-file a directory "
                "it may write)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise PreflightError(f"cannot lock {self.path}: {e.strerror}") from None
            who = f"PID {holder}" if holder is not None else "a process that wrote no PID"
            raise PreflightError(
                f"another overlayd ({who}) is running on this host: it holds {self.path}. "
                "Two daemons would renew one lease and fight over the same devices; stop the "
                "other one first (systemctl stop overlayd, or kill that PID)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    """The holder's PID from the lock file, or None when it holds anything else."""
    try:
        raw = os.pread(fd, MAX_PID_BYTES, 0)
    except OSError:
        return None
    text = raw.decode("ascii", "replace").strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return None
    return int(text)


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    """The CapEff bit mask of this process (0 when it cannot be read)."""
    try:
        with open(status_path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split(":", 1)[1].strip(), 16)
    except (OSError, ValueError):
        pass
    return 0


def missing_privileges(needs_net_admin: bool, capabilities: int | None = None) -> list[str]:
    """The capabilities overlayd needs and lacks, by name (empty: all there)."""
    caps = effective_capabilities() if capabilities is None else capabilities
    wanted = [CAP_NET_ADMIN] if needs_net_admin else []
    return [CAPABILITY_NAMES[c] for c in wanted if not caps & (1 << c)]


def needs_net_admin(backend_type: str, ip_masq: bool, forward_rules: bool, blackhole: bool) -> bool:
    """Whether the data path and the traffic rules need CAP_NET_ADMIN: every backend but alloc
    makes devices or routes, and any iptables/nftables rule or route needs it too."""
    return backend_type.lower() != "alloc" or ip_masq or forward_rules or blackhole


def privilege_problem(
    backend_type: str, ip_masq: bool, forward_rules: bool, blackhole: bool,
    capabilities: int | None = None,
) -> str | None:  # fmt: skip
    """A message for a daemon that lacks what it needs, or None."""
    need = needs_net_admin(backend_type, ip_masq, forward_rules, blackhole)
    missing = missing_privileges(need, capabilities)
    if not missing:
        return None
    uses = [f"backend {backend_type}"] if backend_type.lower() != "alloc" else []
    uses += [flag for flag, on in (("--ip-masq", ip_masq), ("--iptables-forward-rules",
             forward_rules), ("--ip-blackhole-route", blackhole)) if on]  # fmt: skip
    return (
        f"overlayd lacks {', '.join(missing)} (running as uid {os.geteuid()}), which "
        f"{' and '.join(uses)} need{'s' if len(uses) == 1 else ''}; nothing was changed and no "
        "lease was taken. Run it as root, or under systemd with overlayd.service "
        "(AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW)"
    )
