"""What ties ``TrackingClient`` to its process: the loop thread, the exit flush, SIGTERM, fork.

Every wait here is bounded, and one that lasts says so (``waiting``). The exit flush waits for the
server at most ``exit_timeout``, and only for this process's own events: what earlier processes left
in the journal is already safe on disk, and an exit (or a scheduler's grace between SIGTERM and
SIGKILL) spent delivering it would be spent on nothing at risk. It then keeps what is left in the
local journal (a disk write, bounded by ``_KEEP_GRACE``). Ctrl-C during any visible wait stops
waiting for the server at once and keeps the rest there; SIGTERM (what schedulers send before a
kill) flushes, ends the active run KILLED and then lets the signal do what it would have done,
calling a handler the application installed before us; a child made by ``os.fork`` starts with an
empty buffer and a fresh loop thread, so nothing of the parent's is sent twice and no lock held by
a parent thread can deadlock it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import logging
import multiprocessing.util
import os
import selectors
import signal
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, Protocol, TypeVar

from .._delivery.engine import Engine
from .._end_status import end_status, exit_status_of_process
from .._exceptions import ConfigurationError, TrackingError
from .._runtime.late import LateKeeper
from .._runtime.loop_thread import LoopThread
from .._runtime.waiting import WaitProgress, wait_with_progress

logger = logging.getLogger("tracklane")
T = TypeVar("T")

#: Extra seconds the exit may take beyond ``exit_timeout`` to write what is left to the local
#: journal and close connections. A local write normally takes well under a second, even for a
#: full buffer; the bound is for a disk that hangs, or a journal another process holds locked.
#: Cutting it short would lose events that only needed the disk.
_KEEP_GRACE = 30.0


class RunModel(Protocol):
    """What the runtime needs of a run model holding its engine (``OicmRuns``, ``MlflowRuns``)."""

    async def end_active(self, status: str, deadline: float | None) -> None:
        """End the runs this model started and still has active, as ``status``."""

    def after_fork(self) -> None:
        """In a forked child: the parent's runs are the parent's to end."""

    def after_exit(self) -> None:
        """After the exit flush: late events go to the runs it ended (see ``_runtime.late``)."""


class SyncRuntime:
    """Runs an engine on a daemon loop thread for the synchronous faces, for the life of a process.

    ``models`` are the run models holding the engine: at exit (or the last face's close) each ends
    its active runs before the engine delivers what is left and stops. Faces may add theirs later.
    """

    def __init__(self, engine: Engine, models: list[RunModel]) -> None:
        self.models = models
        self.engine = engine
        #: A SIGTERM that arrived during this runtime's shutdown, passed on once it is done.
        self.deferred_signal: Callable[[], None] | None = None
        self.closed = False
        self.thread = self._start()
        self._exit_hook = functools.partial(_shutdown_quietly, self)
        atexit.register(self._exit_hook)
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork_in_child(ref))
        # multiprocessing's fork workers (DataLoader's too) leave through os._exit, which skips
        # atexit; its own exit finalizers run, so the child's flush is registered there.
        multiprocessing.util.register_after_fork(self, _flush_at_worker_exit)
        self._install_sigterm_handler(ref)

    def _start(self) -> LoopThread:
        thread = LoopThread()
        thread.run(self._attach(), timeout=10.0)
        return thread

    async def _attach(self) -> None:
        import asyncio

        self.engine.attach(asyncio.get_running_loop())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None, what: str = "") -> T:
        """Run ``coro`` on the engine's loop and wait for it (at most ``timeout`` seconds).

        A wait past a couple of seconds with events left logs progress lines (``what`` names the
        wait: "end_run", "flush"). Ctrl-C once a line is shown does what it says: stop waiting for
        the server, keep the rest (and the end of a run being ended) in the journal, bounded by
        ``_KEEP_GRACE``, then raise the KeyboardInterrupt. From then on no wait of this runtime
        waits for the server; the journal's uploader still delivers in the background."""
        if self.closed:
            coro.close()
            raise ConfigurationError("This TrackingClient is closed; create a new one.")
        future = asyncio.run_coroutine_threadsafe(coro, self.thread.loop)
        progress = WaitProgress(self.engine, self.thread.loop, what)
        try:
            return wait_with_progress(future, timeout, progress)
        except concurrent.futures.TimeoutError:  # not yet the builtin TimeoutError on 3.10
            future.cancel()
            raise TimeoutError(f"no result within {timeout}s") from None
        except KeyboardInterrupt:
            if progress.lines:
                # What the line promised. Cancelling would also drop a run's end half-way (end_run
                # has let go of the run): give up instead, and let the call keep what is left.
                self.thread.loop.call_soon_threadsafe(self.engine.give_up)
                with contextlib.suppress(BaseException):
                    future.result(_KEEP_GRACE)
            future.cancel()
            raise
        except BaseException:
            future.cancel()
            raise

    def shutdown(self, timeout: float | None, status: str | None = None, earlier: bool = True) -> int:
        """Deliver what is left (while the server makes progress, never past ``timeout`` seconds if
        given), end an active run with ``status`` (default: see ``exit_status_of_process``), keep the
        rest in the journal, stop the loop thread. Returns how many events could not even be kept.
        ``earlier``: wait for what earlier processes left in the journal too (``close()`` does; the
        exit does not). Idempotent."""
        if self.closed or not self.thread.alive:
            self.closed = True
            return 0
        self.closed = True
        atexit.unregister(self._exit_hook)
        if status is None:
            status = exit_status_of_process()
        deadline = None if timeout is None else time.monotonic() + timeout
        loop = self.thread.loop
        future = asyncio.run_coroutine_threadsafe(self._close(status, deadline, earlier), loop)
        progress = WaitProgress(self.engine, loop, "close" if earlier else "the exit flush", deadline)
        try:
            # Bounded by the engine's own rule (no progress for retry_window) when timeout is None.
            left = wait_with_progress(future, None if timeout is None else timeout + _KEEP_GRACE, progress)
        except KeyboardInterrupt:
            # Ctrl-C during the exit flush: stop waiting for the server at once; what is left
            # goes to the journal, a local write bounded by _KEEP_GRACE. A second Ctrl-C leaves
            # without it.
            loop.call_soon_threadsafe(self.engine.give_up)
            try:
                left = future.result(_KEEP_GRACE)
            except (KeyboardInterrupt, concurrent.futures.TimeoutError):
                left = self.engine.pending()
            logger.warning("tracklane: exit flush interrupted by Ctrl-C; %d event(s) not kept.", left)
            return left
        except concurrent.futures.TimeoutError:
            left = self.engine.pending()
        finally:
            self.thread.stop()
            if not earlier and not self.thread.alive:  # a loop still running owns the buffer
                self._keep_late_events()
            deferred, self.deferred_signal = self.deferred_signal, None
            if deferred is not None:
                deferred()  # the SIGTERM that came during the flush, now it is done
        if left:
            logger.error("tracklane: %d event(s) could be neither delivered nor kept in the journal.", left)
        return left

    def _keep_late_events(self) -> None:
        """The interpreter is exiting: what atexit handlers that run after ours log is journaled."""
        for model in self.models:
            model.after_exit()
        LateKeeper(self.engine).install()

    async def _close(self, status: str, deadline: float | None, earlier: bool) -> int:
        for model in list(self.models):
            try:
                await model.end_active(status, deadline)
            except Exception as exc:  # one model's trouble must not keep the engine from its shutdown
                logger.warning("tracklane: at shutdown: %s", exc)
        if not earlier:
            await self._own_events_only(deadline)
        return await self.engine.shutdown(deadline)

    async def _own_events_only(self, deadline: float | None) -> None:
        """Deliver this process's events and artifacts (by progress, never past ``deadline``); once
        they are on the server, stop waiting for it: what earlier processes left stays in the
        journal, said in one line with the command that delivers it. (Not delivered: the engine's
        shutdown goes on as it would, and keeps the rest.)"""
        done = False
        with contextlib.suppress(TrackingError):  # the run models have reported these already
            done = await self.engine.flush(deadline)
        spool = self.engine.spool
        if not done or spool is None:
            return
        # This process's artifacts are its own too: their uploads were queued behind the events.
        for run_id in sorted(spool.runs):
            with contextlib.suppress(TrackingError):  # refused ones were said when they were refused
                if not await self.engine.deliver_artifacts(run_id, deadline):
                    return
        left = await spool.pending(None)  # ours are delivered: these are earlier processes'
        if left:
            logger.warning(
                "tracklane: %d event(s) that earlier processes left in %s are not on %s yet; they "
                "stay there for the next client on this storage, or deliver them now with: %s",
                left,
                spool.path,
                spool.api_host,
                spool.sync_command(),
            )
        self.engine.give_up()  # the shutdown's own flush has nothing of ours to wait for

    def _install_sigterm_handler(self, ref: weakref.ref[SyncRuntime]) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        previous = signal.getsignal(signal.SIGTERM)
        if previous is None:
            return  # installed outside Python: not ours to wrap

        def pass_on(signum: int, frame: FrameType | None) -> None:
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)  # die the way SIGTERM kills

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            runtime = ref()
            if runtime is not None and runtime.thread.alive:
                if runtime.closed:
                    # A shutdown is under way (an exit flush, interrupted right here: a pool's
                    # terminate() comes while its workers flush). Let it finish, bounded, then go.
                    runtime.deferred_signal = functools.partial(pass_on, signum, frame)
                    return
                # SIGTERM ends the run KILLED; the application's handler runs regardless.
                _shutdown_quietly(runtime, end_status(signal=True))
            pass_on(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)


