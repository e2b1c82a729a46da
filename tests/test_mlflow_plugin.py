"""MLflow's own client, pointed at ``tracklane+http://``, logs through tracklane's engine.

Programs run in processes of their own with plain ``import mlflow`` (and Lightning's stock
``MLFlowLogger``); only the tracking URI says tracklane. What the server stored is read through
its REST API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from servers import Reader, tracklane_cli

MLFLOW_PROGRAM = """
import json, sys, threading
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

url, experiment = sys.argv[1:3]
mlflow.set_tracking_uri(url)
mlflow.set_experiment(experiment)
with mlflow.start_run(run_name="fluent") as run:
    mlflow.log_params({"lr": 0.1, "layers": 2})
    for step in range(1000):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    mlflow.log_metrics({"acc": 0.5}, step=1000, synchronous=False)
    mlflow.set_tag("stage", "dev")
client = MlflowClient(tracking_uri=url)  # also resolves a model-registry store for the scheme
by_id = client.create_run(run.info.experiment_id, run_name="log-batch")
client.log_batch(
    by_id.info.run_id,
    metrics=[Metric("m", float(i), 1_700_000_000_000 + i, i) for i in range(1500)],
    params=[Param(f"p{i}", str(i)) for i in range(150)],
    tags=[RunTag("t", "v")],
)
client.set_terminated(by_id.info.run_id, status="KILLED")
workers = sorted(t.name for t in threading.enumerate() if t.name == "tracklane")
print(json.dumps({"fluent": run.info.run_id, "by_id": by_id.info.run_id, "workers": workers}), flush=True)
"""


def _run(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OIP_"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )


def _report(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return dict(json.loads(line))


def test_mlflow_pointed_at_tracklane_http_logs_everything_through_one_tracklane_worker(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader
) -> None:
    uri = "tracklane+" + server_url

    report = _report(_run(tmp_path, MLFLOW_PROGRAM, uri, experiment_name))

    assert report["workers"] == ["tracklane"]
    fluent, by_id = str(report["fluent"]), str(report["by_id"])
    assert [s for _, s, _ in reader.history(fluent, "loss")] == list(range(1000))
    assert reader.params(fluent) == {"lr": "0.1", "layers": "2"}
    assert reader.tags(fluent)["stage"] == "dev"
    assert [v for v, _, _ in reader.history(fluent, "acc")] == [0.5]
    assert reader.run(fluent)["info"]["status"] == "FINISHED"
    points = reader.history(by_id, "m")
    assert [(v, s, t) for v, s, t in points] == [(float(i), i, 1_700_000_000_000 + i) for i in range(1500)]
    assert len(reader.params(by_id)) == 150  # more than one log-batch request's 100: chunked
    assert reader.run(by_id)["info"]["status"] == "KILLED"


LIGHTNING_PROGRAM = """
import json, sys
import torch
from torch.utils.data import DataLoader, TensorDataset
import lightning.pytorch as pl
from lightning.pytorch.loggers import MLFlowLogger

url, experiment = sys.argv[1:3]

class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters({"hidden": 4, "lr": 0.05})
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

torch.manual_seed(0)
data = DataLoader(TensorDataset(torch.randn(64, 3), torch.randn(64, 1)), batch_size=8)
logger = MLFlowLogger(experiment_name=experiment, tracking_uri=url, run_name="stock-logger")
trainer = pl.Trainer(
    max_epochs=3, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
    enable_checkpointing=False, accelerator="cpu", devices=1,
)
trainer.fit(Tiny(), data)
print(json.dumps({"run_id": logger.run_id, "steps": trainer.global_step}), flush=True)
"""


def test_lightnings_stock_mlflow_logger_on_tracklane_http_logs_every_step(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader
) -> None:
    report = _report(_run(tmp_path, LIGHTNING_PROGRAM, "tracklane+" + server_url, experiment_name))

    run_id, steps = str(report["run_id"]), int(str(report["steps"]))
    assert steps == 24  # 3 epochs of 8 batches
    assert [s for _, s, _ in reader.history(run_id, "train_loss")] == list(range(steps))
    assert reader.params(run_id) == {"hidden": "4", "lr": "0.05"}
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


OFFLINE_PROGRAM = """
import sys
import mlflow

mlflow.set_tracking_uri("tracklane+file://" + sys.argv[1])  # offline, into tracklane's journal there
mlflow.set_experiment(sys.argv[2])
with mlflow.start_run(run_name="offline") as run:
    mlflow.log_params({"lr": 0.1})
    for step in range(500):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    mlflow.set_tag("stage", "dev")
print(mlflow.get_run(run.info.run_id).info.status, flush=True)
"""


def test_mlflow_pointed_at_tracklane_file_logs_offline_and_sync_uploads_it(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader
) -> None:
    storage = tmp_path / "offline"
    result = _run(tmp_path, OFFLINE_PROGRAM, str(storage), experiment_name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "FINISHED"

    synced = tracklane_cli("sync", str(storage), "--to", server_url)

    assert synced.returncode == 0, synced.stderr
    experiment = reader.experiment(experiment_name)
    assert experiment is not None
    [run] = reader.runs(experiment["experiment_id"])
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "offline"
    assert [s for _, s, _ in reader.history(run_id, "loss")] == list(range(500))
    assert reader.params(run_id) == {"lr": "0.1"}
    assert reader.tags(run_id)["stage"] == "dev"
