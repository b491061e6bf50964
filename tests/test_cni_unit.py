"""The flannel plugin without root: delegate building, conf and env validation, subnet.env,
version conversion, and the installed plugin's error replies (exec'd as a runtime would)."""
# ruff: noqa: F811  (pytest fixtures imported from tests.test_cni_support are parameters)

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from cni import flannel
from cni.flannel import (
    CNIError,
    build_delegate,
    convert_result,
    json_dumps,
    json_loads,
    parse_conf,
    parse_subnet_env,
)
from tests.test_cni_support import call, plugin, write_subnet_env  # noqa: F401

EXAMPLE_CONF = (
    '{"cniVersion":"0.3.1","name":"cbr0","type":"flannel",'
    '"delegate":{"hairpinMode":true,"isDefaultGateway":true}}'
)
EXAMPLE_ENV = (
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
    "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
)
EXAMPLE_DELEGATE = (
    '{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{"ranges":'
    '[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},'
    '"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}'
)


def delegate_for(conf: dict[str, Any], env: str = EXAMPLE_ENV) -> dict[str, Any]:
    base: dict[str, Any] = {"cniVersion": "1.0.0", "name": "n1", "type": "flannel"}
    base.update(conf)
    return build_delegate(parse_conf(json.dumps(base)), parse_subnet_env(env))


def conf_error(conf: Any, command: str = "ADD") -> CNIError:
    with pytest.raises(CNIError) as info:
        parse_conf(conf if isinstance(conf, str) else json.dumps(conf), command)
    return info.value


# -- the delegate ------------------------------------------------------------------------------


def test_worked_example_from_flannel_byte_for_byte() -> None:
    delegate = build_delegate(parse_conf(EXAMPLE_CONF), parse_subnet_env(EXAMPLE_ENV))
    assert json_dumps(delegate) == EXAMPLE_DELEGATE


def test_delegate_defaults() -> None:
    d = delegate_for({})
    assert d["type"] == "bridge"
    assert d["name"] == "n1" and d["cniVersion"] == "1.0.0"
    assert d["ipMasq"] is False  # FLANNEL_IPMASQ=true: flannel masquerades, so the bridge not
    assert d["mtu"] == 1450
    assert d["isGateway"] is True
    assert d["ipam"] == {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.1.0/24"}]],
        "routes": [{"dst": "10.244.0.0/16"}],
    }
    assert "runtimeConfig" not in d


def test_delegate_ipmasq_follows_not_flannel_ipmasq() -> None:
    env = EXAMPLE_ENV.replace("FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=false")
    assert delegate_for({}, env)["ipMasq"] is True


def test_delegate_keeps_explicit_values() -> None:
    d = delegate_for(
        {"delegate": {"ipMasq": True, "mtu": 1300, "isGateway": False, "cniVersion": "0.3.0"}}
    )
    assert (d["ipMasq"], d["mtu"], d["isGateway"]) == (True, 1300, False)
    assert d["cniVersion"] == "1.0.0"  # always the network's version


def test_non_bridge_delegate_gets_no_is_gateway() -> None:
    d = delegate_for({"delegate": {"type": "ptp"}})
    assert d["type"] == "ptp" and "isGateway" not in d
    assert d["mtu"] == 1450 and d["ipMasq"] is False


def test_ipam_type_and_user_routes_come_first() -> None:
    d = delegate_for(
        {"ipam": {"type": "my-ipam", "dataDir": "/x", "routes": [{"dst": "192.168.9.0/24"}]}}
    )
    assert d["ipam"] == {
        "type": "my-ipam",
        "dataDir": "/x",
        "ranges": [[{"subnet": "10.244.1.0/24"}]],
        "routes": [{"dst": "192.168.9.0/24"}, {"dst": "10.244.0.0/16"}],
    }


def test_runtime_config_is_passed_on() -> None:
    rc = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
    assert delegate_for({"runtimeConfig": rc})["runtimeConfig"] == rc


