"""An MLflow tracking-store plugin: ``mlflow.set_tracking_uri("tracklane+http://host:5000")``, and
``tracklane+file:///path`` to log offline into tracklane's journal there.

Code that only changes its tracking URI (``MLFlowLogger(tracking_uri=...)``, autolog, scripts) keeps
calling MLflow, and MLflow hands every call to this store. Logging (``log_batch``, ``log_metric``,
``log_param``, ``set_tag`` and their ``*_async`` forms) goes through tracklane's engine: enqueued in
microseconds, delivered in the background, kept in the journal through outages. Everything else is
MLflow's own REST store against the same server, after delivering what was logged (read your
writes). ``set_terminated`` delivers the run's events first, and interpreter exit flushes.

Offline (``tracklane+file``), every call goes to the local journal through tracklane's offline
store: runs, params, metrics and tags are kept there for ``tracklane sync DIR --to URL`` (or
``tracklane ui DIR``); searching needs a server.

Registered under MLflow's ``mlflow.tracking_store`` entry point for ``tracklane+http``,
``tracklane+https`` and ``tracklane+file``, and under ``mlflow.model_registry_store`` too: MLflow
resolves a registry store from the tracking URI when a client is built, and the registry stays
the server's REST registry.
Needs MLflow (``pip install 'tracklane[mlflow]'``); tracklane itself does not.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from mlflow import entities as mlflow_entities
from mlflow.entities import RunStatus
from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository
from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
from mlflow.store.tracking.abstract_store import AbstractStore
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.async_logging.run_operations import RunOperations
from mlflow.utils.rest_utils import MlflowHostCreds

from .. import _entities
from .._exceptions import ConfigurationError
from .._faces.mlflow_client import MlflowClient

logger = logging.getLogger("tracklane")

PREFIX = "tracklane+"


def http_uri(store_uri: str) -> str:
    """``tracklane+http://host:5000`` -> ``http://host:5000``."""
    if not store_uri.startswith(PREFIX) or not store_uri[len(PREFIX) :].startswith(("http://", "https://")):
        raise ConfigurationError(
            f"tracking URI {store_uri!r}: tracklane's MLflow plugin takes tracklane+http://HOST:PORT or "
            "tracklane+https://HOST."
        )
    return store_uri[len(PREFIX) :]


def plain_uri(uri: str | None) -> str | None:
    """A ``tracklane+http(s)://`` tracking URI as MLflow's HTTP code needs it (``http(s)://``);
    any other URI unchanged."""
    if uri is not None and uri.startswith(PREFIX) and uri[len(PREFIX) :].startswith(("http://", "https://")):
        return uri[len(PREFIX) :]
    return uri


class ProxiedArtifacts(MlflowArtifactsRepository):
    """MLflow's ``mlflow-artifacts:`` repository (the server's artifact proxy), resolved against the
    server behind a ``tracklane+http(s)://`` tracking URI: MLflow's own accepts only ``http(s)``
    and refuses the plugin's scheme. For any other tracking URI it is MLflow's, unchanged."""

    def __init__(
        self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None
    ) -> None:
        from mlflow.tracking._tracking_service.utils import get_tracking_uri

        super().__init__(artifact_uri, plain_uri(tracking_uri or get_tracking_uri()), registry_uri)


def route_proxied_artifacts() -> None:
    """Make ``mlflow-artifacts:`` URIs resolve through ``ProxiedArtifacts`` (MLflow's artifact
    repository registry is its plugin point for schemes; the class behaves as MLflow's for every
    other tracking URI, so registering it process-wide changes nothing else)."""
    from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry

    _artifact_repository_registry.register("mlflow-artifacts", ProxiedArtifacts)


def _host_creds(uri: str) -> MlflowHostCreds:
    from mlflow.tracking._tracking_service import utils

    return utils.get_default_host_creds(uri)


