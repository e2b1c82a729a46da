"""Progress of a long upload, with its rate and the time left.

On a terminal: one bar redrawn in place at most ten times a second. Anywhere else (a log file, CI):
a plain line once the upload has run for a second, then at most one every few seconds, so a
log holds a handful of lines for an hour-long sync, not one per request. In both, the caller adds
a line of its own per finished piece of work (``line``).

The rate, and the time left computed from it, are those of the last ``RATE_WINDOW`` seconds, not the
average since the start: an upload that starts fast (a burst that fits the first requests) and then
settles, or one that speeds up once the server warms, is shown at the pace it goes now.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "format_duration"]

_BAR_WIDTH = 30
_TTY_INTERVAL = 0.1
#: A plain line after the first second (the rate and time left are known by then), then every
#: ``_PLAIN_INTERVAL`` seconds.
_PLAIN_FIRST = 1.0
_PLAIN_INTERVAL = 5.0
#: The rate is measured over this many recent seconds.
RATE_WINDOW = 10.0


class Progress:
    """Counts events done out of ``total`` and shows how fast and how long is left."""

    def __init__(
        self,
        total: int,
        out: TextIO,
        *,
        tty: bool,
        unit: str = "events",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.done_n = 0
        self.out = out
        self.tty = tty
        self.unit = unit
        self._clock = clock
        self._start = clock()
        self._next = self._start + (_TTY_INTERVAL if tty else _PLAIN_FIRST)
        self._bar_shown = False
        #: (time, events done) samples; the oldest is the start of the rate's window.
        self._samples: deque[tuple[float, int]] = deque([(self._start, 0)])

    def add(self, n: int) -> None:
        """Count ``n`` more events done; show progress if it is time to."""
        self.done_n += n
        now = self._clock()
        self._samples.append((now, self.done_n))
        # Keep one sample at or before the window's start, so the window spans RATE_WINDOW seconds.
        while len(self._samples) > 2 and self._samples[1][0] <= now - RATE_WINDOW:
            self._samples.popleft()
        if now < self._next and not (self.tty and self.done_n >= self.total):
            return
        self._next = now + (_TTY_INTERVAL if self.tty else _PLAIN_INTERVAL)
        if self.tty:
            self.out.write(f"\r{self._bar()} {self.status(now)}\033[K")
            self.out.flush()
            self._bar_shown = True
        else:
            print(self.status(now), file=self.out, flush=True)

    def status(self, now: float | None = None) -> str:
        """``12,000/60,000 events (20%), 5,100 events/s, ETA 8s``."""
        now = self._clock() if now is None else now
        share = self.done_n / self.total if self.total else 1.0
        text = f"{self.done_n:,}/{self.total:,} {self.unit} ({share:.0%})"
        rate = self.rate(now)
        if rate is None:
            return text
        text += f", {rate:,.0f} {self.unit}/s"
        left = max(self.total - self.done_n, 0)
        if left and rate > 0:
            text += f", ETA {format_duration(left / rate)}"
        return text

    def rate(self, now: float | None = None) -> float | None:
        """Events per second over the last ``RATE_WINDOW`` seconds (since the start, before that);
        None until there is something to measure."""
        now = self._clock() if now is None else now
        since, done_then = self._samples[0]
        elapsed = now - since
        if elapsed <= 0 or self.done_n == 0:
            return None
        return (self.done_n - done_then) / elapsed

    def line(self, text: str) -> None:
        """Print a line of the caller's own; a bar on a terminal is redrawn below it."""
        if self._bar_shown:
            self.out.write("\r\033[K")
            self._bar_shown = False
            self._next = 0.0  # redraw at the next add
        print(text, file=self.out, flush=True)

    def done(self) -> None:
        """End the bar's line on a terminal."""
        if self._bar_shown:
            self.out.write("\n")
            self.out.flush()
            self._bar_shown = False

    def _bar(self) -> str:
        share = min(self.done_n / self.total, 1.0) if self.total else 1.0
        filled = int(share * _BAR_WIDTH)
        return "[" + "#" * filled + "-" * (_BAR_WIDTH - filled) + "]"


def format_duration(seconds: float) -> str:
    """``8s``, ``3m27s``, ``1h02m``: a time left, to the precision that matters."""
    s = max(round(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
