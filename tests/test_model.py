"""Pure unit tests of flannel's key, value and config formats (no etcd, no root).

Literal examples come from shared/FLANNEL-COMPAT.md and pin the bytes flannel writes.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from subnetmgr.model import (
    ConfigError,
    Lease,
    LeaseAttrs,
    MalformedLease,
    NetworkConfig,
    parse_subnet_key,
    subnet_key,
)

# ----------------------------------------------------------------------------- keys


def test_subnet_key_matches_flannel() -> None:
    assert subnet_key(IPv4Network("10.5.52.0/24")) == "10.5.52.0-24"
    assert (
        subnet_key(IPv4Network("10.12.13.0/24"), IPv6Network("fd00:12:13::/56"))
        == "10.12.13.0-24&fd00:12:13::-56"
    )


def test_parse_subnet_key_round_trips() -> None:
    assert parse_subnet_key("10.5.52.0-24") == (IPv4Network("10.5.52.0/24"), None)
    assert parse_subnet_key("10.12.13.0-24&fd00:12:13::-56") == (
        IPv4Network("10.12.13.0/24"),
        IPv6Network("fd00:12:13::/56"),
    )
    lease = Lease(IPv4Network("10.5.52.0/24"), LeaseAttrs(IPv4Address("192.168.64.3")))
    assert lease.key == "10.5.52.0-24"


@pytest.mark.parametrize(
    "text",
    [
        "10.5.52.1-24",  # host bits set
        "10.5.52.0/24",  # slash instead of dash
        "10.5.52.0-24x",  # trailing junk (anchored)
        " 10.5.52.0-24",
        "10.5.52-24",
        "300.5.52.0-24",
        "10.5.52.0-33",
        "10.5.52.0-24&fd00::1-56",  # v6 host bits
        "10.5.52.0-24&zz::-56",
        "config",
        "",
    ],
)
def test_parse_subnet_key_rejects(text: str) -> None:
    with pytest.raises(MalformedLease, match="lease key"):
        parse_subnet_key(text)


# ----------------------------------------------------------------------------- values

VXLAN_VALUE = (
    '{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
    '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
)
HOSTGW_VALUE = '{"PublicIP":"192.168.64.4","PublicIPv6":null,"BackendType":"host-gw"}'
UDP_VALUE = '{"PublicIP":"192.168.64.5","PublicIPv6":null}'


def test_lease_value_bytes_match_flannel() -> None:
    vxlan = LeaseAttrs(
        IPv4Address("192.168.64.3"),
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"},
    )
    assert vxlan.to_json() == VXLAN_VALUE
    assert LeaseAttrs(IPv4Address("192.168.64.4"), backend_type="host-gw").to_json() == HOSTGW_VALUE
    assert LeaseAttrs(IPv4Address("192.168.64.5")).to_json() == UDP_VALUE


@pytest.mark.parametrize("value", [VXLAN_VALUE, HOSTGW_VALUE, UDP_VALUE])
def test_lease_value_round_trips_byte_for_byte(value: str) -> None:
    assert LeaseAttrs.from_json(value).to_json() == value
    assert LeaseAttrs.from_json(value.encode()).to_json() == value


def test_lease_value_decodes_fields() -> None:
    attrs = LeaseAttrs.from_json(VXLAN_VALUE)
    assert attrs.public_ip == IPv4Address("192.168.64.3")
    assert attrs.public_ipv6 is None
    assert attrs.backend_type == "vxlan"
    assert attrs.backend_data == {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
    assert LeaseAttrs.from_json(UDP_VALUE).backend_type == ""


def test_lease_value_ipv6_and_empty_fields() -> None:
    attrs = LeaseAttrs(IPv4Address("10.0.0.1"), IPv6Address("fd00::1"), "vxlan", {}, {})
    assert attrs.to_json() == (
        '{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1","BackendType":"vxlan"}'
    )
    assert LeaseAttrs.from_json(attrs.to_json()).public_ipv6 == IPv6Address("fd00::1")
    # An older flannel leaves PublicIPv6 out entirely; extra fields are ignored.
    assert LeaseAttrs.from_json('{"PublicIP":"10.0.0.2","Extra":1}').to_json() == (
        '{"PublicIP":"10.0.0.2","PublicIPv6":null}'
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "not valid JSON"),
        ("{not json", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        ("[1,2]", "not a JSON object"),
        ('"192.168.1.1"', "not a JSON object"),
        ("{}", "PublicIP"),
        ('{"PublicIP":null}', "PublicIP"),
        ('{"PublicIP":"10.0.0.256"}', "PublicIP"),
        ('{"PublicIP":3232235777}', "PublicIP"),  # an integer is not an address string
        ('{"PublicIP":"fd00::1"}', "PublicIP"),
        ('{"PublicIP":"10.0.0.1","PublicIPv6":"10.0.0.1"}', "PublicIPv6"),
        ('{"PublicIP":"10.0.0.1","PublicIPv6":1}', "PublicIPv6"),
        ('{"PublicIP":"10.0.0.1","BackendType":5}', "BackendType"),
        ('{"PublicIP":"10.0.0.1","BackendData":"x"}', "BackendData"),
        ('{"PublicIP":"10.0.0.1","BackendV6Data":[1]}', "BackendV6Data"),
    ],
)
def test_malformed_lease_values_are_rejected_with_reason(value: str | bytes, reason: str) -> None:
    with pytest.raises(MalformedLease, match=reason):
        LeaseAttrs.from_json(value)


def test_lease_reserved_flag() -> None:
    attrs = LeaseAttrs(IPv4Address("10.0.0.1"))
    assert Lease(IPv4Network("10.1.2.0/24"), attrs).reserved
    assert not Lease(IPv4Network("10.1.2.0/24"), attrs, expiration=1.0).reserved


# ----------------------------------------------------------------------------- config

V6 = '{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48"'


def cfg(**doc: Any) -> NetworkConfig:
    return NetworkConfig.from_json(json.dumps(doc))


def test_config_defaults_for_a_16() -> None:
    c = cfg(Network="10.5.0.0/16", Backend={"Type": "vxlan"})
    assert c.network == IPv4Network("10.5.0.0/16")
    assert c.subnet_len == 24
    assert c.subnet_min == IPv4Network("10.5.1.0/24")  # the first subnet is skipped
    assert c.subnet_max == IPv4Network("10.5.255.0/24")
    assert c.backend_type == "vxlan"
    assert c.backend == {"type": "vxlan"}
    assert c.enable_ipv4 and not c.enable_ipv6 and not c.enable_nftables
    assert c.ipv6_network is None
    assert not c.backend_defaulted


@pytest.mark.parametrize(
    ("network", "subnet_len", "smin", "smax"),
    [
        ("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0"),
        ("10.4.0.0/22", 24, "10.4.1.0", "10.4.3.0"),  # /22: still 24
        ("10.4.0.0/23", 25, "10.4.0.128", "10.4.1.128"),  # longer than /22: prefix + 2
        ("10.4.0.0/24", 26, "10.4.0.64", "10.4.0.192"),
        ("10.4.0.0/28", 30, "10.4.0.4", "10.4.0.12"),
    ],
)
def test_config_subnet_len_defaults(network: str, subnet_len: int, smin: str, smax: str) -> None:
    c = cfg(Network=network)
    assert c.subnet_len == subnet_len
    assert c.subnet_min == IPv4Network(f"{smin}/{subnet_len}")
    assert c.subnet_max == IPv4Network(f"{smax}/{subnet_len}")


def test_config_keys_are_case_insensitive_and_unknown_keys_ignored() -> None:
    c = NetworkConfig.from_json(
        '{"network":"10.1.0.0/16","SUBNETLEN":26,"subnetMin":"10.1.0.64","SubNetMax":"10.1.0.192",'
        '"backend":{"type":"udp","PORT":8285},"Whatever":[1,2],"enableNFTables":true}'
    )
    assert c.subnet_len == 26
    assert c.subnet_min == IPv4Network("10.1.0.64/26")
    assert c.subnet_max == IPv4Network("10.1.0.192/26")
    assert c.backend_type == "udp"
    assert c.backend == {"type": "udp", "port": 8285}
    assert c.enable_nftables


def test_config_without_backend_defaults_to_udp_and_says_so() -> None:
    c = cfg(Network="10.1.0.0/16")
    assert c.backend_type == "udp"
    assert c.backend_defaulted


def test_config_subnet_len_zero_or_null_means_default() -> None:
    assert cfg(Network="10.1.0.0/16", SubnetLen=0).subnet_len == 24
    assert cfg(Network="10.1.0.0/16", SubnetLen=None).subnet_len == 24


def test_config_min_max_accept_cidr_form() -> None:
    c = cfg(Network="10.1.0.0/16", SubnetMin="10.1.10.0/24", SubnetMax="10.1.20.0")
    assert c.subnet_min == IPv4Network("10.1.10.0/24")
    assert c.subnet_max == IPv4Network("10.1.20.0/24")


def test_config_ipv6() -> None:
    c = cfg(Network="10.1.0.0/16", EnableIPv6=True, IPv6Network="fd00:1::/48")
    assert c.enable_ipv6
    assert c.ipv6_network == IPv6Network("fd00:1::/48")
    assert c.ipv6_subnet_len == 64
    assert c.ipv6_subnet_min == IPv6Network("fd00:1:0:1::/64")
    assert c.ipv6_subnet_max == IPv6Network("fd00:1:0:ffff::/64")
    off = cfg(Network="10.1.0.0/16", IPv6Network="fd00:1::/48")
    assert not off.enable_ipv6 and off.ipv6_network is None and off.ipv6_subnet_len == 0


@pytest.mark.parametrize(
    ("network", "subnet_len"),
    [("fd00::/48", 64), ("fd00::/62", 64), ("fd00::/63", 65), ("fd00::/120", 122)],
)
def test_config_ipv6_subnet_len_defaults(network: str, subnet_len: int) -> None:
    c = cfg(Network="10.1.0.0/16", EnableIPv6=True, IPv6Network=network)
    assert c.ipv6_subnet_len == subnet_len


def test_config_ipv6_explicit_bounds() -> None:
    c = cfg(
        Network="10.1.0.0/16",
        EnableIPv6=True,
        IPv6Network="fd00::/48",
        IPv6SubnetLen=56,
        IPv6SubnetMin="fd00:0:0:1000::",
        IPv6SubnetMax="fd00:0:0:2000::/56",
    )
    assert c.ipv6_subnet_min == IPv6Network("fd00:0:0:1000::/56")
    assert c.ipv6_subnet_max == IPv6Network("fd00:0:0:2000::/56")


def test_config_contains() -> None:
    c = cfg(Network="10.1.0.0/16", SubnetMin="10.1.10.0", SubnetMax="10.1.20.0")
    assert c.contains(IPv4Network("10.1.10.0/24"))
    assert c.contains(IPv4Network("10.1.20.0/24"))
    assert not c.contains(IPv4Network("10.1.9.0/24"))
    assert not c.contains(IPv4Network("10.1.21.0/24"))
    assert not c.contains(IPv4Network("10.1.10.0/25"))  # wrong size
    assert not c.contains(IPv4Network("10.2.10.0/24"))


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("{bad", "(document)", "{bad"),
        ("[]", "(document)", "[]"),
        ("{}", "Network", None),
        ('{"Network":"10.1.0.0"}', "Network", "10.1.0.0"),  # a /32: too small
        ('{"Network":"10.1.0.1/16"}', "Network", "10.1.0.1/16"),  # host bits
        ('{"Network":"fd00::/48"}', "Network", "fd00::/48"),
        ('{"Network":"banana"}', "Network", "banana"),
        ('{"Network":16}', "Network", 16),
        ('{"Network":"10.1.0.0/29"}', "Network", "10.1.0.0/29"),
        ('{"Network":"10.1.0.0/16","SubnetLen":31}', "SubnetLen", 31),
        ('{"Network":"10.1.0.0/16","SubnetLen":17}', "SubnetLen", 17),
        ('{"Network":"10.1.0.0/24","SubnetLen":25}', "SubnetLen", 25),
        ('{"Network":"10.1.0.0/16","SubnetLen":"24"}', "SubnetLen", "24"),
        ('{"Network":"10.1.0.0/16","SubnetLen":24.5}', "SubnetLen", 24.5),
        ('{"Network":"10.1.0.0/16","SubnetLen":false}', "SubnetLen", False),
        ('{"Network":"10.1.0.0/16","SubnetLen":-1}', "SubnetLen", -1),
        ('{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0"}', "SubnetMin", "10.2.0.0"),
        ('{"Network":"10.1.0.0/16","SubnetMin":"10.1.0.5"}', "SubnetMin", "10.1.0.5"),
        ('{"Network":"10.1.0.0/16","SubnetMin":"x"}', "SubnetMin", "x"),
        ('{"Network":"10.1.0.0/16","SubnetMax":"10.1.0.128"}', "SubnetMax", "10.1.0.128"),
        ('{"Network":"10.1.0.0/16","SubnetMax":"11.1.0.0"}', "SubnetMax", "11.1.0.0"),
        (
            '{"Network":"10.1.0.0/16","SubnetMin":"10.1.9.0","SubnetMax":"10.1.8.0"}',
            "SubnetMin",
            "10.1.9.0",
        ),
        ('{"Network":"10.1.0.0/16","EnableIPv4":false}', "EnableIPv4", False),
        ('{"EnableIPv4":false,"EnableIPv6":false}', "EnableIPv4", False),
        ('{"EnableIPv4":false,"EnableIPv6":true}', "IPv6Network", None),
        ('{"Network":"10.1.0.0/16","EnableIPv6":"yes"}', "EnableIPv6", "yes"),
        ('{"Network":"10.1.0.0/16","EnableNFTables":1}', "EnableNFTables", 1),
        ('{"Network":"10.1.0.0/16","EnableIPv6":true}', "IPv6Network", None),
        (
            '{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"10.2.0.0/16"}',
            "IPv6Network",
            "10.2.0.0/16",
        ),
        (
            '{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/125"}',
            "IPv6Network",
            "fd00::/125",
        ),
        (V6 + ',"IPv6SubnetLen":127}', "IPv6SubnetLen", 127),
        (V6 + ',"IPv6SubnetLen":49}', "IPv6SubnetLen", 49),
        (V6 + ',"IPv6SubnetLen":"64"}', "IPv6SubnetLen", "64"),
        (V6 + ',"IPv6SubnetMin":"fd01::"}', "IPv6SubnetMin", "fd01::"),
        (V6 + ',"IPv6SubnetMin":"fd00::1"}', "IPv6SubnetMin", "fd00::1"),
        (V6 + ',"IPv6SubnetMax":"10.0.0.1"}', "IPv6SubnetMax", "10.0.0.1"),
        (
            V6 + ',"IPv6SubnetMin":"fd00:0:0:9::","IPv6SubnetMax":"fd00:0:0:8::"}',
            "IPv6SubnetMin",
            "fd00:0:0:9::",
        ),
        ('{"Network":"10.1.0.0/16","Backend":"vxlan"}', "Backend", "vxlan"),
        ('{"Network":"10.1.0.0/16","Backend":{"Type":""}}', "Backend.Type", ""),
        ('{"Network":"10.1.0.0/16","Backend":{"Type":7}}', "Backend.Type", 7),
    ],
)
def test_config_errors_name_field_and_value(text: str, field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        NetworkConfig.from_json(text)
    err = info.value
    assert err.field == field
    assert err.value == value
    assert type(err.value) is type(value)
    assert str(err).startswith(f"network config: {field}={value!r}: ")
    assert err.reason
