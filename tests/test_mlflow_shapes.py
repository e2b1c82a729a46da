"""MLflow 3's call shapes and semantics on the MLflow faces, against a real server: RunOperations from
``synchronous=False``, ``model_id=``/``dataset=`` as log-batch fields, the module-level helpers,
MLflow's truncation of long values, ``synchronous=False`` refusals logged rather than raised,
``search_runs``' DataFrame, and MLflow's INFO line for a new experiment."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import pytest
from mlflow.entities import Dataset

import tracklane.mlflow as tlm

from servers import Reader

pytestmark = pytest.mark.server


def _groups(columns: list[str]) -> list[str]:
    """The column groups in order: info, then metrics/params/tags (each once)."""
    out: list[str] = []
    for c in columns:
        group = c.split(".", 1)[0] if "." in c else "info"
        if not out or out[-1] != group:
            out.append(group)
    return out


# -- synchronous=False: RunOperations -------------------------------------------------------------


def test_async_log_metric_returns_run_operations_that_wait(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    tlm.set_tracking_uri(server_url)
    tlm.set_experiment(experiment_name)
    with tlm.start_run() as run:
        ops = tlm.log_metric("loss", 0.5, step=1, synchronous=False)
        assert ops is not None and ops.wait() is None
        assert [p[0] for p in reader.history(run.info.run_id, "loss")] == [0.5]  # wait() delivered it
        tlm.log_metrics({"a": 1.0, "b": 2.0}, synchronous=False).wait()  # type: ignore[union-attr]
        assert [p[0] for p in reader.history(run.info.run_id, "b")] == [2.0]
        assert tlm.log_metric("loss", 0.4, step=2) is None  # MLflow returns None unless asynchronous


def test_client_async_calls_return_run_operations(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    client = tlm.MlflowClient(server_url)
    run = client.create_run(client.create_experiment(experiment_name))
    run_id = run.info.run_id
    client.log_metric(run_id, "loss", 0.5, synchronous=False).wait()  # type: ignore[union-attr]
    client.log_param(run_id, "lr", 0.1, synchronous=False).wait()
    client.set_tag(run_id, "t", "v", synchronous=False).wait()  # type: ignore[union-attr]
    client.log_batch(run_id, metrics=[mlflow.entities.Metric("m", 1.0, 0, 0)], synchronous=False).wait()  # type: ignore[union-attr]
    assert reader.params(run_id) == {"lr": "0.1"} and reader.tags(run_id)["t"] == "v"
    assert [p[0] for p in reader.history(run_id, "m")] == [1.0]
    client.set_terminated(run_id)


# -- model_id and dataset: MLflow 3's metric fields -----------------------------------------------------


def test_model_id_and_dataset_are_sent_as_log_batch_fields(server_url: str, experiment_name: str) -> None:
    theirs = mlflow.MlflowClient(server_url)
    experiment_id = theirs.create_experiment(experiment_name)
    model = theirs.create_logged_model(experiment_id=experiment_id, name="m")
    dataset = Dataset(name="train", digest="abc123", source_type="code", source="{}")
    tlm.set_tracking_uri(server_url)
    with tlm.start_run(experiment_id=experiment_id):
        tlm.log_metric("acc", 0.9, step=3, model_id=model.model_id, dataset=dataset, synchronous=True)
        tlm.log_metrics({"f1": 0.8}, model_id=model.model_id, synchronous=True)
    stored = {m.key: m for m in theirs.get_logged_model(model.model_id).metrics or []}
    assert stored["acc"].value == 0.9 and stored["acc"].step == 3
    assert (stored["acc"].dataset_name, stored["acc"].dataset_digest) == ("train", "abc123")
    assert stored["f1"].value == 0.8


def test_client_log_metric_takes_mlflow_3_keywords(server_url: str, experiment_name: str) -> None:
    theirs = mlflow.MlflowClient(server_url)
    experiment_id = theirs.create_experiment(experiment_name)
    model = theirs.create_logged_model(experiment_id=experiment_id)
    client = tlm.MlflowClient(server_url)
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "acc", 0.7, model_id=model.model_id, dataset_name="d", dataset_digest="x")
    client.set_terminated(run_id)
    (metric,) = theirs.get_logged_model(model.model_id).metrics or []
    assert (metric.key, metric.value, metric.dataset_name, metric.run_id) == ("acc", 0.7, "d", run_id)


# -- module-level helpers -----------------------------------------------------------------------------


def test_version_tracking_uri_set_and_registry_uri(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tlm.__version__ == mlflow.__version__
    assert tlm.is_tracking_uri_set() is False
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_url)
    assert tlm.is_tracking_uri_set() is True
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tlm.set_tracking_uri(server_url)
    assert tlm.is_tracking_uri_set() is True
    assert tlm.get_registry_uri() == server_url  # MLflow: the tracking URI unless set
    tlm.set_registry_uri("http://127.0.0.1:1")
    assert tlm.get_registry_uri() == "http://127.0.0.1:1"
    assert tlm.MlflowClient().get_registry_uri() == "http://127.0.0.1:1"
    tlm.set_registry_uri(None)


# -- truncation and refusals as MLflow has them -----------------------------------------------------------


def test_long_param_and_tag_are_truncated_with_mlflows_warning(
    server_url: str, experiment_name: str, reader: Reader, caplog: pytest.LogCaptureFixture
) -> None:
    tlm.set_tracking_uri(server_url)
    tlm.set_experiment(experiment_name)
    with caplog.at_level(logging.WARNING, logger="tracklane"), tlm.start_run() as run:
        tlm.log_param("long", "p" * 6001)
        tlm.set_tag("long", "t" * 9000)
    client = tlm.MlflowClient(server_url)
    other = client.create_run(run.info.experiment_id).info.run_id
    client.log_param(other, "long", "q" * 7000)
    client.set_tag(other, "long", "u" * 8001)
    client.log_batch(other, params=[mlflow.entities.Param("batch", "b" * 6500)])
    client.set_terminated(other)
    assert reader.params(run.info.run_id)["long"] == "p" * 6000
    assert reader.tags(run.info.run_id)["long"] == "t" * 8000
    assert reader.params(other) == {"long": "q" * 6000, "batch": "b" * 6000}
    assert reader.tags(other)["long"] == "u" * 8000
    assert "(6001 characters) is truncated to 6000 characters to meet the length limit." in caplog.text
    assert "Tag value 'ttt" in caplog.text and "(9000 characters) is truncated to 8000" in caplog.text


def test_async_changed_param_logs_an_error_and_the_run_goes_on(
    server_url: str, experiment_name: str, reader: Reader, caplog: pytest.LogCaptureFixture
) -> None:
    tlm.set_tracking_uri(server_url)
    tlm.set_experiment(experiment_name)
    with tlm.start_run() as run:
        tlm.log_param("lr", 0.1)
        with caplog.at_level(logging.ERROR, logger="tracklane"):
            ops = tlm.log_param("lr", 0.2, synchronous=False)  # MLflow's docstring example: no raise
        tlm.log_metric("after", 1.0)
    assert "Failed to log run data" in caplog.text and "'lr'" in caplog.text
    with pytest.raises(mlflow.exceptions.MlflowException):
        ops.wait()  # as MLflow's RunOperations.wait raises what failed
    stored = reader.run(run.info.run_id)
    assert stored["info"]["status"] == "FINISHED"
    assert reader.params(run.info.run_id) == {"lr": "0.1"}
    assert [p[0] for p in reader.history(run.info.run_id, "after")] == [1.0]


# -- search_runs: MLflow's DataFrame -----------------------------------------------------------------------


def _mlflows_frame(server_url: str, experiment_id: str) -> Any:
    mlflow.set_tracking_uri(server_url)
    try:
        return mlflow.search_runs(experiment_ids=[experiment_id])
    finally:
        mlflow.set_tracking_uri(None)


def test_search_runs_frame_has_mlflows_columns_and_dtypes(server_url: str, experiment_name: str) -> None:
    tlm.set_tracking_uri(server_url)
    experiment_id = tlm.set_experiment(experiment_name).experiment_id
    with tlm.start_run():
        tlm.log_param("p1", 1)
        tlm.set_tag("first", "yes")
    with tlm.start_run():
        tlm.log_metrics({"loss": 0.5, "acc": 0.9})
        tlm.log_param("p2", 2)
    ours = tlm.search_runs()
    theirs = _mlflows_frame(server_url, experiment_id)
    assert (
        _groups(list(ours.columns)) == _groups(list(theirs.columns)) == ["info", "metrics", "params", "tags"]
    )
    assert sorted(ours.columns) == sorted(theirs.columns)
    assert ours.dtypes[sorted(ours.columns)].to_dict() == theirs.dtypes[sorted(theirs.columns)].to_dict()
    columns = sorted(c for c in ours.columns if c.startswith(("metrics.", "params.")))
    assert ours[columns].astype(str).values.tolist() == theirs[columns].astype(str).values.tolist()


def test_search_runs_empty_frame_matches_mlflows(server_url: str, experiment_name: str) -> None:
    tlm.set_tracking_uri(server_url)
    experiment_id = tlm.set_experiment(experiment_name).experiment_id
    ours = tlm.search_runs()
    theirs = _mlflows_frame(server_url, experiment_id)
    assert list(ours.columns) == list(theirs.columns)
    assert ours.dtypes.to_dict() == theirs.dtypes.to_dict()
    assert len(ours) == 0


# -- MLflow's INFO line --------------------------------------------------------------------------------


def test_new_experiment_prints_mlflows_info_line(
    server_url: str, experiment_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tlm.set_tracking_uri(server_url)
    tlm.set_experiment(experiment_name)
    tlm.set_experiment(experiment_name)  # exists now: no line
    err = capsys.readouterr().err
    line = f"Experiment with name '{experiment_name}' does not exist. Creating a new experiment."
    assert err.count(line) == 1 and " INFO " in err


def test_truncation_off_refuses_long_values_at_the_call(
    server_url: str, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``MLFLOW_TRUNCATE_LONG_VALUES=false``: MLflow's server refuses them, so the call does."""
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")
    tlm.set_tracking_uri(server_url)
    tlm.set_experiment(experiment_name)
    with tlm.start_run(), pytest.raises(mlflow.exceptions.MlflowException, match="at most 6000"):
        tlm.log_param("long", "p" * 6001)
