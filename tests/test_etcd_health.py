"""subnetmgr.etcdconn: what the calls found (EtcdHealth) and server text made fit for a log."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from subnetmgr.etcdconn import EtcdHealth, _printable


def test_listeners_hear_each_change_of_up_once_and_a_broken_one_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = EtcdHealth()
    heard: list[tuple[bool, str]] = []

    def broken(up: bool, reason: str) -> None:
        raise RuntimeError("listener bug")

    health.listeners += [broken, lambda up, reason: heard.append((up, reason))]
    health.success(7)
    health.failure("one endpoint failed", down=False)  # another endpoint may still answer
    assert heard == [] and health.up and health.errors == 1
    with caplog.at_level(logging.ERROR, logger="overlay.subnetmgr.etcd"):
        health.failure("no endpoint answered", down=True)
        health.failure("still none", down=True)
    assert heard == [(False, "no endpoint answered")] and not health.up
    assert health.errors == 3 and health.last_error == "still none"
    assert any("listener failed" in r.getMessage() for r in caplog.records)
    health.success(5)  # an older revision never lowers the one seen
    assert heard[-1] == (True, "etcd answered again") and health.revision == 7
    assert health.last_success > 0


@given(st.one_of(st.text(max_size=600), st.binary(max_size=100), st.none(), st.integers()))
def test_server_text_becomes_one_printable_bounded_line(text: object) -> None:
    shown = _printable(text, limit=200)
    assert shown.isprintable() and len(shown) <= 203
    original = "" if text is None else str(text)
    if len(original) <= 200 and original.isprintable():
        assert shown == original  # nothing to fix: unchanged
