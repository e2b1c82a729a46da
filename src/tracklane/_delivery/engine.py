"""The engine: what happens to an event between the buffer and the server. It knows nothing about
runs; run models (``_runs``) hold it and pass each event's run id.

Three tasks on one event loop (a background thread's for ``TrackingClient``, the caller's for
``AsyncTrackingClient``):

- the **taker** moves events from the buffer (``buffer.Buffer``) into the *hand*, a short in-memory
  queue of packed log-batch requests; when the hand is full and the buffer half full (the producer
  outruns the server), or once anything is *spooled*, it writes them to the journal instead, at disk
  speed, so callers never wait on the server;
- the **sender** sends the hand's requests in order, ``max_in_flight`` at a time (a request with
  params or tags alone, so a tag's last value arrives last), by the outcome rule (``outcome``); a
  request the server cannot take in the retry window, or refuses the key for, goes to the journal
  with everything behind it;
- the **uploader** delivers the journal's rows for this server in order, at the server's pace
  (``spool``), and switches the engine back to sending from memory once they are all there. It also
  picks up what earlier processes left in the same journal.

Requests already sent are never cancelled to make room: the server may have applied them, and a
duplicate costs it a reload of the keys' history (mlflow#24577).

Waiting is by progress, not by a clock: ``flush`` (and so ``end_run`` and ``close``) waits while the
server keeps taking events, and gives up only after ``retry_window`` seconds with none taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from .._exceptions import (
    AuthenticationError,
    DeliveryError,
    RejectedEvent,
    ServerUnavailableError,
    TrackingError,
)
from .._settings import EngineConfig
from .._wire.batching import KIND_NAMES, Batch, Event, pack
from .._wire.outcome import BatchTarget, backoff, deliver
from .._wire.run_end import RunEnd
from .buffer import Buffer, now_ms
from .spool import Spool

logger = logging.getLogger("tracklane")

#: Longest pause between two attempts of the uploader on a server that does not answer.
_UPLOAD_BACKOFF_CAP = 5.0
#: While another process holds the journal's upload lock, its progress is visible only in the
#: journal file (no event crosses processes): look again after a backoff from ``_PEER_LOOK_FIRST`` to
#: ``_PEER_LOOK_CAP`` seconds, cut short when a flush begins. The in-process case never waits on it.
_PEER_LOOK_FIRST = 0.02
_PEER_LOOK_CAP = 1.0
#: The longest ``keep_run_end`` waits for the sender to move the hand into the journal.
_HAND_TO_JOURNAL_WAIT = 5.0
Marker = asyncio.Future[None]


class Backend(BatchTarget, Protocol):
    """Everything the engine calls on a store (a tracking server, or the local journal)."""

    @property
    def describe(self) -> str: ...
    @property
    def retries(self) -> int: ...
    async def update_run(self, run_id: str, status: str, end_time: int | None) -> None: ...
    async def put_artifact(self, run_id: str, path: str, file: Path) -> None: ...
    async def aclose(self) -> None: ...
    def after_fork(self) -> None: ...
    def keep_now(self, events: list[Event], ends: list[RunEnd]) -> int | None:
        """Store events and run ends synchronously, with no event loop (interpreter exit); the
        number not kept, or None when this store cannot (the engine's journal keeps them)."""
        ...


class Engine:
    """Buffer, worker, delivery and flush for one client. See the module docstring."""

    def __init__(self, backend: Backend, config: EngineConfig, spool: Spool | None) -> None:
        self.backend = backend
        self.config = config
        self.buffer = Buffer(config)
        self.spool = spool  # None: the backend is the journal itself (offline)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._hand_ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._uploader: asyncio.Task[None] | None = None
        self._hand: deque[Batch | Marker] = deque()
        self._hand_events = 0
        # What the worker holds (the hand and the requests in flight) is at most max_buffer again, so
        # memory stays within twice max_buffer whatever the server does.
        self._take_size = max(1, min(config.batch_size, config.max_buffer // (2 * config.max_in_flight + 2)))
        self._hand_limit = max(self._take_size, min(self._take_size * 4, config.max_buffer // 2))
        self._spill_at = max(1, config.max_buffer // 2)
        self._inflight: dict[asyncio.Task[None], Batch] = {}
        self._orphans: list[Batch] = []  # batches of cancelled deliveries, for shutdown to keep
        self._resumes: list[asyncio.Task[None]] = []  # looks for earlier processes' leftovers
        #: Events go to the journal (not the hand) until the uploader has delivered it all.
        self._spooling = False
        #: Held while the worker moves events into the journal, so they land in logging order.
        self._journal_order = asyncio.Lock()
        self._waiters: list[tuple[Marker, tuple[int, int]]] = []
        self._blocked: AuthenticationError | None = None
        self._outage = False  # a request failed for want of a server: say so when it is over
        self._closing = False
        self._giving_up: asyncio.Event | None = None
        self._retry_now: asyncio.Event | None = None  # a flush is waiting: the uploader stops backing off
        self._journal_moved: asyncio.Event | None = None  # the uploader delivered something
        self._flush_began: asyncio.Event | None = None  # a batch kept in memory retries now
        self._hand_moved: asyncio.Event | None = None  # the sender tried to move the hand to the journal
        self._last_progress = time.monotonic()
        self._rejected: list[RejectedEvent] = []
        self._warned: set[str] = set()
        self.delivered = 0
        self.rejected_total = 0
        self.spilled = 0  # this engine's events now in the journal
        self.resumed = 0  # events of earlier processes this engine delivered from the journal

    # -- attaching to a loop ---------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the worker on ``loop``; must be called from that loop's thread."""
        self._loop = loop
        self._wake = wake = asyncio.Event()
        self._hand_ready = asyncio.Event()
        self._giving_up = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._journal_moved = asyncio.Event()
        self._flush_began = asyncio.Event()
        self._hand_moved = asyncio.Event()

        def notify() -> None:
            loop.call_soon_threadsafe(wake.set)

        self.buffer.bind(loop, notify)
        self._tasks = [
            loop.create_task(self._take_loop(), name="tracklane-taker"),
            loop.create_task(self._send_loop(), name="tracklane-sender"),
        ]
        self.resume_leftovers()

    @property
    def attached(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks[:2])

    def reset_after_fork(self) -> None:
        """In a child made by ``os.fork``: forget the parent's queue, loop, tasks and connections
        (the parent sends its own events); the child starts afresh on a new loop."""
        self.buffer.reset_after_fork()
        self._loop = self._wake = self._hand_ready = self._giving_up = self._retry_now = None
        self._journal_moved = self._flush_began = self._hand_moved = None
        self._tasks, self._uploader, self._resumes = [], None, []
        self._hand, self._hand_events = deque(), 0
        self._inflight, self._orphans, self._waiters = {}, [], []
        self._spooling = self._closing = False
        self._journal_order = asyncio.Lock()
        self._rejected = []
        self.delivered = self.rejected_total = self.spilled = self.resumed = 0
        if self.spool is not None:  # the parent's journal thread, connection and lock are not ours
            self.spool = Spool(self.spool.storage, self.spool.destination)
        self.backend.after_fork()

    # -- the taker -------------------------------------------------------------------------------

    async def _take_loop(self) -> None:
        assert self._wake is not None
        try:
            while True:
                await _wait_event(self._wake, self.config.flush_interval)
                self._wake.clear()
                try:
                    await self._take()
                except Exception:  # never let the taker die: it is the only way events leave
                    logger.exception("tracklane: unexpected error in the worker; continuing")
        except asyncio.CancelledError:
            if not self._closing:  # cancelled by the loop's shutdown, not by shutdown()
                logger.warning(
                    "tracklane: the event loop stopped with a tracking client still open; %d event(s) "
                    "were not delivered and are kept for the next client at exit. Use `async with "
                    "AsyncTrackingClient(...)` or `await tc.aclose()`.",
                    self.pending(),
                )
            raise

    async def _take(self) -> None:
        buffer = self.buffer
        while True:
            to_journal = self._spooling and self._may_spool("failure")
            if not to_journal and self._hand_events >= self._hand_limit:
                # The sender has all it can use. Leave the rest in the buffer while it has room;
                # once it is half full the producer outruns the server: spool.
                if self._spooling or len(buffer) < self._spill_at or not self._may_spool("overflow"):
                    buffer.wake_at = self._spill_at
                    return
                self._spooling = to_journal = True
            buffer.wake_at = buffer.batch_wake_at
            events, marker = buffer.take(self._take_size)
            if not events and marker is None:
                return
            batches = list(pack(events, time.time_ns()))
            if to_journal:
                placed = False  # from _spool_batches on, every batch is in the journal or the hand
                try:
                    async with self._journal_order:
                        # Older events still in the hand go first; if they cannot, neither can these.
                        if await self._hand_to_journal_in_order():
                            placed = True
                            kept = await self._spool_batches(batches)
                except asyncio.CancelledError:
                    # Shutdown: what this chunk holds must be where ``leftovers`` looks.
                    self._to_hand([] if placed else batches)
                    if marker is not None:
                        self._hand.append(marker)
                    raise
                if placed and kept == len(batches):
                    if marker is not None:
                        await self._marker_to_journal(marker)
                    continue
                # The journal just broke: the rest waits in memory (``_spool_batches`` put what it
                # did not take in the hand), and is sent only once the uploader has delivered what
                # the journal holds (``_spooling`` stays on till then).
                batches = [] if placed else batches
            self._to_hand(batches)
            if marker is not None:
                self._hand.append(marker)
                self._signal_hand()

    def _to_hand(self, batches: list[Batch]) -> None:
        for batch in batches:
            self._hand.append(batch)
            self._hand_events += len(batch)
        if batches:
            self._signal_hand()

    def _signal_hand(self) -> None:
        if self._hand_ready is not None:
            self._hand_ready.set()

    def _may_spool(self, why: str) -> bool:
        if self.spool is None or self.spool.broken:
            return False
        return why != "overflow" or self.config.overflow == "spill"

    async def _spool_batches(self, batches: list[Batch]) -> int:
        """Write ``batches`` to the journal; how many (the first ones) it took. Those it did not
        take (the journal broke) go to the front of the hand, so every batch is always somewhere
        ``leftovers`` looks. Cancelling the caller (shutdown) lets the write finish first: the
        batches are in no other place meanwhile."""
        assert self.spool is not None
        write = asyncio.ensure_future(self.spool.write(batches, self._reject))
        try:
            kept = await asyncio.shield(write)
        except asyncio.CancelledError:
            self._placed(batches, await write)
            raise
        self._placed(batches, kept)
        return kept

    def _placed(self, batches: list[Batch], kept: int) -> None:
        self.spilled += sum(len(b) for b in batches[:kept])
        if kept:
            self._kick_uploader()
        if kept < len(batches):
            self._hand.extendleft(reversed(batches[kept:]))
            self._hand_events += sum(len(b) for b in batches[kept:])

    async def _marker_to_journal(self, marker: Marker) -> None:
        """A flush marker behind events now in the journal: done once the uploader has delivered
        the journal up to here (or at once, if delivery is stopped: flush then raises why)."""
        assert self.spool is not None
        if self._blocked is not None:
            _resolve(marker)
            return
        self._waiters.append((marker, await self.spool.high_water()))
        self._kick_uploader()

    # -- the sender ------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        assert self._hand_ready is not None
        hand = self._hand
        while True:
            if not hand:
                self._hand_ready.clear()
                await self._hand_ready.wait()
                continue
            if self._spooling or self._blocked is not None:
                async with self._journal_order:
                    moved = await self._hand_to_journal_in_order()
                if moved:
                    continue
                # The journal cannot take the hand: it waits until the uploader has delivered the
                # journal's rows (they are older), then goes from memory. Blocked: it just waits.
                # ``_all_delivered`` (spooling over) and new work signal ``_hand_ready``.
                self._hand_ready.clear()
                self._hand_moved_signal()
                await self._hand_ready.wait()
                continue
            item = hand[0]
            if isinstance(item, asyncio.Future):
                if self._inflight:
                    await self._settle()
                    continue
                hand.popleft()
                _resolve(item)
                continue
            if item.has_text and self._inflight:
                await self._settle()  # a tag's last value must arrive last
                continue
            if len(self._inflight) >= self.config.max_in_flight:
                await asyncio.wait(set(self._inflight), return_when=asyncio.FIRST_COMPLETED)
                continue
            hand.popleft()
            self._hand_events -= len(item)
            task = asyncio.get_running_loop().create_task(self._deliver(item))
            self._inflight[task] = item
            task.add_done_callback(self._forget)
            self._wake_taker()
            if item.has_text:
                await self._settle()

    async def _hand_to_journal_in_order(self) -> bool:
        """While spooling: the hand joins the journal, in order, behind what is there. False if the
        journal cannot take (all of) it; what it did not take stays at the front of the hand.

        Callers hold ``_journal_order``: the taker and the sender both write to the journal, and
        the hand is older than any chunk the taker has not written yet."""
        if not self._may_spool("failure"):
            return False
        batches: list[Batch] = []
        while self._hand:
            item = self._hand[0]
            if isinstance(item, asyncio.Future):
                if not await self._hand_batches_to_journal(batches):
                    return False
                batches = []
                self._hand.popleft()
                await self._marker_to_journal(item)
            else:
                batches.append(item)
                self._hand.popleft()
        ok = await self._hand_batches_to_journal(batches)
        self._wake_taker()
        self._hand_moved_signal()
        return ok

    def _hand_moved_signal(self) -> None:
        if self._hand_moved is not None:
            self._hand_moved.set()

    async def _hand_batches_to_journal(self, batches: list[Batch]) -> bool:
        """Journal ``batches`` just taken off the hand's front (those it does not take go back)."""
        if not batches:
            return True
        self._hand_events -= sum(len(b) for b in batches)
        return await self._spool_batches(batches) == len(batches)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)

    async def _settle(self) -> None:
        while self._inflight:
            await asyncio.wait(set(self._inflight))

    def _wake_taker(self) -> None:
        if self._wake is not None and self._hand_events < self._hand_limit:
            self._wake.set()

    async def _deliver(self, batch: Batch) -> None:
        """One request's life: delivered, refused in part (reported), or kept for later."""
        try:
            await deliver(batch, self.backend, self._sent, self._reject)
            return
        except AuthenticationError as exc:
            self._block(exc)
            why = str(exc)
        except ServerUnavailableError as exc:
            why = str(exc)
        except asyncio.CancelledError:
            self._orphans.append(batch)  # shutdown keeps it
            raise
        except Exception as exc:  # a bug must not lose events: keep the batch as if the server were down
            logger.exception("tracklane: unexpected error while delivering a batch; keeping it")
            why = f"{type(exc).__name__}: {exc}"
        self._outage = True
        if self._may_spool("failure"):
            self._spooling = True
            try:
                kept = await self._spool_batches([batch])
            except asyncio.CancelledError:
                return  # the write finished: the batch is in the journal, or back in the hand
            if kept == 1:
                self._warn_once(
                    "outage",
                    "tracklane: %s Keeping events in the local journal %s and delivering them from there.",
                    why,
                    self.spool.path if self.spool is not None else "",
                )
                self._signal_hand()  # the sender moves the hand behind it
                return
            # The journal broke: the batch is back at the front of the hand, sent once the
            # uploader has delivered what the journal holds.
            self._warn_once("outage", "tracklane: %s Retrying; events stay in memory.", why)
            self._signal_hand()
            return
        # No journal: keep it in memory, at the front, and try again after a pause, cut short by a
        # flush that begins meanwhile (end_run right after the server is back must see it back).
        self._warn_once("outage", "tracklane: %s Retrying; events stay in memory.", why)
        try:
            assert self._flush_began is not None
            await _wait_event(self._flush_began, min(_UPLOAD_BACKOFF_CAP, self.config.retry_window))
            self._flush_began.clear()
        except asyncio.CancelledError:
            self._orphans.append(batch)
            raise
        self._hand.appendleft(batch)
        self._hand_events += len(batch)
        self._signal_hand()

    def _sent(self, n: int) -> None:
        self.delivered += n
        self._last_progress = time.monotonic()

    def _reject(self, events: Iterable[Event], reason: str) -> None:
        events = list(events)
        if not events:
            return
        self._last_progress = time.monotonic()  # the server answered
        if self._journal_moved is not None:
            self._journal_moved.set()  # a refused artifact is settled too: its waiter looks again
        self.rejected_total += len(events)
        self._rejected.extend(RejectedEvent(e[1], KIND_NAMES[e[0]], e[2], e[3], reason) for e in events)
        self._warn_once(
            "rejected",
            "tracklane: the server refused %d event(s) (first: %s %r: %s); the next flush() or "
            "end_run() raises DeliveryError listing them.",
            len(events),
            KIND_NAMES[events[0][0]],
            events[0][2],
            reason,
        )

    def _block(self, exc: AuthenticationError) -> None:
        """STOP: no more requests; everything goes to the journal until ``tracklane sync``."""
        if self._blocked is not None:
            return
        command = self.spool.sync_command() if self.spool is not None else "tracklane sync"
        where = self.spool.path if self.spool is not None else "the local journal"
        self._blocked = type(exc)(
            f"{exc} Delivery has stopped and every event is kept in the local journal {where}; fix "
            f"the key or the URL, then run: {command}",
            status=exc.status,
            error_code=exc.error_code,
        )
        logger.error("tracklane: %s", self._blocked)
        self._spooling = True
        self._signal_hand()
        for marker, _ in self._waiters:
            _resolve(marker)
        self._waiters.clear()

    # -- the uploader ----------------------------------------------------------------------------

    def _kick_uploader(self) -> None:
        if self.spool is None or self._blocked is not None or self._loop is None:
            return
        if self._uploader is None or self._uploader.done():
            self._uploader = self._loop.create_task(self._upload_loop(), name="tracklane-uploader")

    def artifact_kept(self) -> None:
        """Any thread: an artifact's row is in the journal; start the uploader if it is idle."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._kick_uploader)

    async def deliver_artifacts(self, run_id: str, deadline: float | None = None) -> bool:
        """Wait until the run's artifacts are uploaded (or refused): True. Like ``flush``: waits while
        the uploader makes progress, False at ``deadline`` or after ``retry_window`` without any (they
        stay in the journal). Raises DeliveryError for the run's refused artifacts."""
        spool = self.spool
        if spool is None:
            return True  # offline: they stay in the journal with the run, for `tracklane sync`
        assert self._journal_moved is not None
        started = time.monotonic()
        idle_rounds = 0
        while await spool.pending_artifacts(run_id):
            if self._blocked is not None:
                raise self._blocked
            if idle_rounds:
                # The uploader finished a round without moving this run's artifacts (a row it
                # sees only on its next round): go again after a growing pause, not in a spin.
                await asyncio.sleep(min(_PEER_LOOK_CAP, _PEER_LOOK_FIRST * 2 ** (idle_rounds - 1)))
            self._journal_moved.clear()
            self._kick_uploader()
            uploader = self._uploader
            moved: asyncio.Future[Any] = asyncio.ensure_future(self._journal_moved.wait())
            try:
                waiting: set[asyncio.Future[Any]] = {moved} if uploader is None else {moved, uploader}
                if not await self._wait_by_progress(waiting, started, deadline):
                    return False
            finally:
                moved.cancel()
            idle_rounds = 0 if self._journal_moved.is_set() else idle_rounds + 1
        if self._blocked is not None:
            raise self._blocked
        self.raise_problems(run_id)
        return True

    def resume_leftovers(self) -> None:
        """Look (again) for what earlier processes left for this destination, and deliver it in the
        background; called at start, and when the destination changes (an OICM workspace)."""
        if self.spool is not None and self._loop is not None:
            task = self._loop.create_task(self._resume(), name="tracklane-resume")
            self._tasks.append(task)
            self._resumes.append(task)

    async def _resume(self) -> None:
        """At start: deliver what earlier processes left in this storage's journal for this server."""
        assert self.spool is not None
        left = await self.spool.pending(None)  # a journal that cannot be opened: broken, logged, 0
        if left:
            logger.warning(
                "tracklane: resuming delivery of %d event(s) left in %s for %s by an earlier process.",
                left,
                self.spool.path,
                self.spool.api_host,
            )
            self._kick_uploader()

    async def _upload_loop(self) -> None:
        spool = self.spool
        assert spool is not None
        attempt = 0
        others_left: int | None = None  # rows of ours left while another process uploads
        peer_looks = 0
        writes_seen = spool.writes
        while self._blocked is None:
            if self._spooling:
                # This engine's journal rows follow the requests already in flight.
                await self._settle()
            try:
                if not await spool.lock():
                    if others_left is None:
                        logger.info("tracklane: another process is uploading %s; waiting for it.", spool.path)
                    await self._pause_for_peer(peer_looks)
                    peer_looks += 1
                    # Its progress with this engine's rows is this engine's progress.
                    left = await spool.pending(spool.runs)
                    if others_left is not None and left < others_left:
                        self._last_progress = time.monotonic()
                    others_left = left
                    await self._check_waiters(None)
                    if left == 0 and spool.writes == writes_seen and not spool.writing:
                        self._all_delivered(spool)
                        return
                    writes_seen = spool.writes
                    continue
                others_left, peer_looks = None, 0
                writes = spool.writes
                hi = await spool.high_water()
                moved = await spool.upload(
                    self.backend, self._sent_from_journal, self._reject, hi, self.config.max_in_flight
                )
                attempt = 0
                await self._check_waiters(hi)
                if moved == 0 and spool.writes == writes and not spool.writing:
                    spool.unlock()
                    self._all_delivered(spool)
                    return
            except AuthenticationError as exc:
                self._block(exc)
                spool.unlock()
                return
            except ServerUnavailableError:
                await self._pause(attempt)
                attempt += 1
            except (OSError, TrackingError) as exc:
                self._warn_once("upload", "tracklane: delivering from the journal failed: %s; retrying", exc)
                await self._pause(attempt)
                attempt += 1
            except asyncio.CancelledError:
                spool.unlock()
                raise
            except Exception:  # the uploader must not die: it is how spooled events get home
                logger.exception("tracklane: delivering from the journal failed; retrying")
                await self._pause(attempt)
                attempt += 1

    async def _pause(self, attempt: int) -> None:
        """Back off before the next attempt on a server that does not answer; a waiting flush cuts
        the pause short, so a server that is back is seen at once rather than after the backoff."""
        assert self._retry_now is not None
        delay = backoff(attempt, base=0.25, cap=min(_UPLOAD_BACKOFF_CAP, self.config.retry_window / 2))
        await _wait_event(self._retry_now, delay)
        self._retry_now.clear()

    async def _pause_for_peer(self, looks: int) -> None:
        """Another process uploads this journal: look at its progress again after a backoff (its
        progress is in the file, and no event crosses processes), cut short by a flush beginning."""
        assert self._retry_now is not None
        delay = min(_PEER_LOOK_CAP, _PEER_LOOK_FIRST * 2**looks)
        await _wait_event(self._retry_now, delay)
        self._retry_now.clear()

    def _all_delivered(self, spool: Spool) -> None:
        """The journal holds nothing of this engine's any more, and nothing is being written: back
        to sending from memory (the hand, held meanwhile if the journal broke, goes first)."""
        self._spooling = False
        # A tag set again while spooled is one journal row: its earlier values were superseded,
        # which is as delivered as they can be.
        self.delivered += self.spilled
        self.spilled = 0
        for marker, _ in self._waiters:
            _resolve(marker)
        self._waiters.clear()
        self._signal_hand()
        self._wake_taker()
        if self._outage:
            self._outage = False
            self._warned.discard("outage")
            logger.warning(
                "tracklane: %s answers again; every event kept in the journal is delivered.", spool.api_host
            )

    def _sent_from_journal(self, run_id: str, n: int) -> None:
        self._last_progress = time.monotonic()
        if self._journal_moved is not None:
            self._journal_moved.set()  # an artifact waiter looks again now, not at its next poll
        assert self.spool is not None
        if run_id in self.spool.runs and self.spilled:
            moved = min(n, self.spilled)
            self.spilled -= moved
            self.delivered += moved
            n -= moved
        self.resumed += n

    async def _check_waiters(self, done_upto: tuple[int, int] | None) -> None:
        """Resolve flushes whose journal rows are delivered: all rows up to ``done_upto`` (a round
        just finished), or, while another process uploads, as the journal's marks say."""
        if not self._waiters or self.spool is None:
            return
        still = []
        for marker, target in self._waiters:
            if marker.done():
                continue
            if done_upto is not None and target <= done_upto:
                _resolve(marker)
            elif done_upto is None and await self.spool.pending(self.spool.runs, target) == 0:
                self._last_progress = time.monotonic()  # the other uploader delivered them
                _resolve(marker)
            else:
                still.append((marker, target))
        self._waiters = still

    # -- flush -----------------------------------------------------------------------------------

    async def flush(self, deadline: float | None = None, run_id: str | None = None) -> bool:
        """Wait until every event logged before the call is on the server (or refused): True.

        Waits while the server keeps taking events; False once ``retry_window`` seconds pass with
        none taken, at the monotonic ``deadline``, or when told to give up (Ctrl-C at exit). Raises
        DeliveryError for refused events (only ``run_id``'s, if given: a run's end reports its own)
        and AuthenticationError once delivery has stopped.
        """
        assert self._wake is not None
        marker: Marker = asyncio.get_running_loop().create_future()
        self.buffer.put_marker(marker)
        self._wake.set()
        if self._retry_now is not None:
            self._retry_now.set()
        if self._flush_began is not None:
            self._flush_began.set()
        if not await self._wait_by_progress({marker}, time.monotonic(), deadline):
            return False
        self.raise_problems(run_id)
        return True

    async def _wait_by_progress(
        self, waiting: set[asyncio.Future[Any]], started: float, deadline: float | None
    ) -> bool:
        """Wait until one of ``waiting`` is done: True. False at the monotonic ``deadline``, when
        told to give up, or once ``retry_window`` seconds pass with nothing taken by the server.

        No clock polling: it sleeps until one of those, or until the window could end (the moment
        is recomputed on waking, as progress moves it on)."""
        assert self._giving_up is not None
        giving_up: asyncio.Future[Any] = asyncio.ensure_future(self._giving_up.wait())
        try:
            while not any(f.done() for f in waiting):
                if giving_up.done():
                    return False
                ends = self._progress_since(started) + self.config.retry_window
                if deadline is not None:
                    ends = min(ends, deadline)
                left = ends - time.monotonic()
                if left <= 0:
                    return False
                await asyncio.wait({*waiting, giving_up}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            giving_up.cancel()
        return True

    def _progress_since(self, started: float) -> float:
        """When the server last took something, for a wait that began at ``started``: each wait gets
        a window of its own, so a server that has just come back is seen (its first resend may be
        a backoff away). The cost: ending several runs during a long outage waits a window each."""
        return max(self._last_progress, started)

    def raise_problems(self, run_id: str | None = None) -> None:
        """Raise what the caller must hear: delivery stopped, or events the server refused (of
        ``run_id`` only, if given; the others wait for their own run's end or a plain flush)."""
        if self._blocked is not None:
            raise self._blocked
        if run_id is None:
            rejected, self._rejected = self._rejected, []
        else:
            rejected = [e for e in self._rejected if e.run_id == run_id]
            self._rejected = [e for e in self._rejected if e.run_id != run_id]
        if rejected:
            raise DeliveryError(rejected)

    @property
    def blocked(self) -> AuthenticationError | None:
        return self._blocked

    async def keep_run_end(self, end: RunEnd) -> bool:
        """After giving up on the server: the run's events go to the journal (not memory) and its end
        is recorded there, for this engine's uploader or a later ``tracklane sync``. False if the
        journal cannot be written."""
        if not self._may_spool("failure"):
            return False
        assert self.spool is not None
        self._spooling = True
        self._signal_hand()
        # The sender moves the hand at disk speed (it signals each try); bounded regardless.
        ends = time.monotonic() + _HAND_TO_JOURNAL_WAIT
        while any(isinstance(i, Batch) for i in self._hand) and not self.spool.broken:
            left = ends - time.monotonic()
            if left <= 0 or self._hand_moved is None:
                break
            self._hand_moved.clear()
            await _wait_event(self._hand_moved, left)
        return await self.spool.record_end(end)

    async def journal_notice(self, when: str) -> None:
        """Log what the server has not got of this engine's runs, where it is kept, and the command
        that delivers it (nothing when everything is delivered)."""
        if self.spool is not None:
            await self.spool.notice(when)

    def pending(self) -> int:
        """Events accepted but not yet settled: in the buffer, or taken by the worker."""
        return len(self.buffer) + self._taken()

    def _taken(self) -> int:
        return self._hand_events + sum(len(b) for b in self._inflight.values())

    def stats(self) -> dict[str, float]:
        """Counters of the client's own work, for dashboards and for tests of loss.

        ``enqueued`` counts events accepted into the buffer; each ends ``delivered`` (a tag value
        superseded in the journal by a later one counts as delivered), ``spilled`` (in the journal,
        delivered from there later), ``rejected`` (refused by the server, reported), or is still in
        the buffer (``buffer_depth``) or with the worker (``in_flight_events``): so ``enqueued`` equals
        the sum of those at any quiet moment. ``dropped`` events were never accepted.
        """
        buffered, taken = len(self.buffer), self._taken()
        stamps = [e[4] for b in [*self._inflight.values()] for e in b.metrics[:1]]
        stamps += [i.metrics[0][4] for i in list(self._hand)[:1] if isinstance(i, Batch) and i.metrics]
        head = self.buffer.oldest_timestamp()
        if head is not None:
            stamps.append(head)
        return {
            "enqueued": self.buffer.taken + buffered,
            "delivered": self.delivered,
            "spilled": self.spilled,
            "dropped": self.buffer.dropped,
            "rejected": self.rejected_total,
            "resumed": self.resumed,
            "retries": self.backend.retries,
            "in_flight_requests": len(self._inflight),
            "in_flight_events": taken,
            "buffer_depth": buffered,
            "oldest_undelivered_age_s": max(0.0, (now_ms() - min(stamps)) / 1000) if stamps else 0.0,
        }

    def _warn_once(self, topic: str, message: str, *args: Any) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning(message, *args)

    # -- shutdown --------------------------------------------------------------------------------

    async def shutdown(self, deadline: float | None) -> int:
        """Deliver what is left (by progress, never past ``deadline``), then keep the rest in the
        journal, stop the tasks and close I/O. Returns how many events could be neither delivered
        nor kept (0 normally)."""
        self._closing = True
        with contextlib.suppress(TrackingError):  # the run model has reported these already
            done = await self.flush(deadline)
            if done and self._resumes:  # a look for earlier leftovers may still be starting the uploader
                await asyncio.wait(self._resumes, timeout=_remaining(deadline, 10.0))
            if done and self._uploader is not None and not self._uploader.done():
                await self._wait_for_uploader(deadline)  # leftovers of earlier processes too
        tasks = [*self._tasks, *self._inflight]
        if self._uploader is not None:
            tasks.append(self._uploader)
        for task in tasks:
            task.cancel()
        if tasks:  # plain waits, and journal writes under way: they finish, on a disk that works
            await asyncio.wait(tasks, timeout=20.0)
        lost = await self._keep_leftovers()
        if self._blocked is None:  # blocked: the error already gave the command
            await self.journal_notice("before exit")
        with contextlib.suppress(Exception):
            await self.backend.aclose()
        if self.spool is not None:
            with contextlib.suppress(Exception):
                await self.spool.close()
        return lost

    async def _wait_for_uploader(self, deadline: float | None) -> None:
        assert self._uploader is not None
        await self._wait_by_progress({self._uploader}, time.monotonic(), deadline)

    def leftovers(self) -> list[Event]:
        """Every event not delivered and not in the journal: buffer, hand, in flight, orphaned."""
        events = self.buffer.events()
        for item in [*self._hand, *self._inflight.values(), *self._orphans]:
            if isinstance(item, Batch):
                events.extend(item.events())
        return events

    async def _keep_leftovers(self) -> int:
        events = self.leftovers()
        if not events:
            return 0
        kept = False
        if self.spool is not None and not self.spool.broken:
            batches = list(pack(events, time.time_ns()))
            kept = await self.spool.write(batches, self._reject) == len(batches)
            if kept:
                self.spilled += len(events)
        else:
            lost = self.backend.keep_now(events, [])
            kept = lost == 0
        if not kept:
            return len(events)
        self._clear_leftovers()
        return 0

    def _clear_leftovers(self) -> None:
        self.buffer.clear()
        self._hand.clear()
        self._hand_events = 0
        self._inflight.clear()
        self._orphans.clear()

    def keep_now(self, ends: list[RunEnd]) -> int:
        """Blocking, with no event loop (interpreter exit after an async client's loop is gone):
        keep every leftover event, and ``ends``, in the journal. Returns how many were lost."""
        events = self.leftovers()
        lost = self.backend.keep_now(events, ends)
        if lost is None:
            lost = self.spool.keep_now(events, ends) if self.spool is not None else len(events)
        if lost == 0:
            self.spilled += len(events)
            self._clear_leftovers()
        return lost

    def give_up(self) -> None:
        """Stop waiting for the server in a running flush or shutdown (Ctrl-C at exit). Loop thread only."""
        if self._giving_up is not None:
            self._giving_up.set()


async def _wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event``, at most ``timeout`` seconds: whether it is set. Not ``asyncio.wait_for``:
    on Python 3.10 and 3.11 that swallows a cancellation racing the event being set (gh-86296), and a
    worker task that misses its cancellation keeps ``shutdown`` waiting for it."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()


def _remaining(deadline: float | None, cap: float) -> float:
    return cap if deadline is None else max(0.0, min(cap, deadline - time.monotonic()))


def _resolve(marker: Marker) -> None:
    if not marker.done():
        marker.set_result(None)
