"""`overlayctl install-systemd` (issue 12, item 6): files, modes, refusal, hostile settings, and
the unit checked by the real `systemd-analyze verify` (Debian's systemd package).

Everything is installed into a temp --prefix (a DESTDIR), never into this machine's /etc.
The hardened unit running under real systemd is tested in the container lab
(tests/test_lab_containers.py and tests/test_install_production.py).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.ctl import main
from overlay.install import (
    DOC_PATH,
    ENV_PATH,
    ENV_TEMPLATE,
    UNIT_PATH,
    InstallError,
    default_overlayd,
    install_systemd,
    parse_env_setting,
    render_env,
    render_unit,
)

REPO = Path(__file__).resolve().parent.parent


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("systemd-analyze")
    if binary is None:  # fail, never skip: scripts/bootstrap.sh installs systemd
        raise RuntimeError("systemd-analyze is missing: apt-get install systemd")
    return subprocess.run([binary, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def ctl(*argv: str) -> int:
    return main(["install-systemd", *argv], environ={})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_the_source_tree_files_are_the_templates() -> None:
    assert (REPO / "systemd" / "overlayd.service").read_text() == render_unit(
        "/usr/local/bin/overlayd"
    )
    assert (REPO / "systemd" / "overlayd.env.example").read_text() == ENV_TEMPLATE


def test_install_into_a_prefix_and_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl("--prefix", str(tmp_path), "--env", "FLANNELD_IFACE=eth1,192.0.2.12") == 0
    out = capsys.readouterr().out
    assert out.count("written") == 3 and "not reloading systemd: --prefix is not /" in out
    unit, env, doc = tmp_path / UNIT_PATH, tmp_path / ENV_PATH, tmp_path / DOC_PATH
    assert (mode(unit), mode(env), mode(doc)) == (0o644, 0o644, 0o644)  # no secret: 0644
    text = unit.read_text()
    assert f"ExecStart={default_overlayd()}\n" in text
    assert "Documentation=file:///usr/share/doc/overlay/overlayd.txt" in text
    assert "usage: overlayd" in doc.read_text()  # what Documentation= names is installed
    assert "\nFLANNELD_IFACE=eth1,192.0.2.12\n" in env.read_text()
    assert "#FLANNELD_IFACE=" not in env.read_text()  # the commented line was replaced
    done = verify(unit)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    # The check above can fail: a misspelt value is reported on stderr (which must stay
    # empty), a missing binary makes the exit code non-zero.
    bad = tmp_path / "bad.service"
    text = render_unit("/nonexistent/overlayd")
    bad.write_text(text.replace("ProtectSystem=strict", "ProtectSystem=strictly"))
    done = verify(bad)
    assert done.returncode != 0
    assert "protect system value, ignoring: strictly" in done.stderr
    assert "/nonexistent/overlayd is not executable" in done.stderr


def test_hardening_in_the_unit() -> None:
    text = render_unit("/opt/overlay/bin/overlayd")
    directives = dict(
        line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Z][A-Za-z]+=", line)
    )
    assert directives["CapabilityBoundingSet"] == "CAP_NET_ADMIN CAP_NET_RAW"
    assert directives["AmbientCapabilities"] == "CAP_NET_ADMIN CAP_NET_RAW"
    for cap in ("CAP_NET_ADMIN", "CAP_NET_RAW"):  # each capability says why it is there
        assert re.search(rf"^# {cap}: \S", text, re.M), cap
    for key, value in (
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("SystemCallArchitectures", "native"),
        ("DeviceAllow", "/dev/net/tun rw"),
    ):
        assert directives[key] == value, key  # fmt: skip
    assert "/run/flannel" in directives["ReadWritePaths"].split()
    families = directives["RestrictAddressFamilies"].split()
    assert {"AF_NETLINK", "AF_PACKET", "AF_INET", "AF_UNIX"} <= set(families)


def test_a_password_makes_the_env_file_0600(tmp_path: Path) -> None:
    assert ctl("--prefix", str(tmp_path), "--env", "FLANNELD_ETCD_USERNAME=overlay",
               "--env", "FLANNELD_ETCD_PASSWORD=pa#ss%w0rd") == 0  # fmt: skip
    env = tmp_path / ENV_PATH
    assert mode(env) == 0o600
    assert "\nFLANNELD_ETCD_PASSWORD=pa#ss%w0rd\n" in env.read_text()
    # The same for the MQTT password.
    other = tmp_path / "other"
    other.mkdir()
    install_systemd(other, [("FLANNELD_MQTT_PASSWORD", "x")])
    assert mode(other / ENV_PATH) == 0o600


def test_a_changed_file_is_refused_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl("--prefix", str(tmp_path)) == 0
    unit = tmp_path / UNIT_PATH
    edited = unit.read_text().replace("RestartSec=5", "RestartSec=1")
    unit.write_text(edited)
    capsys.readouterr()
    assert ctl("--prefix", str(tmp_path)) == 1
    out, err = capsys.readouterr()
    assert f"refused   {unit}" in out and "--force" in err
    assert unit.read_text() == edited  # left alone
    assert ctl("--prefix", str(tmp_path), "--force") == 0
    assert f"replaced  {unit}" in capsys.readouterr().out
    assert "RestartSec=5" in unit.read_text()
    # Nothing to do: all unchanged, exit 0; a wrong mode is corrected.
    os.chmod(tmp_path / ENV_PATH, 0o666)
    assert ctl("--prefix", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count("unchanged") == 3 and "mode set to 0644" in out
    assert mode(tmp_path / ENV_PATH) == 0o644
    # Other --env than last time: the env file differs, refused.
    assert ctl("--prefix", str(tmp_path), "--env", "FLANNELD_ETCD_PASSWORD=pw") == 1
    assert "FLANNELD_ETCD_PASSWORD=pw" not in (tmp_path / ENV_PATH).read_text()


def test_a_symlink_is_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep")
    unit = tmp_path / UNIT_PATH
    unit.parent.mkdir(parents=True)
    unit.symlink_to(target)
    outcomes = install_systemd(tmp_path)
    assert outcomes[0].status == "refused" and "symlink" in outcomes[0].detail
    install_systemd(tmp_path, force=True)
    assert target.read_text() == "keep" and not unit.is_symlink()
    assert unit.read_text().startswith("# overlayd")


def test_a_directory_in_the_way(tmp_path: Path) -> None:
    (tmp_path / UNIT_PATH).mkdir(parents=True)
    with pytest.raises(InstallError, match="is a directory"):
        install_systemd(tmp_path, force=True)


@pytest.mark.parametrize(
    ("argv", "words"),
    [(["--env", "FLANNELD_IFAC=eth0"], "did you mean FLANNELD_IFACE?"),
     (["--env", "PATH=/tmp"], "known name"),
     (["--env", "FLANNELD_IFACE"], "environment variable FLANNELD_IFACE, which is not set"),
     (["--env", "FLANNELD_NOPE"], "expected FLANNELD_NAME=VALUE"),
     (["--env", "FLANNELD_IFACE=eth0:1"], "is not an interface name"),
     (["--env", "FLANNELD_HEALTHZ_PORT=99999"], "not a TCP port"),
     (["--env", "FLANNELD_ETCD_ENDPOINTS=ftp://x"], "is not an endpoint"),
     (["--env", "FLANNELD_ETCD_PASSWORD=a\"b"], "by hand"),
     (["--env", "FLANNELD_ETCD_PASSWORD=a\nFLANNELD_IFACE=lo"], "by hand"),
     (["--env", "FLANNELD_ETCD_PASSWORD=$HOME"], "by hand"),
     (["--env", "FLANNELD_ETCD_PASSWORD= pw"], "by hand"),
     (["--env", "FLANNELD_ETCD_PASSWORD=" + "x" * 5000], "longer than 4096"),
     (["--overlayd", "overlayd"], "an absolute path"),
     (["--overlayd", "/opt/my overlay/overlayd"], "an absolute path"),
     (["--overlayd", "/opt/%n/overlayd"], "an absolute path"),
     (["--prefix", "relative/dir"], "must be an absolute path"),
     (["--prefix", "/nonexistent-ovl-prefix"], "is not a directory")],
)  # fmt: skip
def test_hostile_input_exits_2_and_writes_nothing(
    tmp_path: Path, argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = [] if "--prefix" in argv else ["--prefix", str(tmp_path)]
    assert ctl(*prefix, *argv) == 2
    assert words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _systemd_env_value(text: str, key: str) -> str | None:
    """The value systemd takes for an unquoted KEY=VALUE line without backslashes."""
    for line in text.splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1].strip()
    return None


@given(st.sampled_from(["FLANNELD_ETCD_PASSWORD", "FLANNELD_ETCD_USERNAME",
                        "FLANNELD_MQTT_PASSWORD"]), st.text(max_size=40))  # fmt: skip
def test_any_value_is_refused_or_read_back_as_given(key: str, value: str) -> None:
    try:
        k, v = parse_env_setting(f"{key}={value}")
    except InstallError as e:
        assert e.code == 2
        return
    assert (k, v) == (key, value)
    text = render_env([(k, v)])
    assert _systemd_env_value(text, key) == value
    assert text.count(f"\n{key}=") == 1  # replaced the commented example line, or appended


_KEYS = st.sampled_from(["FLANNELD_IFACE", "FLANNELD_LOG_LEVEL", "FLANNELD_PUBLIC_IP"])


@given(st.lists(st.tuples(_KEYS, st.sampled_from(["eth0", "debug", "192.0.2.1"])), max_size=6))
def test_the_last_setting_of_a_key_wins(pairs: list[tuple[str, str]]) -> None:
    text = render_env(pairs)
    for key in {k for k, _ in pairs}:
        last = [v for k, v in pairs if k == key][-1]
        assert _systemd_env_value(text, key) == last
        assert len(re.findall(rf"^{key}=", text, re.M)) == 1


def test_overlayctl_warns_about_a_password_on_its_command_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    argv = ["--etcd-username", "u", "--etcd-password", "pw", "install-systemd",
            "--prefix", str(tmp_path)]  # fmt: skip
    assert main(argv, environ={}) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("--etcd-password on the command line" in w for w in warnings), warnings
    assert any("clear text to http://127.0.0.1:2379" in w for w in warnings), warnings


def test_a_password_from_the_environment_not_the_command_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert parse_env_setting("FLANNELD_ETCD_PASSWORD", {"FLANNELD_ETCD_PASSWORD": "s3"}) == (
        "FLANNELD_ETCD_PASSWORD", "s3",
    )  # fmt: skip
    with pytest.raises(InstallError, match="which is not set"):
        parse_env_setting("FLANNELD_ETCD_PASSWORD", {})
    with pytest.raises(InstallError, match="by hand"):  # same checks as a value given with =
        parse_env_setting("FLANNELD_ETCD_PASSWORD", {"FLANNELD_ETCD_PASSWORD": "a'b"})
    # On the command line it works, with a warning that says how to do it next time.
    assert ctl("--prefix", str(tmp_path), "--env", "FLANNELD_ETCD_PASSWORD=s3") == 0
    assert mode(tmp_path / ENV_PATH) == 0o600
    (w,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "give --env FLANNELD_ETCD_PASSWORD alone" in w and "s3" not in w
