"""Many processes, one run (issue 14): ranks started like ``torchrun`` log into one run on an MLflow
server backed by PostgreSQL with several workers; only rank 0 ends it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tracklane import TrackingClient

from postgres import PgMlflowServer
from servers import MlflowServer, Reader

RANK_SCRIPT = """
import os, sys
from tracklane import TrackingClient

url, experiment, storage, points, mode = sys.argv[1:6]
rank = int(os.environ["RANK"])
tc = TrackingClient(api_host=url, path_to_storage=storage, rank_logging="prefixed", exit_timeout=60)
tc.set_experiment(experiment)
run = tc.start_run(run_name="job", log_system_metrics=False)
print("run", run.info.run_id, flush=True)
tc.log_param("world_size", os.environ["WORLD_SIZE"])
for step in range(int(points)):
    tc.log_metric("loss", 1.0 / (step + 1), step=step)
    if mode == "killed" and step == 4999:
        assert tc.flush(timeout=120)
        print("flushed 5000", flush=True)
        sys.stdin.readline()  # the launcher kills this rank while it waits here
if mode == "rank0":
    print("logged", flush=True)
    sys.stdin.readline()  # the launcher says the other ranks are done
    tc.set_tag("phase", "done")
    tc.end_run()
elif mode == "early":
    tc.close()  # leaves the job early; the run stays RUNNING
else:
    tc.end_run()  # a rank > 0 ending its part: flushes, never ends the job's run
print("left", flush=True)
"""


def _rank(
    script: Path,
    url: str,
    experiment: str,
    storage: Path,
    rank: int,
    points: int,
    mode: str,
    env: dict[str, str],
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), url, experiment, str(storage), str(points), mode],
        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "4"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_until(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:  # bounded by the test's timeout: each rank prints or dies
        if line.startswith(prefix):
            return line.strip()
    _, err = proc.communicate(timeout=60)
    raise AssertionError(f"rank exited ({proc.returncode}) before {prefix!r}: {err[-2000:]}")


@pytest.mark.timeout(600)
def test_four_ranks_log_into_one_run_ended_once_by_rank_zero(
    pg_mlflow_server: PgMlflowServer, tmp_path: Path, experiment_name: str
) -> None:
    reader = Reader(pg_mlflow_server.url)
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OIP_", "MLFLOW_"))}
    storage = tmp_path / "node"  # one node: the ranks share a journal
    url = pg_mlflow_server.url
    ranks = [
        _rank(script, url, experiment_name, storage, 0, 25_000, "rank0", env),
        _rank(script, url, experiment_name, storage, 1, 25_000, "normal", env),
        _rank(script, url, experiment_name, storage, 2, 10_000, "early", env),
        _rank(script, url, experiment_name, storage, 3, 25_000, "killed", env),
    ]
    try:
        run_ids = {_read_until(p, "run ").split()[1] for p in ranks}
        _read_until(ranks[3], "flushed 5000")
        ranks[3].send_signal(signal.SIGKILL)
        ranks[3].wait(timeout=60)
        for p in ranks[1:3]:
            _read_until(p, "left")
            p.wait(timeout=120)
        _read_until(ranks[0], "logged")
        [run_id] = run_ids
        assert reader.run(run_id)["info"]["status"] == "RUNNING"  # rank 0 has not finished
        assert ranks[0].stdin is not None
        ranks[0].stdin.write("go\n")
        ranks[0].stdin.flush()
        _read_until(ranks[0], "left")
        assert ranks[0].wait(timeout=120) == 0
        assert [p.returncode for p in ranks[1:3]] == [0, 0]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)

    experiment = reader.experiment(experiment_name)
    assert experiment is not None
    assert [r["info"]["run_id"] for r in reader.runs(experiment["experiment_id"])] == [run_id]
    steps = {rank: [s for _, s, _ in reader.history(run_id, f"rank{rank}/loss")] for rank in range(4)}
    assert steps[0] == list(range(25_000))
    assert steps[1] == list(range(25_000))
    assert steps[2] == list(range(10_000))
    # The killed rank: everything it flushed is there, once; what it logged after may or may not be.
    assert steps[3][:5000] == list(range(5000)) and steps[3] == list(range(len(steps[3])))
    info = reader.run(run_id)["info"]
    assert info["status"] == "FINISHED" and int(info["end_time"]) > 0
    assert reader.params(run_id) == {"world_size": "4"}
    assert reader.tags(run_id)["phase"] == "done"


def test_a_rank_attaches_to_the_run_the_launcher_made_and_only_rank_zero_ends_it(
    server_url: str, experiment_name: str, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The launcher makes the run (through the REST API) and hands its id to the job's ranks.
    experiment_id = reader.call("POST", "experiments/create", {"name": experiment_name})["experiment_id"]
    run_id = reader.call("POST", "runs/create", {"experiment_id": experiment_id, "run_name": "launched"})[
        "run"
    ]["info"]["run_id"]
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    monkeypatch.setenv("WORLD_SIZE", "2")

    monkeypatch.setenv("RANK", "1")
    with TrackingClient(api_host=server_url) as rank1:
        run = rank1.start_run(log_system_metrics=False)
        rank1.log_metric("loss", 0.5, step=1)
        rank1.end_run()
    status_after_rank1 = reader.run(run_id)["info"]["status"]
    monkeypatch.setenv("RANK", "0")
    with TrackingClient(api_host=server_url) as rank0:
        rank0.start_run(log_system_metrics=False)
        rank0.log_metric("loss", 0.25, step=2)
    # leaving the client's block ended rank 0's run

    assert run.info.run_id == run_id
    assert status_after_rank1 == "RUNNING"
    assert [s for _, s, _ in reader.history(run_id, "loss")] == [1, 2]
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


def test_zero_only_logging_keeps_other_ranks_silent(
    server_url: str, experiment_name: str, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with TrackingClient(api_host=server_url, rank_logging="zero_only") as rank0:
        rank0.set_experiment(experiment_name)
        run = rank0.start_run(run_name="job", log_system_metrics=False)
        rank0.log_metric("loss", 1.0, step=0)
        monkeypatch.setenv("RANK", "1")
        with TrackingClient(api_host=server_url, rank_logging="zero_only") as rank1:
            rank1.set_experiment(experiment_name)
            assert rank1.start_run(run_name="job", log_system_metrics=False).info.run_id == run.info.run_id
            rank1.log_metric("loss", 99.0, step=1)
            rank1.log_metrics({"other": 1.0})

    assert reader.history(run.info.run_id, "loss") == [
        (1.0, 0, reader.history(run.info.run_id, "loss")[0][2])
    ]
    assert reader.history(run.info.run_id, "other") == []


def test_system_metrics_of_a_node_go_under_its_node_id(
    server_url: str, experiment_name: str, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_NODE_ID", "node-a")
    with TrackingClient(api_host=server_url, system_metrics_interval=0.2) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run() as run:
            deadline = time.monotonic() + 30
            while not tc.get_run(run.info.run_id).data.metrics and time.monotonic() < deadline:
                time.sleep(0.2)  # waits for the sampler's first interval; bounded

    keys = {m["key"] for m in reader.run(run.info.run_id)["data"].get("metrics", [])}
    assert "system/node-a/cpu_utilization_percentage" in keys
    assert not [k for k in keys if k.startswith("system/") and not k.startswith("system/node-a/")]


SPILLING_RANK = """
import os, sys
from tracklane import TrackingClient

