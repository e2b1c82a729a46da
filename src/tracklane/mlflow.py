"""MLflow's fluent tracking API on tracklane's engine: ``import tracklane.mlflow as mlflow``.

A drop-in for the common subset of the ``mlflow`` module, with MLflow's signatures and semantics
(a process-wide stack of active runs, ``nested=True`` children tagged ``mlflow.parentRunId``, a run
started for you when you log with none active, ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``/
``_ID`` and ``MLFLOW_RUN_ID`` honoured). What differs: logging calls never wait for the server
unless ``synchronous=True`` (MLflow waits by default), and what the server cannot take now is kept
in a local journal and delivered later. Active runs end at interpreter exit, FAILED if the process
dies of an exception. Importing this module starts nothing; the first call does.

Every other attribute of ``mlflow`` is MLflow's own, when MLflow is installed: the flavors
(``mlflow.sklearn.log_model``, ``mlflow.pytorch`` ...), ``autolog``, ``evaluate``, ``log_input``,
``register_model``, ``MlflowException``. They act on tracklane's active run, on the same server, and
what they log goes through tracklane's engine (see ``tracklane.integrations.mlflow_module``). MLflow
is imported only when one of them is first used.
"""

from __future__ import annotations

import sys
from typing import Any

from . import entities
from . import mlflow_exceptions as exceptions
from ._entities import ActiveRun
from ._faces.fluent import Fluent
from ._faces.mlflow_client import MlflowClient
from ._faces.run_operations import RunOperations

_fluent = Fluent()
# ``from tracklane.mlflow.exceptions import MlflowException``, as code written for MLflow imports it.
sys.modules.setdefault(__name__ + ".exceptions", exceptions)

#: The MLflow API tracklane's faces follow, when MLflow itself is not installed.
MLFLOW_API_VERSION = "3.17.2"


# Bound methods: one call from the user's code to the engine's hot path.
set_tracking_uri = _fluent.set_tracking_uri
get_tracking_uri = _fluent.get_tracking_uri
is_tracking_uri_set = _fluent.is_tracking_uri_set
set_registry_uri = _fluent.set_registry_uri
get_registry_uri = _fluent.get_registry_uri
set_experiment = _fluent.set_experiment
create_experiment = _fluent.create_experiment
get_experiment = _fluent.get_experiment
get_experiment_by_name = _fluent.get_experiment_by_name
delete_experiment = _fluent.delete_experiment
restore_experiment = _fluent.restore_experiment
search_experiments = _fluent.search_experiments
set_experiment_tag = _fluent.set_experiment_tag
set_experiment_tags = _fluent.set_experiment_tags
delete_experiment_tag = _fluent.delete_experiment_tag
start_run = _fluent.start_run
end_run = _fluent.end_run
active_run = _fluent.active_run
last_active_run = _fluent.last_active_run
get_run = _fluent.get_run
get_parent_run = _fluent.get_parent_run
delete_run = _fluent.delete_run
restore_run = _fluent.restore_run
search_runs = _fluent.search_runs
log_metric = _fluent.log_metric
log_metrics = _fluent.log_metrics
log_param = _fluent.log_param
log_params = _fluent.log_params
set_tag = _fluent.set_tag
set_tags = _fluent.set_tags
delete_tag = _fluent.delete_tag
log_artifact = _fluent.log_artifact
log_artifacts = _fluent.log_artifacts
log_text = _fluent.log_text
log_dict = _fluent.log_dict
log_figure = _fluent.log_figure
log_image = _fluent.log_image
log_table = _fluent.log_table
get_artifact_uri = _fluent.get_artifact_uri
flush = _fluent.flush


def __getattr__(name: str) -> Any:
    """MLflow's own attribute ``name`` (imported, and linked to tracklane's runs, on first use).
    ``MlflowException`` (MLflow's own when installed, else tracklane's stand-in) and ``__version__``
    (the installed MLflow's, else the API version followed) work without MLflow too."""
    if name == "MlflowException":
        return exceptions.MlflowException
    if name == "__version__":
        from importlib import metadata

        try:
            return metadata.version("mlflow")
        except metadata.PackageNotFoundError:
            return MLFLOW_API_VERSION
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .integrations.mlflow_module import mlflow_attribute

    return mlflow_attribute(_fluent, name)


__all__ = [
    "ActiveRun",
    "MlflowClient",
    "RunOperations",
    "active_run",
    "create_experiment",
    "delete_experiment",
    "delete_experiment_tag",
    "delete_run",
    "delete_tag",
    "end_run",
    "entities",
    "exceptions",
    "flush",
    "get_artifact_uri",
    "get_experiment",
    "get_experiment_by_name",
    "get_parent_run",
    "get_registry_uri",
    "get_run",
    "get_tracking_uri",
    "is_tracking_uri_set",
    "last_active_run",
    "log_artifact",
    "log_artifacts",
    "log_dict",
    "log_figure",
    "log_image",
    "log_metric",
    "log_metrics",
    "log_param",
    "log_params",
    "log_table",
    "log_text",
    "restore_experiment",
    "restore_run",
    "search_experiments",
    "search_runs",
    "set_experiment",
    "set_experiment_tag",
    "set_experiment_tags",
    "set_registry_uri",
    "set_tag",
    "set_tags",
    "set_tracking_uri",
    "start_run",
]
