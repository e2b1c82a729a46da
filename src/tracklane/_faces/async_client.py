"""``AsyncTrackingClient``: the same engine, on the caller's own event loop.

The rule for logging calls (``log_metric``, ``log_params``, ``set_tag`` ...): they are plain
methods that validate, stamp and enqueue at once, never awaiting I/O, and return an awaitable.
Awaiting it is optional. It completes at once while the buffer has room; when the buffer is full
it waits, without blocking the loop, until the worker has drained it below its bound: that is
backpressure for producers that want it. A call that is not awaited is never lost: on a full
buffer it is still accepted (``overflow="spill"``, the default) or dropped and counted under a
drop policy. ``overflow="block"`` is refused here: blocking would stop the very loop that drains.

Lifecycle and read calls are coroutines that run on the same loop as the worker; there is no
extra thread.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import time
from collections.abc import Generator, Mapping
from types import TracebackType
from typing import Any

from .._delivery.buffer import Buffer
from .._end_status import end_status, exit_status_of_process
from .._entities import ActiveRun, Experiment, FileInfo, Metric, Run
from .._exceptions import ConfigurationError
from .._faces.base import ClientBase
from .._runs.lifecycle import OicmRuns
from .._validation import check_status, tag_dict
from . import artifact_calls


class Room:
    """What an async logging call returns: awaiting it waits for room in the buffer."""

    __slots__ = ("_buffer",)

    def __init__(self, buffer: Buffer) -> None:
        self._buffer = buffer

    def __await__(self) -> Generator[Any, None, None]:
        if not self._buffer.has_room():
            yield from self._buffer.wait_for_room().__await__()


class AsyncActiveRun(ActiveRun):
    """The run ``start_run`` made active; leaving its ``async with`` block ends it."""

    __slots__ = ("_client",)

    def __init__(self, run: Run, client: AsyncTrackingClient) -> None:
        super().__init__(run, _no_sync_end)
        self._client = client

    async def __aenter__(self) -> AsyncActiveRun:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.end_run(end_status(exc_type))


class StartRun:
    """``await tc.start_run(...)`` gives the run; ``async with tc.start_run(...)`` also ends it."""

    def __init__(self, client: AsyncTrackingClient, args: tuple[Any, ...]) -> None:
        self._client = client
        self._args = args
        self._run: AsyncActiveRun | None = None

    async def _start(self) -> AsyncActiveRun:
        runs = await self._client._attached()
        run = await runs.start_run(*self._args)
        self._run = AsyncActiveRun(run, self._client)
        return self._run

    def __await__(self) -> Generator[Any, None, AsyncActiveRun]:
        return self._start().__await__()

    async def __aenter__(self) -> AsyncActiveRun:
        return await self._start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._run is not None
        await self._run.__aexit__(exc_type, exc, tb)


class AsyncTrackingClient(ClientBase[AsyncActiveRun]):
    """``TrackingClient`` for asyncio applications: same API, lifecycle calls awaited.

    Use as ``async with AsyncTrackingClient(...) as tc:``; leaving the block (or ``await
    tc.aclose()``) flushes within ``exit_timeout`` and ends an active run. See the module
    docstring for the rule on logging calls. Arguments are those of ``TrackingClient``.
    """

    def _start(self) -> None:
        if self._engine.config.overflow == "block":
            raise ConfigurationError(
                "AsyncTrackingClient cannot block its own event loop: await the logging calls for "
                "backpressure, and use overflow='spill' (default), 'drop_newest' or 'drop_oldest'."
            )
        self._room = Room(self._engine.buffer)
        self._closed = False
        self._exit_hook: functools.partial[None] | None = None

    def _wrap(self, run: Run) -> AsyncActiveRun:
        return AsyncActiveRun(run, self)

    async def _attached(self) -> OicmRuns:
        """The run model, its engine attached to the running loop on first use."""
        if self._closed:
            raise ConfigurationError("This AsyncTrackingClient is closed; create a new one.")
        if not self._engine.attached:
            self._engine.attach(asyncio.get_running_loop())
            if self._exit_hook is None:
                # A client nobody closed keeps its events: at interpreter exit, with its loop gone,
                # they (and the active run's end) go to the journal for the next client or sync.
                self._exit_hook = functools.partial(_keep_at_exit, self._runs)
                atexit.register(self._exit_hook)
            await self._runs.check_platform()
        return self._runs

    async def __aenter__(self) -> AsyncTrackingClient:
        await self._attached()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose(status=end_status(exc_type))

    async def aclose(self, timeout: float | None = None, status: str = "FINISHED") -> int:
        """Deliver what is left (while the server makes progress, or at most ``timeout`` s), end an
        active run with ``status``, stop the worker; the rest stays in the local journal. Returns
        how many events could not even be kept there (0 normally). Idempotent."""
        if self._closed:
            return 0
        self._closed = True
        if self._exit_hook is not None:
            atexit.unregister(self._exit_hook)
        if not self._engine.attached:
            return 0
        deadline = None if timeout is None else time.monotonic() + timeout
        return await asyncio.shield(self._runs.close(status, deadline))

    # -- experiments -----------------------------------------------------------------------------

    async def set_experiment(self, experiment_name: str, workspace_id: str | None = None) -> Experiment:
        """Make ``experiment_name`` the active experiment, creating it if missing."""
        return await (await self._attached()).set_experiment(experiment_name, workspace_id)

    async def create_experiment(
        self,
        experiment_name: str,
        workspace_id: str | None = None,
        tags: Mapping[str, Any] | list[str] | None = None,
    ) -> Experiment:
        """Create an experiment (or return the one with that name), adding tag names to it."""
        return await (await self._attached()).create_experiment(experiment_name, workspace_id, tags or ())

    async def get_experiment_by_name(self, name: str) -> Experiment | None:
        """The experiment called ``name``, or None."""
        return await (await self._attached()).get_experiment_by_name(name)

    async def delete_experiment(self, experiment_id: str) -> None:
        """Mark an experiment deleted."""
        await (await self._attached()).delete_experiment(experiment_id)

    async def set_experiment_tags(self, tag_names: Mapping[str, Any] | list[str]) -> None:
        """Add tag names to the active experiment."""
        await (await self._attached()).set_experiment_tags(tag_names)

    # -- runs ------------------------------------------------------------------------------------

    def start_run(
        self,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, Any] | list[str] | None = None,
        log_system_metrics: bool | None = None,
    ) -> StartRun:
        """Start, resume by name, or attach by id; ``await`` it, or ``async with`` it to end it
        on leaving (FINISHED, FAILED on an exception, KILLED on cancellation or Ctrl-C)."""
        return StartRun(self, (run_id, run_name, tags, log_system_metrics))

    async def end_run(self, status: str = "FINISHED") -> None:
        """Deliver the run's events, then end it. Cancelling the caller does not cancel this:
        the run still ends and no event is lost. Raises DeliveryError for refused events."""
        runs = await self._attached()
        await asyncio.shield(runs.end_run(check_status(status)))

    async def get_run(self, run_id: str) -> Run:
        """The run as stored, including everything logged before this call."""
        return await (await self._attached()).get_run(run_id)

    async def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        """Every point of metric ``key``, including those logged before this call."""
        return await (await self._attached()).get_metric_history(run_id, key)

    # -- artifacts: the snapshot (a local copy) runs in a worker thread, never on the loop ----------

    async def log_artifact(self, local_path: Any, artifact_path: str | None = None) -> None:
        """``TrackingClient.log_artifact``, awaitable: the copy runs off the loop; the upload in the
        background."""
        run_id = self._active_run_id()
        await asyncio.to_thread(
            artifact_calls.log_artifact, self._artifacts, run_id, local_path, artifact_path
        )

    async def log_artifacts(
        self, local_dir: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        run_id = self._active_run_id()
        await asyncio.to_thread(self._artifacts.log_dir, run_id, local_dir, artifact_path)

    async def log_text(self, text: str, artifact_file: str) -> None:
        run_id = self._active_run_id()
        await asyncio.to_thread(artifact_calls.log_text, self._artifacts, run_id, text, artifact_file)

    async def log_dict(self, dictionary: Any, artifact_file: str) -> None:
        run_id = self._active_run_id()
        await asyncio.to_thread(artifact_calls.log_dict, self._artifacts, run_id, dictionary, artifact_file)

    async def log_figure(
        self, figure: Any, artifact_file: str, save_kwargs: Mapping[str, Any] | None = None
    ) -> None:
        run_id = self._active_run_id()
        await asyncio.to_thread(
            artifact_calls.log_figure, self._artifacts, run_id, figure, artifact_file, save_kwargs
        )

    async def log_image(
        self,
        image: Any,
        artifact_file: str | None = None,
        key: str | None = None,
        step: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        run_id = self._active_run_id()
        await asyncio.to_thread(
            artifact_calls.log_image,
            self._artifacts,
            self._engine.buffer,
            run_id,
            image,
            artifact_file,
            key,
            step,
            timestamp,
        )

    async def log_table(self, data: Any, artifact_file: str) -> None:
        run_id = self._active_run_id()
        await asyncio.to_thread(
            artifact_calls.log_table, self._artifacts, self._engine.buffer, run_id, data, artifact_file
        )

    async def list_artifacts(self, path: str | None = None, run_id: str | None = None) -> list[FileInfo]:
        await self._attached()
        return await artifact_calls.list_artifacts(
            self._engine, self._store, run_id or self._active_run_id(), path
        )

    async def download_artifacts(
        self, path: str = "", dst_path: str | None = None, run_id: str | None = None
    ) -> str:
        await self._attached()
        run_id = run_id or self._active_run_id()
        return await artifact_calls.download_artifacts(self._engine, self._store, run_id, path, dst_path)

    async def restore_artifact(self, name: str, run_id: str | None = None) -> Any:
        await self._attached()
        run_id = run_id or self._active_run_id()
        return await artifact_calls.restore_artifact(self._engine, self._store, run_id, name)

    async def get_artifact_uri(self, artifact_path: str | None = None, run_id: str | None = None) -> str:
        await self._attached()
        return await artifact_calls.artifact_uri(self._store, run_id or self._active_run_id(), artifact_path)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event logged before this call is delivered; False on timeout.
        Cancelling it loses nothing: the events stay queued."""
        await self._attached()
        deadline = None if timeout is None else time.monotonic() + timeout
        return await self._engine.flush(deadline)

    # -- logging: validate, stamp, enqueue; await for backpressure --------------------------------

    def log_metric(
        self, key: str, value: float, step: int | None = None, timestamp: int | None = None
    ) -> Room:
        """Log one metric point. Raises InvalidInputError at the call."""
        self._buffer.log_metric(self._runs.run_id, key, value, step, timestamp)
        return self._room

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None, timestamp: int | None = None
    ) -> Room:
        """Log several metrics at one step and time."""
        self._buffer.log_metrics(self._runs.run_id, metrics, step, timestamp)
        return self._room

    def log_param(self, key: str, value: Any) -> Room:
        """Log a param, stored as ``str(value)``."""
        self._buffer.log_params(self._runs.run_id, {key: value}, self._runs.params)
        return self._room

    def log_params(self, params: Mapping[str, Any]) -> Room:
        """Log several params."""
        self._buffer.log_params(self._runs.run_id, params, self._runs.params)
        return self._room

    def set_tag(self, key: str, value: Any) -> Room:
        """Set a run tag; the last value set wins."""
        self._buffer.set_tags(self._runs.run_id, {key: value})
        return self._room

    def set_tags(self, tags: Mapping[str, Any]) -> Room:
        """Set several run tags."""
        self._buffer.set_tags(self._runs.run_id, tags)
        return self._room

    def set_run_tags(self, tag_names: Mapping[str, Any] | list[str]) -> Room:
        """Add tag names to the active run (name as key, ``_OI_USER_TAG`` as value)."""
        self._buffer.set_tags(self._runs.run_id, tag_dict(tag_names, "run"))
        return self._room


def _keep_at_exit(runs: OicmRuns) -> None:
    loop = runs.engine.buffer.loop
    if loop is not None and loop.is_running():
        return  # its loop still runs (in another thread): that loop's shutdown is in charge
    lost = runs.keep_now(exit_status_of_process())
    if lost:
        logging.getLogger("tracklane").error("tracklane: %d event(s) could not be kept at exit.", lost)


def _no_sync_end(status: str) -> None:
    raise TypeError("an AsyncTrackingClient run ends with `async with` or `await tc.end_run()`")
