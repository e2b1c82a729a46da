"""A process that logs and exits without end_run still delivers everything, within a bound."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from servers import Reader

CHILD = """
import sys
from tracklane import TrackingClient
tc = TrackingClient(api_host=sys.argv[1], exit_timeout=60)
tc.set_experiment(sys.argv[2])
run = tc.start_run(run_name="child")
print(run.info.run_id, flush=True)
for step in range(5000):
    tc.log_metric("loss", 1.0 / (step + 1), step=step)
tc.log_param("exit", sys.argv[3])
if sys.argv[3] == "crash":
    raise RuntimeError("the training script dies here")
"""


def _run_child(
    server_url: str, experiment_name: str, mode: str
) -> tuple[str, subprocess.CompletedProcess[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), server_url, experiment_name, mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.stdout.split()[0], proc


def test_child_that_exits_without_end_run_delivers_every_event_and_finishes_the_run(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    run_id, proc = _run_child(server_url, experiment_name, "clean")

    assert proc.returncode == 0, proc.stderr
    assert len(reader.history(run_id, "loss")) == 5000
    assert reader.params(run_id) == {"exit": "clean"}
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


def test_child_dying_of_an_uncaught_exception_flushes_and_marks_the_run_failed(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    run_id, proc = _run_child(server_url, experiment_name, "crash")

    assert proc.returncode == 1 and "the training script dies here" in proc.stderr
    assert len(reader.history(run_id, "loss")) == 5000
    assert reader.run(run_id)["info"]["status"] == "FAILED"
