"""The three synchronous faces in one program share one engine, and MLflow's run metadata and run
links appear as MLflow gives them.

Each program runs in a process of its own (the fluent module is process-wide, and its runs end at
interpreter exit); what the server stored is read through its REST API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tracklane import DeliveryError, MlflowClient

from servers import Reader

ONE_PROGRAM_THREE_FACES = """
import json, sys, threading
import tracklane.mlflow as mlflow
from tracklane import MlflowClient, TrackingClient

url, experiment = sys.argv[1:3]
tc = TrackingClient(api_host=url)
tc.set_experiment(experiment)
tc.start_run(run_name="oicm", log_system_metrics=False)
mlflow.set_tracking_uri(url)
mlflow.set_experiment(experiment)
mlflow.start_run(run_name="fluent")
client = MlflowClient(url)
by_id = client.create_run(mlflow.active_run().info.experiment_id, run_name="by-id")
for step in range(2000):
    tc.log_metric("loss", float(step), step=step)
    mlflow.log_metric("loss", float(step), step=step)
    client.log_metric(by_id.info.run_id, "loss", float(step), step=step)
workers = [t.name for t in threading.enumerate() if t.name == "tracklane"]
tc.close()  # ends the OICM run; the engine goes on for the MLflow faces
client.set_terminated(by_id.info.run_id)
print(json.dumps({"workers": workers}), flush=True)
# the fluent run is still active: interpreter exit ends it, FINISHED
"""


def _run(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OIP_"))}
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )


def test_a_tracking_client_and_both_mlflow_faces_share_one_worker_and_deliver_every_point(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader
) -> None:
    result = _run(tmp_path, ONE_PROGRAM_THREE_FACES, server_url, experiment_name)

    assert result.returncode == 0, result.stderr
    [report] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"workers"')]
    assert report["workers"] == ["tracklane"]  # one loop thread for all three faces
    experiment = reader.experiment(experiment_name)
    assert experiment is not None
    runs = {r["info"]["run_name"]: r for r in reader.runs(experiment["experiment_id"])}
    assert set(runs) == {"oicm", "fluent", "by-id"}
    for name, run in runs.items():
        assert run["info"]["status"] == "FINISHED", name
        steps = [s for _, s, _ in reader.history(run["info"]["run_id"], "loss")]
        assert steps == list(range(2000)), name


FLUENT_RUN = """
import sys
import tracklane.mlflow as mlflow

url, experiment = sys.argv[1:3]
mlflow.set_tracking_uri(url)
mlflow.set_experiment(experiment)
with mlflow.start_run(run_name="with-metadata", description="a note") as run:
    mlflow.log_metric("loss", 0.5)
print(run.info.run_id, flush=True)
"""


def test_runs_carry_mlflows_metadata_tags_and_end_with_mlflows_view_run_lines(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader
) -> None:
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text("0123456789abcdef0123456789abcdef01234567\n")

    result = _run(tmp_path, FLUENT_RUN, server_url, experiment_name)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    run_id = lines[-1]  # printed after the run's end lines
    tags = reader.tags(run_id)
    assert tags["mlflow.source.name"].endswith("program.py")
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert tags["mlflow.source.git.branch"] == "main"
    assert tags["mlflow.user"]
    assert tags["mlflow.note.content"] == "a note"
    assert reader.run(run_id)["info"]["user_id"] == tags["mlflow.user"]
    experiment_id = reader.run(run_id)["info"]["experiment_id"]
    assert f"🏃 View run with-metadata at: {server_url}/#/experiments/{experiment_id}/runs/{run_id}" in lines
    assert f"🧪 View experiment at: {server_url}/#/experiments/{experiment_id}" in lines


def test_a_refused_event_is_reported_by_its_own_runs_end_not_by_another_runs(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    client, other_client = MlflowClient(server_url), MlflowClient(server_url)
    experiment_id = client.create_experiment(experiment_name)
    run_a = client.create_run(experiment_id, run_name="a").info.run_id
    run_b = client.create_run(experiment_id, run_name="b").info.run_id
    client.log_param(run_a, "lr", "0.1", synchronous=True)
    other_client.log_param(run_a, "lr", "0.2")  # this client never saw lr: the server refuses it
    client.log_metric(run_b, "loss", 0.5)

    client.set_terminated(run_b)  # b's end: b's events are fine, a's refusal is not b's to raise
    with pytest.raises(DeliveryError) as refused:
        client.set_terminated(run_a)

    assert [(e.run_id, e.key) for e in refused.value.rejected] == [(run_a, "lr")]
    assert reader.run(run_b)["info"]["status"] == "FINISHED"
    assert reader.run(run_a)["info"]["status"] == "FINISHED"
    assert reader.params(run_a) == {"lr": "0.1"}
