"""Small asyncio helpers around iproute2 for the lab: run commands, in a namespace or not.

Every command has a time limit; a failing command raises `CommandError` with the command line,
exit code and stderr, so a lab that cannot be built says exactly which step failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], code: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.code = code
        self.stderr = stderr
        what = "timed out" if code is None else f"exited with {code}"
        super().__init__(f"`{' '.join(argv)}` {what}: {stderr.strip()[:500]}")


def in_ns(ns: str | None, argv: Sequence[str]) -> list[str]:
    """`argv` prefixed with `ip netns exec NS` (or unchanged for the root namespace)."""
    return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)


async def run(
    *argv: str,
    ns: str | None = None,
    limit: float = 15.0,
    check: bool = True,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run a command (inside namespace `ns` if given); return its stdout as text."""
    full = in_ns(ns, argv)
    proc = await asyncio.create_subprocess_exec(
        *full,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), limit)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise CommandError(full, None, f"no answer within {limit}s") from None
    if check and proc.returncode != 0:
        raise CommandError(full, proc.returncode, err.decode(errors="replace"))
    return out.decode(errors="replace")


async def ip_json(*argv: str, ns: str | None = None) -> list[dict[str, Any]]:
    """`ip -j ARGV` parsed (an empty output is an empty list)."""
    out = await run("ip", "-j", *argv, ns=ns)
    if not out.strip():
        return []
    doc = json.loads(out)
    return doc if isinstance(doc, list) else []


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def list_netns(prefix: str) -> list[str]:
    """Named network namespaces whose name starts with `prefix`."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


async def add_netns(name: str) -> None:
    await run("ip", "netns", "add", name)
    await run("ip", "link", "set", "lo", "up", ns=name)


async def netns_pids(name: str) -> list[int]:
    if not netns_exists(name):
        return []
    out = await run("ip", "netns", "pids", name, check=False)
    return [int(p) for p in out.split() if p.isdigit()]


async def delete_netns(name: str) -> None:
    """Kill every process left in the namespace, then delete it. Missing is fine."""
    for pid in await netns_pids(name):
        kill_pid(pid, signal.SIGKILL)
    if netns_exists(name):
        await run("ip", "netns", "delete", name, check=False)


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie child of ours is reaped and counts as gone)."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child started with start_new_session=True, its whole group, and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def kill_pid(pid: int, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


async def wait_pid_gone(pid: int, limit: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline:
        if not pid_alive(pid):
            return True
        await asyncio.sleep(0.05)
    return not pid_alive(pid)


async def stop_pid(pid: int, limit: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after `limit` seconds."""
    if not pid_alive(pid):
        return
    kill_pid(pid, signal.SIGTERM)
    if not await wait_pid_gone(pid, limit):
        kill_pid(pid, signal.SIGKILL)
        await wait_pid_gone(pid, 5.0)


def pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
