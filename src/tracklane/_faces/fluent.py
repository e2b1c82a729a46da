"""The state behind ``tracklane.mlflow``: MLflow's fluent API (a run stack per thread, as MLflow's).

``Fluent`` holds a session for the tracking URI (made on first use, so importing the module starts
no thread) and an ``MlflowRuns`` run model that the session ends at interpreter exit, as MLflow's
atexit ``end_run`` does. Logging with no active run starts one, as MLflow does.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

from .._delivery.buffer import Buffer
from .._entities import ActiveRun, Experiment, PagedList, Run, ViewType
from .._exceptions import InvalidInputError, NoActiveRunError, TrackingError
from .._limits import MAX_PARAM_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH
from .._runs.metadata import PARENT_RUN_ID
from .._runs.mlflow_runs import MlflowRuns
from .._settings import PROCESS_URIS, Destination, env, job_ranks, tracking_destination, truncate_long_values
from .._validation import check_status, mlflow_truncated
from . import artifact_calls
from .mlflow_client import SEARCH_MAX_RESULTS_DEFAULT, check_run_id
from .mlflow_errors import mlflow_face, reraise
from .run_operations import RunOperations, refused_async
from .session import Session, destination_key, on_reset, shared_session

T = TypeVar("T")

#: MLflow's fluent ``search_runs`` returns up to this many runs by default, paging as needed.
FLUENT_SEARCH_MAX_RESULTS = 100_000


@mlflow_face(hot=("log_metric",))
class Fluent:
    """The fluent API's process-wide state: tracking URI, session, run model. Its methods raise
    MLflow's exceptions (``mlflow_errors``)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._forget()
        on_reset(self.reset)
        _show_mlflow_lines()

    def _forget(self) -> None:
        self._uri: str | None = None
        self._destination: Destination | None = None
        self._session: Session | None = None
        self._runs: MlflowRuns | None = None
        self._runs_for: Destination | None = None  # the destination ``_runs`` logs to
        #: For the hot path: the run model's per-thread stacks, and the engine's buffer.
        self._stacks: threading.local | None = None
        self._buffer: Buffer | None = None
        #: Called after the tracking URI or the experiment changes: MLflow's own fluent module
        #: follows (set by ``integrations.mlflow_module`` once an MLflow attribute is used).
        self.on_change: Callable[[], None] | None = None
        # The process has one fluent module (``tracklane.mlflow``): its URIs are the process's.
        PROCESS_URIS.tracking = PROCESS_URIS.registry = None

    def reset(self) -> None:
        """Back to the state of a fresh import: no tracking URI, session or run (``session.reset``)."""
        with self._lock:
            self._forget()

    # -- where to log ----------------------------------------------------------------------------

    def set_tracking_uri(self, uri: str | Any) -> None:
        """Log to ``uri`` from the next run on (MLflow's rule: an active run keeps its server);
        ``MlflowClient()`` with no URI uses it too, as MLflow's does."""
        with self._lock:
            self._uri = str(uri) if uri else None
            self._destination = None
            PROCESS_URIS.tracking = self._uri
        self._changed()

    def get_tracking_uri(self) -> str:
        return self._where().uri

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def where(self) -> Destination:
        """The destination the next run logs to (resolved from the URI; starts nothing)."""
        return self._where()

    def is_tracking_uri_set(self) -> bool:
        """MLflow's rule: ``set_tracking_uri`` was called, or ``$MLFLOW_TRACKING_URI`` is set."""
        return bool(self._uri or env("MLFLOW_TRACKING_URI"))

    def set_registry_uri(self, uri: str | Any) -> None:
        """Where MLflow's model registry calls go (``MlflowClient()`` uses it too)."""
        PROCESS_URIS.registry = str(uri) if uri else None

    def get_registry_uri(self) -> str:
        """``set_registry_uri``'s, else ``$MLFLOW_REGISTRY_URI``, else the tracking URI (MLflow's rule)."""
        return PROCESS_URIS.registry or env("MLFLOW_REGISTRY_URI") or self.get_tracking_uri()

    def _where(self) -> Destination:
        if self._destination is None:
            self._destination = tracking_destination(self._uri)
        return self._destination

    def _model(self) -> MlflowRuns:
        """The run model for the current tracking URI, made (with its session) on first use."""
        runs = self._runs
        if runs is not None and self._destination is not None and self._destination is self._runs_for:
            return runs
        with self._lock:
            if self._runs is not None and self._runs.stack:
                return self._runs  # a new tracking URI applies once the active runs end
            destination = self._where()
            key = destination_key(destination.server, destination.storage, destination.database)
            session = self._session
            if (
                self._runs is not None
                and session is not None
                and session.key == key
                and not session.runtime.closed
            ):
                self._runs_for = destination
                return self._runs
            session = shared_session(destination.server, destination.storage, destination.database)
            runs = MlflowRuns(session.engine, session.store, session.engine.config, job_ranks())
            session.models.append(runs)
            self._session, self._runs, self._runs_for = session, runs, destination
            self._stacks, self._buffer = runs.thread_stacks, session.engine.buffer
            return runs

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the session's loop (made on first use) and wait for its result."""
        self._model()
        assert self._session is not None
        return self._session.call(coro)

    # -- experiments -----------------------------------------------------------------------------

    def set_experiment(
        self, experiment_name: str | None = None, experiment_id: str | None = None
    ) -> Experiment:
        runs = self._model()
        experiment = self._call(runs.set_experiment(experiment_name, experiment_id))
        self._changed()
        return experiment

    def create_experiment(
        self,
        name: str,
        artifact_location: str | None = None,
        tags: Mapping[str, Any] | Iterable[str] | None = None,
    ) -> str:
        runs = self._model()
        return str(self._call(runs.create_experiment(name, artifact_location, tags)))

    def get_experiment(self, experiment_id: str) -> Experiment:
        runs = self._model()
        return self._call(runs.store.get_experiment(str(experiment_id)))

    def get_experiment_by_name(self, name: str) -> Experiment | None:
        runs = self._model()
        return self._call(runs.store.get_experiment_by_name(name))

    def delete_experiment(self, experiment_id: str) -> None:
        runs = self._model()
        self._call(runs.store.delete_experiment(str(experiment_id)))
        if runs.experiment_id == str(experiment_id):
            runs.experiment_id = None
            self._changed()

    def restore_experiment(self, experiment_id: str) -> None:
        """Restore a deleted experiment (MLflow's fluent ``restore_experiment``)."""
        runs = self._model()
        self._call(runs.store.restore_experiment(str(experiment_id)))

    def search_experiments(
        self,
        view_type: int = ViewType.ACTIVE_ONLY,
        max_results: int | None = None,
        filter_string: str | None = None,
        order_by: list[str] | None = None,
    ) -> list[Experiment]:
        """Every matching experiment (all pages, up to ``max_results``)."""
        runs = self._model()
        found: list[Experiment] = []
        token: str | None = None
        while max_results is None or len(found) < max_results:
            page_size = SEARCH_MAX_RESULTS_DEFAULT if max_results is None else max_results - len(found)
            page: PagedList[Experiment] = self._call(
                runs.search_experiments(view_type, page_size, filter_string, order_by, token)
            )
            found.extend(page)
            token = page.token
            if not token:
                break
        return found

    def _experiment_id_now(self) -> str:
        runs = self._model()
        return str(self._call(runs.active_experiment_id()))

    def set_experiment_tag(self, key: str, value: Any) -> None:
        runs = self._model()
        experiment_id = self._experiment_id_now()
        self._call(runs.store.set_experiment_tag(experiment_id, key, str(value)))

    def set_experiment_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.set_experiment_tag(key, value)

    def delete_experiment_tag(self, key: str) -> None:
        runs = self._model()
        self._call(runs.store.delete_experiment_tag(self._experiment_id_now(), key))

    # -- runs ------------------------------------------------------------------------------------

    def start_run(
        self,
        run_id: str | None = None,
        experiment_id: str | None = None,
        run_name: str | None = None,
        nested: bool = False,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | Iterable[str] | None = None,
        description: str | None = None,
        log_system_metrics: bool | None = None,
    ) -> ActiveRun:
        """MLflow's ``start_run``; use as ``with mlflow.start_run():``."""
        runs = self._model()
        run = self._call(
            runs.start_run(
                run_id,
                experiment_id,
                run_name,
                nested,
                parent_run_id,
                tags,
                description,
                log_system_metrics,
                runs.stack,
            )
        )
        return ActiveRun(run, partial(self._end_if_active, run.info.run_id))

    def end_run(self, status: str = "FINISHED") -> None:
        """End the active run (the innermost): its events delivered, then ``status``."""
        runs = self._runs
        if runs is None or not runs.stack:
            return
        self._call(runs.end_run(check_status(status), runs.stack))

    def _end_if_active(self, run_id: str, status: str) -> None:
        """A ``with`` block's end: as MLflow's, only while its run is still active in this thread
        (code inside may have ended it already, through either module: it ends once)."""
        runs = self._runs
        if runs is not None and any(r.info.run_id == run_id for r in runs.stack):
            self.end_run(status)

    def active_run(self) -> ActiveRun | None:
        runs = self._runs
        if runs is None or not runs.stack:
            return None
        run = runs.stack[-1]
        return ActiveRun(run, partial(self._end_if_active, run.info.run_id))

    # -- the run stack as MLflow's own fluent module sees it (``integrations.mlflow_module``) --------

    def run_model(self, start: bool = False) -> MlflowRuns | None:
        """The run model whose per-thread stacks hold the active runs; made (with its session)
        when ``start``, else None until the first run."""
        return self._model() if start else self._runs

    def call(self, coro: Any) -> Any:
        """Run ``coro`` on the engine's loop (the session made if needed) and wait for it."""
        return self._call(coro)

    def last_active_run(self) -> Run | None:
        """The active run, else the run most recently ended here, as the server has it now."""
        runs = self._runs
        if runs is None:
            return None
        run_id = runs.run_id or runs.last_run_id
        return None if run_id is None else self.get_run(run_id)

    def get_run(self, run_id: str) -> Run:
        runs = self._model()
        return self._call(runs.get_run(check_run_id(run_id)))

    def get_parent_run(self, run_id: str) -> Run | None:
        parent = self.get_run(run_id).data.tags.get(PARENT_RUN_ID)
        return None if parent is None else self.get_run(parent)

    def delete_run(self, run_id: str) -> None:
        runs = self._model()
        self._call(runs.store.delete_run(check_run_id(run_id)))

    def restore_run(self, run_id: str) -> None:
        """Restore a deleted run (MLflow's fluent ``restore_run``)."""
        runs = self._model()
        self._call(runs.store.restore_run(check_run_id(run_id)))

    def search_runs(
        self,
        experiment_ids: Sequence[str] | None = None,
        filter_string: str = "",
        run_view_type: int = ViewType.ACTIVE_ONLY,
        max_results: int = FLUENT_SEARCH_MAX_RESULTS,
        order_by: list[str] | None = None,
        output_format: str = "pandas",
        search_all_experiments: bool = False,
        experiment_names: list[str] | None = None,
    ) -> Any:
        """Runs matching MLflow's filter syntax, every page up to ``max_results``: a pandas
        DataFrame (MLflow's columns) when pandas is installed, else (or with ``output_format="list"``)
        a list of ``Run``."""
        if output_format not in ("pandas", "list"):
            raise InvalidInputError(f"output_format={output_format!r}: use 'pandas' or 'list'.")
        runs = self._model()
        ids = self._search_ids(experiment_ids, search_all_experiments, experiment_names)
        found: list[Run] = []
        token: str | None = None
        while len(found) < max_results:
            page: PagedList[Run] = self._call(
                runs.search_runs(
                    ids,
                    filter_string,
                    run_view_type,
                    min(SEARCH_MAX_RESULTS_DEFAULT, max_results - len(found)),
                    order_by,
                    token,
                )
            )
            found.extend(page)
            token = page.token
            if not token:
                break
        if output_format == "list":
            return found
        if importlib.util.find_spec("pandas") is None:
            return found  # MLflow needs pandas for its default; without it, the list
        return runs_frame(found)

    def _search_ids(
        self, experiment_ids: Sequence[str] | None, all_experiments: bool, names: list[str] | None
    ) -> list[str]:
        if names:
            ids = []
            for name in names:
                experiment = self.get_experiment_by_name(name)
                if experiment is not None:
                    ids.append(experiment.experiment_id)
            return ids
        if experiment_ids:
            return [experiment_ids] if isinstance(experiment_ids, str) else [str(e) for e in experiment_ids]
        if all_experiments:
            return [e.experiment_id for e in self.search_experiments(view_type=ViewType.ALL)]
        return [self._experiment_id_now()]

    # -- logging: validate, stamp, enqueue; no I/O ----------------------------------------------

    def _run_id(self, run_id: str | None = None) -> str:
        """An explicit run, else the active one, else a new one (MLflow starts it for you)."""
        if run_id is not None:
            return check_run_id(run_id)
        runs = self._runs
        found = runs.run_id if runs is not None else None
        if found is None and runs is not None and runs.late_run_id is not None:
            return runs.late_run_id  # logged after the exit flush: kept in the journal for that run
        if found is None:
            self.start_run()
            runs = self._runs
            assert runs is not None
            found = runs.run_id
            if found is None:
                raise NoActiveRunError("No active run, and one could not be started.")
        return found

    def _wait_if(self, synchronous: bool | None, run_id: str) -> RunOperations | None:
        """``synchronous=True``: wait until the server has the call's events (and raise the run's
        refused ones); ``False``: MLflow's ``RunOperations`` to wait on later."""
        if synchronous is None or self._session is None:
            return None
        if synchronous:
            self._session.call(self._session.engine.flush(None, run_id))
            return None
        return RunOperations(self._session, run_id)

    def _refused(self, synchronous: bool | None, run_id: str, exc: InvalidInputError) -> RunOperations:
        """MLflow refuses ``synchronous=False`` calls on its queue, logging an error, never raising."""
        if synchronous is not False or self._session is None:
            raise exc
        return refused_async(self._session, run_id, exc)

    def log_metric(
        self,
        key: str,
        value: float,
        step: int | None = None,
        synchronous: bool | None = None,
        timestamp: int | None = None,
        run_id: str | None = None,
        model_id: str | None = None,
        dataset: Any = None,
    ) -> RunOperations | None:
        """MLflow's ``log_metric``; ``synchronous=False`` returns ``RunOperations`` (``.wait()``)."""
        # The hot path: this thread's innermost run, straight from its stack, into the buffer. The
        # ``try`` costs nothing until an error, which leaves as an MlflowException too.
        try:
            stack = getattr(self._stacks, "stack", None) if run_id is None else None
            active = stack[-1].info.run_id if stack else self._run_id(run_id)
            if model_id is None and dataset is None:
                self._buffer.log_metric(active, key, value, step, timestamp)  # type: ignore[union-attr]
            else:
                self._buffer.log_model_metric(  # type: ignore[union-attr]
                    active, key, value, step, timestamp, model_link(model_id, dataset)
                )
            if synchronous is not None:
                return self._wait_if(synchronous, active)
            return None
        except TrackingError as exc:
            if synchronous is False and isinstance(exc, InvalidInputError) and self._session is not None:
                return refused_async(self._session, run_id or str(self._runs and self._runs.run_id), exc)
            reraise(exc)

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int | None = None,
        synchronous: bool | None = None,
        run_id: str | None = None,
        timestamp: int | None = None,
        model_id: str | None = None,
        dataset: Any = None,
    ) -> RunOperations | None:
        """MLflow's ``log_metrics``; ``synchronous=False`` returns ``RunOperations``."""
        active = self._run_id(run_id)
        assert self._session is not None
        buffer = self._session.engine.buffer
        try:
            if model_id is None and dataset is None:
                buffer.log_metrics(active, metrics, step, timestamp)
            else:
                link = model_link(model_id, dataset)
                for key, value in metrics.items():
                    buffer.log_model_metric(active, key, value, step, timestamp, link)
        except InvalidInputError as exc:
            return self._refused(synchronous, active, exc)
        return self._wait_if(synchronous, active)

    def log_param(self, key: str, value: Any, synchronous: bool | None = None) -> Any:
        """MLflow's ``log_param``: returns ``value`` (``RunOperations`` when ``synchronous=False``)."""
        ops = self.log_params({key: value}, synchronous)
        return ops if synchronous is False else value

    def log_params(
        self, params: Mapping[str, Any], synchronous: bool | None = None, run_id: str | None = None
    ) -> RunOperations | None:
        """MLflow's ``log_params``; values over 6,000 characters are cut as MLflow cuts them."""
        active = self._run_id(run_id)
        assert self._session is not None and self._runs is not None
        params = mlflow_truncated(params, MAX_PARAM_VALUE_LENGTH, "Param value", truncate_long_values())
        try:
            self._session.engine.buffer.log_params(active, params, self._runs.params_of(active))
        except InvalidInputError as exc:
            return self._refused(synchronous, active, exc)
        return self._wait_if(synchronous, active)

    def set_tag(self, key: str, value: Any, synchronous: bool | None = None) -> RunOperations | None:
        return self.set_tags({key: value}, synchronous)

    def set_tags(self, tags: Mapping[str, Any], synchronous: bool | None = None) -> RunOperations | None:
        """MLflow's ``set_tags``; values over 8,000 characters are cut as MLflow cuts them."""
        active = self._run_id()
        assert self._session is not None
        tags = mlflow_truncated(tags, MAX_TAG_VALUE_LENGTH, "Tag value", truncate_long_values())
        try:
            self._session.engine.buffer.set_tags(active, tags)
        except InvalidInputError as exc:
            return self._refused(synchronous, active, exc)
        return self._wait_if(synchronous, active)

    def delete_tag(self, key: str) -> None:
        active = self._run_id()
        assert self._runs is not None
        self._call(self._runs.delete_tag(active, key))

    # -- artifacts: snapshot now, upload in the background ------------------------------------------

    def _artifacts(self) -> tuple[Any, str]:
        active = self._run_id()
        assert self._session is not None
        return self._session.artifacts, active

    def log_artifact(
        self, local_path: Any, artifact_path: str | None = None, synchronous: bool | None = None
    ) -> None:
        log, run_id = self._artifacts()
        artifact_calls.log_artifact(log, run_id, local_path, artifact_path)
        self._wait_for_artifacts(synchronous, run_id)

    def log_artifacts(
        self,
        local_dir: str | os.PathLike[str],
        artifact_path: str | None = None,
        synchronous: bool | None = None,
    ) -> None:
        log, run_id = self._artifacts()
        log.log_dir(run_id, local_dir, artifact_path)
        self._wait_for_artifacts(synchronous, run_id)

    def log_text(self, text: str, artifact_file: str) -> None:
        log, run_id = self._artifacts()
        artifact_calls.log_text(log, run_id, text, artifact_file)

    def log_dict(self, dictionary: Any, artifact_file: str) -> None:
        log, run_id = self._artifacts()
        artifact_calls.log_dict(log, run_id, dictionary, artifact_file)

    def log_figure(
        self, figure: Any, artifact_file: str, *, save_kwargs: Mapping[str, Any] | None = None
    ) -> None:
        log, run_id = self._artifacts()
        artifact_calls.log_figure(log, run_id, figure, artifact_file, save_kwargs)

    def log_image(
        self,
        image: Any,
        artifact_file: str | None = None,
        key: str | None = None,
        step: int | None = None,
        timestamp: int | None = None,
        synchronous: bool | None = None,
    ) -> None:
        log, run_id = self._artifacts()
        assert self._session is not None
        artifact_calls.log_image(
            log, self._session.engine.buffer, run_id, image, artifact_file, key, step, timestamp
        )
        self._wait_for_artifacts(synchronous, run_id)

    def log_table(self, data: Any, artifact_file: str) -> None:
        log, run_id = self._artifacts()
        assert self._session is not None
        artifact_calls.log_table(log, self._session.engine.buffer, run_id, data, artifact_file)

    def get_artifact_uri(self, artifact_path: str | None = None) -> str:
        runs = self._model()
        return str(self._call(artifact_calls.artifact_uri(runs.store, self._run_id(), artifact_path)))

    def _wait_for_artifacts(self, synchronous: bool | None, run_id: str) -> None:
        if synchronous and self._session is not None:
            self._session.call(self._session.engine.deliver_artifacts(run_id))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the server has every event logged before this call (tracklane's addition)."""
        if self._session is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        return bool(self._session.call(self._session.engine.flush(deadline)))


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (MLflow's ``MlflowLoggingStream``)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _show_mlflow_lines() -> None:
    """MLflow prints its fluent API's INFO lines ("Experiment with name ... does not exist. Creating
    a new experiment.") on stderr through a handler of its own logger; the same for
    ``tracklane.mlflow``'s logger, unless the application configured that logger itself."""
    log = logging.getLogger("tracklane.mlflow")
    if log.handlers:
        return
    handler = logging.StreamHandler(_Stderr())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y/%m/%d %H:%M:%S")
    )
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def model_link(model_id: str | None, dataset: Any) -> tuple[str | None, str | None, str | None]:
    """MLflow 3's metric fields ``model_id``, ``dataset_name``, ``dataset_digest`` (a dataset is an
    ``mlflow.data.Dataset`` or a ``DatasetEntity``: both have ``name`` and ``digest``)."""
    if model_id is not None and not isinstance(model_id, str):
        raise InvalidInputError(f"model_id={model_id!r} must be a string (a LoggedModel's id).")
    if dataset is None:
        return model_id, None, None
    name, digest = getattr(dataset, "name", None), getattr(dataset, "digest", None)
    if not isinstance(name, str) or not isinstance(digest, str):
        raise InvalidInputError(
            f"dataset={dataset!r} has no name and digest; pass an mlflow.data Dataset (e.g. from "
            "mlflow.data.from_pandas) or a DatasetEntity."
        )
    return model_id, name, digest


def runs_frame(runs: list[Run]) -> Any:
    """Runs as MLflow's ``search_runs`` DataFrame (``mlflow/tracking/fluent.py``), built the way
    MLflow builds it so that columns and dtypes match, an empty result included: info columns, then
    ``metrics.*`` (NaN where a run lacks one), ``params.*``, ``tags.*`` (None); times as UTC
    datetimes. Within each group, keys in the order runs first have them."""
    pd = importlib.import_module("pandas")
    nan = float("nan")
    info: dict[str, list[Any]] = {
        "run_id": [],
        "experiment_id": [],
        "status": [],
        "artifact_uri": [],
        "start_time": [],
        "end_time": [],
    }
    groups: tuple[tuple[str, dict[str, list[Any]], Any], ...] = (
        ("metrics", {}, nan),
        ("params", {}, None),
        ("tags", {}, None),
    )
    for i, run in enumerate(runs):
        info["run_id"].append(run.info.run_id)
        info["experiment_id"].append(run.info.experiment_id)
        info["status"].append(run.info.status)
        info["artifact_uri"].append(run.info.artifact_uri)
        info["start_time"].append(pd.to_datetime(run.info.start_time, unit="ms", utc=True))
        info["end_time"].append(pd.to_datetime(run.info.end_time, unit="ms", utc=True))
        for name, columns, null in groups:
            values = getattr(run.data, name)
            for key, column in columns.items():
                column.append(values.get(key, null))
            for key, value in values.items():
                if key not in columns:
                    columns[key] = [null] * i + [value]
    data: dict[str, list[Any]] = dict(info)
    for name, columns, _ in groups:
        data.update({f"{name}.{key}": column for key, column in columns.items()})
    return pd.DataFrame(data)
