"""The asyncio task gauge that the soak benchmark (bench/bench_soak.py) reads to see a leak."""

from __future__ import annotations

import asyncio

from overlay.health import Metrics


def tasks_gauge(text: str) -> int:
    values = [
        line.split()[1] for line in text.splitlines() if line.startswith("overlay_asyncio_tasks ")
    ]
    assert len(values) == 1, text
    return int(values[0])


async def test_the_gauge_counts_the_loops_live_tasks() -> None:
    metrics = Metrics()
    before = tasks_gauge(metrics.render())
    assert before == len(asyncio.all_tasks())
    stop = asyncio.Event()
    extra = [asyncio.create_task(stop.wait()) for _ in range(5)]
    assert tasks_gauge(metrics.render()) == before + 5
    stop.set()
    await asyncio.gather(*extra)
    assert tasks_gauge(metrics.render()) == before


def test_no_gauge_outside_an_event_loop() -> None:
    assert "overlay_asyncio_tasks" not in Metrics().render()
