"""Property-based tests (hypothesis) of the codecs for what comes out of etcd: lease keys, lease
values and the network config. Pure, no etcd.

Each property says what must hold for any input: a typed error (MalformedLease, ConfigError) or a
valid result, never another exception; and the round trips. Profiles: tests/conftest.py ("ci"
by default, HYPOTHESIS_PROFILE=long for 25x more examples).
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

from subnetmgr.model import (
    MAX_JSON_DEPTH,
    MAX_VALUE_BYTES,
    NO_IPV4,
    ConfigError,
    JsonRejected,
    Lease,
    LeaseAttrs,
    MalformedLease,
    NetworkConfig,
    json_too_deep,
    load_json,
    parse_subnet_key,
    subnet_key,
)

# --------------------------------------------------------------------------- strategies

v4_networks = st.builds(
    lambda addr, length: IPv4Network((addr, length), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
v6_networks = st.builds(
    lambda addr, length: IPv6Network((addr, length), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
# Strings made of JSON's own punctuation: brackets inside strings must not count as nesting.
tricky_text = st.text(alphabet='[]{}"\\:,ab \n\u00e9\ud800', max_size=12)
tricky_values = st.recursive(
    st.one_of(st.none(), st.integers(), tricky_text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_text, inner, max_size=3),
    max_leaves=40,
)
ipv4_text = st.builds(lambda n: str(IPv4Address(n)), st.integers(0, 2**32 - 1))
backend_types = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}", fullmatch=True)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


# --------------------------------------------------------------------------- lease keys


@given(v4_networks, st.none() | v6_networks)
def test_lease_key_round_trip(v4: IPv4Network, v6: IPv6Network | None) -> None:
    assert parse_subnet_key(subnet_key(v4, v6)) == (v4, v6)


@given(v6_networks, v4_networks)
def test_ipv6_only_keys_round_trip_and_are_keyed_by_their_ipv6_subnet(
    v6: IPv6Network, v4: IPv4Network
) -> None:
    """flannel's IPv6-only key `0.0.0.0-0&<v6>`: it parses back, and the lease it names is
    keyed (ident) by its IPv6 subnet; any other key is keyed by its IPv4 subnet."""
    key = subnet_key(NO_IPV4, v6)
    assert key == f"0.0.0.0-0&{v6.network_address}-{v6.prefixlen}"
    assert parse_subnet_key(key) == (NO_IPV4, v6)
    only6 = Lease(NO_IPV4, LeaseAttrs(IPv4Address(0), IPv6Address(1)), v6)
    assert only6.ipv6_only and only6.ident == v6 and only6.attrs.address == IPv6Address(1)
    if v4 != NO_IPV4:
        dual = Lease(v4, LeaseAttrs(IPv4Address(1), IPv6Address(1)), v6)
        assert not dual.ipv6_only and dual.ident == v4 and dual.attrs.address == IPv4Address(1)


near_keys = st.from_regex(
    r"0?[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}-0?[0-9]{1,2}"
    r"(&[0-9a-fA-F:.]{1,24}-[0-9]{1,3})?\n?",
    fullmatch=True,
)


@given(st.one_of(st.text(), near_keys))
def test_any_lease_key_is_refused_or_parsed_canonically(text: str) -> None:
    try:
        v4, v6 = parse_subnet_key(text)
    except MalformedLease as e:
        assert e.reason == "bad_key"
        return
    # Only the spelling subnet_key writes parses: no second key for one subnet.
    assert subnet_key(v4, v6) == text
    assert v4.prefixlen <= 32 and (v6 is None or v6.prefixlen <= 128)


@pytest.mark.parametrize(
    "text",
    ["10.5.52.0-024", "10.5.52.0-24\n", "010.5.52.0-24", "10.5.52.0-24&FD00::-56",
     "10.5.52.0-24&fd00:0::-56", "\u0661\u0660.5.52.0-24", "10.5.52.0-24 ", "x" * 10_000],
)  # fmt: skip
def test_second_spellings_of_a_key_are_refused(text: str) -> None:
    with pytest.raises(MalformedLease) as e:
        parse_subnet_key(text)
    assert e.value.reason == "bad_key"
    assert len(str(e.value)) < 300  # a huge key is not copied into the message


# --------------------------------------------------------------------------- lease values

lease_attrs = st.builds(
    LeaseAttrs,
    public_ip=st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
    public_ipv6=st.none() | st.builds(IPv6Address, st.integers(0, 2**128 - 1)),
    backend_type=st.just("") | backend_types,
    backend_data=st.none() | st.dictionaries(st.text(max_size=8), json_values, min_size=1),
    backend_v6_data=st.none() | st.dictionaries(st.text(max_size=8), json_values, min_size=1),
)


@given(lease_attrs)
def test_lease_value_round_trip(attrs: LeaseAttrs) -> None:
    text = attrs.to_json()
    back = LeaseAttrs.from_json(text)
    assert back == attrs
    assert back.backend_data == attrs.backend_data  # eq covers it; said out loud
    assert back.to_json() == text
    assert LeaseAttrs.from_json(text.encode()) == attrs


def _check_lease_value(data: str | bytes) -> None:
    try:
        attrs = LeaseAttrs.from_json(data)
    except MalformedLease as e:
        assert e.reason in {"too_large", "not_utf8", "too_deep", "not_json", "not_object",
                            "bad_public_ip", "bad_public_ipv6", "bad_backend_type",
                            "bad_backend_data"}  # fmt: skip
        return
    doc = json.loads(data)
    assert isinstance(doc, dict) and str(attrs.public_ip) == doc["PublicIP"]
    assert depth(doc) <= MAX_JSON_DEPTH
    # What decoded encodes again and decodes to the same attributes.
    assert LeaseAttrs.from_json(attrs.to_json()) == attrs


@given(st.binary(max_size=300))
def test_any_bytes_are_a_lease_value_or_malformed(data: bytes) -> None:
    _check_lease_value(data)


lease_docs = st.fixed_dictionaries(
    {},
    optional={
        "PublicIP": st.one_of(ipv4_text, json_values),
        "PublicIPv6": st.one_of(st.none(), st.just("fd00::1"), json_values),
        "BackendType": st.one_of(backend_types, json_values),
        "BackendData": st.one_of(st.dictionaries(st.text(max_size=8), json_values), json_values),
        "BackendV6Data": json_values,
        "Other": json_values,
    },
)


@given(st.one_of(lease_docs, json_values, tricky_values))
def test_any_json_is_a_lease_value_or_malformed(doc: object) -> None:
    _check_lease_value(json.dumps(doc))
    _check_lease_value(json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass"))


@given(st.integers(1, 20_000), st.sampled_from(["[", '{"a":']))
def test_nesting_beyond_the_limit_is_too_deep_not_a_crash(n: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    inner = opener * n + "1" + closer * n
    value = '{"PublicIP":"10.0.0.1","BackendData":{"x":' + inner + "}}"
    try:
        LeaseAttrs.from_json(value)
    except MalformedLease as e:
        assert n + 2 > MAX_JSON_DEPTH or len(value) > MAX_VALUE_BYTES
        assert e.reason == ("too_large" if len(value) > MAX_VALUE_BYTES else "too_deep")
    else:
        assert n + 2 <= MAX_JSON_DEPTH


@given(tricky_values, st.integers(0, 40))
def test_depth_check_agrees_with_the_real_depth(doc: object, limit: int) -> None:
    text = json.dumps(doc)
    assert json_too_deep(text, limit) == (depth(doc) > limit)
    raw = json.dumps(doc, ensure_ascii=False)
    assert json_too_deep(raw, limit) == (depth(doc) > limit)


def reference_depth(text: str) -> int:
    """The deepest nesting a JSON parser reaches reading `text` left to right, up to a stray
    backslash or an unclosed string (where any parser stops with an error)."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            break
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            if i >= n:
                break
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
        i += 1
    return deepest


