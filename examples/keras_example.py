"""Keras (torch backend) logging to MLflow through tracklane: one callback, no waiting on the server.

The callback logs the optimizer's config as params, the model summary as ``model_summary.txt``, and
each epoch's metrics at ``step=epoch``, then ends the run it created. With MLflow's own callback
the fit line would read ``callbacks=[mlflow.keras.MlflowCallback()]``; the one-line change is
``callbacks=[TracklaneCallback()]``.

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python examples/keras_example.py
    python examples/keras_example.py   # no server: offline into ./ml_runs; `tracklane sync` uploads it
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras reads it once, when first imported

import keras
import numpy as np

from tracklane import MlflowClient
from tracklane.integrations.keras import TracklaneCallback


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(256, 1))).astype("float32")

    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss="mse", metrics=["mae"])

    callback = TracklaneCallback(experiment_name="keras-example")
    model.fit(x, y, epochs=3, batch_size=32, validation_split=0.25, verbose=0, callbacks=[callback])

    assert callback.run_id is not None
    run = MlflowClient().get_run(callback.run_id)
    print(f"run {run.info.run_id} {run.info.status}: loss {run.data.metrics['loss']:.4f}")


if __name__ == "__main__":
    main()
