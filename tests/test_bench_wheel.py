"""``tracklane bench`` runs every figure end to end from a wheel installed in a fresh virtualenv,
outside any checkout, and writes them all to its JSON file and a table.

Behaviour, not speed (no number is asserted): the wheel built from this tree, installed alone
(``--no-deps``) in a venv that sees this machine's packages (mlflow, aiohttp: installing them
afresh takes minutes), run from a directory with no ``benchmarks/`` and no source on the path.
Every figure must come back, measured or skipped with a reason. Tiny counts (``--smoke``) against
the session's server; ``--quick`` is the same code with larger counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracklane._bench.figures import FIGURES

from servers import MlflowServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

#: Every figure the README describes; the package's own registry must hold each of them.
DOCUMENTED_FIGURES = (
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


def run(*cmd: str | Path, cwd: Path, timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )
    assert done.returncode == 0, f"{cmd}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


@pytest.mark.timeout(900)
def test_bench_from_an_installed_wheel_outside_the_checkout_writes_every_figure(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    # Nothing of this checkout on the path: the venv must find only what the wheel installed.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    wheels, venv, outside = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    outside.mkdir()
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "-q",
        "-w",
        wheels,
        ROOT,
        cwd=tmp_path,
        timeout=240,
        env=env,
    )
    [wheel] = wheels.glob("tracklane-*.whl")
    run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path, timeout=120, env=env)
    python = venv / "bin" / "python"
    run(
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--force-reinstall",
        wheel,
        cwd=tmp_path,
        timeout=120,
        env=env,
    )
    where = run(python, "-c", "import tracklane; print(tracklane.__file__)", cwd=outside, timeout=60, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    out = outside / "bench.json"
    bench = venv / "bin" / "tracklane"
    done = run(
        bench,
        "bench",
        "--smoke",
        "--api-host",
        mlflow_server.url,
        "--out",
        out,
        cwd=outside,
        timeout=400,
        env=env,
    )

    report = json.loads(out.read_text())
    assert set(DOCUMENTED_FIGURES) <= set(FIGURES)
    assert set(report["figures"]) == set(FIGURES), (sorted(report["figures"]), report["failures"])
    for name, figure in report["figures"].items():
        assert figure["measurements"] or figure["skipped"], name
    assert report["machine"]["cpu_count"] and report["machine"]["python"]
    assert report["versions"]["tracklane"] and report["versions"]["mlflow"]
    assert {t["target"] for t in report["targets"]} >= {"log_metric caller cost", "import time"}
    assert "| # | measurement | value | target |" in done.stdout
    assert not (outside / "benchmarks").exists()
