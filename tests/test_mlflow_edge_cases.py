"""Edge cases of the MLflow faces that a hostile review found: runs per thread, a run ended while
the server is down, and nested offline runs synced later.

Programs run in processes of their own (the fluent module is process-wide); what the server stored
is read through its REST API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from servers import MlflowServer, Reader, tracklane_cli


def _run(tmp_path: Path, source: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OIP_"))}
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )


THREADS_EACH_WITH_A_RUN = """
import sys, threading
import tracklane.mlflow as mlflow

url, experiment = sys.argv[1:3]
mlflow.set_tracking_uri(url)
mlflow.set_experiment(experiment)
errors = []

def trial(i):
    try:
        with mlflow.start_run(run_name=f"trial-{i}"):
            for step in range(100):
                mlflow.log_metric("loss", float(i), step=step)
    except Exception as exc:
        errors.append(repr(exc))

with mlflow.start_run(run_name="main"):
    threads = [threading.Thread(target=trial, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
print(errors, flush=True)
"""


def test_each_thread_has_its_own_active_run_as_in_mlflow(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader
) -> None:
    result = _run(tmp_path, THREADS_EACH_WITH_A_RUN, server_url, experiment_name)

    assert result.returncode == 0, result.stderr
    assert "[]" in result.stdout.splitlines(), result.stdout
    experiment = reader.experiment(experiment_name)
    assert experiment is not None
    runs = {r["info"]["run_name"]: r["info"] for r in reader.runs(experiment["experiment_id"])}
    assert set(runs) == {"main", "trial-0", "trial-1", "trial-2"}
    for i in range(3):
        info = runs[f"trial-{i}"]
        assert info["status"] == "FINISHED"
        assert [v for v, _, _ in reader.history(info["run_id"], "loss")] == [float(i)] * 100
        assert "mlflow.parentRunId" not in reader.tags(info["run_id"])  # not nested under main's run


ENDED_DURING_AN_OUTAGE = """
import json, sys
from tracklane import MlflowClient

url, storage_note = sys.argv[1:3]
client = MlflowClient(url)
experiment_id = client.create_experiment(storage_note)
run_id = client.create_run(experiment_id, run_name="during-outage").info.run_id
for step in range(1000):
    client.log_metric(run_id, "loss", float(step), step=step)
client.flush()
print(json.dumps({"run_id": run_id}), flush=True)
sys.stdin.readline()  # the test stops the server, then says go
for step in range(1000, 2000):
    client.log_metric(run_id, "loss", float(step), step=step)
client.set_terminated(run_id)  # the server is down: the end is kept with the events
print("ended", flush=True)
"""


def test_set_terminated_while_the_server_is_down_keeps_the_end_and_a_later_sync_applies_it(
    tmp_path: Path, restartable_server: MlflowServer
) -> None:
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(ENDED_DURING_AN_OUTAGE))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OIP_"))}
    proc = subprocess.Popen(
        [sys.executable, str(script), restartable_server.url, "outage-end"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        run_id = json.loads(proc.stdout.readline())["run_id"]
        restartable_server.stop()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "ended" in out
    restartable_server.start()

    synced = tracklane_cli("sync", str(tmp_path), "--to", restartable_server.url)

    assert synced.returncode == 0, synced.stderr
    reader = Reader(restartable_server.url)
    assert reader.run(run_id)["info"]["status"] == "FINISHED"
    assert [s for _, s, _ in reader.history(run_id, "loss")] == list(range(2000))


NESTED_OFFLINE = """
import sys
import tracklane.mlflow as mlflow

mlflow.set_tracking_uri(sys.argv[1])  # a local directory: offline
mlflow.set_experiment("nested-offline")
with mlflow.start_run(run_name="parent"):
    with mlflow.start_run(run_name="child", nested=True):
        mlflow.log_metric("loss", 0.5)
"""


def test_a_nested_offline_run_synced_later_names_its_parent_by_the_servers_id(
    tmp_path: Path, server_url: str, reader: Reader
) -> None:
    storage = tmp_path / "offline"
    result = _run(tmp_path, NESTED_OFFLINE, str(storage))
    assert result.returncode == 0, result.stderr

    synced = tracklane_cli("sync", str(storage), "--to", server_url)

    assert synced.returncode == 0, synced.stderr
    experiment = reader.experiment("nested-offline")
    assert experiment is not None
    runs = {r["info"]["run_name"]: r["info"]["run_id"] for r in reader.runs(experiment["experiment_id"])}
    assert reader.tags(runs["child"])["mlflow.parentRunId"] == runs["parent"]
