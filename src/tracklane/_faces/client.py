"""``TrackingClient``: the synchronous face, with the OICM TrackingClient's API.

Logging calls go straight to the engine's hot path on the caller's thread. Everything that
talks to the server runs on a background thread's event loop (``_process.SyncRuntime``) and is
waited for here, with a bound.
"""

from __future__ import annotations

import os
import time
from collections.abc import Coroutine, Mapping
from types import TracebackType
from typing import Any, TypeVar

from .._delivery.engine import Engine
from .._entities import ActiveRun, Experiment, FileInfo, Metric, Run
from .._faces.base import ClientBase
from .._settings import EngineConfig, ServerConfig
from .._stores.offline import JournalBackend
from .._validation import check_status, tag_dict
from . import artifact_calls
from .session import Session, Store, joinable, register

T = TypeVar("T")


class TrackingClient(ClientBase[ActiveRun]):
    """Log experiments, runs, params, metrics and tags to an MLflow or OICM tracking server.

    Logging calls cost microseconds and never do I/O on your thread: events are buffered and sent
    in batches by a background worker. ``end_run`` (or leaving ``with tc.start_run()``) and
    ``flush`` wait until the server has them; interpreter exit flushes too, for at most
    ``exit_timeout`` seconds. With no server configured (or ``offline_mode=True``) everything
    goes to a local journal under ``<path_to_storage>/ml_runs`` instead.

    Args:
        api_host: ``https://HOST/api/tracking`` for OICM, any other http(s) URL for a plain MLflow
            server. Defaults to ``$OIP_TRACKING_SERVER``.
        api_key: sent as ``Authorization: Bearer``; defaults to ``$OIP_WORKLOAD_ACCESS_KEY``.
        path_to_storage: where the journal lives (offline runs, and events kept through outages).
        offline_mode: log to the journal only; defaults to ``$OIP_OFFLINE_MODE``.
        max_buffer: events held in memory before ``overflow`` applies.
        overflow: what a logging call does when the buffer is full: ``"spill"`` (default; the
            worker moves the backlog to the journal while the server lags) and ``"block"`` wait
            for room (at most ``block_timeout`` s, then drop and count), ``"drop_newest"`` and
            ``"drop_oldest"`` drop and count. Defaults to ``$TRACKLANE_OVERFLOW``.
        retry_window: how long a request is retried before the server counts as unavailable.
        exit_timeout: the longest interpreter exit (or ``close``) waits for undelivered events.
        system_metrics_interval: seconds between system metrics samples of a run (default
            ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``, else 10).
        hide_host: on OICM, do not log the run's UI links (they show the platform's address).
        rank_logging: in a distributed job (``WORLD_SIZE`` > 1): ``"all"`` ranks log as they are
            (default), ``"zero_only"``: only rank 0 logs, ``"prefixed"``: each rank's metrics go
            under ``rank<R>/``. In a job, rank 0 creates (or resumes) the run and is the only one to
            end it; the other ranks attach (``MLFLOW_RUN_ID``, ``run_id=``, or rank 0's
            ``run_name``, which they wait for rather than create) and never end it.

    Raises:
        ConfigurationError: settings that cannot work, an OICM host without an API key, or an
            ``api_host`` that does not answer as an OICM tracking service.
        ServerUnavailableError: the OICM host cannot be reached or reports itself down.
    """

    _joined: Session | None = None
    _closed = False

    def _engine_for(
        self,
        server: ServerConfig | None,
        journal: JournalBackend | None,
        config: EngineConfig,
        storage: str | None,
    ) -> tuple[Engine, Store]:
        # tracklane.mlflow or an MlflowClient already logs there with these settings: batch together.
        self._joined = joinable(self._destination, config, server if journal is None else None)
        if self._joined is not None:
            return self._joined.engine, self._joined.store
        return super()._engine_for(server, journal, config, storage)

    def _start(self) -> None:
        if self._joined is not None:
            self._session = self._joined
            self._session.models.append(self._runs)
        else:
            self._session = Session(self._destination, self._engine, self._store, [self._runs])
            register(self._session)
        self._runtime = self._session.runtime
        try:  # on OICM: the liveness and version checks, one attempt each
            self._runtime.call(self._runs.check_platform(), timeout=self._engine.config.retry_window + 60.0)
        except BaseException:
            self._session.release(self._runs, "FINISHED", 1.0)
            raise

    def _wrap(self, run: Run) -> ActiveRun:
        return ActiveRun(run, self.end_run)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None, what: str = "") -> T:
        return self._runtime.call(coro, timeout, what)

    # -- experiments -----------------------------------------------------------------------------

    def set_experiment(
        self,
        experiment_name: str | None = None,
        workspace_id: str | None = None,
        *,
        experiment_id: str | None = None,
    ) -> Experiment:
        """Make ``experiment_name`` the active experiment, creating it if missing (or, MLflow's
        spelling, the existing experiment ``experiment_id``).

        Raises TrackingError while a run is active or when the experiment is deleted.
        """
        return self._call(self._runs.set_experiment(experiment_name, workspace_id, experiment_id))

    def create_experiment(
        self,
        experiment_name: str,
        workspace_id: str | None = None,
        tags: Mapping[str, Any] | list[str] | None = None,
    ) -> Experiment:
        """Create an experiment (or return the one with that name), adding tag names to it."""
        return self._call(self._runs.create_experiment(experiment_name, workspace_id, tags or ()))

    def get_experiment_by_name(self, name: str) -> Experiment | None:
        """The experiment called ``name``, or None."""
        return self._call(self._runs.get_experiment_by_name(name))

    def delete_experiment(self, experiment_id: str) -> None:
        """Mark an experiment deleted (its lifecycle stage becomes ``deleted``)."""
        self._call(self._runs.delete_experiment(experiment_id))

    def set_experiment_tags(self, tag_names: Mapping[str, Any] | list[str]) -> None:
        """Add tag names to the active experiment; existing ones are kept, none duplicated."""
        self._call(self._runs.set_experiment_tags(tag_names))

    # -- runs ------------------------------------------------------------------------------------

    def start_run(
        self,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, Any] | list[str] | None = None,
        log_system_metrics: bool | None = None,
    ) -> ActiveRun:
        """Start a run, continue the run named ``run_name``, or attach to ``run_id``.

        Use as ``with tc.start_run(...):``; the block ends the run. While it is active, system
        metrics (CPU, memory, disk, network, GPUs) are sampled under ``system/`` unless
        ``log_system_metrics=False`` or ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false``. Raises
        NotFoundError for an unknown ``run_id``, TrackingError with no experiment set or a run
        already active.
        """
        run = self._call(self._runs.start_run(run_id, run_name, tags, log_system_metrics))
        return ActiveRun(run, self.end_run)

    def end_run(self, status: str = "FINISHED") -> None:
        """Deliver the active run's events, then end it as FINISHED, FAILED or KILLED.

        Waits as long as the server keeps taking events. If it stops (down, or no progress for
        ``retry_window`` s), the run's events and its end are kept in the local journal, a warning
        names it and the ``tracklane sync`` command, and this returns. No active run: does nothing.
        Raises DeliveryError if the server refused events of it, AuthenticationError if it refused
        the key.
        """
        self._call(self._runs.end_run(check_status(status)), what="end_run")

    def get_run(self, run_id: str) -> Run:
        """The run as the server stores it, including everything logged before this call."""
        return self._call(self._runs.get_run(run_id))

    def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        """Every point of metric ``key`` of a run, including those logged before this call."""
        return self._call(self._runs.get_metric_history(run_id, key))

    # -- logging: validate, stamp, enqueue; no I/O ----------------------------------------------

    def log_metric(
        self,
        key: str,
        value: float,
        step: int | None = None,
        timestamp: int | None = None,
        synchronous: bool | None = None,
    ) -> None:
        """Log one metric point (timestamp in ms, default now). Raises InvalidInputError.
        ``synchronous=True`` (MLflow's spelling) waits until the server has it."""
        self._buffer.log_metric(self._runs.run_id, key, value, step, timestamp)
        if synchronous:
            self._wait_for_run()

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int | None = None,
        timestamp: int | None = None,
        synchronous: bool | None = None,
    ) -> None:
        """Log several metrics at one step and time. Raises InvalidInputError for bad entries
        (after logging the good ones)."""
        self._buffer.log_metrics(self._runs.run_id, metrics, step, timestamp)
        if synchronous:
            self._wait_for_run()

    def log_param(self, key: str, value: Any, synchronous: bool | None = None) -> None:
        """Log a param, stored as ``str(value)``. Raises InvalidInputError if it changes."""
        self._buffer.log_params(self._runs.run_id, {key: value}, self._runs.params)
        if synchronous:
            self._wait_for_run()

    def log_params(self, params: Mapping[str, Any], synchronous: bool | None = None) -> None:
        """Log several params. Raises InvalidInputError for bad entries (after the good ones)."""
        self._buffer.log_params(self._runs.run_id, params, self._runs.params)
        if synchronous:
            self._wait_for_run()

    def set_tag(self, key: str, value: Any, synchronous: bool | None = None) -> None:
        """Set a run tag; the last value set wins."""
        self._buffer.set_tags(self._runs.run_id, {key: value})
        if synchronous:
            self._wait_for_run()

    def set_tags(self, tags: Mapping[str, Any], synchronous: bool | None = None) -> None:
        """Set several run tags."""
        self._buffer.set_tags(self._runs.run_id, tags)
        if synchronous:
            self._wait_for_run()

    def _wait_for_run(self) -> None:
        """``synchronous=True``: wait until the server has what was logged (the run's refusals raise)."""
        self._call(self._engine.flush(None, self._runs.run_id))

    def set_run_tags(self, tag_names: Mapping[str, Any] | list[str]) -> None:
        """Add tags to the active run: a list of names the OICM way (``name: _OI_USER_TAG``), or a
        dict of key/values (MLflow's)."""
        self._buffer.set_tags(self._runs.run_id, tag_dict(tag_names, "run"))

    # -- artifacts: snapshot now, upload in the background ------------------------------------------

    def log_artifact(self, local_path: Any, artifact_path: str | None = None) -> None:
        """Keep a file (under the directory ``artifact_path`` of the run's artifacts) for upload: a
        local copy now, the upload in the background; ``end_run`` waits for it. omega|ml's form
        ``log_artifact(obj, name)`` stores an object that is not a path: JSON, bytes, or a DataFrame
        (Parquet with pyarrow, else CSV); ``restore_artifact(name)`` gives it back."""
        artifact_calls.log_artifact(self._artifacts, self._active_run_id(), local_path, artifact_path)

    def log_artifacts(self, local_dir: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Keep every file under ``local_dir`` (the tree kept) for upload, like ``log_artifact``."""
        self._artifacts.log_dir(self._active_run_id(), local_dir, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        artifact_calls.log_text(self._artifacts, self._active_run_id(), text, artifact_file)

    def log_dict(self, dictionary: Any, artifact_file: str) -> None:
        """JSON, or YAML for ``.yaml``/``.yml`` (with PyYAML), as MLflow writes it."""
        artifact_calls.log_dict(self._artifacts, self._active_run_id(), dictionary, artifact_file)

    def log_figure(
        self, figure: Any, artifact_file: str, save_kwargs: Mapping[str, Any] | None = None
    ) -> None:
        """A matplotlib (or plotly) figure, rendered now in the format ``artifact_file`` names."""
        artifact_calls.log_figure(self._artifacts, self._active_run_id(), figure, artifact_file, save_kwargs)

    def log_image(
        self,
        image: Any,
        artifact_file: str | None = None,
        key: str | None = None,
        step: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        """A NumPy array or PIL image: to ``artifact_file``, or as step ``step`` of series ``key``."""
        artifact_calls.log_image(
            self._artifacts,
            self._engine.buffer,
            self._active_run_id(),
            image,
            artifact_file,
            key,
            step,
            timestamp,
        )

    def log_table(self, data: Any, artifact_file: str) -> None:
        """A dict of columns or a DataFrame, as MLflow's ``log_table`` stores it."""
        artifact_calls.log_table(
            self._artifacts, self._engine.buffer, self._active_run_id(), data, artifact_file
        )

    def list_artifacts(self, path: str | None = None, run_id: str | None = None) -> list[FileInfo]:
        """The artifacts of ``run_id`` (default: the active run) under ``path``."""
        run_id = run_id or self._active_run_id()
        return self._call(artifact_calls.list_artifacts(self._engine, self._store, run_id, path))

    def download_artifacts(
        self, path: str = "", dst_path: str | None = None, run_id: str | None = None
    ) -> str:
        """Download a file or directory of the run's artifacts; returns its local path."""
        run_id = run_id or self._active_run_id()
        return self._call(
            artifact_calls.download_artifacts(self._engine, self._store, run_id, path, dst_path)
        )

    def restore_artifact(self, name: str, run_id: str | None = None) -> Any:
        """omega|ml's ``restore_artifact(name)``: the object ``log_artifact(obj, name)`` stored."""
        run_id = run_id or self._active_run_id()
        return self._call(artifact_calls.restore_artifact(self._engine, self._store, run_id, name))

    def get_artifact_uri(self, artifact_path: str | None = None, run_id: str | None = None) -> str:
        run_id = run_id or self._active_run_id()
        return self._call(artifact_calls.artifact_uri(self._store, run_id, artifact_path))

    # -- delivery --------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the server holds every event logged before this call: True.

        Waits as long as the server keeps taking events; False after ``timeout`` seconds, or after
        ``retry_window`` seconds in which the server took none (the events are then in the local
        journal, delivered later). Raises DeliveryError listing events the server refused since the
        last flush, and AuthenticationError once the server has refused the key (or is not an
        MLflow server): fix it, then run the ``tracklane sync`` command the error gives.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._call(self._engine.flush(deadline), what="flush")

    def close(self, timeout: float | None = None) -> int:
        """Deliver what is left (as long as the server makes progress, or at most ``timeout`` s),
        end an active run FINISHED, stop the worker. What is not delivered stays in the local journal
        for the next client on this storage or ``tracklane sync``. Returns how many events could
        not even be kept there (0 normally). Idempotent."""
        if self._closed:
            return 0
        self._closed = True
        return self._session.release(self._runs, "FINISHED", timeout)

    def __enter__(self) -> TrackingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
