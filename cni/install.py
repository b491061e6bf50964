"""`overlayctl install-cni`: put the flannel CNI plugin and a default conflist in place.

The plugin is a copy of cni/flannel.py whose interpreter line names a real interpreter (an ELF
binary, never a pyenv shim or other script: the plugin is exec'd once per container). The
conflist is the one Kubernetes users know from flannel's kube-flannel.yml; a conflist the user
changed since we wrote it is left alone (we keep the checksum of what we wrote) unless --force.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PLUGIN_NAME = "flannel"
CONFLIST_NAME = "10-flannel.conflist"
DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
INTERPRETER_FLAGS = "-IS"  # isolated mode, no site: starts in a few ms, ignores PYTHON* env


class InstallError(Exception):
    """Installation cannot go on; the message says what to do."""


@dataclass(frozen=True)
class InstallResult:
    plugin: Path
    interpreter: str
    conflist: Path
    conflist_written: bool
    conflist_note: str  # what happened to the conflist, in words


def default_conflist() -> str:
    conf = {
        "name": "cbr0",
        "cniVersion": "1.0.0",
        "plugins": [
            {
                "type": "flannel",
                "delegate": {"hairpinMode": True, "isDefaultGateway": True},
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    return json.dumps(conf, indent=2) + "\n"


def is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def find_interpreter(candidates: list[str] | None = None) -> str:
    """A real Python >= 3.9 interpreter binary for the plugin's interpreter line.

    /usr/bin/python3 is kept as it is when it leads to an ELF binary (so a Debian upgrade of
    python3 keeps the plugin working); otherwise this interpreter, resolved (a venv's python is
    a symlink). A script (pyenv shim) is never used.
    """
    if candidates is None:
        candidates = ["/usr/bin/python3", os.path.realpath(sys.executable)]
    tried = []
    for candidate in candidates:
        if not candidate:
            continue
        real = os.path.realpath(candidate)
        if os.access(real, os.X_OK) and is_elf(real):
            return candidate
        tried.append(f"{candidate} -> {real}")
    raise InstallError(
        "no Python interpreter binary found for the plugin's interpreter line (tried: "
        + "; ".join(tried)
        + "): install python3 (e.g. apt-get install python3); a pyenv shim will not do"
    )


def plugin_source() -> str:
    return (Path(__file__).parent / "flannel.py").read_text(encoding="utf-8")


def plugin_text(interpreter: str) -> str:
    """cni/flannel.py with its first line pointing at `interpreter`."""
    source = plugin_source()
    if source.startswith("#!"):
        source = source.split("\n", 1)[1]
    return f"#!{interpreter} {INTERPRETER_FLAGS}\n{source}"


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)  # a running exec of the old plugin keeps its old inode
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def checksum_path(conflist: Path) -> Path:
    """Where we keep the checksum of the conflist we wrote (not a *.conf/*.json: never loaded)."""
    return conflist.with_name(f".{conflist.name}.overlay-sha256")


def install_cni(
    bin_dir: str | os.PathLike[str] = DEFAULT_BIN_DIR,
    conf_dir: str | os.PathLike[str] = DEFAULT_CONF_DIR,
    force: bool = False,
    interpreter: str | None = None,
) -> InstallResult:
    """Install the plugin into `bin_dir` and the default conflist into `conf_dir`."""
    bins = Path(bin_dir)
    confs = Path(conf_dir)
    interp = find_interpreter([interpreter]) if interpreter else find_interpreter()
    try:
        bins.mkdir(parents=True, exist_ok=True)
        confs.mkdir(parents=True, exist_ok=True)
        plugin = bins / PLUGIN_NAME
        _write_atomic(plugin, plugin_text(interp), 0o755)

        conflist = confs / CONFLIST_NAME
        want = default_conflist()
        sums = checksum_path(conflist)
        recorded = sums.read_text(encoding="utf-8").strip() if sums.exists() else ""
        if not conflist.exists():
            write, note = True, "written"
        else:
            have = conflist.read_text(encoding="utf-8", errors="replace")
            if have == want:
                write, note = True, "unchanged"
            elif force:
                write, note = True, "overwritten (--force)"
            elif recorded and _sha256(have) == recorded:
                write, note = True, "updated (it was ours and unchanged)"
            else:
                write = False
                note = (
                    f"kept: {conflist} was changed since overlay wrote it (or not written by "
                    "overlay); review it, or run install-cni --force to replace it"
                )
        if write:
            if note != "unchanged":
                _write_atomic(conflist, want, 0o644)
            _write_atomic(sums, _sha256(want) + "\n", 0o644)
    except OSError as e:
        raise InstallError(f"cannot install the CNI plugin: {e}") from e
    return InstallResult(plugin, interp, conflist, write, note)


def _run(args: argparse.Namespace) -> int:
    try:
        result = install_cni(args.bin_dir, args.conf_dir, args.force)
    except InstallError as e:
        print(f"install-cni: {e}", file=sys.stderr)
        return 1
    print(f"install-cni: plugin {result.plugin} (interpreter {result.interpreter})")
    print(f"install-cni: conflist {result.conflist}: {result.conflist_note}")
    if not (result.plugin.parent / "bridge").exists():
        print(
            f"install-cni: note: no 'bridge' plugin in {result.plugin.parent}; make sure the "
            "reference CNI plugins (bridge, host-local, portmap) are in the runtime's CNI path",
            file=sys.stderr,
        )
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `install-cni` subcommand to overlayctl."""
    parser = subparsers.add_parser(
        "install-cni",
        help="install the flannel CNI plugin and a default conflist",
        description=(
            "Install the flannel CNI plugin (a copy of cni/flannel.py run by a real Python "
            "interpreter binary) into --bin-dir and a default 10-flannel.conflist into "
            "--conf-dir. A conflist changed since overlay wrote it is kept unless --force."
        ),
    )
    parser.add_argument("--bin-dir", default=DEFAULT_BIN_DIR, help="CNI plugin dir (%(default)s)")
    parser.add_argument("--conf-dir", default=DEFAULT_CONF_DIR, help="CNI config dir (%(default)s)")
    parser.add_argument(
        "--force", action="store_true", help="overwrite a conflist the user changed"
    )
    func: Callable[[argparse.Namespace], int] = _run
    parser.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cni.install")
    sub = parser.add_subparsers(required=True)
    register(sub)
    args = parser.parse_args(["install-cni", *(argv if argv is not None else sys.argv[1:])])
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
