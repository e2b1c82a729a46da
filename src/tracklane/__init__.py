"""tracklane: experiment tracking for MLflow and OICM servers that never slows your training loop."""

from ._entities import ActiveRun, Experiment, Metric, Run, RunData, RunInfo
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
    "NoActiveRunError",
    "NotFoundError",
    "RejectedEvent",
    "Run",
    "RunData",
    "RunInfo",
    "ServerError",
    "ServerUnavailableError",
    "TrackingClient",
    "TrackingError",
    "__version__",
]
