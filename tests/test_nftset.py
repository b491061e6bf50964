"""Pure tests of backends/nftset.py: the nft scripts built from a set of peers, the parser of
`nft -j` listings and the netlink counter codec (no root; property-based with hypothesis).

The listings fed to the parser are built here the way nftables 1.0.6 prints them (checked
against `nft -j list table` on this machine; tests/test_vxlan_filter.py reads real listings).
"""

from __future__ import annotations

import copy
import json
import os
import re
import struct
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from backends import netlink as nl
from backends import nftset
from backends.nftset import Counter, NftError, PortFilter, TableState

SPEC = PortFilter("overlay_vxlan", 8472, "overlay vxlan: admit only lease PublicIPs (FilterPeers)")
SPEC6 = PortFilter(
    "overlay_vxlan", 8472, "overlay vxlan: admit only lease PublicIPv6s (FilterPeers)", family="ip6"
)

addresses = st.ip_addresses(v=4)
address_sets = st.frozensets(addresses, max_size=300)
address6_sets = st.frozensets(st.ip_addresses(v=6), max_size=300)
spec_and_sets = st.one_of(
    st.tuples(st.just(SPEC), address_sets), st.tuples(st.just(SPEC6), address6_sets)
)
u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
counters = st.builds(Counter, u64, u64)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=30,
)


# --------------------------------------------------------------------------- scripts


def test_table_script_pinned() -> None:
    """The exact file for two peers: what `nft -f -` gets (one transaction)."""
    peers = {IPv4Address("192.168.93.2"), IPv4Address("10.0.0.1")}
    assert nftset.table_script(SPEC, peers, counter=Counter(3, 150), replace=True) == (
        "add table ip overlay_vxlan\n"
        "delete table ip overlay_vxlan\n"
        "table ip overlay_vxlan {\n"
        "\tcounter dropped { packets 3 bytes 150 }\n"
        "\tset peers { type ipv4_addr; }\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        '\t\tudp dport 8472 ip saddr != @peers counter name "dropped" drop '
        'comment "overlay vxlan: admit only lease PublicIPs (FilterPeers)"\n'
        "\t}\n"
        "}\n"
        "add element ip overlay_vxlan peers { 10.0.0.1, 192.168.93.2 }\n"
    )


_STATEMENT = re.compile(r"^(add|delete) element ip overlay_vxlan peers \{ (.+) \}$")


def statements(script: str) -> list[tuple[str, list[IPv4Address]]]:
    out = []
    for line in script.splitlines():
        m = _STATEMENT.match(line)
        if m:
            out.append((m.group(1), [IPv4Address(a) for a in m.group(2).split(", ")]))
    return out


@given(address_sets, counters, st.booleans())
def test_table_script_holds_every_peer_once(
    peers: frozenset[IPv4Address], counter: Counter, replace: bool
) -> None:
    script = nftset.table_script(SPEC, peers, counter=counter, replace=replace)
    lines = script.splitlines()
    assert (lines[:2] == ["add table ip overlay_vxlan", "delete table ip overlay_vxlan"]) == replace
    assert f"\tcounter dropped {{ packets {counter.packets} bytes {counter.bytes} }}" in lines
    assert f"\t\t{SPEC.rule}" in lines
    found = statements(script)
    assert all(verb == "add" for verb, _ in found)
    listed = [a for _, chunk in found for a in chunk]
    assert sorted(listed) == sorted(peers), "each peer exactly once"
    assert all(0 < len(chunk) <= nftset.ELEMENTS_PER_STATEMENT for _, chunk in found)
    # Nothing but the table's declaration and element statements.
    other = [
        line for line in lines if not _STATEMENT.match(line) and not line.startswith(("add t", "d"))
    ]
    assert len(other) == 8


def test_many_peers_are_cut_into_statements() -> None:
    peers = {IPv4Address(0x0A000000 + i) for i in range(2500)}
    found = statements(nftset.table_script(SPEC, peers))
    assert [len(chunk) for _, chunk in found] == [1024, 1024, 452]