def test_dual_stack_and_ipv6_only_ranges() -> None:
    v6 = "FLANNEL_IPV6_NETWORK=fd00:10::/48\nFLANNEL_IPV6_SUBNET=fd00:10:0:5::1/64\n"
    d = delegate_for({}, EXAMPLE_ENV + v6)
    assert d["ipam"]["ranges"] == [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:0:5::/64"}]]
    assert d["ipam"]["routes"] == [{"dst": "10.244.0.0/16"}, {"dst": "fd00:10::/48"}]
    only6 = v6 + "FLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n"
    d = delegate_for({}, only6)
    assert d["ipam"]["ranges"] == [[{"subnet": "fd00:10:0:5::/64"}]]
    assert d["ipam"]["routes"] == [{"dst": "fd00:10::/48"}]


def test_subnet_host_bits_are_cleared_for_host_local() -> None:
    env = parse_subnet_env(EXAMPLE_ENV.replace("10.244.1.1/24", "10.1.17.1/24"))
    assert env.subnet == "10.1.17.0/24"


# -- conf errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["name", "ipam"])
def test_delegate_may_not_contain_name_or_ipam(key: str) -> None:
    e = conf_error({"cniVersion": "1.0.0", "name": "n", "delegate": {key: {}}})
    assert e.code == 7 and "may not contain 'name' or 'ipam'" in e.msg


def test_delegate_type_must_be_a_string() -> None:
    e = conf_error({"cniVersion": "1.0.0", "name": "n", "delegate": {"type": 5}})
    assert e.code == 7 and "delegate type 5" in e.msg
    e = conf_error({"cniVersion": "1.0.0", "name": "n", "delegate": {"type": "../bin/sh"}})
    assert e.code == 7 and "../bin/sh" in e.msg


@pytest.mark.parametrize("text", ["", "{", "[1]", '"x"', '{"a":1} {"b":2}', "\xff"])
def test_undecodable_conf_is_code_6(text: str) -> None:
    assert conf_error(text).code == 6


@pytest.mark.parametrize("version", [None, "0.2.0", "2.0.0", 1])
def test_unsupported_cni_version_is_code_1(version: Any) -> None:
    conf: dict[str, Any] = {"name": "n"}
    if version is not None:
        conf["cniVersion"] = version
    e = conf_error(conf)
    assert e.code == 1 and repr(version) in e.msg


def test_check_status_gc_need_newer_versions() -> None:
    assert conf_error({"cniVersion": "0.3.1", "name": "n"}, "CHECK").code == 1
    assert conf_error({"cniVersion": "1.0.0", "name": "n"}, "STATUS").code == 1
    assert conf_error({"cniVersion": "1.0.0", "name": "n"}, "GC").code == 1
    parse_conf('{"cniVersion":"0.4.0","name":"n"}', "CHECK")
    parse_conf('{"cniVersion":"1.1.0","name":"n"}', "GC")


@pytest.mark.parametrize(
    ("conf", "words"),
    [
        ({"name": "bad name"}, "invalid network name 'bad name'"),
        ({"name": ""}, "invalid network name ''"),
        ({"name": "n", "dataDir": "relative/dir"}, "invalid dataDir 'relative/dir'"),
        ({"name": "n", "subnetFile": 7}, "invalid subnetFile 7"),
        ({"name": "n", "delegate": []}, "invalid delegate []"),
        ({"name": "n", "ipam": "host-local"}, "invalid ipam 'host-local'"),
        ({"name": "n", "ipam": {"subnet": "10.0.0.0/24"}}, "ipam.subnet cannot be set"),
        ({"name": "n", "ipam": {"ranges": []}}, "ipam.ranges cannot be set"),
        ({"name": "n", "ipam": {"routes": [{"gw": "1.2.3.4"}]}}, "invalid ipam.routes"),
        ({"name": "n", "ipam": {"type": 3}}, "invalid ipam type 3"),
    ],
)
def test_conf_errors_name_the_value(conf: dict[str, Any], words: str) -> None:
    e = conf_error({"cniVersion": "1.0.0", **conf})
    assert e.code == 7 and words in e.msg


# -- subnet.env -------------------------------------------------------------------------------


def test_missing_subnet_env_keys_are_named_exactly() -> None:
    with pytest.raises(CNIError) as info:
        parse_subnet_env("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_IPMASQ=true\n", "/x/subnet.env")
    assert info.value.code == 100
    assert info.value.msg == (
        "/x/subnet.env is missing FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET, FLANNEL_MTU"
    )
    with pytest.raises(CNIError) as info:
        parse_subnet_env("", "/x/subnet.env")
    assert info.value.msg == (
        "/x/subnet.env is missing FLANNEL_NETWORK or FLANNEL_IPV6_NETWORK, "
        "FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ"
    )


@pytest.mark.parametrize(
    ("replace", "words"),
    [
        (("10.244.1.1/24", "10.244.1/24"), "FLANNEL_SUBNET: '10.244.1/24'"),
        (("10.244.0.0/16", "10.244.0.0/33"), "FLANNEL_NETWORK: '10.244.0.0/33'"),
        (("10.244.0.0/16", "10.244.0.010/16"), "FLANNEL_NETWORK"),
        (("10.244.0.0/16", "300.244.0.0/16"), "octet 300"),
        (("=1450", "=big"), "FLANNEL_MTU: 'big'"),
        (("=1450", "=20"), "FLANNEL_MTU: '20'"),
        (("IPMASQ=true", "IPMASQ=yes"), "FLANNEL_IPMASQ: 'yes'"),
        (("FLANNEL_MTU=1450", "FLANNEL_MTU 1450"), "line 'FLANNEL_MTU 1450' is not KEY=VALUE"),
    ],
)
def test_garbled_subnet_env_names_the_value(replace: tuple[str, str], words: str) -> None:
    with pytest.raises(CNIError) as info:
        parse_subnet_env(EXAMPLE_ENV.replace(*replace))
    assert info.value.code == 100 and words in info.value.msg


def test_subnet_env_accepts_go_bools_comments_and_blank_lines() -> None:
    env = parse_subnet_env("# written by overlayd\n\n" + EXAMPLE_ENV.replace("=true", "=1"))
    assert env.ipmasq is True and env.mtu == 1450 and env.network == "10.244.0.0/16"


# -- results and JSON -------------------------------------------------------------------------


def test_convert_result_between_versions() -> None:
    modern = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0"}],
        "ips": [
            {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0},
            {"address": "fd00::5/64", "interface": 0},
        ],
    }
    old = convert_result(modern, "0.4.0")
    assert old["cniVersion"] == "0.4.0"
    assert [ip["version"] for ip in old["ips"]] == ["4", "6"]
    back = convert_result(old, "1.1.0")
    assert back == dict(modern, cniVersion="1.1.0")
    assert "version" not in modern["ips"][0]  # the input is not changed


