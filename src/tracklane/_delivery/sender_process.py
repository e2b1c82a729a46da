"""The sender process: delivers a training process's event log from outside it (``TRACKLANE_SENDER=process``).

Why: the in-process worker runs on the training process's GIL, and its share (packing, orjson,
aiohttp, the event loop: ~3 us an event) is the training loop's cost too. Here the training process
only packs each record into its mapped log (``_stores.event_log``) and returns; this process tails
the log (``LogTail``) into an engine of its own, the same parts and the same outcome rule as the
in-process worker's, and reports back how far the log is acknowledged. Records written before a
kill -9 of the training process are on disk already, so this process delivers them after its
parent is gone, within ``exit_timeout`` (then what is left goes to the journal).

The channel is the two pipes of the child: the first line on stdin is the configuration (the
credentials among it: a pipe, never a file or the command line); after it, one JSON object a line:

parent to sender: ``w`` (records wait: read them), ``flush`` (read up to ``upto`` and deliver,
optionally of one ``run``), ``keep_end`` (a run's events and end to the journal), ``stats``,
``workspace`` (the OICM workspace changed), ``give_up`` (Ctrl-C at exit), ``stop`` (exit now: the
parent takes back what is not acknowledged), ``close``; EOF (the parent is gone, however it died)
ends this process as ``close`` does, within ``exit_timeout``.

sender to parent: ``{"acked": n}`` (every ordinal below ``n`` has its final outcome: delivered,
refused and reported, or in the journal) and replies ``{"id": ...}`` to the commands.

SIGINT and SIGTERM are ignored: Ctrl-C and a scheduler's SIGTERM reach the whole process group, and
the parent, which handles them, still needs its sender for its exit flush.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from .._exceptions import AuthenticationError, DeliveryError, TrackingError
from .._settings import EngineConfig, Secret, ServerConfig
from .._stores.event_log import (
    EventLog,
    LogTail,
    hold_for_sender,
    log_watermark,
    release_for_sender,
)
from .._stores.rest import RestBackend
from .._wire.batching import Event
from .engine import Engine
from .spool import Spool
from .state import time_left

logger = logging.getLogger("tracklane")

#: Records read from the log at a time (each read stops at the sender buffer's room too).
READ_CHUNK = 10_000
#: Seconds between the beats that tell the parent this process is alive (``_beat``).
BEAT = 1.0


class ForwardedOrdinals(EventLog):
    """The sender buffer's stand-in for an event log: it writes nothing (the parent's log holds the
    records), it numbers what the buffer takes so the taker's acknowledgements work as in-process,
    and it turns them into the parent's ordinals (a gap the parent's log has no event for is
    acknowledged at once) and reports the watermark."""

    __slots__ = ("_gaps", "_offset", "_total", "base", "report")

    def __init__(self, directory: Path, base: int, report: Any) -> None:
        super().__init__(directory, "", 0)
        self.base = base
        self.report = report
        self._gaps: collections.deque[tuple[int, int]] = collections.deque()
        self._total = self._offset = 0

    def metric(self, run_id: str, key: str, value: float, timestamp: int, step: int, _p: Any = None) -> bool:
        self.ordinal += 1
        return True

    def write(self, event: Event) -> bool:
        self.ordinal += 1
        return True

    def gap(self) -> None:
        """The parent's next ordinal has no event here: settled already."""
        with self.lock:
            self._total += 1
            self._gaps.append((self.ordinal, self._total))
            self._forget_acked()

    def watermark(self) -> int:
        acked = self.acked
        while self._gaps and self._gaps[0][0] <= acked:
            self._offset = self._gaps.popleft()[1]
        return self.base + acked + self._offset

    def _forget_acked(self) -> None:
        self.report(self.watermark())


