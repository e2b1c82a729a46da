"""The examples a user copies run as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import Reader, free_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.unit
def test_quickstart_runs_offline_on_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OIP_")}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "FINISHED" in proc.stdout and "10000 points of train/loss stored" in proc.stdout
    assert (tmp_path / "ml_runs").is_dir()
    assert "tracklane sync" in proc.stderr  # it says once where the data went and how to upload it


def test_async_service_logs_a_metric_per_request(server_url: str, reader: Reader) -> None:
    env = {**os.environ, "OIP_TRACKING_SERVER": server_url}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "async_service.py"), "--port", str(free_port()), "--self-test", "25"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.split("run ")[1].split()[0]
    assert len(reader.history(run_id, "latency_ms")) == 25
    assert [s for _, s, _ in reader.history(run_id, "latency_ms")] == list(range(25))  # a step per request
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


def _framework_example(name: str, server_url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OIP_", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=server_url, MLFLOW_DISABLE_TELEMETRY="true", KERAS_BACKEND="torch")
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


#: Each framework example, and the experiment it logs into.
FRAMEWORK_EXAMPLES = {
    "keras_example.py": "keras-example",
    "transformers_example.py": "transformers-example",
    "lightning_example.py": "lightning-example",
}


@pytest.mark.parametrize("example", sorted(FRAMEWORK_EXAMPLES))
def test_a_framework_example_trains_and_leaves_a_finished_run_with_metrics(
    example: str, server_url: str, reader: Reader, tmp_path: Path
) -> None:
    proc = _framework_example(example, server_url, tmp_path)

    assert proc.returncode == 0, proc.stderr[-3000:]
    experiment = reader.experiment(FRAMEWORK_EXAMPLES[example])
    assert experiment is not None
    runs = reader.runs(experiment["experiment_id"])
    assert runs and all(r["info"]["status"] == "FINISHED" for r in runs)
    assert all(r["data"].get("metrics") for r in runs)
