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

With ``TRACKLANE_SENDER=process`` a fifth part, the **relay** (``relay``), hands the event log to a
sender process that runs these same parts on its own GIL: logging calls then only write the log,
and the waits here ask the sender (see ``relay`` and ``sender_process``).

Where new events go (SENDING, SPOOLING, BLOCKED) is one explicit mode (``state.Mode``). The state
is built by one factory (``state.fresh_state``) that the constructor and the after-fork path both
call, so a forked child starts with nothing of its parent's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from .._exceptions import AuthenticationError, TrackingError
from .._settings import EngineConfig, event_log_max_bytes, sender_setting
from .._stores.event_log import OFFLINE, EventLog, LogTail
from .._stores.offline import JournalBackend
from .._stores.rest import RestBackend
from .._wire.batching import Batch, Event, pack
from .._wire.run_end import RunEnd
from .buffer import Buffer, now_ms
from .relay import Relay, SenderGone
from .sending import Sender
from .spilling import Spiller
from .spool import Spool
from .state import Backend, Mode, Signals, State, fresh_state
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
        #: The sender process's side here (``TRACKLANE_SENDER=process``), once it is started.
        self.relay: Relay | None = None
        #: The sender finishing what the log holds, after the log stopped following the events.
        self._retiring: asyncio.Task[None] | None = None
        #: Events a sender that is gone had accepted (its stats are folded into ours).
        self._sender_enqueued = 0
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
            self.relay = Relay(log, backend.config, config, spool.storage)
        self._build(spool)

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
        return int(self.relay.stats.get(name, 0)) if self.relay is not None else 0

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
        relay = self.relay
        if relay is not None:
            relay.on_gone = self._take_back
            relay.on_ready = self._hand_over
            if not relay.start(loop, getattr(self.backend, "workspace_id", None)):
                self.relay = None
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
        if self.relay is not None:  # the parent's sender is the parent's: the child sends its own
            self.relay.detach()
            self.relay = None
        self._retiring = None
        self._sender_enqueued = 0
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
        if not await self._wait_retired(deadline):
            return False
        if self.relay is not None and self.relay.handed_over:
            try:
                if not await self.relay.flush(deadline, run_id):
                    return False
            except SenderGone:
                self._take_back()
            except AuthenticationError as exc:
                self._blocked_by_sender(exc)
                raise
        flushed = await self._waiter.flush(deadline, run_id)
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
        relay = self.relay
        if relay is not None and relay.handed_over:  # the sender's records first, then ours and the end
            try:
                if not await relay.keep_events():
                    return False
            except SenderGone:
                self._take_back()
        return await self._waiter.keep_run_end(end)

    # -- the sender process ----------------------------------------------------------------------

    def _hand_over(self) -> None:
        """The sender is up: it takes the log from the next ordinal on, and logging calls write
        only the log from then (the worker here still delivers what came before)."""
        relay, buffer, log = self.relay, self.buffer, self.buffer.log
        if relay is None or log is None or self.state.closing:
            return
        with log.lock:
            if not log.taking:  # the log is off (a full disk): it cannot carry the events
                relay.abandon()
                self.relay = None
                return
            try:
                relay.hand_over(log.ordinal)
            except SenderGone:
                relay.abandon()
                self.relay = None
                return
            buffer.relay_notify = relay.wake
            buffer.relay_failed = self._retire_relay_threadsafe
            buffer.relay_wake_at = log.ordinal + buffer.batch_wake_at
            buffer.relayed = True

    def _take_back(self, relay: Relay | None = None, upto: int | None = None) -> None:
        """The sender process is gone: this process delivers its log itself from now on. Every
        record it had not acknowledged (below ordinal ``upto``, if given: what the sender was
        given) is read back from the log into the buffer, ahead of what is there (only events the
        log could not take, all later), so nothing it held is lost."""
        if relay is None:
            relay = self.relay
        if relay is self.relay:
            self.relay = None
        buffer, log = self.buffer, self.buffer.log
        if relay is None or log is None:
            return
        self._count_sender(relay, settled_only=True)
        if not relay.handed_over:
            return  # it never had the log: the worker here has every event
        with log.lock:
            start = relay.acked_to
            tail = LogTail(log.directory, log.token, start)
            items = tail.read((log.ordinal if upto is None else upto) - start)
            tail.close()
            events = [e for e in items if e is not None]
            # This process's own events still in memory are those logged before the hand-over.
            buffer.take_back(events, own_before=max(0, relay.sender_from - buffer.popped))
        logger.warning(
            "tracklane: the sender process exited; this process delivers its events itself from now "
            "on (%d taken back from the event log).",
            len(events),
        )
        if self.state.signals is not None:
            self.state.signals.wake.set()

    def _retire_relay(self) -> None:
        """The log cannot follow the events any more (``Buffer._relay_cannot_follow``): the sender
        stops, and this process takes back what it had not acknowledged, ahead of what came after
        (in memory already), and delivers all of it itself, in order; flushes wait for the switch
        (``_retiring``)."""
        relay = self.relay
        if relay is None or self.state.loop is None:
            return
        self.relay = None
        logger.warning(
            "tracklane: the event log cannot take more events here (see above); this process "
            "delivers them itself from now on, and the sender process finishes what the log holds."
        )

        async def retire() -> None:
            await relay.stop()
            self._take_back(relay, upto=self.buffer.relayed_until)

        self._retiring = self.state.loop.create_task(retire(), name="tracklane-retire-sender")

    def _retire_relay_threadsafe(self) -> None:
        loop = self.state.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._retire_relay)

    async def _wait_retired(self, deadline: float | None) -> bool:
        task = self._retiring
        if task is None:
            return True
        await asyncio.wait({task}, timeout=_remaining(deadline, 3600.0))
        if task.done():
            self._retiring = None
            return True
        return False

    def _count_sender(self, relay: Relay, settled_only: bool = False) -> None:
        """A sender that is gone: its counters join this engine's own, so stats() keeps them.
        ``settled_only``: it died, and what it had not settled is taken back (and counted) here."""
        st, theirs = self.state, relay.stats
        counts = {k: int(theirs.get(k, 0)) for k in ("delivered", "spilled", "rejected", "enqueued")}
        st.delivered += counts["delivered"]
        st.spilled += counts["spilled"]
        st.rejected_total += counts["rejected"]
        settled = counts["delivered"] + counts["spilled"] + counts["rejected"]
        self._sender_enqueued += settled if settled_only else counts["enqueued"]

    def _blocked_by_sender(self, exc: AuthenticationError) -> None:
        """The sender met refused credentials (and said so): this process stops sending too."""
        st = self.state
        if st.blocked is None:
            st.blocked = exc
            st.mode = Mode.BLOCKED

    def undelivered(self, run_id: str) -> int:
        """Events of run ``run_id`` neither on the server nor in the journal (held in memory)."""
        mine = sum(1 for e in self.leftovers() if e[1] == run_id)
        return mine + (self._unacknowledged() if self.relay is not None else 0)

    def _unacknowledged(self) -> int:
        """Records of the log the sender process has not acknowledged (any run's)."""
        log, relay = self.buffer.log, self.relay
        if log is None or relay is None or not relay.handed_over:
            return 0
        return max(0, log.ordinal - relay.acked_to)

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
        if self.relay is not None:
            self.relay.give_up()
        self._waiter.give_up()

    def artifact_kept(self) -> None:
        """Any thread: an artifact's row is in the journal; start the uploader if it is idle."""
        self._uploader.kick_threadsafe()

    def resume_leftovers(self) -> None:
        """Look (again) for what earlier processes left for this destination, and deliver it in the
        background; called at start, and when the destination changes (an OICM workspace)."""
        if self.relay is not None:
            self.relay.set_workspace(getattr(self.backend, "workspace_id", None))
        self._uploader.resume_leftovers()

    async def journal_notice(self, when: str) -> None:
        """Log what the server has not got of this engine's runs, where it is kept, and the command
        that delivers it (nothing when everything is delivered)."""
        if self.spool is not None:
            await self.spool.notice(when)

    def pending(self) -> int:
        """Events accepted but not yet settled: in the buffer, or taken by the worker."""
        relayed = self._unacknowledged() if self.relay is not None else 0
        return len(self.buffer) + self.state.taken() + relayed

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
            "enqueued": self.buffer.taken + buffered + self._sender_enqueued,
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
        if self.relay is None:
            return own
        if not self.relay.handed_over:
            return {**own, "sender_process": 0.0}
        # The sender's counters as of its last reply, and the records it has not read yet (in the
        # log: this process's buffer, as far as a caller can tell).
        theirs = self.relay.stats
        log = self.buffer.log
        unread = max(0, (log.ordinal if log is not None else 0) - int(theirs.get("read", 0)))
        out = {k: v + theirs.get(k, 0) for k, v in own.items() if k != "oldest_undelivered_age_s"}
        out["enqueued"] += unread
        out["buffer_depth"] += unread
        out["sender_process"] = 1.0  # a sender process has the log (TRACKLANE_SENDER=process)
        out["oldest_undelivered_age_s"] = max(
            own["oldest_undelivered_age_s"], theirs.get("oldest_undelivered_age_s", 0.0)
        )
        return out

    # -- shutdown --------------------------------------------------------------------------------

    async def shutdown(self, deadline: float | None) -> int:
        """Deliver what is left (by progress, never past ``deadline``), then keep the rest in the
        journal, stop the tasks and close I/O. Returns how many events could be neither delivered
        nor kept (0 normally)."""
        st = self.state
        st.closing = True
        done = False
        with contextlib.suppress(TrackingError):  # the run model has reported these already
            done = await self.flush(deadline)
        relay = self.relay
        if relay is not None and not relay.handed_over:  # still starting: it holds nothing
            relay.abandon()
            self.relay = None
            relay = None
        if relay is not None:  # the sender delivers or keeps the rest, then exits
            relay_lost = await relay.close(deadline)
            if relay_lost is None:  # it was gone: this process sends what it had not acknowledged
                self._take_back(relay)
                with contextlib.suppress(TrackingError):
                    done = await self.flush(deadline)
            else:
                self.relay = None
                self._count_sender(relay)
                st.lost += relay_lost
        with contextlib.suppress(TrackingError):
            if done and st.resumes:  # a look for earlier leftovers may still be starting the uploader
                await asyncio.wait(st.resumes, timeout=_remaining(deadline, 10.0))
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
        if st.blocked is None:  # blocked: the error already gave the command
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
        if self.relay is not None and self.relay.alive and self.relay.handed_over:
            # The sender outlives this process: it reads the log to its end and delivers or keeps
            # it (its lock keeps recovery off the files meanwhile); the files are its to remove.
            self.buffer.log_left_to_sender()
        events = self.leftovers()
        lost = self.backend.keep_now(events, ends)
        if lost is None:
            lost = self.spool.keep_now(events, ends) if self.spool is not None else len(events)
        if lost == 0:
            self.state.spilled += len(events)
            self._clear_leftovers()
        self.buffer.close_log(lost)
        return lost


def _remaining(deadline: float | None, cap: float) -> float:
    return cap if deadline is None else max(0.0, min(cap, deadline - time.monotonic()))
