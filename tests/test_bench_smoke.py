"""``tracklane bench`` runs every figure end to end and writes them all to its JSON file.

Behaviour, not speed: tiny counts (the hidden ``--smoke`` scale) against the session's MLflow
server; no number is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from servers import MlflowServer

pytestmark = pytest.mark.slow

FIGURES = (
    "1_caller_cost",
    "2_end_to_end",
    "3_mlflow_client",
    "4_drain",
    "5_training_loop",
    "6_memory",
    "7_import",
    "8_offline",
    "9_artifacts",
    "10_lightning_logger",
    "11_run_edges",
)


def test_bench_smoke_writes_every_figure_and_a_table(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "tracklane._cli", "bench", "--smoke", "--api-host", mlflow_server.url]
    # Eleven figures one after another, each bounded by the bench itself: generous for a loaded machine.
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=400)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(FIGURES) <= set(report["figures"]), sorted(report["figures"])
    for name in FIGURES:
        figure = report["figures"][name]
        assert figure["measurements"] or figure["skipped"], name
    assert report["machine"]["cpu_count"] and report["machine"]["python"]
    assert report["versions"]["tracklane"] and report["versions"]["mlflow"]
    assert {t["target"] for t in report["targets"]} >= {"log_metric caller cost", "import time"}
    assert "| # | measurement | value | target |" in done.stdout
