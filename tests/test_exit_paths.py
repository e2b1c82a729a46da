"""How a process leaves: sys.exit inside a run, and logging from atexit handlers after ours.

Each case runs in a process of its own (exit behaviour is what is tested) against the real server,
through a proxy where a fault must be scripted, and checks what the server stored.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from faults import SlowFor
from servers import FaultProxy, MlflowServer, Reader, tracklane_cli

pytestmark = pytest.mark.server

#: A hang guard, not a speed target: each child exits in seconds when things work.
CHILD_TIMEOUT = 180

EARLIER = """
import sys
from tracklane import TrackingClient
url, storage, experiment = sys.argv[1:4]
# The server refuses every batch: after retry_window the events and the run's end stay in the journal.
tc = TrackingClient(api_host=url, path_to_storage=storage, retry_window=1.0, exit_timeout=2)
tc.set_experiment(experiment)
run = tc.start_run(run_name="earlier", log_system_metrics=False)
print(run.info.run_id, flush=True)
for step in range(20000):
    tc.log_metric("loss", float(step), step=step)
"""

SYS_EXIT = """
import sys
from tracklane import TrackingClient
url, storage, experiment = sys.argv[1:4]
tc = TrackingClient(api_host=url, path_to_storage=storage, exit_timeout=60)
tc.set_experiment(experiment)
with tc.start_run(run_name="exits", log_system_metrics=False) as run:
    print(run.info.run_id, flush=True)
    for step in range(5000):
        tc.log_metric("loss", 1.0 / (step + 1), step=step)
    sys.exit(3)
"""

LATE = """
import atexit, sys
from tracklane import TrackingClient
url, storage, experiment = sys.argv[1:4]
clients = []

def save_final_metrics():  # registered before the client exists: runs after tracklane's exit flush
    tc = clients[0]
    for i in range(1000):
        tc.log_metric("late", float(i), step=i)
    tc.set_tag("late", "yes")

atexit.register(save_final_metrics)
tc = TrackingClient(api_host=url, path_to_storage=storage)
clients.append(tc)
tc.set_experiment(experiment)
run = tc.start_run(run_name="late", log_system_metrics=False)
print(run.info.run_id, flush=True)
for step in range(100):
    tc.log_metric("loss", float(step), step=step)
"""

LATE_FLUENT = """
import atexit, sys
import tracklane.mlflow as mlflow
url, storage, experiment = sys.argv[1:4]

def save_final_metrics():  # runs after tracklane's exit flush ended the active run
    for i in range(1000):
        mlflow.log_metric("late", float(i), step=i)
    mlflow.set_tag("late", "yes")

atexit.register(save_final_metrics)
mlflow.set_tracking_uri(url)
mlflow.set_experiment(experiment)
run = mlflow.start_run(run_name="late")
print(run.info.run_id, flush=True)
for step in range(100):
    mlflow.log_metric("loss", float(step), step=step)
"""

OS_EXIT = """
import os, sys, time
from tracklane import TrackingClient
url, storage, experiment = sys.argv[1:4]
tc = TrackingClient(api_host=url, path_to_storage=storage, retry_window=1.0)
tc.set_experiment(experiment)
run = tc.start_run(run_name="os-exit", log_system_metrics=False)
print(run.info.run_id, flush=True)
for step in range(3000):
    tc.log_metric("loss", float(step), step=step)
tc.flush()  # the server refuses every batch: after retry_window they are all in the journal
deadline = time.monotonic() + 60
while tc.stats()["spilled"] < 3000 and time.monotonic() < deadline:
    time.sleep(0.1)
print(int(tc.stats()["spilled"]), flush=True)
for step in range(3000, 3500):
    tc.log_metric("loss", float(step), step=step)  # in memory only
