"""Exceptions raised by tracklane.

TrackingError
 +-- InvalidInputError (also a ValueError)   bad call: wrong key, value, step or state
 +-- NoActiveRunError                        a run-scoped call with no run started
 +-- ConfigurationError                      the client cannot be set up as asked
 +-- ServerError                             the server answered a request with an error
 |    +-- NotFoundError                      ... RESOURCE_DOES_NOT_EXIST
 |    +-- AuthenticationError                ... refused the credentials, or is not an MLflow server
 |         +-- CertificateError              ... its TLS certificate could not be verified
 +-- ServerUnavailableError                  the server could not be reached in the retry window
 +-- DeliveryError                           logged events the server refused (listed)

Each class names the MLflow error code (``mlflow_code``) an ``MlflowException`` of the same error
carries: the MLflow faces raise these errors as instances of both classes (``_faces.mlflow_errors``),
so ``except mlflow.exceptions.MlflowException`` catches them; this module never imports MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class TrackingError(Exception):
    """Root of every error tracklane raises."""

    #: The ``error_code`` MLflow gives an error of this kind (``mlflow.protos.databricks_pb2``).
    mlflow_code = "INTERNAL_ERROR"


class InvalidInputError(TrackingError, ValueError):
    """A logging or lifecycle call was given input the server would refuse."""

    mlflow_code = "INVALID_PARAMETER_VALUE"


class NoActiveRunError(TrackingError, RuntimeError):
    """A run-scoped call was made with no active run."""

    mlflow_code = "BAD_REQUEST"


class ConfigurationError(TrackingError, ValueError):
    """The client's settings are missing or contradict each other."""

    mlflow_code = "INVALID_PARAMETER_VALUE"


class ServerError(TrackingError):
    """The tracking server answered with an error status."""

    def __init__(self, message: str, *, status: int = 0, error_code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class NotFoundError(ServerError):
    """The experiment or run asked for does not exist on the server."""

    mlflow_code = "RESOURCE_DOES_NOT_EXIST"


class AuthenticationError(ServerError):
    """The server refused the credentials (401/403) or answered with something that is not MLflow's
    JSON (a login page): delivery stops and every event is kept in the journal until the key or URL
    is fixed and ``tracklane sync`` runs."""

    mlflow_code = "UNAUTHENTICATED"


class CertificateError(AuthenticationError):
    """The server's TLS certificate could not be verified (self-signed, private CA, wrong host):
    reported at once, not retried; the message names the setting that fixes it."""

    mlflow_code = "PERMISSION_DENIED"


class ServerUnavailableError(TrackingError):
    """The server did not answer within the retry window."""

    mlflow_code = "TEMPORARILY_UNAVAILABLE"


@dataclass(frozen=True)
class RejectedEvent:
    """One logged event the server refused, with the server's reason."""

    run_id: str
    kind: str
    key: str
    value: object
    reason: str


class DeliveryError(TrackingError):
    """Events were accepted at the call site but refused by the server; ``rejected`` lists them."""

    mlflow_code = "INVALID_PARAMETER_VALUE"

    def __init__(self, rejected: Sequence[RejectedEvent]) -> None:
        self.rejected = list(rejected)
        shown = "; ".join(f"{r.kind} {r.key!r} of run {r.run_id}: {r.reason}" for r in self.rejected[:5])
        more = f" (and {len(self.rejected) - 5} more)" if len(self.rejected) > 5 else ""
        super().__init__(
            f"The server refused {len(self.rejected)} logged event(s): {shown}{more}. "
            "Every other event was delivered; fix the listed keys or values and log them again."
        )
