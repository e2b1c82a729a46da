"""The event log on its own: records round-trip, a torn or damaged record is never trusted,
segments roll over and go once acknowledged, a full disk turns the log off without a crash, and a
dead writer's log moves into the journal once (an offline writer's into its own run, each point
once, a tag's last value last)."""

from __future__ import annotations

import fcntl
import logging
import math
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import tmpfs
from tracklane._stores import event_log
from tracklane._stores.event_log import (
    OFFLINE,
    EventLog,
    _dead_segments,
    dead_segments,
    read_segment,
    recover,
)
from tracklane._stores.journal import Journal
from tracklane._wire.batching import METRIC, PARAM, TAG

pytestmark = pytest.mark.unit

SERVER = "http://127.0.0.1:5000"


def _log(tmp_path: Path, segment_bytes: int = 64 << 10, max_bytes: int = 1 << 30) -> EventLog:
    return EventLog(tmp_path / "ml_runs", SERVER, max_bytes, segment_bytes=segment_bytes)


def _metrics(log: EventLog, n: int, start: int = 0, key: str = "loss") -> None:
    with log.lock:
        for step in range(start, start + n):
            log.metric("run-1", key, step * 0.5, 1_000 + step, step)


def _segments(log: EventLog) -> list[Path]:
    return sorted(log.directory.glob("events-*.tll"))


def _all_events(log: EventLog) -> list[tuple[int, tuple[object, ...]]]:
    out = []
    for path in _segments(log):
        read = read_segment(path)
        assert read is not None
        out += read.events
    return out


def _seal_at(log: EventLog, n: int) -> int:
    """File offset of the seal of the ``n``-th metric record ``_metrics`` wrote (0-based), found
    by walking the records (a group's CHECK record sits between two metric records)."""
    data = _segments(log)[0].read_bytes()
    pos, seen = event_log.HEADER_BYTES, -1
    while True:
        (word,) = struct.unpack_from("<I", data, pos)
        if word == event_log._METRIC_WORD:
            seen += 1
            if seen == n:
                return pos + 36
            pos += 40
        else:
            pos += 8 + (word & 0xFFFFFF)


def _flip(path: Path, at: int, value: bytes | None = None) -> None:
    data = bytearray(path.read_bytes())
    if value is None:
        data[at] ^= 0xFF
    else:
        data[at : at + len(value)] = value
    path.write_bytes(bytes(data))


def _a_prefix_ending_in_the_group_of(read: event_log.SegmentRead, n: int) -> int:
    """How many records ``read`` trusted: the records before the group of the ``n``-th one (a
    damaged group is distrusted whole); asserts they are exactly the first ones written."""
    got = [e[5] for _, e in read.events]
    assert got == list(range(len(got)))
    assert n - event_log.GROUP_BYTES // 40 <= len(got) <= n
    return len(got)


def _dead(log: EventLog) -> None:
    """The writer dies: its descriptors (and locks) go, its files stay (as after SIGKILL)."""
    for s in log._segments:
        s.mm.close()
        os.close(s.fd)
    log._segments = []


