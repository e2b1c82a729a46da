"""A wait the user can see: a progress line while ``end_run``, ``flush``, ``close`` or the exit
flush waits for the server.

The caller's thread waits on the engine's future with a timeout and, each time it wakes without a
result (after ``_FIRST`` seconds, then every ``_EVERY``), logs one line through the ``tracklane``
logger: what it waits for, how many events are left, the rate over the last ``_WINDOW`` seconds and
the time left at that rate (a rate since the start of the wait would hide a server that slowed down
or came back), and that Ctrl-C leaves the rest in the journal. It waits on the real completion
event, never polls the delivery: the counters are read on the loop thread only when a line is due.

The ``tracklane`` logger gets the INFO level (unless the program set one) and one handler of its
own (``StderrFallback``): it writes to stderr only while nothing else would show the record (no
handler on the way up to the root), so a program that configures logging sees each line once,
through its own handlers, and a plain script sees the progress lines at all (Python's last-resort
handler shows WARNING and above only). The root logger is never touched.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TypeVar

from .._delivery.engine import Engine

logger = logging.getLogger("tracklane")
T = TypeVar("T")

#: A wait shorter than this says nothing: most ends of a run take well under it. The counters are
#: first read halfway there, so the first line already has a rate.
_FIRST = 2.0
#: Then a line every few seconds: enough to see it move, few enough for a log file.
_EVERY = 5.0
#: The rate (and so the time left) is measured over this much recent time.
_WINDOW = 10.0
#: Reading the counters on the loop thread; a busy loop skips the line rather than hold the wait.
_SNAPSHOT_TIMEOUT = 1.0


class StderrFallback(logging.Handler):
    """INFO and above of the ``tracklane`` logger to stderr, when no other handler would show it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(message)s"))  # as Python's last-resort handler

    def emit(self, record: logging.LogRecord) -> None:
        if _shown_elsewhere(logging.getLogger(record.name), self):
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # stderr closed (interpreter teardown): a log line is not worth a traceback
            pass


def _shown_elsewhere(log: logging.Logger, me: logging.Handler) -> bool:
    """Whether a handler other than ``me`` gets records of ``log`` (it, or an ancestor it propagates to)."""
    current: logging.Logger | None = log
    while current is not None:
        if any(h is not me for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def install_stderr_fallback() -> None:
    """Give the ``tracklane`` logger its fallback handler, once per process, and the INFO level
    unless the program chose one (``logging.getLogger("tracklane").setLevel(logging.WARNING)``
    silences the progress lines), as MLflow does for its own logger."""
    if not any(isinstance(h, StderrFallback) for h in logger.handlers):
        logger.addHandler(StderrFallback())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def _seconds(seconds: float) -> str:
    """``7 s``, ``4 min``: a wait's length, to the precision a waiting user needs."""
    s = max(round(seconds), 0)
    return f"{s} s" if s < 120 else f"{round(s / 60)} min"


class RecentRate:
    """Events per second over the last ``window`` seconds, from samples of a running total."""

    def __init__(self, window: float = _WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, total: int) -> None:
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rate(self) -> float | None:
        """None until two samples are a moment apart."""
        if len(self._samples) < 2:
            return None
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def span(self) -> float:
        return self._samples[-1][0] - self._samples[0][0] if self._samples else 0.0


@dataclass(frozen=True)
class Snapshot:
    """What a progress line reports, read on the loop thread."""

    left: int  # this engine's events not yet on the server (memory and journal)
    delivered: int


async def _snapshot(engine: Engine) -> Snapshot:
    return Snapshot(left=engine.pending() + engine.spilled, delivered=engine.delivered)


class WaitProgress:
    """The progress lines of one wait on ``engine`` (``what``: "end_run", "the exit flush", or "")."""

    def __init__(
        self, engine: Engine, loop: asyncio.AbstractEventLoop, what: str, deadline: float | None = None
    ) -> None:
        self.engine = engine
        self.loop = loop
        self.what = what
        self.deadline = deadline  # monotonic: when the wait stops and keeps the rest in the journal
        self.started = time.monotonic()
        self.rate = RecentRate()
        self.lines = 0

    def tick(self, show: bool = True) -> None:
        """Read the counters; log a line if ``show`` (the caller's wait has lasted long enough)."""
        try:
            snap = asyncio.run_coroutine_threadsafe(_snapshot(self.engine), self.loop).result(
                _SNAPSHOT_TIMEOUT
            )
        except Exception:  # a stopped or busy loop: no line this time; the wait itself goes on
            return
        now = time.monotonic()
        self.rate.add(now, snap.delivered)
        if not show or snap.left <= 0:
            return  # waiting for something else (a run's end, a request): bounded on its own
        self.lines += 1
        logger.info("tracklane: %s", self.line(snap, now))

    def line(self, snap: Snapshot, now: float) -> str:
        rate = self.rate.rate()
        text = (
            f"{self.what + ' ' if self.what else ''}waiting {_seconds(now - self.started)} "
            f"for {self._server()}: {snap.left:,} event(s) left"
        )
        if rate is None:
            text += ", measuring the rate"
        elif rate > 0:
            eta = snap.left / rate
            text += (
                f", {rate:,.0f} events/s over the last {_seconds(self.rate.span())}, "
                f"about {_seconds(eta)} to go"
            )
            if self.deadline is not None and now + eta > self.deadline:
                text += f" (it stops in {_seconds(self.deadline - now)} and keeps the rest in the journal)"
        else:
            text += (
                f", none taken in the last {_seconds(self.rate.span())} (it gives up after "
                f"{_seconds(self.engine.config.retry_window)} without progress)"
            )
        return text + "; " + self._leave()

    def _server(self) -> str:
        spool = self.engine.spool
        return spool.api_host if spool is not None else self.engine.backend.describe

    def _leave(self) -> str:
        spool = self.engine.spool
        if spool is None or spool.broken:
            return "Ctrl-C stops waiting."
        return f"Ctrl-C leaves the rest in {spool.path} for: {spool.sync_command()}"


def wait_with_progress(
    future: concurrent.futures.Future[T], timeout: float | None, progress: WaitProgress
) -> T:
    """``future.result(timeout)``, logging ``progress`` lines while it lasts past ``_FIRST`` seconds.

    Raises ``concurrent.futures.TimeoutError`` after ``timeout`` as ``result`` does; the caller
    decides what a timeout or a Ctrl-C means for the work."""
    deadline = None if timeout is None else time.monotonic() + timeout
    wakes = 0
    while True:
        step = _FIRST / 2 if wakes < 2 else _EVERY
        wait = step if deadline is None else min(step, max(0.0, deadline - time.monotonic()))
        try:
            return future.result(wait)
        except concurrent.futures.TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                raise
        wakes += 1
        progress.tick(show=wakes >= 2)


install_stderr_fallback()
