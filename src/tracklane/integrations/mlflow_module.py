"""The rest of the ``mlflow`` module behind ``tracklane.mlflow``, acting on tracklane's active run.

``tracklane.mlflow`` implements MLflow's tracking calls on tracklane's engine; any other attribute
(the flavors ``mlflow.sklearn`` ..., ``autolog``, ``evaluate``, ``register_model``, ``log_input``,
``MlflowException``) is MLflow's own, looked up here the first time it is touched. Then MLflow is
linked to tracklane, once per process:

- MLflow's tracking URI is the plugin's for tracklane's destination (``tracklane+http://HOST``),
  so what MLflow logs goes through tracklane's engine, and its model and artifact files go to the
  server's artifact proxy as MLflow uploads them (see ``mlflow_store``);
- MLflow's active experiment follows tracklane's ``set_experiment``;
- MLflow's run stack (``mlflow.tracking.fluent._active_run_stack``, one list per thread) becomes a
  view of tracklane's: a run started by either module is the run both see in that thread, and it
  ends once, from either side. MLflow's own exit hook is dropped: tracklane's ends the active runs
  (FAILED when the process dies of an exception).

Nothing here runs unless an MLflow attribute is used: ``import tracklane.mlflow`` imports no MLflow,
and logging through tracklane never passes here.
"""

from __future__ import annotations

import atexit
import importlib
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from .._entities import Run, RunData, RunInfo
from .._exceptions import TrackingError
from .._faces.fluent import Fluent
from .._runs.mlflow_runs import MlflowRuns

MISSING = (
    "tracklane.mlflow.{name} is MLflow's own, and MLflow is not installed: "
    "pip install 'tracklane[mlflow]' (tracklane's own calls, log_metric and the rest, work without it)."
)

_link_lock = threading.Lock()


def mlflow_attribute(fluent: Fluent, name: str) -> Any:
    """``mlflow.<name>``, with MLflow linked to ``fluent``'s run stack and destination first."""
    try:
        mlflow = importlib.import_module("mlflow")
    except ImportError as exc:
        raise ImportError(MISSING.format(name=name), name="mlflow") from exc
    value = getattr(mlflow, name)  # MLflow's own AttributeError for a name it does not have
    if fluent.on_change is None:
        link(fluent)
    return value


def link(fluent: Fluent) -> None:
    """Point MLflow's fluent module at tracklane's destination, experiment and run stack."""
    with _link_lock:
        if fluent.on_change is not None:
            return
        from mlflow.tracking import fluent as mlflow_fluent

        from . import mlflow_store

        mlflow_store.route_proxied_artifacts()
        mlflow_fluent._active_run_stack = SharedRunStack(fluent)
        atexit.unregister(mlflow_fluent._safe_end_run)  # tracklane's exit hook ends the runs
        fluent.on_change = partial(follow, fluent)
        follow(fluent)


def follow(fluent: Fluent) -> None:
    """MLflow's tracking URI and active experiment, set to tracklane's."""
    from mlflow.tracking import fluent as mlflow_fluent
    from mlflow.tracking._tracking_service import utils

    try:
        uri: str | None = plugin_uri(fluent)
    except TrackingError:
        uri = None  # a URI tracklane refuses: its own calls say so; MLflow resolves its own
    # The module global, not mlflow.set_tracking_uri: that one also writes $MLFLOW_TRACKING_URI.
    utils._tracking_uri = uri
    runs = fluent.run_model()
    mlflow_fluent._active_experiment_id = runs.experiment_id if runs is not None else None


def plugin_uri(fluent: Fluent) -> str:
    """The plugin's URI for tracklane's destination: the server (``tracklane+http(s)://``),
    offline the journal's directory (``tracklane+file://``), else the destination's own URI."""
    destination = fluent.where()
    if destination.server is not None:
        return "tracklane+" + destination.server.api_host
    if destination.storage is not None:
        return "tracklane+" + Path(destination.storage).resolve().as_uri()
    return destination.uri


