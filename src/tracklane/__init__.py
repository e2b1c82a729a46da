"""tracklane: experiment tracking for MLflow and OICM servers that never slows your training loop."""

from ._entities import (
    ActiveRun,
    Experiment,
    Metric,
    Param,
    Run,
    RunData,
    RunInfo,
    RunStatus,
    RunTag,
    ViewType,
)
from ._exceptions import (
    AuthenticationError,
    ConfigurationError,
    DeliveryError,
    InvalidInputError,
    NoActiveRunError,
    NotFoundError,
    RejectedEvent,
    ServerError,
    ServerUnavailableError,
    TrackingError,
)
from ._faces.async_client import AsyncActiveRun, AsyncTrackingClient
from ._faces.client import TrackingClient
from ._faces.mlflow_client import MlflowClient

__version__ = "0.1.0"

__all__ = [
    "ActiveRun",
    "AsyncActiveRun",
    "AsyncTrackingClient",
    "AuthenticationError",
    "ConfigurationError",
    "DeliveryError",
    "Experiment",
    "InvalidInputError",
    "Metric",
    "MlflowClient",
    "NoActiveRunError",
    "NotFoundError",
    "Param",
    "RejectedEvent",
    "Run",
    "RunData",
    "RunInfo",
    "RunStatus",
    "RunTag",
    "ServerError",
    "ServerUnavailableError",
    "TrackingClient",
    "TrackingError",
    "ViewType",
    "__version__",
]
