"""One rule decides how a run ends when no one names the status: a block left by an exception,
an interpreter exiting of one, SIGTERM, a framework saying training did not complete."""

from __future__ import annotations

import asyncio
import sys

import pytest

from tracklane import ActiveRun
from tracklane._end_status import end_status, exit_status_of_process
from tracklane._entities import Run, RunData, RunInfo

pytestmark = pytest.mark.unit


class FrameworkStop(Exception):
    """A framework's own "the process got SIGTERM" exception (Lightning's SIGTERMException)."""


@pytest.mark.parametrize(
    ("exc", "options", "status"),
    [
        (None, {}, "FINISHED"),
        (ValueError, {}, "FAILED"),
        (ValueError("boom"), {}, "FAILED"),
        (KeyboardInterrupt, {}, "KILLED"),
        (KeyboardInterrupt(), {}, "KILLED"),
        (asyncio.CancelledError, {}, "KILLED"),
        (SystemExit, {}, "FAILED"),
        (None, {"signal": True}, "KILLED"),
        (ValueError, {"signal": True}, "KILLED"),
        (None, {"failed": True}, "FAILED"),
        (KeyboardInterrupt, {"failed": True}, "KILLED"),
        (FrameworkStop, {"failed": True}, "FAILED"),
        (FrameworkStop, {"failed": True, "killed_by": (FrameworkStop,)}, "KILLED"),
    ],
)
def test_end_status_by_how_the_run_ended(exc: object, options: dict[str, object], status: str) -> None:
    assert end_status(exc, **options) == status


@pytest.mark.parametrize(
    ("dying", "status", "unfinished"),
    [
        (None, "FINISHED", "FAILED"),
        (RuntimeError("x"), "FAILED", "FAILED"),
        (KeyboardInterrupt(), "KILLED", "KILLED"),
    ],
)
def test_a_run_active_at_exit_ends_as_the_process_does(
    monkeypatch: pytest.MonkeyPatch, dying: BaseException | None, status: str, unfinished: str
) -> None:
    for name in ("last_exc", "last_value"):
        monkeypatch.setattr(sys, name, dying, raising=False)

    assert exit_status_of_process() == status
    assert exit_status_of_process(failed=True) == unfinished


def test_leaving_a_with_block_ends_the_run_it_holds_by_the_same_rule() -> None:
    run = Run(RunInfo(run_id="r1", experiment_id="0"), RunData(params={"lr": "0.1"}))
    ended: list[str] = []

    with ActiveRun(run, ended.append) as active:
        assert active.run is run
        assert active.info.run_id == "r1" and active.data.params == {"lr": "0.1"}
        assert active.to_dictionary() == run.to_dictionary()
    with pytest.raises(KeyboardInterrupt), ActiveRun(run, ended.append):
        raise KeyboardInterrupt
    with pytest.raises(ValueError), ActiveRun(run, ended.append):
        raise ValueError("boom")

    assert ended == ["FINISHED", "KILLED", "FAILED"]
