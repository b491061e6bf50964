"""`overlayctl install-cni` / cni.install: the installed plugin and the default conflist."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from cni.install import (
    CONFLIST_NAME,
    InstallError,
    find_interpreter,
    install_cni,
    is_elf,
    register,
)


def test_installs_an_executable_plugin_with_an_elf_interpreter(tmp_path: Path) -> None:
    result = install_cni(tmp_path / "bin", tmp_path / "net.d", force=False)
    plugin = tmp_path / "bin" / "flannel"
    assert result.plugin == plugin
    assert stat.S_IMODE(plugin.stat().st_mode) == 0o755
    first = plugin.read_text().splitlines()[0]
    assert first.startswith("#!") and first.endswith(" -IS")
    interpreter = first[2:].split()[0]
    assert is_elf(os.path.realpath(interpreter)), interpreter
    assert ".venv" not in interpreter and "pyenv" not in interpreter
    # The body is cni/flannel.py itself.
    source = (Path(__file__).parent.parent / "cni" / "flannel.py").read_text()
    assert plugin.read_text().split("\n", 1)[1] == source.split("\n", 1)[1]
    # Exec'd directly, through its interpreter line, with an empty environment.
    proc = subprocess.run(
        [str(plugin)],
        input=b"{}",
        env={"CNI_COMMAND": "VERSION"},
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert "1.1.0" in json.loads(proc.stdout)["supportedVersions"]


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
