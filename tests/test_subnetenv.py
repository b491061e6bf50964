"""subnet.env: flannel's exact format, atomic write, reading back the previous subnet; the
daemon's codec pinned to the CNI plugin's reader by properties (hypothesis)."""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import tempfile
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from cni import flannel
from overlay.subnetenv import (
    MAX_SIZE,
    SubnetEnv,
    SubnetEnvError,
    read_previous_subnet,
    remove_leftover_temps,
    write_subnet_env,
)


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


def test_render_ipv6_only_is_flannels_format() -> None:
    """EnableIPv4 false: flannel's WriteSubnetFile writes the IPv6 pair alone."""
    env = SubnetEnv(None, None, 1430, False, IPv6Network("fd00:12::/48"),
                    IPv6Network("fd00:12:0:3::/64"))  # fmt: skip
    text = env.render()
    assert text == (
        "FLANNEL_IPV6_NETWORK=fd00:12::/48\n"
        "FLANNEL_IPV6_SUBNET=fd00:12:0:3::1/64\n"
        "FLANNEL_MTU=1430\n"
        "FLANNEL_IPMASQ=false\n"
    )
    assert SubnetEnv.parse(text) == env
    with pytest.raises(SubnetEnvError, match="no IPv4 and no IPv6 subnet"):
        SubnetEnv(None, None, 1430, False).render()


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


# -- one codec, pinned to the plugin's reader ---------------------------------------------------

KEYS = (
    "FLANNEL_NETWORK",
    "FLANNEL_SUBNET",
    "FLANNEL_IPV6_NETWORK",
    "FLANNEL_IPV6_SUBNET",
    "FLANNEL_MTU",
    "FLANNEL_IPMASQ",
)
ipv4_networks = st.builds(
    lambda a, p: IPv4Network((a, p), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 31)
)
ipv6_networks = st.builds(
    lambda a, p: IPv6Network((a, p), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 127),
)
ipv6_pairs = st.one_of(st.just((None, None)), st.tuples(ipv6_networks, ipv6_networks))
envs = st.one_of(
    st.builds(
        lambda net, sub, mtu, masq, v6: SubnetEnv(net, sub, mtu, masq, *v6),
        ipv4_networks,
        ipv4_networks,
        st.integers(68, 65535),
        st.booleans(),
        ipv6_pairs,
    ),
    # IPv6-only (EnableIPv4 false): the IPv6 pair alone.
    st.builds(
        lambda mtu, masq, v6: SubnetEnv(None, None, mtu, masq, *v6),
        st.integers(68, 65535),
        st.booleans(),
        st.tuples(ipv6_networks, ipv6_networks),
    ),
)
# Values near the edge of what a reader accepts: valid ones, slightly wrong ones, garbage.
values = st.one_of(
    st.builds(lambda a, p: f"{IPv4Address(a)}/{p}", st.integers(0, 2**32 - 1), st.integers(0, 40)),
    st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,4}){2,4}(/[0-9]{0,3})?", fullmatch=True),
    st.builds(
        lambda a, p: f"{IPv6Address(a)}/{p}", st.integers(0, 2**128 - 1), st.integers(0, 130)
    ),
    st.from_regex(r"[0-9a-f:]{0,12}(/[0-9]{1,3})?", fullmatch=True),
    st.sampled_from(["true", "false", "1", "0", "t", "F", "TRUE", "False", "yes", "tRue", ""]),
    st.integers(-10, 70000).map(str),
    st.from_regex(r"0*[0-9]{1,7}", fullmatch=True),
    st.text(max_size=12),
)
lines = st.one_of(
    st.builds(
        lambda key, eq, value, pad: f"{pad}{key}{eq}{value}{pad}",
        st.sampled_from(KEYS) | st.text(max_size=8),
        st.sampled_from(["=", " = ", "=="]),
        values,
        st.sampled_from(["", " ", "\t", "\u00a0", "\u2003"]),
    ),
    st.sampled_from(["", "# written by hand", "  # x=1", "no equals sign", "="]),
    st.text(max_size=30),
)
ipv4_texts = st.builds(
    lambda a, p: f"{IPv4Address(a)}/{p}", st.integers(0, 2**32 - 1), st.integers(0, 32)
)
ipv6_texts = st.builds(
    lambda a, p: f"{IPv6Address(a)}/{p}", st.integers(0, 2**128 - 1), st.integers(0, 128)
)


