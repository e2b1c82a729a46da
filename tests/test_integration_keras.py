"""Keras's ``fit`` (torch backend) logging through ``TracklaneCallback``: what the server stores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest

import tracklane
from tracklane.integrations import keras as keras_integration  # the class itself imports Keras

from servers import Reader

pytestmark = pytest.mark.frameworks

EPOCHS, BATCH_SIZE, SAMPLES = 3, 16, 64  # 4 batches an epoch, 12 optimizer steps in all


@pytest.fixture
def keras(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Keras on PyTorch: the backend is read once, when Keras is first imported."""
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    import keras

    assert keras.backend.backend() == "torch"
    keras.utils.set_random_seed(0)
    return keras


def tiny_model(keras: Any, optimizer: Any = None, metric: str = "mae") -> Any:
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(learning_rate=0.01),
        loss="mse",
        metrics=[keras.metrics.MeanAbsoluteError(name=metric)],
    )
    return model


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(SAMPLES, 4)).astype("float32"), rng.normal(size=(SAMPLES, 1)).astype("float32")


def fit(model: Any, callback: Any) -> dict[str, list[float]]:
    x, y = data()
    history = model.fit(x, y, epochs=EPOCHS, batch_size=BATCH_SIZE, verbose=0, callbacks=[callback])
    return dict(history.history)


def only_run(reader: Reader, experiment_name: str) -> dict[str, Any]:
    experiment = reader.experiment(experiment_name)
    assert experiment is not None
    runs = reader.runs(experiment["experiment_id"])
    assert len(runs) == 1, runs
    return runs[0]


def test_fit_logs_each_epoch_params_and_summary_then_finishes_its_run(
    keras: Any, server_url: str, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    callback = keras_integration.TracklaneCallback(tracking_uri=server_url, experiment_name=experiment_name)
    assert isinstance(callback, keras.callbacks.Callback)

    history = fit(tiny_model(keras), callback)

    run = only_run(reader, experiment_name)
    run_id = run["info"]["run_id"]
    assert run_id == callback.run_id
    assert run["info"]["status"] == "FINISHED"
    for key in ("loss", "mae"):
        stored = reader.history(run_id, key)
        assert [step for _, step, _ in stored] == [0, 1, 2]
        assert [value for value, _, _ in stored] == pytest.approx(history[key])
    params = reader.params(run_id)
    assert float(params["optimizer_learning_rate"]) == pytest.approx(0.01)
    assert params["optimizer_name"] == "adam"
    assert params["epochs"] == "3" and params["steps_per_epoch"] == "4"
    assert "mlflow.user" in reader.tags(run_id)  # MLflow's context tags on the run it created
    summary = mlflow.MlflowClient(tracking_uri=server_url).download_artifacts(
        run_id, "model_summary.txt", str(tmp_path)
    )
    text = Path(summary).read_text()
    assert "dense" in text and "Total params" in text


def test_batch_metrics_every_n_steps_at_the_optimizer_step(
    keras: Any, server_url: str, reader: Reader, experiment_name: str
) -> None:
    callback = keras_integration.TracklaneCallback(
        tracking_uri=server_url, experiment_name=experiment_name, log_every_epoch=False, log_every_n_steps=2
    )

    fit(tiny_model(keras), callback)

    run = only_run(reader, experiment_name)
    assert [step for _, step, _ in reader.history(run["info"]["run_id"], "loss")] == [2, 4, 6, 8, 10, 12]
    assert run["info"]["status"] == "FINISHED"


def test_a_given_run_gets_the_metrics_and_is_left_running(
    keras: Any, server_url: str, reader: Reader, experiment_name: str
) -> None:
    client = tracklane.MlflowClient(server_url)
    run = client.create_run(client.create_experiment(experiment_name))
    callback = keras_integration.TracklaneCallback(run=run, tracking_uri=server_url)

    fit(tiny_model(keras), callback)
    assert client.flush(timeout=60)

    assert callback.run_id == run.info.run_id
    assert [step for _, step, _ in reader.history(run.info.run_id, "loss")] == [0, 1, 2]
    assert reader.run(run.info.run_id)["info"]["status"] == "RUNNING"


def test_the_launchers_run_from_mlflow_run_id_is_resumed_and_left_running(
    keras: Any, server_url: str, reader: Reader, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = tracklane.MlflowClient(server_url)
    run = client.create_run(client.create_experiment(experiment_name))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_url)
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)

    fit(tiny_model(keras), keras_integration.TracklaneCallback())
    assert client.flush(timeout=60)

    assert len(reader.history(run.info.run_id, "loss")) == EPOCHS
    assert only_run(reader, experiment_name)["info"]["status"] == "RUNNING"


