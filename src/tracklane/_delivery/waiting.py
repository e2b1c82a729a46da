"""Waiting: flushes, a run's artifacts, a run's end kept for later, and the uploader at shutdown.

Waiting is by progress, not by a clock: a wait goes on while the server keeps taking events, and
gives up only after ``retry_window`` seconds with none taken, at its deadline, or when told to
(Ctrl-C at exit). No wait polls: each sleeps until what it waits for happens, or until the moment
its window could end (recomputed on waking, as progress moves it on).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .._exceptions import DeliveryError
from .._wire.batching import Batch
from .._wire.run_end import RunEnd
from .buffer import Buffer
from .state import Marker, State, wait_event
from .uploading import PEER_LOOK_CAP, PEER_LOOK_FIRST, JournalUploader

#: The longest ``keep_events`` waits for the sender to move the hand into the journal.
HAND_TO_JOURNAL_WAIT = 5.0


class Waiter:
    """The waits callers make on the engine, each woken by the event it waits for."""

    def __init__(self, state: State, buffer: Buffer, uploader: JournalUploader) -> None:
        self.state = state
        self.buffer = buffer
        self.uploader = uploader

    async def flush(self, deadline: float | None = None, run_id: str | None = None) -> bool:
        """Wait until every event logged before the call is on the server (or refused): True.

        Waits while the server keeps taking events; False once ``retry_window`` seconds pass with
        none taken, at the monotonic ``deadline``, or when told to give up (Ctrl-C at exit). Raises
        DeliveryError for refused events (only ``run_id``'s, if given: a run's end reports its own)
        and AuthenticationError once delivery has stopped.
        """
        signals = self.state.signals
        assert signals is not None
        marker: Marker = asyncio.get_running_loop().create_future()
        self.buffer.put_marker(marker)
        signals.wake.set()
        signals.retry_now.set()
        signals.flush_began.set()
        if not await self.by_progress({marker}, time.monotonic(), deadline):
            return False
        self.raise_problems(run_id)
        return True

    async def by_progress(
        self, waiting: set[asyncio.Future[Any]], started: float, deadline: float | None
    ) -> bool:
        """Wait until one of ``waiting`` is done: True. False at the monotonic ``deadline``, when
        told to give up, or once ``retry_window`` seconds pass with nothing taken by the server."""
        st = self.state
        assert st.signals is not None
        giving_up: asyncio.Future[Any] = asyncio.ensure_future(st.signals.giving_up.wait())
        try:
            while not any(f.done() for f in waiting):
                if giving_up.done():
                    return False
                ends = self._progress_since(started) + st.config.retry_window
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
        return max(self.state.last_progress, started)

    def raise_problems(self, run_id: str | None = None) -> None:
        """Raise what the caller must hear: delivery stopped, or events the server refused (of
        ``run_id`` only, if given; the others wait for their own run's end or a plain flush)."""
        st = self.state
        if st.blocked is not None:
            raise st.blocked
        if run_id is None:
            rejected, st.rejected = st.rejected, []
        else:
            rejected = [e for e in st.rejected if e.run_id == run_id]
            st.rejected = [e for e in st.rejected if e.run_id != run_id]
        if rejected:
            raise DeliveryError(rejected)

    async def artifacts(self, run_id: str, deadline: float | None = None) -> bool:
        """Wait until the run's artifacts are uploaded (or refused): True. Like ``flush``: waits while
        the uploader makes progress, False at ``deadline`` or after ``retry_window`` without any (they
        stay in the journal). Raises DeliveryError for the run's refused artifacts."""
        st = self.state
        spool = st.spool
        if spool is None:
            return True  # offline: they stay in the journal with the run, for `tracklane sync`
        assert st.signals is not None
        journal_moved = st.signals.journal_moved
        started = time.monotonic()
        idle_rounds = 0
        while await spool.pending_artifacts(run_id):
            if st.blocked is not None:
                raise st.blocked
            if idle_rounds:
                # The uploader finished a round without moving this run's artifacts (a row it
                # sees only on its next round): go again after a growing pause, not in a spin.
                await asyncio.sleep(min(PEER_LOOK_CAP, PEER_LOOK_FIRST * 2 ** (idle_rounds - 1)))
            journal_moved.clear()
            self.uploader.kick()
            task = self.uploader.task
            moved: asyncio.Future[Any] = asyncio.ensure_future(journal_moved.wait())
            try:
                waiting: set[asyncio.Future[Any]] = {moved} if task is None else {moved, task}
                if not await self.by_progress(waiting, started, deadline):
                    return False
            finally:
                moved.cancel()
            idle_rounds = 0 if journal_moved.is_set() else idle_rounds + 1
        if st.blocked is not None:
            raise st.blocked
        self.raise_problems(run_id)
        return True

    async def record_end(self, end: RunEnd) -> bool:
        """A run's end, recorded in the journal behind its events (``keep_events`` put them there),
        for this engine's uploader or a later ``tracklane sync``. False if the journal cannot be
        written."""
        assert self.state.spool is not None
        return await self.state.spool.record_end(end)

    async def keep_events(self) -> bool:
        """After giving up on the server: every event held goes to the journal (a run's end is
        recorded after them). False if the journal cannot be written."""
        st = self.state
        if not st.may_spool("failure"):
            return False
        assert st.spool is not None
        st.start_spooling()
        st.signal_hand()
        # The sender moves the hand at disk speed (it signals each try); bounded regardless.
        ends = time.monotonic() + HAND_TO_JOURNAL_WAIT
        while any(isinstance(i, Batch) for i in st.hand) and not st.spool.broken:
            left = ends - time.monotonic()
            if left <= 0 or st.signals is None:
                break
            st.signals.hand_moved.clear()
            await wait_event(st.signals.hand_moved, left)
        return not st.spool.broken

    async def uploader_done(self, deadline: float | None) -> None:
        """At shutdown: let the uploader finish (leftovers of earlier processes too), by progress."""
        task = self.uploader.task
        if task is not None and not task.done():
            await self.by_progress({task}, time.monotonic(), deadline)

    def give_up(self) -> None:
        """Stop waiting for the server in a running flush or shutdown (Ctrl-C at exit). Loop thread only."""
        if self.state.signals is not None:
            self.state.signals.giving_up.set()