def test_json_helpers_match_go() -> None:
    assert json_dumps({"b": [1, True, None], "a": "<&>é"}) == (
        '{"a":"\\u003c\\u0026\\u003eé","b":[1,true,null]}'
    )
    assert json_loads(' {"x": [1.5, "a\\u00e9"]}\n') == {"x": [1.5, "aé"]}
    for bad in ["NaN", "[1] 2", "", "{"]:
        with pytest.raises(ValueError):
            json_loads(bad)


def test_the_posix_helpers_do_what_os_does(tmp_path: Path) -> None:
    for directory, name in [("/a/b", "c"), ("/a/b/", "c"), ("/", "x"), ("", "x"), ("rel", "y")]:
        assert flannel.path_join(directory, name) == os.path.join(directory, name)
    assert flannel.process_environ() == dict(os.environ)
    (tmp_path / "f").write_text("x")
    assert flannel.is_file(str(tmp_path / "f"))
    assert not flannel.is_file(str(tmp_path)) and not flannel.is_file(str(tmp_path / "nope"))
    # make_dirs: parents created, the leaf gets the mode, an existing dir is fine.
    leaf = tmp_path / "a" / "b" / "c"
    flannel.make_dirs(str(leaf), 0o700)
    assert leaf.is_dir() and (leaf.stat().st_mode & 0o777) == 0o700
    flannel.make_dirs(str(leaf), 0o700)
    flannel.make_dirs(str(leaf) + "/", 0o700)
    with pytest.raises(FileExistsError, match="not a directory"):
        flannel.make_dirs(str(tmp_path / "f"), 0o700)
    with pytest.raises(NotADirectoryError):
        flannel.make_dirs(str(tmp_path / "f" / "sub"), 0o700)