class SenderProcess:
    """This process's work: tail the parent's log into an engine, answer the parent."""

    def __init__(self, config: dict[str, Any]) -> None:
        server = config["server"]
        for secret in ("api_key", "password"):
            if server.get(secret) is not None:
                server[secret] = Secret(server[secret])
        self.server = ServerConfig(**server)
        self.config = EngineConfig(**config["engine"])
        self.directory = Path(config["log_dir"])
        self.token = config["token"]
        self.rest = RestBackend(self.server, retry_window=self.config.retry_window)
        self.rest.workspace_id = config.get("workspace_id")
        self.engine = Engine(self.rest, self.config, Spool(config.get("storage"), self.rest), event_log=False)
        self.ordinals = ForwardedOrdinals(self.directory, 0, self._report)
        self.tail = LogTail(self.directory, self.token, 0)
        self._reported = -1
        #: The counters last sent to the parent (the oldest event's age left out: it always moves).
        self._sent_counts: dict[str, float] = {}
        self._stats_due = asyncio.Event()
        self._more = asyncio.Event()
        #: Set by the parent's ``go``: every event before the hand-over is settled there.
        self.go = asyncio.Event()

    def begin(self, ordinal: int) -> None:
        """The parent hands over its log from ``ordinal`` on (what came before is its worker's)."""
        self.ordinals = ForwardedOrdinals(self.directory, ordinal, self._report)
        self.engine.buffer.log = self.ordinals
        self.tail = LogTail(self.directory, self.token, ordinal)

    # -- talking to the parent -------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        stats = message.get("stats")
        if stats is not None:
            self._sent_counts = _counts(stats)
            self._stats_due.set()  # (``report_progress``: one more look, a little later)
        _to_parent(orjson.dumps(message) + b"\n")

    async def report_progress(self) -> None:
        """The counters, whenever the journal's rows move (the uploader delivering what this
        sender spilled: the watermark does not move then, yet the parent's progress lines and
        stats() must), at most four times a second; and once more a quarter second after any
        report, if they have moved since: with the server down, nothing else may come to correct
        a report taken in the middle of a change (a request moving from flight to the journal)."""
        signals = self.engine.state.signals
        assert signals is not None
        moved = signals.journal_moved
        while True:
            waits = [asyncio.ensure_future(e.wait()) for e in (moved, self._stats_due)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
            self._stats_due.clear()
            if moved.is_set():
                moved.clear()
                self._send({"stats": self.stats()})
            await asyncio.sleep(0.25)
            stats = self.stats()
            if _counts(stats) != self._sent_counts:
                self._send({"stats": stats})

    def _report(self, watermark: int) -> None:
        if watermark > self._reported:
            self._reported = watermark
            # All the counters, with each acknowledgement: a partial set would leave the parent's
            # stats() mixing fresh counts with stale ones (in flight, say, after a spill).
            self._send({"acked": watermark, "stats": self.stats()})

    def stats(self) -> dict[str, float]:
        """The engine's ``stats()`` for the parent's, with how far the log is read."""
        return {**self.engine.stats(), "read": self.tail.ordinal}

    # -- reading the log -------------------------------------------------------------------------

    def _pull(self, upto: int | None = None) -> int:
        """Read what the log holds into the engine's buffer, as far as it has room: the number of
        ordinals read."""
        buffer = self.engine.buffer
        room = self.config.max_buffer - len(buffer)
        if upto is not None:
            room = min(room, max(0, upto - self.tail.ordinal))
        if room <= 0:
            return 0
        items = self.tail.read(min(room, READ_CHUNK))
        for item in items:
            if item is None:
                self.ordinals.gap()
            else:
                buffer.put(item)
        return len(items)

    async def _gone_ahead(self) -> bool:
        """Wait for ``go`` (bounded by the retry window: the parent's own flush gives up on the
        same clock); False if it did not come."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.go.wait(), self.config.retry_window)
        return self.go.is_set()

    async def start_sending(self) -> None:
        """``go``: the parent has delivered everything logged before the hand-over."""
        self.go.set()

    async def _read_to(self, upto: int, deadline: float | None = None) -> None:
        """Every record below ``upto`` is in the engine (the buffer makes room as it delivers),
        or ``deadline`` has passed (what is not read stays in the log)."""
        while self.tail.ordinal < upto:
            if self._pull(upto):
                continue
            if len(self.engine.buffer) >= self.config.max_buffer:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.engine.buffer.wait_for_room(), left)
            else:  # the parent said it wrote them: they are there; a torn tail of a dead writer is not
                return

    async def pump(self) -> None:
        """Read as records arrive: woken by the parent per batch of records, and at
        ``flush_interval`` for a partial batch (the in-process taker's own interval). Nothing is
        read before ``go``: until then the parent's worker is still settling older events."""
        await self.go.wait()
        while True:
            self._more.clear()
            while self._pull() >= READ_CHUNK:
                await asyncio.sleep(0)
            if len(self.engine.buffer) >= self.config.max_buffer:
                await self.engine.buffer.wait_for_room()
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._more.wait(), self.config.flush_interval)

    # -- commands --------------------------------------------------------------------------------

    async def handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        reply: dict[str, Any] = {"id": message.get("id")}
        try:
            if op == "flush" and not await self._gone_ahead():
                reply["ok"] = False  # the parent's older events are not delivered yet
            elif op == "flush":
                deadline = _deadline(message.get("timeout"))
                await self._read_to(int(message["upto"]), deadline)
                reply["ok"] = await self.engine.flush(deadline, message.get("run"))
            elif op == "keep_events":
                # The parent has kept its own (older) events in the journal first: these go
                # behind them there, go or no go.
                self.engine.state.start_spooling()
                self.go.set()
                await self._read_to(int(message["upto"]))
                reply["ok"] = await self.engine.keep_events()
            elif op == "workspace":
                self.rest.workspace_id = message.get("value")
                return
            elif op == "give_up":
                self.engine.give_up()
                return
        except DeliveryError as exc:
            reply["ok"] = True
            reply["rejected"] = [[r.run_id, r.kind, r.key, _plain(r.value), r.reason] for r in exc.rejected]
        except AuthenticationError as exc:
            reply["ok"] = False
            reply["blocked"] = [type(exc).__name__, str(exc), exc.status, exc.error_code]
        except TrackingError as exc:
            reply["ok"] = False
            reply["error"] = str(exc)
        reply["stats"] = self.stats()
        reply["acked"] = self.ordinals.watermark()
        self._send(reply)

    async def finish(self, deadline: float) -> int:
        """Deliver or keep every record the log holds (by ``deadline``), then stop: lost events.
        The parent says what the journal keeps, for both (``journal_runs`` in the reply)."""
        await self._read_to(1 << 62, deadline)
        return await self.engine.shutdown(deadline, notice=False)

    async def finish_orphaned(self, deadline: float) -> int:
        """The parent is gone: what its own worker had not settled (records below the hand-over,
        above the watermark it last stored) goes first, then the rest of the log; then as
        ``finish``. A record it had delivered without storing the watermark goes again, which the
        server takes as a no-op (see ``event_log.recover``)."""
        start = self.ordinals.base
        floor = log_watermark(self.directory, self.token)
        if floor is not None and floor < start:
            tail = LogTail(self.directory, self.token, floor)
            own = [e for e in tail.read(start - floor) if e is not None]
            tail.close()
            self.engine.buffer.take_back(own, own_before=0)  # ahead of anything read from the log
        self.go.set()  # nothing older is left to wait for
        await self._read_to(1 << 62, deadline)
        return await self.engine.shutdown(deadline, notice=False)

    def release_log(self, lost: int) -> None:
        """A dead parent's log, once everything in it is delivered or in the journal (``lost`` 0):
        its files go. Otherwise they stay as they are, for recovery (from the parent's own
        watermark: what went twice is a no-op on the server)."""
        self.tail.close()
        if lost or self.tail.damaged:
            return
        for name in sorted(os.listdir(self.directory)):
            if name.startswith(f"events-{self.token}-"):
                with contextlib.suppress(OSError):
                    (self.directory / name).unlink()


async def serve(config: dict[str, Any], lines: asyncio.Queue[bytes | None]) -> int:
    sender = SenderProcess(config)
    loop = asyncio.get_running_loop()
    # Leftovers of earlier processes, and logs of dead ones, are the parent's to look for: its
    # engine does at its start. This one's uploader starts when it spills.
    sender.engine.attach(loop, leftovers=False)
    sender._send({"ready": os.getpid()})
    while True:  # until the parent hands the log over (or finishes before it needs us)
        line = await lines.get()
        if line is None:  # the parent is gone before it handed anything over: its log is its own
            await sender.engine.shutdown(time.monotonic() + 1.0, notice=False)  # (holds nothing)
            return 0
        message = orjson.loads(line) if line.strip() != b"w" else {}
        if message.get("op") == "from":
            break
        if message.get("op") == "workspace":  # (set before the hand-over: it applies all the same)
            sender.rest.workspace_id = message.get("value")
            continue
        if message.get("op") in ("stop", "close"):
            await sender.engine.shutdown(time.monotonic() + 1.0, notice=False)
            sender._send({"id": message.get("id"), "lost": 0, "acked": 0})
            return 0
    sender.begin(int(message["ordinal"]))
    lock = hold_for_sender(sender.directory, sender.token)
    pump = loop.create_task(sender.pump(), name="tracklane-sender-pump")
    reporter = loop.create_task(sender.report_progress(), name="tracklane-sender-progress")
    beat = loop.create_task(_beat(), name="tracklane-sender-beat")
    handling: set[asyncio.Task[None]] = set()
    parent_alive = True
    lost = 0
    try:
        while True:
            line = await lines.get()
            if line is None:  # EOF: the parent is gone (kill -9, os._exit, or an exit with no close)
                parent_alive = False
                lost = await sender.finish_orphaned(time.monotonic() + sender.config.exit_timeout)
                break
            if line.strip() == b"w":
                sender._more.set()
                continue
            message = orjson.loads(line)
            if message.get("op") == "go":
                await sender.start_sending()
                continue
            if message.get("op") == "stop":
                # The parent takes back what is not acknowledged (its log cannot follow the events
                # any more): stop at once, delivering and keeping nothing more.
                sender._send({"id": message.get("id"), "acked": sender.ordinals.watermark()})
                sender.tail.close()
                release_for_sender(sender.directory, sender.token, lock)
                os._exit(0)
            if message.get("op") == "close":
                if handling:
                    await asyncio.wait(handling, timeout=time_left(_deadline(message.get("timeout"))))
                lost = await sender.finish(_deadline(message.get("timeout")) or time.monotonic() + 3600)
                sender._send(
                    {
                        "id": message.get("id"),
                        "lost": lost,
                        "acked": sender.ordinals.watermark(),
                        "stats": sender.stats(),
                        "journal_runs": sorted(spool.runs) if (spool := sender.engine.spool) else [],
                    }
                )
                break
            task = loop.create_task(sender.handle(message))
            handling.add(task)
            task.add_done_callback(handling.discard)
    finally:
        pump.cancel()
        reporter.cancel()
        beat.cancel()
        if parent_alive:
            sender.tail.close()
        else:
            sender.release_log(lost)
        release_for_sender(sender.directory, sender.token, lock)
    return lost


async def _beat() -> None:
    """Say something every ``BEAT`` seconds: a parent waiting on this process tells a hung one
    (stopped, deadlocked: ``relay.STALL``) from one that is busy or waiting on the server."""
    while True:
        await asyncio.sleep(BEAT)
        _to_parent(b'{"beat":1}\n')


def _read_lines(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[bytes | None]) -> None:
    stdin = sys.stdin.buffer
    while True:
        try:
            line = stdin.readline()
        except (OSError, ValueError):
            line = b""
        loop.call_soon_threadsafe(lines.put_nowait, line or None)
        if not line:
            return


def _deadline(timeout: object) -> float | None:
    return None if timeout is None else time.monotonic() + float(timeout)  # type: ignore[arg-type]


def _counts(stats: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in stats.items() if k != "oldest_undelivered_age_s"}


def _plain(value: object) -> object:
    return value if isinstance(value, (str, int, float)) or value is None else str(value)


async def _main() -> int:
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()
    first = await loop.run_in_executor(None, sys.stdin.buffer.readline)
    if not first:
        return 0
    threading.Thread(
        target=_read_lines, args=(loop, lines), name="tracklane-sender-stdin", daemon=True
    ).start()
    return await serve(orjson.loads(first), lines)


class _ToParent(logging.Handler):
    """The sender's log lines go to the parent, which says them through its own ``tracklane``
    logger (the user's handlers and levels), not to a stderr of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if not _to_parent(orjson.dumps({"log": [record.levelno, text]}) + b"\n"):
                sys.stderr.write(text + "\n")  # the parent is gone: the terminal, if any
        except Exception:  # a log line must never take the sender down
            self.handleError(record)


#: One writer at a time on the pipe to the parent (the loop, and the journal's thread logging).
_STDOUT = threading.Lock()


def _to_parent(data: bytes) -> bool:
    """Write one line to the parent; False if it is gone (nobody to tell)."""
    with _STDOUT:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(1, view) :]
        except OSError:
            return False
    return True


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    handler = _ToParent()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    lost = asyncio.run(_main())
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