url, storage = sys.argv[1:3]
tc = TrackingClient(
    api_host=url, path_to_storage=storage, rank_logging="prefixed", retry_window=1, exit_timeout=3
)
tc.start_run(log_system_metrics=False)  # MLFLOW_RUN_ID: the launcher's run
print("attached", flush=True)
sys.stdin.readline()  # the launcher stops the server, then says go
for step in range(20_000):
    tc.log_metric("loss", float(step), step=step)
# exits with the server down: what is left, and rank 0's end of the run, go to the shared journal
"""


@pytest.mark.timeout(600)
def test_ranks_sharing_a_journal_leave_leftovers_that_a_later_client_delivers_once(
    restartable_server: MlflowServer, tmp_path: Path
) -> None:
    reader = Reader(restartable_server.url)
    experiment_id = reader.call("POST", "experiments/create", {"name": "shared-journal"})["experiment_id"]
    run_id = reader.call("POST", "runs/create", {"experiment_id": experiment_id, "run_name": "job"})["run"][
        "info"
    ]["run_id"]
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(SPILLING_RANK))
    storage = tmp_path / "node"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OIP_", "MLFLOW_"))}
    env = {**base, "MLFLOW_RUN_ID": run_id, "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), restartable_server.url, str(storage)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        for p in ranks:
            _read_until(p, "attached")
        restartable_server.stop()
        for p in ranks:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        errors = [p.communicate(timeout=180)[1] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
    assert [p.returncode for p in ranks] == [0, 0], errors
    restartable_server.start()

    with TrackingClient(api_host=restartable_server.url, path_to_storage=str(storage)) as later:
        later.flush()  # the resume runs in the background; close() below waits for it
    # leaving the block delivered both ranks' leftovers and rank 0's end of the run

    assert [s for _, s, _ in reader.history(run_id, "rank0/loss")] == list(range(20_000))
    assert [s for _, s, _ in reader.history(run_id, "rank1/loss")] == list(range(20_000))
    assert reader.run(run_id)["info"]["status"] == "FINISHED"
