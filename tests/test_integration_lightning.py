"""TracklaneLogger: a tiny Lightning model really trains on CPU, and the server holds what it logged."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import mlflow
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from tracklane.integrations.lightning import TracklaneLogger

from servers import Reader

pytestmark = pytest.mark.frameworks

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EPOCHS = 3
BATCHES = 4  # per epoch: 32 samples in batches of 8
STEPS = EPOCHS * BATCHES


class TinyModel(pl.LightningModule):
    """A linear regression; ``fail_at`` raises ``fail_with`` in that training step."""

    def __init__(
        self,
        lr: float = 0.05,
        optimizer: dict[str, Any] | None = None,
        extra_key: str | None = None,
        fail_at: int | None = None,
        fail_with: type[BaseException] = RuntimeError,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["fail_with"])
        self.layer = torch.nn.Linear(4, 1)
        self.extra_key = extra_key
        self.fail_at = fail_at
        self.fail_with = fail_with

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise self.fail_with("boom in training_step")
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        if self.extra_key is not None:
            self.log(self.extra_key, loss * 100)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def loader() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)


def trainer(logger: TracklaneLogger, tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=EPOCHS,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        logger=logger,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_training_logs_every_step_params_checkpoints_and_finishes(
    server_url: str, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    logger = TracklaneLogger(tracking_uri=server_url, experiment_name=experiment_name, log_model="all")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    model = TinyModel(optimizer={"name": "sgd", "momentum": 0.0})

    trainer(logger, tmp_path, callbacks=[checkpoints]).fit(model, loader(), loader())

    experiment = reader.experiment(experiment_name)
    assert experiment is not None and experiment["experiment_id"] == logger.experiment_id
    [run] = reader.runs(experiment["experiment_id"])
    assert run["info"]["run_id"] == logger.run_id
    assert run["info"]["status"] == "FINISHED"
    history = reader.history(logger.run_id, "train_loss")
    assert [step for _, step, _ in history] == list(range(STEPS))
    assert len(reader.history(logger.run_id, "val_loss")) == EPOCHS
    params = reader.params(logger.run_id)
    assert params["lr"] == "0.05"
    assert params["optimizer/name"] == "sgd" and params["optimizer/momentum"] == "0.0"
    assert reader.tags(logger.run_id)["mlflow.user"]  # MLflow's context tags on the new run

    # Every checkpoint as saved, in MLFlowLogger's layout: <stem>/<stem>.ckpt + metadata.yaml + aliases.txt
    mlflow_client = mlflow.MlflowClient(tracking_uri=server_url)
    folders = [f.path for f in mlflow_client.list_artifacts(logger.run_id) if f.is_dir]
    assert folders, "no checkpoint was uploaded"
    best = Path(checkpoints.best_model_path).stem
    assert best in folders
    files = {Path(f.path).name for f in mlflow_client.list_artifacts(logger.run_id, best)}
    assert files == {f"{best}.ckpt", "metadata.yaml", "aliases.txt"}
    local = mlflow_client.download_artifacts(logger.run_id, f"{best}/{best}.ckpt", str(tmp_path))
    assert Path(local).read_bytes() == Path(checkpoints.best_model_path).read_bytes()


def test_exception_in_training_step_propagates_and_fails_the_run(
    server_url: str, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    logger = TracklaneLogger(tracking_uri=server_url, experiment_name=experiment_name)

    with pytest.raises(RuntimeError, match="boom in training_step"):
        trainer(logger, tmp_path, enable_checkpointing=False).fit(TinyModel(fail_at=6), loader())

    assert reader.run(logger.run_id)["info"]["status"] == "FAILED"
    steps = [step for _, step, _ in reader.history(logger.run_id, "train_loss")]
    assert steps == list(range(6))  # every step before the failing one


def test_ctrl_c_ends_the_run_killed(
    server_url: str, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    logger = TracklaneLogger(tracking_uri=server_url, experiment_name=experiment_name)
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores further Ctrl-C while it shuts down
    try:
        with pytest.raises(SystemExit):  # Lightning's answer to KeyboardInterrupt: sys.exit(1)
            model = TinyModel(fail_at=3, fail_with=KeyboardInterrupt)
            trainer(logger, tmp_path, enable_checkpointing=False).fit(model, loader())
    finally:
        signal.signal(signal.SIGINT, sigint)

    assert reader.run(logger.run_id)["info"]["status"] == "KILLED"
    assert len(reader.history(logger.run_id, "train_loss")) == 3


def test_key_the_server_refuses_is_renamed_and_training_goes_on(
    server_url: str, reader: Reader, experiment_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = TracklaneLogger(tracking_uri=server_url, experiment_name=experiment_name, prefix="fit")

    trainer(logger, tmp_path, enable_checkpointing=False).fit(TinyModel(extra_key="val loss (%)"), loader())

    run = reader.run(logger.run_id)
    assert run["info"]["status"] == "FINISHED"
    keys = {m["key"] for m in run["data"]["metrics"]}
    assert "fit-val loss ___" in keys and "fit-train_loss" in keys
    assert len(reader.history(logger.run_id, "fit-val loss ___")) == STEPS
    assert len(reader.history(logger.run_id, "fit-train_loss")) == STEPS
    renamed = [r for r in caplog.records if "renamed to" in r.getMessage()]
    assert len(renamed) == 1, "the renaming is said once, not per step"


def test_run_id_resumes_an_existing_run(
    server_url: str, reader: Reader, experiment_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = TracklaneLogger(tracking_uri=server_url, experiment_name=experiment_name)
    trainer(first, tmp_path, enable_checkpointing=False, max_steps=2).fit(TinyModel(), loader())
    monkeypatch.setenv("MLFLOW_RUN_ID", first.run_id)

    again = TracklaneLogger(tracking_uri=server_url, experiment_name="ignored-when-resuming")
    again.log_metrics({"resumed": 1.0}, step=7)
    again.finalize("success")

    assert again.run_id == first.run_id and again.experiment_id == first.experiment_id
    assert [(value, step) for value, step, _ in reader.history(first.run_id, "resumed")] == [(1.0, 7)]
    assert reader.experiment("ignored-when-resuming") is None
