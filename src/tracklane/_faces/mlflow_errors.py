"""MLflow's exceptions at the MLflow faces' boundary.

Code written for MLflow catches ``mlflow.exceptions.MlflowException`` and reads its ``error_code``
and ``get_http_status_code()``. tracklane's errors keep their own hierarchy (an InvalidInputError is
a ValueError, everything a TrackingError) and the core never imports MLflow: the MLflow faces
(``tracklane.mlflow``, ``MlflowClient``, the plugin through it) re-raise each error as an instance of
a class made here, lazily and once per error class, that subclasses both the tracklane class and
``MlflowException``: MLflow's own when MLflow is installed, else a stand-in with its attributes
(``tracklane.mlflow.exceptions.MlflowException`` is whichever of the two applies). The OICM face
raises the plain classes.

The translation costs nothing until an error is raised (a ``try`` is free in CPython 3.11+); the
first error through a face imports MLflow if it is installed and not yet imported.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import threading
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from .._exceptions import AuthenticationError, ServerError, TrackingError

T = TypeVar("T")

#: MLflow's ``ERROR_CODE_TO_HTTP_STATUS`` (``mlflow/exceptions.py``), for the stand-in.
HTTP_STATUS = {
    "INTERNAL_ERROR": 500,
    "INVALID_STATE": 500,
    "DATA_LOSS": 500,
    "NOT_IMPLEMENTED": 501,
    "TEMPORARILY_UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "REQUEST_LIMIT_EXCEEDED": 429,
    "CANCELLED": 499,
    "RESOURCE_EXHAUSTED": 429,
    "ABORTED": 409,
    "RESOURCE_CONFLICT": 409,
    "ALREADY_EXISTS": 409,
    "NOT_FOUND": 404,
    "ENDPOINT_NOT_FOUND": 404,
    "RESOURCE_DOES_NOT_EXIST": 404,
    "PERMISSION_DENIED": 403,
    "CUSTOMER_UNAUTHORIZED": 401,
    "UNAUTHENTICATED": 401,
    "BAD_REQUEST": 400,
    "RESOURCE_ALREADY_EXISTS": 400,
    "INVALID_PARAMETER_VALUE": 400,
}
#: MLflow's ``HTTP_STATUS_TO_ERROR_CODE``: a server error with no error code of its own.
_CODE_OF_STATUS = {
    **{status: code for code, status in HTTP_STATUS.items()},
    400: "BAD_REQUEST",
    404: "ENDPOINT_NOT_FOUND",
    500: "INTERNAL_ERROR",
}


class MlflowExceptionStandIn(TrackingError):
    """``mlflow.exceptions.MlflowException`` when MLflow is not installed: the same attributes
    (``message``, ``error_code``, ``get_http_status_code()``, ``serialize_as_json()``)."""

    def __init__(self, message: object, error_code: str = "INTERNAL_ERROR", **kwargs: Any) -> None:
        super().__init__(str(message))
        self.message = str(message)
        self.error_code = error_code if error_code in HTTP_STATUS else "INTERNAL_ERROR"
        self.json_kwargs = kwargs

    def get_http_status_code(self) -> int:
        return HTTP_STATUS.get(self.error_code, 500)

    def serialize_as_json(self) -> str:
        import json

        return json.dumps({"error_code": self.error_code, "message": self.message, **self.json_kwargs})


MlflowExceptionStandIn.__name__ = MlflowExceptionStandIn.__qualname__ = "MlflowException"

_lock = threading.Lock()
_classes: dict[tuple[type[BaseException], type[BaseException]], type[BaseException]] = {}


def mlflow_installed() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def mlflow_exception_class() -> type[BaseException]:
    """MLflow's ``MlflowException`` when MLflow is installed (importing it), else the stand-in."""
    if not mlflow_installed():
        return MlflowExceptionStandIn
    cls: type[BaseException] = importlib.import_module("mlflow.exceptions").MlflowException
    return cls


def code_of(exc: TrackingError) -> str:
    """The MLflow error code for ``exc``: a server's own, else its status's, else its class's."""
    if isinstance(exc, ServerError):
        if exc.error_code in HTTP_STATUS:
            return exc.error_code
        if exc.status in _CODE_OF_STATUS and type(exc) in (ServerError, AuthenticationError):
            return _CODE_OF_STATUS[exc.status]  # e.g. 403: PERMISSION_DENIED, 503: TEMPORARILY_UNAVAILABLE
    return type(exc).mlflow_code


def as_mlflow(exc: TrackingError) -> BaseException:
    """``exc`` as an instance of its own class and of ``MlflowException`` (itself if it is one)."""
    base = mlflow_exception_class()
    if isinstance(exc, base):
        return exc
    key = (type(exc), base)
    with _lock:
        cls = _classes.get(key)
        if cls is None:
            name = type(exc).__name__
            cls = _classes[key] = type(
                name, (type(exc), base), {"__module__": type(exc).__module__, "__doc__": type(exc).__doc__}
            )
    code = code_of(exc)
    new: Any = BaseException.__new__(cls)
    if base is MlflowExceptionStandIn:
        MlflowExceptionStandIn.__init__(new, str(exc), code)
    else:
        protos = importlib.import_module("mlflow.protos.databricks_pb2")
        init: Any = base.__init__
        init(new, str(exc), error_code=protos.ErrorCode.Value(code))
    mlflow_fields = dict(new.__dict__)
    new.__dict__.update(exc.__dict__)
    new.__dict__.update(mlflow_fields)  # error_code: MLflow's name (a server's own code is the same)
    new.args = exc.args
    new.__cause__, new.__suppress_context__ = exc.__cause__, True  # one error, not a chain of two
    return new.with_traceback(exc.__traceback__)  # type: ignore[no-any-return]


def reraise(exc: TrackingError) -> NoReturn:
    """Raise ``exc`` as MLflow's face raises it (see ``as_mlflow``)."""
    raise as_mlflow(exc)


def mlflow_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap a face method so that a TrackingError leaves it as an MlflowException too."""

    @functools.wraps(fn)
    def face(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except TrackingError as exc:
            reraise(exc)

    face.__wrapped_for_mlflow__ = True  # type: ignore[attr-defined]
    return face


def mlflow_face(hot: tuple[str, ...] = ()) -> Callable[[type[T]], type[T]]:
    """Class decorator: every public method raises MLflow's exceptions (``mlflow_errors``), except
    ``hot`` ones (the logging hot path), which translate inline with a ``try`` of their own."""

    def decorate(cls: type[T]) -> type[T]:
        for name, member in list(vars(cls).items()):
            if name.startswith("_") or name in hot or not callable(member) or isinstance(member, type):
                continue
            if isinstance(member, (staticmethod, classmethod, property)):
                continue
            setattr(cls, name, mlflow_errors(member))
        return cls

    return decorate