class _LoggingThroughTracklane:
    """MLflow's logging calls (and their ``*_async`` forms) on tracklane's engine: enqueued, never
    waited for; ``self.tracklane`` is the store's tracklane ``MlflowClient``."""

    tracklane: MlflowClient

    def log_batch(self, run_id: str, metrics: Any, params: Any, tags: Any) -> None:
        self.tracklane.log_batch(run_id, metrics or (), params or (), tags or ())

    def log_metric(self, run_id: str, metric: Any) -> None:
        self.tracklane.log_metric(run_id, metric.key, metric.value, metric.timestamp, metric.step)

    def log_param(self, run_id: str, param: Any) -> None:
        self.tracklane.log_param(run_id, param.key, param.value)

    def set_tag(self, run_id: str, tag: Any) -> None:
        self.tracklane.set_tag(run_id, tag.key, tag.value)

    def log_batch_async(self, run_id: str, metrics: Any, params: Any, tags: Any) -> RunOperations:
        self.log_batch(run_id, metrics, params, tags)
        return RunOperations([])  # already queued: nothing to wait for but tracklane's own flush

    def log_metric_async(self, run_id: str, metric: Any) -> RunOperations:
        self.log_metric(run_id, metric)
        return RunOperations([])

    def log_param_async(self, run_id: str, param: Any) -> RunOperations:
        self.log_param(run_id, param)
        return RunOperations([])

    def set_tag_async(self, run_id: str, tag: Any) -> RunOperations:
        self.set_tag(run_id, tag)
        return RunOperations([])

    def flush_async_logging(self) -> None:
        self.tracklane.flush()

    def end_async_logging(self) -> None:
        self.tracklane.flush()

    def shut_down_async_logging(self) -> None:
        self.tracklane.flush()


class TracklaneStore(_LoggingThroughTracklane, RestStore):
    """MLflow's REST store, with logging through tracklane's engine."""

    def __init__(self, store_uri: str, artifact_uri: str | None = None) -> None:
        self.http_uri = http_uri(store_uri)
        super().__init__(partial(_host_creds, self.http_uri))
        self.tracklane = MlflowClient(self.http_uri)

    # -- lifecycle and reads: deliver first, then MLflow's REST store ------------------------------

    def update_run_info(self, run_id: str, run_status: Any, end_time: Any, run_name: Any) -> Any:
        status = RunStatus.to_string(run_status) if isinstance(run_status, int) else run_status
        if status in ("FINISHED", "FAILED", "KILLED"):
            # tracklane's end: the run's events and artifacts first; kept in the journal with them
            # if the server is away (then MLflow's own call below reports the outage).
            self.tracklane.set_terminated(run_id, status, end_time, _links=False)  # MLflow prints them
        else:
            self.tracklane.flush()
        return super().update_run_info(run_id, run_status, end_time, run_name)

    def get_run(self, run_id: str) -> Any:
        self.tracklane.flush()
        return super().get_run(run_id)

    def get_metric_history(self, run_id: str, metric_key: str, *args: Any, **kwargs: Any) -> Any:
        self.tracklane.flush()
        return super().get_metric_history(run_id, metric_key, *args, **kwargs)

    def search_runs(self, *args: Any, **kwargs: Any) -> Any:
        self.tracklane.flush()
        return super().search_runs(*args, **kwargs)

    def delete_tag(self, run_id: str, key: str) -> None:
        self.tracklane.flush()
        super().delete_tag(run_id, key)


