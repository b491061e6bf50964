"""Properties (hypothesis) of the plugin's parsers, in process: the network configuration,
the CNI_* environment, CNI_ARGS, and main() as a whole. Each states what must hold: valid
input gives exactly the generator's fields; invalid input gives a CNIError with the right
code; nothing gives another exception (main's last resort, code 999, is asserted absent)."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cni import flannel
from cni.flannel import CNIError, parse_cni_args, parse_conf

NAME = r"[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,40}"
names = st.from_regex(NAME, fullmatch=True)
paths = st.from_regex(r"/[a-zA-Z0-9/._\-]{0,60}", fullmatch=True)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
routes = st.lists(st.fixed_dictionaries({"dst": st.text(max_size=20)}), max_size=3)
delegates = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k not in ("name", "ipam", "type")), json_values, max_size=4
).flatmap(lambda d: st.one_of(st.just(d), names.map(lambda t: dict(d, type=t))))
ipams = st.dictionaries(
    st.text(max_size=8).filter(
        lambda k: k not in ("type", "subnet", "ranges", "rangeStart", "rangeEnd", "routes")
    ),
    json_values,
    max_size=3,
).flatmap(
    lambda d: st.fixed_dictionaries({}, optional={"type": names, "routes": routes}).map(
        lambda extra: {**d, **extra}
    )
)
confs = st.fixed_dictionaries(
    {"cniVersion": st.sampled_from(flannel.SUPPORTED_VERSIONS), "name": names},
    optional={
        "type": st.just("flannel"),
        "subnetFile": paths,
        "dataDir": paths,
        "delegate": delegates,
        "ipam": ipams,
        "runtimeConfig": json_values.filter(lambda v: v is not None),
    },
)


@given(confs)
def test_a_valid_conf_gives_exactly_its_fields(conf: dict[str, Any]) -> None:
    parsed = parse_conf(json.dumps(conf).encode(), "ADD")
    assert parsed.raw == conf
    assert parsed.cni_version == conf["cniVersion"] and parsed.name == conf["name"]
    assert parsed.subnet_file == conf.get("subnetFile", flannel.DEFAULT_SUBNET_FILE)
    assert parsed.data_dir == conf.get("dataDir", flannel.DEFAULT_DATA_DIR)
    assert parsed.delegate == conf.get("delegate", {})
    assert parsed.ipam == conf.get("ipam", {})
    assert parsed.runtime_config == conf.get("runtimeConfig")


# One field made invalid at a time, and the code it must give.
breakages = st.one_of(
    st.tuples(st.just("cniVersion"), st.text(max_size=8) | json_values, st.just(1)),
    st.tuples(st.just("name"), st.text(max_size=8) | json_values, st.just(7)),
    st.tuples(
        st.just("dataDir"),
        st.text(max_size=8) | json_values | st.just("/a\0b") | st.just("/" + "a" * 4095),
        st.just(7),
    ),
    st.tuples(st.just("subnetFile"), st.text(max_size=8) | json_values, st.just(7)),
    st.tuples(st.just("delegate"), json_values, st.just(7)),
    st.tuples(st.just("delegate"), st.fixed_dictionaries({"name": json_values}), st.just(7)),
    st.tuples(st.just("delegate"), st.fixed_dictionaries({"type": json_values}), st.just(7)),
    st.tuples(st.just("ipam"), json_values, st.just(7)),
    st.tuples(
        st.just("ipam"),
        st.sampled_from(["subnet", "ranges", "rangeStart", "rangeEnd"]).flatmap(
            lambda k: st.fixed_dictionaries({k: json_values})
        ),
        st.just(7),
    ),
    st.tuples(st.just("ipam"), st.fixed_dictionaries({"routes": json_values}), st.just(7)),
)


def still_valid(key: str, value: Any) -> bool:
    """Whether a "breakage" happened to produce a valid value after all."""
    conf = {"cniVersion": "1.0.0", "name": "n", key: value}
    try:
        parse_conf(json.dumps(conf), "ADD")
    except CNIError:
        return False
    return True


@given(confs, breakages)
def test_an_invalid_field_gives_its_code(
    conf: dict[str, Any], breakage: tuple[str, Any, int]
) -> None:
    key, value, code = breakage
    assume(not still_valid(key, value))
    conf = dict(conf, **{key: value})
    with pytest.raises(CNIError) as info:
        parse_conf(json.dumps(conf).encode(), "ADD")
    if key != "cniVersion":  # a bad version is reported first, whatever else is wrong
        assert info.value.code == code, info.value.msg
    else:
        assert info.value.code == 1
    assert len(info.value.msg) < 1000


@given(json_values)
def test_any_json_is_a_conf_or_code_1_6_7(doc: Any) -> None:
    try:
        parse_conf(json.dumps(doc).encode(), "ADD")
    except CNIError as e:
        assert e.code in (1, 6, 7)
        assert isinstance(doc, dict) or e.code == 6


@given(st.binary(max_size=300))
def test_any_bytes_are_a_conf_or_a_typed_error(data: bytes) -> None:
    try:
        parse_conf(data, "ADD")
    except CNIError as e:
        assert e.code in (1, 6, 7)


@given(st.integers(1, 3000), st.booleans())
def test_nesting_beyond_the_limit_is_code_6(depth: int, arrays: bool) -> None:
    """The conf object is one level; runtimeConfig adds `depth` more."""
    inner = "[" * depth + "]" * depth if arrays else '{"a":' * depth + "1" + "}" * depth
    text = '{"cniVersion":"1.0.0","name":"n","runtimeConfig":' + inner + "}"
    if 1 + depth <= flannel.MAX_JSON_DEPTH:
        assert parse_conf(text).runtime_config == json.loads(inner)
    else:
        with pytest.raises(CNIError) as info:
            parse_conf(text)
        assert info.value.code == 6 and "nested deeper" in info.value.msg


# -- the CNI_* environment ----------------------------------------------------------------------

container_ids = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,238}", fullmatch=True)
ifnames = st.text(
    st.characters(categories=("L", "N", "Pd", "Pc", "Po", "S"), exclude_characters="/:"),
    min_size=1,
    max_size=15,
).filter(lambda n: n not in (".", "..") and len(n.encode()) <= 15)
path_lists = st.lists(st.from_regex(r"[^:\0]{0,20}", fullmatch=True), min_size=1, max_size=5).map(
    lambda dirs: [*dirs, "/opt/cni/bin"]
)


@given(container_ids, ifnames, st.text(min_size=1, max_size=30), path_lists)
def test_a_valid_environment_gives_exactly_its_fields(
    cid: str, ifname: str, netns: str, path: list[str]
) -> None:
    env = {
        "CNI_CONTAINERID": cid,
        "CNI_IFNAME": ifname,
        "CNI_NETNS": netns,
        "CNI_PATH": ":".join(path),
    }
    args = flannel.Args(env, "ADD")
    flannel.check_args(args)
    assert (args.container_id, args.ifname, args.netns) == (cid, ifname, netns)
    assert args.path == [p for p in path if p]


bad_ids = st.one_of(
    st.text(max_size=20).filter(lambda t: not flannel.valid_name(t)),
    st.from_regex(r"[a-z][a-z0-9]{239,300}", fullmatch=True),
    st.binary(min_size=1, max_size=10)
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
    .filter(lambda t: not flannel.valid_name(t)),
)
bad_ifnames = st.one_of(
    st.text(max_size=20).filter(lambda t: not _ifname_ok(t)),
    st.binary(min_size=1, max_size=20)
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
    .filter(lambda t: not _ifname_ok(t)),
)


def _ifname_ok(name: str) -> bool:
    try:
        flannel.check_ifname(name)
    except CNIError:
        return False
    return True


@given(st.one_of(st.tuples(bad_ids, st.just("eth0")), st.tuples(st.just("ctr"), bad_ifnames)))
def test_an_attachment_add_refuses_is_code_4_and_del_of_it_succeeds_untouched(
    attachment: tuple[str, str],
) -> None:
    cid, ifname = attachment
    env = {"CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_NETNS": "/x", "CNI_PATH": "/nowhere"}
    with pytest.raises(CNIError) as info:
        flannel.check_args(flannel.Args(env, "ADD"))
    assert info.value.code == 4
    with tempfile.TemporaryDirectory() as tmp:
        conf = parse_conf(json.dumps({"cniVersion": "1.0.0", "name": "n", "dataDir": tmp}))
        flannel.cmd_del(flannel.Args(env, "DEL"), conf)  # no exception: success
        assert list(Path(tmp).iterdir()) == []  # not even the lock was taken


# -- CNI_ARGS -----------------------------------------------------------------------------------

arg_keys = st.text(min_size=1, max_size=10).filter(lambda k: "=" not in k and ";" not in k)
arg_values = st.text(max_size=10).filter(lambda v: ";" not in v)


@given(st.lists(st.tuples(arg_keys, arg_values), max_size=6), st.booleans())
def test_cni_args_pairs_round_trip(pairs: list[tuple[str, str]], trailing: bool) -> None:
    text = ";".join(f"{k}={v}" for k, v in pairs) + (";" if trailing else "")
    assert parse_cni_args(text) == pairs


@given(st.text(max_size=60))
def test_cni_args_are_pairs_or_code_4(text: str) -> None:
    try:
        pairs = parse_cni_args(text)
    except CNIError as e:
        assert e.code == 4
        assert any(item and ("=" not in item or item.startswith("=")) for item in text.split(";"))
    else:
        assert ";".join(f"{k}={v}" for k, v in pairs) == ";".join(i for i in text.split(";") if i)
        assert all(k for k, _ in pairs)


# -- main() as a whole --------------------------------------------------------------------------

env_text = st.one_of(
    st.text(max_size=20),
    st.binary(max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.sampled_from(["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC", "ctr", "eth0", ""]),
)


@given(
    st.dictionaries(
        st.sampled_from(
            ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS", "CNI_ARGS", "CNI_PATH"]
        ),
        env_text,
    ),
    st.one_of(
        st.just("site"),
        st.just("site-1.1.0"),
        st.binary(max_size=100),
        json_values.map(lambda v: json.dumps(v).encode()),
    ),
)
def test_main_always_answers_within_the_contract(env: dict[str, str], stdin: str | bytes) -> None:
    """Any environment, any stdin (or a valid conf naming a private subnet.env and dataDir):
    a result or a CNI error object with a CNI code, never 999; no delegate can be found (the
    CNI_PATH is random), so no ADD succeeds and nothing may be saved."""
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "flannel"
        subnet_env = Path(tmp) / "subnet.env"
        subnet_env.write_text(
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.2.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        )
        if isinstance(stdin, str):
            version = "1.1.0" if stdin.endswith("1.1.0") else "1.0.0"
            conf = {
                "cniVersion": version,
                "name": "n",
                "dataDir": str(data_dir),
                "subnetFile": str(subnet_env),
            }
            stdin = json.dumps(conf).encode()
        out = io.BytesIO()
        rc = flannel.main(env, stdin, out)
        reply = json.loads(out.getvalue()) if out.getvalue() else None
        if rc == 0:
            assert reply is None or "supportedVersions" in reply or "cniVersion" in reply
        else:
            assert isinstance(reply, dict) and reply["code"] != flannel.ERR_INTERNAL, reply
            assert reply["code"] in {1, 3, 4, 5, 6, 7, 11, 50, 100, 101, 102}, reply
        assert (
            not data_dir.exists()
            or [p.name for p in data_dir.iterdir() if not p.name.startswith(".")] == []
        )
