"""A tiny PyTorch Lightning model that logs through tracklane: the one-line change from MLFlowLogger.

    # before: from lightning.pytorch.loggers import MLFlowLogger
    from tracklane.integrations.lightning import TracklaneLogger

    logger = TracklaneLogger(experiment_name="lightning-example", tracking_uri="http://127.0.0.1:5000")

With MLFLOW_TRACKING_URI set (an MLflow server, e.g. http://127.0.0.1:5000) it logs there; unset,
it logs offline into ./ml_runs (upload later with `tracklane sync . --to URL`).

    pip install 'tracklane[lightning]'
    python examples/lightning_example.py
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from tracklane.integrations.lightning import TracklaneLogger


class Regressor(pl.LightningModule):
    """Learn y = sum(x) with one linear layer."""

    def __init__(self, features: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()  # logged as params by the logger
        self.layer = torch.nn.Linear(features, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)  # every step: enqueued, no network I/O in the loop
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def data(samples: int, features: int, seed: int) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=16)


def main() -> None:
    logger = TracklaneLogger(
        experiment_name="lightning-example",
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),  # unset: offline into ./ml_runs
        log_model=True,  # the best checkpoint, uploaded at the end
    )
    trainer = pl.Trainer(
        logger=logger,
        max_epochs=2,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        callbacks=[ModelCheckpoint(monitor="val_loss")],
    )
    trainer.fit(Regressor(), data(128, 8, seed=0), data(32, 8, seed=1))
    # trainer.fit ended the run (finalize): its events and checkpoint are delivered.
    print(f"run {logger.run_id} in experiment {logger.experiment_id}: {trainer.state.status.value}")


if __name__ == "__main__":
    main()
