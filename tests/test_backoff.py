"""subnetmgr.backoff: the one retry delay of the project."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from subnetmgr.backoff import Backoff


def test_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff(0.5, 4.0, jitter=False)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.failures == 6
    b.reset()
    assert b.next() == 0.5 and b.failures == 1


@given(
    st.floats(0.001, 10.0),
    st.floats(1.0, 100.0),
    st.integers(1, 60),
    st.integers(0, 2**32),
)
def test_every_wait_is_within_half_and_all_of_a_capped_doubling(
    first: float, factor: float, n: int, seed: int
) -> None:
    cap = first * factor
    b = Backoff(first, cap, rng=random.Random(seed))
    for i in range(n):
        nominal = min(first * 2**i, cap)
        wait = b.next()
        assert nominal * 0.5 - 1e-9 <= wait <= nominal + 1e-9


@pytest.mark.parametrize(("first", "cap"), [(0, 1), (-1, 1), (2, 1)])
def test_nonsense_delays_are_refused(first: float, cap: float) -> None:
    with pytest.raises(ValueError, match="back-off"):
        Backoff(first, cap)


async def test_sleep_waits_the_delay_it_returns() -> None:
    b = Backoff(0.01, 0.02, jitter=False)
    assert await b.sleep() == 0.01
    assert await b.sleep() == 0.02
