"""`overlayctl install-systemd`: overlayd.service, its environment file and its documentation.

    overlayctl install-systemd [--prefix /] [--force] [--env KEY=VALUE ...] [--overlayd PATH]

Writes, under --prefix (default /, a DESTDIR for packaging and tests):
- etc/systemd/system/overlayd.service (0644): UNIT_TEMPLATE with ExecStart= the overlayd of
  this installation (the one next to the running interpreter, e.g. /opt/overlay/bin/overlayd);
- etc/default/overlayd: ENV_TEMPLATE with each --env KEY=VALUE put in (replacing the key's
  line, commented or not); mode 0600 when it holds a password, else 0644;
- usr/share/doc/overlay/overlayd.txt (0644): `overlayd --help`, which the unit's
  Documentation= names, so `systemctl help overlayd` shows something that is installed.

A file that exists with other content than what would be written is left alone and reported
(exit 1) unless --force; the same content is "unchanged" (its mode is corrected). Files are
written atomically (a temp file renamed over the old one; a symlink there is replaced, never
followed). With --prefix / on a host where systemd runs: `systemctl daemon-reload`.

systemd/overlayd.service and systemd/overlayd.env.example in the source tree are these
templates rendered for /usr/local/bin/overlayd (a test keeps them the same).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overlay.options import DAEMON_FLAGS, ETCD_FLAGS, Flag, FlagValueError, build_parser

log = logging.getLogger("overlayctl")

UNIT_PATH = "etc/systemd/system/overlayd.service"
ENV_PATH = "etc/default/overlayd"
DOC_PATH = "usr/share/doc/overlay/overlayd.txt"
DEFAULT_OVERLAYD = "/usr/local/bin/overlayd"
SECRET_KEYS = ("FLANNELD_ETCD_PASSWORD", "FLANNELD_MQTT_PASSWORD")
MAX_VALUE = 4096

UNIT_TEMPLATE = """\
# overlayd: one per host. Installed by `overlayctl install-systemd` (docs/daemon.md).
[Unit]
Description=overlay network daemon (flannel-compatible subnet leases, VXLAN/UDP data path)
Documentation=file:///{doc_path}
Wants=network-online.target
After=network-online.target
# etcd on the same host is optional; order after it when it is there.
After=etcd.service

[Service]
# overlayd sends READY=1 over $NOTIFY_SOCKET once subnet.env and the data path are in place.
Type=notify
NotifyAccess=main
# FLANNELD_* variables (every flag has one): secrets such as FLANNELD_ETCD_PASSWORD belong
# there (mode 0600), never on ExecStart, where every user sees them.
EnvironmentFile=-/{env_path}
ExecStart={exec_start}
# SIGTERM stops the daemon but leaves devices, routes and iptables rules in place, so a
# restart does not cut traffic.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=20
Restart=always
RestartSec=5
# Waiting for the network config or for etcd can take a while; overlayd retries on its own.
TimeoutStartSec=infinity
LimitNOFILE=65536

# Hardening: root, but only the capabilities the data path needs.
# CAP_NET_ADMIN: links (flannel.N, flannel0), addresses, routes, neighbours, FDB entries, the
#   TUN device of the udp backend, iptables/nftables rules, net sysctls of our devices.
# CAP_NET_RAW: iptables in legacy mode talks to the kernel over a raw socket (iptables-nft
#   and nft need only CAP_NET_ADMIN).
# Nothing else: no CAP_SYS_ADMIN (no namespaces, no mounts), no CAP_NET_BIND_SERVICE (the
# health port is above 1024), no CAP_DAC_OVERRIDE (it writes only its own files).
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW
NoNewPrivileges=yes
# The file system read-only but for subnet.env's directory (and the lock beside it), the
# iptables lock, and the CNI state the flannel plugin keeps.
ProtectSystem=strict
RuntimeDirectory=flannel
RuntimeDirectoryPreserve=yes
RuntimeDirectoryMode=0755
# iptables in legacy mode takes /run/xtables.lock: made beforehand, outside the sandbox ("+"),
# so that it exists to be made writable (a missing path cannot be).
ExecStartPre=+/usr/bin/touch /run/xtables.lock
ReadWritePaths=/run/flannel /run/xtables.lock -/var/lib/cni -/etc/cni/net.d
ProtectHome=yes
PrivateTmp=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# No PrivateDevices: the udp backend opens /dev/net/tun, the one device allowed beside the
# standard pseudo devices (ProtectClock adds an allow-list, which would otherwise shut it out).
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw
# No ProtectKernelTunables: the udp backend turns IPv6 off on flannel0 through /proc/sys/net.
# AF_NETLINK: links, routes, FDB, nftables. AF_INET/AF_INET6: etcd, MQTT, the health server,
# the udp data path. AF_UNIX: sd_notify. AF_PACKET: raw frames; overlayd itself opens none
# today, it is kept for the encapsulation probes of issue 12 (doctor, trace).
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
UMask=0022

