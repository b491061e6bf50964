"""Properties of the raw netlink client's IPv6 side (backends/netlink.py): what the request
builders write, the IPv6 parsers read back; any bytes give an entry, None or ParseError."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends import netlink as nl

ifindexes = st.integers(1, 2**31 - 1)
macs = st.binary(min_size=6, max_size=6).map(nl.mac_str)
ip6s = st.integers(0, 2**128 - 1).map(IPv6Address)
nets6 = st.builds(
    lambda addr, plen: IPv6Network((addr, plen), strict=False), ip6s, st.integers(0, 128)
)
u32s = st.integers(0, 2**32 - 1)
u8s = st.integers(0, 255)


@given(ifindexes, ip6s, macs)
def test_neigh_replace_and_delete_read_back(ifindex: int, dst: IPv6Address, mac: str) -> None:
    got = nl.parse_neighbour6(nl.neigh_replace(ifindex, dst, mac).body)
    assert got == nl.Neighbour6(ifindex, dst, mac, nl.NUD_PERMANENT)
    assert got.permanent
    assert nl.parse_neighbour6(nl.neigh_delete(ifindex, dst).body) == nl.Neighbour6(
        ifindex, dst, None, 0
    )


@given(ifindexes, macs, st.one_of(st.none(), ip6s))
def test_fdb_replace_and_delete_read_back(ifindex: int, mac: str, dst: IPv6Address | None) -> None:
    if dst is not None:
        got = nl.parse_neighbour6(nl.fdb_replace(ifindex, mac, dst).body)
        assert got == nl.FdbEntry6(ifindex, mac, dst, nl.NUD_PERMANENT, nl.NTF_SELF)
    got = nl.parse_neighbour6(nl.fdb_delete(ifindex, mac, dst).body)
    assert got == nl.FdbEntry6(ifindex, mac, dst, 0, nl.NTF_SELF)


@given(ifindexes, macs, st.integers(0, 2**32 - 1).map(IPv4Address))
def test_ipv4_entries_are_not_ipv6_ones(ifindex: int, mac: str, dst4: IPv4Address) -> None:
    assert nl.parse_neighbour6(nl.fdb_replace(ifindex, mac, dst4).body) is None
    assert nl.parse_neighbour6(nl.neigh_replace(ifindex, dst4, mac).body) is None
    route4 = nl.route_replace(IPv4Network((dst4, 32)), dst4, ifindex, onlink=True)
    assert nl.parse_route6(route4.body) is None


@given(nets6, ip6s, ifindexes, st.booleans(), u8s)
def test_route_replace_reads_back(
    dst: IPv6Network, gw: IPv6Address, oif: int, onlink: bool, proto: int
) -> None:
    got = nl.parse_route6(nl.route_replace(dst, gw, oif, onlink=onlink, protocol=proto).body)
    assert got == nl.Route6(
        dst=dst,
        oif=oif,
        gateway=gw,
        table=nl.RT_TABLE_MAIN,
        protocol=proto,
        scope=nl.RT_SCOPE_UNIVERSE,
        type=nl.RTN_UNICAST,
        flags=nl.RTNH_F_ONLINK if onlink else 0,
        priority=None,
    )
    assert got.onlink is onlink


@given(
    nets6,
    st.one_of(st.none(), ifindexes),
    st.one_of(st.none(), ip6s),
    st.one_of(st.none(), u32s),
)
def test_route_delete_names_the_route_it_was_given(
    dst: IPv6Network, oif: int | None, gw: IPv6Address | None, prio: int | None
) -> None:
    route = nl.Route6(dst, oif, gw, nl.RT_TABLE_MAIN, 3, 0, nl.RTN_UNICAST, 0, prio)
    req = nl.route_delete(route)
    assert req.type == nl.RTM_DELROUTE
    got = nl.parse_route6(req.body)
    assert got is not None
    assert (got.dst, got.oif, got.gateway, got.priority, got.table) == (
        dst,
        oif,
        gw,
        prio,
        nl.RT_TABLE_MAIN,
    )


def _kernel_route(
    dst: IPv6Network, oif: int | None, gw: IPv6Address | None, table: int, prio: int | None
) -> bytes:
    """A route message as the kernel dumps one (RTA_TABLE beside the 8-bit header field)."""
    body = struct.pack(
        "=BBBBBBBBI", socket.AF_INET6, dst.prefixlen, 0, 0, min(table, 252), 3, 0, 1, 0
    )
    body += nl._attr(nl.RTA_TABLE, struct.pack("=I", table))
    if dst.prefixlen:
        body += nl._attr(nl.RTA_DST, dst.network_address.packed)
    if prio is not None:
        body += nl._attr(nl.RTA_PRIORITY, struct.pack("=I", prio))
    if gw is not None:
        body += nl._attr(nl.RTA_GATEWAY, gw.packed)
    if oif is not None:
        body += nl._attr(nl.RTA_OIF, struct.pack("=I", oif))
    body += nl._attr(12, b"\0" * 16)  # RTA_CACHEINFO-like: skipped
    return body


@given(
    nets6,
    st.one_of(st.none(), ifindexes),
    st.one_of(st.none(), ip6s),
    st.integers(1, 2**32 - 1),
    st.one_of(st.none(), u32s),
)
def test_dumped_route_reads_back_with_its_table(
    dst: IPv6Network, oif: int | None, gw: IPv6Address | None, table: int, prio: int | None
) -> None:
    got = nl.parse_route6(_kernel_route(dst, oif, gw, table, prio))
    assert got == nl.Route6(dst, oif, gw, table, 3, 0, 1, 0, prio)


def _check_neighbour(raw: bytes) -> None:
    try:
        got = nl.parse_neighbour6(raw)
    except nl.ParseError:
        return
    assert got is None or isinstance(got, nl.Neighbour6 | nl.FdbEntry6)


def _check_route(raw: bytes) -> None:
    try:
        got = nl.parse_route6(raw)
    except nl.ParseError:
        return
    assert got is None or isinstance(got, nl.Route6)


@given(st.binary(max_size=200))
def test_any_bytes_give_an_entry_none_or_a_parse_error(raw: bytes) -> None:
    _check_neighbour(raw)
    _check_route(raw)


attrs = st.lists(
    st.tuples(st.sampled_from([1, 2, 4, 5, 6, 8, 15, 0x8001, 99]), st.binary(max_size=20)),
    max_size=6,
)


@given(
    st.sampled_from([socket.AF_INET6, nl.AF_BRIDGE, socket.AF_INET, 0]),
    st.binary(min_size=11, max_size=11),
    u8s,
    attrs,
    st.integers(0, 8),
)
def test_well_framed_messages_with_hostile_attributes(
    family: int, rest: bytes, dst_len: int, pairs: list[tuple[int, bytes]], cut: int
) -> None:
    """A correct header (neighbour or route) followed by attributes of any kind and size, the
    whole possibly cut short: an entry, None or ParseError, never another exception."""
    tail = b"".join(nl._attr(kind, payload) for kind, payload in pairs)
    neigh = bytes([family]) + rest + tail
    route = bytes([family, dst_len]) + rest[:10] + tail
    for raw in (neigh, route):
        raw = raw[: len(raw) - cut] if cut else raw
        _check_neighbour(raw)
        _check_route(raw)


def test_malformed_entries_are_parse_errors_naming_the_problem() -> None:
    ok = nl.route_replace(IPv6Network("fd00::/64"), IPv6Address("fd00::1"), 3, onlink=False)
    with pytest.raises(nl.ParseError, match="shorter than its header"):
        nl.parse_route6(ok.body[:5])
    header = struct.pack("=BBBBBBBBI", socket.AF_INET6, 129, 0, 0, 254, 3, 0, 1, 0)
    with pytest.raises(nl.ParseError, match="prefix length 129"):
        nl.parse_route6(header)
    header = struct.pack("=BBBBBBBBI", socket.AF_INET6, 8, 0, 0, 254, 3, 0, 1, 0)
    with pytest.raises(nl.ParseError, match="host bits"):
        nl.parse_route6(header + nl._attr(nl.RTA_DST, IPv6Address("fd00::1").packed))
    with pytest.raises(nl.ParseError, match="RTA_OIF attribute of 2 bytes"):
        nl.parse_route6(header + nl._attr(nl.RTA_OIF, b"\1\2"))
    with pytest.raises(nl.ParseError, match="RTA_GATEWAY attribute of 4 bytes"):
        nl.parse_route6(header + nl._attr(nl.RTA_GATEWAY, b"\1\2\3\4"))
    neigh = struct.pack("=BxxxiHBB", socket.AF_INET6, 3, nl.NUD_PERMANENT, 0, 1)
    with pytest.raises(nl.ParseError, match="NDA_DST attribute of 4 bytes"):
        nl.parse_neighbour6(neigh + nl._attr(nl.NDA_DST, b"\1\2\3\4"))
    with pytest.raises(nl.ParseError, match="shorter than its header"):
        nl.parse_neighbour6(neigh[:7])
    assert nl.parse_neighbour6(neigh) is None  # no NDA_DST: not an entry


def test_a_malformed_dump_message_is_skipped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert nl._parsed(nl.parse_route6, memoryview(b"\x0a")) is None
    assert "skipping a malformed rtnetlink message" in caplog.text
