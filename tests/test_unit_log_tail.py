"""The sender process's side of the event log, on its own: a live tail reads what the writer has
finished as it is written (across roll-overs, never a record half stored), numbers gaps, and the
sender's acknowledgements turn back into the writer's ordinals; a log whose sender holds it is not
recovered by anyone else, even once its writer is dead."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tracklane._delivery.sender_process import ForwardedOrdinals
from tracklane._stores import event_log
from tracklane._stores.event_log import (
    EventLog,
    LogTail,
    _dead_segments,
    hold_for_sender,
    release_for_sender,
)
from tracklane._wire.batching import METRIC, PARAM, TAG

pytestmark = pytest.mark.unit

SERVER = "http://127.0.0.1:5000"


def _log(tmp_path: Path, segment_bytes: int = 64 << 10) -> EventLog:
    return EventLog(tmp_path / "ml_runs", SERVER, 1 << 30, segment_bytes=segment_bytes)


def _tail(log: EventLog) -> LogTail:
    return LogTail(log.directory, log.token)


def _write_metrics(log: EventLog, start: int, n: int) -> None:
    with log.lock:
        for step in range(start, start + n):
            assert log.metric("run-1", "loss", step * 0.5, 1_000 + step, step)


def test_a_tail_reads_what_is_written_as_it_is_written_across_roll_overs(tmp_path: Path) -> None:
    log = _log(tmp_path, segment_bytes=16 << 10)  # ~400 records a segment: several roll-overs
    tail = _tail(log)
    assert tail.read(100) == []  # nothing written yet: no segment
    seen: list[object] = []
    for chunk in range(10):
        _write_metrics(log, chunk * 300, 300)
        with log.lock:
            log.write((TAG, "run-1", "phase", f"chunk-{chunk}", 0, 0))
        seen += tail.read(1_000_000)
    assert len(list(log.directory.glob("events-*.tll"))) > 3
    metrics = [e for e in seen if e is not None and e[0] == METRIC]
    assert [e[5] for e in metrics] == list(range(3000))  # type: ignore[index]
    assert [e[3] for e in seen if e is not None and e[0] == TAG] == [f"chunk-{c}" for c in range(10)]  # type: ignore[index]
    assert tail.ordinal == log.ordinal == 3010
    assert tail.read(10) == []  # caught up


def test_a_tail_reads_at_most_its_limit_and_goes_on_where_it_stopped(tmp_path: Path) -> None:
    log = _log(tmp_path, segment_bytes=16 << 10)
    _write_metrics(log, 0, 1000)
    tail = _tail(log)
    steps = []
    while len(steps) < 1000:
        got = tail.read(7)
        assert 0 < len(got) <= 7
        steps += [e[5] for e in got]  # type: ignore[index]
    assert steps == list(range(1000))


def test_a_record_being_stored_is_not_read_until_its_seal_is_there(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _write_metrics(log, 0, 3)
    tail = _tail(log)
    assert len(tail.read(10)) == 3
    # The writer is mid-store: the word is there, the seal (stored last) not yet.
    at = log._off
    _write_metrics(log, 3, 1)
    seal_at = at + event_log._METRIC_SIZE - 4
    log._mm[seal_at : seal_at + 4] = b"\0\0\0\0"
    assert tail.read(10) == []
    log._mm[seal_at : seal_at + 4] = at.to_bytes(4, "little")  # the store finishes
    assert [e[5] for e in tail.read(10)] == [3]  # type: ignore[index]


def test_a_text_record_whose_body_is_not_stored_yet_waits(tmp_path: Path) -> None:
    log = _log(tmp_path)
    with log.lock:
        log.write((PARAM, "run-1", "lr", "0.1", 0, 0))
    tail = _tail(log)
    assert [e[3] for e in tail.read(10)] == ["0.1"]  # type: ignore[index]
    at = log._off
    with log.lock:
        log.write((PARAM, "run-1", "lr", "0.2", 0, 0))
    body = bytes(log._mm[at + 8 : log._off])
    log._mm[at + 8 : log._off] = b"\0" * len(body)  # the header is stored, the body not yet
    assert tail.read(10) == []
    log._mm[at + 8 : at + 8 + len(body)] = body
    assert [e[3] for e in tail.read(10)] == ["0.2"]  # type: ignore[index]


def test_events_with_no_record_are_gaps_that_keep_the_ordinals(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _write_metrics(log, 0, 2)
    with log.lock:
        assert not log.write((METRIC, "run-1", "loss", 1.0, 1 << 70, 2))  # cannot be packed: a gap
    _write_metrics(log, 3, 1)
    # The log is off for a while (a full disk): events 4 and 5 have ordinals and no record.
    with log.lock:
        log._roll(log.ordinal, 64)  # (what a roll-over after the outage looks like)
        log.ordinal += 2
        log._roll(log.ordinal, 64)
    _write_metrics(log, 6, 1)
    got = _tail(log).read(100)
    assert [None if e is None else e[5] for e in got] == [0, 1, None, 3, None, None, 6]  # type: ignore[index]


def test_a_metric_linked_to_a_logged_model_keeps_its_link(tmp_path: Path) -> None:
    log = _log(tmp_path)
    with log.lock:
        log.write((METRIC, "run-1", "acc", 0.9, 5, 1, ("m-1", None, "d1")))  # type: ignore[arg-type]
    assert _tail(log).read(10) == [(METRIC, "run-1", "acc", 0.9, 5, 1, ("m-1", None, "d1"))]


def test_a_writer_on_another_thread_is_read_complete_and_in_order(tmp_path: Path) -> None:
    log = _log(tmp_path, segment_bytes=32 << 10)
    tail = _tail(log)
    done = threading.Event()

    def write() -> None:
        for start in range(0, 20_000, 100):
            _write_metrics(log, start, 100)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    steps: list[int] = []
    while not (done.is_set() and len(steps) == 20_000):
        steps += [e[5] for e in tail.read(500)]  # type: ignore[index]
        assert len(steps) <= 20_000
    writer.join(10)
    assert steps == list(range(20_000))


def test_acknowledgements_turn_into_the_writers_ordinals_across_gaps() -> None:
    reported: list[int] = []
    ordinals = ForwardedOrdinals(Path("."), 100, reported.append)
    # Parent ordinals 100.. : event, gap, event, event, gap, gap, event
    with ordinals.lock:
        ordinals.write((METRIC, "r", "k", 0.0, 0, 0))  # sender index 0 = ordinal 100
    ordinals.gap()  # 101
    with ordinals.lock:
        ordinals.write((METRIC, "r", "k", 0.0, 0, 1))  # index 1 = 102
        ordinals.write((METRIC, "r", "k", 0.0, 0, 2))  # index 2 = 103
    ordinals.gap()  # 104
    ordinals.gap()  # 105
    with ordinals.lock:
        ordinals.write((METRIC, "r", "k", 0.0, 0, 3))  # index 3 = 106
    assert ordinals.watermark() == 100  # nothing settled yet
    ordinals.done(1, 3)  # out of order: nothing moves
    assert ordinals.watermark() == 100
    ordinals.done(0, 1)  # 100..103 settled, and the gaps after them: the next unsettled is 106
    assert ordinals.watermark() == 106
    ordinals.done(3, 4)
    assert ordinals.watermark() == 107
    assert reported[-1] == 107 and reported == sorted(reported)


def test_a_log_its_sender_holds_is_not_recovered_after_its_writer_dies(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _write_metrics(log, 0, 5)
    held = hold_for_sender(log.directory, log.token)
    for s in log._segments:  # the writer dies: its descriptors and locks go, its files stay
        s.mm.close()
        os.close(s.fd)
    log._segments = []
    assert _dead_segments(log.directory, frozenset()) == {}
    release_for_sender(log.directory, log.token, held)
    found = _dead_segments(log.directory, frozenset())
    assert len(found) == 1
    for fd in found.values():
        os.close(fd)


def test_a_tail_started_mid_segment_returns_only_what_comes_from_its_start(tmp_path: Path) -> None:
    log = _log(tmp_path, segment_bytes=16 << 10)
    _write_metrics(log, 0, 1000)  # several segments
    tail = LogTail(log.directory, log.token, 650)
    got = tail.read(10_000)
    assert [e[5] for e in got] == list(range(650, 1000))  # type: ignore[index]
    assert tail.ordinal == 1000
    for s in log._segments[:1]:  # the oldest segment acknowledged and gone: start past it
        s.close(delete=True)
    log._segments = log._segments[1:]
    later = LogTail(log.directory, log.token, 990)
    assert [e[5] for e in later.read(100)] == list(range(990, 1000))  # type: ignore[index]


def test_a_missing_segment_number_does_not_stop_the_tail(tmp_path: Path) -> None:
    log = _log(tmp_path, segment_bytes=16 << 10)
    _write_metrics(log, 0, 1000)
    tail = _tail(log)
    assert len(tail.read(100)) == 100
    # A later segment whose number is not the next one (an older writer's failed allocation).
    newest = log._segments[-1]
    renamed = newest.path.with_name(event_log.segment_name(log.token, newest.n + 5))
    os.rename(newest.path, renamed)
    assert [e[5] for e in tail.read(10_000)] == list(range(100, 1000))  # type: ignore[index]


def test_a_failed_allocation_leaves_no_hole_in_the_segment_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _log(tmp_path, segment_bytes=16 << 10)
    _write_metrics(log, 0, 10)
    real = event_log._reserve

    def full(fd: int, size: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(event_log, "_reserve", full)
    with log.lock:
        log._roll(log.ordinal, 64)  # fails: the log is off for now
    monkeypatch.setattr(event_log, "_reserve", real)
    with log.lock:
        log._retry_at = 0
        assert log._roll(log.ordinal, 64)
    assert [s.n for s in log._segments] == [1, 2]