def test_metrics_params_and_tags_round_trip_with_keys_written_once(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _metrics(log, 500)
    with log.lock:
        log.write((PARAM, "run-1", "lr", "0.001", 0, 0))
        log.write((TAG, "run-1", "note", "héllo \U0001f600", 0, 0))
        log.write((METRIC, "run-1", "nan", float("nan"), 5, -3))

    events = _all_events(log)
    assert [o for o, _ in events] == list(range(503))
    expected = [(METRIC, "run-1", "loss", s * 0.5, 1_000 + s, s) for s in range(500)]
    assert [e for _, e in events[:500]] == expected
    assert events[500][1] == (PARAM, "run-1", "lr", "0.001", 0, 0)
    assert events[501][1] == (TAG, "run-1", "note", "héllo \U0001f600", 0, 0)
    kind, _, key, value, ts, step = events[502][1]
    assert (kind, key, ts, step) == (METRIC, "nan", 5, -3) and value != value
    data = _segments(log)[0].read_bytes()
    assert data.count(b"loss") == 1 and data.count(b"run-1") == 1  # interned: once per segment
    log.close()


def test_a_metric_record_is_40_bytes_and_each_group_of_them_ends_in_a_12_byte_check(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _metrics(log, 1)
    first = log._off
    _metrics(log, 1000, start=1)
    checks, rest = divmod(log._off - first - 40 * 1000, 12)
    assert rest == 0 and abs(checks - 40 * 1000 / event_log.GROUP_BYTES) <= 1
    log.close()


def test_a_torn_tail_record_is_ignored_quietly(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _metrics(log, 100)
    path, end = _segments(log)[0], log._off
    _dead(log)
    with path.open("r+b") as f:  # the last record half-written: its second half never arrived
        f.seek(end - 20)
        f.write(b"\0" * 20)

    read = read_segment(path)
    assert read is not None and [o for o, _ in read.events] == list(range(99))
    assert read.torn and read.damaged == 0


def test_damaged_bytes_in_the_middle_are_detected_and_nothing_after_them_is_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = _log(tmp_path)
    _metrics(log, 300)  # three groups of ~100 records: the damaged one is followed by its CHECK
    path = _segments(log)[0]
    _dead(log)
    _flip(path, _seal_at(log, 150) - 10)  # inside the 151st metric record's step: its seal holds

    read = read_segment(path)
    assert read is not None and read.damaged > 0 and not read.torn
    kept = _a_prefix_ending_in_the_group_of(read, 150)
    journal = Journal.at(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tracklane"):
        assert recover(tmp_path / "ml_runs", lambda: journal) == kept
    assert "damaged" in caplog.text and path.name in caplog.text
    assert [m.step for m in journal.metric_history("run-1", "loss")] == list(range(kept))
    journal.close()


def test_pack_into_zeroes_the_record_then_stores_its_fields_in_order() -> None:
    # What the seal relies on (CPython's s_pack_internal): a store that stops part-way, here on a
    # step too large, leaves everything after the last field it stored zero, the seal included.
    record = bytearray(b"\xff" * 40)
    with pytest.raises(struct.error):
        event_log._METRIC_RECORD.pack_into(record, 0, event_log._METRIC_WORD, 1, 2, 0.5, 1_000, 10**30, 512)
    assert record[:28] == event_log._METRIC_RECORD.pack(event_log._METRIC_WORD, 1, 2, 0.5, 1_000, 0, 0)[:28]
    assert record[28:] == bytes(12)


@pytest.mark.parametrize("stored", [4, 12, 20, 28, 36], ids=lambda n: f"{n}-of-40-bytes")
def test_a_metric_record_killed_mid_store_has_no_seal_and_ends_the_read_as_torn(
    tmp_path: Path, stored: int
) -> None:
    log = _log(tmp_path)
    _metrics(log, 100)
    path, end = _segments(log)[0], log._off
    _dead(log)
    _flip(path, end - 40 + stored, bytes(40 - stored))  # the last record's later stores never happened

    read = read_segment(path)
    assert read is not None and [o for o, _ in read.events] == list(range(99))
    assert read.torn and read.damaged == 0


def test_a_metric_record_with_a_wrong_seal_in_the_middle_is_damage(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _metrics(log, 300)
    path = _segments(log)[0]
    _dead(log)
    at = _seal_at(log, 250)  # in the last group, which no CHECK covers yet: the seal alone
    _flip(path, at, struct.pack("<I", at - 36 + 40))  # the next record's offset

    read = read_segment(path)
    assert read is not None and read.damaged > 0 and not read.torn
    _a_prefix_ending_in_the_group_of(read, 250)


def test_a_last_metric_record_with_a_wrong_nonzero_seal_is_damage_not_a_tear(tmp_path: Path) -> None:
    # A torn store leaves the seal zero; a seal that is there but wrong was damaged after.
    log = _log(tmp_path)
    _metrics(log, 100)
    path, end = _segments(log)[0], log._off
    _dead(log)
    _flip(path, end - 1)

    read = read_segment(path)
    assert read is not None and read.damaged > 0 and not read.torn


def test_a_zeroed_record_frame_in_the_middle_is_damage_not_the_end(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _metrics(log, 100)
    path = _segments(log)[0]
    _dead(log)
    _flip(path, _seal_at(log, 50) - 36, bytes(8))

    read = read_segment(path)
    assert read is not None and read.damaged > 0 and not read.torn


def test_fast_and_slow_path_records_interleaved_round_trip_exactly(tmp_path: Path) -> None:
    log = _log(tmp_path, segment_bytes=8 << 10)  # several groups, and a roll-over mid-way
    values = [0.1, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308]
    steps = [0, -(2**63), 2**63 - 1]
    expected: list[tuple[object, ...]] = []
    with log.lock:
        for i in range(400):
            run, key, ts = f"run-{i % 3}", f"k{i % 7}", 2**63 - 1 - i
            event: tuple[object, ...] = (METRIC, run, key, values[i % 7], ts, steps[i % 3])
            if i % 5 == 0:
                log.write(event)  # type: ignore[arg-type]  # the slow path's sealed record
            elif i % 11 == 0:
                event = (PARAM, f"run-{i % 3}", f"p{i}", "v" * (i % 50), 0, 0)
                log.write(event)
            elif i % 13 == 0:
                event = (*event, ("model-1", None, "digest"))
                log.write(event)  # type: ignore[arg-type]
            else:
                log.metric(*event[1:])  # type: ignore[arg-type]
            expected.append(event)  # a linked metric keeps its link (model, dataset)
    assert len(_segments(log)) >= 3

    events = _all_events(log)
    assert [o for o, _ in events] == list(range(400))
    bits = [(e[:3], struct.pack("<d", e[3]) if e[0] == METRIC else e[3], e[4:]) for _, e in events]
    assert bits == [(e[:3], struct.pack("<d", e[3]) if e[0] == METRIC else e[3], e[4:]) for e in expected]
    log.close()


def test_a_segment_kept_at_close_is_checked_to_its_last_record(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _metrics(log, 100)  # one group, not full
    log.close(keep=True)
    [path] = _segments(log)
    _flip(path, _seal_at(log, 50) - 10)

    read = read_segment(path)
    assert read is not None and read.damaged > 0 and not read.torn and read.events == []


def test_a_format_1_segment_left_by_an_older_client_is_still_read(tmp_path: Path) -> None:
    # Format 1: every record crc32 | word | body, the crc32 over the word and the body.
    def record(kind: int, body: bytes) -> bytes:
        word = struct.pack("<I", len(body) | kind << 24)
        return struct.pack("<I", zlib.crc32(body, zlib.crc32(word))) + word + body

    server = SERVER.encode()
    header = event_log._HEADER.pack(b"TLEVLOG1", 1, 512, 7, 0, 4242, len(server)) + server
    records = record(1, struct.pack("<I", 1) + b"run-1") + record(1, struct.pack("<I", 2) + b"loss")
    records += b"".join(record(2, struct.pack("<IIdqq", 1, 2, s * 0.5, 1_000 + s, s)) for s in range(3))
    records += record(4, struct.pack("<II", 1, 2) + b"done")
    path = tmp_path / "events-4242-0a0b0c0d-000001.tll"
    path.write_bytes(header.ljust(512, b"\0") + records + bytes(1000))

    read = read_segment(path)
    assert read is not None and read.server == SERVER and not read.torn and read.damaged == 0
    assert read.events == [
        *((7 + s, (METRIC, "run-1", "loss", s * 0.5, 1_000 + s, s)) for s in range(3)),
        (10, (TAG, "run-1", "loss", "done", 0, 0)),
    ]


def test_segments_roll_over_and_go_once_every_event_in_them_is_acknowledged_in_any_order(
    tmp_path: Path,
) -> None:
    log = _log(tmp_path, segment_bytes=8 << 10)  # ~190 records a segment
    _metrics(log, 1000)
    segments = _segments(log)
    assert len(segments) >= 5
    firsts = [read_segment(p).first for p in segments]  # type: ignore[union-attr]

    log.done(500, 1000)  # a later chunk settles first: nothing can go yet
    assert _segments(log) == segments
    log.done(0, 200)
    assert _segments(log) == [p for p, f in zip(segments, [*firsts[1:], 10**9], strict=True) if f > 200]
    log.done(200, 500)
    assert len(_segments(log)) == 1  # the one still written to stays, whatever is acknowledged
    assert log.acked == 1000
    log.close()
    assert not (tmp_path / "ml_runs").exists()  # a clean close leaves nothing behind


def test_only_unacknowledged_records_of_a_dead_writer_are_recovered_and_only_once(tmp_path: Path) -> None:
    log = _log(tmp_path, segment_bytes=8 << 10)
    _metrics(log, 1000)
    with log.lock:
        log.write((TAG, "run-1", "phase", "a", 0, 0))
        log.write((TAG, "run-1", "phase", "b", 0, 0))
    log.done(0, 600)
    live = EventLog(tmp_path / "ml_runs", SERVER, 1 << 30)
    _metrics(live, 10, key="other")  # a live writer's log is not touched
    assert set(dead_segments(tmp_path / "ml_runs")) == set()  # both writers alive
    _dead(log)

    journal = Journal.at(tmp_path)
    assert recover(tmp_path / "ml_runs", lambda: journal) == 402
    assert [m.step for m in journal.metric_history("run-1", "loss")] == list(range(600, 1000))
    assert journal.get_run("run-1").data.tags["phase"] == "b"  # a tag's last value wins
    [delivery] = journal.deliveries(SERVER, spilled_only=True)
    assert delivery.run_uuid == "run-1"
    assert recover(tmp_path / "ml_runs", lambda: journal) == 0  # the files are gone
    assert len(journal.metric_history("run-1", "loss")) == 400
    assert {p.name.split("-")[1] for p in tmp_path.glob("ml_runs/events-*")} == {str(os.getpid())}
    assert live._segments  # still there, still locked
    journal.close()
    live.close()


def test_a_segment_recorded_as_recovered_is_not_moved_twice(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _metrics(log, 10)
    path = _segments(log)[0]
    _dead(log)
    copy = path.read_bytes()
    journal = Journal.at(tmp_path)
    assert recover(tmp_path / "ml_runs", lambda: journal) == 10
    path.write_bytes(copy)  # a kill between the journal's commit and the file's deletion
    assert recover(tmp_path / "ml_runs", lambda: journal) == 0
    assert not path.exists() and len(journal.metric_history("run-1", "loss")) == 10
    journal.close()


def test_a_reader_tells_a_live_writer_by_its_lock(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _metrics(log, 3)
    path = _segments(log)[0]
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    log.close()


def test_the_disk_bound_turns_the_log_off_with_one_warning_and_back_on_once_space_is_freed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = _log(tmp_path, segment_bytes=8 << 10, max_bytes=3 * (8 << 10))
    with caplog.at_level(logging.WARNING, logger="tracklane"):
        _metrics(log, 2000)
    assert len(_segments(log)) == 3 and log.ordinal == 2000
    assert caplog.text.count("cannot write the event log") == 1
    log.done(0, 2000)  # everything acknowledged: the full segments go, the log comes back
    _metrics(log, 10, start=2000)
    assert _all_events(log)[-1][0] == 2009
    log.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs.small_disk(tmp_path / "small-disk", "256k") as where:
        yield where


def test_a_full_disk_turns_the_log_off_without_a_crash(
    small_disk: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Let the log take all that is free, so that it does run into the full disk.
    default_share = event_log.FREE_SHARE
    monkeypatch.setattr(event_log, "FREE_SHARE", 1)
    log = EventLog(small_disk / "ml_runs", SERVER, 1 << 30, segment_bytes=64 << 10)
    with caplog.at_level(logging.WARNING, logger="tracklane"):
        _metrics(log, 20_000)  # ~800 kB of records on a 256 kB disk: no SIGBUS, no exception
    assert caplog.text.count("cannot write the event log") == 1
    assert 1 <= len(_segments(log)) <= 4 and log.ordinal == 20_000
    events = _all_events(log)
    assert [o for o, _ in events] == list(range(len(events)))  # what was written reads back whole
    log.close()
    # The default share: a 4 MiB segment is never asked of a 256 kB disk.
    monkeypatch.setattr(event_log, "FREE_SHARE", default_share)
    big = EventLog(small_disk / "ml_runs", SERVER, 1 << 30)
    with caplog.at_level(logging.WARNING, logger="tracklane"):
        _metrics(big, 10)
    assert not _segments(big) and big.ordinal == 10
    big.close()


def test_on_a_nearly_full_disk_the_log_leaves_the_room_to_the_journal(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 256 kB free: an eighth is below the smallest segment, so the log takes none of it.
    log = EventLog(small_disk / "ml_runs", SERVER, 1 << 30)
    with caplog.at_level(logging.WARNING, logger="tracklane"):
        _metrics(log, 1_000)
    assert not _segments(log) and log.ordinal == 1_000
    assert caplog.text.count("nearly full") == 1
    log.close()


def test_a_log_another_reader_is_recovering_is_left_to_it(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _metrics(log, 10)
    _dead(log)
    held = _dead_segments(tmp_path / "ml_runs", frozenset())  # the first reader, mid-recovery
    journal = Journal.at(tmp_path)
    try:
        assert len(held) == 1 and recover(tmp_path / "ml_runs", lambda: journal) == 0
    finally:
        for fd in held.values():
            os.close(fd)
    assert recover(tmp_path / "ml_runs", lambda: journal) == 10
    journal.close()


def test_without_posix_fallocate_the_segment_is_zero_filled_before_it_is_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "posix_fallocate")  # macOS
    log = _log(tmp_path, segment_bytes=3 << 20)  # more than one 1 MiB write
    _metrics(log, 100)
    [path] = _segments(log)
    assert path.stat().st_size == 3 << 20 and path.stat().st_blocks * 512 >= 3 << 20  # not sparse
    assert [o for o, _ in _all_events(log)] == list(range(100))
    log.close()


def test_the_destination_is_asked_for_its_name_at_each_new_segment(tmp_path: Path) -> None:
    names = iter(["http://a#workspace=1", "http://a#workspace=2"])
    log = EventLog(tmp_path / "ml_runs", lambda: next(names), 1 << 30, segment_bytes=8 << 10)
    _metrics(log, 300)  # two segments
    servers = [read_segment(p).server for p in _segments(log)]  # type: ignore[union-attr]
    assert servers == ["http://a#workspace=1", "http://a#workspace=2"]
    log.close()


def _fill_to(log: EventLog, left: int) -> None:
    """Fill the current segment with known-key records until exactly ``left`` bytes remain."""
    with log.lock:
        while log._end - log._off > left + 200:
            log.metric("run-1", "loss", 0.0, 1_000, 0)
        log.write((PARAM, "run-1", "loss", "", 0, 0))  # 16 bytes with known strings
        log.write((PARAM, "run-1", "loss", "p" * (log._end - log._off - left - 16), 0, 0))
    assert log._end - log._off == left


@pytest.mark.parametrize(
    "event",
    [
        (METRIC, "run-1", "train/a_metric_name_longer_than_the_tail_has_room_for", 1.5, 2_000, 7),
        (PARAM, "run-2-with-a-new-id-that-does-not-fit", "lr", "0.1", 0, 0),
    ],
    ids=["new key", "new run id"],
)
def test_a_record_whose_new_string_does_not_fit_the_tail_goes_whole_into_the_next_segment(
    tmp_path: Path, event: tuple[object, ...]
) -> None:
    log = _log(tmp_path, segment_bytes=8 << 10)
    _fill_to(log, 45)  # room for a 40-byte metric record, not for its key's string record as well
    with log.lock:
        if event[0] == METRIC:
            log.metric(*event[1:])  # type: ignore[arg-type]
        else:
            log.write(event)  # type: ignore[arg-type]

    events = [e for _, e in _all_events(log)]
    assert events[-1] == event  # under its own run and key, in the next segment
    assert len(_segments(log)) == 2


def test_an_event_that_cannot_be_packed_keeps_the_ordinals_of_those_after_it(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _metrics(log, 3)
    with log.lock:
        log.write((METRIC, "run-1", "loss", 1.0, 1_000, 10**30))  # a step no record can hold
    _metrics(log, 3, start=4)

    assert [(o, e[5]) for o, e in _all_events(log)] == [(0, 0), (1, 1), (2, 2), (4, 4), (5, 5), (6, 6)]


def test_a_segment_of_a_newer_format_is_left_for_the_version_that_wrote_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = _log(tmp_path)
    _metrics(log, 10)
    [path] = _segments(log)
    _dead(log)
    data = bytearray(path.read_bytes())
    data[: len(event_log.MAGIC)] = b"TLEVLOG9"  # a future format this version cannot read
    path.write_bytes(bytes(data))
    journal = Journal.at(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tracklane"):
        assert recover(tmp_path / "ml_runs", lambda: journal) == 0
    assert path.exists()  # a downgrade must not delete what only the newer version can read
    assert "written by a newer tracklane" in caplog.text
    journal.close()


# -- an offline writer: its records join its run in the journal ---------------------------------


def _offline_log(tmp_path: Path) -> EventLog:
    return EventLog(tmp_path / "ml_runs", OFFLINE, 1 << 30, segment_bytes=64 << 10)


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
    _dead(log)

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
    _dead(log)
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
    _dead(log)
    with caplog.at_level(logging.WARNING, logger="tracklane"):
        assert recover(tmp_path / "ml_runs", lambda: journal) == 1
    assert "1 recovered event(s) of offline run gone-run are skipped" in caplog.text
    assert [m.value for m in journal.metric_history(kept, "loss")] == [2.0]
    journal.close()
