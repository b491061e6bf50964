"""Interface choice against real links in a throwaway network namespace (no traffic is sent)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from overlay.iface import InterfaceError, choose_interface

pytestmark = pytest.mark.root


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns(unique: str) -> Iterator[str]:
    """A namespace with two veth pairs; ia0 carries the default route, id0 has no address."""
    ns = f"ovif{unique}"
    ip("netns", "add", ns)
    try:
        n = ("-n", ns)
        ip(*n, "link", "set", "lo", "up")
        ip(*n, "link", "add", "ia0", "type", "veth", "peer", "name", "ib0")
        ip(*n, "link", "add", "ic0", "mtu", "1400", "type", "veth", "peer", "name", "id0")
        for name, addr in (("ia0", "192.168.51.2/24"), ("ib0", "192.168.52.2/24"),
                           ("ic0", "192.168.53.2/24")):  # fmt: skip
            ip(*n, "addr", "add", addr, "dev", name)
        for name in ("ia0", "ib0", "ic0", "id0"):
            ip(*n, "link", "set", name, "up")
        ip(*n, "route", "add", "default", "via", "192.168.51.1", "dev", "ia0")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


async def test_by_name_with_mtu(netns: str) -> None:
    ext = await choose_interface(["ic0"], netns=netns)
    assert (ext.name, ext.iface_addr, ext.public_ip, ext.mtu) == (
        "ic0", IPv4Address("192.168.53.2"), IPv4Address("192.168.53.2"), 1400,
    )  # fmt: skip


async def test_by_ip_and_first_match_wins(netns: str) -> None:
    assert (await choose_interface(["192.168.52.2"], netns=netns)).name == "ib0"
    ext = await choose_interface(["nope0", "10.99.99.99", "ib0", "ic0"], netns=netns)
    assert ext.name == "ib0"


async def test_by_regex_on_names_and_addresses(netns: str) -> None:
    assert (await choose_interface(regexes=[r"^i[cd]"], netns=netns)).name == "ic0"
    assert (await choose_interface(regexes=[r"192\.168\.52\."], netns=netns)).name == "ib0"
    # --iface first, then the regexes
    ext = await choose_interface(["nope0"], [r"^zz", r"^ia"], netns=netns)
    assert ext.name == "ia0"


async def test_by_can_reach(netns: str) -> None:
    ext = await choose_interface(can_reach=IPv4Address("192.168.53.77"), netns=netns)
    assert ext.name == "ic0" and ext.iface_addr == IPv4Address("192.168.53.2")
    # Beyond the connected networks the default route decides.
    ext = await choose_interface(can_reach=IPv4Address("198.51.100.1"), netns=netns)
    assert ext.name == "ia0"


async def test_default_route_and_public_ip(netns: str) -> None:
    ext = await choose_interface(public_ip=IPv4Address("203.0.113.9"), netns=netns)
    assert ext.name == "ia0"
    assert ext.iface_addr == IPv4Address("192.168.51.2")
    assert ext.public_ip == IPv4Address("203.0.113.9")
    assert ext.mtu == 1500


async def test_nothing_matches_names_what_was_tried(netns: str) -> None:
    with pytest.raises(InterfaceError) as exc:
        await choose_interface(["nope0", "10.1.2.3"], [r"^zz"], netns=netns)
    text = str(exc.value)
    assert "--iface nope0" in text and "--iface 10.1.2.3" in text and "--iface-regex ^zz" in text


async def test_interface_without_ipv4_is_refused(netns: str) -> None:
    with pytest.raises(InterfaceError, match=r"'id0'.*no IPv4 address"):
        await choose_interface(["id0"], netns=netns)


async def test_no_default_route(netns: str) -> None:
    ip("-n", netns, "route", "del", "default")
    with pytest.raises(InterfaceError, match="default route"):
        await choose_interface(netns=netns)
    with pytest.raises(InterfaceError, match=r"--iface-can-reach 198\.51\.100\.1"):
        await choose_interface(can_reach=IPv4Address("198.51.100.1"), netns=netns)


# ------------------------------------------------ issue 12: addresses other hosts cannot reach


async def test_loopback_interface_is_refused(netns: str) -> None:
    # --iface lo used to publish 127.0.0.1 in the lease, and other hosts added it as a peer.
    for wanted in (["lo"], ["127.0.0.1"]):
        with pytest.raises(InterfaceError) as exc:
            await choose_interface(wanted, netns=netns)
        text = str(exc.value)
        assert "'lo'" in text and "127.0.0.1, which is loopback" in text and "--iface" in text
        assert "ia0 (192.168.51.2)" in text  # what could be chosen instead


async def test_link_local_only_interface_is_refused_and_skipped_when_another_exists(
    netns: str,
) -> None:
    ip("-n", netns, "addr", "add", "169.254.7.2/16", "dev", "id0")
    with pytest.raises(InterfaceError, match=r"169\.254\.7\.2, which is link-local"):
        await choose_interface(["id0"], netns=netns)
    # A link-local address listed first does not hide a usable one on the same link.
    ip("-n", netns, "addr", "add", "192.168.54.2/24", "dev", "id0")
    ext = await choose_interface(["id0"], netns=netns)
    assert ext.iface_addr == ext.public_ip == IPv4Address("192.168.54.2")


@pytest.mark.parametrize(
    ("public", "why"),
    [("127.0.0.9", "loopback"), ("0.0.0.0", "unspecified"), ("169.254.1.1", "link-local"),
     ("224.0.0.5", "multicast"), ("255.255.255.255", "reserved or broadcast")],
)  # fmt: skip
async def test_unusable_public_ip_is_refused(netns: str, public: str, why: str) -> None:
    with pytest.raises(InterfaceError, match=rf"--public-ip {public} is {why}"):
        await choose_interface(["ia0"], public_ip=IPv4Address(public), netns=netns)


async def test_no_match_lists_the_interfaces_that_exist(netns: str) -> None:
    with pytest.raises(InterfaceError) as exc:
        await choose_interface(["eth9"], netns=netns)
    text = str(exc.value)
    assert "Interfaces here: lo (127.0.0.1)" in text
    for shown in ("ia0 (192.168.51.2)", "ic0 (192.168.53.2)", "id0 (no IPv4 address)"):
        assert shown in text


async def test_address_with_prefix_length_from_the_flag(netns: str) -> None:
    from overlay.options import parse_options

    opts = parse_options(["--iface", "192.168.52.2/24"], environ={})
    assert opts.iface == ("192.168.52.2",)
    assert (await choose_interface(opts.iface, netns=netns)).name == "ib0"


# ------------------------------------------------ IPv6-only underlays (EnableIPv4 false)


async def test_interface_with_only_ipv6_is_chosen_without_an_ipv4_address(netns: str) -> None:
    """id0 gets a global IPv6 address and no IPv4 one: it is chosen (by name, by its IPv6
    address, by a regex, or as the interface of the IPv6 default route when no IPv4 default
    exists) with public_ip NO_ADDRESS (0.0.0.0), which only an IPv6-only network accepts."""
    from ipaddress import IPv6Address

    from backends.base import NO_ADDRESS

    n = ("-n", netns)
    ip(*n, "addr", "add", "fd51::2/64", "dev", "id0", "nodad")
    ext = await choose_interface(["id0"], netns=netns)
    assert (ext.name, ext.public_ip, ext.iface_addr) == ("id0", NO_ADDRESS, NO_ADDRESS)
    assert ext.public_ipv6 == ext.iface_addr6 == IPv6Address("fd51::2")
    assert (await choose_interface(["fd51::2"], netns=netns)).name == "id0"
    assert (await choose_interface(regexes=[r"^fd51:"], netns=netns)).name == "id0"
    # No IPv4 default route: the interface of the IPv6 one.
    ip(*n, "route", "del", "default")
    ip(*n, "-6", "route", "add", "default", "via", "fd51::1", "dev", "id0")
    assert (await choose_interface(netns=netns)).name == "id0"
    # --public-ip names an IPv4 address the interface does not have: still refused.
    with pytest.raises(InterfaceError, match="no IPv4 address"):
        await choose_interface(["id0"], public_ip=IPv4Address("192.0.2.9"), netns=netns)