def mostly(good: st.SearchStrategy[str], other: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """`good` five times in six (one_of would pick each branch equally often)."""
    return st.integers(0, 5).flatmap(lambda i: other if i == 0 else good)


good_values = {
    "FLANNEL_NETWORK": ipv4_texts,
    "FLANNEL_SUBNET": ipv4_texts,
    "FLANNEL_IPV6_NETWORK": ipv6_texts,
    "FLANNEL_IPV6_SUBNET": ipv6_texts,
    "FLANNEL_MTU": st.integers(68, 65535).map(str),
    "FLANNEL_IPMASQ": st.sampled_from(["true", "false", "1", "0", "t", "F", "TRUE", "False"]),
}
texts = st.one_of(
    st.lists(lines, max_size=10).map("\n".join),
    # A subset of the keys (often: all, the IPv4 ones, the IPv6 ones), each with a good
    # value (mostly) or an edge one.
    st.builds(
        lambda chosen, keep: "".join(f"{k}={v}\n" for k, v in chosen.items() if k in keep),
        st.fixed_dictionaries({k: mostly(good, values) for k, good in good_values.items()}),
        st.one_of(
            st.sampled_from([KEYS, KEYS[:2] + KEYS[4:], KEYS[2:]]),
            st.sets(st.sampled_from(KEYS)),
        ),
    ),
    # A real file with lines added, replaced or dropped: many of these are still valid.
    st.builds(
        lambda env, extra, drop, sep: sep.join(
            [line for i, line in enumerate(env.render().splitlines()) if i != drop] + extra
        ),
        envs,
        st.lists(lines, max_size=3),
        st.integers(-1, 6),
        st.sampled_from(["\n", "\r\n", "\r", "\x85", "\u2028"]),
    ),
)


def plugin_values(env: flannel.SubnetEnv) -> tuple[object, ...]:
    return (env.network, env.subnet, env.ipv6_network, env.ipv6_subnet, env.mtu, env.ipmasq)


def daemon_values(env: SubnetEnv) -> tuple[object, ...]:
    def text(net: object) -> str | None:
        return None if net is None else str(net)

    return (
        text(env.network),
        text(env.subnet),
        text(env.ipv6_network),
        text(env.ipv6_subnet),
        env.mtu,
        env.ipmasq,
    )


@given(envs)
def test_what_the_daemon_writes_both_readers_read_back(env: SubnetEnv) -> None:
    text = env.render()
    assert SubnetEnv.parse(text) == env
    assert plugin_values(flannel.parse_subnet_env(text)) == daemon_values(env)


@given(envs)
def test_written_file_reads_back_through_both_readers(env: SubnetEnv) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "subnet.env"
        write_subnet_env(path, env)
        assert SubnetEnv.read(path) == env
        assert plugin_values(flannel.load_subnet_env(str(path))) == daemon_values(env)
        assert read_previous_subnet(path) == env.subnet


@given(texts)
def test_both_readers_agree_or_both_refuse(text: str) -> None:
    """On any text: the same values, or both refuse with their typed error (IPv6-only files
    included: both take a file with only the IPv6 pair)."""
    try:
        daemon: SubnetEnv | None = SubnetEnv.parse(text, "x.env")
    except SubnetEnvError as e:
        assert str(e).startswith("x.env: ")
        daemon = None
    try:
        plugin: flannel.SubnetEnv | None = flannel.parse_subnet_env(text, "x.env")
    except flannel.CNIError as e:
        assert e.code == flannel.ERR_SUBNET_ENV and "x.env" in e.msg
        plugin = None
    event("both accept" if daemon else "plugin only" if plugin else "both refuse")
    if daemon is not None:
        event("IPv6 only" if daemon.network is None else "with IPv4")
        assert plugin is not None and plugin_values(plugin) == daemon_values(daemon)
    else:
        assert plugin is None, text


@given(texts)
def test_previous_subnet_is_the_subnet_or_nothing(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "subnet.env"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        previous = read_previous_subnet(path)
    try:
        env = SubnetEnv.parse(text)
    except SubnetEnvError:
        assert previous is None or isinstance(previous, IPv4Network)
    else:
        assert previous == env.subnet


@given(st.binary(max_size=200))
def test_any_bytes_give_a_typed_error_or_values(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "subnet.env"
        path.write_bytes(data)
        try:
            env: SubnetEnv | None = SubnetEnv.read(path)
        except SubnetEnvError:
            env = None
        try:
            plugin: flannel.SubnetEnv | None = flannel.load_subnet_env(str(path))
        except flannel.CNIError as e:
            assert e.code == flannel.ERR_SUBNET_ENV
            plugin = None
        assert (env is None) == (plugin is None)  # random bytes are never a valid IPv6-only file
        if env is not None:
            assert read_previous_subnet(path) == env.subnet


def test_parse_errors_name_the_key_and_value() -> None:
    good = SubnetEnv(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"), 1450, False)
    cases = {
        good.render().replace("=1450", "=" + "9" * 5000): "FLANNEL_MTU: '99999",
        good.render().replace("/24", "/024"): "FLANNEL_SUBNET: '10.5.72.1/024'",
        good.render().replace("10.5.0.0/16", "10.5.0.0/255.255.0.0"): "FLANNEL_NETWORK",
        good.render().replace("=false", "=no"): "FLANNEL_IPMASQ: 'no'",
        good.render() + "FLANNEL_IPV6_NETWORK=fd00::/48\n": "given together",
        "FLANNEL_IPV6_NETWORK=fd00::/48\nFLANNEL_MTU=1450\n": "missing FLANNEL_SUBNET or FLAN",
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_IPV6_SUBNET=fd00::1/64\nFLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=false\n": "FLANNEL_NETWORK and FLANNEL_SUBNET must be given together",
        "FLANNEL_MTU 1450\n": "line 1 is not KEY=VALUE",
    }
    for text, words in cases.items():
        with pytest.raises(SubnetEnvError, match=re.escape(words)) as info:
            SubnetEnv.parse(text)
        assert len(str(info.value)) < 400  # a 5000-digit value is not repeated in full


@pytest.mark.parametrize(
    ("env", "words"),
    [
        (SubnetEnv(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.7.0/24"), 67, False), "MTU 67"),
        (
            SubnetEnv(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.7.0/24"), 70000, False),
            "MTU 70000",
        ),
        (
            SubnetEnv(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.7.9/32"), 1450, False),
            "no first host",
        ),
        (
            SubnetEnv(
                IPv4Network("10.5.0.0/16"),
                IPv4Network("10.5.7.0/24"),
                1450,
                False,
                ipv6_network=IPv6Network("fd00::/48"),
            ),
            "given together",
        ),
    ],
)
def test_values_a_reader_would_refuse_are_not_written(
    tmp_path: Path, env: SubnetEnv, words: str
) -> None:
    path = tmp_path / "subnet.env"
    good = SubnetEnv(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"), 1450, False)
    write_subnet_env(path, good)
    with pytest.raises(SubnetEnvError, match=words):
        write_subnet_env(path, env)
    assert path.read_text() == good.render()
    assert [p.name for p in tmp_path.iterdir()] == ["subnet.env"]


def test_reading_a_fifo_a_directory_a_huge_or_binary_file_is_a_typed_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fifo = tmp_path / "fifo.env"
    os.mkfifo(fifo)  # no writer: a blocking open would hang for ever
    huge = tmp_path / "huge.env"
    huge.write_bytes(b"#" * (MAX_SIZE + 1))
    binary = tmp_path / "binary.env"
    binary.write_bytes(b"FLANNEL_SUBNET=10.1.2.1/24\n\xff\xfe\n")
    for path, words in [
        (fifo, "not a regular file"),
        (tmp_path, "not a regular file"),
        (huge, "larger than"),
        (binary, "not UTF-8"),
    ]:
        with pytest.raises(SubnetEnvError, match=words):
            SubnetEnv.read(path)
        with caplog.at_level(logging.WARNING):
            assert read_previous_subnet(path) is None
        assert str(path) in caplog.text


def test_leftover_temp_files_are_removed_by_the_next_write(tmp_path: Path) -> None:
    """A crashed write leaves .subnet.env.<pid>.<random>.tmp behind; the next write (the
    daemon's first, once it holds a lease) removes it, unless its writer still runs."""
    proc = subprocess.Popen(["true"])  # a pid that has exited
    proc.wait()
    names = {
        ".subnet.env.k2j3h4x9.tmp": False,  # the old naming (mkstemp alone): removed
        f".subnet.env.{proc.pid}.a8d7f6.tmp": False,  # its writer has exited: removed
        f".subnet.env.{os.getpid()}.zz11.tmp": False,  # this process is not writing: removed
        ".subnet.env.1.q0q0q0.tmp": True,  # pid 1 runs: maybe writing right now, kept
        ".other.env.123.tmp": True,  # not ours
        "subnet.env.tmp": True,
    }
    for name in names:
        (tmp_path / name).write_text("FLANNEL_SUBNET=10.9.9.1/24\n")
    path = tmp_path / "subnet.env"
    removed = remove_leftover_temps(path)
    assert sorted(p.name for p in removed) == sorted(n for n, kept in names.items() if not kept)
    for name in names:
        (tmp_path / name).write_text("x")
    write_subnet_env(
        path, SubnetEnv(IPv4Network("10.1.0.0/16"), IPv4Network("10.1.9.0/24"), 1450, False)
    )
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["subnet.env", *(n for n, kept in names.items() if kept)])