@given(address_sets, address_sets)
def test_element_script_adds_and_deletes_exactly(
    admit: frozenset[IPv4Address], remove: frozenset[IPv4Address]
) -> None:
    remove = remove - admit
    script = nftset.element_script(SPEC, admit, remove)
    found = statements(script)
    assert (script == "") == (not admit and not remove)
    assert len(found) == len(script.splitlines()), "only element statements"
    added = [a for verb, chunk in found if verb == "add" for a in chunk]
    deleted = [a for verb, chunk in found if verb == "delete" for a in chunk]
    # Removed ones are added first, so a delete of an element already gone cannot fail.
    assert sorted(added) == sorted(admit | remove)
    assert sorted(deleted) == sorted(remove)
    verbs = [verb for verb, _ in found]
    assert verbs == sorted(verbs), "all adds before the deletes"


def test_element_script_refuses_an_address_both_ways() -> None:
    a = IPv4Address("10.0.0.1")
    with pytest.raises(ValueError, match="both admitted and removed"):
        nftset.element_script(SPEC, {a}, {a})


def test_delete_script() -> None:
    assert nftset.delete_script(SPEC) == (
        "add table ip overlay_vxlan\ndelete table ip overlay_vxlan\n"
    )


@given(st.text(max_size=40), st.integers(), st.text(max_size=120))
def test_port_filter_accepts_only_safe_values(table: str, port: int, comment: str) -> None:
    """Whatever goes into a script is checked: a name, port or comment that could break out of
    its place in the nft file (quotes, braces, newlines, spaces) is a ValueError."""
    try:
        spec = PortFilter(table, port, comment)
    except ValueError:
        return
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", spec.table) and len(spec.table) <= 32
    assert 1 <= spec.port <= 65535
    assert not set(spec.comment) & set("\"'{};\n\r\\#$")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"table": "x y"}, "table name"),
        ({"table": ""}, "table name"),
        ({"port": 0}, "between 1 and 65535"),
        ({"port": True}, "not an integer"),
        ({"port": "8472"}, "not an integer"),
        ({"comment": 'a" drop; "'}, "comment"),
        ({"protocol": "sctp"}, "protocol"),
    ],
)
def test_port_filter_errors(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"table": "t", "port": 8472, "comment": "c", **kwargs}
    with pytest.raises(ValueError, match=message):
        PortFilter(**args)


# --------------------------------------------------------------------------- parsing nft -j


def listing(spec: PortFilter, elements: frozenset[Any], counter: Counter) -> dict[str, Any]:
    """`nft -j list table <family> <table>` as nftables 1.0.6 prints our table."""
    t, f = spec.table, spec.family
    set_body: dict[str, Any] = {
        "family": f,
        "name": "peers",
        "table": t,
        "type": spec.set_type,
        "handle": 3,
    }
    if elements:
        set_body["elem"] = [str(a) for a in sorted(elements)]
    return {
        "nftables": [
            {
                "metainfo": {
                    "version": "1.0.6",
                    "release_name": "Lester Gooch #5",
                    "json_schema_version": 1,
                }
            },
            {"table": {"family": f, "name": t, "handle": 1}},
            {
                "counter": {
                    "family": f,
                    "name": "dropped",
                    "table": t,
                    "handle": 2,
                    "packets": counter.packets,
                    "bytes": counter.bytes,
                }
            },
            {"set": set_body},
            {
                "chain": {
                    "family": f,
                    "table": t,
                    "name": "input",
                    "handle": 1,
                    "type": "filter",
                    "hook": "input",
                    "prio": 0,
                    "policy": "accept",
                }
            },
            {
                "rule": {
                    "family": f,
                    "table": t,
                    "chain": "input",
                    "handle": 4,
                    "comment": spec.comment,
                    "expr": spec.rule_expr(),
                }
            },
        ]
    }


@given(address_sets, counters)
def test_parse_table_round_trip(elements: frozenset[IPv4Address], counter: Counter) -> None:
    text = json.dumps(listing(SPEC, elements, counter))
    assert nftset.parse_table(SPEC, text) == TableState(elements, counter, ())


