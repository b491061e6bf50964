"""overlayd's flags and FLANNELD_* environment variables."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import re
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.options import DAEMON_FLAGS, ETCD_FLAGS, env_name, parse_options

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"


def test_defaults_match_flannel() -> None:
    opts = parse_options([], environ={})
    assert opts.etcd.endpoints == ("http://127.0.0.1:2379",)
    assert opts.etcd.prefix == "/coreos.com/network"
    assert opts.subnet_file == Path("/run/flannel/subnet.env")
    assert opts.subnet_lease_renew_margin == 60
    assert opts.ip_masq is False
    assert opts.healthz_port == 0
    assert opts.iface == () and opts.iface_regex == ()
    assert opts.mqtt_broker is None
    assert opts.metrics is False


def test_flags_parse() -> None:
    opts = parse_options(
        [
            "--etcd-endpoints", "http://10.0.0.1:2379,https://10.0.0.2:2379",
            "--etcd-prefix", "/my/net",
            "--iface", "eth1", "--iface", "192.168.5.5",
            "--iface-regex", "^en", "--iface-regex", r"10\.1\.",
            "--iface-can-reach", "192.168.9.1",
            "--public-ip", "203.0.113.7",
            "--subnet-file", "/tmp/x/subnet.env",
            "--subnet-lease-renew-margin", "15",
            "--ip-masq", "--iptables-resync", "9",
            "--healthz-ip", "0.0.0.0", "--healthz-port", "8471", "--metrics",
            "--mqtt-broker", "127.0.0.1:1884", "--mqtt-topic-prefix", "lab/",
            "--log-level", "DEBUG", "--resync-period", "2.5",
        ],
        environ={},
    )  # fmt: skip
    assert opts.etcd.endpoints == ("http://10.0.0.1:2379", "https://10.0.0.2:2379")
    assert opts.etcd.prefix == "/my/net"
    assert opts.iface == ("eth1", "192.168.5.5")
    assert opts.iface_regex == ("^en", r"10\.1\.")
    assert opts.iface_can_reach == IPv4Address("192.168.9.1")
    assert opts.public_ip == IPv4Address("203.0.113.7")
    assert opts.subnet_file == Path("/tmp/x/subnet.env")
    assert opts.subnet_lease_renew_margin == 15
    assert opts.ip_masq is True and opts.iptables_resync == 9
    assert opts.healthz_ip == IPv4Address("0.0.0.0") and opts.healthz_port == 8471
    assert opts.metrics is True
    assert opts.mqtt_broker is not None
    assert (opts.mqtt_broker.host, opts.mqtt_broker.port) == ("127.0.0.1", 1884)
    assert opts.mqtt_topic_prefix == "lab"
    assert opts.log_level == "debug"
    assert opts.resync_period == 2.5


def test_env_vars_and_precedence() -> None:
    env = {
        "FLANNELD_ETCD_ENDPOINTS": "http://127.0.0.1:3000",
        "FLANNELD_ETCD_PREFIX": "/env/net",
        "FLANNELD_IFACE": "eth7,10.9.9.9",
        "FLANNELD_IP_MASQ": "true",
        "FLANNELD_HEALTHZ_PORT": "9999",
        "FLANNELD_PUBLIC_IP": "198.51.100.4",
        "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "30",
        "FLANNELD_MQTT_BROKER": "localhost:1883",
    }
    opts = parse_options(["--etcd-prefix", "/flag/net", "--iface", "eth9"], environ=env)
    assert opts.etcd.endpoints == ("http://127.0.0.1:3000",)
    assert opts.etcd.prefix == "/flag/net"  # the command line wins
    assert opts.iface == ("eth9",)  # ... also for repeatable flags (not appended to env)
    assert opts.ip_masq is True
    assert opts.healthz_port == 9999
    assert opts.public_ip == IPv4Address("198.51.100.4")
    assert opts.subnet_lease_renew_margin == 30
    assert opts.mqtt_broker is not None
    assert (opts.mqtt_broker.host, opts.mqtt_broker.port) == ("localhost", 1883)
    env_only = parse_options([], environ=env)
    assert env_only.iface == ("eth7", "10.9.9.9")
    # A regex may contain commas: its variable is one regex, as flannel's.
    rx = parse_options([], environ={"FLANNELD_IFACE_REGEX": r"^10\.0\.[0-9]{1,3}\."})
    assert rx.iface_regex == (r"^10\.0\.[0-9]{1,3}\.",)


def test_every_flag_has_the_flannel_env_name() -> None:
    for flag in ETCD_FLAGS + DAEMON_FLAGS:
        assert flag.env == env_name(flag.name)
    assert env_name("--iface-can-reach") == "FLANNELD_IFACE_CAN_REACH"


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--public-ip", "300.1.1.1"], {}, "300.1.1.1"),
        (["--healthz-port", "70000"], {}, "70000"),
        (["--etcd-endpoints", "127.0.0.1:2379"], {}, "127.0.0.1:2379"),
        (["--iface-regex", "(["], {}, "(["),
        (["--subnet-lease-renew-margin", "-3"], {}, "-3"),
        (["--mqtt-broker", "host:notaport"], {}, "host:notaport"),
        (["--log-level", "loud"], {}, "loud"),
        (["--resync-period", "0"], {}, "0"),
        ([], {"FLANNELD_IP_MASQ": "maybe"}, "FLANNELD_IP_MASQ='maybe'"),
        ([], {"FLANNELD_HEALTHZ_PORT": "x"}, "FLANNELD_HEALTHZ_PORT='x'"),
        (["--etcd-certfile", "/nonexistent/c.pem"], {}, "--etcd-keyfile"),
        (["--etcd-username", "root"], {}, "--etcd-password"),
    ],
)
def test_bad_values_exit_2_naming_the_value(
    argv: list[str], env: dict[str, str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_options(argv, environ=env)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_help_explains_every_flag_with_default_and_env() -> None:
    out = subprocess.run(
        [str(VENV_BIN / "overlayd"), "--help"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for flag in ETCD_FLAGS + DAEMON_FLAGS:
        assert flag.name in text
        assert flag.env in text, flag.env
    assert "(default: http://127.0.0.1:2379; env FLANNELD_ETCD_ENDPOINTS)" in text
    assert "(default: /run/flannel/subnet.env; env FLANNELD_SUBNET_FILE)" in text


def test_bad_flag_from_the_real_binary_exits_2() -> None:
    out = subprocess.run(
        [str(VENV_BIN / "overlayd"), "--public-ip", "nope"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "--public-ip" in out.stderr and "'nope'" in out.stderr


def test_the_example_env_file_parses() -> None:
    path = Path(__file__).resolve().parent.parent / "systemd" / "overlayd.env.example"
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    assert env and all(k.startswith("FLANNELD_") for k in env)
    known = {f.env for f in ETCD_FLAGS + DAEMON_FLAGS}
    commented = set(re.findall(r"#(FLANNELD_[A-Z_]+)=", path.read_text()))
    assert set(env) | commented <= known, (set(env) | commented) - known
    opts = parse_options([], environ=env)
    assert opts.ip_masq is True and opts.metrics is True and opts.healthz_port == 8471


def test_traffic_flags_default_as_flannel() -> None:
    opts = parse_options([], environ={})
    assert opts.iptables_forward_rules is True  # on by default, apart from --ip-masq
    assert opts.ip_masq_fully_random_disable is False
    assert opts.ip_blackhole_route is False
    assert opts.iptables_resync == 5


@pytest.mark.parametrize(
    ("argv", "env", "forward", "masq"),
    [
        (["--iptables-forward-rules=false"], {}, False, False),
        (["--iptables-forward-rules=0", "--ip-masq"], {}, False, True),
        (["--iptables-forward-rules"], {"FLANNELD_IPTABLES_FORWARD_RULES": "false"}, True, False),
        ([], {"FLANNELD_IPTABLES_FORWARD_RULES": "false"}, False, False),
        (["--ip-masq=false"], {"FLANNELD_IP_MASQ": "true"}, True, False),
        (["--ip-masq=true", "--iptables-forward-rules", "no"], {}, False, True),
    ],
)
def test_switches_take_false_as_go_flags_do(
    argv: list[str], env: dict[str, str], forward: bool, masq: bool
) -> None:
    opts = parse_options(argv, environ=env)
    assert (opts.iptables_forward_rules, opts.ip_masq) == (forward, masq)


def test_new_traffic_switches_from_flags_and_env() -> None:
    opts = parse_options(["--ip-masq-fully-random-disable", "--ip-blackhole-route"], environ={})
    assert opts.ip_masq_fully_random_disable is True and opts.ip_blackhole_route is True
    env = {"FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE": "1", "FLANNELD_IP_BLACKHOLE_ROUTE": "yes"}
    opts = parse_options([], environ=env)
    assert opts.ip_masq_fully_random_disable is True and opts.ip_blackhole_route is True


BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False, "": False}  # fmt: skip


@given(st.text(max_size=12))
def test_a_switch_value_is_a_bool_or_exit_2(text: str) -> None:
    """`--iptables-forward-rules=X` for any X: the boolean X names (any case, surrounding
    space), or exit 2 naming the flag; never another value, never a crash."""
    expected = BOOL_WORDS.get(text.strip().lower())
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            opts = parse_options([f"--iptables-forward-rules={text}"], environ={})
        except SystemExit as e:
            assert e.code == 2 and expected is None
            assert "--iptables-forward-rules" in err.getvalue()
            return
    assert expected is not None and opts.iptables_forward_rules is expected


@pytest.mark.parametrize("program", ["overlayd", "overlayctl"])
def test_version_prints_the_package_version_and_exits_0(program: str) -> None:
    out = subprocess.run([str(VENV_BIN / program), "--version"], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert out.returncode == 0
    assert out.stdout.strip() == f"{program} {importlib.metadata.version('overlay')}"


def test_help_names_the_new_flags_defaults() -> None:
    out = subprocess.run([str(VENV_BIN / "overlayd"), "--help"], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    text = " ".join(out.stdout.split())
    assert "(default: on; env FLANNELD_IPTABLES_FORWARD_RULES)" in text
    assert "(default: off; env FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE)" in text
    assert "(default: off; env FLANNELD_IP_BLACKHOLE_ROUTE)" in text
    assert "--version" in text
