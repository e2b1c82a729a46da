"""MLflow's artifacts and models through the plugin (``tracklane+http://``) are stored as over ``http://``.

Differential: one program, with plain ``import mlflow``, runs once with the tracking URI
``http://HOST`` (MLflow on its own) and once with ``tracklane+http://HOST`` (MLflow's logging on
tracklane's engine), each into an experiment of its own on the same real server. What the server
stored (runs, params, metrics, tags, every artifact path, logged models and their files) is read
back through its REST API and must be the same, ids and times masked (``mlflow_stored``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlflow_stored import differential

pytestmark = [pytest.mark.server, pytest.mark.slow]

PRELUDE = """
import sys
if sys.argv[3] == "tracklane":
    import tracklane.mlflow as mlflow
else:
    import mlflow
url, experiment = sys.argv[1:3]
"""


def _ways(server_url: str) -> dict[str, tuple[str, str]]:
    return {"http": (server_url, "mlflow"), "plugin": ("tracklane+" + server_url, "mlflow")}


def _same(results: dict[str, tuple[str, dict[str, object]]]) -> dict[str, object]:
    (_, expected), (_, got) = results["http"], results["plugin"]
    assert got == expected
    return expected


def _report(stdout: str) -> dict[str, object]:
    [line] = [line for line in stdout.splitlines() if line.startswith("{")]
    return dict(json.loads(line))


ARTIFACTS_PROGRAM = (
    PRELUDE
    + """
import json, os
import numpy as np
from sklearn.linear_model import LinearRegression

mlflow.set_tracking_uri(url)
mlflow.set_experiment(experiment)
with open("notes.txt", "w") as f:
    f.write("hello")
os.makedirs("tree/sub")
for name in ("tree/a.txt", "tree/sub/b.txt"):
    with open(name, "w") as f:
        f.write(name)
rng = np.random.RandomState(0)
X = rng.rand(20, 3)
y = X @ np.array([1.0, 2.0, 3.0])
with mlflow.start_run(run_name="artifacts") as run:
    mlflow.log_param("p", 1)
    mlflow.log_metric("m", 0.5, step=2)
    mlflow.log_artifact("notes.txt")
    mlflow.log_artifact("notes.txt", artifact_path="docs")
    mlflow.log_artifacts("tree", "tree")
    mlflow.log_dict({"a": 1}, "config/d.json")
    mlflow.log_dict({"a": 1}, "config/d.yaml")
    mlflow.log_text("text", "t.txt")
    mlflow.MlflowClient().log_artifact(run.info.run_id, "notes.txt", "client")
    info = mlflow.sklearn.log_model(LinearRegression().fit(X, y), name="model", input_example=X[:2])
loaded = mlflow.pyfunc.load_model(info.model_uri)  # read back through the same tracking URI
read = mlflow.artifacts.load_dict(run.info.artifact_uri + "/config/d.json")
print(json.dumps({"predicted": [round(v, 6) for v in loaded.predict(X[:2]).tolist()], "read": read}))
"""
)


def test_log_artifact_log_dict_and_log_model_store_over_the_plugin_what_they_store_over_http(
    tmp_path: Path, server_url: str
) -> None:
    results = differential(tmp_path, server_url, ARTIFACTS_PROGRAM, _ways(server_url))

    stored = _same(results)
    [run] = stored["runs"]  # type: ignore[misc]
    assert run["artifacts"] == [
        "client/notes.txt",
        "config/d.json",
        "config/d.yaml",
        "docs/notes.txt",
        "notes.txt",
        "t.txt",
        "tree/a.txt",
        "tree/sub/b.txt",
    ]
    [model] = stored["models"]  # type: ignore[misc]
    assert model["status"] == "LOGGED_MODEL_READY" and model["run"] == "run0"
    assert {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt"} <= set(model["artifacts"])
    http, plugin = (_report(results[way][0]) for way in ("http", "plugin"))
    assert plugin == http  # the model loads and predicts the same, the dict reads back
    assert plugin["read"] == {"a": 1}


GRID_SEARCH_PROGRAM = (
    PRELUDE
    + """
from sklearn.datasets import load_iris
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

