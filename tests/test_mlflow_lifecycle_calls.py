"""MLflow calls its own docstring examples use, which the differential suite found missing or
failing on tracklane: the fluent ``restore_experiment``/``restore_run``, ``MlflowClient.get_parent_run``,
and ``sqlite:///:memory:`` (one database for the whole process, the fluent module and
``MlflowClient()`` alike, as MLflow's store keeps it). What the server stored is read through its
REST API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

import tracklane.mlflow as tlm

from servers import Reader

pytestmark = pytest.mark.server


def _env(server_url: str) -> dict[str, str]:
    """This environment without the developer's tracking settings; the server's URI, no telemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OIP_", "TRACKLANE_"))}
    env.update(MLFLOW_TRACKING_URI=server_url, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    return env


def test_restore_calls_are_tracklanes_own() -> None:
    # Not MLflow's reached through the module's ``__getattr__`` (which would import MLflow's client
    # and its store): tracklane's, on the session and engine the rest of the module uses.
    assert {"restore_experiment", "restore_run"} <= set(vars(tlm)) & set(tlm.__all__)
    assert "get_parent_run" in vars(tlm.MlflowClient)


def _stage(reader: Reader, experiment_id: str) -> str:
    found = reader.call("GET", "experiments/get", {"experiment_id": experiment_id})["experiment"]
    return str(found["lifecycle_stage"])


def test_fluent_restore_experiment_makes_a_deleted_experiment_active_again(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    tlm.set_tracking_uri(server_url)
    experiment_id = tlm.create_experiment(experiment_name)
    tlm.delete_experiment(experiment_id)
    assert _stage(reader, experiment_id) == "deleted"

    assert tlm.restore_experiment(experiment_id) is None
    assert _stage(reader, experiment_id) == "active"
    assert tlm.get_experiment(experiment_id).lifecycle_stage == "active"


def test_fluent_restore_run_makes_a_deleted_run_active_again(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    tlm.set_tracking_uri(server_url)
    tlm.set_experiment(experiment_name)
    with tlm.start_run() as run:
        tlm.log_param("p", 0)
    run_id = run.info.run_id
    tlm.delete_run(run_id)
    assert reader.run(run_id)["info"]["lifecycle_stage"] == "deleted"

    assert tlm.restore_run(run_id) is None
    assert reader.run(run_id)["info"]["lifecycle_stage"] == "active"
    assert reader.params(run_id) == {"p": "0"}


def test_restore_of_what_does_not_exist_is_mlflows_error(server_url: str) -> None:
    tlm.set_tracking_uri(server_url)
    with pytest.raises(mlflow.exceptions.MlflowException) as caught:
        tlm.restore_run("0" * 32)
    assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"


def test_client_get_parent_run_is_the_run_a_nested_run_started_under(
    server_url: str, experiment_name: str
) -> None:
    tlm.set_tracking_uri(server_url)
    tlm.set_experiment(experiment_name)
    with tlm.start_run() as parent, tlm.start_run(nested=True) as child:
        pass
    client = tlm.MlflowClient()

    found = client.get_parent_run(child.info.run_id)
    assert found is not None and found.info.run_id == parent.info.run_id
    assert client.get_parent_run(parent.info.run_id) is None  # a top-level run has no parent


def test_in_memory_sqlite_is_one_database_for_the_fluent_module_and_the_client(
    experiment_name: str,
) -> None:
    """MLflow's ``search_experiments`` examples: ``sqlite:///:memory:``, then experiments made and
    searched across many calls (each on a thread of the engine's; SQLite gives every new connection
    to ``:memory:`` an empty database of its own)."""
    tlm.set_tracking_uri("sqlite:///:memory:")
    names = [f"{experiment_name}-{suffix}" for suffix in ("a", "b", "ab")]
    for name in names:
        tlm.create_experiment(name, tags={"k": "v"} if name.endswith("ab") else None)
    client = tlm.MlflowClient()  # follows set_tracking_uri: the same in-memory database
    client.create_experiment(f"{experiment_name}-c")

    found = [e.name for e in tlm.search_experiments(order_by=["experiment_id DESC"])]
    assert found == [f"{experiment_name}-c", *reversed(names), "Default"]
    tagged = client.search_experiments(filter_string="tags.k = 'v'")
    assert [e.name for e in tagged] == [f"{experiment_name}-ab"]
    with tlm.start_run(experiment_id=tagged[0].experiment_id) as run:
        tlm.log_metric("loss", 0.5, step=1)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [0.5]


def test_artifacts_of_a_run_left_running_are_on_the_server_after_exit(
    server_url: str, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    """MLflow's ``MlflowClient.log_text`` example: a run created, artifacts logged, no
    ``set_terminated``, the program ends. The exit delivers this process's artifacts, not only its
    events (they were left in the journal for the next client, with a warning)."""
    experiment_id = reader.call("POST", "experiments/create", {"name": experiment_name})["experiment_id"]
    program = f"""
from tracklane.mlflow import MlflowClient
client = MlflowClient()
run = client.create_run(experiment_id={experiment_id!r})
client.log_text(run.info.run_id, "text1", "file1.txt")
client.log_text(run.info.run_id, "text2", "dir/file2.txt")
client.log_dict(run.info.run_id, {{"k": 1}}, "data.json")
print(run.info.run_id)
"""
    proc = subprocess.run(
        [sys.executable, "-c", program],
        env=_env(server_url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "did not reach" not in proc.stderr, proc.stderr[-2000:]
    run_id = proc.stdout.split()[-1]
    top = reader.call("GET", "artifacts/list", {"run_id": run_id}).get("files") or []
    inner = reader.call("GET", "artifacts/list", {"run_id": run_id, "path": "dir"}).get("files") or []
    assert sorted(f["path"] for f in top + inner) == ["data.json", "dir", "dir/file2.txt", "file1.txt"]
    assert reader.run(run_id)["info"]["status"] == "RUNNING"  # as MLflow leaves it: never ended
