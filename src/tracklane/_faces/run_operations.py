"""What MLflow's ``synchronous=False`` logging calls return: the ``RunOperations`` shape.

MLflow hands back a future per call; ``wait()`` blocks until it is done and raises what failed. On
tracklane every logging call is already asynchronous, so ``wait()`` is a flush of the run's events.
Where MLflow's asynchronous path only logs an error (a refused param: its queue logs it and goes
on), the faces do the same (``refused_async``) and ``wait()`` raises it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .._exceptions import TrackingError
from .mlflow_errors import reraise

if TYPE_CHECKING:
    from .session import Session

logger = logging.getLogger("tracklane")


class RunOperations:
    """The future of a ``synchronous=False`` call (``mlflow.RunOperations``): ``wait()``."""

    __slots__ = ("_failure", "_run_id", "_session")

    def __init__(self, session: Session, run_id: str, failure: TrackingError | None = None) -> None:
        self._session = session
        self._run_id = run_id
        self._failure = failure

    def __repr__(self) -> str:
        return f"RunOperations(run_id={self._run_id!r})"

    def wait(self) -> None:
        """Block until the server has what the run was given so far; raises (as MlflowException)
        what the call or the server refused."""
        if self._failure is not None:
            reraise(self._failure)
        try:
            self._session.call(self._session.engine.flush(None, self._run_id))
        except TrackingError as exc:
            reraise(exc)


def refused_async(session: Session, run_id: str, exc: TrackingError) -> RunOperations:
    """A ``synchronous=False`` call refused at the call site: logged at ERROR as MLflow's async
    queue logs it, not raised; ``wait()`` raises it."""
    logger.error("Run Id %s: Failed to log run data: Exception: %s", run_id, exc)
    return RunOperations(session, run_id, exc)
