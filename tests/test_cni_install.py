"""`overlayctl install-cni` / cni.install: the installed plugin and the default conflist."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from cni.install import (
    CONFLIST_NAME,
    InstallError,
    check_launcher,
    find_interpreter,
    install_cni,
    is_elf,
    launcher_module_id,
    launcher_text,
    plugin_text,
    register,
)


def interpreter_facts(interpreter: str) -> tuple[bytes, str]:
    """The interpreter's own bytecode magic number and cache tag, asked of it."""
    out = subprocess.run(
        [interpreter, "-IS", "-c", PRINT_MAGIC],
        capture_output=True,
        timeout=30,
        check=True,
        text=True,
    ).stdout.split()
    return bytes.fromhex(out[0]), out[1]


PRINT_MAGIC = (
    "import importlib.util, sys\n"
    "print(importlib.util.MAGIC_NUMBER.hex(), sys.implementation.cache_tag)\n"
)


def run_version(plugin: Path) -> subprocess.CompletedProcess[bytes]:
    """Exec the plugin directly, through its interpreter line, with an empty environment."""
    return subprocess.run(
        [str(plugin)],
        input=b"{}",
        env={"CNI_COMMAND": "VERSION"},
        capture_output=True,
        timeout=30,
        check=False,
    )


def module_dirs(bin_dir: Path) -> set[str]:
    return {p.name for p in (bin_dir / ".flannel").iterdir()}


def test_installs_a_launcher_and_the_byte_compiled_plugin(tmp_path: Path) -> None:
    result = install_cni(tmp_path / "bin", tmp_path / "net.d", force=False)
    plugin = tmp_path / "bin" / "flannel"
    assert result.plugin == plugin
    assert stat.S_IMODE(plugin.stat().st_mode) == 0o755
    first = plugin.read_text().splitlines()[0]
    assert first.startswith("#!") and first.endswith(" -IS")
    interpreter = first[2:].split()[0]
    assert interpreter == result.interpreter
    assert is_elf(os.path.realpath(interpreter)), interpreter
    assert ".venv" not in interpreter and "pyenv" not in interpreter
    # The launcher is a few lines; the code is cni/flannel.py itself, in the private dir.
    assert len(plugin.read_text().splitlines()) < 25
    source = (Path(__file__).parent.parent / "cni" / "flannel.py").read_bytes()
    assert result.module.parent.parent == tmp_path / "bin" / ".flannel"
    assert result.module.read_bytes() == source
    assert stat.S_IMODE(result.module.stat().st_mode) == 0o644
    # The bytecode is the launcher's interpreter's: its cache tag and magic number.
    magic, tag = interpreter_facts(interpreter)
    assert result.bytecode == result.module.parent / "__pycache__" / f"flannel.{tag}.pyc"
    assert result.bytecode.read_bytes()[:4] == magic
    proc = run_version(plugin)
    assert proc.returncode == 0, proc
    assert "1.1.0" in json.loads(proc.stdout)["supportedVersions"]
    # The exec'd plugin's code comes from that bytecode, not from compiling the source.
    verbose = subprocess.run(
        [interpreter, "-IS", "-B", "-v", str(plugin)],
        input=b"{}",
        env={"CNI_COMMAND": "VERSION"},
        capture_output=True,
        timeout=30,
        check=True,
    ).stderr.decode()
    assert f"# code object from '{result.bytecode}'" in verbose
    assert f"# code object from {result.module}" not in verbose
    # Nothing else was left in the bin dir (no temp files).
    assert {p.name for p in (tmp_path / "bin").iterdir()} == {"flannel", ".flannel"}


