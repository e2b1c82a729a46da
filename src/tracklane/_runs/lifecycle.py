"""The OICM client's run model: one active experiment, at most one active run, and their rules.

``OicmRuns`` decides *which* run events belong to: set and create experiments, start (create, resume
by name, attach by id) and end runs. It holds the engine (``_delivery.engine``), which delivers the
events and knows nothing about runs, and a store for the lifecycle calls. It runs on the engine's
loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from .._delivery.buffer import now_ms
from .._delivery.engine import Engine
from .._entities import Experiment, Metric, Run, RunData, RunInfo
from .._exceptions import (
    AuthenticationError,
    DeliveryError,
    InvalidInputError,
    NotFoundError,
    ServerError,
    ServerUnavailableError,
    TrackingError,
)
from .._settings import EngineConfig, JobRanks, launcher_run_id, system_metrics_node_id
from .._validation import USER_TAG_VALUE, tag_dict
from .._wire.run_end import RunEnd
from . import metadata
from .sysmetrics import sampler_interval, start_sampler, stop_sampler

logger = logging.getLogger("tracklane")

#: Longest a rank > 0 waits for rank 0 to create the job's run (model loading can take minutes).
RANK_ATTACH_WAIT = 600.0


class RunStore(Protocol):
    """What the run model needs from a store: a tracking server, or the local journal."""

    workspace_id: str | None

    @property
    def describe(self) -> str: ...
    async def check_platform(self) -> str | None: ...
    def ui_links(self, run: Run) -> tuple[str, str] | None: ...
    @property
    def mlflow_ui_url(self) -> str | None: ...
    async def get_experiment_by_name(self, name: str) -> Experiment | None: ...
    async def get_experiment(self, experiment_id: str) -> Experiment: ...
    async def create_experiment(
        self, name: str, tags: Mapping[str, str], artifact_location: str | None = None
    ) -> str: ...
    async def delete_experiment(self, experiment_id: str) -> None: ...
    async def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None: ...
    async def create_run(
        self,
        experiment_id: str,
        run_name: str,
        start_time: int,
        tags: Mapping[str, str],
        user_id: str | None = None,
    ) -> Run: ...
    async def get_run(self, run_id: str) -> Run: ...
    async def search_runs_by_name(self, experiment_id: str, run_name: str) -> list[Run]: ...
    async def update_run(
        self, run_id: str, status: str | None, end_time: int | None, run_name: str | None = None
    ) -> RunInfo | None: ...
    async def get_metric_history(self, run_id: str, key: str) -> list[Metric]: ...


class OicmRuns:
    """The active experiment and run of one client, and the calls that change them."""

    def __init__(self, engine: Engine, store: RunStore, config: EngineConfig, ranks: JobRanks) -> None:
        self.engine = engine
        self.store = store
        self.config = config
        #: In a distributed job only rank 0 creates and ends the run; the others attach to it.
        self.ranks = ranks
        self.experiment: Experiment | None = None
        self.run: RunInfo | None = None
        self.active: Run | None = None
        #: The active run's id: read on the hot path (any thread), written only on the loop.
        self.run_id: str | None = None
        #: Params logged to the active run, so a changing param is refused at the call.
        self.params: dict[str, str] = {}
        self.last_run: Run | None = None
        self.owns_run = False  # False in a forked child: the parent ends the run
        self._ended_at_shutdown: str | None = None  # the run end_active ended, for after_exit
        self._sampler: asyncio.Task[None] | None = None  # system metrics of the active run
        #: Run ends still under way: ``end_run`` detaches the run first, so a caller that stopped
        #: waiting (a cancelled, shielded ``end_run``) must not see ``close`` shut the engine under it.
        self._ending: set[asyncio.Task[Any]] = set()

    def after_fork(self) -> None:
        """In a forked child: log into the parent's run, but leave ending it to the parent."""
        self.owns_run = False
        self._sampler = None

    def after_exit(self) -> None:
        """After the exit flush: what is logged now (an atexit handler that runs after tracklane's)
        goes to the run the exit ended, through the journal (``_runtime.late``)."""
        if self.run_id is None and self._ended_at_shutdown is not None:
            self.run_id = self._ended_at_shutdown

    async def check_platform(self) -> None:
        """On OICM: the liveness and version checks, run once the engine has a loop."""
        await self.store.check_platform()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.engine.buffer.set_tags(self.run_id, tags)

    # -- experiments -----------------------------------------------------------------------------

    async def set_experiment(
        self, name: str | None, workspace_id: str | None, experiment_id: str | None = None
    ) -> Experiment:
        """By name (created if missing), or by ``experiment_id`` (MLflow's spelling; must exist)."""
        if (name is None) == (experiment_id is None):
            raise InvalidInputError("set_experiment: pass an experiment name, or experiment_id=, not both.")
        if self.run is not None:
            raise TrackingError(
                f"Run {self.run.run_id} is still active: end it (end_run() or leave its `with` "
                f"block) before switching to experiment {name or experiment_id!r}."
            )
        self._use_workspace(workspace_id)
        if experiment_id is not None:
            experiment: Experiment | None = await self.store.get_experiment(str(experiment_id))
        else:
            assert name is not None
            experiment = await self.store.get_experiment_by_name(name)
        if experiment is None:
            assert name is not None
            experiment = await self.store.get_experiment(await self._create_experiment(name, {}))
        elif experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"Experiment {experiment.name!r} (id {experiment.experiment_id}) is deleted. Restore it on "
                "the server, or choose another name: a deleted experiment's name stays taken."
            )
        self.experiment = experiment
        return experiment

    def _use_workspace(self, workspace_id: str | None) -> None:
        if workspace_id is not None and workspace_id != self.store.workspace_id:
            self.store.workspace_id = workspace_id
            # On OICM the journal names a destination by workspace too: look for its leftovers now.
            self.engine.resume_leftovers()

    def _require_experiment(self, what: str) -> Experiment:
        if self.experiment is None:
            raise TrackingError(f"No active experiment: call set_experiment(...) before {what}.")
        return self.experiment

    async def _create_experiment(self, name: str, tags: Mapping[str, str]) -> str:
        try:
            return await self.store.create_experiment(name, tags)
        except ServerError as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        found = await self.store.get_experiment_by_name(name)  # created meanwhile elsewhere
        if found is None:
            raise TrackingError(f"Experiment {name!r} exists but cannot be read back.")
        return found.experiment_id

    async def create_experiment(
        self, name: str, workspace_id: str | None, tags: Mapping[str, Any] | Iterable[str]
    ) -> Experiment:
        self._use_workspace(workspace_id)
        wanted = tag_dict(tags, "experiment")
        existing = await self.store.get_experiment_by_name(name)
        if existing is None:
            experiment_id = await self._create_experiment(name, wanted)
        else:
            experiment_id = existing.experiment_id
            for tag, value in wanted.items():
                if existing.tags.get(tag) != value and not (value == USER_TAG_VALUE and tag in existing.tags):
                    await self.store.set_experiment_tag(experiment_id, tag, value)
        return await self.store.get_experiment(experiment_id)

    async def set_experiment_tags(self, tags: Mapping[str, Any] | Iterable[str]) -> None:
        experiment = self._require_experiment("set_experiment_tags()")
        for tag, value in tag_dict(tags, "experiment").items():
            if experiment.tags.get(tag) != value and not (value == USER_TAG_VALUE and tag in experiment.tags):
                await self.store.set_experiment_tag(experiment.experiment_id, tag, value)
        self.experiment = await self.store.get_experiment(experiment.experiment_id)

    async def get_experiment_by_name(self, name: str) -> Experiment | None:
        return await self.store.get_experiment_by_name(name)

    async def delete_experiment(self, experiment_id: str) -> None:
        await self.store.delete_experiment(str(experiment_id))
        if self.experiment is not None and self.experiment.experiment_id == str(experiment_id):
            self.experiment = None

    # -- runs ------------------------------------------------------------------------------------

    async def start_run(
        self,
        run_id: str | None,
        run_name: str | None,
        tags: Mapping[str, Any] | Iterable[str] | None,
        log_system_metrics: bool | None = None,
    ) -> Run:
        """Create, resume by name, or attach by id (the OICM client's rules) and make it active.

        Samples system metrics while it is active unless ``log_system_metrics`` is False (None:
        ``$MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``, else on).
        """
        if self.run is not None:
            raise TrackingError(
                f"Run {self.run.run_id} is already active: end it (end_run() or leave its `with` "
                "block) before starting another."
            )
        sampling = sampler_interval(log_system_metrics, self.config.system_metrics_interval)
        wanted = tag_dict(tags, "run")
        run: Run | None = None
        if run_id is None and run_name is None:
            run_id = launcher_run_id()  # a launcher's run for this job, as MLflow reads it
        follower = self.ranks.distributed and not self.ranks.leader
        if run_id is not None:
            if run_name is not None:
                logger.warning(
                    "start_run: both run_id and run_name given; attaching to run %s and ignoring "
                    "run_name %r.",
                    run_id,
                    run_name,
                )
            try:
                run = await self.store.get_run(str(run_id))
            except NotFoundError:
                raise NotFoundError(
                    f"start_run: no run with id {run_id!r} on {self.store.describe}. Check the id, "
                    "or pass run_name= to create a new run."
                ) from None
            if run.info.lifecycle_stage == "deleted":
                raise TrackingError(f"start_run: run {run_id} is deleted; it cannot take new data.")
        else:
            experiment = self._require_experiment("start_run()")
            if run_name is not None:
                matches = await self.store.search_runs_by_name(experiment.experiment_id, run_name)
                if len(matches) > 1:
                    logger.warning(
                        "start_run: %d runs named %r in experiment %r; continuing the first listed "
                        "(the most recently started), %s.",
                        len(matches),
                        run_name,
                        experiment.name,
                        matches[0].info.run_id,
                    )
                run = matches[0] if matches else None
                if run is not None and not follower:
                    # Said once per start_run: new data joins a run that already holds some.
                    logger.warning(
                        "tracklane: resuming run %s (%s) in experiment %r: new data is added to it. "
                        "Pass another run_name for a new run.",
                        run_name,
                        run.info.run_id,
                        experiment.name,
                    )
                if run is None and follower:
                    run = await self._await_leaders_run(experiment, run_name)
            elif follower:
                raise TrackingError(
                    f"rank {self.ranks.rank} of {self.ranks.world_size}: start_run() needs the job's run: "
                    "pass the run_name rank 0 uses (the other ranks wait for its run), or run_id=, or set "
                    "MLFLOW_RUN_ID."
                )
            if run is None:
                name = run_name if run_name is not None else f"run-{secrets.token_hex(4)}"
                all_tags = {**metadata.run_context_tags(), **wanted}
                run = await self.store.create_run(
                    experiment.experiment_id, name, now_ms(), all_tags, user_id=all_tags.get(metadata.USER)
                )
                wanted = {}
        if run.info.status != "RUNNING" and not follower:
            await self.store.update_run(run.info.run_id, "RUNNING", None)
        new_tags = {
            k: v
            for k, v in wanted.items()
            if run.data.tags.get(k) != v and not (v == USER_TAG_VALUE and k in run.data.tags)
        }
        # A run resumed or attached is returned as it is now: running, with the tags just set.
        self.run = RunInfo(**{**run.info.__dict__, "status": "RUNNING", "end_time": None})
        data = RunData(run.data.metrics, run.data.params, {**run.data.tags, **new_tags})
        run = self.active = Run(self.run, data)
        self.params = dict(run.data.params)
        self.run_id = run.info.run_id
        self.owns_run = not follower
        if self.ranks.distributed and self.ranks.local_rank != 0:
            sampling = None  # one sampler per node: LOCAL_RANK 0's
        if new_tags:
            self.set_tags(new_tags)
        self._sampler = start_sampler(
            self.engine.buffer,
            self.store.get_metric_history,
            run,
            sampling,
            system_metrics_node_id(self.ranks),
        )
        links = self.store.ui_links(run)
        if links is not None:
            logger.info(
                "tracklane: run %s: %s (experiment: %s)", run.info.run_name or run.info.run_id, *links
            )
        return run

    async def _await_leaders_run(self, experiment: Experiment, run_name: str) -> Run:
        """A rank > 0 never creates the job's run (ranks racing to create it make one run each):
        it waits for rank 0's, at most ``RANK_ATTACH_WAIT`` seconds."""
        logger.info("tracklane: rank %d waits for rank 0's run %r.", self.ranks.rank, run_name)
        deadline = asyncio.get_running_loop().time() + RANK_ATTACH_WAIT
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.5)
            matches = await self.store.search_runs_by_name(experiment.experiment_id, run_name)
            if matches:
                return matches[0]
        raise TrackingError(
            f"rank {self.ranks.rank}: no run named {run_name!r} appeared in experiment {experiment.name!r} "
            f"within {RANK_ATTACH_WAIT:.0f}s; rank 0 creates it. Check that rank 0 runs with the same "
            "experiment and run_name, or pass run_id= (or MLFLOW_RUN_ID) to every rank."
        )

    async def end_run(
        self, status: str = "FINISHED", deadline: float | None = None, notice: bool = True
    ) -> None:
        """Deliver the run's events, then mark it ``status`` with an end time. No run: no-op.

        Waits while the server makes progress (see ``Engine.flush``). When it gives up, or the server
        is down or refuses the key, the run's events and its end are kept in the journal (a warning
        names it and the command that delivers them) and this returns. Raises DeliveryError
        afterwards if the server refused some events, AuthenticationError if delivery has stopped.
        """
        run = self.run
        if run is None:
            return
        await stop_sampler(self._sampler)  # its last samples go out with the flush below
        self._sampler = None
        data = self.active.data if self.active is not None else RunData()
        self.run_id = None  # nothing more is logged to it
        self.run = self.active = None
        self.params = {}
        end = now_ms()
        if not self.owns_run:
            # A rank > 0 (or a forked child): its events are delivered; the run is rank 0's to end.
            self.last_run = Run(run, data)
            await self.engine.flush(deadline)
            return
        self.last_run = Run(RunInfo(**{**run.__dict__, "status": status, "end_time": end}), data)
        task = asyncio.current_task()
        if task is not None:
            self._ending.add(task)
        try:
            if await finish_run(
                self.engine, self.store, RunEnd(run.run_id, status, end, run.run_name), deadline, notice
            ):
                print_run_links(self.store, run)
        finally:
            self._ending.discard(task)

    async def end_active(self, status: str, deadline: float | None) -> None:
        """At shutdown: end the active run with ``status`` (unless it is a forked child's parent's).
        Problems are logged, not raised: shutdown goes on."""
        if self.run is not None and self.owns_run:
            self._ended_at_shutdown = self.run.run_id
            try:
                await self.end_run(status, deadline, notice=False)
            except TrackingError as exc:
                logger.warning("tracklane: at shutdown: %s", exc)

    async def close(self, status: str | None, deadline: float | None) -> int:
        """End the active run with ``status`` (unless ``status`` is None), then shut the engine down.
        Returns how many events could not be kept."""
        if status is not None:
            await self.end_active(status, deadline)
        ending = self._ending - {asyncio.current_task()}
        if ending:  # each is bounded by the engine's own rule (no progress for retry_window)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait(ending, timeout=left)
        return await self.engine.shutdown(deadline)

    def keep_now(self, status: str) -> int:
        """Blocking, at interpreter exit with no event loop left: keep every undelivered event and the
        active run's end in the journal, for the next client on this storage or ``tracklane sync``."""
        ends = []
        run = self.run
        if run is not None and self.owns_run:
            ends.append(RunEnd(run.run_id, status, now_ms(), run.run_name))
            self.run_id = None
            self.run = self.active = None
        return self.engine.keep_now(ends)

    async def get_run(self, run_id: str) -> Run:
        await self.engine.flush()  # read your writes
        return await self.store.get_run(str(run_id))

    async def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        await self.engine.flush()
        return await self.store.get_metric_history(str(run_id), key)


