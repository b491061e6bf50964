"""`overlayctl install-cni`: put the flannel CNI plugin and a default conflist in place.

The plugin is exec'd once per container, so it is installed to start fast:
  <bin-dir>/flannel                        a launcher of a few lines, `#!<interpreter> -IS`;
  <bin-dir>/.flannel/<id>/flannel.py       a copy of cni/flannel.py (the one source file);
  <bin-dir>/.flannel/<id>/__pycache__/     its bytecode, compiled at install time by the very
                                           interpreter the launcher names.
A script run directly is compiled on every exec (~4-6 ms here); a module the launcher imports
is loaded from its cached bytecode. The installer checks that the interpreter really loads the
module from that bytecode before it swaps the launcher in. The interpreter is a real one (an ELF
binary, never a pyenv shim or other script). A re-install writes a new <id> dir, then replaces
the launcher atomically (rename), so an exec sees either the old pair or the new one; the
previous dir is kept for execs already under way, older ones are removed.

The conflist is the one Kubernetes users know from flannel's kube-flannel.yml; a conflist the
user changed since we wrote it is left alone (we keep the checksum of what we wrote) unless
--force.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PLUGIN_NAME = "flannel"
CONFLIST_NAME = "10-flannel.conflist"
DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
INTERPRETER_FLAGS = "-IS"  # isolated mode, no site: starts in a few ms, ignores PYTHON* env
MODULE_DIR = ".flannel"  # <bin-dir>/.flannel/<id>/flannel.py: the plugin's code
MODULE_NAME = "flannel"
CHECK_TIMEOUT = 30.0  # seconds for the install-time compile and check runs
ERR_BROKEN_INSTALL = 104  # the launcher cannot import the plugin's code


class InstallError(Exception):
    """Installation cannot go on; the message says what to do."""


@dataclass(frozen=True)
class InstallResult:
    plugin: Path  # the launcher the runtime execs
    interpreter: str
    module: Path  # the plugin's code: <bin-dir>/.flannel/<id>/flannel.py
    bytecode: Path  # its cached bytecode, checked to be what the interpreter loads
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
    """cni/flannel.py with its first line pointing at `interpreter`: the plugin as one file.

    This works, but is compiled on every exec; install_plugin() installs the faster launcher.
    """
    source = plugin_source()
    if source.startswith("#!"):
        source = source.split("\n", 1)[1]
    return f"#!{interpreter} {INTERPRETER_FLAGS}\n{source}"


def launcher_text(interpreter: str, module_id: str) -> str:
    """The launcher: imports the plugin from <its own dir>/.flannel/<module_id>/ and runs it.

    The dir is found next to the path the launcher was exec'd by (no `os` import: ~0.7 ms), or
    next to its real path (a symlink to it works). When the code is missing, the runtime gets
    a CNI error (code 104) saying to reinstall.
    """
    if not module_id or not all(c.isalnum() or c == "-" for c in module_id):
        raise ValueError(f"bad module id {module_id!r}")
    return f"""#!{interpreter} {INTERPRETER_FLAGS}
# The flannel CNI plugin (overlay), installed by `overlayctl install-cni`: its code is
# {MODULE_DIR}/{module_id}/{MODULE_NAME}.py next to this file, loaded from the bytecode compiled
# at install time. Reinstall rather than edit.
import sys

sys.path.insert(0, (__file__.rpartition("/")[0] or ".") + "/{MODULE_DIR}/{module_id}")
try:
    from {MODULE_NAME} import main
except ImportError:
    import os  # exec'd through a symlink? look next to the real file

    here = os.path.dirname(os.path.realpath(__file__))
    sys.path[0] = os.path.join(here, "{MODULE_DIR}", "{module_id}")
    try:
        from {MODULE_NAME} import main
    except ImportError as e:
        from _json import encode_basestring_ascii as quote

        msg = f"the flannel plugin's code is missing ({{e}}): run overlayctl install-cni again"
        sys.stdout.write(f'{{{{"cniVersion":"1.0.0","code":{ERR_BROKEN_INSTALL},"msg":{{quote(msg)}}}}}}')
        sys.exit(1)
