"""overlayctl with dual-stack and IPv6-only leases, against a real etcd: the leases table and
--json for IPv4-only, dual-stack and IPv6-only keys (flannel's bytes, written with etcdctl),
reserve/unreserve of each kind, the refusals (exit 2, nothing written), and property tests of
the subnet and address parsers and of the table."""

from __future__ import annotations

import json
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integration.etcdserver import EtcdServer
from overlay.ctl import (
    UsageError,
    _lease_row,
    parse_address,
    parse_subnet,
    render_leases_table,
)
from subnetmgr.model import (
    NO_IPV4,
    Lease,
    LeaseAttrs,
    parse_subnet_key,
    subnet_key,
)
from tests.test_ctl_revoke import ctl, etcdctl

V4_CONFIG = '{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}'
DUAL_CONFIG = (
    '{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:1::/48",'
    '"Backend":{"Type":"vxlan"}}'
)
V6_ONLY_CONFIG = (
    '{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:1::/48","Backend":{"Type":"vxlan"}}'
)
MAC4, MAC6 = "c6:d2:32:6f:8f:44", "5a:11:22:33:44:55"
# Values as flannel writes them (field order, null PublicIPv6, BackendV6Data).
DUAL_VALUE = (
    '{"PublicIP":"192.168.1.11","PublicIPv6":"fd00::11","BackendType":"vxlan",'
    f'"BackendData":{{"VNI":1,"VtepMAC":"{MAC4}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{MAC6}"}}}}'
)
V4_VALUE = '{"PublicIP":"192.168.1.12","PublicIPv6":null,"BackendType":"vxlan"}'


def v6_only_value(n: int) -> str:
    return (
        f'{{"PublicIP":"0.0.0.0","PublicIPv6":"fd00::{n}","BackendType":"vxlan",'
        f'"BackendV6Data":{{"VNI":1,"VtepMAC":"5a:11:22:33:44:{n:02x}"}}}}'
    )


@pytest.fixture
def cleanup(etcd_server: EtcdServer, etcd_prefix: str) -> Iterator[None]:
    yield
    etcdctl(etcd_server, "del", "--prefix", etcd_prefix)


def put(server: EtcdServer, prefix: str, key: str, value: str, ttl: int | None = None) -> None:
    """Write a lease key as flannel does (with an etcd lease of `ttl`), or a reservation."""
    extra: list[str] = []
    if ttl is not None:
        extra = ["--lease", etcdctl(server, "lease", "grant", str(ttl)).split()[1]]
    etcdctl(server, "put", f"{prefix}/subnets/{key}", value, *extra)


def keys(server: EtcdServer, prefix: str) -> dict[str, str]:
    """Every key under <prefix>/subnets/ (its last element) with its value."""
    out = etcdctl(server, "get", "--prefix", f"{prefix}/subnets/").splitlines()
    return {k.rsplit("/", 1)[1]: v for k, v in zip(out[::2], out[1::2], strict=True)}


