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
from .._exceptions import InvalidInputError, TrackingError
from .._limits import MAX_PARAM_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH
from .._runs.metadata import PARENT_RUN_ID
from .._runs.mlflow_runs import MlflowRuns
from .._settings import PROCESS_URIS, env, job_ranks, tracking_destination, truncate_long_values
from .._validation import check_status, mlflow_truncated
from . import artifact_calls
from .mlflow_errors import mlflow_face, reraise
from .run_operations import RunOperations, refused_async
from .session import Session, shared_session

T = TypeVar("T")

#: MLflow's default page size for ``search_runs``.
SEARCH_MAX_RESULTS_DEFAULT = 1000


def check_run_id(run_id: object) -> str:
    if not isinstance(run_id, str) or not run_id:
        raise InvalidInputError(f"run_id must be a non-empty string (a run's id), got {run_id!r}.")
    return run_id


@mlflow_face(hot=("log_metric",))
class MlflowClient:
    """Client of an MLflow (or OICM) tracking server with ``mlflow.MlflowClient``'s API; its errors
    are ``MlflowException`` instances too (``mlflow_errors``).

    Args:
        tracking_uri: an http(s) server URL, or a local directory to log offline to (uploaded later
            with ``tracklane sync``). Defaults, as MLflow's, to the URI ``tracklane.mlflow.set_tracking_uri``
            set, then ``$MLFLOW_TRACKING_URI``, then ``$OIP_TRACKING_SERVER``, then the journal in
            the working directory.
        registry_uri: kept for ``get_registry_uri`` (tracklane has no model registry of its own).
    """

    def __init__(self, tracking_uri: str | None = None, registry_uri: str | None = None) -> None:
        try:
            self._destination = tracking_destination(tracking_uri)
        except TrackingError as exc:
            reraise(exc)
        self._registry_uri = registry_uri or PROCESS_URIS.registry or env("MLFLOW_REGISTRY_URI")
        self._session: Session = shared_session(
            self._destination.server, self._destination.storage, self._destination.database
        )
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

    @property
    def _registry_uri_now(self) -> str:
        return self._registry_uri or self._destination.uri

    def get_registry_uri(self) -> str:
        """The registry URI given, else the fluent module's, else the tracking URI (MLflow's rule)."""
        return self._registry_uri_now

    def _wait_if(self, synchronous: bool | None, run_id: str) -> RunOperations | None:
        """``synchronous=True``: wait until the server has the call's events (and raise the run's
        refused ones); ``False``: MLflow's ``RunOperations`` to wait on later."""
        if synchronous is None:
            return None
        if synchronous:
            self._call(self._session.engine.flush(None, run_id))
            return None
        return RunOperations(self._session, run_id)

    def _refused(self, synchronous: bool | None, run_id: str, exc: InvalidInputError) -> RunOperations:
        """MLflow refuses ``synchronous=False`` calls on its queue, logging an error, never raising."""
        if synchronous is not False:
            raise exc
        return refused_async(self._session, run_id, exc)

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

    def get_parent_run(self, run_id: str) -> Run | None:
        """The run whose child ``run_id`` is (its ``mlflow.parentRunId`` tag), else None."""
        parent = self.get_run(run_id).data.tags.get(PARENT_RUN_ID)
        return None if parent is None else self.get_run(parent)

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
        dataset_name: str | None = None,
        dataset_digest: str | None = None,
        model_id: str | None = None,
    ) -> RunOperations | None:
        """Log one point (timestamp in ms, default now; step default 0); ``synchronous=False``
        returns ``RunOperations``. ``model_id``/``dataset_*``: MLflow 3's LoggedModel metric fields."""
        # The hot path: the ``try`` costs nothing until an error (then raised as MlflowException).
        try:
            if type(run_id) is not str or not run_id:
                check_run_id(run_id)
            if model_id is None and dataset_name is None and dataset_digest is None:
                self._buffer.log_metric(run_id, key, value, step, timestamp)
            else:
                link = (model_id, dataset_name, dataset_digest)
                self._buffer.log_model_metric(run_id, key, value, step, timestamp, link)
            if synchronous is not None:
                return self._wait_if(synchronous, run_id)
            return None
        except TrackingError as exc:
            if synchronous is False and isinstance(exc, InvalidInputError) and isinstance(run_id, str):
                return refused_async(self._session, run_id, exc)
            reraise(exc)

    def log_param(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> Any:
        """Log a param (stored as ``str(value)``, cut to 6,000 characters as MLflow cuts it);
        returns ``value`` as MLflow does (``RunOperations`` when ``synchronous=False``)."""
        run_id = check_run_id(run_id)
        params = mlflow_truncated({key: value}, MAX_PARAM_VALUE_LENGTH, "Param value", truncate_long_values())
        try:
            self._buffer.log_params(run_id, params, self._runs.params_of(run_id))
        except InvalidInputError as exc:
            return self._refused(synchronous, run_id, exc)
        ops = self._wait_if(synchronous, run_id)
        return ops if synchronous is False else value

    def set_tag(
        self, run_id: str, key: str, value: Any, synchronous: bool | None = None
    ) -> RunOperations | None:
        """Set a run tag (cut to 8,000 characters as MLflow cuts it); the last value set wins."""
        run_id = check_run_id(run_id)
        tags = mlflow_truncated({key: value}, MAX_TAG_VALUE_LENGTH, "Tag value", truncate_long_values())
        try:
            self._buffer.set_tags(run_id, tags)
        except InvalidInputError as exc:
            return self._refused(synchronous, run_id, exc)
        return self._wait_if(synchronous, run_id)

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
    ) -> RunOperations | None:
        """Log ``Metric``/``Param``/``RunTag`` entities (or ``(key, value, timestamp, step)`` and
        ``(key, value)`` tuples). Bad entries raise InvalidInputError after the good ones are logged
        (with ``synchronous=False``: logged at ERROR, as MLflow's queue does, and raised by ``wait()``)."""
        run_id = check_run_id(run_id)
        try:
            log_batch(self._buffer, self._runs, run_id, metrics, params, tags)
        except InvalidInputError as exc:
            return self._refused(synchronous, run_id, exc)
        return self._wait_if(synchronous, run_id)

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
                link = tuple(getattr(m, f, None) for f in ("model_id", "dataset_name", "dataset_digest"))
            else:
                key, value, timestamp, step = (*m, None, None)[:4]
                link = (None, None, None)
            if link == (None, None, None):
                buffer.log_metric(run_id, key, value, step, timestamp)
            else:
                buffer.log_model_metric(run_id, key, value, step, timestamp, link)
        except InvalidInputError as exc:
            problem = problem or exc
    truncate = truncate_long_values()
    pairs = [_pair(p) for p in params]
    if pairs:
        try:
            values = mlflow_truncated(dict(pairs), MAX_PARAM_VALUE_LENGTH, "Param value", truncate)
            buffer.log_params(run_id, values, runs.params_of(run_id))
        except InvalidInputError as exc:
            problem = problem or exc
    tag_pairs = [_pair(t) for t in tags]
    if tag_pairs:
        try:
            buffer.set_tags(
                run_id, mlflow_truncated(dict(tag_pairs), MAX_TAG_VALUE_LENGTH, "Tag value", truncate)
            )
        except InvalidInputError as exc:
            problem = problem or exc
    if problem is not None:
        raise problem


def _pair(entry: Any) -> tuple[Any, Any]:
    if hasattr(entry, "key") and hasattr(entry, "value"):
        return entry.key, entry.value
    key, value = entry
    return key, value
