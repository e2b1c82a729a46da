"""A wait the user can see: the time left of ``tracklane sync`` / ``tracklane ui`` comes from the recent
rate, not the average since the start."""

from __future__ import annotations

import io
import re

import pytest

from tracklane._cli.progress import Progress

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _eta_seconds(status: str) -> int:
    found = re.search(r"ETA (?:(\d+)m)?(\d+)s", status)
    assert found, status
    return int(found.group(1) or 0) * 60 + int(found.group(2))


def test_a_fast_start_then_a_slow_pace_shows_the_slow_pace_eta() -> None:
    clock = Clock()
    progress = Progress(100_000, io.StringIO(), tty=False, clock=clock)
    progress.add(50_000)  # a burst in the first 0.1 s ...
    clock.now = 0.1
    progress.add(0)
    for _ in range(60):  # ... then 100 events/s for a minute
        clock.now += 1.0
        progress.add(100)

    status = progress.status()

    rate = progress.rate()
    assert rate is not None and 90 <= rate <= 110, status  # not 56,000/60 s = 930/s
    left = 100_000 - 56_000
    assert 0.9 * left / 100 <= _eta_seconds(status) <= 1.1 * left / 100, status


def test_a_slow_start_then_a_fast_pace_shows_the_fast_pace_eta() -> None:
    clock = Clock()
    progress = Progress(200_000, io.StringIO(), tty=False, clock=clock)
    for _ in range(40):  # 40 s of a cold server: 50 events/s
        clock.now += 1.0
        progress.add(50)
    for _ in range(15):  # then 5,000 events/s
        clock.now += 1.0
        progress.add(5_000)

    status = progress.status()

    left = 200_000 - 2_000 - 75_000
    assert _eta_seconds(status) <= 1.1 * left / 5_000, status  # ~25 s, not the 2m+ an average says


def test_the_rate_before_the_window_fills_is_the_rate_since_the_start() -> None:
    clock = Clock()
    progress = Progress(1_000, io.StringIO(), tty=False, clock=clock)
    clock.now = 2.0
    progress.add(200)

    assert progress.rate() == pytest.approx(100.0)
    assert "ETA 8s" in progress.status()
