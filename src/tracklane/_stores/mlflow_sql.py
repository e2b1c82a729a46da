"""MLflow's database stores (``sqlite:///mlflow.db``, MLflow 3's default, and ``postgresql://``,
``mysql://``, ``mssql://``) as the engine's ``Backend``.

tracklane does not write MLflow's schema itself: it drives MLflow's own
``mlflow.store.tracking.sqlalchemy_store.SqlAlchemyStore``, so what ``mlflow ui --backend-store-uri
sqlite:///mlflow.db`` shows is exactly what MLflow would have stored. The store is made on the
worker, not in the caller's constructor (it checks the schema, which takes a while), and every
blocking call runs on one thread of the backend's own (``JournalThread``), one at a time (SQLite
takes one writer), so the event loop never waits on the database and the caller still only
enqueues. One thread, always the same: SQLAlchemy gives each thread its own connection to
``sqlite:///:memory:``, and each such connection is a database of its own (MLflow's docstring
examples use one, from the caller's one thread).

Replies are translated once, here, into what the engine and the run models expect of a server:
MLflow's entities go through their REST JSON (the same parsing as a server's reply), and MLflow's
exceptions become ``ServerError``/``NotFoundError`` with the status and code a server would send.
Needs MLflow (``pip install 'tracklane[mlflow]'``); imported on first use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from .._entities import Experiment, FileInfo, Metric, Run
from .._exceptions import NotFoundError, ServerError, ServerUnavailableError
from .._settings import ServerConfig
from .._wire.batching import METRIC, PARAM, Batch, Event
from .journal import JournalThread, server_key
from .leftovers import keep_leftovers

if TYPE_CHECKING:
    from .._wire.run_end import RunEnd

logger = logging.getLogger("tracklane")
T = TypeVar("T")


def display_uri(uri: str) -> str:
    """The database URI without its password, for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=user + netloc).geturl()


def _to_json(entity: Any) -> dict[str, Any]:
    from mlflow.utils.proto_json_utils import message_to_json

    found: dict[str, Any] = json.loads(message_to_json(entity.to_proto()))
    return found


