"""The taker: moves events from the buffer into the hand (packed log-batch requests for the sender),
or, while spooling or once the producer outruns the server, into the journal at disk speed, so
callers never wait on the server.

It takes full requests (``take_size`` events) whenever they are there, and a partial one only
when something waits for it: a flush marker (``flush``, ``end_run``, exit), the engine closing,
or ``flush_interval`` seconds since the last partial take. Why: the sender wakes the taker after
each request it sends, and taking whatever had arrived meanwhile made a request per round trip
(~70 events at 2,000 events/s), each paying the whole request's CPU (encoding, aiohttp, the loop)
on the training process's GIL. Waiting for a full request or the interval cuts the requests, and
the worker's CPU, by the batch's factor; an event still waits at most ``flush_interval`` for its
request to start, as it did when the stream was slow.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .._wire.batching import Batch, Event, pack
from .buffer import Buffer
from .spilling import Spiller
from .state import State, wait_event

logger = logging.getLogger("tracklane")


class Taker:
    """One task: buffer to hand, or to the journal."""

    def __init__(self, state: State, buffer: Buffer, spiller: Spiller) -> None:
        self.state = state
        self.buffer = buffer
        self.spiller = spiller
        #: When a partial request may next be taken (monotonic): ``flush_interval`` after the last.
        self.partial_at = 0.0

    async def run(self) -> None:
        st = self.state
        assert st.signals is not None
        wake = st.signals.wake
        try:
            while True:
                wait = self.partial_at - time.monotonic()
                if wait > 0:
                    await wait_event(wake, wait)
                wake.clear()
                try:
                    await self.take()
                except Exception:  # never let the taker die: it is the only way events leave
                    logger.exception("tracklane: unexpected error in the worker; continuing")
        except asyncio.CancelledError:
            if not st.closing:  # cancelled by the loop's shutdown, not by shutdown()
                logger.warning(
                    "tracklane: the event loop stopped with a tracking client still open; %d event(s) "
                    "were not delivered and are kept for the next client at exit. Use `async with "
                    "AsyncTrackingClient(...)` or `await tc.aclose()`.",
                    len(self.buffer) + st.taken(),
                )
            raise

    async def take(self) -> None:
        st, buffer = self.state, self.buffer
        if buffer.held:  # a sender's records are being taken back, to go first (``relaying``)
            return
        # A partial request may go now if the interval has passed since the last take. Once a
        # take has taken anything, what is left arrived after it (the buffer is in order), so
        # the interval starts again; and a partial remainder behind a full request is that fresh.
        partial = time.monotonic() >= self.partial_at
        if partial:  # the interval starts again, whether or not anything is waiting
            self.partial_at = time.monotonic() + st.config.flush_interval
        while True:
            if len(buffer) < st.take_size and not buffer.markers and not st.closing and not partial:
                return  # a partial request waits for a flush or the interval (module docstring)
            to_journal = st.spooling and st.may_spool("failure")
            if not to_journal and st.hand_events >= st.hand_limit:
                # The sender has all it can use. Leave the rest in the buffer while it has room;
                # once it is half full the producer outruns the server: spool.
                if st.spooling or len(buffer) < st.spill_at or not st.may_spool("overflow"):
                    buffer.wake_at = st.spill_at
                    return
                st.start_spooling()
                to_journal = True
            buffer.wake_at = buffer.batch_wake_at
            if st.on_first_events is not None and len(buffer):
                self._first_events()  # (before the take: a chunk in hand is never at risk)
            events, marker = buffer.take(st.take_size)
            if not events and marker is None:
                return
            self.partial_at = time.monotonic() + st.config.flush_interval
            partial = False
            batches = list(pack(events, time.time_ns()))
            self._ticket(batches, events)
            if to_journal:
                placed = False  # from ``write`` on, every batch is in the journal or the hand
                try:
                    async with st.journal_order:
                        # Older events still in the hand go first; if they cannot, neither can these.
                        if await self.spiller.hand_to_journal_in_order():
                            placed = True
                            kept = await self.spiller.write(batches)
                except asyncio.CancelledError:
                    # Shutdown: what this chunk holds must be where ``leftovers`` looks.
                    self._to_hand([] if placed else batches)
                    if marker is not None:
                        st.hand.append(marker)
                    raise
                if placed and kept == len(batches):
                    if marker is not None:
                        await self.spiller.marker_to_journal(marker)
                    continue
                # The journal just broke: the rest waits in memory (``write`` put what it did not
                # take in the hand), and is sent only once the uploader has delivered what the
                # journal holds (the mode stays SPOOLING till then).
                batches = [] if placed else batches
            self._to_hand(batches)
            if marker is not None:
                st.hand.append(marker)
                st.signal_hand()

    def _first_events(self) -> None:
        """Events to deliver for the first time: tell ``State.on_first_events`` (once)."""
        first, self.state.on_first_events = self.state.on_first_events, None
        if first is None:
            return
        try:
            first()
        except Exception:  # (the sender process): the worker here delivers, as it does anyway
            logger.exception(
                "tracklane: cannot start the sender process; this process delivers its events itself"
            )

    def _ticket(self, batches: list[Batch], events: list[Event]) -> None:
        """Each request of this chunk settles its share of the event log's record range; the
        range is acknowledged once they all have (a tag set twice in the chunk is one entry)."""
        log = self.buffer.log
        if log is None or not events or self.buffer.unticketed:
            return  # (unticketed: what memory holds is no longer in ordinal order: see Buffer)
        start, end = self.buffer.last_take
        settled = log.ticket(start, end, len(batches))
        if settled is None or not batches:
            log.done(start, end)
            return
        for batch in batches:
            batch.settled = settled

    def _to_hand(self, batches: list[Batch]) -> None:
        st = self.state
        for batch in batches:
            st.hand.append(batch)
            st.hand_events += len(batch)
        if batches:
            st.signal_hand()
