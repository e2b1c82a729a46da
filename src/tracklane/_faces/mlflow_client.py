"""``MlflowClient``: MLflow's client API with explicit run ids, on tracklane's engine.

The same methods and signatures as ``mlflow.MlflowClient``. Logging calls (``log_metric``,
``log_param``, ``set_tag``, ``log_batch``) validate, stamp and enqueue in microseconds and may
target any number of runs at once; ``synchronous=True`` waits until the server has that call's
events. Every other call talks to the server (reads first deliver what was logged before them).
All clients for one server in a process share one engine (``_faces.session``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from .._entities import Experiment, FileInfo, Metric, PagedList, Param, Run, RunTag, ViewType
from .._exceptions import InvalidInputError
from .._runs.mlflow_runs import MlflowRuns
from .._settings import job_ranks, tracking_destination
from .._validation import check_status
from . import artifact_calls
from .session import Session, shared_session

T = TypeVar("T")

#: MLflow's default page size for ``search_runs``.
SEARCH_MAX_RESULTS_DEFAULT = 1000


def check_run_id(run_id: object) -> str:
    if not isinstance(run_id, str) or not run_id:
        raise InvalidInputError(f"run_id must be a non-empty string (a run's id), got {run_id!r}.")
    return run_id


class MlflowClient:
    """Client of an MLflow (or OICM) tracking server with ``mlflow.MlflowClient``'s API.

    Args:
        tracking_uri: an http(s) server URL, or a local directory to log offline to (uploaded later
            with ``tracklane sync``). Defaults to ``$MLFLOW_TRACKING_URI``, then
            ``$OIP_TRACKING_SERVER``, then the journal in the working directory.
    """

    def __init__(self, tracking_uri: str | None = None, registry_uri: str | None = None) -> None:
        self._destination = tracking_destination(tracking_uri)
        self._session: Session = shared_session(self._destination.server, self._destination.storage)
        engine = self._session.engine
        self._runs = MlflowRuns(engine, self._session.store, engine.config, job_ranks())
        self._buffer = engine.buffer

    def __repr__(self) -> str:
        return f"MlflowClient({self._destination.uri!r})"

    @property
    def tracking_uri(self) -> str:
        return self._destination.uri

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the session's loop and wait for its result."""
        return self._session.call(coro)

    def _wait_if(self, synchronous: bool | None, run_id: str) -> None:
        """``synchronous=True``: wait until the server has the call's events (and raise the run's
        refused ones)."""
        if synchronous:
            self._call(self._session.engine.flush(None, run_id))

    # -- experiments -----------------------------------------------------------------------------

    def create_experiment(
        self,
        name: str,
        artifact_location: str | None = None,
        tags: Mapping[str, Any] | Iterable[str] | None = None,
    ) -> str:
        """Create an experiment; returns its id. Raises ServerError if the name is taken."""
        return str(self._call(self._runs.create_experiment(name, artifact_location, tags)))

    def get_experiment(self, experiment_id: str) -> Experiment:
        """The experiment with this id (NotFoundError if there is none)."""
        return self._call(self._session.store.get_experiment(str(experiment_id)))

    def get_experiment_by_name(self, name: str) -> Experiment | None:
        """The experiment called ``name``, or None."""
        return self._call(self._session.store.get_experiment_by_name(name))

    def search_experiments(
        self,
        view_type: int = ViewType.ACTIVE_ONLY,
        max_results: int | None = SEARCH_MAX_RESULTS_DEFAULT,
        filter_string: str | None = None,
        order_by: list[str] | None = None,
        page_token: str | None = None,
    ) -> PagedList[Experiment]:
        """Experiments matching MLflow's filter syntax; ``.token`` gives the next page."""
        return self._call(
            self._runs.search_experiments(view_type, max_results, filter_string, order_by, page_token)
        )

    def rename_experiment(self, experiment_id: str, new_name: str) -> None:
        self._call(self._session.store.rename_experiment(str(experiment_id), new_name))

    def delete_experiment(self, experiment_id: str) -> None:
        self._call(self._session.store.delete_experiment(str(experiment_id)))

    def restore_experiment(self, experiment_id: str) -> None:
        self._call(self._session.store.restore_experiment(str(experiment_id)))

    def set_experiment_tag(self, experiment_id: str, key: str, value: Any) -> None:
        self._call(self._session.store.set_experiment_tag(str(experiment_id), key, str(value)))

    def delete_experiment_tag(self, experiment_id: str, key: str) -> None:
        self._call(self._session.store.delete_experiment_tag(str(experiment_id), key))

    # -- runs ------------------------------------------------------------------------------------

    def create_run(
        self,
        experiment_id: str,
        start_time: int | None = None,
        tags: Mapping[str, Any] | Iterable[str] | None = None,
        run_name: str | None = None,
    ) -> Run:
        """Create a run (RUNNING) without making it active anywhere; returns it."""
        return self._call(self._runs.create_run(experiment_id, start_time, tags, run_name))

    def get_run(self, run_id: str) -> Run:
        """The run as the server stores it, including everything logged before this call."""
        return self._call(self._runs.get_run(check_run_id(run_id)))

    def search_runs(
        self,
        experiment_ids: str | Sequence[str],
        filter_string: str = "",
        run_view_type: int = ViewType.ACTIVE_ONLY,
        max_results: int = SEARCH_MAX_RESULTS_DEFAULT,
        order_by: list[str] | None = None,
        page_token: str | None = None,
    ) -> PagedList[Run]:
        """Runs matching MLflow's filter syntax, in ``order_by`` order; ``.token`` gives the next page."""
        ids = [experiment_ids] if isinstance(experiment_ids, (str, int)) else list(experiment_ids)
        return self._call(
            self._runs.search_runs(ids, filter_string, run_view_type, max_results, order_by, page_token)
        )

    def delete_run(self, run_id: str) -> None:
        self._call(self._session.store.delete_run(check_run_id(run_id)))

    def restore_run(self, run_id: str) -> None:
        self._call(self._session.store.restore_run(check_run_id(run_id)))

    def set_terminated(
        self, run_id: str, status: str | None = None, end_time: int | None = None, *, _links: bool = True
    ) -> None:
        """Deliver what was logged to the run, then end it (FINISHED unless ``status`` says)."""
        self._runs.owned.discard(run_id)
        self._call(self._runs.set_terminated(check_run_id(run_id), status, end_time, _links))

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        """Change a run's status and/or name."""
        if status is not None and status not in ("RUNNING", "SCHEDULED"):
            check_status(status)
        self._call(self._session.store.update_run(check_run_id(run_id), status, None, name))

    def end_at_exit(self, run_id: str) -> None:
        """End ``run_id`` at interpreter exit unless ``set_terminated`` ends it first (tracklane's
        own): FAILED on an uncaught exception, KILLED on Ctrl-C, else FINISHED (``end_status``).

        For code that creates a run and ends it from a framework's callback, which a crash in
        training never calls (the Keras callback). MLflow's client has no such call.
        """
        if self._runs not in self._session.models:
            self._session.models.append(self._runs)
        self._runs.owned.add(check_run_id(run_id))

    def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        """Every point of metric ``key``, including those logged before this call."""
        return self._call(self._runs.get_metric_history(check_run_id(run_id), key))

    # -- logging: validate, stamp, enqueue; no I/O ----------------------------------------------

    def log_metric(
        self,
        run_id: str,
        key: str,
        value: float,
        timestamp: int | None = None,
        step: int | None = None,
        synchronous: bool | None = None,
    ) -> None:
        """Log one point (timestamp in ms, default now; step default 0)."""
        if type(run_id) is not str or not run_id:  # inline: this is the hot path
            check_run_id(run_id)
        self._buffer.log_metric(run_id, key, value, step, timestamp)
        if synchronous:
            self._wait_if(synchronous, run_id)

    def log_param(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> Any:
        """Log a param (stored as ``str(value)``); returns ``value`` as MLflow does."""
        run_id = check_run_id(run_id)
        self._buffer.log_params(run_id, {key: value}, self._runs.params_of(run_id))
        self._wait_if(synchronous, run_id)
        return value

    def set_tag(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> None:
        """Set a run tag; the last value set wins."""
        self._buffer.set_tags(check_run_id(run_id), {key: value})
        self._wait_if(synchronous, run_id)

    def delete_tag(self, run_id: str, key: str) -> None:
        """Delete a run tag (after delivering what was logged before)."""
        self._call(self._runs.delete_tag(check_run_id(run_id), key))

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Metric | tuple[Any, ...]] = (),
        params: Sequence[Param | tuple[Any, ...]] = (),
        tags: Sequence[RunTag | tuple[Any, ...]] = (),
        synchronous: bool | None = None,
    ) -> None:
        """Log ``Metric``/``Param``/``RunTag`` entities (or ``(key, value, timestamp, step)`` and
        ``(key, value)`` tuples). Bad entries raise InvalidInputError after the good ones are logged."""
        log_batch(self._buffer, self._runs, check_run_id(run_id), metrics, params, tags)
        self._wait_if(synchronous, run_id)

    # -- artifacts: snapshot now, upload in the background ------------------------------------------

    def log_artifact(
        self, run_id: str, local_path: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        """Keep a file for upload to the run's artifacts (a local copy now; the upload in the
        background; ``set_terminated`` waits for it)."""
        artifact_calls.log_artifact(self._session.artifacts, check_run_id(run_id), local_path, artifact_path)

    def log_artifacts(
        self, run_id: str, local_dir: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        self._session.artifacts.log_dir(check_run_id(run_id), local_dir, artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        artifact_calls.log_text(self._session.artifacts, check_run_id(run_id), text, artifact_file)

    def log_dict(self, run_id: str, dictionary: Any, artifact_file: str) -> None:
        artifact_calls.log_dict(self._session.artifacts, check_run_id(run_id), dictionary, artifact_file)

    def log_figure(
        self, run_id: str, figure: Any, artifact_file: str, *, save_kwargs: Mapping[str, Any] | None = None
    ) -> None:
        artifact_calls.log_figure(
            self._session.artifacts, check_run_id(run_id), figure, artifact_file, save_kwargs
        )

    def log_image(
        self,
        run_id: str,
        image: Any,
        artifact_file: str | None = None,
        key: str | None = None,
        step: int | None = None,
        timestamp: int | None = None,
        synchronous: bool | None = None,
    ) -> None:
        artifact_calls.log_image(
            self._session.artifacts,
            self._buffer,
            check_run_id(run_id),
            image,
            artifact_file,
            key,
            step,
            timestamp,
        )
        if synchronous:  # accepted as MLflow's; it was ignored: wait until the server has the image(s)
            self._call(self._session.engine.deliver_artifacts(run_id))

    def log_table(self, run_id: str, data: Any, artifact_file: str) -> None:
        artifact_calls.log_table(
            self._session.artifacts, self._buffer, check_run_id(run_id), data, artifact_file
        )

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[FileInfo]:
        engine, store = self._session.engine, self._session.store
        return self._call(artifact_calls.list_artifacts(engine, store, check_run_id(run_id), path))

    def download_artifacts(self, run_id: str, path: str, dst_path: str | None = None) -> str:
        """Download a file or directory of the run's artifacts; returns its local path."""
        engine, store = self._session.engine, self._session.store
        return str(
            self._call(artifact_calls.download_artifacts(engine, store, check_run_id(run_id), path, dst_path))
        )

    # -- delivery --------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the server holds every event logged before this call (see
        ``TrackingClient.flush``). Raises DeliveryError for refused events."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return bool(self._call(self._session.engine.flush(deadline)))


def log_batch(
    buffer: Any,
    runs: MlflowRuns,
    run_id: str,
    metrics: Sequence[Metric | tuple[Any, ...]],
    params: Sequence[Param | tuple[Any, ...]],
    tags: Sequence[RunTag | tuple[Any, ...]],
) -> None:
    """Enqueue a batch of entities; every good entry is logged before the first bad one raises."""
    problem: InvalidInputError | None = None
    for m in metrics:
        try:
            if isinstance(m, Metric) or hasattr(m, "timestamp"):
                key, value, timestamp, step = m.key, m.value, m.timestamp, m.step  # type: ignore[union-attr]
            else:
                key, value, timestamp, step = (*m, None, None)[:4]
            buffer.log_metric(run_id, key, value, step, timestamp)
        except InvalidInputError as exc:
            problem = problem or exc
    pairs = [_pair(p) for p in params]
    if pairs:
        try:
            buffer.log_params(run_id, dict(pairs), runs.params_of(run_id))
        except InvalidInputError as exc:
            problem = problem or exc
    tag_pairs = [_pair(t) for t in tags]
    if tag_pairs:
        try:
            buffer.set_tags(run_id, dict(tag_pairs))
        except InvalidInputError as exc:
            problem = problem or exc
    if problem is not None:
        raise problem


def _pair(entry: Any) -> tuple[Any, Any]:
    if hasattr(entry, "key") and hasattr(entry, "value"):
        return entry.key, entry.value
    key, value = entry
    return key, value