def _translated(exc: BaseException) -> BaseException:
    """MLflow's exception as the engine reads a server's reply: by status and error code."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        cls = NotFoundError if exc.error_code == "RESOURCE_DOES_NOT_EXIST" else ServerError
        return cls(exc.message, status=status, error_code=exc.error_code)
    if type(exc).__module__.startswith("sqlalchemy") and "OperationalError" in type(exc).__name__:
        return ServerUnavailableError(f"the database did not take the request ({exc}); retrying.")
    return exc


class MlflowSqlBackend:
    """Experiments, runs and log-batch in MLflow's SQL store for a database URI."""

    def __init__(self, db_uri: str, artifact_root: str | None = None) -> None:
        self.db_uri = db_uri
        self.artifact_root = artifact_root
        #: How the engine's journal (``Spool``) names this destination: the URI, no password.
        self.config = ServerConfig(api_host=display_uri(db_uri))
        self.workspace_id: str | None = None
        self.retries = 0
        self._store: Any = None
        self._parents_store: Any = None
        self._thread = JournalThread()

    def __repr__(self) -> str:
        return f"MlflowSqlBackend({display_uri(self.db_uri)!r})"

    @property
    def describe(self) -> str:
        return f"MLflow's database {display_uri(self.db_uri)}"

    def server_key(self) -> str:
        return server_key(self.config.api_host, None)

    # -- running MLflow's blocking store off the loop ----------------------------------------------

    def _open(self) -> Any:
        if self._store is None:
            from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
            from mlflow.utils.uri import resolve_uri_if_local

            root = self.artifact_root or resolve_uri_if_local(DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
            self._store = SqlAlchemyStore(self.db_uri, root)
        return self._store

    def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(self._open(), *args)
        except Exception as exc:
            raise _translated(exc) from None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._thread.call(self._blocking, fn, *args)

    # -- experiments ---------------------------------------------------------------------------

    async def get_experiment_by_name(self, name: str) -> Experiment | None:
        found = await self._run(lambda s: s.get_experiment_by_name(name))
        return None if found is None else Experiment.from_json(_to_json(found))

    async def get_experiment(self, experiment_id: str) -> Experiment:
        return Experiment.from_json(_to_json(await self._run(lambda s: s.get_experiment(experiment_id))))

    async def create_experiment(
        self, name: str, tags: Mapping[str, str], artifact_location: str | None = None
    ) -> str:
        from mlflow.entities import ExperimentTag

        pairs = [ExperimentTag(k, v) for k, v in tags.items()]
        return str(await self._run(lambda s: s.create_experiment(name, artifact_location, pairs)))

    async def delete_experiment(self, experiment_id: str) -> None:
        await self._run(lambda s: s.delete_experiment(experiment_id))

    async def restore_experiment(self, experiment_id: str) -> None:
        await self._run(lambda s: s.restore_experiment(experiment_id))

    async def rename_experiment(self, experiment_id: str, new_name: str) -> None:
        await self._run(lambda s: s.rename_experiment(experiment_id, new_name))

    async def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        from mlflow.entities import ExperimentTag

        await self._run(lambda s: s.set_experiment_tag(experiment_id, ExperimentTag(key, value)))

    async def delete_experiment_tag(self, experiment_id: str, key: str) -> None:
        await self._run(lambda s: s.delete_experiment_tag(experiment_id, key))

    async def search_experiments(
        self,
        view_type: int,
        max_results: int | None,
        filter_string: str | None,
        order_by: list[str] | None,
        page_token: str | None,
    ) -> tuple[list[Experiment], str | None]:
        from mlflow.store.tracking import SEARCH_MAX_RESULTS_DEFAULT

        page = await self._run(
            lambda s: s.search_experiments(
                view_type, max_results or SEARCH_MAX_RESULTS_DEFAULT, filter_string, order_by, page_token
            )
        )
        return [Experiment.from_json(_to_json(e)) for e in page], page.token or None

    # -- runs ----------------------------------------------------------------------------------

    async def create_run(
        self,
        experiment_id: str,
        run_name: str,
        start_time: int,
        tags: Mapping[str, str],
        user_id: str | None = None,
    ) -> Run:
        from mlflow.entities import RunTag

        pairs = [RunTag(k, v) for k, v in tags.items()]
        run = await self._run(
            lambda s: s.create_run(experiment_id, user_id or "unknown", start_time, pairs, run_name or None)
        )
        return Run.from_json(_to_json(run))

    async def get_run(self, run_id: str) -> Run:
        return Run.from_json(_to_json(await self._run(lambda s: s.get_run(run_id))))

    async def search_runs_by_name(self, experiment_id: str, run_name: str) -> list[Run]:
        quoted = run_name.replace("\\", "\\\\").replace("'", "\\'")
        found, _ = await self.search_runs(
            [experiment_id], f"attributes.run_name = '{quoted}'", 1, 1000, None, None
        )
        return found

    async def update_run(
        self, run_id: str, status: str | None, end_time: int | None, run_name: str | None = None
    ) -> None:
        from mlflow.entities import RunStatus

        def update(store: Any) -> None:
            current = store.get_run(run_id).info
            code = (
                RunStatus.from_string(status) if status is not None else RunStatus.from_string(current.status)
            )
            store.update_run_info(
                run_id, code, end_time if end_time is not None else current.end_time, run_name
            )

        await self._run(update)

    async def search_runs(
        self,
        experiment_ids: list[str],
        filter_string: str,
        view_type: int,
        max_results: int,
        order_by: list[str] | None,
        page_token: str | None,
    ) -> tuple[list[Run], str | None]:
        page = await self._run(
            lambda s: s.search_runs(
                experiment_ids, filter_string or "", view_type, max_results, order_by, page_token
            )
        )
        return [Run.from_json(_to_json(r)) for r in page], page.token or None

    async def delete_run(self, run_id: str) -> None:
        await self._run(lambda s: s.delete_run(run_id))

    async def restore_run(self, run_id: str) -> None:
        await self._run(lambda s: s.restore_run(run_id))

    async def delete_tag(self, run_id: str, key: str) -> None:
        await self._run(lambda s: s.delete_tag(run_id, key))

    async def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        points = await self._run(lambda s: list(s.get_metric_history(run_id, key)))
        return [Metric(p.key, p.value, p.timestamp, p.step) for p in points]

    # -- delivery (the engine's BatchTarget) -------------------------------------------------------

    async def log_batch(self, batch: Batch, body: bytes, once: bool = False) -> None:
        """Write one batch with MLflow's ``log_batch`` (``body``, the REST encoding, is not needed)."""
        await self._run(_write_batch, batch.run_id, batch.events())

    async def run_is_open(self, run_id: str) -> bool:
        try:
            run = await self.get_run(run_id)
        except NotFoundError:
            return False
        except ServerError as exc:
            if exc.error_code == "INVALID_PARAMETER_VALUE":
                return False
            raise
        return run.info.lifecycle_stage != "deleted"

    def keep_now(self, events: list[Event], ends: list[RunEnd]) -> int:
        """Blocking, at interpreter exit with no loop left: write what is left straight away."""

        def write_end(end: RunEnd) -> None:
            from mlflow.entities import RunStatus

            code = RunStatus.from_string(end.status)
            self._blocking(lambda s: s.update_run_info(end.run_id, code, end.end_time, None))

        return keep_leftovers(
            events,
            ends,
            lambda run_id, run_events: self._blocking(_write_batch, run_id, run_events),
            write_end,
        )

    # -- artifacts: MLflow's artifact repository for the run's artifact URI ---------------------------

    async def put_artifact(self, run_id: str, path: str, file: Path) -> None:
        uri = (await self.get_run(run_id)).info.artifact_uri
        await asyncio.to_thread(_put_artifact, uri, path, file)

    async def list_artifacts(self, run_id: str, path: str | None) -> list[FileInfo]:
        uri = (await self.get_run(run_id)).info.artifact_uri
        found = await asyncio.to_thread(_repository(uri).list_artifacts, path.strip("/") if path else None)
        return [FileInfo(f.path, bool(f.is_dir), f.file_size) for f in found]

    async def download_artifact(self, run_id: str, path: str, dst: Path) -> None:
        uri = (await self.get_run(run_id)).info.artifact_uri
        await asyncio.to_thread(_download_artifact, uri, path, dst)

    # -- the rest of what the run models ask of a store --------------------------------------------

    def after_fork(self) -> None:
        """A forked child opens its own connections (a pool is not shared across processes)."""
        self._parents_store, self._store = self._store, None  # the thread restarts in the child

    async def aclose(self) -> None:
        return None

    @property
    def mlflow_ui_url(self) -> str | None:
        return None  # no server: `mlflow ui --backend-store-uri URI` shows the runs

    def ui_links(self, run: Run) -> tuple[str, str] | None:
        return None

    async def check_platform(self) -> str | None:
        return None


def _write_batch(store: Any, run_id: str, events: list[Event]) -> None:
    from mlflow.entities import Metric as MlflowMetric
    from mlflow.entities import Param, RunTag

    metrics, params, tags = [], [], []
    for e in events:
        if e[0] == METRIC:
            model_id, dataset_name, dataset_digest = e[6] if len(e) > 6 else (None, None, None)
            metrics.append(
                MlflowMetric(
                    e[2],
                    e[3],
                    e[4],
                    e[5],
                    model_id=model_id,
                    dataset_name=dataset_name,
                    dataset_digest=dataset_digest,
                    run_id=run_id,
                )
            )
        elif e[0] == PARAM:
            params.append(Param(e[2], e[3]))
        else:
            tags.append(RunTag(e[2], e[3]))
    store.log_batch(run_id, metrics=metrics, params=params, tags=tags)


def _repository(artifact_uri: str) -> Any:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(artifact_uri)


def _download_artifact(artifact_uri: str, path: str, dst: Path) -> None:
    """One file into ``dst``, downloaded beside it first (a broken download leaves no half file)."""
    with tempfile.TemporaryDirectory(prefix="tracklane-download-") as tmp:
        local = _repository(artifact_uri).download_artifacts(path.strip("/"), tmp)
        shutil.move(local, dst)  # a rename where it can be


def _put_artifact(artifact_uri: str, path: str, file: Path) -> None:
    repo = _repository(artifact_uri)
    directory, _, name = path.strip("/").rpartition("/")
    if file.name == name:
        repo.log_artifact(str(file), directory or None)
        return
    with tempfile.TemporaryDirectory(prefix="tracklane-artifact-") as tmp:
        named = os.path.join(tmp, name)
        shutil.copyfile(file, named)
        repo.log_artifact(named, directory or None)
