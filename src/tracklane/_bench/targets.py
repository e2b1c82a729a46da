"""The issues' targets and the ratios a reader compares, judged from the figures' values.

One place says what each figure is held to, so that the table of ``tracklane bench`` and a figure
module run by hand give the same verdict. A new figure's target goes in ``TARGETS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """One target of the issues (5; 11 for the MLflow faces, 12 for artifacts, 19 for the edges of
    a run): ``value`` must be at most (or at least) ``limit``."""

    name: str
    figure: str
    key: str
    text: str
    at_most: bool
    limit: Callable[[Mapping[str, Mapping[str, float]]], float | None]


def _value(values: Mapping[str, Mapping[str, float]], figure: str, key: str) -> float | None:
    return values.get(figure, {}).get(key)


def _scaled(
    figure: str, key: str, factor: float
) -> Callable[[Mapping[str, Mapping[str, float]]], float | None]:
    def limit(values: Mapping[str, Mapping[str, float]]) -> float | None:
        found = _value(values, figure, key)
        return None if found is None else found * factor

    return limit


def _ceiling(values: Mapping[str, Mapping[str, float]]) -> float | None:
    found = [
        v
        for v in (
            _value(values, "2_end_to_end", "ceiling_1_in_flight_events_per_s"),
            _value(values, "2_end_to_end", "ceiling_2_in_flight_events_per_s"),
        )
        if v is not None
    ]
    return 0.9 * max(found) if found else None


def _fixed(limit: float) -> Callable[[Mapping[str, Mapping[str, float]]], float | None]:
    return lambda values: limit


TARGETS = (
    Target(
        "log_metric caller cost",
        "1_caller_cost",
        "tracklane_log_metric_us",
        "<= 3x the floor (nothing else running)",
        True,
        _scaled("1_caller_cost", "deque_floor_us", 3.0),
    ),
    Target(
        "tracklane.mlflow.log_metric caller cost",
        "1_caller_cost",
        "tracklane_mlflow_log_metric_us",
        "<= 3x the floor (nothing else running)",
        True,
        _scaled("1_caller_cost", "deque_floor_us", 3.0),
    ),
    Target(
        "MlflowClient.log_metric caller cost",
        "1_caller_cost",
        "tracklane_mlflow_client_log_metric_us",
        "<= 3x the floor (nothing else running)",
        True,
        _scaled("1_caller_cost", "deque_floor_us", 3.0),
    ),
    Target(
        "log_metrics (10 keys) caller cost",
        "1_caller_cost",
        "tracklane_log_metrics_10_us",
        "< 8 us",
        True,
        _fixed(8.0),
    ),
    Target(
        "end-to-end vs server ceiling",
        "2_end_to_end",
        "tracklane_events_per_s",
        ">= 90% of the raw ceiling",
        False,
        _ceiling,
    ),
    Target(
        "end-to-end vs MLflow async",
        "2_end_to_end",
        "tracklane_events_per_s",
        ">= 50x MLflow synchronous=False",
        False,
        # MLflow's one-metric-a-call path, as in the reference figure (78 events/s); the
        # ratio against its 10-key path is listed with the other ratios.
        _scaled("3_mlflow_client", "mlflow_async_log_metric_events_per_s", 50.0),
    ),
    Target(
        "drain capacity",
        "4_drain",
        "drain_events_per_s",
        ">= 1,000,000 events/s",
        False,
        _fixed(1_000_000.0),
    ),
    Target(
        "training-loop overhead",
        "5_training_loop",
        "tracklane_overhead_pct",
        "< 2%",
        True,
        _fixed(2.0),
    ),
    Target(
        "memory per buffered event",
        "6_memory",
        "tracklane_log_metric_bytes_per_event",
        "<= 150 bytes",
        True,
        _fixed(150.0),
    ),
    Target(
        "import time",
        "7_import",
        "import_tracklane_ms",
        "< 150 ms",
        True,
        _fixed(150.0),
    ),
    # The promise: the call does no network I/O, only a local copy of the file (a journal row
    # beside it), so it costs what copying the file costs, whatever the link to the server.
    Target(
        "log_artifact caller time (50 MB)",
        "9_artifacts",
        "tracklane_log_artifact_ms",
        "<= 2x a local copy of the file",
        True,
        _scaled("9_artifacts", "local_copy_ms", 2.0),
    ),
    Target(
        "artifact upload rate",
        "9_artifacts",
        "tracklane_upload_mb_per_s",
        ">= 80% of a raw PUT of the same file",
        False,
        _scaled("9_artifacts", "raw_put_mb_per_s", 0.8),
    ),
    # A training step with a logger costs the loop what the logger's call costs: tracklane's is an
    # enqueue, so its per-step overhead is a sliver of the stock logger's request per step.
    Target(
        "TracklaneLogger per-step overhead",
        "10_lightning_logger",
        "tracklane_logger_overhead_us",
        "<= 5% of MLFlowLogger's (http) per-step overhead",
        True,
        _scaled("10_lightning_logger", "mlflow_logger_overhead_us", 0.05),
    ),
    Target(
        "MLFlowLogger via tracklane+http per-step overhead",
        "10_lightning_logger",
        "mlflow_logger_tracklane_store_overhead_us",
        "<= 5% of MLFlowLogger's (http) per-step overhead",
        True,
        _scaled("10_lightning_logger", "mlflow_logger_overhead_us", 0.05),
    ),
    # Issue 19: the edges of a run, against MLflow's client on the same server in the same run.
    Target(
        "Lightning end of fit (TracklaneLogger)",
        "10_lightning_logger",
        "tracklane_logger_end_ms",
        "<= 2x MLFlowLogger's (http) end of fit",
        True,
        _scaled("10_lightning_logger", "mlflow_logger_end_ms", 2.0),
    ),
    Target(
        "tracklane.mlflow.end_run of a tiny run",
        "11_run_edges",
        "tracklane_mlflow_end_run_ms",
        "<= 1.5x MLflow's end_run",
        True,
        _scaled("11_run_edges", "mlflow_end_run_ms", 1.5),
    ),
    Target(
        "TrackingClient.end_run of a tiny run",
        "11_run_edges",
        "tracklane_client_end_run_ms",
        "<= 1.5x MLflow's end_run",
        True,
        _scaled("11_run_edges", "mlflow_end_run_ms", 1.5),
    ),
    Target(
        "a sweep of small runs through tracklane.mlflow",
        "11_run_edges",
        "tracklane_mlflow_sweep_s",
        "<= 0.5x MLflow's synchronous sweep",
        True,
        _scaled("11_run_edges", "mlflow_sweep_s", 0.5),
    ),
    Target(
        "MlflowClient.set_terminated, nothing pending",
        "11_run_edges",
        "tracklane_set_terminated_ms",
        "<= 2x a raw runs/update round trip",
        True,
        _scaled("11_run_edges", "raw_runs_update_ms", 2.0),
    ),
    Target(
        "kill -9: points lost (issue 20)",
        "12_kill",
        "lost_points",
        "0 of those whose call returned",
        True,
        _fixed(0),
    ),
    Target(
        "kill -9: points stored twice (issue 20)",
        "12_kill",
        "duplicated_points",
        "0",
        True,
        _fixed(0),
    ),
    Target(
        "log_metric caller cost, sender process (issue 20)",
        "13_sender",
        "process_log_metric_us",
        "<= 2x the floor (nothing else running)",
        True,
        _scaled("13_sender", "deque_floor_us", 2.0),
    ),
    Target(
        "training process CPU per event, sender process (issue 20)",
        "13_sender",
        "process_training_process_per_event_us",
        "<= 2x the floor (nothing else running)",
        True,
        _scaled("13_sender", "deque_floor_us", 2.0),
    ),
)


def verdicts(figures: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each target whose inputs were measured: the value, the limit, met or missed by how much."""
    values = {name: _plain_values(figure) for name, figure in figures.items()}
    out = []
    for target in TARGETS:
        value = _value(values, target.figure, target.key)
        limit = target.limit(values)
        if value is None or limit is None:
            continue
        met = value <= limit if target.at_most else value >= limit
        bound = f"{fmt(value)} vs {'at most' if target.at_most else 'at least'} {fmt(limit)}"
        if met:
            note = f"met ({bound})"
        elif target.key.endswith("_pct"):  # a limit in percent: miss by points, not by a ratio
            note = f"MISSED by {abs(value - limit):.1f} points ({bound})"
        elif limit == 0:  # (none lost, none twice): a ratio to zero means nothing
            note = f"MISSED ({bound})"
        else:
            short = value / limit - 1 if target.at_most else 1 - value / limit
            note = f"MISSED by {short:.0%} ({bound})"
        out.append(
            {
                "target": target.name,
                "figure": target.figure,
                "key": target.key,
                "rule": target.text,
                "value": value,
                "limit": limit,
                "met": met,
                "note": note,
            }
        )
    return out


