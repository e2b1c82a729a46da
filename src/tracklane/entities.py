"""MLflow's entities, in tracklane: ``from tracklane.entities import Metric, Param, RunTag``.

The same class names, attribute names and constructors as ``mlflow.entities``, so code that builds
``Metric(key, value, timestamp, step)`` for ``log_batch`` runs unchanged.
"""

from ._entities import (
    Experiment,
    ExperimentTag,
    Metric,
    Param,
    Run,
    RunData,
    RunInfo,
    RunStatus,
    RunTag,
    ViewType,
)

__all__ = [
    "Experiment",
    "ExperimentTag",
    "Metric",
    "Param",
    "Run",
    "RunData",
    "RunInfo",
    "RunStatus",
    "RunTag",
    "ViewType",
]
