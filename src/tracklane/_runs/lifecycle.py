"""Experiments and runs: the OICM client's rules for the active experiment and run.

``Lifecycle`` is the half of the engine that decides *which* run events belong to: set and create
experiments, start (create, resume by name, attach by id) and end runs. It runs on the engine's
loop; the other half (``_engine.Engine``: buffer, worker, delivery) inherits it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast

from .._delivery.batching import Batch
from .._entities import Experiment, Metric, Run, RunData, RunInfo
from .._exceptions import DeliveryError, InvalidInputError, NotFoundError, ServerError, TrackingError
from .._limits import MAX_EXPERIMENT_TAG_VALUE_LENGTH
from .._runs.sysmetrics import sampler_interval, start_sampler, stop_sampler
from .._settings import EngineConfig
from .._stores.rest import log_ui_links
from .._validation import check_key, text_value

if TYPE_CHECKING:
    from .._delivery.engine import Engine

logger = logging.getLogger("tracklane")

#: The value OICM stores for a tag given by name only (``set_run_tags(["baseline"])``).
USER_TAG_VALUE = "_OI_USER_TAG"


class Backend(Protocol):
    """What the engine needs from a store: a tracking server, or the local journal."""

    workspace_id: str | None

    @property
    def describe(self) -> str: ...
    async def get_experiment_by_name(self, name: str) -> Experiment | None: ...
    async def get_experiment(self, experiment_id: str) -> Experiment: ...
    async def create_experiment(self, name: str, tags: Mapping[str, str]) -> str: ...
    async def delete_experiment(self, experiment_id: str) -> None: ...
    async def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None: ...
    async def create_run(
        self, experiment_id: str, run_name: str, start_time: int, tags: Mapping[str, str]
    ) -> Run: ...
    async def get_run(self, run_id: str) -> Run: ...
    async def search_runs_by_name(self, experiment_id: str, run_name: str) -> list[Run]: ...
    async def update_run(self, run_id: str, status: str, end_time: int | None) -> None: ...
    async def log_batch(self, batch: Batch, deadline: float | None = None) -> None: ...
    async def get_metric_history(self, run_id: str, key: str) -> list[Metric]: ...
    async def aclose(self) -> None: ...


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Lifecycle:
    """The active experiment and run of one client, and the calls that change them."""

    backend: Backend
    config: EngineConfig

    def __init__(self) -> None:
        self.experiment: Experiment | None = None
        self.run: RunInfo | None = None
        self.active: Run | None = None
        self._run_id: str | None = None  # read on the hot path; written only on the loop
        self.last_run: Run | None = None
        self._params: dict[str, dict[str, str]] = {}
        self._owns_run = False  # False in a forked child: the parent ends the run
        self._sampler: asyncio.Task[None] | None = None  # system metrics of the active run

    async def flush(self) -> None:
        raise NotImplementedError  # the engine's: runs end only after their events are settled

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        raise NotImplementedError

    # -- experiments -----------------------------------------------------------------------------

    async def set_experiment(self, name: str, workspace_id: str | None) -> Experiment:
        if self.run is not None:
            raise TrackingError(
                f"Run {self.run.run_id} is still active: end it (end_run() or leave its `with` "
                f"block) before switching to experiment {name!r}."
            )
        self._use_workspace(workspace_id)
        experiment = await self.backend.get_experiment_by_name(name)
        if experiment is None:
            experiment_id = await self._create_experiment(name, {})
            experiment = await self.backend.get_experiment(experiment_id)
        elif experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"Experiment {name!r} (id {experiment.experiment_id}) is deleted. Restore it on the "
                "server, or choose another name: a deleted experiment's name stays taken."
            )
        self.experiment = experiment
        return experiment

    def _use_workspace(self, workspace_id: str | None) -> None:
        if workspace_id is not None:
            self.backend.workspace_id = workspace_id

    def _require_experiment(self, what: str) -> Experiment:
        if self.experiment is None:
            raise TrackingError(f"No active experiment: call set_experiment(...) before {what}.")
        return self.experiment

    async def _create_experiment(self, name: str, tags: Mapping[str, str]) -> str:
        try:
            return await self.backend.create_experiment(name, tags)
        except ServerError as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        found = await self.backend.get_experiment_by_name(name)  # created meanwhile elsewhere
        if found is None:
            raise TrackingError(f"Experiment {name!r} exists but cannot be read back.")
        return found.experiment_id

    async def create_experiment(
        self, name: str, workspace_id: str | None, tag_names: Iterable[str]
    ) -> Experiment:
        self._use_workspace(workspace_id)
        names = _tag_names(tag_names, "experiment")
        existing = await self.backend.get_experiment_by_name(name)
        if existing is None:
            experiment_id = await self._create_experiment(name, dict.fromkeys(names, USER_TAG_VALUE))
        else:
            experiment_id = existing.experiment_id
            for tag in names:
                if tag not in existing.tags:
                    await self.backend.set_experiment_tag(experiment_id, tag, USER_TAG_VALUE)
        return await self.backend.get_experiment(experiment_id)

    async def set_experiment_tags(self, tag_names: Iterable[str]) -> None:
        experiment = self._require_experiment("set_experiment_tags()")
        names = _tag_names(tag_names, "experiment")
        for tag in names:
            if tag not in experiment.tags:
                await self.backend.set_experiment_tag(experiment.experiment_id, tag, USER_TAG_VALUE)
        self.experiment = await self.backend.get_experiment(experiment.experiment_id)

    async def get_experiment_by_name(self, name: str) -> Experiment | None:
        return await self.backend.get_experiment_by_name(name)

    async def delete_experiment(self, experiment_id: str) -> None:
        await self.backend.delete_experiment(str(experiment_id))
        if self.experiment is not None and self.experiment.experiment_id == str(experiment_id):
            self.experiment = None

    # -- runs ------------------------------------------------------------------------------------

    async def start_run(
        self,
        run_id: str | None,
        run_name: str | None,
        tag_names: Iterable[str] | None,
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
        names = _tag_names(tag_names or (), "run")
        run: Run | None = None
        if run_id is not None:
            if run_name is not None:
                logger.warning(
                    "start_run: both run_id and run_name given; attaching to run %s and ignoring "
                    "run_name %r.",
                    run_id,
                    run_name,
                )
            try:
                run = await self.backend.get_run(str(run_id))
            except NotFoundError:
                raise NotFoundError(
                    f"start_run: no run with id {run_id!r} on {self.backend.describe}. Check the id, "
                    "or pass run_name= to create a new run."
                ) from None
            if run.info.lifecycle_stage == "deleted":
                raise TrackingError(f"start_run: run {run_id} is deleted; it cannot take new data.")
        else:
            experiment = self._require_experiment("start_run()")
            if run_name is not None:
                matches = await self.backend.search_runs_by_name(experiment.experiment_id, run_name)
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
            if run is None:
                name = run_name if run_name is not None else f"run-{secrets.token_hex(4)}"
                run = await self.backend.create_run(
                    experiment.experiment_id, name, now_ms(), dict.fromkeys(names, USER_TAG_VALUE)
                )
                names = []
        if run.info.status != "RUNNING":
            await self.backend.update_run(run.info.run_id, "RUNNING", None)
        self.run = RunInfo(**{**run.info.__dict__, "status": "RUNNING", "end_time": None})
        self.active = Run(self.run, run.data)
        self._params[run.info.run_id] = dict(run.data.params)
        self._run_id = run.info.run_id
        self._owns_run = True
        new_tags = [t for t in names if t not in run.data.tags]
        if new_tags:
            self.set_tags(dict.fromkeys(new_tags, USER_TAG_VALUE))
        self._sampler = start_sampler(
            cast("Engine", self), run, sampling
        )  # the engine is always the subclass
        log_ui_links(self.backend, run)
        return run

    async def end_run(self, status: str = "FINISHED") -> None:
        """Flush the run's events, then mark it ``status`` with an end time. No run: no-op.

        Raises DeliveryError afterwards if the server refused some of its events.
        """
        run = self.run
        if run is None:
            return
        await stop_sampler(self._sampler)  # its last samples go out with the flush below
        self._sampler = None
        failure: DeliveryError | None = None
        try:
            await self.flush()
        except DeliveryError as exc:
            failure = exc
        finally:
            data = self.active.data if self.active is not None else RunData()
            self._run_id = None
            self.run = self.active = None
        end = now_ms()
        await self.backend.update_run(run.run_id, status, end)
        self.last_run = Run(RunInfo(**{**run.__dict__, "status": status, "end_time": end}), data)
        self._params.pop(run.run_id, None)
        if failure is not None:
            raise failure

    async def get_run(self, run_id: str) -> Run:
        await self.flush()  # read your writes
        return await self.backend.get_run(str(run_id))

    async def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        await self.flush()
        return await self.backend.get_metric_history(str(run_id), key)


def _tag_names(names: Iterable[str], what: str) -> list[str]:
    if isinstance(names, str):
        raise InvalidInputError(
            f"{what} tags are a list of tag names, got the string {names!r}; pass [{names!r}]."
        )
    out = []
    for name in names:
        check_key(name, f"{what} tag")
        text_value(name, USER_TAG_VALUE, f"{what} tag", MAX_EXPERIMENT_TAG_VALUE_LENGTH)
        if name not in out:
            out.append(name)
    return out
