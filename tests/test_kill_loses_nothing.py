"""kill -9 at a random moment of a full-speed logging loop loses nothing whose call returned.

The child logs as fast as it can (to a real MLflow server, or offline to the local journal) and
reports, every 1000 steps, the last step whose ``log_metric`` calls have returned; the parent
SIGKILLs it at a random moment, then runs ``tracklane sync`` (or a new client) on the same storage,
and reads every key's history back (through the server's REST API, or offline through the new
client): every step up to the last reported one is stored, none twice. The killed run stays
RUNNING (as MLflow leaves a run whose process died).

Without the event log (``TRACKLANE_EVENT_LOG_MAX_BYTES=0``, or main before it) the events still in
the buffer and in flight at the kill are gone, and this test fails.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from servers import Reader

pytestmark = pytest.mark.slow  # and server, for the tests that take its fixtures (conftest)

TRIALS = 5
KEYS = ("loss", "acc")

CHILD = """
import os, sys, time
from tracklane import TrackingClient

if sys.argv[1] == "offline":
    tc = TrackingClient(offline_mode=True, path_to_storage=sys.argv[2])
else:
    tc = TrackingClient(api_host=sys.argv[1], path_to_storage=sys.argv[2], exit_timeout=float(sys.argv[4]))
tc.set_experiment(sys.argv[3])
run = tc.start_run(log_system_metrics=False)
tc.log_params({"lr": "0.1"})
tc.set_tags({"phase": "train"})
if os.environ.get("TRACKLANE_SENDER") == "process":  # killed once the sender process has the log
    deadline = time.monotonic() + 60
    while tc.stats().get("sender_process") != 1.0 and time.monotonic() < deadline:
        time.sleep(0.01)
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


OFFLINE_READER = """
import json, sys
from tracklane import TrackingClient

tc = TrackingClient(offline_mode=True, path_to_storage=sys.argv[1], exit_timeout=600)
run = tc.get_run(sys.argv[2])
print(json.dumps({
    "steps": {key: [m.step for m in tc.get_metric_history(sys.argv[2], key)] for key in sys.argv[3:]},
    "params": dict(run.data.params),
    "tags": dict(run.data.tags),
    "status": run.info.status,
}))
tc.close(timeout=600)
"""


