"""A journal on a full disk (issue 17, item 5): the server answers 503 long enough for events to
spill and fill a small tmpfs, then recovers before ``end_run``. Nothing deliverable is lost while the
server answers: every point reaches it once, and the run is never FINISHED while points are missing.

The disk is a real one: a tmpfs of a few hundred KiB, mounted for the test (root only; skipped with
the reason otherwise), so SQLite meets its own "database or disk is full" on every write path
(spilling rows, and recording the uploader's progress).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tmpfs
from tracklane import TrackingClient

from servers import FaultProxy, Reader

pytestmark = [pytest.mark.server, pytest.mark.slow]

#: Small enough that the journal fills with a fraction of the points, large enough for its schema.
DISK_SIZE = "512k"
POINTS = 30_000
UNAVAILABLE = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}'


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a tmpfs of ``DISK_SIZE``, unmounted afterwards."""
    with tmpfs.small_disk(tmp_path / "small-disk", DISK_SIZE) as where:
        yield where


def wait_until_the_journal_is_full(tc: TrackingClient) -> None:
    """Bounded: the sender gave up on the server, spilled, and the journal's disk is full."""
    spool = tc._engine.spool
    assert spool is not None
    deadline = time.monotonic() + 90
    while not spool.broken and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spool.broken, f"the journal never filled the {DISK_SIZE} disk: {tc.stats()}"


def test_a_full_journal_never_hides_undelivered_events(
    fault_proxy: FaultProxy,
    reader: Reader,
    experiment_name: str,
    full_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tracklane")
    tc = TrackingClient(
        api_host=fault_proxy.url, path_to_storage=str(full_disk), retry_window=2.0, exit_timeout=120
    )
    try:
        tc.set_experiment(experiment_name)
        run = tc.start_run(run_name="full-disk", log_system_metrics=False)
        run_id = run.info.run_id
        fault_proxy.answer("runs/log-batch", 503, UNAVAILABLE)
        tc.log_param("lr", "0.1")
        for step in range(POINTS):
            tc.log_metric("loss", step * 0.5, step=step)

        # The sender gives up on the server after retry_window, spills, and fills the disk.
        wait_until_the_journal_is_full(tc)
        assert "database or disk is full" in caplog.text
        in_journal = tc.stats()["spilled"]
        assert 0 < in_journal < POINTS  # some in the journal, the rest held in memory

        fault_proxy.heal()  # the server recovers before end_run
        tc.end_run()
        # Never reported complete while points are missing: FINISHED only with all of them there.
        stored = reader.history(run_id, "loss")
        status = reader.run(run_id)["info"]["status"]
        assert status != "FINISHED" or len(stored) == POINTS, (status, len(stored))
        if status != "FINISHED":  # end_run gave up first: it said why, at ERROR
            assert any(
                r.levelno == logging.ERROR and "is not ended yet" in r.getMessage() for r in caplog.records
            )
    finally:
        tc.close()

    stats = tc.stats()
    dropped = int(stats["dropped"])
    stored = reader.history(run_id, "loss")
    steps = [s for _, s, _ in stored]
    assert len(steps) == len(set(steps))  # no duplicates: each point stored once
    assert set(steps) <= set(range(POINTS))
    # Every point is on the server, or counted as dropped and said at ERROR. The server answers,
    # and memory holds what the disk could not: none is dropped.
    assert len(steps) + dropped == POINTS
    assert dropped == 0, stats
    assert [v for v, _, _ in stored] == [s * 0.5 for s in range(POINTS)]
    assert reader.params(run_id) == {"lr": "0.1"}
    assert reader.run(run_id)["info"]["status"] == "FINISHED"
    assert "neither delivered nor kept" not in caplog.text
    assert stats["delivered"] == stats["enqueued"]  # the counts are true: no resend counted twice


def test_a_run_whose_events_are_only_in_memory_is_ended_once_they_are_delivered(
    fault_proxy: FaultProxy,
    reader: Reader,
    experiment_name: str,
    full_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``end_run`` while the server still refuses log-batch (it answers ``runs/update``) and the
    journal is full: the run must not be marked FINISHED; it is ended by the first flush that
    delivers its events."""
    caplog.set_level(logging.INFO, logger="tracklane")
    tc = TrackingClient(
        api_host=fault_proxy.url, path_to_storage=str(full_disk), retry_window=2.0, exit_timeout=120
    )
    try:
        tc.set_experiment(experiment_name)
        run_id = tc.start_run(run_name="ended-in-memory", log_system_metrics=False).info.run_id
        fault_proxy.answer("runs/log-batch", 503, UNAVAILABLE)
        for step in range(POINTS):
            tc.log_metric("loss", step * 0.5, step=step)
        wait_until_the_journal_is_full(tc)

        tc.end_run()  # gives up after retry_window: the server takes no event
        assert reader.run(run_id)["info"]["status"] == "RUNNING"
        assert any(
            r.levelno == logging.ERROR and "is not ended yet" in r.getMessage() and run_id in r.getMessage()
            for r in caplog.records
        )

        fault_proxy.heal()
        assert tc.flush(timeout=120)
        assert reader.run(run_id)["info"]["status"] == "FINISHED"
        steps = [s for _, s, _ in reader.history(run_id, "loss")]
        assert steps == list(range(POINTS))  # every point, once
    finally:
        tc.close()
    assert tc.stats()["dropped"] == 0
    assert "neither delivered nor kept" not in caplog.text
