"""The bounded in-memory buffer and the hot path that fills it.

Logging calls run on the caller's thread and only validate, stamp and append to a
``collections.deque``: an atomic append under the GIL, so no lock is taken per event, and nothing here
does I/O or logs per event (a log call could recurse into a logging handler that logs). The worker
(``engine``) takes events off the other end. Flush markers (futures) travel in the same deque, so a
flush sees exactly the events logged before it.

When the buffer is full, the overflow policy decides: ``spill`` and ``block`` wait for room (the
worker makes room at disk speed under ``spill``), at most ``block_timeout`` seconds, then drop and
count (and later calls drop at once until the worker makes room again, so a loop is never held
``block_timeout`` per call); ``drop_newest`` / ``drop_oldest`` drop and count at once. Drops are
never silent: they are counted in ``stats()`` and logged at ERROR, once per run.

With an event log (``_stores.event_log``, an engine that has a journal), each accepted event is
also packed into the log's mapped segment, under the log's lock together with the deque append:
the one lock keeps record order equal to buffer order, which is what lets the worker acknowledge
a taken chunk by its ordinal range. Measured on CPython 3.11 (2 loaded cores): an uncontended
``Lock.acquire``/``release`` pair ~80 ns (``with lock`` ~170 ns), a per-thread segment's
``threading.local`` lookup ~35 ns. The lock wins anyway: with free-threaded Python the deque append
and the offset claim need it (or atomics Python does not have), and per-thread logs would lose the
cross-thread order that recovery needs to replay a tag's last value last and to acknowledge by a
single watermark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from .._exceptions import InvalidInputError, NoActiveRunError
from .._limits import MAX_PARAM_VALUE_LENGTH, MAX_STEP, MAX_TAG_VALUE_LENGTH, MIN_STEP
from .._settings import EngineConfig
from .._stores.event_log import EventLog
from .._validation import check_key, check_step, check_timestamp, metric_value, text_value
from .._wire.batching import METRIC, PARAM, TAG, Event

logger = logging.getLogger("tracklane")

_KNOWN_KEYS_CAP = 100_000
_time_ns = time.time_ns
_MIN_STEP, _MAX_STEP = MIN_STEP, MAX_STEP


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Buffer:
    """Events accepted from callers, not yet taken by the worker. See the module docstring."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._buf: deque[Any] = deque()
        self._max = config.max_buffer
        #: Wake the worker once this many events wait (a batch, or half the buffer if smaller);
        #: the worker raises it while it cannot take more, so a backlog does not wake it per event.
        self.batch_wake_at = max(1, min(config.batch_size, config.max_buffer // 2))
        self.wake_at = self.batch_wake_at
        self._wake_pending = False
        self.notify: Callable[[], None] = _nothing
        self.loop: asyncio.AbstractEventLoop | None = None
        self._room = threading.Condition()
        self._waiting_for_room = 0
        self._room_async: asyncio.Event | None = None
        self._markers = 0  # flush markers in the deque, so counting events needs no scan
        #: A caller waited block_timeout and no room came: drop at once until the worker takes again,
        #: rather than make every later call wait the full block_timeout too.
        self._starved = False
        self._known_keys: set[str] = set()
        self.dropped = 0
        #: Events the worker has taken (or shutdown cleared) so far: with what is buffered, every
        #: event ever accepted. Counted per take, not per event: the hot path stays an append.
        self.taken = 0
        self._warned: set[str] = set()
        #: The kill-safe copy of what is accepted (None: no journal to recover it into).
        self.log: EventLog | None = None
        #: Events taken off the front so far (take, drop_oldest): the log's ordinals of a take.
        self.popped = 0
        self.last_take = (0, 0)
        #: A sender process delivers the log (``relay``): an event whose record is in the log is
        #: not kept here too; ``relay_notify`` wakes the sender once per batch of records.
        self.relayed = False
        self.relay_notify: Callable[[], None] = _nothing
        self.relay_wake_at = 0
        #: Taken-back events whose ordinals are not consecutive: the worker acknowledges nothing.
        self.unticketed = False
        #: Told (any thread, under the log's lock) when the log cannot take a record while relayed.
        self.relay_failed: Callable[[], None] = _nothing
        #: The ordinal from which the sender was no longer given the events (``_relay_cannot_follow``).
        self.relayed_until = 0
        #: The worker takes nothing while the sender's records are being taken back (they go
        #: ahead of what is here, so nothing newer may leave first).
        self.held = False

    def bind(self, loop: asyncio.AbstractEventLoop, notify: Callable[[], None]) -> None:
        """Wake the worker on ``loop`` through ``notify``; called once the worker runs there."""
        self.loop = loop
        self.notify = notify
        self._room_async = asyncio.Event()

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's events and waiters are the parent's."""
        self._buf = deque()
        self._markers = 0
        self._room = threading.Condition()
        self._waiting_for_room = 0
        self._starved = False
        self._wake_pending = False
        self.notify = _nothing
        self.loop = None
        self._room_async = None
        self.dropped = self.taken = 0
        self.popped = 0
        self.last_take = (0, 0)
        self.relayed = self.unticketed = self.held = False
        self.relay_notify = self.relay_failed = _nothing
        self.relay_wake_at = 0
        if self.log is not None:
            self.log = self.log.after_fork()

    def close_log(self, lost: int = 0) -> None:
        """The engine has delivered or kept everything: the log's files go. If ``lost`` events
        could be neither delivered nor kept, the files stay for the next client or ``tracklane
        sync`` to recover them (they are the only copy left)."""
        if self.log is None:
            return
        if lost and self.log.holds_files():
            logger.warning(
                "tracklane: the %d event(s) that could not be kept in the journal are still in the "
                "event log in %s; the next client on this storage, or `tracklane sync`, recovers "
                "them once the disk has room.",
                lost,
                self.log.directory,
            )
            self.log.close(keep=True)
        else:
            self.log.close()

    def log_left_to_sender(self) -> None:
        """Exit with a sender process still running: the log's files stay for it (it delivers them
        after this process is gone and removes them), so the close at exit must not delete them."""
        if self.log is not None:
            self.log.close(keep=True)
            self.log = None

    def take_back(self, events: list[Event], own_before: int) -> None:
        """The sender process is gone: its unacknowledged ``events`` (read back from the log) join
        memory behind the ``own_before`` oldest events here (this process's own, logged before the
        sender took over) and ahead of the rest (logged after the log stopped following), and the
        worker delivers them. From here nothing is acknowledged by ordinal (the log's files stay
        until it closes). Caller holds the log's lock."""
        self._stop_relaying()
        if not events:
            return
        items = list(self._buf)
        at = own = 0
        while at < len(items) and own < own_before:  # past own_before events (markers stay put)
            own += type(items[at]) is tuple
            at += 1
        self._buf.clear()
        self._buf.extend(items[:at])
        self._buf.extend(events)
        self._buf.extend(items[at:])

    # -- the hot path: any thread, no I/O, no lock, no logging -----------------------------------

    def _key(self, key: Any, what: str) -> str:
        # Keys repeat (the same few names every step): validate each once per client.
        if type(key) is str and key in self._known_keys:
            return key
        check_key(key, what)
        if len(self._known_keys) >= _KNOWN_KEYS_CAP:
            self._known_keys.clear()
        self._known_keys.add(key)
        return key  # type: ignore[no-any-return]

    def put(self, event: Event) -> None:
        buf = self._buf
        if len(buf) >= self._max:
            self._overflow(event)
            return
        self._append(event)
        # Wake the worker once per batch, not per event: a wake-up costs a syscall.
        if len(buf) >= self.wake_at and not self._wake_pending:
            self._wake_pending = True
            self.notify()

    def log_metric(
        self, run_id: str | None, key: str, value: Any, step: int | None = None, timestamp: int | None = None
    ) -> None:
        # The common call (a float, an int step or none, a key seen before, no timestamp) is
        # checked and appended inline: this is the line a training loop runs per metric.
        if (
            run_id is not None
            and type(value) is float
            and timestamp is None
            and (step is None or (type(step) is int and _MIN_STEP <= step <= _MAX_STEP))
            and type(key) is str
            and key in self._known_keys
        ):
            buf = self._buf
            if len(buf) < self._max:
                ts, st = _time_ns() // 1_000_000, step or 0
                log = self.log
                if log is None:
                    buf.append((METRIC, run_id, key, value, ts, st))
                else:
                    # One record, one store into the mapping: no syscall. acquire/release, not
                    # ``with``: half the cost, and nothing between them can raise.
                    lock = log.lock
                    lock.acquire()
                    try:
                        if not log.metric(run_id, key, value, ts, st):
                            buf.append((METRIC, run_id, key, value, ts, st))
                            if self.relayed:
                                self._relay_cannot_follow()
                        elif not self.relayed:
                            buf.append((METRIC, run_id, key, value, ts, st))
                        elif log.ordinal >= self.relay_wake_at:  # a sender process reads it
                            self._wake_relay(log)
                    finally:
                        lock.release()
                if len(buf) >= self.wake_at and not self._wake_pending:
                    self._wake_pending = True
                    self.notify()
                return
        run_id = _require(run_id)
        key = self._key(key, "metric")
        self.put(
            (
                METRIC,
                run_id,
                key,
                metric_value(key, value),
                now_ms() if timestamp is None else check_timestamp(key, timestamp),
                0 if step is None else check_step(key, step),
            )
        )

    def log_model_metric(
        self,
        run_id: str | None,
        key: str,
        value: Any,
        step: int | None,
        timestamp: int | None,
        link: tuple[str | None, str | None, str | None],
    ) -> None:
        """A metric of an MLflow 3 LoggedModel and/or dataset: the event carries ``link``
        (model_id, dataset_name, dataset_digest) as a 7th field, for ``batching.metric_entry``."""
        run_id = _require(run_id)
        key = self._key(key, "metric")
        ts = now_ms() if timestamp is None else check_timestamp(key, timestamp)
        st = 0 if step is None else check_step(key, step)
        for field, text in zip(("model_id", "dataset_name", "dataset_digest"), link, strict=True):
            if text is not None and not isinstance(text, str):
                raise InvalidInputError(
                    f"metric {key!r}: {field}={text!r} must be a string (MLflow 3's LoggedModel and "
                    "dataset fields are ids and names)."
                )
        self.put(cast(Event, (METRIC, run_id, key, metric_value(key, value), ts, st, link)))

    def log_metrics(
        self,
        run_id: str | None,
        metrics: Mapping[str, Any],
        step: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        run_id = _require(run_id)
        ts = now_ms() if timestamp is None else check_timestamp("<log_metrics>", timestamp)
        st = 0 if step is None else check_step("<log_metrics>", step)
        events, errors = [], []
        for key, value in _items(metrics, "log_metrics"):
            try:
                key = self._key(key, "metric")
                events.append((METRIC, run_id, key, metric_value(key, value), ts, st))
            except InvalidInputError as exc:
                errors.append(str(exc))
        self._put_all(events, errors)

    def log_params(self, run_id: str | None, params: Mapping[str, Any], logged: dict[str, str]) -> None:
        """Log params of ``run_id``; ``logged`` holds the run's params so far (the run model's), so a
        param that would change value is refused here rather than by the server."""
        run_id = _require(run_id)
        events, errors = [], []
        for key, value in _items(params, "log_params"):
            try:
                key = self._key(key, "param")
                text = text_value(key, value, "param", MAX_PARAM_VALUE_LENGTH)
                before = logged.get(key)
                if before is not None and before != text:
                    raise InvalidInputError(
                        f"param {key!r} is already {before!r} in run {run_id}; params cannot "
                        f"change (got {text!r}). Log the new value under another key, or as a "
                        "metric or tag if it varies."
                    )
                logged[key] = text
                events.append((PARAM, run_id, key, text, 0, 0))
            except InvalidInputError as exc:
                errors.append(str(exc))
        self._put_all(events, errors)

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        run_id = _require(run_id)
        events, errors = [], []
        for key, value in _items(tags, "set_tags"):
            try:
                key = self._key(key, "tag")
                text = text_value(key, value, "tag", MAX_TAG_VALUE_LENGTH)
                events.append((TAG, run_id, key, text, 0, 0))
            except InvalidInputError as exc:
                errors.append(str(exc))
        self._put_all(events, errors)

    def _append(self, event: Event) -> None:
        log = self.log
        if log is None:
            self._buf.append(event)
            return
        with log.lock:
            self._log_or_keep(log, event)

    def _log_or_keep(self, log: EventLog, event: Event) -> None:
        """``event``'s record in the log, and the event in memory too unless a sender process
        delivers the log (then memory holds only what the log could not take). Caller holds the
        log's lock."""
        if not _record(log, event):
            self._buf.append(event)
            if self.relayed:
                self._relay_cannot_follow()
        elif not self.relayed:
            self._buf.append(event)
        elif log.ordinal >= self.relay_wake_at:
            self._wake_relay(log)

    def _wake_relay(self, log: EventLog) -> None:
        self.relay_wake_at = log.ordinal + self.batch_wake_at
        self.relay_notify()

    def _relay_cannot_follow(self) -> None:
        """The log could not take a record (a full disk, the disk bound): the sender process would
        never see it, so from here this process delivers by itself, from memory, as without a
        sender; the engine lets the sender finish what the log holds (``relay_failed``). Nothing
        this process holds is acknowledged by ordinal any more. Caller holds the log's lock."""
        self.held = True  # until the sender's records are taken back (``Relaying``)
        self.relayed_until = self.log.ordinal - 1 if self.log is not None else 0  # (this one is in memory)
        relay_failed = self.relay_failed
        self._stop_relaying()
        relay_failed()

    def _stop_relaying(self) -> None:
        """From here this process delivers from memory, and what memory holds is no longer in
        ordinal order, so nothing is acknowledged by ordinal."""
        self.relayed = False
        self.unticketed = True
        self.relay_notify = self.relay_failed = _nothing

    def _put_all(self, events: list[Event], errors: list[str]) -> None:
        # A bad entry must not cost the good ones of the same call: enqueue those, then raise.
        log, buf = self.log, self._buf
        if log is not None and len(buf) + len(events) <= self._max:
            # Room for the whole call: one lock round for all its records (log_metrics of 10 keys).
            log.lock.acquire()
            try:
                for event in events:
                    self._log_or_keep(log, event)
            finally:
                log.lock.release()
            if len(buf) >= self.wake_at and not self._wake_pending:
                self._wake_pending = True
                self.notify()
        else:
            for event in events:
                self.put(event)
        if errors:
            logged = (
                f" The other {len(events)} entr{'y was' if len(events) == 1 else 'ies were'} logged."
                if events
                else ""
            )
            raise InvalidInputError("; ".join(errors) + logged)

    # -- a full buffer ---------------------------------------------------------------------------

    def _overflow(self, event: Event) -> None:
        policy = self.config.overflow
        if policy == "drop_newest":
            self._count_drop(event)
        elif policy == "drop_oldest":
            log = self.log
            with log.lock if log is not None else contextlib.nullcontext():
                try:
                    oldest = self._buf.popleft()
                except IndexError:
                    oldest = None
                if isinstance(oldest, tuple):
                    self.popped += 1
                    if log is not None:  # its record is settled: dropped, counted, reported
                        if not self.unticketed:  # (memory's ordinals are in order)
                            log.done_locked(self.popped - 1, self.popped)
                        self._log_or_keep(log, event)
                    else:
                        self._buf.append(event)
                elif oldest is not None:  # a flush marker: keep order, drop the new one
                    self._buf.appendleft(oldest)
            if isinstance(oldest, tuple):
                self._count_drop(oldest)
            else:  # (or a race with the worker)
                self._count_drop(event)
        else:  # "block", and "spill" (the worker moves the backlog to the journal meanwhile)
            self._wait_for_room(event)

    def _wait_for_room(self, event: Event) -> None:
        if self._on_loop_thread():
            # Blocking here would stop the very loop that drains the buffer.
            self._append(event)
            return
        if self._starved:
            self._count_drop(event)
            return
        limit = self.config.block_timeout
        deadline = None if limit is None else time.monotonic() + limit
        with self._room:
            self._waiting_for_room += 1
            try:
                while len(self._buf) >= self._max:
                    self.notify()
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        self._starved = True
                        self._count_drop(event)
                        return
                    # No poll: ``take`` and ``clear`` notify this condition whenever they make room.
                    self._room.wait(left)
            finally:
                self._waiting_for_room -= 1
        self._append(event)

    def _count_drop(self, event: Event) -> None:
        self.dropped += 1
        if f"drop:{event[1]}" not in self._warned:  # once per run, never per event
            self._warned.add(f"drop:{event[1]}")
            waited = (
                f" after waiting {self.config.block_timeout:g}s for room"
                if self.config.overflow in ("spill", "block")
                else ""
            )
            logger.error(
                "tracklane: the buffer is full (%d events) and overflow=%r: dropping events of run %s%s. "
                "stats()['dropped'] counts them. %s",
                self._max,
                self.config.overflow,
                event[1],
                waited,
                "Neither the server nor the local journal could take them: check the server and that "
                "path_to_storage is writable."
                if self.config.overflow == "spill"
                else "A larger max_buffer or overflow='spill' keeps them.",
            )

    def _on_loop_thread(self) -> bool:
        loop = self.loop
        if loop is None:
            return False
        try:
            return asyncio.get_running_loop() is loop
        except RuntimeError:
            return False

    def has_room(self) -> bool:
        return len(self._buf) < self._max

    async def wait_for_room(self) -> None:
        """Backpressure for async callers: return once the buffer is below its bound again."""
        while len(self._buf) >= self._max and self._room_async is not None:
            self._room_async.clear()
            self.notify()
            await self._room_async.wait()

    # -- the worker's side -----------------------------------------------------------------------

    def put_marker(self, marker: asyncio.Future[None]) -> None:
        """Queue a flush marker behind every event logged so far (never dropped, never waits)."""
        self._markers += 1
        self._buf.append(marker)

    def take(self, limit: int) -> tuple[list[Event], asyncio.Future[None] | None]:
        """Up to ``limit`` events, stopping after the first flush marker (returned separately)."""
        self._wake_pending = False
        log = self.log
        if log is None:
            out, marker = self._pop(limit)
        else:
            with log.lock:  # ordinals of the events taken: callers append under this lock
                out, marker = self._pop(limit)
                start = self.popped
                self.popped += len(out)
                self.last_take = (start, self.popped)
        if out:
            self._starved = False
            self.taken += len(out)
        self._notify_room()
        if self._room_async is not None:
            self._room_async.set()
        return out, marker

    def _pop(self, limit: int) -> tuple[list[Event], asyncio.Future[None] | None]:
        buf = self._buf
        out: list[Event] = []
        if not self._markers:
            # Markers are put on the worker's own thread, so none can arrive during this take:
            # everything here is an event, with no check per item. (A drop_oldest on another
            # thread may shorten the deque for a moment: what was popped is kept.)
            append, pop = out.append, buf.popleft
            with contextlib.suppress(IndexError):
                for _ in range(min(limit, len(buf))):
                    append(pop())
            return out, None
        marker = None
        for _ in range(limit):
            try:
                item = buf.popleft()
            except IndexError:
                break
            if type(item) is tuple:
                out.append(item)
            else:
                self._markers -= 1
                marker = item
                break
        return out, marker

    def events(self) -> list[Event]:
        """The buffered events (not markers), oldest first; for shutdown to keep them."""
        return [e for e in self._buf if type(e) is tuple]

    def clear(self) -> None:
        self.taken += len(self)
        self._buf.clear()
        self._markers = 0
        self._notify_room()

    def _notify_room(self) -> None:
        """Wake callers waiting for room (they look at the buffer again)."""
        if self._waiting_for_room:
            with self._room:
                self._room.notify_all()

    @property
    def markers(self) -> int:
        """Flush markers waiting in the buffer: each wants the events before it taken now."""
        return self._markers

    def __len__(self) -> int:
        """Events waiting (markers not counted)."""
        return max(0, len(self._buf) - self._markers)

    def oldest_timestamp(self) -> int | None:
        try:
            head = self._buf[0]
        except IndexError:
            return None
        return head[4] if type(head) is tuple and head[0] == METRIC else None


def _record(log: EventLog, event: Event) -> bool:
    """``event``'s record in the log (caller holds its lock): a plain metric by the fast path.
    True: the record is there."""
    if event[0] == METRIC and len(event) == 6:
        return log.metric(event[1], event[2], event[3], event[4], event[5])
    return log.write(event)


def _require(run_id: str | None) -> str:
    if run_id is None:
        raise NoActiveRunError(
            "No active run: call start_run() first, e.g. `with tc.start_run(run_name=...):`."
        )
    return run_id


def _nothing() -> None:
    pass


def _items(mapping: Mapping[str, Any], what: str) -> Iterable[tuple[Any, Any]]:
    if not isinstance(mapping, Mapping):
        raise InvalidInputError(f"{what} takes a dict of key -> value, got {type(mapping).__name__}.")
    return mapping.items()