def _item(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    body: dict[str, Any] = next(i[kind] for i in doc["nftables"] if kind in i)
    return body


MUTATIONS: dict[str, Any] = {
    "chain priority": lambda d: _item(d, "chain").update(prio=10),
    "chain policy": lambda d: _item(d, "chain").update(policy="drop"),
    "chain hook": lambda d: _item(d, "chain").update(hook="prerouting"),
    "set flags": lambda d: _item(d, "set").update(flags=["interval"]),
    "set type": lambda d: _item(d, "set").update(
        type="ipv6_addr" if _item(d, "set")["type"] == "ipv4_addr" else "ipv4_addr"
    ),
    "element of the other family": lambda d: _item(d, "set").update(
        elem=["fd00::1" if ":" not in _item(d, "set")["elem"][0] else "10.0.0.1"]
    ),
    "rule of the other family": lambda d: _item(d, "rule")["expr"][1]["match"]["left"][
        "payload"
    ].update(protocol="ip6" if _item(d, "rule")["family"] == "ip" else "ip"),
    "set timeout": lambda d: _item(d, "set").update(timeout=60),
    "element not an address": lambda d: _item(d, "set").update(elem=[{"prefix": "x"}]),
    "element a range": lambda d: _item(d, "set").update(elem=[{"range": ["1.1.1.1", "1.1.1.9"]}]),
    "elements not a list": lambda d: _item(d, "set").update(elem="1.2.3.4"),
    "rule port": lambda d: _item(d, "rule")["expr"][0]["match"].update(right=4789),
    "rule verdict": lambda d: _item(d, "rule")["expr"].__setitem__(3, {"accept": None}),
    "rule comment": lambda d: _item(d, "rule").update(comment="mine"),
    "rule missing": lambda d: d["nftables"].remove({"rule": _item(d, "rule")}),
    "extra rule": lambda d: d["nftables"].append({"rule": copy.deepcopy(_item(d, "rule"))}),
    "extra chain": lambda d: d["nftables"].append(
        {"chain": {"family": _item(d, "table")["family"], "table": "overlay_vxlan", "name": "o"}}
    ),
    "extra map": lambda d: d["nftables"].append(
        {"map": {"family": _item(d, "table")["family"], "table": "overlay_vxlan", "name": "m"}}
    ),
    "another family's table": lambda d: _item(d, "table").update(
        family="inet" if _item(d, "table")["family"] == "ip" else "ip"
    ),
    "counter missing": lambda d: d["nftables"].remove({"counter": _item(d, "counter")}),
    "counter negative": lambda d: _item(d, "counter").update(packets=-1),
    "counter a bool": lambda d: _item(d, "counter").update(bytes=True),
    "set missing": lambda d: d["nftables"].remove({"set": _item(d, "set")}),
    "chain missing": lambda d: d["nftables"].remove({"chain": _item(d, "chain")}),
    "table missing": lambda d: d["nftables"].remove({"table": _item(d, "table")}),
    "another table's object": lambda d: _item(d, "chain").update(table="other"),
}


ONE = {"ip": frozenset({IPv4Address("10.0.0.1")}), "ip6": frozenset({IPv6Address("fd00::9")})}


@pytest.mark.parametrize("spec", [SPEC, SPEC6], ids=["ip", "ip6"])
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_parse_table_names_every_deviation(spec: PortFilter, mutation: str) -> None:
    doc = listing(spec, ONE[spec.family], Counter(1, 2))
    MUTATIONS[mutation](doc)
    state = nftset.parse_table(spec, json.dumps(doc))
    assert state.problems, f"{mutation}: not noticed"


@given(address_sets, counters, st.sampled_from(sorted(MUTATIONS)))
def test_parse_table_any_mutation_is_a_problem_never_a_crash(
    elements: frozenset[IPv4Address], counter: Counter, mutation: str
) -> None:
    doc = listing(SPEC, elements | {IPv4Address("10.0.0.1")}, counter)
    MUTATIONS[mutation](doc)
    assert nftset.parse_table(SPEC, json.dumps(doc)).problems


@given(json_values)
def test_parse_table_of_any_json_is_a_state_or_nft_error(value: Any) -> None:
    for doc in (value, {"nftables": value}, {"nftables": [value]}, {"nftables": [{"set": value}]}):
        try:
            state = nftset.parse_table(SPEC, json.dumps(doc))
        except NftError:
            continue
        assert isinstance(state, TableState)
        assert state.problems, "nothing but our own listing is free of problems"
        assert all(isinstance(a, IPv4Address) for a in state.elements)


@given(st.text(max_size=200))
def test_parse_table_of_any_text_is_a_state_or_nft_error(text: str) -> None:
    try:
        state = nftset.parse_table(SPEC, text)
    except NftError:
        return
    assert state.problems


def test_parse_table_deep_nesting_is_an_nft_error() -> None:
    with pytest.raises(NftError, match="not JSON"):
        nftset.parse_table(SPEC, "[" * 100_000 + "]" * 100_000)


TABLE_NAMES = st.from_regex(r"[a-z_]{1,8}", fullmatch=True)


@given(st.lists(st.tuples(st.sampled_from(["ip", "inet", "ip6"]), TABLE_NAMES)))
def test_parse_tables_round_trip(tables: list[tuple[str, str]]) -> None:
    doc = {"nftables": [{"metainfo": {}}]}
    doc["nftables"] += [{"table": {"family": f, "name": n, "handle": 1}} for f, n in tables]
    assert nftset.parse_tables(json.dumps(doc)) == set(tables)


@given(json_values)
def test_parse_tables_of_any_json_is_tables_or_nft_error(value: Any) -> None:
    for doc in (value, {"nftables": value}, {"nftables": [{"table": value}]}):
        try:
            found = nftset.parse_tables(json.dumps(doc))
        except NftError:
            continue
        assert all(isinstance(f, str) and isinstance(n, str) for f, n in found)


# --------------------------------------------------------------------------- netlink counter


def newobj_reply(seq: int, counter: Counter, *, ack: bool = True) -> bytes:
    """What the kernel answers to NFT_MSG_GETOBJ: NEWOBJ with the counter, then an ACK."""
    inner = nl._attr(nftset.NFTA_COUNTER_BYTES, struct.pack(">Q", counter.bytes)) + nl._attr(
        nftset.NFTA_COUNTER_PACKETS, struct.pack(">Q", counter.packets)
    )
    body = (
        struct.pack("=BBH", 2, 0, 0)
        + nl._attr(nftset.NFTA_OBJ_TABLE, b"overlay_vxlan\0")
        + nl._attr(nftset.NFTA_OBJ_NAME, b"dropped\0")
        + nl._attr(nftset.NFTA_OBJ_DATA | 0x8000, inner)
    )
    kind = (nftset.NFNL_SUBSYS_NFTABLES << 8) | nftset.NFT_MSG_NEWOBJ
    out = struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body
    if ack:
        out += error_message(seq, 0)
    return out


def error_message(seq: int, code: int) -> bytes:
    payload = struct.pack("=i", -code) + struct.pack("=IHHII", 16, 0, 0, seq, 0)
    return struct.pack("=IHHII", 16 + len(payload), nl.NLMSG_ERROR, 0, seq, 0) + payload


@given(st.integers(1, 0xFFFFFFFF), counters)
def test_counter_reply_round_trip(seq: int, counter: Counter) -> None:
    reply = nftset.parse_counter_reply(newobj_reply(seq, counter), seq)
    assert (reply.counter, reply.error) == (counter, 0)
    # An answer to another request is ignored.
    other = nftset.parse_counter_reply(newobj_reply(seq, counter), (seq % 0xFFFFFFFF) + 1)
    assert (other.counter, other.error) == (None, None)


def test_counter_request_layout() -> None:
    req = nftset.counter_request("overlay_vxlan", "dropped", 7)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", req)
    assert (length, kind, seq) == (len(req), (10 << 8) | 19, 7)
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK
    attrs = nl._attrs(memoryview(req), 16 + 4)
    assert bytes(attrs[nftset.NFTA_OBJ_TABLE]) == b"overlay_vxlan\0"
    assert bytes(attrs[nftset.NFTA_OBJ_NAME]) == b"dropped\0"
    assert struct.unpack(">I", attrs[nftset.NFTA_OBJ_TYPE]) == (nftset.NFT_OBJECT_COUNTER,)


def test_counter_reply_error() -> None:
    reply = nftset.parse_counter_reply(error_message(5, 2), 5)
    assert (reply.counter, reply.error) == (None, 2)


@given(st.binary(max_size=300), st.integers(0, 3))
def test_counter_reply_of_any_bytes_is_a_reply_or_nft_error(data: bytes, seq: int) -> None:
    try:
        reply = nftset.parse_counter_reply(data, seq)
    except NftError:
        return
    assert reply.counter is None or isinstance(reply.counter, Counter)
    assert reply.error is None or isinstance(reply.error, int)


@given(st.integers(1, 100), counters, st.data())
def test_counter_reply_cut_or_corrupted_is_a_reply_or_nft_error(
    seq: int, counter: Counter, data: st.DataObject
) -> None:
    raw = bytearray(newobj_reply(seq, counter))
    cut = data.draw(st.integers(0, len(raw)))
    flips = data.draw(st.lists(st.tuples(st.integers(16, len(raw) - 1), st.integers(0, 255))))
    for pos, value in flips:
        raw[pos] = value
    assume(cut < len(raw) or flips)
    try:
        reply = nftset.parse_counter_reply(bytes(raw[:cut]), seq)
    except NftError:
        return
    if reply.counter is not None:
        assert 0 <= reply.counter.packets < 1 << 64 and 0 <= reply.counter.bytes < 1 << 64


# --------------------------------------------------------------------------- the nft command
# The real nft cannot be made to hang, print garbage or fail with an arbitrary message on
# demand, so these use a stand-in `nft` script first on PATH (a test double, for those failure
# modes only; tests/test_vxlan_filter.py runs the real one).


@pytest.fixture
def fake_nft(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(body: str) -> None:
        script = tmp_path / "nft"
        script.write_text("#!/bin/sh\n" + body + "\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")

    return install


async def test_a_hanging_nft_is_killed_after_the_timeout(
    fake_nft: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pidfile = tmp_path / "pid"
    fake_nft(f"echo $$ > {pidfile}; exec sleep 60")
    monkeypatch.setattr(nftset, "COMMAND_TIMEOUT", 0.5)
    table = nftset.NftTable(SPEC)
    with pytest.raises(NftError, match="did not finish"):
        await table.sync(frozenset({IPv4Address("10.0.0.1")}))
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped: no such process any more


async def test_nft_output_that_is_not_a_listing_is_an_error(fake_nft: Any) -> None:
    fake_nft('echo \'{"nftables": [{"table": "not an object"}]}\'')
    with pytest.raises(NftError, match="not an object"):
        await nftset.NftTable(SPEC).read()
    fake_nft("echo '[[[['")
    with pytest.raises(NftError, match="not JSON"):
        await nftset.NftTable(SPEC).read()


async def test_nft_failures_carry_its_message_cut_to_size(fake_nft: Any) -> None:
    fake_nft("head -c 100000 /dev/zero | tr '\\0' x >&2; exit 1")
    with pytest.raises(NftError) as info:
        await nftset.NftTable(SPEC).apply("add table ip t\n")
    assert "nft -f - failed (1): xxx" in str(info.value)
    assert len(str(info.value)) < nftset.MAX_ERROR_TEXT + 100
    fake_nft("echo 'Error: No such file or directory' >&2; exit 1")
    assert await nftset.NftTable(SPEC).read() is None, "a missing table is not an error"
    with pytest.raises(NftError, match="No such file"):
        await nftset.NftTable(SPEC).update(frozenset({IPv4Address("10.0.0.1")}), frozenset())


def test_counter_reader_in_a_missing_namespace_is_an_nft_error() -> None:
    reader = nftset.CounterReader(f"overlay-missing-{os.getpid()}")
    with pytest.raises(NftError, match="does not exist"):
        reader.read("overlay_vxlan", "dropped")
    reader.close()


async def test_nft_that_cannot_be_started_is_an_nft_error(
    fake_nft: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A netns given, but `ip` cannot be found: NftError naming the command, not an OSError."""
    fake_nft("exit 0")
    monkeypatch.setenv("PATH", str(tmp_path))  # nft found, ip not
    with pytest.raises(NftError, match="cannot run ip netns exec"):
        await nftset.NftTable(SPEC, netns="overlay-any").read()


# --------------------------------------------------------------------------- the ip6 family


def test_table_script_pinned_ip6() -> None:
    peers = {IPv6Address("fd93::2"), IPv6Address("2001:db8::1")}
    assert nftset.table_script(SPEC6, peers) == (
        "table ip6 overlay_vxlan {\n"
        "\tcounter dropped { packets 0 bytes 0 }\n"
        "\tset peers { type ipv6_addr; }\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        '\t\tudp dport 8472 ip6 saddr != @peers counter name "dropped" drop '
        'comment "overlay vxlan: admit only lease PublicIPv6s (FilterPeers)"\n'
        "\t}\n"
        "}\n"
        "add element ip6 overlay_vxlan peers { 2001:db8::1, fd93::2 }\n"
    )
    assert (
        nftset.delete_script(SPEC6)
        == "add table ip6 overlay_vxlan\ndelete table ip6 overlay_vxlan\n"
    )


_ANY_STATEMENT = re.compile(r"^(add|delete) element (ip6?) overlay_vxlan peers \{ (.+) \}$")


@given(spec_and_sets, st.data())
def test_scripts_of_either_family_hold_each_address_once(
    spec_set: tuple[PortFilter, frozenset[Any]], data: st.DataObject
) -> None:
    spec, peers = spec_set
    table = nftset.table_script(spec, peers)
    assert f"table {spec.family} overlay_vxlan {{" in table.splitlines()
    assert f"\tset peers {{ type {spec.set_type}; }}" in table.splitlines()
    listed: list[Any] = []
    for line in table.splitlines():
        m = _ANY_STATEMENT.match(line)
        if m:
            assert (m.group(1), m.group(2)) == ("add", spec.family)
            listed += [spec.address(a) for a in m.group(3).split(", ")]
    assert sorted(listed, key=int) == sorted(peers, key=int)
    remove = data.draw(st.frozensets(st.sampled_from(sorted(peers, key=int)))) if peers else set()
    admit = peers - remove
    found = [
        (m.group(1), m.group(2), [spec.address(a) for a in m.group(3).split(", ")])
        for line in nftset.element_script(spec, admit, remove).splitlines()
        if (m := _ANY_STATEMENT.match(line))
    ]
    assert all(fam == spec.family for _, fam, _ in found)
    assert sorted(a for v, _, c in found if v == "delete" for a in c) == sorted(remove, key=int)


@given(address_sets, address6_sets)
def test_an_address_of_the_other_family_is_refused(
    v4: frozenset[IPv4Address], v6: frozenset[IPv6Address]
) -> None:
    """An IPv4 address in an ip6 script (or the reverse) would make nft refuse the whole file:
    the generator refuses it first, naming it."""
    for spec, good, bad in ((SPEC, v4, v6), (SPEC6, v6, v4)):
        if bad:
            with pytest.raises(ValueError, match="addresses for an"):
                nftset.table_script(spec, good | bad)
            with pytest.raises(ValueError, match="addresses for an"):
                nftset.element_script(spec, frozenset(), bad)
        else:
            nftset.table_script(spec, good)


@given(address6_sets, counters)
def test_parse_table_ip6_round_trip(elements: frozenset[IPv6Address], counter: Counter) -> None:
    text = json.dumps(listing(SPEC6, elements, counter))
    assert nftset.parse_table(SPEC6, text) == TableState(elements, counter, ())
    # The same listing read as the other family's table is all problems, never a crash.
    assert nftset.parse_table(SPEC, text).problems


@given(json_values)
def test_parse_table_ip6_of_any_json_is_a_state_or_nft_error(value: Any) -> None:
    for doc in (value, {"nftables": [value]}, {"nftables": [{"set": value}]}):
        try:
            state = nftset.parse_table(SPEC6, json.dumps(doc))
        except NftError:
            continue
        assert state.problems
        assert all(isinstance(a, IPv6Address) for a in state.elements)


def test_counter_request_names_the_family() -> None:
    for family, nfproto in (("ip", 2), ("ip6", 10)):
        req = nftset.counter_request("overlay_vxlan", "dropped", 7, family)
        assert struct.unpack_from("=B", req, 16) == (nfproto,)
    with pytest.raises(KeyError):
        nftset.counter_request("overlay_vxlan", "dropped", 7, "inet")


@pytest.mark.parametrize("family", ["inet", "bridge", "", "ip4"])
def test_port_filter_refuses_other_families(family: str) -> None:
    with pytest.raises(ValueError, match="nft family"):
        PortFilter("t", 8472, "c", family=family)