def test_the_plugin_imports_nothing_but_the_standard_library() -> None:
    source = Path(flannel.__file__).read_text()
    imports = {
        line.split()[1].split(".")[0]
        for line in source.splitlines()
        if line.strip().startswith(("import ", "from ")) and not line.startswith("#")
    }
    assert imports <= {"__future__", "posix", "sys", "typing", "_json", "json", "fcntl", "time"} | {
        "select",
        "ipaddress",
    }, imports


# -- the installed plugin, exec'd (no root: no delegate gets that far) --------------------------


def run_main(env: dict[str, str], conf: bytes) -> tuple[int, dict[str, Any]]:
    out = io.BytesIO()
    rc = flannel.main(env, conf, out)
    return rc, json.loads(out.getvalue()) if out.getvalue() else {}


def test_version_output(plugin: Path) -> None:
    reply = call(plugin, "VERSION", {"cniVersion": "0.4.0"})
    assert reply.rc == 0
    assert reply.out == {
        "cniVersion": "0.4.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }
    assert call(plugin, "VERSION", b"").out["cniVersion"] == "1.1.0"


@pytest.mark.parametrize(
    "cid", ["../../etc/evil", "a/b", "..", ".hidden", "-x", "x y", "a\x00b", "é"]
)
def test_path_traversal_container_ids_are_refused(plugin: Path, tmp_path: Path, cid: str) -> None:
    data_dir = tmp_path / "state" / "flannel"
    env_file = write_subnet_env(tmp_path / "subnet.env")
    conf = {
        "cniVersion": "1.0.0",
        "name": "n",
        "type": "flannel",
        "dataDir": str(data_dir),
        "subnetFile": str(env_file),
    }
    before = sorted(p for p in tmp_path.rglob("*"))
    rc, out = run_main(
        {
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": cid,
            "CNI_IFNAME": "eth0",
            "CNI_NETNS": "/run/netns/none",
            "CNI_PATH": "/usr/lib/cni",
        },
        json.dumps(conf).encode(),
    )
    assert rc == 1 and out["code"] == 4 and "invalid CNI_CONTAINERID" in out["msg"]
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not data_dir.exists()


@pytest.mark.parametrize(
    "ifname", ["", ".", "..", "a/b", "eth:0", "eth 0", "a-very-long-ifname", "e\tth"]
)
def test_bad_ifnames_are_refused_by_add_and_del_succeeds(
    plugin: Path, tmp_path: Path, ifname: str
) -> None:
    conf = {
        "cniVersion": "1.0.0",
        "name": "n",
        "dataDir": str(tmp_path / "d"),
        "subnetFile": str(write_subnet_env(tmp_path / "subnet.env")),
    }
    reply = call(plugin, "ADD", conf, container_id="abc", ifname=ifname, netns="/run/netns/x")
    assert reply.rc == 1 and reply.code == 4
    assert f"invalid CNI_IFNAME {ifname!r}" in reply.out["msg"]
    # DEL of an attachment ADD refuses: nothing can have been saved for it, so it succeeds.
    (tmp_path / "d").mkdir()
    reply = call(plugin, "DEL", conf, container_id="abc", ifname=ifname)
    assert (reply.rc, reply.raw) == (0, "")
    assert list((tmp_path / "d").iterdir()) == []  # not even the lock file


def test_malformed_cni_args_and_missing_env(plugin: Path, tmp_path: Path) -> None:
    conf = {"cniVersion": "1.0.0", "name": "n", "dataDir": str(tmp_path / "d")}
    reply = call(
        plugin,
        "ADD",
        conf,
        container_id="abc",
        netns="/run/netns/x",
        extra_env={"CNI_ARGS": "IgnoreUnknown=1;oops"},
    )
    assert reply.code == 4 and "'oops'" in reply.out["msg"]
    ok = call(plugin, "DEL", conf, container_id="abc", extra_env={"CNI_ARGS": "IgnoreUnknown=1"})
    assert ok.rc == 0 and ok.raw == ""  # DEL of something never added succeeds
    assert call(plugin, "ADD", conf, container_id="").code == 4
    assert call(plugin, "BOGUS", conf, container_id="abc").code == 4
    assert call(plugin, "ADD", conf, container_id="abc", netns="").code == 4
    assert not (tmp_path / "d").exists()


def test_missing_subnet_env_is_try_again_later(plugin: Path, tmp_path: Path) -> None:
    conf = {
        "cniVersion": "0.4.0",
        "name": "n",
        "subnetFile": str(tmp_path / "nope.env"),
        "dataDir": str(tmp_path / "d"),
    }
    reply = call(plugin, "ADD", conf, container_id="abc", netns="/run/netns/x")
    assert reply.rc == 1
    assert reply.out["code"] == 11 and reply.out["cniVersion"] == "0.4.0"
    assert str(tmp_path / "nope.env") in reply.out["msg"]
    assert not (tmp_path / "d").exists()


def test_garbled_subnet_env_names_missing_keys(plugin: Path, tmp_path: Path) -> None:
    env_file = tmp_path / "subnet.env"
    env_file.write_text("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n")
    conf = {"cniVersion": "1.0.0", "name": "n", "subnetFile": str(env_file)}
    reply = call(plugin, "ADD", conf, container_id="abc", netns="/run/netns/x")
    assert reply.code == 100
    assert reply.out["msg"] == f"{env_file} is missing FLANNEL_MTU, FLANNEL_IPMASQ"


def test_status_needs_subnet_env(plugin: Path, tmp_path: Path) -> None:
    env_file = tmp_path / "subnet.env"
    conf = {"cniVersion": "1.1.0", "name": "n", "subnetFile": str(env_file)}
    reply = call(plugin, "STATUS", conf)
    assert reply.rc == 1 and reply.code == 50
    write_subnet_env(env_file)
    reply = call(plugin, "STATUS", conf)  # the reference bridge speaks 1.0.0: no forwarding
    assert reply.rc == 0 and reply.raw == ""


def test_runs_as_python_dash_m(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(flannel.__file__).parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "cni.flannel"],
        input=b'{"cniVersion":"1.0.0"}',
        env={"CNI_COMMAND": "VERSION", "PATH": os.environ.get("PATH", "")},
        cwd=repo,
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert json.loads(proc.stdout)["cniVersion"] == "1.0.0"


@pytest.mark.parametrize(
    ("program", "words"),
    [("false", "failed with exit status 1"), ("true", "printed no JSON result")],
)
def test_a_delegate_without_cni_output_is_code_102(
    plugin: Path, tmp_path: Path, program: str, words: str
) -> None:
    """Real programs as a broken delegate: /bin/false fails silently, /bin/true 'succeeds'
    without a result. Both must become a clear CNI error, and no saved conf is left."""
    bindir = Path("/bin") if Path(f"/bin/{program}").exists() else Path("/usr/bin")
    env_file = write_subnet_env(tmp_path / "subnet.env")
    conf = {
        "cniVersion": "1.0.0",
        "name": "n",
        "subnetFile": str(env_file),
        "dataDir": str(tmp_path / "d"),
        "delegate": {"type": program},
    }
    reply = call(
        plugin, "ADD", conf, container_id="abc", netns="/run/netns/x", cni_path=str(bindir)
    )
    assert reply.rc == 1 and reply.code == 102, reply.raw
    assert words in reply.out["msg"] and program in reply.out["msg"]
    if program == "true":  # its DEL "succeeds", so the failed ADD's saved conf is gone
        assert [p.name for p in (tmp_path / "d").iterdir()] == [".lock"]
