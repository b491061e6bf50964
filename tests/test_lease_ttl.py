"""--subnet-lease-ttl (FLANNELD_SUBNET_LEASE_TTL): the lease TTL for labs and tests, and how it
meets flannel's --subnet-lease-renew-margin (minutes)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integration.cli import register
from integration.lab import Lab, LabState, NodeState
from overlay.daemon import renew_margin, ttl_timeout_problem
from overlay.options import MIN_LEASE_TTL, parse_options
from subnetmgr.manager import SubnetManager


def test_default_is_flannels_24_hours_and_env_and_flag_set_it() -> None:
    assert parse_options([], environ={}).subnet_lease_ttl == 86400
    env = {"FLANNELD_SUBNET_LEASE_TTL": "30"}
    assert parse_options([], environ=env).subnet_lease_ttl == 30
    assert parse_options(["--subnet-lease-ttl", "12"], environ=env).subnet_lease_ttl == 12


@pytest.mark.parametrize("text", ["4", "0", "-10", "ten", "1.5", "", " ", "1e3", "\x00"])
def test_a_ttl_below_the_minimum_or_not_a_number_exits_2(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_options(["--subnet-lease-ttl", text], environ={})
    assert exc.value.code == 2
    assert "--subnet-lease-ttl" in capsys.readouterr().err


@given(st.text(max_size=30))
def test_any_ttl_text_is_a_valid_ttl_or_exit_2(text: str) -> None:
    """A typed outcome for any text: the integer it spells (at least the minimum), or exit 2."""
    try:
        expected: int | None = int(text)
    except ValueError:
        expected = None
    if text.startswith("-") and len(text) > 1:
        text = " " + text  # argparse would read a leading dash as a flag of its own
    try:
        got = parse_options(["--subnet-lease-ttl", text], environ={}).subnet_lease_ttl
    except SystemExit as e:
        assert e.code == 2
        assert expected is None or expected < MIN_LEASE_TTL
    else:
        assert got == expected and got >= MIN_LEASE_TTL


def test_renew_margin_below_the_ttl_is_kept_in_minutes() -> None:
    assert renew_margin(86400, 60) == 3600.0
    assert renew_margin(7200, 0) == 0.0


def test_renew_margin_not_below_the_ttl_renews_at_half_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="overlayd"):
        assert renew_margin(10, 60) == 5.0
    assert any("half the TTL" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)  # fmt: skip
    assert renew_margin(3600, 60) == 1800.0  # equal is not below


def test_lab_up_passes_lease_ttl_to_every_daemon(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="overlayctl")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["lab", "up", "--lease-ttl", "10"])
    assert args.lease_ttl == "10"
    lab = Lab("ttl", state_root=tmp_path)
    node = NodeState(1, "ns1", "192.0.2.1")
    lab.state = LabState("ttl", lease_ttl="10", daemon_endpoints="http://192.0.2.254:2379")
    argv = lab.daemon_argv(node)
    assert argv[argv.index("--subnet-lease-ttl") + 1] == "10"
    lab.state = LabState("ttl", daemon_endpoints="http://192.0.2.254:2379")
    assert "--subnet-lease-ttl" not in lab.daemon_argv(node)  # flannel's 24 h by default
    # A lab's state written before the option existed still loads.
    doc = asdict(LabState("old"))
    del doc["lease_ttl"]
    assert LabState.from_dict(doc).lease_ttl is None


def test_an_etcd_timeout_of_a_quarter_ttl_or_more_is_warned_about() -> None:
    assert ttl_timeout_problem(86400, 5.0) is None
    assert ttl_timeout_problem(40, 10.0) is None  # exactly a quarter
    problem = ttl_timeout_problem(6, 5.0)
    assert problem is not None and "--etcd-timeout 5s" in problem and "1.5s or less" in problem


@given(st.integers(min_value=MIN_LEASE_TTL, max_value=10**7))
def test_retries_never_wait_past_a_quarter_of_a_short_ttl(ttl: int) -> None:
    """keep()'s renewal and regain back-offs wait at most 30 s, and at most a quarter of a short
    TTL (a 30 s wait let a 6 s lease expire unrenewed in the chaos tests), never under 0.5 s."""
    cap = SubnetManager(None, ttl=ttl, renew_margin=0).retry_cap  # type: ignore[arg-type]
    assert 0.5 <= cap <= 30.0
    assert cap <= max(0.5, ttl / 4)
    assert cap == min(30.0, max(0.5, ttl / 4))