[Install]
WantedBy=multi-user.target
"""

ENV_TEMPLATE = """\
# /etc/default/overlayd: environment for overlayd.service (systemd EnvironmentFile syntax).
# Every overlayd flag has a FLANNELD_<FLAG> variable; the command line wins over these.
# `overlayd --help` lists them all with their defaults. Secrets (FLANNELD_ETCD_PASSWORD,
# FLANNELD_MQTT_PASSWORD) belong here, in a file of mode 0600, never on the command line.

# etcd (comma-separated URLs, tried in order)
FLANNELD_ETCD_ENDPOINTS=http://127.0.0.1:2379
FLANNELD_ETCD_PREFIX=/coreos.com/network
#FLANNELD_ETCD_CAFILE=/etc/overlay/etcd-ca.pem
#FLANNELD_ETCD_CERTFILE=/etc/overlay/etcd-client.pem
#FLANNELD_ETCD_KEYFILE=/etc/overlay/etcd-client-key.pem
#FLANNELD_ETCD_USERNAME=overlay
#FLANNELD_ETCD_PASSWORD=secret

# The interface that carries traffic between hosts (default: the default route's interface).
# FLANNELD_IFACE takes a comma-separated list of names or IPv4 addresses.
#FLANNELD_IFACE=eth1
#FLANNELD_IFACE_REGEX=^en
#FLANNELD_IFACE_CAN_REACH=192.168.1.1
#FLANNELD_PUBLIC_IP=203.0.113.10

FLANNELD_SUBNET_FILE=/run/flannel/subnet.env
#FLANNELD_SUBNET_LEASE_RENEW_MARGIN=60
FLANNELD_IP_MASQ=true
#FLANNELD_IPTABLES_RESYNC=5

# Health and metrics (port 0 = off).
FLANNELD_HEALTHZ_IP=127.0.0.1
FLANNELD_HEALTHZ_PORT=8471
FLANNELD_METRICS=true

# MQTT events (off unless a broker is given): HOST:PORT, mqtt://HOST or mqtts://USER@HOST.
#FLANNELD_MQTT_BROKER=mqtts://overlay@mq.example:8883
#FLANNELD_MQTT_PASSWORD=secret
#FLANNELD_MQTT_CAFILE=/etc/overlay/mqtt-ca.pem
#FLANNELD_MQTT_CERTFILE=/etc/overlay/mqtt-client.pem
#FLANNELD_MQTT_KEYFILE=/etc/overlay/mqtt-client-key.pem
#FLANNELD_MQTT_TOPIC_PREFIX=overlay

#FLANNELD_LOG_LEVEL=info
#FLANNELD_RESYNC_PERIOD=60
"""

_SAFE_EXEC = re.compile(r"/[A-Za-z0-9_./+-]{1,4095}")
# What systemd's EnvironmentFile parser would take for quoting or escaping, or end a line.
_ENV_SPECIAL = set("\"'\\`$\n\r\x00")


class InstallError(Exception):
    """Bad input (exit 2) or a refused/failed write (exit 1); the message says what to do."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Outcome:
    path: Path
    status: str  # "written", "unchanged", "replaced", "refused"
    mode: int
    detail: str = ""


def render_unit(exec_start: str) -> str:
    return UNIT_TEMPLATE.format(doc_path=DOC_PATH, env_path=ENV_PATH, exec_start=exec_start)


