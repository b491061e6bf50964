"""`--iface` values (issue 12): names, addresses, address/length, and exactly why not."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.options import IFNAMSIZ, FlagValueError, _iface, parse_options


@pytest.mark.parametrize(
    ("text", "want"),
    [("eth1", "eth1"), (" ens3 ", "ens3"), ("192.0.2.12", "192.0.2.12"),
     ("192.0.2.12/24", "192.0.2.12"), ("10.1.2.3/32", "10.1.2.3"), ("10.1.2.3/0", "10.1.2.3"),
     ("enp0s31f6", "enp0s31f6"), ("br-lan.10", "br-lan.10"), ("123", "123")],
)  # fmt: skip
def test_accepted(text: str, want: str) -> None:
    assert _iface(text) == want


@pytest.mark.parametrize(
    ("text", "why"),
    [("192.0.2.12/33", "prefix length '33' after the / must be a number 0-32"),
     ("192.0.2.12/", "prefix length '' after the /"),
     ("192.0.2.12/24/8", "prefix length '24/8'"),
     ("192.0.2.300/24", "'192.0.2.300' before the / is not an IPv4 address"),
     ("eth0/24", "'eth0' before the / is not an IPv4 address"),
     ("192.0.2.1.5", "looks like an IPv4 address but is not"),
     ("300.1.1.1", "looks like an IPv4 address but is not"),
     ("averyveryverylongname", "at most 15 bytes"),
     ("eth0:1", "no spaces, '/', ':'"), ("e th0", "no spaces"), ("eth\x1b0", "control"),
     ("..", "is not an interface name"), ("", "expected an interface name")],
)  # fmt: skip
def test_refused_saying_why(text: str, why: str) -> None:
    with pytest.raises(FlagValueError) as exc:
        _iface(text)
    assert why in str(exc.value)


def test_refused_from_the_command_line_and_env(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_options(["--iface", "192.0.2.12/40"], environ={})
    assert exc.value.code == 2 and "0-32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_options([], environ={"FLANNELD_IFACE": "eth0,192.0.2.1/99"})
    assert "FLANNELD_IFACE" in capsys.readouterr().err
    assert parse_options([], environ={"FLANNELD_IFACE": "eth0,192.0.2.1/24"}).iface == (
        "eth0", "192.0.2.1",
    )  # fmt: skip


@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_address_with_length_round_trips_to_the_address(addr: IPv4Address, plen: int) -> None:
    text = str(IPv4Interface((addr, plen)))
    assert _iface(text) == str(addr)


@given(st.text(max_size=40))
def test_any_text_is_a_name_an_address_or_a_typed_error(text: str) -> None:
    try:
        value = _iface(text)
    except FlagValueError as e:
        assert str(e)
        return
    try:
        IPv4Address(value)
    except ValueError:  # a name: what the kernel would take as one
        assert 0 < len(value.encode()) < IFNAMSIZ
        assert value not in (".", "..")
        assert not any(c in value for c in "/:") and value.isprintable()
        assert not any(c.isspace() for c in value)
        assert value == text.strip()
