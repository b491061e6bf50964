"""Throwaway network namespaces and veth pairs for kernel tests, with guaranteed cleanup.

Usage (as a fixture, so cleanup also runs when the test fails)::

    lab = pytest.fixture(netns_lab, name="lab")

    def test_x(lab):
        a, b = lab.netns("a"), lab.netns("b")
        va, vb = lab.veth(a, b, "192.168.91.1/24", "192.168.91.2/24")
        a.ip("route")                       # ip -n <a> route
        a.ip_json("neigh", "show")          # parsed `ip -j ...` output
        proc = a.popen(["tcpdump", ...])    # killed at cleanup

Names are unique per lab (a random token), at most 15 characters, so two runs never collide.
Deleting a namespace destroys the links inside it; processes started with `popen` are killed
first, because a process living in a namespace would keep it alive.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

TIMEOUT = 30.0
"""Seconds allowed for one ip(8) command."""


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = TIMEOUT) -> str:
    """Run a command, return stdout; on failure raise with the command and its stderr."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


class Netns:
    """One named network namespace (see NetnsLab.netns)."""

    def __init__(self, lab: NetnsLab, name: str) -> None:
        self.lab = lab
        self.name = name

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def exec_cmd(self, *cmd: str) -> list[str]:
        """The argv that runs `cmd` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = TIMEOUT) -> str:
        """Run a command inside the namespace; return its stdout."""
        return run(self.exec_cmd(*cmd), check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> str:
        """`ip -n <ns> ARGS`."""
        return run(["ip", "-n", self.name, *args], check=check)

    def ip_json(self, *args: str) -> Any:
        """`ip -j -n <ns> ARGS`, parsed (an empty output gives [])."""
        out = run(["ip", "-j", "-n", self.name, *args])
        return json.loads(out) if out.strip() else []

    def bridge_json(self, *args: str) -> Any:
        """`bridge -j -n <ns> ARGS`, parsed (an empty output gives [])."""
        out = run(["bridge", "-j", "-n", self.name, *args])
        return json.loads(out) if out.strip() else []

    def ifindex(self, ifname: str) -> int:
        links = self.ip_json("link", "show", "dev", ifname)
        return int(links[0]["ifindex"])

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a process inside the namespace; the lab kills it at cleanup."""
        proc = subprocess.Popen(self.exec_cmd(*cmd), **kwargs)
        self.lab.processes.append(proc)
        return proc


class NetnsLab:
    """Creates namespaces and veth pairs and removes all of them (and its processes) on close."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or uuid.uuid4().hex[:6]
        self.namespaces: list[Netns] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self._links = 0

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def netns(self, role: str) -> Netns:
        """A new namespace named `<role>-<token>` (role cut so the name fits 15 characters).

        Loopback is brought up.
        """
        name = f"{role[: 14 - len(self.token)]}-{self.token}"
        if any(ns.name == name for ns in self.namespaces):
            raise ValueError(f"namespace role {role!r} already used in this lab ({name})")
        run(["ip", "netns", "add", name])
        ns = Netns(self, name)
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def veth(
        self,
        a: Netns,
        b: Netns,
        addr_a: str | None = None,
        addr_b: str | None = None,
        *,
        mtu: int | None = None,
    ) -> tuple[str, str]:
        """A veth pair between two namespaces, up, with optional addresses (CIDR strings).

        Returns the two link names (`va<n>-<token>` in a, `vb<n>-<token>` in b).
        """
        self._links += 1
        name_a = f"va{self._links}-{self.token}"[:15]
        name_b = f"vb{self._links}-{self.token}"[:15]
        add = ["ip", "-n", a.name, "link", "add", name_a, "type", "veth"]
        run([*add, "peer", "name", name_b, "netns", b.name])
        for ns, name, addr in ((a, name_a, addr_a), (b, name_b, addr_b)):
            if mtu is not None:
                ns.ip("link", "set", name, "mtu", str(mtu))
            if addr is not None:
                ns.ip("addr", "add", addr, "dev", name)
            ns.ip("link", "set", name, "up")
        return name_a, name_b

    def close(self) -> None:
        """Kill processes, delete namespaces; keep going on errors, raise the first at the end."""
        errors: list[str] = []
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                errors.append(f"process {proc.args!r} did not exit")
        self.processes.clear()
        for ns in reversed(self.namespaces):
            done = subprocess.run(
                ["ip", "netns", "del", ns.name], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                errors.append(f"ip netns del {ns.name}: {done.stderr.strip()}")
        self.namespaces.clear()
        if errors:
            raise RuntimeError("netns cleanup failed: " + "; ".join(errors))


def netns_lab() -> Iterator[NetnsLab]:
    """For a fixture (`lab = pytest.fixture(netns_lab, name="lab")`): a lab removed at the end."""
    with NetnsLab() as lab:
        yield lab
