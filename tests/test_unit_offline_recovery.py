"""Offline, a dead writer's event log joins its runs in the journal: the run it was logging (not a
server's spilled run), each point once even when the journal already got some of them before the
kill (written, the acknowledgement lost), a tag's last value last, and nothing for a run the journal
does not have."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tracklane._stores.event_log import OFFLINE, EventLog, recover
from tracklane._stores.journal import Journal
from tracklane._wire.batching import METRIC, PARAM, TAG

pytestmark = pytest.mark.unit


def _offline_log(tmp_path: Path) -> EventLog:
    return EventLog(tmp_path / "ml_runs", OFFLINE, 1 << 30, segment_bytes=64 << 10)


def _killed(log: EventLog) -> None:
    """The writer dies: its descriptors (and locks) go, its files stay (as after SIGKILL)."""
    for s in log._segments:
        s.mm.close()
        os.close(s.fd)
    log._segments = []


def _offline_run(journal: Journal) -> str:
    experiment = journal.create_experiment("exp", {})
    return journal.create_run(experiment, "trial", 1_000, {}).info.run_id


def test_records_join_the_offline_run_each_point_once_with_the_last_tag_value(tmp_path: Path) -> None:
    journal = Journal.at(tmp_path)
    run_id = _offline_run(journal)
    log = _offline_log(tmp_path)
    points = [(METRIC, run_id, "loss", step * 0.5, 2_000 + step, step) for step in range(100)]
    points[7] = (METRIC, run_id, "loss", float("nan"), 2_007, 7)  # NaN is NULL in the journal
    with log.lock:
        for event in points:
            log.write(event)
        log.write((PARAM, run_id, "lr", "0.1", 0, 0))
        log.write((TAG, run_id, "phase", "a", 0, 0))
        log.write((TAG, run_id, "phase", "b", 0, 0))
    # The worker wrote the first 60 points (NaN among them) before the kill; none acknowledged.
    journal.write_events(run_id, points[:60])
    _killed(log)

    assert recover(tmp_path / "ml_runs", lambda: journal) == 43

    history = journal.metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(100))  # each point once
    run = journal.get_run(run_id)
    assert run.data.params == {"lr": "0.1"}
    assert run.data.tags["phase"] == "b"
    assert run.info.status == "RUNNING"  # nobody ended it, as MLflow leaves a killed run
    assert journal.deliveries("http://127.0.0.1:5000", spilled_only=True) == []  # no spilled run made
    journal.close()


def test_a_point_logged_twice_on_purpose_is_kept_as_logged_when_neither_copy_was_written(
    tmp_path: Path,
) -> None:
    journal = Journal.at(tmp_path)
    run_id = _offline_run(journal)
    log = _offline_log(tmp_path)
    with log.lock:
        log.write((METRIC, run_id, "loss", 1.0, 5, 0))
        log.write((METRIC, run_id, "loss", 1.0, 5, 0))
    _killed(log)
    assert recover(tmp_path / "ml_runs", lambda: journal) == 2
    assert len(journal.metric_history(run_id, "loss")) == 2  # only what the journal held is skipped
    journal.close()


def test_records_of_a_run_the_journal_does_not_have_are_skipped_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal.at(tmp_path)
    kept = _offline_run(journal)
    log = _offline_log(tmp_path)
    with log.lock:
        log.write((METRIC, "gone-run", "loss", 1.0, 5, 0))
        log.write((METRIC, kept, "loss", 2.0, 6, 1))
    _killed(log)
    with caplog.at_level(logging.WARNING, logger="tracklane"):
        assert recover(tmp_path / "ml_runs", lambda: journal) == 1
    assert "1 recovered event(s) of offline run gone-run are skipped" in caplog.text
    assert [m.value for m in journal.metric_history(kept, "loss")] == [2.0]
    journal.close()
