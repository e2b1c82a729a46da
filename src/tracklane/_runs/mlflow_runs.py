"""MLflow's run model: runs by explicit id (``MlflowClient``), and the fluent API's run stack.

``MlflowRuns`` holds the engine like ``OicmRuns`` does, with MLflow's rules instead of OICM's:
experiments by name or id (``MLFLOW_EXPERIMENT_NAME``/``_ID``, else the default experiment "0"),
a stack of active runs (``nested=True`` pushes a child tagged ``mlflow.parentRunId``), runs created
with MLflow's context tags (``mlflow.user``, ``mlflow.source.*``), and any number of runs logged to
at once by id. Logging stays the engine's hot path; only lifecycle calls (create, end, search)
wait for the server, on the engine's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from .._delivery.buffer import now_ms
from .._delivery.engine import Engine
from .._entities import Experiment, Metric, PagedList, Run, RunData, RunInfo, ViewType
from .._exceptions import InvalidInputError, NotFoundError, ServerError, TrackingError
from .._settings import (
    EngineConfig,
    JobRanks,
    default_experiment,
    env_bool,
    launcher_run_id,
    system_metrics_node_id,
)
from .._stores.mlflow_sql import MlflowSqlBackend
from .._stores.offline import JournalBackend
from .._stores.rest import RestBackend
from .._validation import check_status, tag_dict
from .._wire.run_end import RunEnd
from . import metadata
from .lifecycle import finish_run, print_run_links
from .sysmetrics import sampler_interval, start_sampler, stop_sampler

logger = logging.getLogger("tracklane")
#: The lines MLflow's fluent API prints through its logging (``tracklane.mlflow`` prints them too).
mlflow_logger = logging.getLogger("tracklane.mlflow")

Store = RestBackend | JournalBackend | MlflowSqlBackend
DEFAULT_EXPERIMENT_ID = "0"


class MlflowRuns:
    """Experiments and runs with MLflow's semantics, for ``MlflowClient`` and ``tracklane.mlflow``."""

    def __init__(self, engine: Engine, store: Store, config: EngineConfig, ranks: JobRanks) -> None:
        self.engine = engine
        self.store = store
        self.config = config
        self.ranks = ranks
        self.experiment_id: str | None = None  # set_experiment's choice
        #: The fluent API's active runs, innermost last: one stack per thread, as MLflow keeps it
        #: (a thread pool of trials each runs its own); ``_stacks`` lists them all for the exit.
        self._local = threading.local()
        self._stacks: list[list[Run]] = []
        self.last_run_id: str | None = None
        #: Params logged per run by this process, so a changed value is refused at the call.
        self.params: dict[str, dict[str, str]] = {}
        self._samplers: dict[str, asyncio.Task[None] | None] = {}
        self._lock = threading.Lock()
        self.owns_runs = True  # False in a forked child: the parent ends its runs
        self._launcher_run_used = False
        #: Runs an integration created by id and ends itself; at exit, those still open end here
        #: (FAILED when the process dies of an exception: a framework's end hook never ran).
        self.owned: set[str] = set()
        self._ending_at_exit = False
        #: After the exit flush: the run fluent calls with no active run log to (``after_exit``).
        self.late_run_id: str | None = None

    @property
    def thread_stacks(self) -> threading.local:
        """The per-thread holder of ``stack`` (its ``stack`` attribute, once the thread has one)."""
        return self._local

    @property
    def stack(self) -> list[Run]:
        """The calling thread's stack of active runs (call it on the caller's thread, not the loop)."""
        try:
            return self._local.stack  # type: ignore[no-any-return]
        except AttributeError:
            stack: list[Run] = []
            self._local.stack = stack
            with self._lock:
                self._stacks.append(stack)
            return stack

    @property
    def run_id(self) -> str | None:
        """The calling thread's active run (read on the hot path)."""
        stack = self.stack
        return stack[-1].info.run_id if stack else None

    def params_of(self, run_id: str) -> dict[str, str]:
        found = self.params.get(run_id)
        if found is None:
            found = self.params[run_id] = {}
        return found

    def after_fork(self) -> None:
        self.owns_runs = False
        self._samplers = {}

    def after_exit(self) -> None:
        """After the exit flush, what is logged goes to the journal (``_runtime.late``): calls that
        name a run to it, fluent calls with no active run to the run the exit ended last (MLflow
        would start a new run; none can be created once the exit flush is done)."""
        if self._ending_at_exit:
            self.late_run_id = self.last_run_id

    # -- experiments -----------------------------------------------------------------------------

    async def set_experiment(self, name: str | None, experiment_id: str | None) -> Experiment:
        if (name is None) == (experiment_id is None):
            raise InvalidInputError(
                "set_experiment: pass exactly one of experiment_name= and experiment_id=."
            )
        if experiment_id is not None:
            try:
                experiment = await self.store.get_experiment(str(experiment_id))
            except NotFoundError:
                raise NotFoundError(
                    f"set_experiment: no experiment with id {experiment_id!r}. Check the id, or pass "
                    "experiment_name= to create one."
                ) from None
        else:
            assert name is not None
            found = await self.store.get_experiment_by_name(name)
            if found is None:
                mlflow_logger.info(
                    "Experiment with name '%s' does not exist. Creating a new experiment.", name
                )
                experiment = await self.store.get_experiment(await self._create_experiment(name, {}))
            else:
                experiment = found
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"Experiment {experiment.name!r} (id {experiment.experiment_id}) is deleted. Restore it "
                "(restore_experiment) or choose another name: a deleted experiment's name stays taken."
            )
        self.experiment_id = experiment.experiment_id
        return experiment

    async def _create_experiment(
        self, name: str, tags: Mapping[str, str], artifact_location: str | None = None
    ) -> str:
        try:
            return await self.store.create_experiment(name, tags, artifact_location)
        except ServerError as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        found = await self.store.get_experiment_by_name(name)  # created meanwhile elsewhere
        if found is None:
            raise TrackingError(f"Experiment {name!r} exists but cannot be read back.") from None
        return found.experiment_id

    async def create_experiment(
        self, name: str, artifact_location: str | None, tags: Mapping[str, Any] | Iterable[str] | None
    ) -> str:
        """MLflow's rule: a name that exists is an error (RESOURCE_ALREADY_EXISTS)."""
        return await self.store.create_experiment(name, tag_dict(tags, "experiment"), artifact_location)

    async def active_experiment_id(self) -> str:
        """set_experiment's, else ``$MLFLOW_EXPERIMENT_NAME``/``_ID``, else the default experiment."""
        if self.experiment_id is not None:
            return self.experiment_id
        name, experiment_id = default_experiment()
        if experiment_id is not None:
            return experiment_id
        if name is not None:
            return (await self.set_experiment(name, None)).experiment_id
        return DEFAULT_EXPERIMENT_ID

    async def search_experiments(
        self,
        view_type: int,
        max_results: int | None,
        filter_string: str | None,
        order_by: list[str] | None,
        page_token: str | None,
    ) -> PagedList[Experiment]:
        found, token = await self.store.search_experiments(
            view_type, max_results, filter_string, order_by, page_token
        )
        return PagedList(found, token)

    # -- runs by id (MlflowClient) ---------------------------------------------------------------

    async def create_run(
        self,
        experiment_id: str,
        start_time: int | None,
        tags: Mapping[str, Any] | Iterable[str] | None,
        run_name: str | None,
    ) -> Run:
        tags = tag_dict(tags, "run")
        return await self.store.create_run(
            str(experiment_id),
            run_name or "",
            start_time if start_time is not None else now_ms(),
            tags,
            user_id=tags.get(metadata.USER, "unknown"),
        )

    async def get_run(self, run_id: str) -> Run:
        await self.engine.flush(run_id=str(run_id))  # read your writes
        return await self.store.get_run(str(run_id))

    async def search_runs(
        self,
        experiment_ids: list[str],
        filter_string: str,
        view_type: int,
        max_results: int,
        order_by: list[str] | None,
        page_token: str | None,
    ) -> PagedList[Run]:
        ViewType.to_string(view_type)  # a clear error for a bad view type
        await self.engine.flush()
        found, token = await self.store.search_runs(
            [str(e) for e in experiment_ids], filter_string, view_type, max_results, order_by, page_token
        )
        return PagedList(found, token)

    async def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        await self.engine.flush(run_id=str(run_id))
        return await self.store.get_metric_history(str(run_id), key)

    async def set_terminated(
        self, run_id: str, status: str | None, end_time: int | None, links: bool = True
    ) -> None:
        """Deliver what was logged, then end the run (kept in the journal if the server is away).
        ``links``: print MLflow's View-run lines (not when MLflow itself prints them: the plugin)."""
        status = check_status(status or "FINISHED")
        # No read first: with the server down, the end must still be kept (finish_run journals it).
        end = RunEnd(str(run_id), status, end_time if end_time is not None else now_ms())
        # The links need the run's experiment and name: MLflow's reply to runs/update carries them,
        # so the end costs that one round trip (MLflow reads the run first); a store whose reply
        # does not (the database, the journal: no round trip) is read after the end.
        replied: list[RunInfo] = []
        ended = await finish_run(self.engine, self.store, end, on_ended=replied.append)
        if links and ended:
            with contextlib.suppress(TrackingError):  # the link is a courtesy
                print_run_links(
                    self.store, replied[0] if replied else (await self.store.get_run(run_id)).info
                )

    async def delete_tag(self, run_id: str, key: str) -> None:
        await self.engine.flush(run_id=str(run_id))  # a set_tag logged before must not land after
        await self.store.delete_tag(str(run_id), key)

    # -- the fluent API's run stack ------------------------------------------------------------------

    async def start_run(
        self,
        run_id: str | None,
        experiment_id: str | None,
        run_name: str | None,
        nested: bool,
        parent_run_id: str | None,
        tags: Mapping[str, Any] | Iterable[str] | None,
        description: str | None,
        log_system_metrics: bool | None,
        stack: list[Run],
    ) -> Run:
        """MLflow's ``start_run``: resume ``run_id`` (or ``$MLFLOW_RUN_ID``), else create a run in
        the active experiment, nested under the active run when ``nested``. ``stack``: the calling
        thread's (this runs on the engine's loop)."""
        if stack and not nested and parent_run_id is None:
            raise TrackingError(
                f"Run with UUID {stack[-1].info.run_id} is already active. To start a new run, "
                "first end the current run with mlflow.end_run(). To start a nested run, call "
                "start_run with nested=True."
            )
        if stack and parent_run_id is not None and parent_run_id != stack[-1].info.run_id:
            raise TrackingError(
                f"Current run with UUID {stack[-1].info.run_id} does not match the specified "
                f"parent_run_id {parent_run_id}. To start a new nested run under the parent run with "
                f"UUID {parent_run_id}, first end the current run with mlflow.end_run()."
            )
        user_tags = tag_dict(tags, "run")
        if description is not None:
            user_tags[metadata.NOTE] = description
        wanted = log_system_metrics if log_system_metrics is not None else _mlflow_sampling_default()
        sampling = sampler_interval(wanted, self.config.system_metrics_interval)
        existing = run_id
        if existing is None and not self._launcher_run_used:
            # MLflow resumes $MLFLOW_RUN_ID once (it unsets the variable); later runs are new.
            existing = launcher_run_id()
            self._launcher_run_used = existing is not None
        parent = parent_run_id or (stack[-1].info.run_id if nested and stack else None)
        if existing is not None:
            run = await self._resume(str(existing), experiment_id, user_tags)
        else:
            if parent is not None:
                parent_run = await self.store.get_run(parent)
                if parent_run.info.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"start_run: cannot start a run under parent run {parent}: it is deleted."
                    )
                user_tags[metadata.PARENT_RUN_ID] = parent
            experiment = (
                str(experiment_id) if experiment_id is not None else await self.active_experiment_id()
            )
            all_tags = {**metadata.run_context_tags(), **user_tags}
            run = await self.store.create_run(
                experiment, run_name or "", now_ms(), all_tags, user_id=all_tags.get(metadata.USER)
            )
        with self._lock:
            stack.append(run)
        self.params[run.info.run_id] = dict(run.data.params)
        if self.ranks.distributed and self.ranks.local_rank != 0:
            sampling = None  # one sampler per node
        self._samplers[run.info.run_id] = start_sampler(
            self.engine.buffer,
            self.store.get_metric_history,
            run,
            sampling,
            system_metrics_node_id(self.ranks),
        )
        return run

    async def _resume(self, run_id: str, experiment_id: str | None, tags: dict[str, str]) -> Run:
        try:
            run = await self.store.get_run(run_id)
        except NotFoundError:
            raise NotFoundError(
                f"start_run: no run with id {run_id!r} on {self.store.describe}. Check the id (and "
                "MLFLOW_RUN_ID), or start a new run without run_id."
            ) from None
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(f"start_run: run {run_id} is deleted; restore it (restore_run) to log to it.")
        if experiment_id is not None and str(experiment_id) != run.info.experiment_id:
            raise TrackingError(
                f"start_run: run {run_id} belongs to experiment {run.info.experiment_id}, not "
                f"{experiment_id}."
            )
        if run.info.status != "RUNNING":
            await self.store.update_run(run_id, "RUNNING", None)
        if tags:
            self.engine.buffer.set_tags(run_id, tags)
        info = RunInfo(**{**run.info.__dict__, "status": "RUNNING", "end_time": None})
        return Run(info, RunData(run.data.metrics, run.data.params, {**run.data.tags, **tags}))

    def push(self, run: Run, stack: list[Run]) -> None:
        """Make ``run``, started elsewhere (MLflow's own ``start_run``, through the plugin store),
        the innermost active run of ``stack`` (the calling thread's)."""
        with self._lock:
            stack.append(run)
        self.params[run.info.run_id] = dict(run.data.params)

    async def pop(self, stack: list[Run]) -> Run | None:
        """Take the innermost run off ``stack`` (a thread's) and stop its sampler, without ending
        it on the server: ``end_run`` does that, or MLflow's own ``end_run`` through the plugin."""
        with self._lock:
            if not stack:
                return None
            run = stack.pop()
        run_id = run.info.run_id
        await stop_sampler(self._samplers.pop(run_id, None))
        self.last_run_id = run_id
        self.params.pop(run_id, None)
        return run

    def active_runs(self) -> list[list[Run]]:
        """Every thread's stack of active runs (copies), for MLflow's cross-thread lookups."""
        with self._lock:
            return [list(stack) for stack in self._stacks]

    async def end_run(self, status: str, stack: list[Run], deadline: float | None = None) -> None:
        """End the innermost run of ``stack`` (a thread's): deliver its events and artifacts, mark it
        ``status``, print its link."""
        run = await self.pop(stack)
        if run is None:
            return
        run_id = run.info.run_id
        if not self.owns_runs:
            await self.engine.flush(deadline, run_id)
            return
        end = RunEnd(run_id, check_status(status), now_ms(), run.info.run_name)
        if await finish_run(self.engine, self.store, end, deadline):
            print_run_links(self.store, run.info)

    async def end_active(self, status: str, deadline: float | None) -> None:
        """At exit: end every active run, innermost first (MLflow's atexit ``end_run``), and the
        runs an integration owns."""
        self._ending_at_exit = any(self._stacks)
        for run_id in sorted(self.owned):
            self.owned.discard(run_id)
            try:
                await self.set_terminated(run_id, status, None)
            except TrackingError as exc:
                logger.warning("tracklane: at shutdown: %s", exc)
        for stack in list(self._stacks):
            while stack:
                try:
                    await self.end_run(status, stack, deadline)
                except TrackingError as exc:
                    logger.warning("tracklane: at shutdown: %s", exc)


def _mlflow_sampling_default() -> bool:
    """MLflow samples system metrics only when ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` says so."""
    return env_bool("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "start_run(log_system_metrics=...)") is True