def _kill_at_random(
    server_url: str,
    storage: Path,
    experiment: str,
    rng: random.Random,
    env: dict[str, str] | None = None,
    exit_timeout: float = 10.0,
) -> tuple[str, int, list[psutil.Process]]:
    """Start the child (``server_url`` "offline": it logs offline), SIGKILL it at a random moment;
    its run id, the last step it reported, and the processes it had started (a sender)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(CHILD),
            server_url,
            str(storage),
            experiment,
            str(exit_timeout),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
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
        children = psutil.Process(proc.pid).children()
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
    return run_id, last, children


@pytest.mark.thread_sender
def test_kill_9_at_random_moments_loses_and_duplicates_nothing_that_was_logged(
    server_url: str, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    rng = random.Random()
    results = []
    for trial in range(TRIALS):
        storage = tmp_path / f"trial-{trial}"
        run_id, last, _ = _kill_at_random(server_url, storage, experiment_name, rng)
        # Recovery is the normal path: half the trials run `tracklane sync`, half open a new
        # client on the same storage (its start moves the dead log into the journal, its close
        # waits for the journal to be delivered).
        recovery = (
            ["-m", "tracklane._cli", "sync", str(storage)]
            if trial % 2 == 0
            else ["-c", NEXT_CLIENT, server_url, str(storage)]
        )
        _python(*recovery)
        for key in KEYS:
            results.append(_tally(trial, key, last, [s for _, s, _ in reader.history(run_id, key)]))
        run = reader.run(run_id)
        assert reader.params(run_id) == {"lr": "0.1"}
        assert {t["key"]: t["value"] for t in run["data"].get("tags", [])}.get("phase") == "train"
        assert run["info"]["status"] == "RUNNING"  # nobody ended it: as MLflow leaves a killed run
    _assert_complete(results)


def test_kill_9_of_an_offline_client_loses_and_duplicates_nothing_that_was_logged(
    server_url: str, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    """Offline, the event log's records join the killed run in the journal: read back by the next
    offline client on the storage (whose start recovers them), or after `tracklane sync --to`."""
    rng = random.Random()
    results = []
    for trial in range(TRIALS):
        storage = tmp_path / f"trial-{trial}"
        run_id, last, _ = _kill_at_random("offline", storage, experiment_name, rng)
        if trial % 2 == 0:
            seen = json.loads(_python("-c", OFFLINE_READER, str(storage), run_id, *KEYS).splitlines()[-1])
            histories, params, tags = seen["steps"], seen["params"], seen["tags"]
            status = seen["status"]
        else:
            _python("-m", "tracklane._cli", "sync", str(storage), "--to", server_url)
            run_id = _synced_run(reader, experiment_name, run_id)
            histories = {key: [s for _, s, _ in reader.history(run_id, key)] for key in KEYS}
            run = reader.run(run_id)
            params = reader.params(run_id)
            tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
            status = run["info"]["status"]
        for key in KEYS:
            results.append(_tally(trial, key, last, histories[key]))
        assert params == {"lr": "0.1"}
        assert tags.get("phase") == "train"
        assert status == "RUNNING"
    _assert_complete(results)


def test_kill_9_with_a_sender_process_loses_and_duplicates_nothing_and_needs_no_recovery(
    server_url: str, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    """With ``TRACKLANE_SENDER=process`` the sender outlives the killed trainer: it reads the log
    to its end and delivers it by itself (its ``exit_timeout`` here is long enough for all of it),
    then exits. A `tracklane sync` after it finds nothing left to send twice."""
    rng = random.Random()
    results = []
    for trial in range(3):
        storage = tmp_path / f"trial-{trial}"
        run_id, last, children = _kill_at_random(
            server_url, storage, experiment_name, rng, env={"TRACKLANE_SENDER": "process"}, exit_timeout=300
        )
        assert len(children) == 1, children  # the sender
        _gone, alive = psutil.wait_procs(children, timeout=300)
        assert not alive, "the sender process did not exit after delivering"
        for key in KEYS:
            results.append(_tally(trial, key, last, [s for _, s, _ in reader.history(run_id, key)]))
        assert reader.params(run_id) == {"lr": "0.1"}
        assert not list(storage.rglob("events-*.tll")), "the sender left the delivered log behind"
        if (storage / "ml_runs" / "tracklane.db").exists():  # (none if nothing was ever spilled)
            _python("-m", "tracklane._cli", "sync", str(storage))  # nothing left: nothing twice
        for key in KEYS:
            results.append(_tally(trial, key, last, [s for _, s, _ in reader.history(run_id, key)]))
        assert reader.run(run_id)["info"]["status"] == "RUNNING"
    _assert_complete(results)


def _synced_run(reader: Reader, experiment_name: str, offline_run_id: str) -> str:
    """The server's run that `tracklane sync` made for an offline run (tagged with its offline id)."""
    experiment = reader.experiment(experiment_name)
    assert experiment is not None
    found = [
        r["info"]["run_id"]
        for r in reader.runs(experiment["experiment_id"])
        if {t["key"]: t["value"] for t in r["data"].get("tags", [])}.get("tracklane.offline_run_id")
        == offline_run_id
    ]
    assert len(found) == 1, found
    return str(found[0])


def _python(*args: str) -> str:
    """Run ``python3 ARGS`` (a recovery or a reader) to its end; its stdout."""
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _tally(trial: int, key: str, last: int, steps: list[int]) -> tuple[int, str, int, int, int]:
    """(trial, key, last step, steps up to it that are missing, steps stored twice)."""
    return trial, key, last, (last + 1) - len({s for s in steps if s <= last}), len(steps) - len(set(steps))


def _assert_complete(results: list[tuple[int, str, int, int, int]]) -> None:
    lost = [r for r in results if r[3]]
    doubled = [r for r in results if r[4]]
    assert not lost and not doubled, f"(trial, key, last step, missing, twice): {lost} {doubled}"