@given(st.text(alphabet='[]{}"\\a,', max_size=120), st.integers(0, 40))
def test_depth_check_never_underestimates_what_a_parser_reaches(text: str, limit: int) -> None:
    if reference_depth(text) > limit:
        assert json_too_deep(text, limit)


def test_limits_come_before_the_interpreter() -> None:
    """Deep nesting, 1 MiB, NaN: refused with their own reason (RecursionError never escapes)."""
    for data, reason in [
        (b"[" * 100_000 + b"]" * 100_000, "too_large"),
        (b"[" * 30_000, "too_deep"),
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "too_deep"),
        (b" " * (MAX_VALUE_BYTES + 1), "too_large"),
        (b"\xc3\x28", "not_utf8"),
        (b"NaN", "not_json"),
        (b'{"PublicIP":"10.0.0.1","BackendData":{"x":Infinity}}', "not_json"),
        (b"1" * 5000, "not_json"),  # beyond int_max_str_digits
    ]:
        with pytest.raises(JsonRejected) as e:
            load_json(data)
        assert e.value.reason == reason, data[:40]


# --------------------------------------------------------------------------- network config

config_keys = st.sampled_from(
    ["Network", "network", "NETWORK", "SubnetLen", "SubnetMin", "SubnetMax", "Backend",
     "EnableIPv4", "EnableIPv6", "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin",
     "IPv6SubnetMax", "EnableNFTables", "Unknown"]
)  # fmt: skip
config_values = st.one_of(
    st.builds(lambda n: str(n), v4_networks),
    st.builds(lambda n: str(n), v6_networks),
    ipv4_text,
    st.builds(lambda n: str(n.network_address), v4_networks),
    st.integers(-5, 40),
    st.fixed_dictionaries({"Type": st.one_of(backend_types, json_values)}),
    json_values,
)
config_docs = st.dictionaries(config_keys, config_values, max_size=8)


