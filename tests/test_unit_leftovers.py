"""The stores' last-resort keeping at exit: one run's failing write loses only that run's events."""

from __future__ import annotations

import pytest

from tracklane._stores.leftovers import keep_leftovers
from tracklane._wire.run_end import RunEnd

pytestmark = pytest.mark.unit


def test_a_run_whose_write_fails_is_counted_lost_and_the_others_and_the_ends_are_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kept: dict[str, list[object]] = {}
    ended: list[str] = []

    def write_events(run_id: str, events: list[object]) -> None:
        if run_id == "bad":
            raise OSError("disk full")
        kept.setdefault(run_id, []).extend(events)

    events = [(0, "good", "a", 1.0, 1, 0), (0, "bad", "a", 1.0, 1, 0), (0, "good", "b", 2.0, 1, 0)]
    ends = [RunEnd("good", "FINISHED", 5), RunEnd("bad", "FAILED", 5)]

    lost = keep_leftovers(events, ends, write_events, lambda end: ended.append(end.run_id))  # type: ignore[arg-type]

    assert lost == 1
    assert kept == {"good": [events[0], events[2]]}
    assert ended == ["good", "bad"]
    assert "could not keep 1 event(s) of run bad: disk full" in caplog.text
