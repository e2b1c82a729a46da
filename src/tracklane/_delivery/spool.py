"""Outage spill: batches a tracking server cannot take go to the local journal, and come back.

When a request fails past the retry window (or, under ``overflow="spill"``, the buffer is full
while the server sits on a request), the engine writes that batch to the journal and turns
*degraded*: every later batch goes straight to disk, so waiting callers are released at disk
speed and memory stays bounded. A replay task probes the server with backoff; once it answers,
the task sends the journal's rows in order, and when nothing is left it returns the engine to
direct sending. Whatever is still in the journal at exit is named in one log line with the
``tracklane sync`` command that delivers it.

The journal is opened on the first spill: an online client that never spills creates no file.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import sqlite3
from collections.abc import Callable, Iterable

from .._delivery.batching import Batch, Event
from .._delivery.upload import OnRejected, upload_run
from .._exceptions import ServerUnavailableError
from .._stores.journal import Journal, JournalThread, server_key
from .._stores.rest import RestBackend, backoff

logger = logging.getLogger("tracklane")

#: How long one replay request may take before the server counts as still down.
PROBE_TIMEOUT = 2.0
#: Longest pause between two probes of a server that is down.
PROBE_BACKOFF_CAP = 5.0


class Spill:
    """The journal side of one engine's delivery to one server. See the module docstring."""

    def __init__(self, backend: RestBackend, storage: str | None) -> None:
        self.backend = backend
        self.storage = storage or "."
        self.journal: Journal | None = None
        self.degraded = False
        self.broken = False  # the journal cannot be written: fall back to retrying in memory
        #: Batches being sent or spilled: what shutdown must keep if their task is cancelled.
        self.unsettled: dict[int, Batch] = {}
        self.runs: dict[str, str] = {}  # run id -> run name, of runs spilled by this engine
        self.replay_task: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()
        self._writes = 0  # completed spill writes: replay may only stop when none happened meanwhile
        self._writing = 0

    @property
    def server(self) -> str:
        return server_key(self.backend.config.api_host, self.backend.workspace_id)

    async def _open(self) -> Journal:
        # Two batches can fail at once; both must get the one journal, not open a second
        # connection that races the first on creating the file ("database is locked").
        async with self._opening:
            if self.journal is None:
                thread = JournalThread()
                self.journal = await thread.call(Journal.at, self.storage, thread)
        return self.journal

    async def write(
        self, events: list[Event], names: Callable[[str], str], batch: Batch | None = None
    ) -> bool:
        """Keep ``events`` (of ``batch``) in the journal; False if it cannot be written (warned once).

        A write that has started is finished even if the caller is cancelled, and its batch is no
        longer unsettled, so shutdown never writes the same batch twice.
        """
        if self.broken:
            return False
        self._writing += 1
        try:
            journal = await self._open()
            per_run: dict[str, list[Event]] = {}
            for e in events:
                per_run.setdefault(e[1], []).append(e)
            server = self.server
            for run_id, run_events in per_run.items():
                name = self.runs.setdefault(run_id, names(run_id))
                write = asyncio.ensure_future(journal.call(journal.spill, server, run_id, name, run_events))
                try:
                    await asyncio.shield(write)
                except asyncio.CancelledError:
                    await write
                    if batch is not None and len(per_run) == 1:
                        self.unsettled.pop(id(batch), None)
                    raise
            if batch is not None:
                self.unsettled.pop(id(batch), None)
            return True
        except (OSError, sqlite3.Error) as exc:
            self.broken = True
            logger.warning(
                "tracklane: cannot write the local journal under %s (%s); undelivered events stay in "
                "memory and are retried. Give path_to_storage= a writable directory.",
                self.storage,
                exc,
            )
            return False
        finally:
            self._writing -= 1
            self._writes += 1

    def degrade(self, reason: Exception, on_sent: Callable[[int], None], on_rejected: OnRejected) -> None:
        """Send every batch to the journal from now on, and start replaying it to the server."""
        if self.degraded:
            return
        self.degraded = True
        logger.warning(
            "tracklane: %s Keeping events in the local journal %s and replaying them when the server "
            "answers.",
            reason,
            self.journal.path if self.journal is not None else self.storage,
        )
        if self.replay_task is None or self.replay_task.done():
            self.replay_task = asyncio.get_running_loop().create_task(
                self._replay(on_sent, on_rejected), name="tracklane-replay"
            )

    async def _replay(self, on_sent: Callable[[int], None], on_rejected: OnRejected) -> None:
        attempt = 0
        while True:
            writes = self._writes
            try:
                sent = await self._replay_once(on_sent, on_rejected)
            except ServerUnavailableError:
                await asyncio.sleep(_backoff(attempt))
                attempt += 1
                continue
            except asyncio.CancelledError:
                raise
            except Exception:  # the replay must not die: it is how spilled events get home
                logger.exception("tracklane: replaying the journal failed; trying again")
                await asyncio.sleep(_backoff(attempt))
                attempt += 1
                continue
            attempt = 0
            if sent == 0 and writes == self._writes and self._writing == 0:
                self.degraded = False
                logger.warning(
                    "tracklane: %s answers again; every spilled event is delivered.", self.backend.describe
                )
                return

    async def _replay_once(self, on_sent: Callable[[int], None], on_rejected: OnRejected) -> int:
        journal = await self._open()
        sent = 0

        def count(n: int) -> None:
            nonlocal sent
            sent += n
            on_sent(n)

        server = self.server
        for d in await journal.call(journal.deliveries, server, list(self.runs)):
            await upload_run(
                journal,
                self.backend,
                d,
                server,
                on_sent=count,
                on_rejected=on_rejected,
                attempt_timeout=PROBE_TIMEOUT,
            )
        return sent

    async def keep_at_exit(
        self, events: list[Event], names: Callable[[str], str], ended: tuple[str, str, int] | None
    ) -> int:
        """Journal what shutdown could not deliver (and the run's end, if the server missed it);
        log one line with the command that delivers it. Returns events left in the journal."""
        if events and not await self.write(events, names):
            return len(events)
        if ended is not None and not self.broken:
            run_id, status, end_time = ended
            name = self.runs.setdefault(run_id, names(run_id))
            try:
                journal = await self._open()
                await journal.call(journal.spill, self.server, run_id, name, [])
                await journal.call(journal.set_spilled_status, run_id, status, end_time)
            except (OSError, sqlite3.Error) as exc:
                logger.warning("tracklane: cannot record the end of run %s in the journal: %s", run_id, exc)
        if not self.runs or self.journal is None:
            return 0
        left = await self.journal.call(_pending, self.journal, self.server, self.runs)
        if left or ended is not None:
            ending = f" and the end ({ended[1]}) of run {ended[0]}" if ended is not None else ""
            logger.warning(
                "tracklane: %d event(s)%s did not reach %s before exit; they are kept in %s. Deliver "
                "them with: %s",
                left,
                ending,
                self.backend.config.api_host,
                self.journal.path,
                self.sync_command(),
            )
        return left

    def sync_command(self) -> str:
        """The exact command that delivers this journal's leftovers to this server."""
        assert self.journal is not None
        storage = self.journal.path.parent.parent.resolve()
        host = server_key(self.backend.config.api_host, None)  # never a password in a log line
        command = f"tracklane sync {shlex.quote(str(storage))} --to {shlex.quote(host)}"
        if self.backend.workspace_id:
            command += f" --workspace-id {shlex.quote(self.backend.workspace_id)}"
        return command


def _pending(journal: Journal, server: str, runs: Iterable[str]) -> int:
    return sum(sum(journal.pending_counts(d)) for d in journal.deliveries(server, runs))


def _backoff(attempt: int) -> float:
    return backoff(attempt, base=0.25, cap=PROBE_BACKOFF_CAP)