def _known_flags() -> dict[str, Flag]:
    return {f.env: f for f in ETCD_FLAGS + DAEMON_FLAGS}


def parse_env_setting(text: str, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """`KEY=VALUE` for the environment file: a known FLANNELD_* key, a value its flag accepts
    and that systemd reads back as written; InstallError(code 2) saying why not. `KEY` alone
    takes the value of that variable from `environ` (this process's environment): the way to
    hand over a password without putting it on a command line."""
    key, sep, value = text.partition("=")
    flags = _known_flags()
    env = os.environ if environ is None else environ
    if not sep and key in flags:
        if key not in env:
            raise InstallError(
                f"--env {key}: without =VALUE the value comes from the environment variable "
                f"{key}, which is not set",
                2,
            )
        value, sep = env[key], "="
    if not sep or key not in flags:
        import difflib

        close = difflib.get_close_matches(key[:64], list(flags), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise InstallError(
            f"--env {text[:80]!r}: expected FLANNELD_NAME=VALUE with a known name{hint}; "
            "`overlayd --help` lists them",
            2,
        )
    if len(value) > MAX_VALUE:
        raise InstallError(f"--env {key}: the value is longer than {MAX_VALUE} characters", 2)
    if _ENV_SPECIAL & set(value) or value != value.strip() or not value.isprintable():
        raise InstallError(
            f"--env {key}: the value holds a quote, backslash, $, backtick, control character "
            "or surrounding space, which systemd's EnvironmentFile would read differently; "
            f"write that line into /{ENV_PATH} by hand (double-quoted, \\-escaped)",
            2,
        )
    flag = flags[key]
    try:
        if flag.repeat and flag.env_split:
            for item in value.split(","):
                if item.strip():
                    flag.parse(item)
        else:
            flag.parse(value)
    except FlagValueError as e:
        raise InstallError(f"--env {key}: {e}", 2) from None
    return key, value


def render_env(settings: Sequence[tuple[str, str]]) -> str:
    """ENV_TEMPLATE with each KEY=VALUE replacing the key's line (commented or not), or
    appended; a key given twice: the last wins."""
    lines = ENV_TEMPLATE.splitlines()
    appended: list[str] = []
    for key, value in settings:
        pattern = re.compile(rf"#?{re.escape(key)}=.*")
        hits = [i for i, line in enumerate(lines) if pattern.fullmatch(line)]
        new = f"{key}={value}"
        if hits:
            lines[hits[0]] = new
            for i in reversed(hits[1:]):
                del lines[i]
        else:
            appended = [x for x in appended if not x.startswith(f"{key}=")] + [new]
    if appended:
        lines += ["", "# given to overlayctl install-systemd --env", *appended]
    return "\n".join(lines) + "\n"


def holds_secret(env_text: str) -> bool:
    for line in env_text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in SECRET_KEYS and value.strip():
            return True
    return False


def help_text(exec_start: str) -> str:
    parser = build_parser()
    return (
        f"overlayd ({exec_start}), run by overlayd.service; its settings are in /{ENV_PATH}.\n"
        "Install, secrets, MQTT over TLS and switching backends: docs/daemon.md in the source.\n\n"
        + parser.format_help()
    )


def default_overlayd() -> str:
    """The overlayd of this installation: beside the running interpreter (a venv's bin), else
    the one on PATH, else /usr/local/bin/overlayd."""
    beside = Path(sys.executable).parent / "overlayd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("overlayd") or DEFAULT_OVERLAYD


def _write(path: Path, text: str, mode: int, force: bool) -> Outcome:
    data = text.encode()
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise InstallError(f"cannot look at {path}: {e.strerror}") from None
    status = "written"
    if st is not None:
        import stat

        if stat.S_ISDIR(st.st_mode):
            raise InstallError(f"{path} is a directory; move it away")
        current = None
        if stat.S_ISREG(st.st_mode):
            with contextlib.suppress(OSError):
                current = path.read_bytes() if st.st_size <= len(data) + 1 else b""
        if current == data:
            if stat.S_IMODE(st.st_mode) != mode:
                os.chmod(path, mode)
                return Outcome(path, "unchanged", mode, f"mode set to {mode:04o}")
            return Outcome(path, "unchanged", mode)
        if not force:
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a file"
            return Outcome(path, "refused", stat.S_IMODE(st.st_mode),
                           f"{kind} with other content is there; --force replaces it")  # fmt: skip
        status = "replaced"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise InstallError(f"cannot write {path}: {e.strerror}") from None
    return Outcome(path, status, mode)


def install_systemd(
    prefix: Path,
    settings: Sequence[tuple[str, str]] = (),
    force: bool = False,
    overlayd: str | None = None,
) -> list[Outcome]:
    """Write the unit, the environment file and the help text under `prefix`."""
    if not prefix.is_absolute():
        raise InstallError(f"--prefix {str(prefix)!r} must be an absolute path", 2)
    if not prefix.is_dir():
        raise InstallError(f"--prefix {str(prefix)!r} is not a directory", 2)
    exec_start = overlayd or default_overlayd()
    if not _SAFE_EXEC.fullmatch(exec_start) or "/../" in exec_start:
        raise InstallError(
            f"--overlayd {exec_start[:80]!r}: an absolute path of letters, digits and ._+-/ "
            "(systemd would interpret spaces, quotes, % and $ in ExecStart=)",
            2,
        )
    env_text = render_env(settings)
    env_mode = 0o600 if holds_secret(env_text) else 0o644
    return [
        _write(prefix / UNIT_PATH, render_unit(exec_start), 0o644, force),
        _write(prefix / ENV_PATH, env_text, env_mode, force),
        _write(prefix / DOC_PATH, help_text(exec_start), 0o644, force),
    ]


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def cmd_install_systemd(args: argparse.Namespace) -> int:
    for item in args.env or ():
        key, sep, _ = item.partition("=")
        if sep and key in SECRET_KEYS:
            log.warning(
                "--env %s=... puts the password on this command line, where every user sees "
                "it while it runs; next time: export %s and give --env %s alone",
                key,
                key,
                key,
            )
    try:
        settings = [parse_env_setting(x) for x in args.env or ()]
        outcomes = install_systemd(Path(args.prefix), settings, args.force, args.overlayd)
    except InstallError as e:
        print(f"overlayctl install-systemd: {e}", file=sys.stderr)
        return e.code
    for o in outcomes:
        extra = f" ({o.detail})" if o.detail else ""
        print(f"{o.status:9} {o.path} (mode {o.mode:04o}){extra}")
    refused = [o for o in outcomes if o.status == "refused"]
    if refused:
        print(
            f"overlayctl install-systemd: {len(refused)} file(s) differ from what would be "
            "written and were left alone; compare them, then rerun with --force to replace",
            file=sys.stderr,
        )
        return 1
    if not any(o.status != "unchanged" for o in outcomes):
        return 0
    if Path(args.prefix).resolve() != Path("/"):
        print("not reloading systemd: --prefix is not /")
    elif not systemd_running():
        print("systemd is not running here: no daemon-reload")
    else:
        done = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip
        if done.returncode != 0:
            print(f"overlayctl install-systemd: systemctl daemon-reload failed: "
                  f"{done.stderr.strip()[:500]}", file=sys.stderr)  # fmt: skip
            return 1
        print("systemctl daemon-reload: done; start it with `systemctl enable --now overlayd`")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "install-systemd",
        help="install overlayd.service and /etc/default/overlayd",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prefix", default="/", metavar="DIR",
                   help="install under DIR instead of / (packaging, tests); default /")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="replace files that differ from what would be written")  # fmt: skip
    p.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="a FLANNELD_* setting for the environment file (repeatable); KEY "
                        "alone takes the value from the environment variable KEY (for "
                        "passwords); FLANNELD_ETCD_PASSWORD makes the file 0600")  # fmt: skip
    p.add_argument("--overlayd", metavar="PATH", default=None,
                   help="the overlayd ExecStart= runs (default: the one of this "
                        f"installation, {default_overlayd()})")  # fmt: skip
    p.set_defaults(func=cmd_install_systemd)