async def finish_run(
    engine: Engine,
    store: RunStore,
    end: RunEnd,
    deadline: float | None = None,
    notice: bool = True,
    on_ended: Callable[[RunInfo], object] | None = None,
) -> bool:
    """Deliver what was logged (the run's events among it) and the run's artifacts, then end the run
    as ``end`` says: True if the server has it ended. ``on_ended`` gets the run's info when the
    server's reply to the end carries it (no read of the run needed for its View-run lines).

    Waits while the server makes progress (see ``Engine.flush``). When it gives up, or the server
    is down or refuses the key, the end is kept in the journal with the events (a warning names it
    and the command that delivers them). Raises DeliveryError afterwards if the server refused some
    events, AuthenticationError if delivery has stopped.
    """
    problem: TrackingError | None = None
    try:
        delivered = await engine.flush(deadline, end.run_id)
    except DeliveryError as exc:
        problem, delivered = exc, True
    except AuthenticationError as exc:
        problem, delivered = exc, False
    if delivered:  # then its artifacts
        try:
            delivered = await engine.deliver_artifacts(end.run_id, deadline)
        except DeliveryError as exc:
            problem = (
                DeliveryError([*problem.rejected, *exc.rejected])
                if isinstance(problem, DeliveryError)
                else exc
            )
        except AuthenticationError as exc:
            problem, delivered = problem or exc, False
    if delivered:
        try:
            info = await store.update_run(end.run_id, end.status, end.end_time)
            if info is not None and on_ended is not None:
                on_ended(info)
        except AuthenticationError as exc:
            problem, delivered = problem or exc, False
        except ServerUnavailableError:
            delivered = False
        except NotFoundError:
            # The server lost the run (an empty database, a deleted run): there is no end to keep.
            # Its refused events are what the caller must hear about, with their count.
            if isinstance(problem, DeliveryError):
                raise problem from None
            raise
    if not delivered:
        if await engine.keep_run_end(end):
            if notice and engine.blocked is None:
                await engine.journal_notice("in the retry window")
        elif engine.blocked is None and engine.undelivered(end.run_id) == 0 and await _end_now(store, end):
            # No journal to keep the end in, but the server answers and has every event of the run
            # (what is left in memory is other runs'): end it now.
            delivered = True
        elif engine.blocked is None and (left := engine.undelivered(end.run_id)):
            # Its events are in memory only: ending it now would show it complete while they are
            # missing. The engine ends it once they are delivered (at exit at the latest).
            engine.hold_run_end(end)
            logger.error(
                "tracklane: run %s is not ended yet: %d of its event(s) are neither on %s nor in the "
                "local journal (it cannot be written: a full or read-only disk). They are retried "
                "from memory, and the run is ended as %s once they are delivered, at exit at the "
                "latest; free space where path_to_storage= points to keep them safe meanwhile.",
                end.run_id,
                left,
                store.describe,
                end.status,
            )
        else:
            logger.error(
                "tracklane: run %s could not be ended as %s on %s, and the local journal cannot "
                "keep its end; its events stay in memory and are retried.",
                end.run_id,
                end.status,
                store.describe,
            )
    if problem is not None:
        raise problem
    return delivered


async def _end_now(store: RunStore, end: RunEnd) -> bool:
    try:
        await store.update_run(end.run_id, end.status, end.end_time)
    except TrackingError:
        return False
    return True


def print_run_links(store: RunStore, info: RunInfo) -> None:
    """MLflow's two lines at a run's end, on a plain MLflow server (OICM logs its own links at
    start, unless ``hide_host``)."""
    host = store.mlflow_ui_url
    if host is None:
        return
    experiment_url = f"{host}/#/experiments/{info.experiment_id}"
    sys.stdout.write(f"🏃 View run {info.run_name or info.run_id} at: {experiment_url}/runs/{info.run_id}\n")
    sys.stdout.write(f"🧪 View experiment at: {experiment_url}\n")
