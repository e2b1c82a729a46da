"""Experiments, runs and metric points, in the attribute shapes of ``mlflow.entities``.

Users moving from MLflow or the OICM client read ``run.info.run_id`` and ``run.data.metrics``;
these plain dataclasses give them the same shapes without importing MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any


def metric_from_json(value: Any) -> float:
    """The server writes NaN and the infinities as the strings ``"NaN"``, ``"Infinity"``."""
    return float(value)


def _pairs(items: list[dict[str, Any]] | None) -> dict[str, str]:
    return {item["key"]: item.get("value", "") for item in items or ()}


@dataclass(frozen=True)
class Metric:
    """One point of a metric's time series."""

    key: str
    value: float
    timestamp: int
    step: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Metric:
        return cls(
            d["key"],
            metric_from_json(d["value"]),
            int(d.get("timestamp", 0)),
            int(d.get("step", 0)),
        )


@dataclass(frozen=True)
class Experiment:
    """An experiment: a named container of runs."""

    experiment_id: str
    name: str
    artifact_location: str = ""
    lifecycle_stage: str = "active"
    tags: dict[str, str] = field(default_factory=dict)
    creation_time: int | None = None
    last_update_time: int | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Experiment:
        return cls(
            experiment_id=str(d["experiment_id"]),
            name=d.get("name", ""),
            artifact_location=d.get("artifact_location", ""),
            lifecycle_stage=d.get("lifecycle_stage", "active"),
            tags=_pairs(d.get("tags")),
            creation_time=d.get("creation_time"),
            last_update_time=d.get("last_update_time"),
        )


@dataclass(frozen=True)
class RunInfo:
    """Identity and lifecycle of a run (``run.info``)."""

    run_id: str
    experiment_id: str
    run_name: str = ""
    status: str = "RUNNING"
    start_time: int | None = None
    end_time: int | None = None
    user_id: str = ""
    artifact_uri: str = ""
    lifecycle_stage: str = "active"

    @property
    def run_uuid(self) -> str:
        return self.run_id

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunInfo:
        return cls(
            run_id=d.get("run_id") or d["run_uuid"],
            experiment_id=str(d["experiment_id"]),
            run_name=d.get("run_name", ""),
            status=d.get("status", "RUNNING"),
            start_time=d.get("start_time"),
            end_time=d.get("end_time"),
            user_id=d.get("user_id", ""),
            artifact_uri=d.get("artifact_uri", ""),
            lifecycle_stage=d.get("lifecycle_stage", "active"),
        )


@dataclass(frozen=True)
class RunData:
    """What a run holds (``run.data``): latest metric values, params and tags as dicts."""

    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunData:
        return cls(
            metrics={m["key"]: metric_from_json(m["value"]) for m in d.get("metrics") or ()},
            params=_pairs(d.get("params")),
            tags=_pairs(d.get("tags")),
        )


@dataclass(frozen=True)
class Run:
    """A run as the server stores it."""

    info: RunInfo
    data: RunData

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Run:
        return cls(RunInfo.from_json(d["info"]), RunData.from_json(d.get("data") or {}))


def exit_status(exc_type: type[BaseException] | None) -> str:
    """The status a ``with start_run()`` block ends its run with, by how the block ended."""
    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"


class ActiveRun(Run):
    """The run ``start_run`` made active; leaving its ``with`` block ends it.

    FINISHED when the block completes, FAILED on an exception, KILLED on KeyboardInterrupt.
    """

    def __init__(self, run: Run, end: Callable[[str], None]) -> None:
        super().__init__(run.info, run.data)
        object.__setattr__(self, "_end", end)

    def __enter__(self) -> ActiveRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end(exit_status(exc_type))  # type: ignore[attr-defined]
