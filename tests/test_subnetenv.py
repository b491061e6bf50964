"""subnet.env: flannel's exact format, atomic write, reading back the previous subnet."""

from __future__ import annotations

import logging
import os
import stat
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from overlay.subnetenv import SubnetEnv, read_previous_subnet, write_subnet_env


def test_render_is_flannels_format() -> None:
    env = SubnetEnv(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"), 1450, False)
    assert env.render() == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.72.1/24\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=false\n"
    )


def test_render_dual_stack_and_masq() -> None:
    env = SubnetEnv(
        IPv4Network("10.244.0.0/16"),
        IPv4Network("10.244.3.0/24"),
        1400,
        True,
        IPv6Network("fd00:12::/48"),
        IPv6Network("fd00:12:0:3::/64"),
    )
    assert env.render() == (
        "FLANNEL_NETWORK=10.244.0.0/16\n"
        "FLANNEL_SUBNET=10.244.3.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd00:12::/48\n"
        "FLANNEL_IPV6_SUBNET=fd00:12:0:3::1/64\n"
        "FLANNEL_MTU=1400\n"
        "FLANNEL_IPMASQ=true\n"
    )


def test_write_is_atomic_with_modes(tmp_path: Path) -> None:
    path = tmp_path / "run" / "flannel" / "subnet.env"
    old_umask = os.umask(0o077)  # the modes must not depend on the caller's umask
    try:
        write_subnet_env(
            path, SubnetEnv(IPv4Network("10.1.0.0/16"), IPv4Network("10.1.9.0/24"), 1450, False)
        )
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    inode = path.stat().st_ino
    write_subnet_env(
        path, SubnetEnv(IPv4Network("10.1.0.0/16"), IPv4Network("10.1.10.0/24"), 1450, True)
    )
    # A rename, not a rewrite in place: readers holding the old file never see a mix.
    assert path.stat().st_ino != inode
    assert "FLANNEL_SUBNET=10.1.10.1/24\n" in path.read_text()
    assert sorted(p.name for p in path.parent.iterdir()) == ["subnet.env"]  # no temp left


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    good = SubnetEnv(IPv4Network("10.1.0.0/16"), IPv4Network("10.1.9.0/24"), 1450, False)
    write_subnet_env(path, good)

    class Boom(SubnetEnv):
        def render(self) -> str:
            raise RuntimeError("render failed")

    with pytest.raises(RuntimeError):
        write_subnet_env(path, Boom(good.network, good.subnet, 1, False))
    assert path.read_text() == good.render()
    assert [p.name for p in tmp_path.iterdir()] == ["subnet.env"]


def test_read_previous_subnet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "subnet.env"
    assert read_previous_subnet(path) is None  # missing: quietly nothing
    write_subnet_env(
        path, SubnetEnv(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"), 1450, False)
    )
    assert read_previous_subnet(path) == IPv4Network("10.5.72.0/24")


@pytest.mark.parametrize(
    "text",
    [
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_MTU=1450\n",  # no FLANNEL_SUBNET
        "FLANNEL_SUBNET=10.5.300.1/24\n",
        "this is not an env file\n",
        "\x00\x01garbage",
    ],
)
def test_garbled_file_is_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    path = tmp_path / "subnet.env"
    path.write_text(text)
    with caplog.at_level(logging.WARNING):
        assert read_previous_subnet(path) is None
    assert str(path) in caplog.text
