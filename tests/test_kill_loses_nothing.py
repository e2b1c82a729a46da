"""kill -9 at a random moment of a full-speed logging loop loses nothing whose call returned.

The child logs to a real MLflow server as fast as it can and reports, every 1000 steps, the last
step whose ``log_metric`` calls have returned; the parent SIGKILLs it at a random moment, then
runs ``tracklane sync`` (or a new client) on the same storage, and reads every key's history back
through the REST API: every step up to the last reported one is stored, none twice. The killed
run stays RUNNING on the server (as MLflow leaves a run whose process died).

Without the event log (``TRACKLANE_EVENT_LOG_MAX_BYTES=0``, or main before it) the events still in
the buffer and in flight at the kill are gone, and this test fails.
"""

from __future__ import annotations

import os
import random
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from servers import Reader

pytestmark = [pytest.mark.server, pytest.mark.slow]

TRIALS = 5
KEYS = ("loss", "acc")

CHILD = """
import sys
from tracklane import TrackingClient

tc = TrackingClient(api_host=sys.argv[1], path_to_storage=sys.argv[2])
tc.set_experiment(sys.argv[3])
run = tc.start_run(log_system_metrics=False)
tc.log_params({"lr": "0.1"})
tc.set_tags({"phase": "train"})
print("run", run.info.run_id, flush=True)
for step in range(10_000_000):
    tc.log_metric("loss", step * 0.5, step=step)
    tc.log_metric("acc", step * 0.25, step=step)
    if step % 1000 == 999:
        print("returned", step, flush=True)
"""


NEXT_CLIENT = """
import sys
from tracklane import TrackingClient

TrackingClient(api_host=sys.argv[1], path_to_storage=sys.argv[2], exit_timeout=600).close(timeout=600)
"""


def _kill_at_random(server_url: str, storage: Path, experiment: str, rng: random.Random) -> tuple[str, int]:
    """Start the child, SIGKILL it at a random moment; its run id and the last step it reported."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), server_url, str(storage), experiment],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    assert proc.stdout is not None
    target = rng.randrange(5_000, 60_000)  # a step count to reach, then a random extra moment
    run_id, last = "", -1
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 120
    try:
        while last < target and time.monotonic() < deadline and proc.poll() is None:
            if not sel.select(timeout=1.0):
                continue
            line = proc.stdout.readline().split()
            if line and line[0] == "run":
                run_id = line[1]
            elif line and line[0] == "returned":
                last = int(line[1])
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)  # what it printed before it died
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
    for line in rest.splitlines():
        words = line.split()
        if words and words[0] == "returned":
            last = int(words[1])
    assert proc.returncode == -signal.SIGKILL
    assert run_id and last >= target, (run_id, last, target)
    return run_id, last


def test_kill_9_at_random_moments_loses_and_duplicates_nothing_that_was_logged(
    server_url: str, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    rng = random.Random()
    results = []
    for trial in range(TRIALS):
        storage = tmp_path / f"trial-{trial}"
        run_id, last = _kill_at_random(server_url, storage, experiment_name, rng)
        # Recovery is the normal path: half the trials run `tracklane sync`, half open a new
        # client on the same storage (its start moves the dead log into the journal, its close
        # waits for the journal to be delivered).
        recovery = (
            ["-m", "tracklane._cli", "sync", str(storage)]
            if trial % 2 == 0
            else ["-c", NEXT_CLIENT, server_url, str(storage)]
        )
        done = subprocess.run([sys.executable, *recovery], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        for key in KEYS:
            steps = [s for _, s, _ in reader.history(run_id, key)]
            missing = (last + 1) - len({s for s in steps if s <= last})
            twice = len(steps) - len(set(steps))
            results.append((trial, key, last, missing, twice))
        run = reader.run(run_id)
        assert reader.params(run_id) == {"lr": "0.1"}
        assert {t["key"]: t["value"] for t in run["data"].get("tags", [])}.get("phase") == "train"
        assert run["info"]["status"] == "RUNNING"  # nobody ended it: as MLflow leaves a killed run
    lost = [r for r in results if r[3]]
    doubled = [r for r in results if r[4]]
    assert not lost and not doubled, f"(trial, key, last step, missing, twice): {lost} {doubled}"