def test_the_active_fluent_run_is_used_as_mlflows_callback_does(
    keras: Any, server_url: str, reader: Reader, experiment_name: str
) -> None:
    import tracklane.mlflow as tm

    tm.set_tracking_uri(server_url)
    tm.set_experiment(experiment_name)
    with tm.start_run() as active:
        fit(tiny_model(keras), keras_integration.TracklaneCallback())

    run = only_run(reader, experiment_name)
    assert run["info"]["run_id"] == active.info.run_id
    assert len(reader.history(active.info.run_id, "loss")) == EPOCHS


def test_evaluate_after_fit_logs_validation_metrics_at_the_last_epoch(
    keras: Any, server_url: str, reader: Reader, experiment_name: str
) -> None:
    callback = keras_integration.TracklaneCallback(tracking_uri=server_url, experiment_name=experiment_name)
    model = tiny_model(keras)
    fit(model, callback)

    result = model.evaluate(*data(), verbose=0, callbacks=[callback], return_dict=True)
    assert tracklane.MlflowClient(server_url).flush(timeout=60)

    stored = reader.history(str(callback.run_id), "validation_loss")
    assert [(value, step) for value, step, _ in stored] == [(pytest.approx(result["loss"]), EPOCHS - 1)]


def test_a_metric_name_the_server_refuses_is_renamed_once_not_fatal(
    keras: Any, server_url: str, reader: Reader, experiment_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    callback = keras_integration.TracklaneCallback(tracking_uri=server_url, experiment_name=experiment_name)

    fit(tiny_model(keras, metric="mae@top"), callback)

    run = only_run(reader, experiment_name)
    assert len(reader.history(run["info"]["run_id"], "mae_top")) == EPOCHS
    assert run["info"]["status"] == "FINISHED"
    assert caplog.text.count("'mae@top' renamed to 'mae_top'") == 1


def test_an_optimizer_without_a_config_costs_only_its_params(
    keras: Any, server_url: str, reader: Reader, experiment_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    class CustomSGD(keras.optimizers.SGD):
        def get_config(self) -> dict[str, Any]:
            raise NotImplementedError("no config")

    callback = keras_integration.TracklaneCallback(tracking_uri=server_url, experiment_name=experiment_name)

    history = fit(tiny_model(keras, optimizer=CustomSGD(learning_rate=0.01)), callback)

    assert len(history["loss"]) == EPOCHS  # training went on
    run = only_run(reader, experiment_name)
    assert len(reader.history(run["info"]["run_id"], "loss")) == EPOCHS
    assert not any(key.startswith("optimizer_") for key in reader.params(run["info"]["run_id"]))
    assert run["info"]["status"] == "FINISHED"
    assert "Keras params failed (NotImplementedError: no config); training goes on" in caplog.text


def test_batch_logging_needs_log_every_epoch_false_as_in_mlflow(keras: Any) -> None:
    with pytest.raises(ValueError, match="log_every_epoch"):
        keras_integration.TracklaneCallback(log_every_n_steps=10)
    with pytest.raises(ValueError, match="log_every_n_steps"):
        keras_integration.TracklaneCallback(log_every_epoch=False)


def test_importing_the_integration_does_not_import_keras() -> None:
    code = "import sys, tracklane.integrations.keras; assert 'keras' not in sys.modules, 'imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


CRASHING_FIT = """
import os, sys
os.environ["KERAS_BACKEND"] = "torch"
import numpy as np
import keras
from tracklane.integrations.keras import TracklaneCallback

class Boom(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("diverged")

model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
x, y = np.random.rand(32, 3).astype("float32"), np.random.rand(32, 1).astype("float32")
callback = TracklaneCallback(tracking_uri=sys.argv[1], experiment_name=sys.argv[2])
model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[callback, Boom()])
"""


@pytest.mark.slow
def test_a_fit_that_crashes_leaves_its_run_failed_not_running(
    server_url: str, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OIP_"))}
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_FIT, server_url, experiment_name],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )

    assert result.returncode != 0 and "diverged" in result.stderr
    run = only_run(reader, experiment_name)
    assert run["info"]["status"] == "FAILED"  # Keras calls no callback on a crash: ended at exit
    assert [s for _, s, _ in reader.history(run["info"]["run_id"], "loss")] == [0, 1]
