"""``tracklane bench`` judges each figure against its target in one place: met, or missed by how much,
and the table says so beside the figure. Pure functions on made-up values; nothing is measured."""

from __future__ import annotations

from typing import Any

import pytest

from tracklane._bench.report import markdown_table
from tracklane._bench.targets import ratios, verdicts

pytestmark = pytest.mark.unit


def figure(**values: float) -> dict[str, Any]:
    return {"measurements": {k: {"label": k, "value": v, "unit": "us/call"} for k, v in values.items()}}


def by_target(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["target"]: v for v in found}


def test_a_limit_relative_to_another_figure_is_met_or_missed_by_the_share_it_misses() -> None:
    met = by_target(verdicts({"1_caller_cost": figure(deque_floor_us=0.3, tracklane_log_metric_us=0.6)}))
    missed = by_target(verdicts({"1_caller_cost": figure(deque_floor_us=0.3, tracklane_log_metric_us=1.8)}))

    assert met["log_metric caller cost"]["met"] is True
    assert met["log_metric caller cost"]["limit"] == pytest.approx(0.9)
    assert missed["log_metric caller cost"]["met"] is False
    assert missed["log_metric caller cost"]["note"].startswith("MISSED by 100%")


def test_a_percent_target_is_missed_by_points_and_an_at_least_target_by_its_shortfall() -> None:
    found = by_target(
        verdicts(
            {
                "5_training_loop": figure(tracklane_overhead_pct=5.0),
                "4_drain": figure(drain_events_per_s=250_000),
            }
        )
    )

    assert found["training-loop overhead"]["note"].startswith("MISSED by 3.0 points")
    assert found["drain capacity"]["note"].startswith("MISSED by 75%")


def test_a_loss_where_none_is_allowed_is_missed_without_a_ratio() -> None:
    found = by_target(verdicts({"12_kill": figure(lost_points=18_000, duplicated_points=0)}))

    assert found["kill -9: points lost (issue 20)"]["met"] is False
    assert found["kill -9: points lost (issue 20)"]["note"] == "MISSED (18,000 vs at most 0.00)"
    assert found["kill -9: points stored twice (issue 20)"]["met"] is True


def test_a_target_whose_figures_were_not_measured_is_left_out() -> None:
    no_floor = by_target(verdicts({"1_caller_cost": figure(tracklane_log_metric_us=0.6)}))

    assert "log_metric caller cost" not in no_floor  # its limit is 3x a floor that is missing
    assert ratios({"1_caller_cost": figure(tracklane_log_metric_us=0.6)}) == {}


def test_the_table_puts_each_verdict_beside_its_figure_and_lists_what_was_skipped() -> None:
    figures = {
        "1_caller_cost": {
            **figure(deque_floor_us=0.3, tracklane_log_metric_us=0.6),
            "skipped": ["wandb: absent"],
        }
    }
    report = {
        "figures": figures,
        "targets": verdicts(figures),
        "ratios": ratios(figures),
        "machine": {"cpu_count": 2, "cpu_model": "cpu", "ram_gib": 1.0, "python": "3.11"},
        "versions": {"tracklane": "0", "mlflow": "3"},
        "command": "tracklane bench --quick",
        "failures": {"7_import": "import_time exited with 1:\nboom"},
    }

    table = markdown_table(report)

    assert (
        "| 1 | tracklane_log_metric_us | 0.60 us/call | <= 3x the floor (nothing else running): met" in table
    )
    assert "- 1: wandb: absent" in table
    assert "- 7_import FAILED: import_time exited with 1:" in table
    assert "tracklane log_metric (worker delivering meanwhile) / floor (nothing else running): 2.00x" in table


def test_the_edges_of_a_run_are_judged_against_mlflow_and_the_raw_round_trip_of_the_same_run() -> None:
    figures = {
        "10_lightning_logger": figure(tracklane_logger_end_ms=50.0, mlflow_logger_end_ms=30.0),
        "11_run_edges": figure(
            tracklane_mlflow_end_run_ms=40.0,
            tracklane_client_end_run_ms=60.0,
            mlflow_end_run_ms=30.0,
            tracklane_mlflow_sweep_s=6.0,
            mlflow_sweep_s=10.0,
            tracklane_set_terminated_ms=20.0,
            raw_runs_update_ms=12.0,
        ),
    }

    found = by_target(verdicts(figures))

    assert found["Lightning end of fit (TracklaneLogger)"]["limit"] == pytest.approx(60.0)
    assert found["Lightning end of fit (TracklaneLogger)"]["met"] is True
    assert found["tracklane.mlflow.end_run of a tiny run"]["met"] is True  # 40 <= 1.5 x 30
    assert found["TrackingClient.end_run of a tiny run"]["note"].startswith("MISSED by 33%")  # 60 vs 45
    assert found["a sweep of small runs through tracklane.mlflow"]["note"].startswith("MISSED by 20%")
    assert found["MlflowClient.set_terminated, nothing pending"]["limit"] == pytest.approx(24.0)
    assert ratios(figures)["tracklane.mlflow sweep / MLflow synchronous sweep"] == pytest.approx(0.6)
