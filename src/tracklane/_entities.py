"""Experiments, runs and metric points, in the attribute shapes of ``mlflow.entities``.

Users moving from MLflow or the OICM client read ``run.info.run_id`` and ``run.data.metrics``;
these plain dataclasses give them the same shapes without importing MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from ._end_status import end_status
from ._exceptions import InvalidInputError


def metric_from_json(value: Any) -> float:
    """The server writes NaN and the infinities as the strings ``"NaN"``, ``"Infinity"``."""
    return float(value)


def _pairs(items: list[dict[str, Any]] | None) -> dict[str, str]:
    return {item["key"]: item.get("value", "") for item in items or ()}


@dataclass(frozen=True)
class Metric:
    """One point of a metric's time series: ``Metric(key, value, timestamp, step)`` as in MLflow."""

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
class Param:
    """A run's parameter: ``Param(key, value)``."""

    key: str
    value: str


@dataclass(frozen=True)
class RunTag:
    """A run's tag: ``RunTag(key, value)``."""

    key: str
    value: str


@dataclass(frozen=True)
class ExperimentTag:
    """An experiment's tag: ``ExperimentTag(key, value)``."""

    key: str
    value: str


def _as_dict(items: Any) -> dict[str, Any]:
    """MLflow's constructors take lists of entities; ours also take the dicts they become."""
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    return {item.key: item.value for item in items}


@dataclass(frozen=True)
class Experiment:
    """An experiment: a named container of runs. ``tags`` is a dict (MLflow's list of
    ``ExperimentTag`` is accepted by the constructor)."""

    experiment_id: str
    name: str
    artifact_location: str = ""
    lifecycle_stage: str = "active"
    tags: dict[str, str] = field(default_factory=dict)
    creation_time: int | None = None
    last_update_time: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", _as_dict(self.tags))

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
    """Identity and lifecycle of a run (``run.info``), in MLflow's constructor order."""

    run_id: str
    experiment_id: str
    user_id: str = ""
    status: str = "RUNNING"
    start_time: int | None = None
    end_time: int | None = None
    lifecycle_stage: str = "active"
    artifact_uri: str = ""
    run_name: str = ""

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
    """What a run holds (``run.data``): latest metric values, params and tags as dicts. The
    constructor also takes MLflow's lists of ``Metric``, ``Param`` and ``RunTag``."""

    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("metrics", "params", "tags"):
            object.__setattr__(self, name, _as_dict(getattr(self, name)))

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
    data: RunData = field(default_factory=RunData)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Run:
        return cls(RunInfo.from_json(d["info"]), RunData.from_json(d.get("data") or {}))

    def to_dictionary(self) -> dict[str, Any]:
        """The run as plain dicts (``{"info": ..., "data": ...}``), as MLflow's ``Run`` gives it."""
        return {"info": dict(self.info.__dict__), "data": {k: dict(v) for k, v in self.data.__dict__.items()}}


@dataclass(frozen=True)
class FileInfo:
    """An artifact listed in a run: its path in the run's artifact root, whether it is a directory,
    and its size in bytes (None for directories)."""

    path: str
    is_dir: bool
    file_size: int | None = None


class ViewType:
    """Which runs or experiments a search returns, by lifecycle stage (MLflow's values)."""

    ACTIVE_ONLY, DELETED_ONLY, ALL = 1, 2, 3
    _NAMES: ClassVar[dict[int, str]] = {1: "ACTIVE_ONLY", 2: "DELETED_ONLY", 3: "ALL"}

    @classmethod
    def to_string(cls, view_type: int) -> str:
        if view_type not in cls._NAMES:
            raise InvalidInputError(f"view type {view_type!r} is not one of {sorted(cls._NAMES)}")
        return cls._NAMES[view_type]

    @classmethod
    def from_string(cls, name: str) -> int:
        for value, known in cls._NAMES.items():
            if known == name.upper():
                return value
        raise InvalidInputError(f"view type {name!r} is not one of {list(cls._NAMES.values())}")


class RunStatus:
    """A run's status (MLflow's values): RUNNING, SCHEDULED, FINISHED, FAILED, KILLED."""

    RUNNING, SCHEDULED, FINISHED, FAILED, KILLED = 1, 2, 3, 4, 5
    _NAMES: ClassVar[dict[int, str]] = {1: "RUNNING", 2: "SCHEDULED", 3: "FINISHED", 4: "FAILED", 5: "KILLED"}

    @classmethod
    def to_string(cls, status: int) -> str:
        if status not in cls._NAMES:
            raise InvalidInputError(f"run status {status!r} is not one of {sorted(cls._NAMES)}")
        return cls._NAMES[status]

    @classmethod
    def from_string(cls, name: str) -> int:
        for value, known in cls._NAMES.items():
            if known == name:
                return value
        raise InvalidInputError(f"run status {name!r} is not one of {list(cls._NAMES.values())}")

    @classmethod
    def is_terminated(cls, status: int) -> bool:
        return status in (cls.FINISHED, cls.FAILED, cls.KILLED)

    @classmethod
    def all_status(cls) -> list[int]:
        return list(cls._NAMES)


T = TypeVar("T")


class PagedList(list[T]):
    """A page of search results; ``token`` fetches the next page (None on the last)."""

    def __init__(self, items: Iterable[T], token: str | None) -> None:
        super().__init__(items)
        self.token = token


class ActiveRun:
    """The run ``start_run`` made active; leaving its ``with`` block ends it.

    FINISHED when the block completes, FAILED on an exception, KILLED on KeyboardInterrupt (the
    rule: ``end_status``). It holds the ``Run`` as it was at the start (``run``) and reads like it:
    ``info``, ``data``, ``to_dictionary()``.
    """

    __slots__ = ("_end", "run")

    def __init__(self, run: Run, end: Callable[[str], None]) -> None:
        self.run = run
        self._end = end

    @property
    def info(self) -> RunInfo:
        return self.run.info

    @property
    def data(self) -> RunData:
        return self.run.data

    def to_dictionary(self) -> dict[str, Any]:
        """The run as plain dicts, as ``Run.to_dictionary`` gives it."""
        return self.run.to_dictionary()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(info={self.run.info!r}, data={self.run.data!r})"

    def __enter__(self) -> ActiveRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end(end_status(exc_type))
