"""The uploader: delivers the journal's rows for this server in order, at the server's pace
(``spool``), and switches the engine back to SENDING once they are all there. It also picks up what
earlier processes left in the same journal, and resolves the flushes waiting for journal rows.

One uploader at a time per journal and server, across processes (``UploadLock``): while another
process holds it, that process's progress is visible only in the journal file, so this one looks
again after a backoff (the only timer-driven wait of the engine; the in-process case never meets it).
"""

from __future__ import annotations

import asyncio
import logging
import time

from .._exceptions import AuthenticationError, ServerUnavailableError, TrackingError
from .._wire.batching import ARTIFACT, Event
from .._wire.outcome import backoff
from .spool import Spool
from .state import Backend, State, resolve, wait_event

logger = logging.getLogger("tracklane")

#: Longest pause between two attempts of the uploader on a server that does not answer.
UPLOAD_BACKOFF_CAP = 5.0
#: While another process holds the journal's upload lock: look again after a backoff from
#: ``PEER_LOOK_FIRST`` to ``PEER_LOOK_CAP`` seconds, cut short when a flush begins.
PEER_LOOK_FIRST = 0.02
PEER_LOOK_CAP = 1.0


class JournalUploader:
    """One task, started when the journal has rows for this server: journal to server."""

    def __init__(self, state: State, backend: Backend) -> None:
        self.state = state
        self.backend = backend

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self.state.uploader

    def kick(self) -> None:
        """Start the uploader if it is idle (loop thread)."""
        st = self.state
        if st.spool is None or st.blocked is not None or st.loop is None:
            return
        if st.uploader is None or st.uploader.done():
            st.uploader = st.loop.create_task(self._run(), name="tracklane-uploader")

    def kick_threadsafe(self) -> None:
        """Any thread: an artifact's row is in the journal; start the uploader if it is idle."""
        loop = self.state.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.kick)

    def resume_leftovers(self) -> None:
        """Look (again) for what earlier processes left for this destination, and deliver it in the
        background; called at start, and when the destination changes (an OICM workspace)."""
        st = self.state
        if st.spool is not None and st.loop is not None:
            task = st.loop.create_task(self._resume(st.spool), name="tracklane-resume")
            st.tasks.append(task)
            st.resumes.append(task)

    async def _resume(self, spool: Spool) -> None:
        """At start: deliver what earlier processes left in this storage's journal for this server
        (first moving into it the event logs of processes that died, e.g. killed with SIGKILL)."""
        await spool.recover_dead_logs()
        left = await spool.pending(None)  # a journal that cannot be opened: broken, logged, 0
        if left:
            logger.warning(
                "tracklane: resuming delivery of %d event(s) left in %s for %s by an earlier process.",
                left,
                spool.path,
                spool.api_host,
            )
            self.kick()

    async def _run(self) -> None:
        st = self.state
        spool = st.spool
        assert spool is not None
        attempt = 0
        others_left: int | None = None  # rows of ours left while another process uploads
        peer_looks = 0
        writes_seen = spool.writes
        while st.blocked is None:
            if st.spooling:
                # This engine's journal rows follow the requests already in flight.
                await st.settle()
            try:
                if not await spool.lock():
                    if others_left is None:
                        logger.info("tracklane: another process is uploading %s; waiting for it.", spool.path)
                    await self._pause_for_peer(peer_looks)
                    peer_looks += 1
                    # Its progress with this engine's rows is this engine's progress.
                    left = await spool.pending(spool.runs)
                    if others_left is not None and left < others_left:
                        st.last_progress = time.monotonic()
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
                    self.backend,
                    self._sent_from_journal,
                    self._refused_from_journal,
                    hi,
                    st.config.max_in_flight,
                )
                attempt = 0
                await self._check_waiters(hi)
                if moved == 0 and spool.writes == writes and not spool.writing:
                    spool.unlock()
                    self._all_delivered(spool)
                    return
            except AuthenticationError as exc:
                st.block(exc)
                spool.unlock()
                return
            except ServerUnavailableError:
                await self._pause(attempt)
                attempt += 1
            except (OSError, TrackingError) as exc:
                st.warn_once("upload", "tracklane: delivering from the journal failed: %s; retrying", exc)
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
        st = self.state
        assert st.signals is not None
        delay = backoff(attempt, base=0.25, cap=min(UPLOAD_BACKOFF_CAP, st.config.retry_window / 2))
        await wait_event(st.signals.retry_now, delay)
        st.signals.retry_now.clear()

    async def _pause_for_peer(self, looks: int) -> None:
        """Another process uploads this journal: look at its progress again after a backoff (its
        progress is in the file, and no event crosses processes), cut short by a flush beginning."""
        st = self.state
        assert st.signals is not None
        await wait_event(st.signals.retry_now, min(PEER_LOOK_CAP, PEER_LOOK_FIRST * 2**looks))
        st.signals.retry_now.clear()

    def _all_delivered(self, spool: Spool) -> None:
        """The journal holds nothing of this engine's any more, and nothing is being written: back
        to sending from memory (the hand, held meanwhile if the journal broke, goes first)."""
        st = self.state
        st.back_to_sending()
        # A tag set again while spooled is one journal row: its earlier values were superseded,
        # which is as delivered as they can be.
        st.delivered += st.spilled
        st.spilled = 0
        for marker, _ in st.waiters:
            resolve(marker)
        st.waiters.clear()
        st.signal_hand()
        st.wake_taker()
        if st.outage:
            st.outage = False
            st.warned.discard("outage")
            logger.warning(
                "tracklane: %s answers again; every event kept in the journal is delivered.", spool.api_host
            )
        if st.on_all_delivered is not None:
            st.on_all_delivered()

    def _sent_from_journal(self, run_id: str, n: int) -> None:
        st = self.state
        st.last_progress = time.monotonic()
        if st.signals is not None:
            st.signals.journal_moved.set()  # an artifact waiter looks again now
        assert st.spool is not None
        if run_id in st.spool.runs and st.spilled:
            moved = min(n, st.spilled)
            st.spilled -= moved
            st.delivered += moved
            n -= moved
        st.resumed += n

    def _refused_from_journal(self, events: list[Event], reason: str) -> None:
        """Journal rows the server refused (a run it lost, a bad value): reported, and no longer
        counted as spilled, so they never turn into ``delivered`` when the journal is empty."""
        st = self.state
        st.reject(events, reason)
        assert st.spool is not None
        ours = sum(1 for e in events if e[1] in st.spool.runs and e[0] != ARTIFACT)
        st.spilled -= min(ours, st.spilled)

    async def _check_waiters(self, done_upto: tuple[int, int] | None) -> None:
        """Resolve flushes whose journal rows are delivered: all rows up to ``done_upto`` (a round
        just finished), or, while another process uploads, as the journal's marks say."""
        st = self.state
        if not st.waiters or st.spool is None:
            return
        still = []
        for marker, target in st.waiters:
            if marker.done():
                continue
            if done_upto is not None and target <= done_upto:
                resolve(marker)
            elif done_upto is None and await st.spool.pending(st.spool.runs, target) == 0:
                st.last_progress = time.monotonic()  # the other uploader delivered them
                resolve(marker)
            else:
                still.append((marker, target))
        st.waiters = still