def test_the_started_plugin_loads_no_heavy_modules(tmp_path: Path) -> None:
    """What keeps start-up in milliseconds: no os, json, re, typing, subprocess, enum."""
    result = install_cni(tmp_path / "bin", tmp_path / "net.d", force=False)
    conf = json.dumps(
        {"cniVersion": "1.0.0", "name": "n", "type": "flannel", "subnetFile": str(tmp_path / "no")}
    ).encode()
    calls = [
        ({"CNI_COMMAND": "VERSION"}, b"{}", 0),
        # An ADD that gets as far as reading subnet.env (missing: code 11) without root.
        (
            {
                "CNI_COMMAND": "ADD",
                "CNI_CONTAINERID": "c1",
                "CNI_IFNAME": "eth0",
                "CNI_NETNS": "/run/netns/none",
                "CNI_PATH": "/usr/lib/cni",
            },
            conf,
            1,
        ),
    ]
    for env, stdin, status in calls:
        proc = subprocess.run(
            [result.interpreter, "-IS", "-X", "importtime", str(result.plugin)],
            input=stdin,
            env=env,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == status, proc
        if status:
            assert json.loads(proc.stdout)["code"] == 11
        loaded = {
            line.rsplit("|", 1)[1].strip()
            for line in proc.stderr.decode().splitlines()
            if line.startswith("import time:") and "|" in line
        }
        assert "flannel" in loaded and "_json" in loaded, loaded
        heavy = {"os", "json", "re", "typing", "subprocess", "enum", "ipaddress", "posixpath"}
        assert not loaded & heavy, loaded & heavy


def test_a_reinstall_swaps_the_launcher_and_keeps_only_the_previous_code(tmp_path: Path) -> None:
    bins = tmp_path / "bin"
    first = install_cni(bins, tmp_path / "net.d", force=False)
    old_launcher = (bins / "flannel").stat().st_ino
    second = install_cni(bins, tmp_path / "net.d", force=False)
    assert second.module != first.module
    assert (bins / "flannel").stat().st_ino != old_launcher  # replaced by rename, not rewritten
    # The old launcher's code stays for execs already under way.
    assert module_dirs(bins) == {first.module.parent.name, second.module.parent.name}
    third = install_cni(bins, tmp_path / "net.d", force=False)
    assert module_dirs(bins) == {second.module.parent.name, third.module.parent.name}
    assert third.module.parent.name in (bins / "flannel").read_text()
    assert run_version(bins / "flannel").returncode == 0
    assert {p.name for p in bins.iterdir()} == {"flannel", ".flannel"}


def test_a_failed_install_leaves_the_working_plugin_alone(tmp_path: Path) -> None:
    bins = tmp_path / "bin"
    good = install_cni(bins, tmp_path / "net.d", force=False)
    launcher = (bins / "flannel").read_bytes()
    # /bin/true is an ELF binary, so it passes the interpreter check, but compiles nothing.
    with pytest.raises(InstallError, match="did not byte-compile"):
        install_cni(bins, tmp_path / "net.d", force=False, interpreter="/bin/true")
    assert (bins / "flannel").read_bytes() == launcher
    assert module_dirs(bins) == {good.module.parent.name}
    assert {p.name for p in bins.iterdir()} == {"flannel", ".flannel"}
    assert run_version(bins / "flannel").returncode == 0


def test_check_launcher_notices_bytecode_the_interpreter_would_not_use(tmp_path: Path) -> None:
    result = install_cni(tmp_path / "bin", tmp_path / "net.d", force=False)
    check_launcher(result.interpreter, result.plugin, result.bytecode)  # as installed: fine
    pyc = result.bytecode.read_bytes()
    st = result.module.stat()
    os.utime(result.module, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # now stale
    with pytest.raises(InstallError, match="does not load the plugin from its bytecode"):
        check_launcher(result.interpreter, result.plugin, result.bytecode)
    assert result.bytecode.read_bytes() == pyc  # the check itself wrote nothing


def test_the_launcher_works_through_a_symlink_and_reports_missing_code(tmp_path: Path) -> None:
    result = install_cni(tmp_path / "bin", tmp_path / "net.d", force=False)
    link = tmp_path / "elsewhere" / "flannel"
    link.parent.mkdir()
    link.symlink_to(result.plugin)
    assert run_version(link).returncode == 0
    shutil.rmtree(result.module.parent)
    proc = run_version(result.plugin)
    assert proc.returncode == 1
    error = json.loads(proc.stdout)
    assert error["code"] == 104 and "install-cni" in error["msg"], error


def test_launcher_module_id_reads_back_what_launcher_text_wrote() -> None:
    assert launcher_module_id(launcher_text("/usr/bin/python3", "0123abcd-ef")) == "0123abcd-ef"
    assert launcher_module_id("#!/usr/bin/python3 -IS\nprint('not ours')\n") is None
    with pytest.raises(ValueError):
        launcher_text("/usr/bin/python3", '../x", "y')


def test_the_single_file_plugin_still_runs(tmp_path: Path) -> None:
    """plugin_text() (the plugin as one script, used by the lab) stays a working plugin."""
    plugin = tmp_path / "flannel"
    plugin.write_text(plugin_text(find_interpreter()))
    plugin.chmod(0o755)
    proc = run_version(plugin)
    assert proc.returncode == 0 and "1.1.0" in json.loads(proc.stdout)["supportedVersions"]


def test_default_conflist_is_the_kubernetes_one(tmp_path: Path) -> None:
    result = install_cni(tmp_path / "bin", tmp_path / "net.d", force=False)
    assert result.conflist_written and result.conflist_note == "written"
    conf = json.loads((tmp_path / "net.d" / CONFLIST_NAME).read_text())
    assert conf == {
        "name": "cbr0",
        "cniVersion": "1.0.0",
        "plugins": [
            {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    # No other file in the conf dir that a runtime would load as a network config.
    loadable = [
        p.name
        for p in (tmp_path / "net.d").iterdir()
        if p.suffix in (".conf", ".conflist", ".json")
    ]
    assert loadable == [CONFLIST_NAME]


def test_a_user_changed_conflist_is_kept_unless_forced(tmp_path: Path) -> None:
    install_cni(tmp_path / "bin", tmp_path / "net.d", force=False)
    conflist = tmp_path / "net.d" / CONFLIST_NAME
    # Reinstalling over our own unchanged file is fine.
    again = install_cni(tmp_path / "bin", tmp_path / "net.d", force=False)
    assert again.conflist_written
    changed = conflist.read_text().replace('"cbr0"', '"mynet"')
    conflist.write_text(changed)
    kept = install_cni(tmp_path / "bin", tmp_path / "net.d", force=False)
    assert not kept.conflist_written and "--force" in kept.conflist_note
    assert conflist.read_text() == changed
    forced = install_cni(tmp_path / "bin", tmp_path / "net.d", force=True)
    assert forced.conflist_written and '"cbr0"' in conflist.read_text()


def test_a_foreign_conflist_is_kept(tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / CONFLIST_NAME).write_text('{"name": "theirs"}\n')
    result = install_cni(tmp_path / "bin", conf_dir, force=False)
    assert not result.conflist_written
    assert (conf_dir / CONFLIST_NAME).read_text() == '{"name": "theirs"}\n'
    assert (tmp_path / "bin" / "flannel").exists()  # the plugin is installed all the same


def test_a_script_interpreter_is_refused(tmp_path: Path) -> None:
    shim = tmp_path / "python3"
    shim.write_text('#!/bin/bash\nexec /usr/bin/python3 "$@"\n')
    shim.chmod(0o755)
    with pytest.raises(InstallError, match="pyenv shim"):
        find_interpreter([str(shim)])
    with pytest.raises(InstallError):
        install_cni(tmp_path / "bin", tmp_path / "net.d", force=False, interpreter=str(shim))
    assert not (tmp_path / "bin" / "flannel").exists()


def test_register_adds_install_cni_to_a_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="overlayctl")
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["install-cni", "--bin-dir", str(tmp_path / "b"), "--conf-dir", str(tmp_path / "c")]
    )
    assert args.func(args) == 0
    assert (tmp_path / "b" / "flannel").exists() and (tmp_path / "c" / CONFLIST_NAME).exists()
    assert "conflist" in capsys.readouterr().out
    args = parser.parse_args(["install-cni", "--force"])
    assert args.bin_dir == "/opt/cni/bin" and args.conf_dir == "/etc/cni/net.d" and args.force