RATIOS = (
    (
        "tracklane log_metric (worker delivering meanwhile) / floor (nothing else running)",
        ("1_caller_cost", "tracklane_log_metric_us"),
        ("1_caller_cost", "deque_floor_us"),
    ),
    (
        "tracklane log_metric plus its worker's CPU per event / floor (nothing else running)",
        ("1_caller_cost", "tracklane_log_metric_with_worker_us"),
        ("1_caller_cost", "deque_floor_us"),
    ),
    (
        "tracklane.mlflow.log_metric (worker delivering meanwhile) / floor (nothing else running)",
        ("1_caller_cost", "tracklane_mlflow_log_metric_us"),
        ("1_caller_cost", "deque_floor_us"),
    ),
    (
        "tracklane MlflowClient.log_metric (worker delivering meanwhile) / floor (nothing else running)",
        ("1_caller_cost", "tracklane_mlflow_client_log_metric_us"),
        ("1_caller_cost", "deque_floor_us"),
    ),
    (
        "MLflow log_metric(synchronous=False) / tracklane.mlflow.log_metric, per call (same run)",
        ("1_caller_cost", "mlflow_async_log_metric_us"),
        ("1_caller_cost", "tracklane_mlflow_log_metric_us"),
    ),
    (
        "tracklane end to end / server ceiling (1 in flight)",
        ("2_end_to_end", "tracklane_events_per_s"),
        ("2_end_to_end", "ceiling_1_in_flight_events_per_s"),
    ),
    (
        "tracklane end to end / server ceiling (2 in flight)",
        ("2_end_to_end", "tracklane_events_per_s"),
        ("2_end_to_end", "ceiling_2_in_flight_events_per_s"),
    ),
    (
        "tracklane end to end / MLflow synchronous=False, log_metric",
        ("2_end_to_end", "tracklane_events_per_s"),
        ("3_mlflow_client", "mlflow_async_log_metric_events_per_s"),
    ),
    (
        "tracklane end to end / MLflow synchronous=False, log_metrics (10 keys, the same calls)",
        ("2_end_to_end", "tracklane_events_per_s"),
        ("3_mlflow_client", "mlflow_async_log_metrics_10_events_per_s"),
    ),
    (
        "tracklane end to end / MLflow synchronous",
        ("2_end_to_end", "tracklane_events_per_s"),
        ("3_mlflow_client", "mlflow_sync_events_per_s"),
    ),
    (
        "MLflow log_artifact / tracklane.mlflow.log_artifact, caller time (same file, same run)",
        ("9_artifacts", "mlflow_log_artifact_ms"),
        ("9_artifacts", "tracklane_log_artifact_ms"),
    ),
    (
        "tracklane.mlflow.log_artifact caller time / a local copy of the file",
        ("9_artifacts", "tracklane_log_artifact_ms"),
        ("9_artifacts", "local_copy_ms"),
    ),
    (
        "tracklane upload rate (to end_run returned) / raw PUT",
        ("9_artifacts", "tracklane_upload_mb_per_s"),
        ("9_artifacts", "raw_put_mb_per_s"),
    ),
    (
        "MLFlowLogger (http) / TracklaneLogger, wall time per step",
        ("10_lightning_logger", "mlflow_logger_step_ms"),
        ("10_lightning_logger", "tracklane_logger_step_ms"),
    ),
    (
        "MLFlowLogger (http) / MLFlowLogger (tracklane+http), wall time per step",
        ("10_lightning_logger", "mlflow_logger_step_ms"),
        ("10_lightning_logger", "mlflow_logger_tracklane_store_step_ms"),
    ),
    (
        "TracklaneLogger / MLFlowLogger (http), fit's time after training ends",
        ("10_lightning_logger", "tracklane_logger_end_ms"),
        ("10_lightning_logger", "mlflow_logger_end_ms"),
    ),
    (
        "MLFlowLogger (tracklane+http) / MLFlowLogger (http), fit's time after training ends",
        ("10_lightning_logger", "mlflow_logger_tracklane_store_end_ms"),
        ("10_lightning_logger", "mlflow_logger_end_ms"),
    ),
    (
        "tracklane.mlflow.end_run / MLflow end_run, tiny run",
        ("11_run_edges", "tracklane_mlflow_end_run_ms"),
        ("11_run_edges", "mlflow_end_run_ms"),
    ),
    (
        "TrackingClient.end_run / MLflow end_run, tiny run",
        ("11_run_edges", "tracklane_client_end_run_ms"),
        ("11_run_edges", "mlflow_end_run_ms"),
    ),
    (
        "tracklane.mlflow.end_run / raw log-batch + runs/update, tiny run",
        ("11_run_edges", "tracklane_mlflow_end_run_ms"),
        ("11_run_edges", "raw_end_run_ms"),
    ),
    (
        "tracklane.mlflow / MLflow fluent, the whole tiny run (start_run to end_run)",
        ("11_run_edges", "tracklane_mlflow_tiny_run_ms"),
        ("11_run_edges", "mlflow_tiny_run_ms"),
    ),
    (
        "tracklane.mlflow sweep / MLflow synchronous sweep",
        ("11_run_edges", "tracklane_mlflow_sweep_s"),
        ("11_run_edges", "mlflow_sweep_s"),
    ),
    (
        "tracklane.mlflow sweep / raw 3-request sweep (create, log-batch, update)",
        ("11_run_edges", "tracklane_mlflow_sweep_s"),
        ("11_run_edges", "raw_sweep_s"),
    ),
    (
        "tracklane MlflowClient.set_terminated / raw runs/update",
        ("11_run_edges", "tracklane_set_terminated_ms"),
        ("11_run_edges", "raw_runs_update_ms"),
    ),
    (
        "MLflow MlflowClient.set_terminated / raw runs/update",
        ("11_run_edges", "mlflow_set_terminated_ms"),
        ("11_run_edges", "raw_runs_update_ms"),
    ),
)


def ratios(figures: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Ratios across figures that the targets and the reader compare."""
    values = {name: _plain_values(figure) for name, figure in figures.items()}
    out = {}
    for label, (fig_a, key_a), (fig_b, key_b) in RATIOS:
        a, b = _value(values, fig_a, key_a), _value(values, fig_b, key_b)
        if a is not None and b:
            out[label] = a / b
    return out


def _plain_values(figure: Mapping[str, Any]) -> dict[str, float]:
    measurements = figure.get("measurements", {})
    return {key: float(m["value"]) for key, m in measurements.items()}


def fmt(value: float) -> str:
    """A figure's value as the table prints it: thousands separated, three significant digits."""
    if value >= 100_000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