def _check_config(data: str | bytes) -> None:
    try:
        config = NetworkConfig.from_json(data)
    except ConfigError as e:
        assert str(e).startswith("network config: ") and len(str(e)) < 600
        return
    net = config.network
    if net is None:  # IPv6-only (EnableIPv4 false): only the IPv6 part is set
        event("IPv6-only config")
        assert not config.enable_ipv4 and config.enable_ipv6 and config.ipv6_only
        assert config.subnet_min is None and config.subnet_max is None
        net6 = config.ipv6_network
        assert net6 is not None and config.ipv6_subnet_min is not None
        assert net6.prefixlen + 2 <= config.ipv6_subnet_len <= 126
        assert config.contains(NO_IPV4) and not config.contains(IPv4Network("10.0.0.0/24"))
        assert config.contains_ipv6(config.ipv6_subnet_min)
        return
    assert config.enable_ipv4 and not config.ipv6_only
    assert net.prefixlen <= 28
    assert net.prefixlen + 2 <= config.subnet_len <= 30
    step = 1 << (32 - config.subnet_len)
    for bound in (config.subnet_min, config.subnet_max):
        assert bound.prefixlen == config.subnet_len and bound.subnet_of(net)
        assert (int(bound.network_address) - int(net.network_address)) % step == 0
    assert config.subnet_min.network_address <= config.subnet_max.network_address
    assert config.contains(config.subnet_min) and config.contains(config.subnet_max)
    assert isinstance(config.backend_type, str) and config.backend_type


@given(st.one_of(config_docs, json_values))
def test_any_json_is_a_config_or_a_config_error(doc: object) -> None:
    _check_config(json.dumps(doc))


@given(st.binary(max_size=300))
def test_any_bytes_are_a_config_or_a_config_error(data: bytes) -> None:
    _check_config(data)


@given(v4_networks, st.integers(0, 32))
def test_a_plain_network_config_parses_to_its_network(network: IPv4Network, length: int) -> None:
    assume(network.prefixlen <= 28)
    config = NetworkConfig.from_json(json.dumps({"Network": str(network)}))
    assert config.network == network
    _check_config(json.dumps({"Network": str(network), "SubnetLen": length}))


def test_hostile_configs_are_config_errors() -> None:
    for data, needle in [
        (b"[" * 3000, "nested deeper than 32 levels"),
        ('{"Network":"10.1.0.0/16","Backend":' + "[" * 200 + "]" * 200 + "}", "nested deeper"),
        (b'{"Network":"10.1.0.0/16","x":"' + b"a" * (1 << 20) + b'"}', "too large: 1048"),
        (b'{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan\xff"}}', "not UTF-8"),
        ('{"Network":["10.1.0.0/16"]}', "Network="),
        ('{"Network":"10.1.0.0/16","SubnetLen":"24"}', "must be an integer"),
        ('{"Network":"10.1.0.0/16","SubnetLen":1e400}', "out of range"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            NetworkConfig.from_json(data)
