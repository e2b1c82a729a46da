"""The relay: the training process's side of a sender process (``TRACKLANE_SENDER=process``).

It starts the sender (``sender_process``) when the worker first takes events (a client that only
reads never starts one) and hands it the configuration through its stdin. Until the sender is up
(~0.5 s: an interpreter, aiohttp) the in-process worker delivers as it always does, so a short
script never waits for a process to start; once the sender says it is ready, the engine hands it
the log from the next ordinal on (``hand_over``) and the worker keeps only what came before. From
then on the relay only talks: a wake-up per batch of records written to the log (from the logging
call's thread, a two-byte write that never blocks), and the waits the run models make (``flush``, a
run's events kept for later, shutdown), each answered with how far the sender has acknowledged the
log. The log's files go as the acknowledgements pass them, as they do in-process.

If the sender cannot start or dies, the relay says so once and the engine takes the log back
(``Engine._take_back``): every record not acknowledged is read from this process's own log into
its buffer and the in-process worker delivers it, so a dead sender costs speed, never events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import orjson

from .._exceptions import AuthenticationError, CertificateError, DeliveryError, RejectedEvent
from .._settings import EngineConfig, ServerConfig
from .._stores.event_log import EventLog
from .state import time_left

logger = logging.getLogger("tracklane")

#: How long the sender may take to start and read its configuration before it is taken for dead.
START_WAIT = 30.0
#: A sender that says nothing for this long while this process waits on it is taken for hung
#: (stopped, deadlocked): it says something at least every ``sender_process.BEAT`` seconds.
STALL = 15.0


class SenderGone(Exception):
    """The sender process is not there (it did not start, or it died)."""


class Relay:
    """One sender process for one engine's event log."""

    def __init__(
        self, log: EventLog, server: ServerConfig, config: EngineConfig, storage: str | None
    ) -> None:
        self.log = log
        self.server = server
        self.config = config
        self.storage = storage
        self.proc: subprocess.Popen[bytes] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._in = -1
        self.alive = False
        #: The sender's last counters (``Engine.stats`` adds them to this process's).
        self.stats: dict[str, float] = {}
        #: The sender has the log from ordinal ``sender_from`` on, and has acknowledged up to
        #: ``acked_to`` (the ordinals before ``sender_from`` are this process's worker's).
        self.handed_over = False
        self.went = False
        self.sender_from = self.acked_to = 0
        #: Called on the loop when the sender says it is ready (the engine hands it the log).
        self.on_ready: Callable[[], None] | None = None
        #: Called on the loop when the sender dies unasked (the engine takes the log back).
        self.on_gone: Callable[[], None] | None = None
        self._closing = False
        #: This is a forked child's copy: the sender and its log are the parent's.
        self.forked = False
        #: When the sender last said anything (monotonic).
        self.heard = time.monotonic()

    def start(self, loop: asyncio.AbstractEventLoop, workspace_id: str | None) -> bool:
        """Start the sender; False (said at WARNING) if it cannot start here."""
        self.loop = loop
        if not sys.executable or getattr(sys, "frozen", False):
            # No interpreter to start (embedded Python), or one that is the application itself
            # (PyInstaller and the like: ``-m`` would start the application again).
            logger.warning(
                "tracklane: this interpreter cannot start a sender process (%s); this process "
                "delivers its events itself. Set TRACKLANE_SENDER=thread to say so.",
                "a frozen application" if getattr(sys, "frozen", False) else "no sys.executable",
            )
            return False
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tracklane._delivery.sender_process"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
            )
        except OSError as exc:
            logger.warning(
                "tracklane: cannot start the sender process (%s); this process delivers its events "
                "itself (TRACKLANE_SENDER=thread).",
                exc,
            )
            return False
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self.alive = True
        _STARTED.add(self)
        self._write(orjson.dumps(self._configuration(workspace_id)) + b"\n")
        # The wake-ups come from logging calls: they must never wait on a pipe.
        flags = fcntl.fcntl(self._in, fcntl.F_GETFL)
        fcntl.fcntl(self._in, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        threading.Thread(
            target=self._read, args=(self.proc.stdout,), name="tracklane-relay", daemon=True
        ).start()
        return True

    def _configuration(self, workspace_id: str | None) -> dict[str, Any]:
        server = {f.name: getattr(self.server, f.name) for f in dataclasses.fields(self.server)}
        for secret in ("api_key", "password"):  # through the pipe only: never a file or argv
            value = server[secret]
            server[secret] = value.reveal() if value is not None else None
        return {
            "server": server,
            "engine": dataclasses.asdict(self.config),
            "storage": self.storage,
            "log_dir": str(self.log.directory),
            "token": self.log.token,
            "ordinal": self.log.acked,
            "workspace_id": workspace_id,
        }

    # -- the pipes -------------------------------------------------------------------------------

    def wake(self) -> None:
        """Any thread (a logging call, holding the log's lock): records wait. Never blocks; a full
        pipe already holds wake-ups the sender has not read."""
        if self.alive:
            with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
                os.write(self._in, b"w\n")

    def _write(self, data: bytes, bound: float = START_WAIT) -> None:
        view = memoryview(data)
        ends = time.monotonic() + bound
        while view:
            try:
                view = view[os.write(self._in, view) :]
            except BlockingIOError:
                if time.monotonic() > ends:
                    raise SenderGone("the sender process does not read its commands") from None
                time.sleep(0.001)
            except OSError as exc:
                raise SenderGone(str(exc)) from None

    def _read(self, stdout: Any) -> None:
        for line in stdout:
            try:
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            loop = self.loop
            if loop is None or loop.is_closed():
                return
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._received, message)
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._gone)

    def _received(self, message: dict[str, Any]) -> None:
        self.heard = time.monotonic()
        if "beat" in message:
            return
        said = message.get("log")
        if said is not None:  # the sender's own log line, said here where the user's handlers are
            level, text = said
            logger.log(int(level), "%s", text)
            return
        if "ready" in message:
            if self.on_ready is not None:
                self.on_ready()
            return
        acked = message.get("acked")
        if isinstance(acked, int) and acked > self.acked_to:
            self.log.done(self.acked_to, acked)  # beside the worker's own ranges below sender_from
            self.acked_to = acked
        if "stats" in message:
            self.stats.update(message["stats"])
        future = self._replies.pop(message.get("id", -1), None)
        if future is not None and not future.done():
            future.set_result(message)

    def _gone(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for future in self._replies.values():
            if not future.done():
                future.set_exception(SenderGone("the sender process exited"))
        self._replies.clear()
        if not self._closing and self.on_gone is not None:
            self.on_gone()

    async def ask(self, message: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """Send a command and wait for its reply (SenderGone if the sender dies meanwhile)."""
        if not self.alive or self.loop is None:
            raise SenderGone("the sender process is not running")
        number = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self._replies[number] = future
        self._write(orjson.dumps({**message, "id": number}) + b"\n")
        # The sender bounds its own waits by ``timeout`` and its retry window; these bounds only
        # cover a sender that stops answering without exiting (stopped, or hung): the whole wait
        # (with a timeout), and a silence longer than ``STALL`` (it beats every second, busy or not).
        asked = time.monotonic()
        ends = None if timeout is None else asked + timeout + self.config.retry_window + START_WAIT
        while not future.done():
            now = time.monotonic()
            # Silence counts from the ask at the earliest: this loop may have been busy before.
            silent = now - max(self.heard, asked)
            if (ends is not None and now >= ends) or silent > STALL:
                self._replies.pop(number, None)
                # Ended before anyone takes its log back: a sender left running would deliver the
                # same records again (and an old tag value after a new one).
                self.abandon()
                logger.warning(
                    "tracklane: the sender process did not answer in %.0f s (%s); it is ended, and "
                    "this process delivers its events itself.",
                    now - asked,
                    "silent: stopped or hung" if silent > STALL else "past the wait's bound",
                )
                raise SenderGone("the sender process did not answer")
            wait = STALL if ends is None else min(STALL, ends - now)
            await asyncio.wait({future}, timeout=max(0.0, wait))
        return future.result()

    # -- what the engine asks --------------------------------------------------------------------

    def hand_over(self, ordinal: int) -> None:
        """The sender takes the log from ``ordinal`` on. Caller holds the log's lock, so no record
        is written meanwhile. It reads nothing until ``go``."""
        self.sender_from = self.acked_to = ordinal
        self.stats["read"] = ordinal  # (what came before is the worker's, not unread)
        self._write(orjson.dumps({"op": "from", "ordinal": ordinal}) + b"\n")
        self.handed_over = True

    def go(self) -> None:
        """Every event before the hand-over is delivered here: the sender may send (any thread;
        under the log's lock, so briefly)."""
        if self.went:
            return
        self.went = True
        with contextlib.suppress(SenderGone):  # (a sender that reads nothing: its flush says so)
            self._write(b'{"op":"go"}\n', bound=1.0)

    def abandon(self) -> None:
        """The sender never took the log (it was still starting): end it, it holds nothing."""
        self._closing = True
        self.alive = False
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)

    async def flush(self, deadline: float | None, run_id: str | None) -> bool:
        """Every record logged before the call has its outcome (True), as ``Engine.flush`` says;
        raises the refusals and the stop the sender met, as this process's own errors."""
        with self.log.lock:
            upto = self.log.ordinal
        reply = await self.ask(
            {"op": "flush", "upto": upto, "run": run_id, "timeout": time_left(deadline)}, time_left(deadline)
        )
        _raise(reply)
        # Records it could not read (a damaged one stops its reading) are not flushed, whatever
        # it delivered: the log keeps them for recovery.
        return bool(reply.get("ok")) and int(reply.get("acked", 0)) >= upto

    async def keep_events(self) -> bool:
        """After giving up on the server: every record the sender holds goes to the journal (a
        run's end is recorded after them, by the engine). False if the journal cannot be written."""
        with self.log.lock:
            upto = self.log.ordinal
        reply = await self.ask({"op": "keep_events", "upto": upto}, 2 * self.config.retry_window)
        return bool(reply.get("ok"))

    def give_up(self) -> None:
        """Ctrl-C at exit: the sender stops waiting for the server too (what is left goes to the
        journal at once)."""
        if self.alive:
            with contextlib.suppress(SenderGone):
                self._write(b'{"op":"give_up"}\n')

    def set_workspace(self, workspace_id: str | None) -> None:
        if self.alive:
            with contextlib.suppress(SenderGone):
                self._write(orjson.dumps({"op": "workspace", "value": workspace_id}) + b"\n")

    async def close(self, deadline: float | None) -> tuple[int, list[str]] | None:
        """Let the sender deliver or keep the rest and exit: the events it lost and the runs it
        left in the journal (for the engine's one notice); None if it was gone."""
        self._closing = True  # its exit after the reply is expected
        try:
            reply = await self.ask({"op": "close", "timeout": time_left(deadline)}, time_left(deadline))
        except SenderGone:
            reply = None
        finally:
            self._stop()
        if reply is None:
            return None
        return int(reply.get("lost", 0)), [str(r) for r in reply.get("journal_runs", ())]

    async def stop(self) -> None:
        """Make the sender exit at once, delivering nothing more (the engine takes back what it
        has not acknowledged)."""
        self._closing = True
        try:
            await self.ask({"op": "stop"}, 0.0)
        except SenderGone:
            pass
        finally:
            self._stop()

    def _stop(self) -> None:
        self.alive = False
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)

    def detach(self) -> None:
        """In a forked child: the parent's sender is the parent's. The child's copies of the
        pipes are closed: a child holding the sender's stdin open would keep it from ever seeing
        its parent's end."""
        self.alive = False
        self.forked = True
        proc, self.proc, self.loop = self.proc, None, None
        if proc is not None:
            # Each descriptor now points at /dev/null: the pipe is let go, and the file objects,
            # which close their descriptor when collected, close nothing of the child's.
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError, ValueError):
                        null = os.open(os.devnull, os.O_RDWR)
                        os.dup2(null, pipe.fileno())
                        os.close(null)


#: Every relay with a sender process, for the fork hook below.
_STARTED: weakref.WeakSet[Relay] = weakref.WeakSet()


def _let_go_in_child() -> None:
    """In a child made by ``os.fork`` (a DataLoader worker, ``multiprocessing``'s fork start):
    every relay the parent had lets go of its pipes, whichever face holds it (``TrackingClient``
    resets its engine after a fork; an ``AsyncTrackingClient``'s loop is the parent's and does
    not), so a child that outlives its parent never keeps the sender from seeing the parent's end."""
    for relay in list(_STARTED):
        relay.detach()
    _STARTED.clear()


os.register_at_fork(after_in_child=_let_go_in_child)


def _raise(reply: dict[str, Any]) -> None:
    blocked = reply.get("blocked")
    if blocked:
        kind, text, status, code = blocked
        cls = CertificateError if kind == "CertificateError" else AuthenticationError
        raise cls(text, status=status, error_code=code)
    rejected = reply.get("rejected")
    if rejected:
        raise DeliveryError([RejectedEvent(*r) for r in rejected])