def _shutdown_quietly(runtime: SyncRuntime, status: str | None = None) -> None:
    """The atexit hook (and SIGTERM's): bounded by ``exit_timeout``; a clean exit must never turn
    into a traceback because of telemetry."""
    try:
        runtime.shutdown(runtime.engine.config.exit_timeout, status, earlier=False)
    except Exception as exc:
        logger.warning("tracklane: exit flush failed: %s", exc)


def _disown(loop: asyncio.AbstractEventLoop) -> None:
    """Make the parent's loop, as copied into a forked child, inert.

    Its epoll instance is shared with the parent across fork: an unregister made here (by a
    transport or the loop being garbage collected) would remove the *parent's* sockets from the
    parent's epoll set, and the parent's requests would hang until they time out. Close this
    process's descriptor of it and give the dead loop an empty selector, so its clean-up touches
    nothing of the parent's.
    """
    selector = getattr(loop, "_selector", None)
    if isinstance(selector, selectors.BaseSelector):
        loop._selector = selectors.SelectSelector()  # type: ignore[attr-defined]
        inner = getattr(selector, "_selector", None)
        if inner is not None and hasattr(inner, "close"):
            inner.close()


def _flush_at_worker_exit(runtime: SyncRuntime) -> None:
    multiprocessing.util.Finalize(None, _shutdown_quietly, args=(runtime,), exitpriority=10)


def _after_fork_in_child(ref: weakref.ref[SyncRuntime]) -> None:
    runtime = ref()
    if runtime is None or runtime.closed:
        return
    # The parent's loop thread does not exist here, and its buffer is the parent's to send.
    _disown(runtime.thread.loop)
    runtime.engine.reset_after_fork()
    for model in runtime.models:
        model.after_fork()
    runtime.thread = runtime._start()
    atexit.unregister(runtime._exit_hook)
    atexit.register(runtime._exit_hook)
