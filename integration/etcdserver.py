"""Start and stop a real local etcd server (Debian's etcd-server) for tests and the lab.

The server listens on 127.0.0.1 (or a given address) on free ports, keeps its data in a
directory of its own, and is killed with its data removed by `stop()`. `restart()` keeps the
data, so a watch can be tested across a server restart.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from integration.netns import in_ns, kill_group

ETCD_BINARY = "etcd"


class EtcdNotFound(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _url_host(host: str) -> str:
    """`host` as a URL spells it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


@dataclass
class TLSFiles:
    """Server TLS: certificate, key, and the CA that signs client certificates."""

    cert: Path
    key: Path
    ca: Path


@dataclass
class EtcdServer:
    host: str = "127.0.0.1"
    data_dir: Path | None = None
    tls: TLSFiles | None = None
    auto_compaction: str | None = None
    log_path: Path | None = None
    client_port: int = 0
    peer_port: int = 0
    name: str = "overlay-test"
    initial_cluster: str | None = None
    """For a member of a multi-member cluster: `name1=http://h:p1,name2=...` (peer URLs)."""
    netns: str | None = None
    """Run etcd inside this network namespace (`host` must then be reachable from ours)."""
    listen_host: str | None = None
    """Listen for clients on this address instead of `host` (e.g. 0.0.0.0 inside a namespace,
    to serve on addresses added later)."""
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _own_dir: bool = field(default=False, init=False)
    _log_path: Path = field(default=Path("/dev/null"), init=False)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{_url_host(self.host)}:{self.client_port}"

    @property
    def listen_url(self) -> str:
        if self.listen_host is None:
            return self.endpoint
        return f"{self.scheme}://{_url_host(self.listen_host)}:{self.client_port}"

    def start(self, timeout: float = 20.0, wait: bool = True) -> EtcdServer:
        """Start the server; with `wait`, return once it is healthy. A cluster member is healthy
        only with a quorum: start every member with wait=False, then `wait_ready()` each."""
        if shutil.which(ETCD_BINARY) is None:
            raise EtcdNotFound(
                "etcd is not installed: run `apt-get install etcd-server etcd-client` "
                "(or scripts/bootstrap.sh)"
            )
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="overlay-etcd-"))
            self._own_dir = True
        if not self.client_port:
            self.client_port = free_port(self.host)
        if not self.peer_port:
            self.peer_port = free_port(self.host)
        peer = f"http://{_url_host(self.host)}:{self.peer_port}"
        args = [
            ETCD_BINARY,
            "--name", self.name,
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", self.listen_url,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer}",
            "--log-level", "warn",
            "--logger", "zap",
        ]  # fmt: skip
        if self.tls:
            args += [
                "--cert-file", str(self.tls.cert),
                "--key-file", str(self.tls.key),
                "--trusted-ca-file", str(self.tls.ca),
                "--client-cert-auth",
            ]  # fmt: skip
        if self.auto_compaction:
            args += ["--auto-compaction-mode", "revision", "--auto-compaction-retention",
                     self.auto_compaction]  # fmt: skip
        log_path = self.log_path or (self.data_dir / "etcd.log")
        log = open(log_path, "ab")  # handed to the child, closed below
        self.proc = subprocess.Popen(
            in_ns(self.netns, args), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        self._log_path = log_path
        if wait:
            self._wait_ready(timeout, log_path)
        return self

    def wait_ready(self, timeout: float = 20.0) -> EtcdServer:
        self._wait_ready(timeout, self._log_path)
        return self

    def _wait_ready(self, timeout: float, log_path: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{tail}")
            if self._port_open() and self._healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"etcd did not become ready on {self.endpoint} within {timeout}s")

    def _port_open(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection((self.host, self.client_port), timeout=0.2),
        ):
            return True
        return False

    def _healthy(self) -> bool:
        context = None
        if self.tls:
            # The port opens before etcd serves TLS: ask /health over TLS, presenting the
            # server's own certificate as the client certificate (signed by the trusted CA).
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.cert), str(self.tls.key))
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1, context=context) as r:
                return b"true" in r.read()
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """Stop the process (SIGKILL) but keep the data directory, for restart()."""
        if self.proc is not None:
            kill_group(self.proc)
        self.proc = None

    def restart(self, timeout: float = 20.0) -> EtcdServer:
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        """Kill the server and remove its data directory if we made it."""
        self.kill()
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None
            self._own_dir = False

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