mlflow.set_tracking_uri(url)
mlflow.set_experiment(experiment)
mlflow.sklearn.autolog(serialization_format="cloudpickle")
X, y = load_iris(return_X_y=True)
search = GridSearchCV(SVC(random_state=0), {"kernel": ("linear", "rbf"), "C": [1, 10]}, cv=2)
with mlflow.start_run(run_name="grid"):
    search.fit(X, y)
"""
)


def test_sklearn_autolog_grid_search_stores_over_the_plugin_what_it_stores_over_http(
    tmp_path: Path, server_url: str
) -> None:
    stored = _same(differential(tmp_path, server_url, GRID_SEARCH_PROGRAM, _ways(server_url)))

    parent, *children = stored["runs"]  # type: ignore[misc]
    assert len(children) == 4 and all(c["parent"] == parent["name"] for c in children)
    assert {"cv_results.csv", "estimator.html", "training_confusion_matrix.png"} <= set(parent["artifacts"])
    assert "training_accuracy_score" in parent["metrics"] and "best_cv_score" in parent["metrics"]
    assert all("mean_test_score" in c["metrics"] for c in children)
    assert len(stored["models"]) == 2  # type: ignore[arg-type]  # the search and its best estimator
    assert all("MLmodel" in m["artifacts"] for m in stored["models"])  # type: ignore[attr-defined]


LIGHTNING_PROGRAM = (
    PRELUDE
    + """
import torch
from torch.utils.data import DataLoader, TensorDataset
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

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
data = DataLoader(TensorDataset(torch.randn(32, 3), torch.randn(32, 1)), batch_size=8)
logger = MLFlowLogger(experiment_name=experiment, tracking_uri=url, run_name="tiny", log_model=True)
trainer = pl.Trainer(
    max_epochs=2, logger=logger, log_every_n_steps=1, enable_progress_bar=False, accelerator="cpu",
    devices=1, callbacks=[ModelCheckpoint(dirpath="ckpt", every_n_epochs=1, save_top_k=-1)],
)
trainer.fit(Tiny(), data)
"""
)


@pytest.mark.frameworks
def test_lightning_mlflow_logger_with_log_model_stores_over_the_plugin_what_it_stores_over_http(
    tmp_path: Path, server_url: str
) -> None:
    stored = _same(differential(tmp_path, server_url, LIGHTNING_PROGRAM, _ways(server_url)))

    [run] = stored["runs"]  # type: ignore[misc]
    assert [s for _, s in run["metrics"]["train_loss"]] == list(range(8))
    checkpoints = [p for p in run["artifacts"] if p.endswith(".ckpt")]
    assert len(checkpoints) == 2, run["artifacts"]


TRANSFORMERS_PROGRAM = (
    PRELUDE
    + """
import os
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

os.environ["MLFLOW_TRACKING_URI"] = url  # how transformers' MLflowCallback is configured
os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
torch.manual_seed(0)
config = GPT2Config(
    n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
)
data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 100, (16, 8))]
args = TrainingArguments(
    output_dir="out", num_train_epochs=1, per_device_train_batch_size=4,
    logging_steps=1, report_to=["mlflow"], use_cpu=True, save_strategy="steps", save_steps=4,
    save_only_model=True, disable_tqdm=True, run_name="tiny-gpt2",
)
Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=data).train()
"""
)


@pytest.mark.frameworks
def test_transformers_log_artifacts_stores_over_the_plugin_what_it_stores_over_http(
    tmp_path: Path, server_url: str
) -> None:
    results = differential(
        tmp_path, server_url, TRANSFORMERS_PROGRAM, _ways(server_url), env={"HF_MLFLOW_LOG_ARTIFACTS": "1"}
    )

    stored = _same(results)
    [run] = stored["runs"]  # type: ignore[misc]
    # transformers logs each saved checkpoint as a pyfunc LoggedModel named for it, the files inside
    [checkpoint] = [m for m in stored["models"] if m["name"] == "checkpoint-4"]  # type: ignore[attr-defined]
    assert checkpoint["status"] == "LOGGED_MODEL_READY" and checkpoint["run"] == run["name"]
    assert any(p.endswith("model.safetensors") for p in checkpoint["artifacts"]), checkpoint["artifacts"]
    assert [s for _, s in run["metrics"]["loss"]] == [1, 2, 3, 4]