sys.exit(main())
"""


def launcher_module_id(text: str) -> str | None:
    """The module id an installed launcher names (None: not one of our launchers)."""
    needle = f"/{MODULE_DIR}/"
    for line in text.splitlines():
        if line.startswith("sys.path.insert(0, ") and needle in line:
            return line.split(needle, 1)[1].split('"', 1)[0] or None
    return None


# Run by the target interpreter: byte-compile the module (timestamp-checked .pyc, whatever
# SOURCE_DATE_EPOCH says) into the cache path that interpreter looks in; print that path.
_COMPILE = (
    "import py_compile, sys\n"
    "print(py_compile.compile(sys.argv[1], doraise=True,"
    " invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP))\n"
)


def _run_check(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> tuple[str, str]:
    try:
        proc = subprocess.run(
            argv, input=stdin, env=env, capture_output=True, timeout=CHECK_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InstallError(f"cannot run {' '.join(argv)}: {e}") from e
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise InstallError(
            f"{' '.join(argv)} failed with exit status {proc.returncode}: {(out + err)[-800:]}"
        )
    return out, err


def compile_module(interpreter: str, module: Path) -> Path:
    """Byte-compile `module` with `interpreter` itself (its magic number and cache tag)."""
    out, _ = _run_check([interpreter, "-IS", "-c", _COMPILE, str(module)], env={})
    bytecode = Path(out.strip())
    cache = module.parent / "__pycache__"
    if not out.strip() or not bytecode.is_file() or bytecode.parent != cache:
        raise InstallError(f"{interpreter} did not byte-compile {module} (it said {out!r})")
    return bytecode


def check_launcher(interpreter: str, launcher: Path, bytecode: Path) -> None:
    """Run `launcher` as the runtime would (VERSION) and check the code came from `bytecode`.

    `python -v` reports "code object from '<pyc>'" only when the import used the cached
    bytecode; a stale or foreign .pyc would be reported as such and compiled from source.
    """
    out, err = _run_check(
        [interpreter, INTERPRETER_FLAGS, "-B", "-v", str(launcher)],  # -B: look, do not write
        env={"CNI_COMMAND": "VERSION"},
        stdin=b'{"cniVersion":"1.0.0"}',
    )
    try:
        versions = json.loads(out)["supportedVersions"]
    except (ValueError, KeyError, TypeError):
        versions = None
    if not isinstance(versions, list) or not versions:
        raise InstallError(f"the installed plugin {launcher} answered VERSION with {out!r}")
    if f"# code object from '{bytecode}'" not in err:
        why = [line for line in err.splitlines() if MODULE_NAME in line and "#" in line]
        raise InstallError(
            f"{interpreter} does not load the plugin from its bytecode {bytecode} "
            f"({'; '.join(why[:3]) or 'no import of it seen'}); check that the interpreter and "
            "the bin dir are usable, then run install-cni again"
        )


def install_plugin(
    bin_dir: Path, interpreter: str, source: str | None = None
) -> tuple[Path, Path, Path]:
    """Install launcher + module + bytecode into `bin_dir`; (launcher, module, bytecode).

    `source` is the plugin's code (default: cni/flannel.py; bench/bench_cni.py installs an
    older revision beside it). Raises InstallError (nothing swapped in) when the interpreter
    cannot compile or load it.
    """
    if source is None:
        source = plugin_source()  # as it is: line numbers in tracebacks match cni/flannel.py
    digest = hashlib.sha256(f"{interpreter}\n{source}".encode()).hexdigest()[:12]
    module_id = f"{digest}-{uuid.uuid4().hex[:8]}"
    modules = bin_dir / MODULE_DIR
    modules.mkdir(mode=0o755, exist_ok=True)
    home = modules / module_id
    home.mkdir(mode=0o755)
    launcher = bin_dir / PLUGIN_NAME
    tmp = bin_dir / f".{PLUGIN_NAME}.tmp-{os.getpid()}"
    try:
        module = home / f"{MODULE_NAME}.py"
        _write_atomic(module, source, 0o644)
        bytecode = compile_module(interpreter, module)
        os.chmod(bytecode, 0o644)
        os.chmod(bytecode.parent, 0o755)
        _write_file(tmp, launcher_text(interpreter, module_id), 0o755)
        check_launcher(interpreter, tmp, bytecode)
        previous = None
        try:
            previous = launcher_module_id(launcher.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            pass
        os.replace(tmp, launcher)  # a running exec of the old launcher keeps its old inode
    except BaseException:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(home, ignore_errors=True)
        raise
    # Keep the dir the old launcher named (an exec of it may be importing right now).
    for entry in modules.iterdir():
        if entry.name not in (module_id, previous):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return launcher, module, bytecode


def _write_file(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, text, mode)
        os.replace(tmp, path)
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
        plugin, module, bytecode = install_plugin(bins, interp)

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
    return InstallResult(plugin, interp, module, bytecode, conflist, write, note)


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
            "Install the flannel CNI plugin into --bin-dir (a small launcher run by a real "
            "Python interpreter binary, and cni/flannel.py byte-compiled in --bin-dir/.flannel/) "
            "and a default 10-flannel.conflist into --conf-dir. A conflist changed since "
            "overlay wrote it is kept unless --force."
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
