"""A daemon thread running the event loop that ``TrackingClient``'s engine lives on.

A small thread of our own rather than anyio's blocking portal: the fork handling (``_process``)
must reach the loop object itself to make the parent's copy inert in a child, and the pid the
thread was started in tells a forked child that it is not its own. A daemon thread is never joined
implicitly at exit; every wait on it here has a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """Start a loop in a daemon thread; run coroutines on it from other threads, with bounds."""

    def __init__(self, name: str = "tracklane") -> None:
        self.name = name
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ready,), name=name, daemon=True)
        self._thread.start()
        ready.wait(5.0)

    def _main(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        try:
            self.loop.run_forever()
            self._cancel_leftovers()
        finally:
            self.loop.close()

    def _cancel_leftovers(self, timeout: float = 1.0) -> None:
        """Cancel the tasks still on the loop when it stops and let them unwind, bounded, as
        ``asyncio.run`` does: a task left pending would otherwise be closed by the garbage collector
        on a closed loop, and its cleanup would fail there ("Event loop is closed")."""
        tasks = asyncio.all_tasks(self.loop)
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        # asyncio.wait, not wait_for: on 3.11 wait_for awaits the cancelled task again, so a task
        # that will not unwind would hold the stop forever. One that will not is left: the process
        # is on its way out.
        with contextlib.suppress(RuntimeError):
            self.loop.run_until_complete(asyncio.wait(tasks, timeout=timeout))

    @property
    def alive(self) -> bool:
        return self.pid == os.getpid() and self._thread.is_alive() and not self.loop.is_closed()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result; raises TimeoutError after ``timeout``
        (the coroutine is then cancelled)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:  # not yet the builtin TimeoutError on 3.10
            future.cancel()
            raise TimeoutError(f"no result within {timeout}s") from None
        except BaseException:
            future.cancel()
            raise

    def stop(self, timeout: float = 2.0) -> None:
        if self.alive:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout)
