"""The sender: sends the hand's requests in order, ``max_in_flight`` at a time (a request with
params or tags alone, so a tag's last value arrives last), by the outcome rule. A request the
server cannot take in the retry window, or refuses the key for, goes to the journal with everything
behind it (the mode turns SPOOLING, or BLOCKED).

Requests already sent are never cancelled to make room: the server may have applied them, and a
duplicate costs it a reload of the keys' history (mlflow#24577).
"""

from __future__ import annotations

import asyncio
import logging

from .._exceptions import AuthenticationError, ServerUnavailableError
from .._wire.batching import Batch, settle
from .._wire.outcome import deliver
from .spilling import Spiller
from .state import Backend, State, resolve, wait_event

logger = logging.getLogger("tracklane")

#: Longest pause before a batch kept in memory (no journal) is sent again.
RESEND_PAUSE_CAP = 5.0


class Sender:
    """One task: hand to server, through the outcome rule."""

    def __init__(self, state: State, backend: Backend, spiller: Spiller) -> None:
        self.state = state
        self.backend = backend
        self.spiller = spiller

    async def run(self) -> None:
        st = self.state
        assert st.signals is not None
        hand_ready = st.signals.hand_ready
        hand = st.hand
        while True:
            if not hand:
                hand_ready.clear()
                await hand_ready.wait()
                continue
            if st.spooling:
                async with st.journal_order:
                    moved = await self.spiller.hand_to_journal_in_order()
                if moved:
                    continue
                # The journal cannot take the hand: it waits until the uploader has delivered the
                # journal's rows (they are older), then goes from memory. Blocked: it just waits.
                # The uploader's ``all_delivered`` (spooling over) and new work signal ``hand_ready``.
                hand_ready.clear()
                st.signals.hand_moved.set()
                await hand_ready.wait()
                continue
            item = hand[0]
            if isinstance(item, asyncio.Future):
                if st.inflight:
                    await st.settle()
                    continue
                hand.popleft()
                resolve(item)
                continue
            if item.has_text and st.inflight:
                await st.settle()  # a tag's last value must arrive last
                continue
            if len(st.inflight) >= st.config.max_in_flight:
                await asyncio.wait(set(st.inflight), return_when=asyncio.FIRST_COMPLETED)
                continue
            hand.popleft()
            st.hand_events -= len(item)
            task = asyncio.get_running_loop().create_task(self._deliver(item))
            st.inflight[task] = item
            task.add_done_callback(self._forget)
            st.wake_taker()
            if item.has_text:
                await st.settle()

    def _forget(self, task: asyncio.Task[None]) -> None:
        self.state.inflight.pop(task, None)

    async def _deliver(self, batch: Batch) -> None:
        """One request's life: delivered, refused in part (reported), or kept for later."""
        st = self.state
        task = asyncio.current_task()
        assert task is not None

        def landed() -> None:
            # Out of flight before it is acknowledged: the acknowledgement's counters (which a
            # sender process reports to its parent) must not still count it in flight.
            st.inflight.pop(task, None)

        try:
            await deliver(batch, self.backend, st.sent, st.reject)
            landed()
            settle([batch])
            return
        except AuthenticationError as exc:
            st.block(exc)
            why = str(exc)
        except ServerUnavailableError as exc:
            why = str(exc)
        except asyncio.CancelledError:
            st.orphans.append(batch)  # shutdown keeps it
            raise
        except Exception as exc:  # a bug must not lose events: keep the batch as if the server were down
            logger.exception("tracklane: unexpected error while delivering a batch; keeping it")
            why = f"{type(exc).__name__}: {exc}"
        st.outage = True
        if st.may_spool("failure"):
            st.start_spooling()
            try:
                kept = await self.spiller.write([batch], leaving=landed)
            except asyncio.CancelledError:
                return  # the write finished: the batch is in the journal, or back in the hand
            if kept == 1:
                st.warn_once(
                    "outage",
                    "tracklane: %s Keeping events in the local journal %s and delivering them from there.",
                    why,
                    st.spool.path if st.spool is not None else "",
                )
                st.signal_hand()  # the sender moves the hand behind it
                return
            # The journal broke: the batch is back at the front of the hand, sent once the
            # uploader has delivered what the journal holds.
            st.warn_once("outage", "tracklane: %s Retrying; events stay in memory.", why)
            st.signal_hand()
            return
        # No journal: keep it in memory, at the front, and try again after a pause, cut short by a
        # flush that begins meanwhile (end_run right after the server is back must see it back).
        st.warn_once("outage", "tracklane: %s Retrying; events stay in memory.", why)
        try:
            assert st.signals is not None
            await wait_event(st.signals.flush_began, min(RESEND_PAUSE_CAP, st.config.retry_window))
            st.signals.flush_began.clear()
        except asyncio.CancelledError:
            st.orphans.append(batch)
            raise
        st.hand.appendleft(batch)
        st.hand_events += len(batch)
        st.signal_hand()
