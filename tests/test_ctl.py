"""overlayctl against a real etcd: config set/get, leases, reserve/unreserve, plugins, errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import textwrap
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from integration.etcdserver import EtcdServer, free_port
from overlay.ctl import main
from subnetmgr.model import LeaseAttrs
from subnetmgr.registry import EtcdOptions, EtcdRegistry

OVERLAYCTL = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "overlayctl")
CONFIG = '{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}'


def ctl(server: EtcdServer, prefix: str, *args: str, plugins: tuple[str, ...] = ()) -> int:
    return main(
        ["--etcd-endpoints", server.endpoint, "--etcd-prefix", prefix, *args],
        environ={},
        plugin_modules=plugins,
    )


def etcd_get(server: EtcdServer, key: str) -> str:
    out = subprocess.run(
        ["etcdctl", "--endpoints", server.endpoint, "get", "--print-value-only", key],
        env={**os.environ, "ETCDCTL_API": "3"},
        check=True, capture_output=True, text=True, timeout=15,
    )  # fmt: skip
    return out.stdout.strip()


def test_config_set_and_get(
    etcd_server: EtcdServer, etcd_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(etcd_server, etcd_prefix, "config", "get") == 1
    assert "no network config" in capsys.readouterr().err
    assert ctl(etcd_server, etcd_prefix, "config", "set", CONFIG) == 0
    assert "backend vxlan" in capsys.readouterr().out
    assert etcd_get(etcd_server, f"{etcd_prefix}/config") == CONFIG
    assert ctl(etcd_server, etcd_prefix, "config", "get") == 0
    assert capsys.readouterr().out.strip() == CONFIG


def test_config_set_from_file_and_default_backend(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "net.json"
    path.write_text('{"Network": "10.9.0.0/16"}\n')
    assert ctl(etcd_server, etcd_prefix, "config", "set", f"@{path}") == 0
    assert "backend udp (no Backend given: default)" in capsys.readouterr().out
    assert json.loads(etcd_get(etcd_server, f"{etcd_prefix}/config")) == {"Network": "10.9.0.0/16"}


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ('{"Network":"10.1.0.0/16","SubnetLen":31}', "SubnetLen=31"),
        ('{"Network":"10.1.0.0/30"}', "Network='10.1.0.0/30'"),
        ('{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0"}', "SubnetMin='10.2.0.0'"),
        ('{"Network":"nope"}', "Network='nope'"),
        ("{not json", "not valid JSON"),
        ("@/nonexistent/net.json", "/nonexistent/net.json"),
    ],
)
def test_invalid_config_is_refused_and_nothing_written(
    etcd_server: EtcdServer, etcd_prefix: str, capsys: pytest.CaptureFixture[str],
    config: str, needle: str,
) -> None:  # fmt: skip
    assert ctl(etcd_server, etcd_prefix, "config", "set", config) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert etcd_get(etcd_server, f"{etcd_prefix}/config") == ""


async def _seed(server: EtcdServer, prefix: str) -> None:
    opts = EtcdOptions(endpoints=(server.endpoint,), prefix=prefix)
    registry = await EtcdRegistry.connect(opts)
    try:
        vxlan = LeaseAttrs(
            IPv4Address("192.168.1.11"), None, "vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
        )
        assert await registry.create_lease(IPv4Network("10.1.5.0/24"), vxlan, 3600) is not None
        udp = LeaseAttrs(IPv4Address("192.168.1.12"))
        assert await registry.create_lease(IPv4Network("10.1.6.0/24"), udp, 600) is not None
    finally:
        await registry.close()


def test_leases_table_and_json(
    etcd_server: EtcdServer, etcd_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(etcd_server, etcd_prefix, "leases") == 0
    assert "no leases" in capsys.readouterr().out
    asyncio.run(_seed(etcd_server, etcd_prefix))
    assert ctl(etcd_server, etcd_prefix, "config", "set", CONFIG) == 0
    assert ctl(etcd_server, etcd_prefix, "reserve", "10.1.7.0/24", "192.168.1.20") == 0
    capsys.readouterr()

    assert ctl(etcd_server, etcd_prefix, "leases") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SUBNET", "PUBLIC", "IP", "BACKEND", "VTEP", "MAC", "TTL",
                                "RESERVED", "STATUS"]  # fmt: skip
    rows = [line.split() for line in lines[1 : lines.index("")]]  # the notes follow
    assert [r[0] for r in rows] == ["10.1.5.0/24", "10.1.6.0/24", "10.1.7.0/24"]
    assert rows[0][1:4] == ["192.168.1.11", "vxlan", "c6:d2:32:6f:8f:44"]
    assert rows[0][4].startswith(("59m", "1h00m")) and rows[0][5:] == ["no", "ok"]
    assert rows[1][1:4] == ["192.168.1.12", "udp", "-"] and rows[1][4].startswith(("9m", "10m"))
    # 10 minutes left: its host missed the renewal it makes with 60 minutes left.
    assert rows[1][5:] == ["no", "looks", "dead"]
    assert any(line.startswith("looks dead: less than 55m00s left") for line in lines)
    assert rows[2][1] == "192.168.1.20" and rows[2][4:] == ["-", "yes", "ok"]

    assert ctl(etcd_server, etcd_prefix, "leases", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc[0]["vtep_mac"] == "c6:d2:32:6f:8f:44" and 3500 < doc[0]["ttl"] <= 3600
    assert doc[2] == {"subnet": "10.1.7.0/24", "public_ip": "192.168.1.20", "ipv6_subnet": None,
                      "public_ipv6": None, "backend": "udp", "vtep_mac": None,
                      "vtep_mac_v6": None, "ttl": None, "reserved": True, "key": "10.1.7.0-24",
                      "ignored": None, "detail": None, "looks_dead": False}  # fmt: skip
    assert [row["looks_dead"] for row in doc] == [False, True, False]


def test_reserve_and_unreserve(
    etcd_server: EtcdServer, etcd_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(etcd_server, etcd_prefix, "config", "set", CONFIG) == 0
    assert ctl(etcd_server, etcd_prefix, "reserve", "10.1.8.0/24", "192.168.1.30") == 0
    key = f"{etcd_prefix}/subnets/10.1.8.0-24"
    assert etcd_get(etcd_server, key) == '{"PublicIP":"192.168.1.30","PublicIPv6":null}'
    assert ctl(etcd_server, etcd_prefix, "unreserve", "10.1.8.0/24") == 0
    assert etcd_get(etcd_server, key) == ""
    capsys.readouterr()
    assert ctl(etcd_server, etcd_prefix, "unreserve", "10.1.8.0/24") == 1
    assert "no reservation for 10.1.8.0/24" in capsys.readouterr().err

    for args, needle in [
        (("reserve", "10.1.8.1/24", "192.168.1.30"), "'10.1.8.1/24'"),
        (("reserve", "10.1.8.0/24", "192.168.1.300"), "'192.168.1.300'"),
        (("reserve", "10.1.8.0/24", "127.0.0.1"), "127.0.0.1 is loopback"),
        (("reserve", "10.1.8.0/24", "224.0.0.1"), "224.0.0.1 is multicast"),
        (("reserve", "10.2.8.0/24", "192.168.1.30"), "does not fit the network config"),
        (("reserve", "10.1.8.0/25", "192.168.1.30"), "does not fit the network config"),
        (("unreserve", "banana"), "'banana'"),
    ]:
        assert ctl(etcd_server, etcd_prefix, *args) == 2, args
        assert needle in capsys.readouterr().err
    assert etcd_get(etcd_server, key) == ""


def test_unreachable_etcd_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    code = main(["--etcd-endpoints", endpoint, "--etcd-timeout", "1", "leases"], environ={},
                plugin_modules=())  # fmt: skip
    assert code == 1
    assert "127.0.0.1" in capsys.readouterr().err


def test_env_vars_with_the_real_binary(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    env = {**os.environ, "FLANNELD_ETCD_ENDPOINTS": etcd_server.endpoint,
           "FLANNELD_ETCD_PREFIX": etcd_prefix}  # fmt: skip
    done = subprocess.run([OVERLAYCTL, "config", "set", CONFIG], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert etcd_get(etcd_server, f"{etcd_prefix}/config") == CONFIG
    bad = subprocess.run([OVERLAYCTL, "leases"], capture_output=True, text=True, timeout=60,
                         env={**env, "FLANNELD_ETCD_ENDPOINTS": "not-a-url"})  # fmt: skip
    assert bad.returncode == 2 and "FLANNELD_ETCD_ENDPOINTS='not-a-url'" in bad.stderr


@pytest.mark.parametrize(
    "args",
    [[], ["config"], ["config", "set"], ["config", "get"], ["leases"], ["leases", "revoke"],
     ["reserve"], ["unreserve"]],
)  # fmt: skip
def test_help_everywhere(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*args, "--help"], environ={}, plugin_modules=())
    assert exc.value.code == 0
    assert "usage: overlayctl" in capsys.readouterr().out


def test_plugin_subcommands_are_registered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    unique: str,
) -> None:  # fmt: skip
    good, broken = f"ovplug_{unique}", f"ovbroken_{unique}"
    (tmp_path / f"{good}.py").write_text(textwrap.dedent("""
        import argparse

        def _hello(args: argparse.Namespace) -> int:
            print(f"hello {args.name}")
            return 7

        def register(subparsers) -> None:
            p = subparsers.add_parser("hello", help="say hello")
            p.add_argument("name")
            p.set_defaults(func=_hello)
    """))  # fmt: skip
    (tmp_path / f"{broken}.py").write_text("import a_module_that_does_not_exist_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = (f"missing_{unique}", broken, good)
    assert main(["hello", "world"], environ={}, plugin_modules=plugins) == 7
    assert capsys.readouterr().out == "hello world\n"
    # The built-in hooks (integration.cli: lab, cni.install: install-cni) load when present.
    with pytest.raises(SystemExit):
        main(["--help"], environ={})
    out = capsys.readouterr().out
    for name, sub in (("integration.cli", "lab"), ("cni.install", "install-cni")):
        try:
            __import__(name)
        except ModuleNotFoundError:
            continue
        assert sub in out
