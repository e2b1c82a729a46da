"""The event log: every event a logging call accepts, packed into a memory-mapped file first.

Why: the buffer is a deque in memory, so a SIGKILL (the OOM killer, a scheduler's preemption) lost
every event still in it or in flight. Here the logging call also packs its record into a mapped
page of a segment file in the journal directory; the kernel writes a killed process's dirty pages
back, so every record whose call returned survives SIGKILL and the OOM killer (not a power cut or a
kernel crash: nothing is fsynced). No system call per event: a record is one ``struct.pack_into``.

Layout. A writer (one per process: a forked child starts its own) writes fixed-size segments
``events-<token>-<n>.tll``; each starts with a header (magic, the destination's journal name, the
ordinal of its first event, the acknowledged watermark, the writer's pid) and holds records, each a
word (length u24 + kind u8) first, then four check bytes around the body::

    METRIC (a plain metric, 40 bytes): word | run | key | value | timestamp | step | seal
    any other record:                  word | crc32 (of the word and the body) | body

Run ids, keys and other strings are written once per segment as STRING records and referred to by
number (each segment is self-contained, so deleting an old one never orphans a later one). Space is
allocated with ``posix_fallocate`` *before* it is mapped: a store into a mapped page of a sparse
file on a full disk raises SIGBUS and kills the process; a failed allocation only turns the log off
(one WARNING) and the events take today's path.

Why a seal, and groups. The plain metric is the record a training loop writes per point, so its
check must cost nothing. Its ``seal`` is the record's own offset in the file (never zero: records
start after the header; the offset rather than the ordinal because it is at hand, so the seal costs
no arithmetic), the last field of the one ``struct.pack_into`` that stores the record.
CPython's ``s_pack_internal`` (``Modules/_struct.c``, alike in the 3.9 and the 3.13 sources read)
first zeroes the record's bytes (``memset(buf, '\\0', soself->s_size)``), then stores each field in
format order, each through its own ``e->pack`` call; so a process killed mid-store (or a pack that
fails on a field) leaves the seal zero, and a reader never trusts a torn metric record (the unit
test ``test_pack_into_zeroes_the_record_then_stores_its_fields_in_order`` checks this on the
interpreter that runs it). Measured on 3.11, the crc32 the caller used to compute per metric (the
body packed a second time, then checksummed) was ~1/5 of a whole ``log_metric`` call. A seal says a
record was finished, not that its bytes are still those written (a flipped bit of a value keeps
it): so every ``GROUP_BYTES`` of records end in a CHECK record, the crc32 of the group's bytes,
computed once per group (~14 ns a record). Damage anywhere before the live segment's last group is
detected, at the price of the whole group it hits; a segment is closed (roll-over, ``close(keep=
True)``) with a CHECK. Rare records (strings, params, tags, linked metrics, gaps, checks) keep their
own crc32 as well. Format 1 segments (every record ``crc32 | word | body``, no groups), which a
killed older client may have left, are still read. A format 1 reader takes a format 2 file for no
segment (another magic), never misreads it; but its recovery deletes what it took, so a downgrade
over a killed writer's format 2 files loses them.

Acknowledgement. Events get consecutive ordinals in the order they enter the buffer (the same lock
orders both). The engine acknowledges ordinal ranges (a chunk the worker took, once each of its
requests reached a final outcome: delivered, refused and reported, or in the SQLite journal), in
any order; the log keeps the watermark below which every ordinal is acknowledged, writes it into
the live segments' headers (again a store into the mapping), and deletes a segment once the
watermark passes its last event.

Recovery (``recover``): a log whose writer is dead (no process holds its ``flock``) is read, and
every valid record at or above its watermark is moved into the SQLite journal as ordinary spilled
rows, in one transaction that also records the segment names as recovered; then the files are
deleted, so a second recovery does nothing. From there the usual uploader or ``tracklane sync``
delivers them. See ``recover`` for why a re-send never stores a point twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import re
import secrets
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from .._wire.batching import METRIC, PARAM, TAG, Event

logger = logging.getLogger("tracklane")

#: Segment size: 4 MiB holds ~100k metric records (a default ``max_buffer`` of events), so a
#: healthy client rolls over rarely, allocates at most once per ~100k events, and its whole
#: backlog (buffer plus requests in flight) spans a segment or two.
SEGMENT_BYTES = 4 << 20
HEADER_BYTES = 512
#: A new segment takes at most 1/FREE_SHARE of the disk's free space, and is at least
#: MIN_SEGMENT_BYTES (below that the disk is too full for the log: it turns off for now).
FREE_SHARE = 8
MIN_SEGMENT_BYTES = 64 << 10
MAGIC = b"TLEVLOG2"
FORMAT = 2
_MAGIC_1 = b"TLEVLOG1"  # format 1: still read (see the module docstring)
#: Bytes of records one CHECK record covers: a page, what a disk loses at once; its crc32 costs the
#: caller ~14 ns a record, and the reader distrusts at most this much around a damaged byte.
GROUP_BYTES = 4096
SUFFIX = ".tll"
#: The server name an offline client's log carries: its runs are the journal's own (``recover``
#: adds the records to them, not to a server's spilled runs).
OFFLINE = ""
_NAME = re.compile(r"^events-(?P<token>[0-9a-z-]+)-(?P<n>\d{6})\.tll$")

# Header: magic, version, header size, first ordinal, acknowledged watermark, pid, server length.
_HEADER = struct.Struct("<8sIIqqIH")
_WATERMARK_AT = 8 + 4 + 4 + 8
_WATERMARK = struct.Struct("<q")
_RECORD = struct.Struct("<II")  # length | kind << 24, crc32 (format 1: crc32 first)
_STRING, _METRIC, _PARAM, _TAG, _LINKED, _GAP, _CHECK = 1, 2, 3, 4, 5, 6, 7
_METRIC_BODY = struct.Struct("<IIdqq")  # run, key, value, timestamp, step
_METRIC_RECORD = struct.Struct("<IIIdqqI")  # word, the body, seal (the record's offset): one store
_LINK = struct.Struct("<III")  # model_id, dataset_name, dataset_digest string ids (0: None)
_TEXT_HEAD = struct.Struct("<II")  # run, key; then the value, UTF-8
_ID = struct.Struct("<I")
_METRIC_WORD = _METRIC_BODY.size | _METRIC << 24
_METRIC_SIZE = _METRIC_RECORD.size
_CHECK_SIZE = _RECORD.size + _ID.size
_MAX_SERVER = HEADER_BYTES - _HEADER.size
_KIND_OF = {METRIC: _METRIC, PARAM: _PARAM, TAG: _TAG}
_EVENT_KIND = {_METRIC: METRIC, _LINKED: METRIC, _PARAM: PARAM, _TAG: TAG}
_crc32 = zlib.crc32


def segment_name(token: str, n: int) -> str:
    return f"events-{token}-{n:06d}{SUFFIX}"


class _Segment:
    """One mapped segment file of this process's log, and its lock."""

    __slots__ = ("fd", "first", "last", "mm", "n", "path")

    def __init__(self, path: Path, fd: int, mm: mmap.mmap, n: int, first: int) -> None:
        self.path, self.fd, self.mm, self.n, self.first = path, fd, mm, n, first
        #: Ordinal after its last event; None while it is the one written to.
        self.last: int | None = None

    def close(self, delete: bool) -> None:
        with contextlib.suppress(Exception):
            self.mm.close()
        if delete:
            with contextlib.suppress(OSError):
                self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)  # releases the flock: a reader now sees a dead writer