class SharedRunStack:
    """Stands in for MLflow's ``_active_run_stack`` (a ``ThreadLocalVariable`` of lists): ``get``
    gives the calling thread's stack as a view of tracklane's, with MLflow's run entities."""

    def __init__(self, fluent: Fluent) -> None:
        self.fluent = fluent
        #: MLflow's entity for each active run, by run id, with the tracklane run it shows (so
        #: ``mlflow.active_run()`` returns the object MLflow's ``start_run`` returned).
        self.shown: dict[str, tuple[Run, Any]] = {}
        self.lock = threading.Lock()

    def get(self) -> ThreadRunStack:
        return ThreadRunStack(self)

    def set(self, value: list[Any]) -> None:
        """MLflow's tests reset the stack this way: the calling thread's stack becomes ``value``."""
        stack = self.get()
        while len(stack):
            stack.pop()
        for run in value:
            stack.append(run)

    def get_all_thread_values(self) -> dict[int, list[Any]]:
        runs = self.fluent.run_model()
        if runs is None:
            return {}
        return {i: [self.show(r) for r in stack] for i, stack in enumerate(runs.active_runs())}

    def reset(self) -> None:
        """Nothing to reset: the stacks are tracklane's, and its runs end through it."""

    def show(self, run: Run) -> Any:
        """MLflow's ``ActiveRun`` for tracklane's ``run`` (made once per run)."""
        with self.lock:
            found = self.shown.get(run.info.run_id)
            if found is not None and found[0] is run:
                return found[1]
        from mlflow.tracking.fluent import ActiveRun

        from .mlflow_store import mlflow_run

        shown = ActiveRun(mlflow_run(run))
        with self.lock:
            self.shown[run.info.run_id] = (run, shown)
        return shown

    def adopt(self, runs: MlflowRuns, mlflow_active: Any) -> Run:
        """tracklane's run for the ``ActiveRun`` MLflow's ``start_run`` pushes."""
        run = tracklane_run(mlflow_active)
        active = {r.info.run_id for stack in runs.active_runs() for r in stack}
        with self.lock:
            for run_id in [k for k in self.shown if k not in active]:
                del self.shown[run_id]  # ended through tracklane: MLflow's view is stale
            self.shown[run.info.run_id] = (run, mlflow_active)
        return run

    def forget(self, run: Run) -> Any:
        with self.lock:
            found = self.shown.pop(run.info.run_id, None)
        return found[1] if found is not None and found[0] is run else None


class ThreadRunStack:
    """One thread's active runs, as MLflow's fluent module uses its list (``len``, ``[-1]``,
    iteration, ``append`` in ``start_run``, ``pop`` in ``end_run``)."""

    def __init__(self, shared: SharedRunStack) -> None:
        self.shared = shared

    def _stack(self) -> list[Run]:
        runs = self.shared.fluent.run_model()
        return runs.stack if runs is not None else []

    def __len__(self) -> int:
        return len(self._stack())

    def __bool__(self) -> bool:
        return bool(self._stack())

    def __getitem__(self, index: int) -> Any:
        return self.shared.show(self._stack()[index])

    def __iter__(self) -> Iterator[Any]:
        return iter([self.shared.show(r) for r in self._stack()])

    def append(self, mlflow_active: Any) -> None:
        """MLflow's ``start_run`` made a run (through the plugin store): tracklane's stack holds it."""
        runs = self.shared.fluent.run_model(start=True)
        assert runs is not None
        runs.push(self.shared.adopt(runs, mlflow_active), runs.stack)

    def pop(self) -> Any:
        """MLflow's ``end_run`` takes the run off; it ends it on the server itself, through the
        plugin store (tracklane's engine delivers the run's events first)."""
        runs = self.shared.fluent.run_model()
        if runs is None or not runs.stack:
            raise IndexError("pop from an empty run stack")
        run: Run | None = self.shared.fluent.call(runs.pop(runs.stack))
        assert run is not None
        return self.shared.forget(run) or self.shared.show(run)


def tracklane_run(mlflow_run: Any) -> Run:
    """tracklane's entity for one of MLflow's runs."""
    i = mlflow_run.info
    info = RunInfo(
        run_id=i.run_id,
        experiment_id=str(i.experiment_id),
        user_id=i.user_id or "",
        status=i.status,
        start_time=i.start_time,
        end_time=i.end_time,
        lifecycle_stage=i.lifecycle_stage,
        artifact_uri=i.artifact_uri or "",
        run_name=i.run_name or "",
    )
    d = mlflow_run.data
    return Run(info, RunData(dict(d.metrics), dict(d.params), dict(d.tags)))