def table(out: str) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of `overlayctl leases`, split on blanks."""
    lines = out.splitlines()
    end = lines.index("") if "" in lines else len(lines)
    return lines[0].split(), [line.split() for line in lines[1:end]]


# ---------------------------------------------------------------------- leases


def test_ipv4_only_table_has_no_ipv6_columns(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(etcd_server, etcd_prefix, "config", "set", V4_CONFIG) == 0
    put(etcd_server, etcd_prefix, "10.1.6.0-24", V4_VALUE, 3600)
    capsys.readouterr()
    assert ctl(etcd_server, etcd_prefix, "leases") == 0
    header, rows = table(capsys.readouterr().out)
    assert header == ["SUBNET", "PUBLIC", "IP", "BACKEND", "VTEP", "MAC", "TTL", "RESERVED",
                      "STATUS"]  # fmt: skip
    assert rows[0][:3] == ["10.1.6.0/24", "192.168.1.12", "vxlan"]
    assert ctl(etcd_server, etcd_prefix, "leases", "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["ipv6_subnet"] is None and row["public_ipv6"] is None
    assert row["vtep_mac_v6"] is None


def test_dual_stack_table_and_json(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(etcd_server, etcd_prefix, "config", "set", DUAL_CONFIG) == 0
    put(etcd_server, etcd_prefix, "10.1.5.0-24&fd00:1:0:5::-64", DUAL_VALUE, 3600)
    put(etcd_server, etcd_prefix, "10.1.6.0-24", V4_VALUE, 3600)  # an IPv4 peer
    # An IPv6-only reservation does not fit a network with EnableIPv4: ignored, but shown by its
    # IPv6 subnet, not as 0.0.0.0/0.
    put(etcd_server, etcd_prefix, "0.0.0.0-0&fd00:1:0:9::-64", v6_only_value(9))
    capsys.readouterr()

    assert ctl(etcd_server, etcd_prefix, "leases") == 0
    out = capsys.readouterr().out
    assert "0.0.0.0/0" not in out.split("\n\n")[0]  # (the notes quote subnetmgr.validate)
    header, rows = table(out)
    assert header == ["SUBNET", "PUBLIC", "IP", "IPV6", "SUBNET", "PUBLIC", "IPV6", "BACKEND",
                      "VTEP", "MAC", "TTL", "RESERVED", "STATUS"]  # fmt: skip
    assert rows[0][:6] == ["10.1.5.0/24", "192.168.1.11", "fd00:1:0:5::/64", "fd00::11",
                           "vxlan", MAC4]  # fmt: skip
    assert rows[0][7:] == ["no", "ok"]
    assert rows[1][:6] == ["10.1.6.0/24", "192.168.1.12", "-", "-", "vxlan", "-"]
    assert rows[2][:8] == ["-", "-", "fd00:1:0:9::/64", "fd00::9", "vxlan", "5a:11:22:33:44:09",
                           "-", "yes"]  # fmt: skip
    assert rows[2][8] == "ignored:"

    assert ctl(etcd_server, etcd_prefix, "leases", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert not any(
        "0.0.0.0" in str(v) for row in doc for k, v in row.items() if k not in ("detail", "key")
    )
    assert {k: doc[0][k] for k in ("subnet", "public_ip", "ipv6_subnet", "public_ipv6",
                                   "vtep_mac", "vtep_mac_v6", "key", "ignored")} == {
        "subnet": "10.1.5.0/24", "public_ip": "192.168.1.11", "ipv6_subnet": "fd00:1:0:5::/64",
        "public_ipv6": "fd00::11", "vtep_mac": MAC4, "vtep_mac_v6": MAC6,
        "key": "10.1.5.0-24&fd00:1:0:5::-64", "ignored": None,
    }  # fmt: skip
    assert doc[1]["ipv6_subnet"] is None and doc[1]["public_ipv6"] is None
    assert doc[2]["subnet"] == doc[2]["ipv6_subnet"] == "fd00:1:0:9::/64"
    assert doc[2]["public_ip"] is None and doc[2]["public_ipv6"] == "fd00::9"
    assert doc[2]["key"] == "0.0.0.0-0&fd00:1:0:9::-64" and doc[2]["ignored"]


@pytest.mark.parametrize("config", [None, V6_ONLY_CONFIG])
def test_ipv6_only_table_and_json(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str],
    config: str | None,
) -> None:  # fmt: skip
    if config is not None:
        assert ctl(etcd_server, etcd_prefix, "config", "set", config) == 0
    put(etcd_server, etcd_prefix, "0.0.0.0-0&fd00:1:0:5::-64", v6_only_value(5), 3600)
    put(etcd_server, etcd_prefix, "0.0.0.0-0&fd00:1:0:6::-64", v6_only_value(6))
    put(etcd_server, etcd_prefix, "garbage", "{}", 3600)
    capsys.readouterr()

    assert ctl(etcd_server, etcd_prefix, "leases") == 0
    out = capsys.readouterr().out
    assert "0.0.0.0" not in out.split("\n\n")[0]  # (the notes name keys)
    header, rows = table(out)
    # No IPv4 columns at all: the IPv6 subnet is the first column; a key that does not parse
    # is named there.
    assert header == ["IPV6", "SUBNET", "PUBLIC", "IPV6", "BACKEND", "VTEP", "MAC", "TTL",
                      "RESERVED", "STATUS"]  # fmt: skip
    # (Whether the two share the subnet 0.0.0.0/0 in this tree's select_leases does not
    # change how they are shown.)
    by_subnet = {row[0]: row for row in rows}
    assert by_subnet["fd00:1:0:5::/64"][1:4] == ["fd00::5", "vxlan", "5a:11:22:33:44:05"]
    assert by_subnet["fd00:1:0:5::/64"][5] == "no"
    assert by_subnet["fd00:1:0:6::/64"][1:6] == ["fd00::6", "vxlan", "5a:11:22:33:44:06", "-",
                                                  "yes"]  # fmt: skip
    assert by_subnet["key"][1:3] == ["garbage", "-"]

    assert ctl(etcd_server, etcd_prefix, "leases", "--json") == 0
    doc = {row["key"]: row for row in json.loads(capsys.readouterr().out)}
    five = doc["0.0.0.0-0&fd00:1:0:5::-64"]
    assert five["subnet"] == five["ipv6_subnet"] == "fd00:1:0:5::/64"
    assert five["public_ip"] is None and five["public_ipv6"] == "fd00::5"
    assert five["vtep_mac"] == five["vtep_mac_v6"] == "5a:11:22:33:44:05"
    assert doc["garbage"]["subnet"] is None and doc["garbage"]["ipv6_subnet"] is None


def test_revoke_names_both_public_addresses(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str]
) -> None:
    put(etcd_server, etcd_prefix, "10.1.5.0-24&fd00:1:0:5::-64", DUAL_VALUE, 600)
    assert ctl(etcd_server, etcd_prefix, "leases", "revoke", "10.1.5.0/24") == 0
    out = capsys.readouterr().out
    assert f"192.168.1.11 and fd00::11 (backend vxlan, VtepMAC {MAC4}, v6 VtepMAC {MAC6})" in out
    assert keys(etcd_server, etcd_prefix) == {}


# ---------------------------------------------------------------------- reserve / unreserve


def test_reserve_and_unreserve_dual_stack(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(etcd_server, etcd_prefix, "config", "set", DUAL_CONFIG) == 0
    args = ("reserve", "10.1.7.0/24", "192.168.1.20", "--ipv6-subnet", "fd00:1:0:7::/64",
            "--public-ipv6", "fd00::20")  # fmt: skip
    assert ctl(etcd_server, etcd_prefix, *args) == 0
    assert "reserved 10.1.7.0/24 and fd00:1:0:7::/64 for 192.168.1.20 and fd00::20" in (
        capsys.readouterr().out
    )
    written = {"10.1.7.0-24&fd00:1:0:7::-64": '{"PublicIP":"192.168.1.20","PublicIPv6":"fd00::20"}'}
    assert keys(etcd_server, etcd_prefix) == written
    assert ctl(etcd_server, etcd_prefix, *args) == 0  # again: the same key, unchanged
    assert keys(etcd_server, etcd_prefix) == written
    capsys.readouterr()
    assert ctl(etcd_server, etcd_prefix, "leases", "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["reserved"] and row["ignored"] is None and row["ttl"] is None
    assert (row["subnet"], row["ipv6_subnet"]) == ("10.1.7.0/24", "fd00:1:0:7::/64")

    # unreserve finds the key by either subnet.
    for subnet in ("fd00:1:0:7::/64", "10.1.7.0/24"):
        assert ctl(etcd_server, etcd_prefix, *args) == 0
        capsys.readouterr()
        assert ctl(etcd_server, etcd_prefix, "unreserve", subnet) == 0
        assert f"unreserved {subnet} (key 10.1.7.0-24&fd00:1:0:7::-64)" in capsys.readouterr().out
        assert keys(etcd_server, etcd_prefix) == {}
        assert ctl(etcd_server, etcd_prefix, "unreserve", subnet) == 1
        assert f"no reservation for {subnet}" in capsys.readouterr().err


@pytest.mark.parametrize("config", [None, V6_ONLY_CONFIG])
def test_reserve_and_unreserve_ipv6_only(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str],
    config: str | None,
) -> None:  # fmt: skip
    if config is not None:
        assert ctl(etcd_server, etcd_prefix, "config", "set", config) == 0
    assert ctl(etcd_server, etcd_prefix, "reserve", "fd00:1:0:7::/64", "fd00::20") == 0
    out = capsys.readouterr().out
    assert "reserved fd00:1:0:7::/64 for fd00::20 (key 0.0.0.0-0&fd00:1:0:7::-64)" in out
    assert keys(etcd_server, etcd_prefix) == {
        "0.0.0.0-0&fd00:1:0:7::-64": '{"PublicIP":"0.0.0.0","PublicIPv6":"fd00::20"}'
    }
    assert ctl(etcd_server, etcd_prefix, "leases", "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["subnet"] == "fd00:1:0:7::/64" and row["public_ip"] is None and row["reserved"]
    # 0.0.0.0/0 is the IPv4 part of every IPv6-only key: it names none of them.
    assert ctl(etcd_server, etcd_prefix, "unreserve", "0.0.0.0/0") == 1
    assert len(keys(etcd_server, etcd_prefix)) == 1
    assert ctl(etcd_server, etcd_prefix, "unreserve", "fd00:1:0:7::/64") == 0
    assert keys(etcd_server, etcd_prefix) == {}


def test_unreserve_takes_every_reservation_of_a_subnet_and_spares_leases(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str]
) -> None:
    reservation = '{"PublicIP":"192.168.1.20","PublicIPv6":"fd00::20"}'
    put(etcd_server, etcd_prefix, "10.1.7.0-24", '{"PublicIP":"192.168.1.20","PublicIPv6":null}')
    put(etcd_server, etcd_prefix, "10.1.7.0-24&fd00:1:0:7::-64", reservation)
    put(etcd_server, etcd_prefix, "10.1.70.0-24", V4_VALUE)  # a prefix of no concern: kept
    put(etcd_server, etcd_prefix, "10.1.5.0-24&fd00:1:0:5::-64", DUAL_VALUE, 3600)  # leases
    put(etcd_server, etcd_prefix, "0.0.0.0-0&fd00:1:0:6::-64", v6_only_value(6), 3600)
    before = keys(etcd_server, etcd_prefix)
    assert ctl(etcd_server, etcd_prefix, "unreserve", "10.1.7.0/24") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["unreserved 10.1.7.0/24 (key 10.1.7.0-24)",
                   "unreserved 10.1.7.0/24 (key 10.1.7.0-24&fd00:1:0:7::-64)"]  # fmt: skip
    for subnet in ("10.1.5.0/24", "fd00:1:0:5::/64", "fd00:1:0:6::/64"):
        assert ctl(etcd_server, etcd_prefix, "unreserve", subnet) == 1
        assert f"no reservation for {subnet}" in capsys.readouterr().err
    del before["10.1.7.0-24"], before["10.1.7.0-24&fd00:1:0:7::-64"]
    assert keys(etcd_server, etcd_prefix) == before


DUAL = ("10.1.7.0/24", "192.168.1.20")
V6 = ("--ipv6-subnet", "fd00:1:0:7::/64", "--public-ipv6", "fd00::20")


@pytest.mark.parametrize(
    ("config", "args", "needle"),
    [
        (DUAL_CONFIG, DUAL, "dual stack (EnableIPv6)"),
        (DUAL_CONFIG, (*DUAL, *V6[:2]), "--ipv6-subnet and --public-ipv6 go together"),
        (DUAL_CONFIG, (*DUAL, *V6[2:]), "--ipv6-subnet and --public-ipv6 go together"),
        (DUAL_CONFIG, (*DUAL, "--ipv6-subnet", "fd00:2:0:7::/64", *V6[2:]),
         "IPv6 subnet fd00:2:0:7::/64 does not fit the network config (fd00:1::/48, /64 subnets "
         "from fd00:1:0:1:: to fd00:1:0:ffff::)"),
        (DUAL_CONFIG, (*DUAL, "--ipv6-subnet", "fd00:1:0:7::/80", *V6[2:]), "does not fit"),
        (DUAL_CONFIG, (*DUAL, "--ipv6-subnet", "fd00:1::/64", *V6[2:]), "does not fit"),
        (DUAL_CONFIG, (*DUAL, "--ipv6-subnet", "fd00:1:0:7::1/64", *V6[2:]), "has host bits"),
        (DUAL_CONFIG, (*DUAL, "--ipv6-subnet", "fd00:1:0:7::", *V6[2:]), "prefix length"),
        (DUAL_CONFIG, (*DUAL, "--ipv6-subnet", "10.2.0.0/24", *V6[2:]), "not an IPv6 subnet"),
        (DUAL_CONFIG, (*DUAL, *V6[:3], "192.168.1.30"), "not an IPv6 address"),
        (DUAL_CONFIG, (*DUAL, *V6[:3], "::1"), "public IPv6 ::1 is loopback"),
        (DUAL_CONFIG, (*DUAL, *V6[:3], "fe80::1"), "is link-local"),
        (DUAL_CONFIG, (*DUAL, *V6[:3], "ff02::1"), "is multicast"),
        (DUAL_CONFIG, (*DUAL, *V6[:3], "::"), "is unspecified"),
        (DUAL_CONFIG, (*DUAL, *V6[:3], "::ffff:192.168.1.30"), "is IPv4-mapped"),
        (DUAL_CONFIG, (*DUAL, *V6[:3], "fd00::20%eth0"), "not an address"),
        (DUAL_CONFIG, ("10.1.7.0/24", "0.0.0.0", *V6), "public IP 0.0.0.0 is unspecified"),
        (DUAL_CONFIG, ("10.2.7.0/24", "192.168.1.20", *V6), "subnet 10.2.7.0/24 does not fit"),
        (DUAL_CONFIG, ("fd00:1:0:7::/64", "fd00::20"), "has EnableIPv4 (Network 10.1.0.0/16)"),
        (DUAL_CONFIG, ("fd00:1:0:7::/64", "192.168.1.20"), "PUBLIC_IP 192.168.1.20 is IPv4"),
        (DUAL_CONFIG, ("fd00:1:0:7::/64", "fd00::20", *V6), "IPv6-only reservation"),
        (DUAL_CONFIG, ("10.1.7.0/24", "fd00::20"), "PUBLIC_IP fd00::20 is IPv6"),
        (DUAL_CONFIG, ("0.0.0.0/0", "192.168.1.20"), "0.0.0.0/0 is the IPv4 part"),
        (DUAL_CONFIG, ("fd00:1:0:7::/64", "fe80::20"), "is link-local"),
        (V4_CONFIG, (*DUAL, *V6), "has no EnableIPv6"),
        (V4_CONFIG, ("fd00:1:0:7::/64", "fd00::20"), "an IPv6-only reservation would be ignored"),
        (V6_ONLY_CONFIG, DUAL, "the network config is IPv6-only (EnableIPv4 false)"),
        (V6_ONLY_CONFIG, (*DUAL, *V6), "the network config is IPv6-only (EnableIPv4 false)"),
        (V6_ONLY_CONFIG, ("fd00:2:0:7::/64", "fd00::20"), "fd00:2:0:7::/64 does not fit"),
        (V6_ONLY_CONFIG, ("fd00:1:0:7::/72", "fd00::20"), "fd00:1:0:7::/72 does not fit"),
    ],
)  # fmt: skip
def test_bad_reservations_are_refused_and_nothing_written(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str],
    config: str, args: tuple[str, ...], needle: str,
) -> None:  # fmt: skip
    assert ctl(etcd_server, etcd_prefix, "config", "set", config) == 0
    capsys.readouterr()
    assert ctl(etcd_server, etcd_prefix, "reserve", *args) == 2
    assert needle in capsys.readouterr().err
    assert keys(etcd_server, etcd_prefix) == {}


def test_a_subnet_named_by_another_key_is_refused(
    etcd_server: EtcdServer, etcd_prefix: str, cleanup: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(etcd_server, etcd_prefix, "config", "set", DUAL_CONFIG) == 0
    put(etcd_server, etcd_prefix, "10.1.5.0-24", V4_VALUE, 3600)  # a lease from before IPv6
    put(etcd_server, etcd_prefix, "10.1.7.0-24&fd00:1:0:7::-64",
        '{"PublicIP":"192.168.1.20","PublicIPv6":"fd00::20"}')  # fmt: skip
    before = keys(etcd_server, etcd_prefix)
    capsys.readouterr()
    assert ctl(etcd_server, etcd_prefix, "reserve", "10.1.5.0/24", "192.168.1.12", *V6) == 1
    err = capsys.readouterr().err
    assert "10.1.5.0/24 is already in the key 10.1.5.0-24, a lease of 192.168.1.12" in err
    assert "overlayctl leases revoke" in err
    assert ctl(etcd_server, etcd_prefix, "reserve", "10.1.8.0/24", "192.168.1.21", *V6) == 1
    err = capsys.readouterr().err
    assert "fd00:1:0:7::/64 is already in the key 10.1.7.0-24&fd00:1:0:7::-64, a reservation" in err
    assert "overlayctl unreserve" in err
    assert keys(etcd_server, etcd_prefix) == before


# ---------------------------------------------------------------------- properties

_V4 = st.builds(lambda a, n: IPv4Network((a, n), strict=False), st.integers(0, 2**32 - 1),
                st.integers(0, 32))  # fmt: skip
_V6 = st.builds(lambda a, n: IPv6Network((a, n), strict=False), st.integers(0, 2**128 - 1),
                st.integers(0, 128))  # fmt: skip
_CIDR_CHARS = st.sampled_from("0123456789abcdefABCDEF.:/%- \n\t+٢")


def _spellings() -> st.SearchStrategy[str]:
    """Text near a CIDR: real networks, with host bits, mangled, or random."""
    real = st.one_of(_V4, _V6).map(str)
    host = st.builds(lambda a, n: f"{ip_address(a)}/{n}",
                     st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32, 2**128 - 1)),
                     st.integers(0, 130))  # fmt: skip
    noisy = st.builds(lambda t, i, c: t[:i] + c + t[i:], real, st.integers(0, 45),
                      st.text(_CIDR_CHARS, max_size=3))  # fmt: skip
    return st.one_of(real, host, noisy, st.text(_CIDR_CHARS, max_size=50), st.text(max_size=50))


@given(_spellings())
def test_parse_subnet_gives_a_key_flannel_writes_or_a_clear_error(text: str) -> None:
    """Any text: a network whose lease key parses back to it (IPv6 as an IPv6-only key), or a
    UsageError with a short printable message; never anything else."""
    try:
        net = parse_subnet(text)
    except UsageError as e:
        message = str(e)
        assert message.isprintable() and len(message) < 400
        return
    assert "/" in text and "%" not in text
    assert net == ip_network(text, strict=True)
    key = subnet_key(net) if isinstance(net, IPv4Network) else subnet_key(NO_IPV4, net)
    assert parse_subnet_key(key) == ((net, None) if net.version == 4 else (NO_IPV4, net))


@given(st.one_of(_V4, _V6))
def test_parse_subnet_takes_every_network(net: IPv4Network | IPv6Network) -> None:
    assert parse_subnet(str(net)) == net
    assert parse_subnet(net.compressed) == parse_subnet(net.exploded) == net


@given(st.one_of(
    st.integers(0, 2**128 - 1).map(lambda a: str(ip_address(a))),
    st.integers(0, 2**32 - 1).map(lambda a: str(ip_address(a))),
    st.text(_CIDR_CHARS, max_size=45), st.text(max_size=45),
))  # fmt: skip
def test_parse_address_gives_an_address_a_lease_value_keeps(text: str) -> None:
    try:
        addr = parse_address(text)
    except UsageError as e:
        assert str(e).isprintable() and len(str(e)) < 400
        return
    if isinstance(addr, IPv4Address):
        assert LeaseAttrs.from_json(LeaseAttrs(addr).to_json()).public_ip == addr
    else:
        attrs = LeaseAttrs(IPv4Address(0), addr)
        assert LeaseAttrs.from_json(attrs.to_json()).public_ipv6 == addr


@st.composite
def _leases(draw: st.DrawFn) -> Lease:
    kind = draw(st.sampled_from(["v4", "dual", "v6"]))
    sub4 = NO_IPV4 if kind == "v6" else draw(_V4.filter(lambda n: n.prefixlen > 0))
    sub6 = None if kind == "v4" else draw(_V6)
    ip4 = IPv4Address(0) if kind == "v6" else draw(st.integers(1, 2**32 - 1).map(IPv4Address))
    ip6 = None if kind == "v4" else draw(st.integers(1, 2**128 - 1).map(IPv6Address))
    ttl = draw(st.one_of(st.none(), st.integers(0, 86400)))
    return Lease(sub4, LeaseAttrs(ip4, ip6, "vxlan"), sub6, None if ttl is None else 1e9 + ttl)


@given(st.lists(_leases(), min_size=1, max_size=6))
def test_table_columns_follow_the_families(leases: list[Lease]) -> None:
    """Every row has a cell per column; IPv6 columns exactly when some lease has an IPv6 part,
    IPv4 ones when some lease has an IPv4 part; an IPv6-only lease never shows 0.0.0.0."""
    rows = [_lease_row(lease, 1e9) for lease in leases]
    lines = render_leases_table(rows).splitlines()
    header = lines[0]
    has6 = any(lease.ipv6_subnet is not None for lease in leases)
    has4 = any(lease.subnet != NO_IPV4 for lease in leases)
    assert ("IPV6 SUBNET" in header) == has6
    assert header.startswith("SUBNET") == has4
    width = 5 + 2 * has4 + 2 * has6  # cells; only the STATUS "looks dead" holds a blank
    for lease, row, line in zip(leases, rows, lines[1 : len(rows) + 1], strict=True):
        cells = line.split()
        assert len(cells) == width + row["looks_dead"]
        first = lease.ipv6_subnet if lease.subnet == NO_IPV4 else lease.subnet
        assert str(first) in cells
        if lease.subnet == NO_IPV4:
            assert "0.0.0.0" not in line and "0.0.0.0/0" not in line
