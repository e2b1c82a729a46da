"""The engine both client faces share: the hot path, the buffer, the worker, delivery, flush.

Which run events belong to (experiments, starting and ending runs) is ``_lifecycle``'s part.

Threads and loops: logging calls (``log_metric`` ...) run on the caller's thread and only
validate, stamp and append to a ``collections.deque``: an atomic append under the GIL, so no lock
is taken per event. Everything else (draining, sending, lifecycle calls) is a coroutine on the
one event loop the engine is attached to: a background thread's loop for ``TrackingClient``,
the caller's own loop for ``AsyncTrackingClient``. Ordering is kept by the deque alone: a flush
puts a marker behind the events logged before it and waits for the worker to reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .._delivery.batching import KIND_NAMES, METRIC, PARAM, TAG, Batch, Event, pack
from .._delivery.spool import Spill
from .._entities import RunInfo
from .._exceptions import (
    DeliveryError,
    InvalidInputError,
    NoActiveRunError,
    NotFoundError,
    RejectedEvent,
    ServerError,
    ServerUnavailableError,
    TrackingError,
)
from .._limits import (
    MAX_PARAM_VALUE_LENGTH,
    MAX_STEP,
    MAX_TAG_VALUE_LENGTH,
    MIN_STEP,
)
from .._runs.lifecycle import Backend, Lifecycle, now_ms
from .._settings import EngineConfig
from .._stores.rest import RestBackend
from .._validation import check_key, check_step, check_timestamp, metric_value, text_value

logger = logging.getLogger("tracklane")

_KNOWN_KEYS_CAP = 100_000
#: Under overflow="spill", how long a request may hold a full buffer before the batch is journaled.
_SPILL_AFTER = 1.0
_RUN_STATE_ERROR = re.compile(r"active' state|deleted|RESOURCE_DOES_NOT_EXIST", re.I)


_time_ns = time.time_ns
_MIN_STEP, _MAX_STEP = MIN_STEP, MAX_STEP


class Engine(Lifecycle):
    """Buffer, delivery and lifecycle for one client instance. See the module docstring."""

    def __init__(self, backend: Backend, config: EngineConfig) -> None:
        super().__init__()
        self.backend = backend
        self.config = config
        self._buf: deque[Any] = deque()
        self._max = config.max_buffer
        # Wake the worker once a batch is ready, or the buffer half full if it is smaller.
        self._wake_at = max(1, min(config.batch_size, config.max_buffer // 2))
        self._wake_pending = False
        self._notify: Callable[[], None] = _nothing
        self._room = threading.Condition()
        self._waiting_for_room = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._room_async: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._inflight: dict[asyncio.Task[None], Batch] = {}
        self._hand: deque[Batch] = deque()
        self._markers = 0  # flush markers in the buffer, so counting events needs no scan
        self._closing = False
        self._giving_up: asyncio.Event | None = None
        self._known_keys: set[str] = set()
        # Outcomes.
        self._rejected: list[RejectedEvent] = []
        self._warned: set[str] = set()
        self.delivered = 0
        self.dropped = 0
        self.rejected_total = 0
        self.spilled = 0

    # -- attaching to a loop ---------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the worker on ``loop``; must be called from that loop's thread."""
        self._loop = loop
        self._wake = asyncio.Event()
        self._room_async = asyncio.Event()
        wake = self._wake

        def notify() -> None:
            loop.call_soon_threadsafe(wake.set)

        self._notify = notify
        self._worker = loop.create_task(self._work(), name="tracklane-worker")

    def reset_after_fork(self) -> None:
        """In a child made by ``os.fork``: forget the parent's queue, loop, locks and connections.

        The experiment and run context stay, so the child logs into the parent's run; the run
        stays the parent's to end (the child's exit only flushes its own events).
        """
        self._buf = deque()
        self._inflight = {}
        self._hand = deque()
        self._markers = 0
        self._room = threading.Condition()
        self._waiting_for_room = 0
        self._wake_pending = False
        self._notify = _nothing
        self._loop = self._wake = self._room_async = None
        self._worker = self._sampler = None
        self._closing = False
        self._rejected = []
        self.delivered = self.dropped = self.rejected_total = self.spilled = 0
        self._owns_run = False
        self._spill_state = None  # the parent's journal thread and connection are not ours
        forget = getattr(self.backend, "after_fork", None)
        if forget is not None:
            forget()

    async def on_attach(self) -> None:
        """Checks a face runs once the engine has a loop: the OICM platform's liveness/version."""
        check = getattr(self.backend, "check_platform", None)
        if check is not None:
            await check()

    @property
    def attached(self) -> bool:
        return self._worker is not None and not self._worker.done()

    # -- the hot path: any thread, no I/O, no lock, no logging ----------------------------------

    def _active_run_id(self) -> str:
        run_id = self._run_id
        if run_id is None:
            raise NoActiveRunError(
                "No active run: call start_run() first, e.g. `with tc.start_run(run_name=...):`."
            )
        return run_id

    def _key(self, key: Any, what: str) -> str:
        # Keys repeat (the same few names every step): validate each once per client.
        if type(key) is str and key in self._known_keys:
            return key
        check_key(key, what)
        if len(self._known_keys) >= _KNOWN_KEYS_CAP:
            self._known_keys.clear()
        self._known_keys.add(key)
        return key  # type: ignore[no-any-return]

    def _put(self, event: Event) -> None:
        buf = self._buf
        if len(buf) >= self._max:
            self._overflow(event)
            return
        buf.append(event)
        # Wake the worker once per batch, not per event: a wake-up costs a syscall.
        if len(buf) >= self._wake_at and not self._wake_pending:
            self._wake_pending = True
            self._notify()

    def log_metric(self, key: str, value: Any, step: int | None = None, timestamp: int | None = None) -> None:
        # The common call (a float, an int step or none, a key seen before, no timestamp) is
        # checked and appended inline: this is the line a training loop runs per metric.
        run_id = self._run_id
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
                buf.append((METRIC, run_id, key, value, _time_ns() // 1_000_000, step or 0))
                if len(buf) >= self._wake_at and not self._wake_pending:
                    self._wake_pending = True
                    self._notify()
                return
        run_id = self._active_run_id()
        key = self._key(key, "metric")
        self._put(
            (
                METRIC,
                run_id,
                key,
                metric_value(key, value),
                now_ms() if timestamp is None else check_timestamp(key, timestamp),
                0 if step is None else check_step(key, step),
            )
        )

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int | None = None, timestamp: int | None = None
    ) -> None:
        run_id = self._active_run_id()
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

    def log_params(self, params: Mapping[str, Any]) -> None:
        run_id = self._active_run_id()
        logged = self._params.setdefault(run_id, {})
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

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        run_id = self._active_run_id()
        events, errors = [], []
        for key, value in _items(tags, "set_tags"):
            try:
                key = self._key(key, "tag")
                text = text_value(key, value, "tag", MAX_TAG_VALUE_LENGTH)
                events.append((TAG, run_id, key, text, 0, 0))
            except InvalidInputError as exc:
                errors.append(str(exc))
        self._put_all(events, errors)

    def _put_all(self, events: list[Event], errors: list[str]) -> None:
        # A bad entry must not cost the good ones of the same call: enqueue those, then raise.
        for event in events:
            self._put(event)
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
            try:
                oldest = self._buf.popleft()
            except IndexError:
                oldest = None
            if isinstance(oldest, tuple):
                self._count_drop(oldest)
                self._buf.append(event)
            else:  # a flush marker or a race with the worker: keep order, drop the new one
                if oldest is not None:
                    self._buf.appendleft(oldest)
                self._count_drop(event)
        else:  # "block", and "spill" (the worker moves the backlog to the journal meanwhile)
            self._wait_for_room(event)

    def _wait_for_room(self, event: Event) -> None:
        if self._on_loop_thread():
            # Blocking here would stop the very loop that drains the buffer.
            self._buf.append(event)
            return
        deadline = None if self.config.block_timeout is None else time.monotonic() + self.config.block_timeout
        with self._room:
            self._waiting_for_room += 1
            try:
                while len(self._buf) >= self._max:
                    self._notify()
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        self._count_drop(event)
                        return
                    self._room.wait(0.05 if left is None else min(left, 0.05))
            finally:
                self._waiting_for_room -= 1
        self._buf.append(event)

    def _count_drop(self, event: Event) -> None:
        self.dropped += 1
        self.warn_once(
            f"drop:{event[1]}",
            "tracklane's buffer is full (%d events) and overflow=%r: dropping events of run %s. "
            "stats()['dropped'] counts them; a larger max_buffer or overflow='spill' keeps them.",
            self._max,
            self.config.overflow,
            event[1],
        )

    def _on_loop_thread(self) -> bool:
        loop = self._loop
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
            self._notify()
            await self._room_async.wait()

    def warn_once(self, topic: str, message: str, *args: Any) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning(message, *args)

    # -- the worker: runs on the loop -------------------------------------------------------------

    async def _work(self) -> None:
        assert self._wake is not None
        try:
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.flush_interval)
                self._wake.clear()
                try:
                    await self._drain()
                except Exception:  # never let the worker die: it is the only way events leave
                    logger.exception("tracklane worker: unexpected error while draining; continuing")
        except asyncio.CancelledError:
            if not self._closing:  # cancelled by the loop's shutdown, not by shutdown()
                self._warn_unclosed()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(self.backend.aclose(), 1.0)
            raise

    async def _drain(self) -> None:
        while True:
            self._wake_pending = False
            chunk, marker = self._take(self.config.batch_size)
            # Taken from the buffer, not yet in flight: kept where stats() and shutdown see them.
            self._hand.extend(pack(chunk))
            while self._hand:
                await self._dispatch(self._hand[0])
            if marker is not None:
                await self._settle()
                if not marker.done():
                    marker.set_result(None)
            elif not chunk:
                return

    def _take(self, limit: int) -> tuple[list[Event], asyncio.Future[None] | None]:
        buf, out = self._buf, []
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
        if self._waiting_for_room:
            with self._room:
                self._room.notify_all()
        if self._room_async is not None:
            self._room_async.set()
        return out, marker

    async def _dispatch(self, batch: Batch) -> None:
        if batch.has_text:
            await self._settle()  # a tag's last value must arrive last
        while len(self._inflight) >= self.config.max_in_flight:
            await asyncio.wait(set(self._inflight), return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.get_running_loop().create_task(self._deliver(batch))
        self._inflight[task] = batch
        self._hand.popleft()
        task.add_done_callback(self._forget)
        if batch.has_text:
            await self._settle()

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)

    async def _settle(self) -> None:
        while self._inflight:
            await asyncio.wait(set(self._inflight))

    async def _deliver(self, batch: Batch) -> None:
        """Send ``batch``; on a 400, bisect to isolate the refused events and deliver the rest.

        A server that cannot be reached gets the batch later: it goes to the journal (``_spill``).
        """
        spill = self._spill()
        if spill is None:
            await self._send_or_spill(batch, None)
            return
        spill.unsettled[id(batch)] = batch
        await self._send_or_spill(batch, spill)
        # Not in a `finally`: a cancelled delivery stays listed, and shutdown journals its batch.
        spill.unsettled.pop(id(batch), None)

    # -- outage spill (see _spill) ---------------------------------------------------------------

    _spill_state: Spill | None = None  # made on the first delivery to a server; never offline

    def _spill(self) -> Spill | None:
        if self._spill_state is None and isinstance(self.backend, RestBackend):
            self._spill_state = Spill(self.backend, self.config.journal_dir)
        return self._spill_state

    def _run_name(self, run_id: str) -> str:
        run = self.run or (self.last_run.info if self.last_run is not None else None)
        return run.run_name if run is not None and run.run_id == run_id else ""

    def _count_replayed(self, n: int) -> None:
        # Replayed from the journal: these events move from "spilled" to "delivered".
        self.delivered += n
        self.spilled = max(0, self.spilled - n)

    async def _send_or_spill(self, batch: Batch, spill: Spill | None) -> None:
        while True:
            if (
                spill is not None
                and spill.degraded
                and await spill.write(batch.events(), self._run_name, batch)
            ):
                self.spilled += len(batch)
                return
            try:
                await self._send(batch, spill)
                self.delivered += len(batch)
                return
            except ServerUnavailableError as exc:
                if spill is not None and await spill.write(batch.events(), self._run_name, batch):
                    self.spilled += len(batch)
                    spill.degrade(exc, self._count_replayed, self._reject)
                    return
                self.warn_once("outage", "tracklane: %s Retrying; events stay buffered.", exc)
                if self._closing:
                    raise
            except ServerError as exc:
                message = str(exc)
                if len(batch) == 1 or isinstance(exc, NotFoundError) or _RUN_STATE_ERROR.search(message):
                    self._reject(batch.events(), message)
                    return
                first, second = batch.halves()
                await self._send_or_spill(first, spill)
                await self._send_or_spill(second, spill)
                return

    async def _send(self, batch: Batch, spill: Spill | None) -> None:
        """``log_batch``; but under ``overflow="spill"``, stop waiting for a server that sits on a
        request while the buffer is full: the callers blocked for room are released through the
        journal instead (``ServerUnavailableError`` sends the batch there)."""
        if spill is None or spill.broken or self.config.overflow != "spill":
            await self.backend.log_batch(batch)
            return
        started = time.monotonic()
        send = asyncio.ensure_future(self.backend.log_batch(batch))
        try:
            while not (await asyncio.wait({send}, timeout=0.25))[0]:
                if len(self._buf) >= self._max and time.monotonic() - started >= _SPILL_AFTER:
                    raise ServerUnavailableError(
                        f"{self.backend.describe} has not taken a batch in {_SPILL_AFTER:.0f}s while the "
                        f"buffer is full ({self._max} events)."
                    )
            send.result()
        finally:
            send.cancel()

    async def _finish_and_replay(self, run_status: str | None) -> None:
        await self._finish(run_status)
        spill = self._spill_state
        if spill is not None and spill.replay_task is not None:
            await spill.replay_task  # ends once the journal has given the server everything

    async def _keep_undelivered(self, undelivered: int, run: RunInfo | None, run_status: str | None) -> int:
        """At shutdown: put the events still buffered or in flight, and a run end the server did
        not get, in the journal. Returns how many events are lost (0 once the journal has them)."""
        spill = self._spill_state
        if spill is None:
            return undelivered
        if spill.replay_task is not None:
            spill.replay_task.cancel()
        busy = [
            t for t in (self._worker, *self._inflight, spill.replay_task) if t is not None and not t.done()
        ]
        if busy:
            await asyncio.wait(busy, timeout=1.0)  # a cancelled spill write finishes first
        events = [e for e in self._buf if type(e) is tuple]
        for batch in [*self._hand, *spill.unsettled.values()]:
            events.extend(batch.events())
        ended = None
        last = self.last_run
        if run is not None and run_status is not None and (last is None or last.info.run_id != run.run_id):
            ended = (run.run_id, run_status, now_ms())
        if not events and ended is None and not spill.runs:
            return undelivered

        def name(run_id: str) -> str:
            return run.run_name if run is not None and run.run_id == run_id else self._run_name(run_id)

        await spill.keep_at_exit(events, name, ended)
        if spill.broken:
            return undelivered
        self.spilled += len(events)
        self._buf.clear()
        self._hand.clear()
        spill.unsettled.clear()
        return 0

    def _warn_unclosed(self) -> None:
        # The loop is shutting down under a client nobody closed (like an unclosed aiohttp
        # session): say so once rather than hang the shutdown waiting for the server. A logged
        # warning, not a ResourceWarning: those are hidden by Python's default filters.
        logger.warning(
            "tracklane: the event loop stopped with a tracking client still open; %d event(s) were "
            "not delivered. Use `async with AsyncTrackingClient(...)` or `await tc.aclose()`.",
            self.pending(),
        )

    def _reject(self, events: Iterable[Event], reason: str) -> None:
        events = list(events)
        self.rejected_total += len(events)
        self._rejected.extend(RejectedEvent(e[1], KIND_NAMES[e[0]], e[2], e[3], reason) for e in events)
        self.warn_once(
            "rejected",
            "tracklane: the server refused %d event(s) (first: %s %r: %s); the next flush() or "
            "end_run() raises DeliveryError listing them.",
            len(events),
            KIND_NAMES[events[0][0]],
            events[0][2],
            reason,
        )

    # -- flush -----------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Return once every event logged before the call is settled (delivered or refused).

        Raises DeliveryError listing events the server refused since the last flush.
        """
        marker: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._markers += 1
        self._buf.append(marker)
        assert self._wake is not None
        self._wake.set()
        await marker
        self.raise_rejected()

    def raise_rejected(self) -> None:
        if self._rejected:
            rejected, self._rejected = self._rejected, []
            raise DeliveryError(rejected)

    def pending(self) -> int:
        """Events accepted but not yet settled: in the buffer, or taken by the worker."""
        return self._buffered() + self._taken()

    def _buffered(self) -> int:
        return max(0, len(self._buf) - self._markers)

    def _taken(self) -> int:
        """Events the worker took from the buffer: being packed, or in requests not yet answered."""
        return sum(len(b) for b in [*self._hand, *self._inflight.values()])

    def stats(self) -> dict[str, float]:
        """Counters of the client's own work, for dashboards and for tests of loss.

        ``enqueued`` counts events accepted into the buffer; each ends ``delivered``, ``spilled``
        (kept in the journal for later), ``rejected`` (refused by the server, reported) or is
        still in the buffer (``buffer_depth``) or with the worker (``in_flight_events``).
        ``dropped`` events were never accepted (drop policies).
        """
        buffered, taken = self._buffered(), self._taken()
        oldest = [b.events()[0][4] for b in [*self._hand, *self._inflight.values()] if len(b)]
        with contextlib.suppress(IndexError):
            head = self._buf[0]
            if type(head) is tuple:
                oldest.append(head[4])
        return {
            "enqueued": self.delivered + self.spilled + self.rejected_total + buffered + taken,
            "delivered": self.delivered,
            "spilled": self.spilled,
            "dropped": self.dropped,
            "rejected": self.rejected_total,
            "retries": getattr(self.backend, "retries", 0),
            "in_flight_requests": len(self._inflight),
            "in_flight_events": taken,
            "buffer_depth": buffered,
            "oldest_undelivered_age_s": max(0.0, (now_ms() - min(oldest)) / 1000) if oldest else 0.0,
        }

    # -- shutdown --------------------------------------------------------------------------------

    async def shutdown(self, timeout: float, run_status: str | None = "FINISHED") -> int:
        """Flush within ``timeout`` seconds (or until ``give_up``), end a still-active run, stop
        the worker, keep what is left in the journal, close I/O.

        Returns how many events could be neither delivered nor journaled (0 normally).
        """
        self._closing = True
        self._giving_up = asyncio.Event()
        undelivered = 0
        run = self.run if self._owns_run else None  # a forked child leaves the run to its parent
        finish = asyncio.ensure_future(self._finish_and_replay(run_status))
        gave_up = asyncio.ensure_future(self._giving_up.wait())
        try:
            await asyncio.wait({finish, gave_up}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if finish.done():
                finish.result()
            else:  # out of time, or told to stop waiting: what is left goes to the journal
                finish.cancel()
                await asyncio.wait({finish}, timeout=1.0)
                undelivered = self.pending()
        except TrackingError as exc:
            logger.warning("tracklane: at shutdown: %s", exc)
        finally:
            gave_up.cancel()
            for task in [self._sampler, self._worker, *self._inflight]:
                if task is not None:
                    task.cancel()
            undelivered = await self._keep_undelivered(undelivered, run, run_status)
            await self.backend.aclose()
        return undelivered

    def give_up(self) -> None:
        """Stop waiting for the server in a running ``shutdown`` (Ctrl-C at exit). Loop thread only."""
        if self._giving_up is not None:
            self._giving_up.set()

    async def _finish(self, run_status: str | None) -> None:
        if self.run is not None and run_status is not None and self._owns_run:
            await self.end_run(run_status)
        else:
            await self.flush()


def _nothing() -> None:
    pass


def _items(mapping: Mapping[str, Any], what: str) -> Iterable[tuple[Any, Any]]:
    if not isinstance(mapping, Mapping):
        raise InvalidInputError(f"{what} takes a dict of key -> value, got {type(mapping).__name__}.")
    return mapping.items()
