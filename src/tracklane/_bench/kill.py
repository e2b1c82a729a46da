"""Figure 12: kill -9 at random moments of a full-speed logging loop: what is lost, what twice.

A child process logs two metrics a step to the MLflow server as fast as it can and prints, every
1,000 steps, the last step whose calls have returned; this script SIGKILLs it at a random moment
(once it has reported a random step count), runs ``tracklane sync`` on its storage (which first
moves the dead process's event log into the journal), and reads every key's history back through
the REST API. Lost: steps up to the last reported one that the server does not have; twice: points
stored more than once. Both should be 0 (``tests/test_kill_loses_nothing.py`` is the test).
With ``TRACKLANE_SENDER=process`` the sender process outlives the trainer and delivers the log
itself: the figure waits for it to exit, then syncs what is left (journal rows, or the log of a
trainer killed before its sender took over), if anything.
"""

from __future__ import annotations

import argparse
import json
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil

from . import harness

#: Trials, and the range of step counts (reported by the child) after which the kill comes; each
#: scale fits the bench's per-figure time limit (``figures.FIGURE_TIMEOUT``) on a loaded machine.
COUNTS: dict[str, tuple[int, int, int]] = {
    "smoke": (1, 1_000, 3_000),
    "quick": (2, 2_000, 10_000),
    "full": (5, 5_000, 40_000),
}
KEYS = ("loss", "acc")


def child(url: str, storage: str, experiment: str) -> None:
    """The killed process: log at full speed, say which step has returned every 1,000 steps."""
    from tracklane import TrackingClient

    tc = TrackingClient(api_host=url, path_to_storage=storage)
    tc.set_experiment(experiment)
    run = tc.start_run(log_system_metrics=False)
    print("run", run.info.run_id, flush=True)
    for step in range(10_000_000):
        tc.log_metric("loss", step * 0.5, step=step)
        tc.log_metric("acc", step * 0.25, step=step)
        if step % 1000 == 999:
            print("returned", step, flush=True)


def _history(url: str, run_id: str, key: str) -> list[int]:
    steps: list[int] = []
    token = None
    while True:
        query = {"run_id": run_id, "metric_key": key, "max_results": 25000}
        if token:
            query["page_token"] = token
        address = f"{url}/api/2.0/mlflow/metrics/get-history?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(address, timeout=60) as reply:
            found: dict[str, Any] = json.loads(reply.read() or b"{}")
        steps += [int(m["step"]) for m in found.get("metrics", [])]
        token = found.get("next_page_token")
        if not token:
            return steps


def one_trial(url: str, experiment: str, target: int, rng: random.Random) -> dict[str, int]:
    storage = tempfile.mkdtemp(prefix="tracklane-bench-kill-")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            f"{__package__}.kill",
            "--child",
            "run",
            "--child-arg",
            json.dumps([url, storage, experiment]),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    run_id, last = "", -1
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 120
        while last < target and time.monotonic() < deadline and proc.poll() is None:
            if not sel.select(timeout=1.0):
                continue
            words = proc.stdout.readline().split()
            if words[:1] == ["run"]:
                run_id = words[1]
            elif words[:1] == ["returned"]:
                last = int(words[1])
    time.sleep(rng.uniform(0.0, 0.05))
    senders = psutil.Process(proc.pid).children()  # TRACKLANE_SENDER=process: its sender
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=30)
    for line in rest.splitlines():
        words = line.split()
        if words[:1] == ["returned"]:
            last = int(words[1])
    if not run_id or last < 0:
        raise RuntimeError("the child logged nothing before it was killed")
    # A sender process outlives the killed trainer: it delivers the log itself, within the
    # trainer's exit_timeout, and leaves only what it could not deliver to the journal. (Killed
    # before the hand-over, it holds nothing: the log is the trainer's, for sync to recover.)
    _gone, alive = psutil.wait_procs(senders, timeout=600)
    if alive:
        raise RuntimeError("the killed trainer's sender process did not exit within 600 s")
    left = Path(storage) / "ml_runs"
    if not senders or (left / "tracklane.db").exists() or any(left.glob("events-*.tll")):
        synced = subprocess.run(
            [sys.executable, "-m", "tracklane._cli", "sync", storage],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if synced.returncode != 0:
            raise RuntimeError(f"tracklane sync failed: {synced.stderr[-1000:]}")
    lost = twice = 0
    for key in KEYS:
        steps = _history(url, run_id, key)
        lost += (last + 1) - len({s for s in steps if s <= last})
        twice += len(steps) - len(set(steps))
    return {"returned_points": (last + 1) * len(KEYS), "lost": lost, "twice": twice}


def measure(args: argparse.Namespace) -> harness.Figure:
    figure = harness.Figure("12_kill", "Figure 12: kill -9 at random moments, then tracklane sync")
    harness.banner(figure, args)
    count, low, high = COUNTS[args.scale]
    figure.params = {"trials": count, "kill_after_steps": [low, high], "keys_per_step": len(KEYS)}
    rng = random.Random()
    trials = []
    with harness.mlflow_server(args) as url:
        experiment = f"bench-kill-{uuid.uuid4().hex[:8]}"
        for _ in range(count):
            trials.append(one_trial(url, experiment, rng.randrange(low, high), rng))
    figure.params["per_trial"] = trials
    figure.add("trials", "kill -9 trials", len(trials), "trials")
    figure.add(
        "returned_points",
        "points whose call returned before the kill",
        sum(t["returned_points"] for t in trials),
        "points",
    )
    figure.add(
        "lost_points", "of those, not on the server after sync", sum(t["lost"] for t in trials), "points"
    )
    figure.add("duplicated_points", "points stored twice", sum(t["twice"] for t in trials), "points")
    return figure


def main() -> None:
    args = harness.parse_args(__doc__)
    if args.child:
        url, storage, experiment = json.loads(args.child_arg)
        child(url, storage, experiment)
        return
    measure(args).finish(args)


if __name__ == "__main__":
    main()
