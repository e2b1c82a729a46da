"""What a rank of a distributed job logs: everything (the default), nothing unless it is rank 0, or
its metrics under per-rank keys (``rank<R>/loss``), so ranks never write the same keys and never
queue behind each other on the server (MLflow locks a run's latest value per key).

These stand in front of the buffer with its logging signatures; the hot path of a single process is
untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._delivery.buffer import Buffer


class PrefixedMetrics:
    """Metric keys under ``rank<R>/``; params and tags as they are (one value per run)."""

    def __init__(self, buffer: Buffer, rank: int) -> None:
        self._buffer = buffer
        self._prefix = f"rank{rank}/"

    def log_metric(
        self, run_id: str | None, key: str, value: Any, step: int | None = None, timestamp: int | None = None
    ) -> None:
        self._buffer.log_metric(
            run_id, self._prefix + key if type(key) is str else key, value, step, timestamp
        )

    def log_metrics(
        self,
        run_id: str | None,
        metrics: Mapping[str, Any],
        step: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        if isinstance(metrics, Mapping):
            metrics = {(self._prefix + k if type(k) is str else k): v for k, v in metrics.items()}
        self._buffer.log_metrics(run_id, metrics, step, timestamp)

    def log_params(self, run_id: str | None, params: Mapping[str, Any], logged: dict[str, str]) -> None:
        self._buffer.log_params(run_id, params, logged)

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        self._buffer.set_tags(run_id, tags)


class Silent:
    """A rank other than 0 under ``rank_logging="zero_only"``: logging calls do nothing."""

    def log_metric(
        self, run_id: str | None, key: str, value: Any, step: int | None = None, timestamp: int | None = None
    ) -> None:
        pass

    def log_metrics(
        self,
        run_id: str | None,
        metrics: Mapping[str, Any],
        step: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        pass

    def log_params(self, run_id: str | None, params: Mapping[str, Any], logged: dict[str, str]) -> None:
        pass

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        pass
