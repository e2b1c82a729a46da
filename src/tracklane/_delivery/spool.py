"""The journal as the buffer's disk, for an engine that delivers to a tracking server.

When the producer outruns the server (or the server is slow, down, or refusing the key), the engine
writes events here at disk speed instead of holding them in memory or making callers wait, and an
uploader sends them on in order, at the server's pace. The same file keeps what is left at exit,
with each run's end status, so a later client on the same storage (or ``tracklane sync``) finishes
the job. One uploader at a time per journal and server, across processes (``UploadLock``).

The journal is opened on first use: an online client that never needs it creates no file.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .._exceptions import TrackingError
from .._settings import ServerConfig
from .._stores.event_log import recover_and_say
from .._stores.journal import JOURNAL_DIR, JOURNAL_FILE, Journal, JournalThread, UploadLock, server_key
from .._wire.batching import Batch, Event
from .._wire.outcome import OnRejected
from .._wire.run_end import RunEnd
from .upload import Uploader, upload_run

logger = logging.getLogger("tracklane")


class Destination(Protocol):
    """The server a spool's rows are for (``RestBackend``)."""

    config: ServerConfig
    workspace_id: str | None

    def server_key(self) -> str: ...


class Spool:
    """One engine's journal for one server. See the module docstring."""

    def __init__(self, storage: str | None, destination: Destination) -> None:
        self.storage = storage or "."
        self.destination = destination
        self.journal: Journal | None = None
        #: The journal cannot be written (a full or read-only disk): events stay in memory.
        self.broken = False
        #: Run ids this engine wrote rows of: flushes wait for these.
        self.runs: set[str] = set()
        self.writes = 0  # completed writes: the uploader may stop only if none happened meanwhile
        self.writing = 0
        self._opening = asyncio.Lock()
        self._open_guard = threading.Lock()
        self._lock: UploadLock | None = None
        #: Tokens of this process's own event logs (``EventLog.lineage``): not recovered here.
        self.own_logs: frozenset[str] = frozenset()

    @property
    def server(self) -> str:
        """The journal's name for the destination (host, and workspace on OICM)."""
        return self.destination.server_key()

    @property
    def api_host(self) -> str:
        return server_key(self.destination.config.api_host, None)  # never credentials in a log line

    @property
    def path(self) -> Path:
        return (
            self.journal.path if self.journal is not None else Path(self.storage) / JOURNAL_DIR / JOURNAL_FILE
        )

    async def open(self, create: bool = True) -> Journal | None:
        """The journal (None if it cannot be opened, or does not exist and ``create`` is False)."""
        # Two batches can fail at once; both must get the one journal, not race to create it.
        async with self._opening:
            if self.journal is None and not self.broken:
                if not create and not self.path.exists():
                    return None
                thread = JournalThread()
                try:
                    await thread.call(self._open_blocking, thread)
                except (OSError, sqlite3.Error, TrackingError) as exc:  # TrackingError: damaged/foreign
                    self._break(exc)
                    thread.stop()
                    return None
        return self.journal

    def open_now(self) -> Journal:
        """The journal, opened from the caller's thread if need be (an artifact call keeps its row
        there before it returns). Raises what opening raises (OSError, ConfigurationError)."""
        if self.journal is None:
            self._open_blocking(JournalThread())  # its thread starts on first use only
        assert self.journal is not None
        return self.journal

    def _open_blocking(self, thread: JournalThread) -> None:
        with self._open_guard:  # the loop and a caller's thread may both open it: once
            if self.journal is None:
                journal = Journal.at(self.storage, thread)
                self._lock = UploadLock(journal.path, self.server)
                self.journal = journal

    def _break(self, exc: BaseException) -> None:
        self.broken = True
        logger.error(
            "tracklane: cannot write the local journal %s (%s); undelivered events stay in memory and are "
            "retried, and callers wait for room at most block_timeout when memory is full. Give "
            "path_to_storage= a writable directory with free space.",
            self.path,
            exc,
        )

    async def write(self, batches: list[Batch], on_rejected: OnRejected) -> int:
        """Keep ``batches`` in the journal, in order; returns how many were kept (the first ones):
        fewer than given when the journal cannot be written (then it is ``broken``).

        An event the journal cannot store (a value SQLite refuses) is isolated and reported through
        ``on_rejected``; the others are kept. A write that has started finishes, every batch of it,
        even if the caller is cancelled: the caller no longer holds these batches anywhere else, so
        stopping half-way would lose the rest (``spilling.Spiller.write`` relies on this).
        """
        journal = await self.open()
        if journal is None:
            return 0
        self.writing += 1
        write = asyncio.ensure_future(self._write_all(journal, batches, on_rejected))
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            await write
            raise

    async def _write_all(self, journal: Journal, batches: list[Batch], on_rejected: OnRejected) -> int:
        kept = 0
        try:
            for batch in batches:
                await self._write_batch(journal, batch, on_rejected)
                kept += 1
        except (OSError, sqlite3.OperationalError) as exc:
            self._break(exc)
        finally:
            self.writing -= 1
            self.writes += 1
        return kept

    async def _write_batch(self, journal: Journal, batch: Batch, on_rejected: OnRejected) -> None:
        self.runs.add(batch.run_id)
        try:
            await journal.call(journal.spill, self.server, batch.run_id, "", batch.events(), batch.seq)
        except (OSError, sqlite3.OperationalError):
            raise
        except Exception as exc:  # one event SQLite will not store: isolate it by halves
            if len(batch) == 1:
                on_rejected(batch.events(), f"cannot be stored in the journal ({type(exc).__name__}: {exc})")
                return
            for half in batch.halves():
                await self._write_batch(journal, half, on_rejected)

    def add_artifact(self, run_id: str, path: str, file: str, size: int) -> None:
        """From the caller's thread: keep an artifact snapshot's row for the uploader."""
        journal = self.open_now()
        journal.add_artifact(self.server, run_id, path, file, size)
        self.runs.add(run_id)
        self.writes += 1  # the uploader goes round again before it stops

    async def pending_artifacts(self, run_id: str) -> int:
        """Artifacts of run ``run_id`` not yet uploaded."""
        journal = self.journal
        if journal is None:
            return 0
        return await journal.call(journal.pending_artifacts_for, self.server, run_id)

    async def record_end(self, end: RunEnd) -> bool:
        """Keep a run's end in the journal, applied once its events are delivered."""
        journal = await self.open()
        if journal is None:
            return False
        self.runs.add(end.run_id)
        try:
            await journal.call(journal.spill, self.server, end.run_id, end.run_name, [])
            await journal.call(journal.set_spilled_status, end.run_id, end.status, end.end_time)
        except (OSError, sqlite3.Error) as exc:
            logger.error("tracklane: cannot record the end of run %s in %s: %s", end.run_id, self.path, exc)
            return False
        return True

    def keep_now(self, events: list[Event], ends: list[RunEnd]) -> int:
        """Blocking: journal ``events`` and ``ends`` from a thread with no event loop (interpreter
        exit after the loop is gone). Returns how many events could not be kept."""
        try:
            journal = self.journal or Journal.at(self.storage)
            per_run: dict[str, list[Event]] = {}
            for e in events:
                per_run.setdefault(e[1], []).append(e)
            for run_id, run_events in per_run.items():
                journal.spill(self.server, run_id, "", run_events)
                self.runs.add(run_id)
            for end in ends:
                journal.spill(self.server, end.run_id, end.run_name, [])
                journal.set_spilled_status(end.run_id, end.status, end.end_time)
                self.runs.add(end.run_id)
            self.journal = journal
        except Exception as exc:
            logger.error(
                "tracklane: could not keep %d event(s) in %s at exit: %s", len(events), self.path, exc
            )
            return len(events)
        return 0

    # -- reading back ----------------------------------------------------------------------------

    async def recover_dead_logs(self) -> int:
        """Move the event logs of dead processes in this journal's directory into the journal (off
        the loop: it reads files); how many events. A failure is logged, never raised."""
        return await asyncio.to_thread(
            recover_and_say, self.path.parent, self.open_now, self.own_logs, self.path
        )

    async def high_water(self) -> tuple[int, int]:
        journal = await self.open()
        return (0, 0) if journal is None else await journal.call(journal.high_water)

    async def pending(self, runs: set[str] | None, upto: tuple[int, int] | None = None) -> int:
        """Rows (and run ends) of ``runs`` (default: every run spilled for this server) not yet
        delivered, up to ``upto``; 0 when there is no journal."""
        journal = await self.open(create=False)
        if journal is None:
            return 0
        if runs is None:
            runs = {d.run_uuid for d in await journal.call(journal.deliveries, self.server, None, True)}
        hi = upto or await journal.call(journal.high_water)
        return await journal.call(journal.pending_upto, self.server, runs, hi)

    async def notice(self, when: str) -> bool:
        """Log what of this engine's runs the server has not got, where it is kept and the exact
        command that delivers it; False (and nothing logged) when nothing is left."""
        journal = self.journal
        if journal is None or not self.runs:
            return False
        try:
            events, ends = await journal.call(journal.pending_summary, self.server, self.runs)
        except (OSError, sqlite3.Error):
            return False
        if not events and not ends:
            return False
        ending = "".join(f" and the end ({status}) of run {run_id}" for run_id, status in ends)
        logger.warning(
            "tracklane: %d event(s)%s did not reach %s %s; they are kept in %s, and the next client on "
            "this storage delivers them by itself. Deliver them with: %s",
            events,
            ending,
            self.api_host,
            when,
            self.path,
            self.sync_command(),
        )
        return True

    async def lock(self) -> bool:
        """Become this server's uploader for the journal; False while another process is."""
        journal = await self.open()
        if journal is None or self._lock is None:
            return False
        return await journal.call(self._lock.acquire)

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    async def upload(
        self,
        target: Uploader,
        on_sent: Callable[[str, int], None],
        on_rejected: OnRejected,
        upto: tuple[int, int],
        in_flight: int,
    ) -> int:
        """One round, holding the lock: deliver every spilled run's rows up to ``upto`` (this engine's
        runs first), then its end. Returns how many rows and run ends it moved (0: nothing pending)."""
        journal = self.journal
        assert journal is not None and self._lock is not None and self._lock.held
        moved = 0
        deliveries = await journal.call(journal.deliveries, self.server, None, True)
        deliveries.sort(key=lambda d: d.run_uuid not in self.runs)
        for d in deliveries:

            def sent(n: int, run_id: str = d.run_uuid) -> None:
                nonlocal moved
                moved += n
                on_sent(run_id, n)

            def rejected(events: list[Event], reason: str) -> None:
                nonlocal moved
                moved += len(events)
                on_rejected(events, reason)

            ended = d.wanted_state is not None and d.wanted_state != d.state
            await upload_run(
                journal,
                target,
                d,
                self.server,
                on_sent=sent,
                on_rejected=rejected,
                upto=upto,
                in_flight=in_flight,
            )
            moved += ended
        return moved

    def sync_command(self) -> str:
        """The exact command that delivers this journal's leftovers to this server."""
        storage = self.path.parent.parent.resolve()
        command = f"tracklane sync {shlex.quote(str(storage))} --to {shlex.quote(self.api_host)}"
        if self.destination.workspace_id:
            command += f" --workspace-id {shlex.quote(self.destination.workspace_id)}"
        return command

    async def close(self) -> None:
        self.unlock()
        if self.journal is not None:
            journal, self.journal = self.journal, None  # closed: ``keep_now`` after this reopens
            await journal.call(journal.close)
