"""Moving the worker's requests into the journal, in logging order: shared by the taker (new chunks
while spooling) and the sender (the hand, once a request failed or delivery stopped).

Every batch is always in exactly one place ``Engine.leftovers`` looks (the hand, or the journal):
a journal write that has started finishes even if its caller is cancelled, and what the journal
does not take goes back to the front of the hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .._wire.batching import Batch, settle
from .state import Marker, State, resolve


class Spiller:
    """Writes the hand and new chunks to the journal, behind what is there."""

    def __init__(self, state: State, kick_uploader: Callable[[], None]) -> None:
        self.state = state
        self._kick_uploader = kick_uploader

    async def hand_to_journal_in_order(self) -> bool:
        """While spooling: the hand joins the journal, in order, behind what is there. False if the
        journal cannot take (all of) it; what it did not take stays at the front of the hand.

        Callers hold ``state.journal_order``: the taker and the sender both write to the journal,
        and the hand is older than any chunk the taker has not written yet."""
        st = self.state
        if not st.may_spool("failure"):
            return False
        batches: list[Batch] = []
        while st.hand:
            item = st.hand[0]
            if isinstance(item, asyncio.Future):
                if not await self._hand_batches_to_journal(batches):
                    return False
                batches = []
                st.hand.popleft()
                await self.marker_to_journal(item)
            else:
                batches.append(item)
                st.hand.popleft()
        ok = await self._hand_batches_to_journal(batches)
        st.wake_taker()
        if st.signals is not None:
            st.signals.hand_moved.set()
        return ok

    async def _hand_batches_to_journal(self, batches: list[Batch]) -> bool:
        """Journal ``batches`` just taken off the hand's front (those it does not take go back)."""
        if not batches:
            return True
        self.state.hand_events -= sum(len(b) for b in batches)
        return await self.write(batches) == len(batches)

    async def write(self, batches: list[Batch], leaving: Callable[[], None] | None = None) -> int:
        """Write ``batches`` to the journal; how many (the first ones) it took. Those it did not
        take (the journal broke) go to the front of the hand, so every batch is always somewhere
        ``leftovers`` looks. Cancelling the caller (shutdown) lets the write finish first: the
        batches are in no other place meanwhile. ``leaving``: called once the write is done, just
        before the batches are counted where they are now (an in-flight request leaves the
        in-flight count then, so no counter sees it in two places)."""
        spool = self.state.spool
        assert spool is not None
        write = asyncio.ensure_future(spool.write(batches, self.state.reject))
        try:
            kept = await asyncio.shield(write)
        except asyncio.CancelledError:
            self._placed(batches, await write, leaving)
            raise
        self._placed(batches, kept, leaving)
        return kept

    def _placed(self, batches: list[Batch], kept: int, leaving: Callable[[], None] | None) -> None:
        st = self.state
        if leaving is not None:
            leaving()
        st.spilled += sum(len(b) for b in batches[:kept])
        settle(batches[:kept])  # in the journal: the event log need not keep them
        if kept or (st.spool is not None and st.spool.broken):
            # Broken on this write: the uploader finds nothing to deliver and turns the engine
            # back to sending from memory (else it would wait in SPOOLING for an uploader that
            # nothing starts, when no look for leftovers opened the journal first).
            self._kick_uploader()
        if kept < len(batches):
            st.hand.extendleft(reversed(batches[kept:]))
            st.hand_events += sum(len(b) for b in batches[kept:])

    async def marker_to_journal(self, marker: Marker) -> None:
        """A flush marker behind events now in the journal: done once the uploader has delivered
        the journal up to here (or at once, if delivery is stopped: flush then raises why)."""
        st = self.state
        assert st.spool is not None
        if st.blocked is not None:
            resolve(marker)
            return
        st.waiters.append((marker, await st.spool.high_water()))
        self._kick_uploader()
