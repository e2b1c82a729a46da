"""The engine: what happens to an event between the buffer and the server. It knows nothing about
runs; run models (``_runs``) hold it and pass each event's run id.

It is four parts with one job each, on one event loop (a background thread's for
``TrackingClient``, the caller's for ``AsyncTrackingClient``), sharing one ``State``:

- the **taker** (``taking``) moves events from the buffer (``buffer.Buffer``) into the *hand*, a
  short in-memory queue of packed log-batch requests; when the hand is full and the buffer half
  full (the producer outruns the server), or while spooling, it writes them to the journal instead
  (``spilling``), at disk speed, so callers never wait on the server;
- the **sender** (``sending``) sends the hand's requests in order, by the outcome rule
  (``_wire.outcome``); a request the server cannot take in the retry window, or refuses the key
  for, goes to the journal with everything behind it;
- the **uploader** (``uploading``) delivers the journal's rows for this server in order, at the
  server's pace (``spool``), and switches the engine back to sending from memory once they are all
  there. It also picks up what earlier processes left in the same journal;
- the **waiter** (``waiting``) holds the waits callers make: flushes, a run's artifacts, a run's
  end kept for later. Each wakes on the event it waits for, never on a poll.

With ``TRACKLANE_SENDER=process`` a fifth part, **relaying** (``relaying``), hands the event log to
a sender process that runs these same parts on its own GIL: logging calls then only write the log,
and the waits here ask the sender too (see ``relaying``, ``relay`` and ``sender_process``).

Where new events go (SENDING, SPOOLING, BLOCKED) is one explicit mode (``state.Mode``). The state
is built by one factory (``state.fresh_state``) that the constructor and the after-fork path both
call, so a forked child starts with nothing of its parent's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from .._exceptions import AuthenticationError, DeliveryError, TrackingError
from .._settings import EngineConfig, event_log_max_bytes, sender_setting
from .._stores.event_log import OFFLINE, EventLog
from .._stores.offline import JournalBackend
from .._stores.rest import RestBackend
from .._wire.batching import Batch, Event, pack
from .._wire.run_end import RunEnd
from .buffer import Buffer, now_ms
from .relay import Relay
from .relaying import Relaying
from .sending import Sender
from .spilling import Spiller
from .spool import Spool
from .state import Backend, Signals, State, fresh_state, time_left_at_most
from .taking import Taker
from .uploading import JournalUploader
from .waiting import Waiter

__all__ = ["Backend", "Engine"]

logger = logging.getLogger("tracklane")


class Engine:
    """Buffer, worker, delivery and flush for one client. See the module docstring."""

    def __init__(
        self, backend: Backend, config: EngineConfig, spool: Spool | None, event_log: bool = True
    ) -> None:
        self.backend = backend
        self.config = config
        self.buffer = Buffer(config)
        #: The sender process's part here (``TRACKLANE_SENDER=process``).
        self.relaying: Relaying | None = None
        if event_log and (max_bytes := event_log_max_bytes()) > 0:
            # Absolute: the process may change directory before the log's files are made or go.
            if spool is not None:
                self.buffer.log = EventLog(
                    spool.path.parent.absolute(), spool.destination.server_key, max_bytes
                )
            elif isinstance(backend, JournalBackend):  # offline: the records join the journal's runs
                self.buffer.log = EventLog(backend.log_directory, OFFLINE, max_bytes)
        log = self.buffer.log
        if (
            log is not None
            and spool is not None
            and isinstance(backend, RestBackend)
            and sender_setting() == "process"
        ):
            relay = Relay(log, backend.config, config, spool.storage)
        else:
            relay = None
        self._build(spool)
        if relay is not None and log is not None:
            self.relaying = Relaying(self.state, self.buffer, log, relay, self._uploader.kick)

    def _build(self, spool: Spool | None) -> None:
        """The state and the parts over it: at construction, and again after a fork."""
        self.state: State = fresh_state(self.config, spool)
        if spool is not None and self.buffer.log is not None:
            spool.own_logs = self.buffer.log.lineage
        self._uploader = JournalUploader(self.state, self.backend)
        spiller = Spiller(self.state, self._uploader.kick)
        self._taker = Taker(self.state, self.buffer, spiller)
        self._sender = Sender(self.state, self.backend, spiller)
        self._waiter = Waiter(self.state, self.buffer, self._uploader)

    @property
    def spool(self) -> Spool | None:
        """This engine's journal for its server (None: the backend is the journal itself)."""
        return self.state.spool

    @property
    def delivered(self) -> int:
        """Events of this engine the server has accepted (its sender process's among them)."""
        return self.state.delivered + self._sender_count("delivered")

    @property
    def spilled(self) -> int:
        """Events of this engine now in the journal, not yet delivered from it."""
        return self.state.spilled + self._sender_count("spilled")

    def _sender_count(self, name: str) -> int:
        return self.relaying.count(name) if self.relaying is not None else 0

    # -- attaching to a loop ---------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop, leftovers: bool = True) -> None:
        """Start the worker on ``loop`` (and the sender process, if there is one); must be called
        from that loop's thread. ``leftovers``: look for what earlier processes left too."""
        st = self.state
        st.loop = loop
        st.signals = signals = Signals()
        wake = signals.wake

        def notify() -> None:
            loop.call_soon_threadsafe(wake.set)

        self.buffer.bind(loop, notify)
        st.tasks = [
            loop.create_task(self._taker.run(), name="tracklane-taker"),
            loop.create_task(self._sender.run(), name="tracklane-sender"),
        ]
        relaying = self.relaying
        if relaying is not None:  # the sender process starts with the first events to deliver
            st.on_first_events = lambda: relaying.start(loop, getattr(self.backend, "workspace_id", None))
        if leftovers:
            self.resume_leftovers()
        if isinstance(self.backend, JournalBackend):
            # Offline, what processes that died left in their event logs joins their runs here;
            # shutdown waits for it (``resumes``), so it is never cut off half done.
            task = loop.create_task(self._recover_offline(self.backend), name="tracklane-recover")
            st.tasks.append(task)
            st.resumes.append(task)

    async def _recover_offline(self, journal: JournalBackend) -> None:
        await journal.recover_dead_logs(
            self.buffer.log.lineage if self.buffer.log is not None else frozenset()
        )

    @property
    def attached(self) -> bool:
        tasks = self.state.tasks
        return bool(tasks) and not any(t.done() for t in tasks[:2])

    def reset_after_fork(self) -> None:
        """In a child made by ``os.fork``: forget the parent's queue, loop, tasks, mode, waits,
        counters and connections (the parent sends its own events); the child starts afresh on a new
        loop. Complete by construction: the state is made anew by the constructor's factory."""
        if self.relaying is not None:  # the parent's sender is the parent's: the child sends its own
            self.relaying.detach()
            self.relaying = None
        self.buffer.reset_after_fork()
        spool = self.state.spool
        if spool is not None:  # the parent's journal thread, connection and lock are not ours
            spool = Spool(spool.storage, spool.destination)
        self._build(spool)
        self.backend.after_fork()

    # -- what the run models and faces call ------------------------------------------------------

    async def flush(self, deadline: float | None = None, run_id: str | None = None) -> bool:
        """Wait until every event logged before the call is on the server (or refused): True.

        Waits while the server keeps taking events; False once ``retry_window`` seconds pass with
        none taken, at the monotonic ``deadline``, or when told to give up (Ctrl-C at exit). Raises
        DeliveryError for refused events (only ``run_id``'s, if given: a run's end reports its own)
        and AuthenticationError once delivery has stopped.
        """
        relaying = self.relaying
        if relaying is not None and not await relaying.retired(deadline):
            return False
        refused: DeliveryError | None = None
        try:
            flushed = await self._waiter.flush(deadline, run_id)
        except DeliveryError as exc:  # reported after the sender's part is waited for too
            refused, flushed = exc, True
        if flushed and relaying is not None:
            # The sender's part after this process's own: it sends only once the events logged
            # before the hand-over are settled here (``Relay.hand_over``).
            theirs: bool | None = True
            try:
                theirs = await relaying.flush(deadline, run_id)
            except DeliveryError as exc:
                refused = DeliveryError([*refused.rejected, *exc.rejected]) if refused else exc
            if theirs is None:  # the sender was gone: its records are this process's now
                theirs = await self._waiter.flush(deadline, run_id)
            flushed = theirs
        if refused is not None:
            raise refused
        if flushed and self.state.held_ends:  # runs ended while their events were only in memory
            await self._apply_held_ends(flushed=True, final=False)
        return flushed

    async def deliver_artifacts(self, run_id: str, deadline: float | None = None) -> bool:
        """Wait until the run's artifacts are uploaded (or refused): True; see ``Waiter.artifacts``."""
        return await self._waiter.artifacts(run_id, deadline)

    def raise_problems(self, run_id: str | None = None) -> None:
        """Raise what the caller must hear: delivery stopped, or events the server refused (of
        ``run_id`` only, if given)."""
        self._waiter.raise_problems(run_id)

    @property
    def blocked(self) -> AuthenticationError | None:
        return self.state.blocked

    async def keep_run_end(self, end: RunEnd) -> bool:
        """After giving up on the server: the run's events and its end go to the journal. False if
        the journal cannot be written."""
        # Oldest first: this process's own events, then the sender's behind them, then the end.
        if not await self._waiter.keep_events():
            return False
        if self.relaying is not None and not await self.relaying.keep_events():
            return False
        return await self._waiter.record_end(end)

    def undelivered(self, run_id: str) -> int:
        """Events of run ``run_id`` neither on the server nor in the journal (held in memory)."""
        mine = sum(1 for e in self.leftovers() if e[1] == run_id)
        return mine + self._relayed()

    def _relayed(self) -> int:
        """Records the sender process has not acknowledged (any run's: it does not say whose)."""
        return self.relaying.unacknowledged() if self.relaying is not None else 0

    async def keep_events(self) -> bool:
        """After giving up on the server: every event held goes to the journal (a sender process's
        part of a run's end, kept by its parent). False if the journal cannot be written."""
        return await self._waiter.keep_events()

    def hold_run_end(self, end: RunEnd) -> None:
        """The journal cannot keep ``end`` and the run's events are in memory: end the run only once
        they are delivered (``shutdown`` does, after its flush), never while they are missing."""
        self.state.held_ends = [e for e in self.state.held_ends if e.run_id != end.run_id] + [end]

    async def _apply_held_ends(self, flushed: bool, final: bool) -> None:
        """End the held runs whose events are all delivered (``flushed``: a flush just saw every
        event logged before it reach the server). At shutdown (``final``), the others are said at
        ERROR and left unended; before it, they stay held."""
        st = self.state
        held, st.held_ends = st.held_ends, []
        for end in held:
            left = self.undelivered(end.run_id)
            if flushed and not left:
                try:
                    await self.backend.update_run(end.run_id, end.status, end.end_time)
                    continue
                except TrackingError as exc:
                    why = str(exc)
            else:
                why = f"the server has not got all of its events ({left} still in memory)"
            if not final:
                st.held_ends.append(end)
                continue
            logger.error(
                "tracklane: run %s is left unended (not %s) on %s: %s, and the local journal cannot "
                "be written to keep its end.",
                end.run_id,
                end.status,
                self.backend.describe,
                why,
            )

    def give_up(self) -> None:
        """Stop waiting for the server in a running flush or shutdown (Ctrl-C at exit). Loop thread only."""
        if self.relaying is not None:
            self.relaying.give_up()
        self._waiter.give_up()

    def artifact_kept(self) -> None:
        """Any thread: an artifact's row is in the journal; start the uploader if it is idle."""
        self._uploader.kick_threadsafe()

    def resume_leftovers(self) -> None:
        """Look (again) for what earlier processes left for this destination, and deliver it in the
        background; called at start, and when the destination changes (an OICM workspace)."""
        if self.relaying is not None:
            self.relaying.set_workspace(getattr(self.backend, "workspace_id", None))
        self._uploader.resume_leftovers()

    async def journal_notice(self, when: str) -> None:
        """Log what the server has not got of this engine's runs, where it is kept, and the command
        that delivers it (nothing when everything is delivered)."""
        if self.spool is not None:
            await self.spool.notice(when)

    def pending(self) -> int:
        """Events accepted but not yet settled: in the buffer, or taken by the worker."""
        return len(self.buffer) + self.state.taken() + self._relayed()

    def stats(self) -> dict[str, float]:
        """Counters of the client's own work, for dashboards and for tests of loss.

        ``enqueued`` counts events accepted into the buffer; each ends ``delivered`` (a tag value
        superseded in the journal by a later one counts as delivered), ``spilled`` (in the journal,
        delivered from there later), ``rejected`` (refused by the server, reported), or is still in
        the buffer (``buffer_depth``) or with the worker (``in_flight_events``): so ``enqueued`` equals
        the sum of those at any quiet moment. ``dropped`` events were never accepted, or were lost
        at shutdown: neither delivered nor kept in the journal (each loss is logged at ERROR).
        With ``TRACKLANE_SENDER=process`` the counts include the sender process's (as of its last
        acknowledgement), and ``sender_process`` is 1 once it has taken the log over (0 while it
        starts; the key is absent with the thread sender).
        """
        st = self.state
        buffered, taken = len(self.buffer), st.taken()
        stamps = [e[4] for b in [*st.inflight.values()] for e in b.metrics[:1]]
        stamps += [i.metrics[0][4] for i in list(st.hand)[:1] if isinstance(i, Batch) and i.metrics]
        head = self.buffer.oldest_timestamp()
        if head is not None:
            stamps.append(head)
        own = {
            "enqueued": self.buffer.taken + buffered,
            "delivered": st.delivered,
            "spilled": st.spilled,
            "dropped": self.buffer.dropped + st.lost,
            "rejected": st.rejected_total,
            "resumed": st.resumed,
            "retries": self.backend.retries,
            "in_flight_requests": len(st.inflight),
            "in_flight_events": taken,
            "buffer_depth": buffered,
            "oldest_undelivered_age_s": max(0.0, (now_ms() - min(stamps)) / 1000) if stamps else 0.0,
        }
        return own if self.relaying is None else self.relaying.stats(own)

    # -- shutdown --------------------------------------------------------------------------------

    async def shutdown(self, deadline: float | None, notice: bool = True) -> int:
        """Deliver what is left (by progress, never past ``deadline``), then keep the rest in the
        journal, stop the tasks and close I/O. Returns how many events could be neither delivered
        nor kept (0 normally). ``notice``: say what the journal keeps (a sender process leaves
        that to its parent, which says it once for both)."""
        st = self.state
        st.closing = True
        done = False
        with contextlib.suppress(TrackingError):  # the run model has reported these already
            done = await self.flush(deadline)
        if self.relaying is not None and self.relaying.relay is not None:
            if not done:  # this process's own (older) events go to the journal before the sender's
                with contextlib.suppress(TrackingError):
                    await self._waiter.keep_events()
            # The sender delivers or keeps the rest, then exits; one that was gone left its
            # records to this process's worker, which delivers them now.
            st.lost += await self.relaying.close(deadline)
            if self.state.taken() or len(self.buffer):
                with contextlib.suppress(TrackingError):
                    done = await self.flush(deadline)
        with contextlib.suppress(TrackingError):
            if done and st.resumes:  # a look for earlier leftovers may still be starting the uploader
                await asyncio.wait(st.resumes, timeout=time_left_at_most(deadline, 10.0))
            if done:
                await self._waiter.uploader_done(deadline)  # leftovers of earlier processes too
        if st.held_ends:
            await self._apply_held_ends(flushed=done, final=True)
        tasks = [*st.tasks, *st.inflight]
        if st.uploader is not None:
            tasks.append(st.uploader)
        for task in tasks:
            task.cancel()
        if tasks:  # plain waits, and journal writes under way: they finish, on a disk that works
            await asyncio.wait(tasks, timeout=20.0)
        lost = await self._keep_leftovers()
        self.buffer.close_log(lost)  # the files stay if some events are only in the log
        if st.blocked is None and notice:  # blocked: the error already gave the command
            await self.journal_notice("before exit")
        with contextlib.suppress(Exception):
            await self.backend.aclose()
        if self.spool is not None:
            with contextlib.suppress(Exception):
                await self.spool.close()
        return lost

    def leftovers(self) -> list[Event]:
        """Every event not delivered and not in the journal: buffer, hand, in flight, orphaned."""
        st = self.state
        events = self.buffer.events()
        for item in [*st.hand, *st.inflight.values(), *st.orphans]:
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
            kept = await self.spool.write(batches, self.state.reject) == len(batches)
            if kept:
                self.state.spilled += len(events)
        else:
            lost = self.backend.keep_now(events, [])
            kept = lost == 0
        if not kept:
            # Lost: counted in ``dropped`` (the caller logs them at ERROR), and let go, so a later
            # keep (events logged after the exit flush) neither retries nor counts them again.
            self.state.lost += len(events)
            self._clear_leftovers()
            return len(events)
        self._clear_leftovers()
        return 0

    def _clear_leftovers(self) -> None:
        st = self.state
        self.buffer.clear()
        st.hand.clear()
        st.hand_events = 0
        st.inflight.clear()
        st.orphans.clear()

    def keep_now(self, ends: list[RunEnd]) -> int:
        """Blocking, with no event loop (interpreter exit after an async client's loop is gone):
        keep every leftover event, and ``ends``, in the journal. Returns how many were lost."""
        if self.relaying is not None:
            # A sender outlives this process: it reads the log to its end and delivers or keeps
            # it (its lock keeps recovery off the files meanwhile); the files are its to remove.
            self.relaying.leave_to_sender()
        events = self.leftovers()
        lost = self.backend.keep_now(events, ends)
        if lost is None:
            lost = self.spool.keep_now(events, ends) if self.spool is not None else len(events)
        if lost == 0:
            self.state.spilled += len(events)
            self._clear_leftovers()
        self.buffer.close_log(lost)
        return lost
