"""The state behind ``tracklane.mlflow``: MLflow's fluent API (a run stack per thread, as MLflow's).

``Fluent`` holds a session for the tracking URI (made on first use, so importing the module starts
no thread) and an ``MlflowRuns`` run model that the session ends at interpreter exit, as MLflow's
atexit ``end_run`` does. Logging with no active run starts one, as MLflow does.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .._delivery.buffer import Buffer
from .._entities import ActiveRun, Experiment, PagedList, Run, ViewType
from .._exceptions import NoActiveRunError
from .._runs.metadata import PARENT_RUN_ID
from .._runs.mlflow_runs import MlflowRuns
from .._settings import Destination, job_ranks, tracking_destination
from .._validation import check_status
from . import artifact_calls
from .mlflow_client import SEARCH_MAX_RESULTS_DEFAULT, check_run_id
from .session import Session, destination_key, shared_session

#: MLflow's fluent ``search_runs`` returns up to this many runs by default, paging as needed.
FLUENT_SEARCH_MAX_RESULTS = 100_000


class Fluent:
    """The fluent API's process-wide state: tracking URI, session, run model."""

    def __init__(self) -> None:
        self._uri: str | None = None
        self._destination: Destination | None = None
        self._session: Session | None = None
        self._runs: MlflowRuns | None = None
        self._runs_for: Destination | None = None  # the destination ``_runs`` logs to
        #: For the hot path: the run model's per-thread stacks, and the engine's buffer.
        self._stacks: threading.local | None = None
        self._buffer: Buffer | None = None
        self._lock = threading.RLock()

    # -- where to log ----------------------------------------------------------------------------

    def set_tracking_uri(self, uri: str | Any) -> None:
        """Log to ``uri`` from the next run on (MLflow's rule: an active run keeps its server)."""
        with self._lock:
            self._uri = str(uri)
            self._destination = None

    def get_tracking_uri(self) -> str:
        return self._where().uri

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
            key = destination_key(destination.server, destination.storage)
            session = self._session
            if (
                self._runs is not None
                and session is not None
                and session.key == key
                and not session.runtime.closed
            ):
                self._runs_for = destination
                return self._runs
            session = shared_session(destination.server, destination.storage)
            runs = MlflowRuns(session.engine, session.store, session.engine.config, job_ranks())
            session.models.append(runs)
            self._session, self._runs, self._runs_for = session, runs, destination
            self._stacks, self._buffer = runs.thread_stacks, session.engine.buffer
            return runs

    def _call(self, coro: Any) -> Any:
        self._model()
        assert self._session is not None
        return self._session.call(coro)

    # -- experiments -----------------------------------------------------------------------------

    def set_experiment(
        self, experiment_name: str | None = None, experiment_id: str | None = None
    ) -> Experiment:
        runs = self._model()
        return self._call(runs.set_experiment(experiment_name, experiment_id))  # type: ignore[no-any-return]

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
        return self._call(runs.store.get_experiment(str(experiment_id)))  # type: ignore[no-any-return]

    def get_experiment_by_name(self, name: str) -> Experiment | None:
        runs = self._model()
        return self._call(runs.store.get_experiment_by_name(name))  # type: ignore[no-any-return]

    def delete_experiment(self, experiment_id: str) -> None:
        runs = self._model()
        self._call(runs.store.delete_experiment(str(experiment_id)))
        if runs.experiment_id == str(experiment_id):
            runs.experiment_id = None

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
        return ActiveRun(run, self.end_run)

    def end_run(self, status: str = "FINISHED") -> None:
        """End the active run (the innermost): its events delivered, then ``status``."""
        runs = self._runs
        if runs is None or not runs.stack:
            return
        self._call(runs.end_run(check_status(status), runs.stack))

    def active_run(self) -> ActiveRun | None:
        runs = self._runs
        if runs is None or not runs.stack:
            return None
        return ActiveRun(runs.stack[-1], self.end_run)

    def last_active_run(self) -> Run | None:
        """The active run, else the run most recently ended here, as the server has it now."""
        runs = self._runs
        if runs is None:
            return None
        run_id = runs.run_id or runs.last_run_id
        return None if run_id is None else self.get_run(run_id)

    def get_run(self, run_id: str) -> Run:
        runs = self._model()
        return self._call(runs.get_run(check_run_id(run_id)))  # type: ignore[no-any-return]

    def get_parent_run(self, run_id: str) -> Run | None:
        parent = self.get_run(run_id).data.tags.get(PARENT_RUN_ID)
        return None if parent is None else self.get_run(parent)

    def delete_run(self, run_id: str) -> None:
        runs = self._model()
        self._call(runs.store.delete_run(check_run_id(run_id)))

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
            raise ValueError(f"output_format={output_format!r}: use 'pandas' or 'list'.")
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

    def _wait_if(self, synchronous: bool | None, run_id: str) -> None:
        """``synchronous=True``: wait until the server has the call's events (and raise the run's
        refused ones)."""
        if synchronous and self._session is not None:
            self._session.call(self._session.engine.flush(None, run_id))

    def log_metric(
        self,
        key: str,
        value: float,
        step: int | None = None,
        synchronous: bool | None = None,
        timestamp: int | None = None,
        run_id: str | None = None,
    ) -> None:
        # The hot path: this thread's innermost run, straight from its stack, into the buffer.
        stack = getattr(self._stacks, "stack", None) if run_id is None else None
        active = stack[-1].info.run_id if stack else self._run_id(run_id)
        self._buffer.log_metric(active, key, value, step, timestamp)  # type: ignore[union-attr]
        if synchronous:
            self._wait_if(synchronous, active)

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int | None = None,
        synchronous: bool | None = None,
        run_id: str | None = None,
        timestamp: int | None = None,
    ) -> None:
        active = self._run_id(run_id)
        assert self._session is not None
        self._session.engine.buffer.log_metrics(active, metrics, step, timestamp)
        self._wait_if(synchronous, active)

    def log_param(self, key: str, value: Any, synchronous: bool | None = None) -> Any:
        self.log_params({key: value}, synchronous)
        return value

    def log_params(
        self, params: Mapping[str, Any], synchronous: bool | None = None, run_id: str | None = None
    ) -> None:
        active = self._run_id(run_id)
        assert self._session is not None and self._runs is not None
        self._session.engine.buffer.log_params(active, params, self._runs.params_of(active))
        self._wait_if(synchronous, active)

    def set_tag(self, key: str, value: Any, synchronous: bool | None = None) -> None:
        self.set_tags({key: value}, synchronous)

    def set_tags(self, tags: Mapping[str, Any], synchronous: bool | None = None) -> None:
        active = self._run_id()
        assert self._session is not None
        self._session.engine.buffer.set_tags(active, tags)
        self._wait_if(synchronous, active)

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


def runs_frame(runs: list[Run]) -> Any:
    """Runs as MLflow's ``search_runs`` DataFrame: info columns, then ``metrics.*``, ``params.*``,
    ``tags.*``; times as UTC datetimes."""
    pd = importlib.import_module("pandas")

    rows = []
    for run in runs:
        info = run.info
        row: dict[str, Any] = {
            "run_id": info.run_id,
            "experiment_id": info.experiment_id,
            "status": info.status,
            "artifact_uri": info.artifact_uri,
            "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True),
            "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True),
        }
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        rows.append(row)
    columns = ["run_id", "experiment_id", "status", "artifact_uri", "start_time", "end_time"]
    return pd.DataFrame(rows, columns=columns if not rows else None)