class TracklaneOfflineStore(_LoggingThroughTracklane, AbstractStore):
    """MLflow's store API on tracklane's offline journal (``tracklane+file:///path``)."""

    def __init__(self, store_uri: str, artifact_uri: str | None = None) -> None:
        super().__init__()
        path = store_uri[len(PREFIX + "file:") :]
        self.storage = path[2:] if path.startswith("//") else path  # file:///abs -> /abs
        self.tracklane = MlflowClient(self.storage or ".")

    # -- experiments -------------------------------------------------------------------------------

    def create_experiment(self, name: str, artifact_location: Any = None, tags: Any = None) -> str:
        pairs = {t.key: t.value for t in tags or ()}
        return self.tracklane.create_experiment(name, artifact_location, pairs)

    def get_experiment(self, experiment_id: str) -> Any:
        return _experiment(self.tracklane.get_experiment(experiment_id))

    def get_experiment_by_name(self, experiment_name: str) -> Any:
        found = self.tracklane.get_experiment_by_name(experiment_name)
        return None if found is None else _experiment(found)

    def set_experiment_tag(self, experiment_id: str, tag: Any) -> None:
        self.tracklane.set_experiment_tag(experiment_id, tag.key, tag.value)

    # -- runs --------------------------------------------------------------------------------------

    def create_run(
        self, experiment_id: str, user_id: str, start_time: int, tags: Any, run_name: str | None
    ) -> Any:
        pairs = {t.key: t.value for t in tags or ()}
        return mlflow_run(self.tracklane.create_run(experiment_id, start_time, pairs, run_name))

    def get_run(self, run_id: str) -> Any:
        return mlflow_run(self.tracklane.get_run(run_id))

    def update_run_info(self, run_id: str, run_status: Any, end_time: Any, run_name: Any) -> Any:
        status = RunStatus.to_string(run_status) if isinstance(run_status, int) else run_status
        if status in ("FINISHED", "FAILED", "KILLED"):
            self.tracklane.set_terminated(run_id, status, end_time, _links=False)
        else:
            self.tracklane.update_run(run_id, status)
        return self.get_run(run_id).info

    def get_metric_history(self, run_id: str, metric_key: str, *args: Any, **kwargs: Any) -> Any:
        from mlflow.store.entities.paged_list import PagedList

        points = self.tracklane.get_metric_history(run_id, metric_key)
        return PagedList([mlflow_entities.Metric(p.key, p.value, p.timestamp, p.step) for p in points], None)

    def log_inputs(self, *args: Any, **kwargs: Any) -> None:
        """Datasets are not kept offline (MLflow's autolog calls this; it must not fail)."""

    def log_outputs(self, *args: Any, **kwargs: Any) -> None:
        """Logged models are not kept offline."""


def _experiment(e: _entities.Experiment) -> Any:
    tags = [mlflow_entities.ExperimentTag(k, v) for k, v in e.tags.items()]
    return mlflow_entities.Experiment(
        e.experiment_id,
        e.name,
        e.artifact_location,
        e.lifecycle_stage,
        tags,
        e.creation_time,
        e.last_update_time,
    )


def mlflow_run(r: _entities.Run) -> Any:
    i = r.info
    info = mlflow_entities.RunInfo(
        i.run_id,
        i.experiment_id,
        i.user_id,
        i.status,
        i.start_time,
        i.end_time,
        i.lifecycle_stage,
        i.artifact_uri,
        i.run_name,
    )
    data = mlflow_entities.RunData(
        metrics=[mlflow_entities.Metric(k, v, 0, 0) for k, v in r.data.metrics.items()],
        params=[mlflow_entities.Param(k, v) for k, v in r.data.params.items()],
        tags=[mlflow_entities.RunTag(k, v) for k, v in r.data.tags.items()],
    )
    return mlflow_entities.Run(info, data)


def tracking_store(store_uri: str, artifact_uri: str | None = None, **_: Any) -> Any:
    """MLflow's ``mlflow.tracking_store`` entry point: the server's store, or the offline journal."""
    if store_uri.startswith(PREFIX + "file:"):
        return TracklaneOfflineStore(store_uri, artifact_uri)
    route_proxied_artifacts()
    return TracklaneStore(store_uri, artifact_uri)


def registry_store(store_uri: str, tracking_uri: str | None = None, **_: Any) -> Any:
    """MLflow's ``mlflow.model_registry_store`` entry point: the server's own REST registry (offline:
    none; registering a model needs a server)."""
    if store_uri.startswith(PREFIX + "file:"):
        from mlflow.store.model_registry.abstract_store import AbstractStore as RegistryStore

        return RegistryStore()
    return RegistryRestStore(partial(_host_creds, http_uri(store_uri)))