os._exit(0)
"""


def _child(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )


def _run_id(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout.split()[0]  # then MLflow's View-run lines


@pytest.fixture
def slow_proxy(mlflow_server: MlflowServer) -> Iterator[SlowFor]:
    proxy = SlowFor(mlflow_server.url)
    proxy.start()
    yield proxy
    proxy.stop()


def test_sys_exit_inside_a_run_ends_it_failed_with_every_point_without_waiting_for_older_leftovers(
    slow_proxy: SlowFor, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    storage = str(tmp_path / "storage")
    # An earlier process left 20,000 events and its run's end in this storage's journal.
    slow_proxy.answer("runs/log-batch", 503, b"")
    earlier = _child(EARLIER, slow_proxy.url, storage, experiment_name)
    assert earlier.returncode == 0, earlier.stderr
    earlier_id = _run_id(earlier)
    slow_proxy.heal()
    # The server takes those leftovers slowly (a second a batch); the new run's go at full speed.
    slow_proxy.slow_containing("runs/log-batch", earlier_id.encode(), 1.0)

    proc = _child(SYS_EXIT, slow_proxy.url, storage, experiment_name)

    assert proc.returncode == 3, proc.stderr
    run_id = _run_id(proc)
    assert reader.run(run_id)["info"]["status"] == "FAILED"
    assert [s for _, s, _ in reader.history(run_id, "loss")] == list(range(5000))
    # The exit delivered its own events and left the earlier ones where they were safe, saying so.
    said = [line for line in proc.stderr.splitlines() if "earlier processes left" in line]
    assert len(said) == 1 and f"tracklane sync {storage} --to {slow_proxy.url}" in said[0], proc.stderr
    assert "Traceback" not in proc.stderr

    slow_proxy.heal()
    synced = tracklane_cli("sync", storage, "--to", slow_proxy.url)
    assert synced.returncode == 0, synced.stderr
    assert [s for _, s, _ in reader.history(earlier_id, "loss")] == list(range(20000))
    assert reader.run(earlier_id)["info"]["status"] == "FINISHED"


@pytest.mark.parametrize("face", ["TrackingClient", "tracklane.mlflow"])
def test_logging_from_an_atexit_handler_after_the_exit_flush_is_kept_and_synced_into_the_run(
    face: str, server_url: str, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    # The fluent face keeps its journal where MLflow's client would, under the working directory.
    storage = str(tmp_path / "storage") if face == "TrackingClient" else str(tmp_path)

    proc = _child(LATE if face == "TrackingClient" else LATE_FLUENT, server_url, storage, experiment_name)

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "NoActiveRunError" not in proc.stderr, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "after the exit flush" in line]
    assert len(said) == 1 and f"tracklane sync {storage} --to {server_url}" in said[0], proc.stderr
    run_id = _run_id(proc)
    assert reader.run(run_id)["info"]["status"] == "FINISHED"  # the exit ended it
    assert len(reader.history(run_id, "loss")) == 100

    synced = tracklane_cli("sync", storage, "--to", server_url)

    assert synced.returncode == 0, synced.stderr
    assert [s for _, s, _ in reader.history(run_id, "late")] == list(range(1000))
    assert reader.tags(run_id)["late"] == "yes"
    assert reader.run(run_id)["info"]["status"] == "FINISHED"  # still: the late data joined it


def test_os_exit_keeps_what_was_in_memory_and_what_was_in_the_journal(
    fault_proxy: FaultProxy, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    storage = str(tmp_path / "storage")
    fault_proxy.answer("runs/log-batch", 503, b"")

    proc = _child(OS_EXIT, fault_proxy.url, storage, experiment_name)

    assert proc.returncode == 0, proc.stderr
    run_id, spilled = proc.stdout.split()[:2]
    assert spilled == "3000"
    fault_proxy.heal()
    synced = tracklane_cli("sync", storage, "--to", fault_proxy.url)
    assert synced.returncode == 0, synced.stderr
    # No exit flush ran: the journal's 3,000 arrive, and the 500 that were only in memory too (the
    # sync moves the dead process's event log into the journal first); nobody ended the run
    # (README: what os._exit and kill -9 lose).
    assert [s for _, s, _ in reader.history(run_id, "loss")] == list(range(3500))
    assert reader.run(run_id)["info"]["status"] == "RUNNING"