class EventLog:
    """This process's writer. ``lock`` orders records and buffer appends (the buffer holds it
    around both, so ordinals are buffer order); every method is safe from any thread.

    Never raises out of a logging call: a segment that cannot be allocated (full disk, the
    ``max_bytes`` bound reached, a read-only directory) turns the log off until space is freed,
    with one WARNING, and the events go on through the buffer as before (unprotected against a
    kill meanwhile)."""

    # Slots: the hot path reads and writes five of these per record.
    __slots__ = (
        "__weakref__",  # (the fork hook's registry)
        "_check_at",
        "_done",
        "_end",
        "_group",
        "_ids",
        "_limit",
        "_made_dirs",
        "_missing",
        "_mm",
        "_n",
        "_off",
        "_retry_at",
        "_segments",
        "acked",
        "closed",
        "directory",
        "lineage",
        "lock",
        "max_bytes",
        "on_acked",
        "ordinal",
        "segment_bytes",
        "server",
        "token",
        "warned",
    )

    def __init__(
        self,
        directory: Path,
        server: str | Callable[[], str],
        max_bytes: int,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self.directory = directory
        #: The destination's journal name, asked at each new segment (an OICM workspace can change).
        self.server = server
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.lock = threading.Lock()
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        _WRITERS.add(self)
        #: This log's token and those of the logs it was forked from: never recovered by this
        #: process while it has their pid (after an in-process reset the lock alone cannot tell).
        self.lineage = frozenset({self.token})
        self._segments: list[_Segment] = []
        self._made_dirs: list[Path] = []
        self._n = 0
        self._mm: Any = None
        self._off = 0
        self._missing = 0  # bytes of strings a record needs that its segment had no room for
        self._end = 0  # write limit of the current segment (0: none: the next write rolls)
        self._group = 0  # where the records the next CHECK covers start
        self._check_at = 0  # a group this full gets its CHECK before the next record
        self._limit = 0  # the fast path's bound: min(_check_at, _end)
        self._ids: dict[str, int] = {}
        #: The next event's ordinal, and the watermark below which every ordinal is acknowledged.
        self.ordinal = 0
        self.acked = 0
        self._done: dict[int, int] = {}
        self._retry_at = 0  # while off: the ordinal at which to try allocating again
        self.closed = False
        self.warned = False
        #: Told each new watermark (under ``lock``): the relay lets the sender start sending once
        #: everything before the hand-over is settled.
        self.on_acked: Callable[[int], None] | None = None

    # -- writing (callers hold ``lock``) ---------------------------------------------------------

    def metric(
        self,
        run_id: str,
        key: str,
        value: float,
        timestamp: int,
        step: int,
        _pack_into: Callable[..., None] = _METRIC_RECORD.pack_into,
    ) -> bool:
        """The hot path: one record for a plain metric. Caller holds ``lock``. (The default binds
        the packer as a fast local: this runs once per logged point.) A full group, a full
        segment, a string not yet written: ``write`` does the rest. True: the record is in the log."""
        off = self._off
        ids = self._ids
        rid = ids.get(run_id)
        kid = ids.get(key)
        if off + _METRIC_SIZE > self._limit or rid is None or kid is None:
            return self.write((METRIC, run_id, key, value, timestamp, step))
        # One store, the seal (its offset) last: no checksum per record (see the module docstring).
        _pack_into(self._mm, off, _METRIC_WORD, rid, kid, value, timestamp, step, off)
        self._off = off + _METRIC_SIZE
        self.ordinal += 1
        return True

    def write(self, event: Event) -> bool:
        """Any event (a text, a metric with a model link, one that needs a string or a new
        segment). Caller holds ``lock``. True: the record is in the log; False: the event has its
        ordinal but no record (the log is off for now, or the value cannot be packed), so only
        the caller's memory holds it."""
        ordinal = self.ordinal
        self.ordinal = ordinal + 1
        if self._mm is None and (self.closed or ordinal < self._retry_at):
            return False  # off for now: the event is in the buffer only
        if self._mm is not None and self._off + _METRIC_SIZE > self._check_at:
            self._check()  # the group is full (what sends one fast-path metric in a group here)
        self._missing = 0
        try:
            body, kind = self._body(event)
        except Exception:  # a value that cannot be packed (e.g. an int too large): it stays in memory
            # A gap record keeps the ordinal: a reader numbers events by counting records.
            if self._mm is not None and self._off + _RECORD.size <= self._end:
                self._put(_GAP, b"")
            return False
        need = _RECORD.size + len(body)
        if self._missing or self._off + need > self._end or self._mm is None:
            # A string it refers to did not fit in this segment (``_id``), or the record does not:
            # both go into a new one, whose size is at least what they need.
            if not self._roll(ordinal, need + _strings_size(event)):
                return False
            self._missing = 0
            body, kind = self._body(event)  # string ids are per segment
        self._put(kind, body)
        return True

    def _body(self, event: Event) -> tuple[bytes, int]:
        kind, run_id, key = event[0], event[1], event[2]
        rid, kid = self._id(run_id), self._id(key)
        if kind == METRIC:
            if len(event) > 6:
                link = event[6]
                ids = [0 if s is None else self._id(s) for s in link]
                return _METRIC_BODY.pack(rid, kid, event[3], event[4], event[5]) + _LINK.pack(*ids), _LINKED
            return _METRIC_BODY.pack(rid, kid, event[3], event[4], event[5]), _METRIC
        return _TEXT_HEAD.pack(rid, kid) + str(event[3]).encode("utf-8", "surrogatepass"), _KIND_OF[kind]

    def _id(self, text: str) -> int:
        found = self._ids.get(text)
        if found is not None:
            return found
        new = len(self._ids) + 1
        data = text.encode("utf-8", "surrogatepass")
        if self._mm is not None and self._off + _RECORD.size + 4 + len(data) <= self._end:
            self._put(_STRING, _ID.pack(new) + data)
            self._ids[text] = new
        else:
            # No room: the id is not remembered, and ``write`` rolls to a segment with room for
            # the string and the record (a record never refers to a string its segment lacks).
            self._missing += _RECORD.size + 4 + len(data)
        return new

    def _put(self, kind: int, body: bytes) -> None:
        off = self._off
        if kind == _METRIC:  # sealed, as ``metric`` writes it (a slice store has no order)
            _METRIC_RECORD.pack_into(self._mm, off, _METRIC_WORD, *_METRIC_BODY.unpack(body), off)
        else:
            word = len(body) | kind << 24
            _RECORD.pack_into(self._mm, off, word, _crc32(body, _crc32(_ID.pack(word))))
            self._mm[off + _RECORD.size : off + _RECORD.size + len(body)] = body
        self._off = off + _RECORD.size + len(body)

    def _check(self) -> None:
        """End the group of records since the last CHECK with one holding their crc32 (a segment
        keeps room for one after its last record), and start the next group after it."""
        if self._off > self._group:
            self._put(_CHECK, _ID.pack(_crc32(self._mm[self._group : self._off])))
        self._start_group()

    def _start_group(self) -> None:
        self._group = self._off
        self._check_at = self._off + GROUP_BYTES
        self._limit = min(self._check_at, self._end)

    def _roll(self, ordinal: int, need: int) -> bool:
        """Start a new segment at ``ordinal``; False (the log is off for now) if none can be had."""
        if self.closed or ordinal < self._retry_at:
            return False
        current = self._segments[-1] if self._segments else None
        if current is not None and current.last is None:
            current.last = ordinal
        if self._mm is not None:
            self._check()  # the segment is done: its last group is checked too
        self._mm, self._off, self._end, self._limit, self._ids = None, 0, 0, 0, {}
        self._forget_acked()
        least = HEADER_BYTES + need + 4096
        size = max(self.segment_bytes, least)
        free = _free_bytes(self.directory)
        if free is not None:
            # Never more than a share of what is free: on a small or nearly full disk the journal
            # needs the room more (it keeps events through an outage; the log only through a kill).
            size = min(size, max(free // FREE_SHARE, MIN_SEGMENT_BYTES, least))
            if size > free // FREE_SHARE:
                return self._off_for_now(ordinal, f"the disk is nearly full ({free} bytes free)")
        live = sum(s.mm.size() for s in self._segments)
        if live + size > self.max_bytes:
            return self._off_for_now(ordinal, f"its disk bound ({self.max_bytes} bytes) is reached")
        try:
            segment = self._allocate(ordinal, size)
        except OSError as exc:
            return self._off_for_now(ordinal, str(exc))
        self._segments.append(segment)
        self._mm, self._off, self._end = segment.mm, HEADER_BYTES, size - _CHECK_SIZE
        self._start_group()
        return True

    def _allocate(self, ordinal: int, size: int) -> _Segment:
        if not self.directory.is_dir():
            missing = [p for p in [self.directory, *self.directory.parents] if not p.exists()]
            self.directory.mkdir(parents=True, exist_ok=True)
            self._made_dirs = missing + self._made_dirs  # deepest first, to remove at close
        n = self._n + 1  # taken only once the file is there: segment numbers have no holes
        path = self.directory / segment_name(self.token, n)
        # Made under a name no reader looks at, and renamed once locked and allocated: a file
        # with a segment's name is locked from its first moment, so no reader takes it for dead.
        making = path.with_name(f".{path.name}.new")
        fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Allocate before mapping: a store into an unallocated page on a full disk is SIGBUS.
            _reserve(fd, size)
            mm = mmap.mmap(fd, size)
            server = (self.server if isinstance(self.server, str) else self.server()).encode()[:_MAX_SERVER]
            _HEADER.pack_into(
                mm, 0, MAGIC, FORMAT, HEADER_BYTES, ordinal, self.acked, os.getpid(), len(server)
            )
            mm[_HEADER.size : _HEADER.size + len(server)] = server
            os.rename(making, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                making.unlink()
            raise
        self._n = n
        return _Segment(path, fd, mm, n, ordinal)

    def _off_for_now(self, ordinal: int, why: str) -> bool:
        # Try again a segment's worth of events later (or as soon as acknowledgements free one).
        self._retry_at = ordinal + max(1, self.segment_bytes // _METRIC_SIZE)
        if not self.warned:
            self.warned = True
            logger.warning(
                "tracklane: cannot write the event log in %s (%s); events are kept in memory and "
                "the journal as before, but a kill -9 of this process meanwhile loses those not "
                "yet delivered. Free space there (or raise TRACKLANE_EVENT_LOG_MAX_BYTES).",
                self.directory,
                why,
            )
        return False

    # -- acknowledgement (the worker) ------------------------------------------------------------

    def done(self, start: int, end: int) -> None:
        """Ordinals ``[start, end)`` reached their final outcome (any order of calls)."""
        with self.lock:
            self.done_locked(start, end)

    def done_locked(self, start: int, end: int) -> None:
        """``done`` for a caller already holding ``lock`` (the buffer dropping its oldest event)."""
        if end <= start:
            return
        if start != self.acked:
            self._done[start] = end
            return
        acked = end
        while acked in self._done:
            acked = self._done.pop(acked)
        self.acked = acked
        self._forget_acked()
        if self.on_acked is not None:
            self.on_acked(acked)

    def _forget_acked(self) -> None:
        keep = []
        freed = False
        for s in self._segments:
            if s.last is not None and s.last <= self.acked:
                s.close(delete=True)
                freed = True
                continue
            with contextlib.suppress(ValueError):  # a closed map
                _WATERMARK.pack_into(s.mm, _WATERMARK_AT, self.acked)
            keep.append(s)
        self._segments = keep
        if freed:
            self._retry_at = min(self._retry_at, self.ordinal)  # space freed: allocate at once

    def ticket(self, start: int, end: int, batches: int) -> Callable[[], None] | None:
        """A callback for each of ``batches`` requests cut from ordinals ``[start, end)``: the
        range is acknowledged when the last one is called."""
        if end <= start:
            return None
        left = [batches]

        def settled() -> None:
            left[0] -= 1
            if left[0] == 0:
                self.done(start, end)

        return settled

    # -- lifetime --------------------------------------------------------------------------------

    def close(self, keep: bool = False) -> None:
        """The end: the engine has delivered or kept every event, so the files go. With ``keep``
        (some events could be neither delivered nor kept in the journal, e.g. a full disk), the
        files stay, unlocked: the next client on this storage or ``tracklane sync`` recovers them
        once there is room."""
        with self.lock:
            self.closed = True
            if keep and self._mm is not None:
                self._check()  # its records stay for a reader: check the last group too
            self._mm, self._end, self._limit = None, 0, 0
            for s in self._segments:
                s.close(delete=not keep)
            self._segments = []
            if not keep:
                for d in self._made_dirs:
                    with contextlib.suppress(OSError):
                        d.rmdir()  # only if empty: nothing else was written there
            self._made_dirs = []

    def _drop_after_fork(self) -> None:
        """Drop the parent's mappings and descriptors (closing our copy of a descriptor leaves the
        parent's lock held); nothing of the parent's files is written or deleted from here on."""
        self.closed = True
        self._mm, self._end, self._limit = None, 0, 0
        for s in self._segments:
            with contextlib.suppress(Exception):
                s.mm.close()
            with contextlib.suppress(OSError):
                os.close(s.fd)
        self._segments = []
        self._made_dirs = []

    @property
    def taking(self) -> bool:
        """Whether the next record would be written (not closed, not off for now)."""
        return not self.closed and (self._mm is not None or self.ordinal >= self._retry_at)

    def holds_files(self) -> bool:
        """Whether any segment is on disk now (what ``close(keep=True)`` would leave)."""
        return bool(self._segments)

    def after_fork(self) -> EventLog:
        """In a forked child: the parent's mappings are dropped (``_drop_after_fork``) and the
        child starts a log of its own."""
        self._drop_after_fork()
        child = EventLog(self.directory, self.server, self.max_bytes, self.segment_bytes)
        child.lineage = self.lineage | child.lineage
        return child


#: Every writer made in this process, for the fork hook below.
_WRITERS: weakref.WeakSet[EventLog] = weakref.WeakSet()


def _inert_in_child() -> None:
    """In a child made by ``os.fork``: the parent's logs are the parent's. The child's copies
    of their mappings are shared with the parent (a store would write into the parent's file, an
    acknowledgement would delete its segments), so each is dropped and the log is closed here,
    whichever face holds it (``TrackingClient`` then starts a log of its own: ``after_fork``)."""
    for log in list(_WRITERS):
        log._drop_after_fork()
    _WRITERS.clear()


os.register_at_fork(after_in_child=_inert_in_child)


def _reserve(fd: int, size: int) -> None:
    """Give every byte of the file its disk block now (ENOSPC here, never SIGBUS later)."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
        return
    zeros = bytes(1 << 20)  # macOS has no posix_fallocate: write the zeros
    done = 0
    while done < size:
        done += os.pwrite(fd, zeros[: min(len(zeros), size - done)], done)


# -- reading and recovery --------------------------------------------------------------------------


@dataclass
class SegmentRead:
    """What a reader found in one segment file."""

    path: Path
    server: str
    first: int
    acked: int
    #: (ordinal, event) of every valid event record, in order.
    events: list[tuple[int, Event]] = field(default_factory=list)
    #: Bytes after the last valid record that are not zero: a damaged record (and what follows).
    damaged: int = 0
    torn: bool = False


def read_segment(path: Path) -> SegmentRead | None:
    """Every trusted record of ``path``; None if it is not a segment (no magic, too short).

    A record that fails its check (seal or crc32) ends the read: its length, which locates the next
    record, is itself untrusted, so nothing after it is believed. At the tail of what the writer
    wrote (a seal or crc32 never stored, the rest zeros) that is a torn record, expected after a
    kill mid-store, and every finished record before it is trusted. Anything else is damage,
    counted in ``damaged`` so the caller can say so; so is a CHECK whose group's crc32 differs.
    Either way the records of the group it is in (since the last CHECK that held) are not trusted:
    a seal proves a record was finished, not that its bytes were kept."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < HEADER_BYTES:
        return None
    magic, _version, header, first, acked, _pid, slen = _HEADER.unpack_from(data, 0)
    if magic not in (MAGIC, _MAGIC_1):
        return None
    each = magic == _MAGIC_1  # format 1: every record has its crc32, trusted on its own
    server = data[_HEADER.size : _HEADER.size + slen].decode("utf-8", "replace")
    out = SegmentRead(path, server, first, acked)
    strings: dict[int, str] = {}
    ordinal, pos, size = first, header, len(data)
    # Events not yet covered by a CHECK (format 1: each record is, so they are the events).
    group, pending = pos, out.events if each else []
    while pos + _RECORD.size <= size:
        word, crc = _RECORD.unpack_from(data, pos)
        if word == 0 and crc == 0:  # nothing written here: the end, unless more follows
            if data[pos:].strip(b"\0"):
                out.damaged = len(data[group:].rstrip(b"\0"))
                return out
            break
        if each:
            word, crc = crc, word
        length, kind = word & 0xFFFFFF, word >> 24
        end = pos + _RECORD.size + length
        if kind == _METRIC and not each:
            end = pos + _METRIC_SIZE
            seal = _ID.unpack_from(data, end - _ID.size)[0] if end <= size else 0
            # The seal is stored last: one that is there says the store finished, so a record
            # that fails with it is damaged after, never torn.
            good, finished = word == _METRIC_WORD and seal == pos, seal != 0
            body = data[pos + _ID.size : end - _ID.size]
        else:
            at = pos + 4 if each else pos  # where the word is
            body = data[pos + _RECORD.size : end]
            good = end <= size and _crc32(body, _crc32(data[at : at + 4])) == crc
            finished = False  # torn or damaged, a crc32 cannot tell: the zeros after it do
        if not good:
            out.torn = not finished and not data[min(size, end) :].strip(b"\0")
            if out.torn:
                out.events += [] if each else pending
            else:
                out.damaged = len(data[group:].rstrip(b"\0"))
            return out
        start, pos = pos, end
        if kind == _CHECK and not each:
            if _crc32(data[group:start]) != _ID.unpack_from(body)[0]:
                out.damaged = len(data[group:].rstrip(b"\0"))
                return out
            out.events += pending
            pending, group = [], pos
            continue
        if kind == _STRING:
            strings[_ID.unpack_from(body)[0]] = body[4:].decode("utf-8", "surrogatepass")
        else:
            event = _event(kind, body, strings)
            if event is not None:
                pending.append((ordinal, event))
            if kind in _EVENT_KIND or kind == _GAP:  # a gap: an accepted event with no record
                ordinal += 1
        if each:
            group = pos
    if not each:
        out.events += pending
    return out


class LogTail:
    """One live writer's segments (``token``), read as they are written: the sender process's side
    of the log.

    ``read`` returns the events the writer has finished since the last call, in ordinal order,
    with None for an ordinal that has no event in the log (a gap record, or events the writer
    took while its log was off, seen as a jump in the next segment's first ordinal): the caller
    owns those ordinals' outcome (the writer keeps such events in its own memory). It trusts what
    ``read_segment`` trusts at a tail, a sealed metric or a record whose crc32 holds, and stops at
    the first record not finished yet (the writer may be storing it now: the next ``read`` sees
    it); CHECK records are skipped, since damage at rest is recovery's concern, not a live
    reader's. A segment is left for the next one only once the next one exists: the writer rolls
    under its lock after the last record of the old one, so the old one is complete by then.
    """

    def __init__(self, directory: Path, token: str, ordinal: int = 0) -> None:
        self.directory = directory
        self.token = token
        #: The ordinal of the next event to read: records before it are skipped (another reader's).
        self.ordinal = ordinal
        self.server = ""
        self._n = 0
        self._mm: mmap.mmap | None = None
        self._pos = 0
        self._strings: dict[int, str] = {}
        #: Ordinals before the current segment's first that the log has no record of.
        self._gaps = 0
        #: Records still to pass over before the start ordinal (read, not returned).
        self._skip = 0
        self._next: int | None = None  # the segment to open next (None: the oldest there)
        #: A sealed record whose seal is wrong was met: nothing after it is read.
        self.damaged = False

    def read(self, limit: int) -> list[Event | None]:
        """At most ``limit`` events (and gaps) the writer has finished, oldest first."""
        out: list[Event | None] = []
        while len(out) < limit:
            if self._mm is None and not self._open_next():
                break
            self._read_from(out, limit)
            if len(out) >= limit:
                break
            # The segment's end for now: move on only once the writer has rolled to a later one.
            later = self._later_segment()
            if later is None:
                break
            self._read_from(out, limit)  # what it wrote before rolling
            if len(out) >= limit:
                break
            self.close()
            self._next = later
        return out

    def _numbers(self) -> list[int]:
        return sorted(
            int(m["n"])
            for name in _listdir(self.directory)
            if (m := _NAME.match(name)) is not None and m["token"] == self.token
        )

    def _later_segment(self) -> int | None:
        """The writer's next segment after the current one, if it has one (the next number,
        or a later one should a number be missing)."""
        if (self.directory / segment_name(self.token, self._n + 1)).exists():
            return self._n + 1
        later = [n for n in self._numbers() if n > self._n]
        return later[0] if later else None

    def _open_next(self) -> bool:
        n = self._next
        if n is None:  # the first read: the writer's oldest segment still there
            found = self._numbers()
            if not found:
                return False
            n = found[0]
        path = self.directory / segment_name(self.token, n)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            os.close(fd)
            return False
        os.close(fd)  # the mapping keeps the file
        magic, _v, header, first, _acked, _pid, slen = _HEADER.unpack_from(mm, 0)
        if magic != MAGIC:
            mm.close()
            return False
        self.server = bytes(mm[_HEADER.size : _HEADER.size + slen]).decode("utf-8", "replace")
        if self._n == 0 and first < self.ordinal:  # the first segment begins before our start
            self._skip, self.ordinal = self.ordinal - first, first
        self._n, self._mm, self._pos, self._strings = n, mm, header, {}
        self._gaps = max(0, first - self.ordinal)  # events the writer took while its log was off
        return True

    def close(self) -> None:
        if self._mm is not None:
            with contextlib.suppress(Exception):
                self._mm.close()
        self._mm = None

    def _read_from(self, out: list[Event | None], limit: int) -> None:
        while self._gaps and len(out) < limit:
            self.ordinal += 1
            self._gaps -= 1
            if self._skip:
                self._skip -= 1
            else:
                out.append(None)
        if self._gaps:
            return
        mm, pos, strings = self._mm, self._pos, self._strings
        assert mm is not None
        size = len(mm)
        unpack, metric = _METRIC_RECORD.unpack_from, _METRIC_WORD
        while len(out) < limit and pos + _RECORD.size <= size:
            word = _ID.unpack_from(mm, pos)[0]
            if word == 0:
                break  # not written yet
            if word == metric:
                if pos + _METRIC_SIZE > size:
                    break
                _w, rid, kid, value, ts, step, seal = unpack(mm, pos)
                if seal != pos:
                    self.damaged = seal != 0
                    break  # being stored now (or damaged: nothing after it is believed)
                self.ordinal += 1
                pos += _METRIC_SIZE
                if self._skip:
                    self._skip -= 1
                    continue
                try:
                    out.append((METRIC, strings[rid], strings[kid], value, ts, step))
                except KeyError:
                    out.append(None)
                continue
            length, kind = word & 0xFFFFFF, word >> 24
            end = pos + _RECORD.size + length
            if end > size:
                break
            crc = _ID.unpack_from(mm, pos + 4)[0]
            body = bytes(mm[pos + _RECORD.size : end])
            if _crc32(body, _crc32(_ID.pack(word))) != crc:
                break  # its body is being stored now
            pos = end
            if kind == _STRING:
                strings[_ID.unpack_from(body)[0]] = body[4:].decode("utf-8", "surrogatepass")
            elif kind in _EVENT_KIND or kind == _GAP:
                self.ordinal += 1
                if self._skip:
                    self._skip -= 1
                else:
                    out.append(_event(kind, body, strings) if kind != _GAP else None)
        self._pos = pos


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _free_bytes(directory: Path) -> int | None:
    """Bytes free to unprivileged writers on ``directory``'s disk (its nearest existing parent's
    if it is not made yet); None if that cannot be asked."""
    for where in (directory, *directory.parents):
        try:
            st = os.statvfs(where)
        except FileNotFoundError:
            continue
        except (OSError, AttributeError):  # AttributeError: no statvfs on this platform
            return None
        return st.f_bavail * st.f_frsize
    return None


def _strings_size(event: Event) -> int:
    """Room the string records of ``event``'s run id, key and link take in a fresh segment."""
    texts = [event[1], event[2], *(event[6] if event[0] == METRIC and len(event) > 6 else ())]
    return sum(_RECORD.size + 4 + len(t.encode("utf-8", "surrogatepass")) for t in texts if t is not None)


def _event(kind: int, body: bytes, strings: dict[int, str]) -> Event | None:
    try:
        if kind in (_METRIC, _LINKED):
            rid, kid, value, ts, step = _METRIC_BODY.unpack_from(body)
            if kind == _LINKED:  # the MLflow 3 LoggedModel / dataset of the point: its 7th field
                ids = _LINK.unpack_from(body, _METRIC_BODY.size)
                link = tuple(None if i == 0 else strings[i] for i in ids)
                return cast(Event, (METRIC, strings[rid], strings[kid], value, ts, step, link))
            return (METRIC, strings[rid], strings[kid], value, ts, step)
        if kind in (_PARAM, _TAG):
            rid, kid = _TEXT_HEAD.unpack_from(body)
            value = body[_TEXT_HEAD.size :].decode("utf-8", "surrogatepass")
            return (_EVENT_KIND[kind], strings[rid], strings[kid], value, 0, 0)
    except (KeyError, struct.error, UnicodeDecodeError):
        return None
    return None


def _take_if_dead(path: Path) -> int | None:
    """``path``'s lock, taken (a descriptor holding it) if no process held it: its writer is dead
    and this reader now owns the file; None while a writer (or another reader) holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # vanished meanwhile: its writer deleted it, nothing to recover
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_if_dead(path: Path) -> None:
    fd = _take_if_dead(path)
    if fd is not None:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def dead_segments(directory: Path, own: frozenset[str] = frozenset()) -> dict[str, list[Path]]:
    """Segment files in ``directory`` whose writer is gone, per log token, oldest first (``own``:
    tokens of this process's lineage, skipped while they carry this pid). Their locks are
    released again on return; ``recover`` holds them while it works."""
    held = _dead_segments(directory, own)
    for fd in held.values():
        os.close(fd)
    return _by_token(held)


def _by_token(paths: Iterable[Path]) -> dict[str, list[Path]]:
    """Segment files grouped by the log (writer) they belong to, in the order given."""
    found: dict[str, list[Path]] = {}
    for path in paths:
        found.setdefault(_NAME.match(path.name)["token"], []).append(path)  # type: ignore[index]
    return found


def _dead_segments(directory: Path, own: frozenset[str]) -> dict[Path, int]:
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    logs: dict[Path, int] = {}
    for name in sorted(names):
        match = _NAME.match(name)
        if match is None:
            if name.startswith(".events-") and name.endswith(f"{SUFFIX}.new"):
                _remove_if_dead(directory / name)  # a writer died while allocating it
            continue
        path = directory / name
        token = match["token"]
        if token in own and token.split("-")[0] == str(os.getpid()):
            continue
        if _sender_holds(directory, token):
            continue  # its writer is gone, but its sender is still delivering it
        # The lock is the authority: a live writer holds it from creating the file to deleting
        # it, and the kernel drops it when the writer dies. Our own logs look alive to us too
        # (a second open file description conflicts even within one process). The pid in the
        # header is for people reading the file; a pid can be reused, a released lock cannot lie.
        fd = _take_if_dead(path)
        if fd is not None:
            logs[path] = fd
    return logs


def log_watermark(directory: Path, token: str) -> int | None:
    """The acknowledged watermark a writer last stored in its segments' headers (the least of
    them); None if it has no segment."""
    found = []
    for name in _listdir(directory):
        match = _NAME.match(name)
        if match is None or match["token"] != token:
            continue
        with contextlib.suppress(OSError, struct.error):
            with (directory / name).open("rb") as f:
                head = f.read(_HEADER.size)
            if head[: len(MAGIC)] == MAGIC:
                found.append(_HEADER.unpack(head)[4])
    return min(found) if found else None


def _sender_lock_path(directory: Path, token: str) -> Path:
    return directory / f".sender-{token}.lock"


def hold_for_sender(directory: Path, token: str) -> int:
    """The sender process's claim on a writer's log (a descriptor holding a lock, kept for the
    sender's life): while it is held, recovery leaves the log to the sender even once the writer
    is dead, so a record is never delivered by both."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(_sender_lock_path(directory, token), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def release_for_sender(directory: Path, token: str, fd: int) -> None:
    with contextlib.suppress(OSError):
        _sender_lock_path(directory, token).unlink()
    os.close(fd)


def _sender_holds(directory: Path, token: str) -> bool:
    path = _sender_lock_path(directory, token)
    if not path.exists():
        return False
    fd = _take_if_dead(path)
    if fd is None:
        return path.exists()
    os.close(fd)
    return False


class RecoveryJournal(Protocol):
    """What recovery needs of the SQLite journal (``journal.Journal``)."""

    def recovered(self, names: list[str]) -> set[str]: ...

    def keep_recovered(self, rows: dict[tuple[str, str], list[Event]], names: list[str], seq: int) -> int: ...


def recover(
    directory: Path, open_journal: Callable[[], RecoveryJournal], own: frozenset[str] = frozenset()
) -> int:
    """Move every dead log in ``directory`` into the journal; the number of events moved.

    Each dead log's records at or above its acknowledged watermark become ordinary rows of their
    run (an offline client's, server ``OFFLINE``, join its run in the journal; a server's become
    spilled rows of that server's run), in one transaction that also records the segments' names,
    then the files are deleted (a kill in between: the names say they are done, the files go next
    time). Offline, a point the journal already holds is not added again (``keep_recovered``).

    Why a re-send never stores a point twice: a record above the watermark may have reached the
    server already (its request answered, the acknowledgement not yet recorded when the process
    died). MLflow's ``SqlAlchemyStore._log_metrics_once`` drops a metric whose (key, value,
    timestamp, step) the run already has (the table's primary key; the record keeps the original
    timestamp), ``_log_params`` accepts a param again with the same value, and setting a tag to the
    value it has changes nothing; a tag set twice is replayed in logging order (every record after
    the watermark is in the surviving segments), so its last value still wins. The killed run is
    left RUNNING on the server, as MLflow leaves a run whose process died; its points are complete.
    """
    held = _dead_segments(directory, own)  # locked by us meanwhile: a second reader skips them
    try:
        return _recover(held, open_journal)
    finally:
        for fd in held.values():
            os.close(fd)


def recover_and_say(
    directory: Path, open_journal: Callable[[], RecoveryJournal], own: frozenset[str], into: Path
) -> int:
    """``recover``, for a client at start: what was moved is said at WARNING, and a failure (an
    unwritable or foreign journal: the logs stay for later) is logged, never raised."""
    try:
        moved = recover(directory, open_journal, own)
    except Exception as exc:
        logger.warning("tracklane: could not recover event logs in %s: %s", directory, exc)
        return 0
    if moved:
        logger.warning(
            "tracklane: %d event(s) a process that died (e.g. killed with SIGKILL) had accepted are "
            "moved from its event log into %s, to be delivered from there.",
            moved,
            into,
        )
    return moved


def _recover(held: dict[Path, int], open_journal: Callable[[], RecoveryJournal]) -> int:
    if not held:
        return 0
    journal = open_journal()
    moved = 0
    for token, paths in _by_token(held).items():
        names = [p.name for p in paths]
        done = journal.recovered(names)
        reads = [r for p in paths if p.name not in done and (r := read_segment(p)) is not None]
        acked = max((r.acked for r in reads), default=0)
        rows: dict[tuple[str, str], list[Event]] = {}
        for r in reads:
            if r.damaged:
                logger.warning(
                    "tracklane: event log %s is damaged %d bytes from its end; the events before "
                    "that are recovered, the rest cannot be trusted.",
                    r.path,
                    r.damaged,
                )
            for ordinal, event in r.events:
                if ordinal >= acked:
                    rows.setdefault((r.server, event[1]), []).append(event)
        if reads:
            moved += journal.keep_recovered(rows, [r.path.name for r in reads], time.time_ns())
        for p in paths:
            if _newer_format(p):  # not ours to read, so not ours to delete: its writer's version is
                logger.warning(
                    "tracklane: event log %s was written by a newer tracklane; it is left for that "
                    "version's `tracklane sync` to recover.",
                    p,
                )
                continue
            with contextlib.suppress(OSError):
                p.unlink()
        logger.debug("tracklane: recovered event log %s", token)
    return moved


def _newer_format(path: Path) -> bool:
    """A segment of this family (``TLEVLOG``) in a format this version does not read."""
    try:
        with path.open("rb") as f:
            magic = f.read(len(MAGIC))
    except OSError:
        return False
    return magic.startswith(MAGIC[:-1]) and magic not in (MAGIC, _MAGIC_1)
