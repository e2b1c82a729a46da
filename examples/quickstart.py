"""A small training loop that logs with tracklane.

With no server configured it logs offline into ./ml_runs (upload later with `tracklane sync`);
set OIP_TRACKING_SERVER=http://127.0.0.1:5000 (an MLflow server) to log online instead.

    python examples/quickstart.py
"""

from __future__ import annotations

import logging
import random
import time

from tracklane import TrackingClient


def train(tc: TrackingClient, epochs: int = 20, steps_per_epoch: int = 500) -> float:
    """Fit y = 3x + 2 with plain SGD, logging loss every step and a summary every epoch."""
    rng = random.Random(0)
    w, b, lr = 0.0, 0.0, 0.05
    tc.log_params({"model": "linear", "lr": lr, "epochs": epochs, "steps_per_epoch": steps_per_epoch})
    loss = float("inf")
    for epoch in range(epochs):
        epoch_loss = 0.0
        for i in range(steps_per_epoch):
            x = rng.uniform(-1, 1)
            y = 3 * x + 2 + rng.gauss(0, 0.1)
            err = (w * x + b) - y
            w -= lr * err * x
            b -= lr * err
            loss = err * err
            epoch_loss += loss
            tc.log_metric("train/loss", loss, step=epoch * steps_per_epoch + i)  # microseconds, no I/O
        tc.log_metrics({"epoch/loss": epoch_loss / steps_per_epoch, "epoch/w": w, "epoch/b": b}, step=epoch)
    tc.set_run_tags(["quickstart", "linear"])
    return loss


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tc = TrackingClient()  # OIP_TRACKING_SERVER if set, else offline into ./ml_runs
    tc.set_experiment("quickstart")
    started = time.perf_counter()
    with tc.start_run(tags=["baseline"]) as run:
        final = train(tc)
    elapsed = time.perf_counter() - started
    stored = tc.get_run(run.info.run_id)
    history = tc.get_metric_history(run.info.run_id, "train/loss")
    print(f"run {stored.info.run_name} ({stored.info.run_id}): {stored.info.status}")
    print(f"  {len(history)} points of train/loss stored, final loss {final:.4f}, {elapsed:.2f}s in all")
    print(f"  params: {stored.data.params}")
    tc.close()


if __name__ == "__main__":
    main()
