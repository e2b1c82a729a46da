"""The relaying part: the engine's side of a sender process (``TRACKLANE_SENDER=process``).

It owns the ``Relay`` (the pipes to the sender) and decides, in one place, who delivers the event
log: this process's worker until the sender is up, the sender from the hand-over on, and this
process again once the sender is gone or the log cannot follow the events. The waits it adds to
the engine's (a flush, a run's events kept for later, the close) each ask the sender and wake on
its reply, never on a poll.

The switches, and what each keeps:

- **hand-over** (the sender says it is ready): under the log's lock, the sender takes every
  ordinal from the next on; the worker keeps delivering what came before. A short script that is
  done before the sender is up never waits for it: the sender is ended, holding nothing.
- **take back** (the sender died, or was gone at the close): every record it had not
  acknowledged is read back from the log into memory, behind this process's own older events and
  ahead of newer ones, and the worker delivers them.
- **retire** (a record the log could not take: a full disk, the disk bound): the sender stops at
  once and what it had not acknowledged is taken back, so nothing is delivered out of order with
  the events that from then on are only in memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from .._exceptions import AuthenticationError
from .._stores.event_log import EventLog, LogTail
from .buffer import Buffer, now_ms
from .relay import Relay, SenderGone
from .state import Mode, State, time_left_at_most

logger = logging.getLogger("tracklane")

_COUNTED = ("delivered", "spilled", "rejected", "enqueued")
#: Write marks kept for the age of the sender's oldest unread record; more are thinned out.
_MARKS = 1024


class Relaying:
    """Who delivers the log, and the waits on the sender process. See the module docstring."""

    def __init__(
        self, state: State, buffer: Buffer, log: EventLog, relay: Relay, kick_uploader: Callable[[], None]
    ) -> None:
        self.state = state
        self.buffer = buffer
        self.log = log
        self.relay: Relay | None = relay
        self.kick_uploader = kick_uploader
        #: The sender stopping and its records being taken back, after the log stopped following.
        self.retiring: asyncio.Task[None] | None = None
        #: Events a sender that is gone had accepted (its counts are folded into the engine's).
        self.gone_enqueued = 0
        #: (ordinal, wall ms): records from that ordinal on were written at or after that time.
        #: One per wake-up of the sender (a batch of records), so stats() can tell how old the
        #: records are that the sender has not read (an outage it waits out: they wait in the log).
        self.marks: deque[tuple[int, int]] = deque()

    def start(self, loop: asyncio.AbstractEventLoop, workspace_id: str | None) -> None:
        """Start the sender process (the worker's first events); not if it is ended already."""
        relay = self.relay
        if relay is None or self.state.closing:
            return
        relay.on_gone = self.take_back
        relay.on_ready = self.hand_over
        if not relay.start(loop, workspace_id):
            self.relay = None

    @property
    def active(self) -> bool:
        """The sender process has the log (the hand-over happened and it is not gone)."""
        return self.relay is not None and self.relay.handed_over and not self.relay.forked

    # -- the switches ----------------------------------------------------------------------------

    def hand_over(self) -> None:
        """The sender is up: it takes the log from the next ordinal on, and logging calls write
        only the log from then (the worker here still delivers what came before)."""
        relay, buffer, log = self.relay, self.buffer, self.log
        if relay is None or self.state.closing:
            return
        with log.lock:
            if not log.taking:  # the log is off (a full disk): it cannot carry the events
                self._abandon()
                return
            try:
                relay.hand_over(log.ordinal)
            except SenderGone:
                self._abandon()
                return
            self.marks.append((log.ordinal, now_ms()))
            buffer.relay_notify = self._notify
            buffer.relay_failed = self._retire_threadsafe
            buffer.relay_wake_at = log.ordinal + buffer.batch_wake_at
            buffer.relayed = True
            log.on_acked = self._settled
            self.state.on_all_delivered = self._may_go
            self._may_go()

    def _notify(self) -> None:
        """A logging call (holding the log's lock): a batch of records is written; wake the
        sender, and mark when."""
        marks = self.marks
        if len(marks) >= _MARKS:  # (a long outage: half the precision, the same span)
            marks = self.marks = deque(list(marks)[::2])
        marks.append((self.log.ordinal, now_ms()))
        relay = self.relay
        if relay is not None:
            relay.wake()

    def _unread_since(self, read: int) -> int | None:
        """When the oldest record the sender has not read (ordinal ``read``) was written, at the
        earliest (wall ms); None if no mark covers it."""
        marks = self.marks
        while len(marks) >= 2 and marks[1][0] <= read:
            marks.popleft()
        return marks[0][1] if marks and marks[0][0] <= read else None

    def _settled(self, acked: int) -> None:
        self._may_go()

    def _may_go(self) -> None:
        """The sender sends only once everything logged before the hand-over is delivered here
        (acknowledged, and none of it left in the journal): no newer event overtakes an older
        one, a tag's last value stays last, and the journal's rows are this process's to count."""
        relay, st = self.relay, self.state
        if relay is None or not relay.handed_over or relay.went:
            return
        if self.log.acked >= relay.sender_from and st.mode is Mode.SENDING and st.spilled == 0:
            self.log.on_acked = None
            st.on_all_delivered = None
            relay.go()

    def _abandon(self) -> None:
        if self.relay is not None:
            self.relay.abandon()
            self.relay = None

    def take_back(self, relay: Relay | None = None, upto: int | None = None) -> None:
        """The sender process is gone: this process delivers its log itself from now on. Every
        record it had not acknowledged (below ordinal ``upto``, if given: what it was given) is
        read back from the log into memory, behind this process's own older events and ahead of
        the rest, so nothing it held is lost."""
        if relay is None:
            relay = self.relay
        if relay is self.relay:
            self.relay = None
        if relay is None or not relay.handed_over or relay.forked:
            # It never had the log (the worker has it all), or it is a forked child's copy of
            # the parent's: what the sender holds is the parent's to deliver, not this child's.
            self._release()
            return
        self._fold_counts(relay, settled_only=True)
        log, buffer = self.log, self.buffer
        buffer.held = True  # until ``_behind_the_journal``: nothing newer leaves first
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
        loop = self.state.loop
        if loop is not None and not loop.is_closed():
            loop.create_task(self._behind_the_journal(), name="tracklane-took-back")
        else:
            self._release()

    async def _behind_the_journal(self) -> None:
        """After a take back: if the journal holds rows for this server (the sender's, from an
        outage), what memory holds queues behind them there, as in-process; then the worker goes."""
        st = self.state
        try:
            spool = st.spool
            if spool is not None and await spool.pending(None):
                st.start_spooling()
                self.kick_uploader()
        finally:
            self._release()

    def _release(self) -> None:
        """The worker may take again (a take back is done, or there was nothing to take back)."""
        if self.buffer.held:
            self.buffer.held = False
            if self.state.signals is not None:
                self.state.signals.wake.set()

    def _retire(self) -> None:
        relay = self.relay
        loop = self.state.loop
        if relay is None or loop is None:  # it is gone already (and taken back, or never had it)
            self._release()
            return
        self.relay = None
        logger.warning(
            "tracklane: the event log cannot take more events here (see above); this process "
            "delivers them itself from now on, and takes back from the sender process what it has "
            "not delivered yet."
        )

        async def retire() -> None:
            try:
                await relay.stop()
                self.take_back(relay, upto=self.buffer.relayed_until)
            except BaseException:
                self._release()  # never leave the worker held
                raise

        self.retiring = loop.create_task(retire(), name="tracklane-retire-sender")

    def _retire_threadsafe(self) -> None:
        """Any thread (a logging call, holding the log's lock): the log cannot follow."""
        loop = self.state.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._retire)

    def _fold_counts(self, relay: Relay, settled_only: bool = False) -> None:
        """A sender that is gone: its counters join the engine's own, so stats() keeps them.
        ``settled_only``: it died, and what it had not settled is taken back (and counted) here."""
        st = self.state
        counts = {k: int(relay.stats.get(k, 0)) for k in _COUNTED}
        st.delivered += counts["delivered"]
        st.spilled += counts["spilled"]
        st.rejected_total += counts["rejected"]
        settled = counts["delivered"] + counts["spilled"] + counts["rejected"]
        self.gone_enqueued += settled if settled_only else counts["enqueued"]

    # -- the waits -------------------------------------------------------------------------------

    async def retired(self, deadline: float | None) -> bool:
        """A retire under way (``_retire``) is done: its records are in memory here. False at
        ``deadline``."""
        task = self.retiring
        if task is not None:
            await asyncio.wait({task}, timeout=time_left_at_most(deadline, 3600.0))
            if not task.done():
                return False
            self.retiring = None
        return True

    async def flush(self, deadline: float | None, run_id: str | None) -> bool | None:
        """The sender's part of ``Engine.flush``: True once every record it has, logged before
        the call, has its outcome (or there is no sender); None if it was gone (its records are
        the worker's now: flush again); raises what it met, as the engine's."""
        if not self.active:
            return True
        assert self.relay is not None
        try:
            return await self.relay.flush(deadline, run_id)
        except SenderGone:
            self.take_back()
            return None
        except AuthenticationError as exc:
            st = self.state  # the sender said it, at ERROR: this process stops sending too
            if st.blocked is None:
                st.blocked, st.mode = exc, Mode.BLOCKED
            raise

    async def keep_events(self) -> bool:
        """After giving up on the server: the sender's records go to the journal first (then the
        engine keeps its own and the run's end). False if its journal cannot be written."""
        if not self.active:
            return True
        assert self.relay is not None
        try:
            return await self.relay.keep_events()
        except SenderGone:
            self.take_back()
            return True

    async def close(self, deadline: float | None) -> int:
        """At shutdown: the sender delivers or keeps the rest and exits (one still starting is
        ended: it holds nothing); the events it lost. One gone already is taken back."""
        relay = self.relay
        if relay is None:
            return 0
        if not relay.handed_over:
            self._abandon()
            return 0
        closed = await relay.close(deadline)
        if closed is None:  # it was gone: this process sends what it had not acknowledged
            self.take_back(relay)
            return 0
        lost, journal_runs = closed
        self.relay = None
        self._fold_counts(relay)
        # Records it never settled (it could not read them: a damaged record stops its reading)
        # are not delivered: counted as such, so the log's files stay for recovery.
        lost = max(lost, self.log.ordinal - relay.acked_to)
        spool = self.state.spool
        if spool is not None and journal_runs:  # the engine's notice says what the journal keeps, once
            spool.runs.update(journal_runs)
            await spool.open(create=False)  # (the sender may be the one that made it)
        return lost

    def leave_to_sender(self) -> bool:
        """Interpreter exit with no loop: the sender outlives this process and delivers the log
        (its lock keeps recovery off the files meanwhile). True if there is one to leave it to."""
        if self.relay is None or not self.relay.alive or not self.relay.handed_over:
            return False
        self.buffer.log_left_to_sender()
        return True

    # -- what the engine reports -----------------------------------------------------------------

    def unacknowledged(self) -> int:
        """Records of the log the sender process has not acknowledged (any run's)."""
        if not self.active:
            return 0
        assert self.relay is not None
        return max(0, self.log.ordinal - self.relay.acked_to)

    def count(self, name: str) -> int:
        return int(self.relay.stats.get(name, 0)) if self.relay is not None else 0

    def stats(self, own: dict[str, float]) -> dict[str, float]:
        """The engine's counters with the sender's (as of its last reply), and the records it has
        not read yet (in the log: the buffer, as far as a caller can tell)."""
        own = {**own, "enqueued": own["enqueued"] + self.gone_enqueued}
        if not self.active:
            return {**own, "sender_process": 0.0}
        assert self.relay is not None
        theirs = self.relay.stats
        unread = max(0, self.log.ordinal - int(theirs.get("read", 0)))
        out = {k: v + theirs.get(k, 0) for k, v in own.items() if k != "oldest_undelivered_age_s"}
        out["enqueued"] += unread
        out["buffer_depth"] += unread
        out["sender_process"] = 1.0
        ages = [own["oldest_undelivered_age_s"], theirs.get("oldest_undelivered_age_s", 0.0)]
        since = self._unread_since(self.log.ordinal - unread) if unread else None
        if since is not None:
            ages.append(max(0.0, (now_ms() - since) / 1000))
        out["oldest_undelivered_age_s"] = max(ages)
        return out

    def give_up(self) -> None:
        if self.relay is not None:
            self.relay.give_up()

    def set_workspace(self, workspace_id: str | None) -> None:
        if self.relay is not None:
            self.relay.set_workspace(workspace_id)

    def detach(self) -> None:
        """In a forked child: the parent's sender is the parent's; the child sends its own."""
        if self.relay is not None:
            self.relay.detach()
            self.relay = None
