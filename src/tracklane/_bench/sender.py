"""Figure 13: what each sender costs the training process, per event, beside the machine's floor.

Issue 20's question: the in-process worker (``TRACKLANE_SENDER=thread``) runs on the training
process's GIL, so its CPU is the training loop's cost too; the sender process
(``TRACKLANE_SENDER=process``) takes that CPU into a process of its own. Each sender runs in a fresh
process against the real MLflow server, on figure 1's schedule (``caller_cost.paced``: ``RATE``
events/s, 200 back to back in timed groups of 10, then a spin to the next slot), with its sender
delivering meanwhile. Reported per event:

- the caller's own cost (median of the timed groups);
- the CPU of every other thread of the training process (the worker, its loop and HTTP client;
  with the sender process, only the relay's reader), from the phase's start until its events are
  delivered (a flush after it), per event delivered;
- their sum: what a training loop that holds the GIL throughout pays per event;
- with the sender process, its own CPU per event beside it (another core's, not the loop's).

The floor is figure 1's: a time_ns-stamped 4-tuple appended to a deque, in a process where nothing
else runs. The two senders run alternately (``rounds``), so drift on a shared machine shifts both.

Also reported: the first logging call to its first delivery (as ``stats()`` sees it) with each
sender (the process sender's first events go through the in-process worker while the sender
process starts, so they match), the sender process's start-up to taking the log over, its memory
(resident set), and the wall time of a
short script (start a run, log 2 params and 10 metrics, end it, exit) with each sender, in fresh
interpreters, median of ``short_runs``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from . import caller_cost, harness

COUNTS = {
    "smoke": {"seconds": 0.5, "rounds": 1, "short_runs": 1, "floor_s": 0.5},
    "quick": {"seconds": 2.0, "rounds": 2, "short_runs": 3, "floor_s": 1.0},
    "full": {"seconds": 5.0, "rounds": 3, "short_runs": 5, "floor_s": 3.0},
}

SHORT_SCRIPT = """
import sys
from tracklane import TrackingClient

tc = TrackingClient(api_host=sys.argv[1], path_to_storage=sys.argv[2])
tc.set_experiment(sys.argv[3])
with tc.start_run(log_system_metrics=False):
    tc.log_params({"lr": 0.1, "layers": 4})
    for step in range(10):
        tc.log_metric("loss", 1.0 / (step + 1), step=step)
"""


def sender_child(url: str, seconds: float) -> dict[str, Any]:
    """In a fresh process (``TRACKLANE_SENDER`` set by the caller): start-up, then one paced phase."""
    import psutil

    made = time.perf_counter()
    tc = harness.client(url)
    tc.set_experiment(f"bench-sender-{uuid.uuid4().hex[:8]}")
    tc.start_run(run_name="sender", log_system_metrics=False)
    began = time.perf_counter()
    tc.log_metric("loss", 0.5, 0)
    deadline = began + 30
    while tc.stats()["delivered"] < 1 and time.perf_counter() < deadline:
        time.sleep(0.001)  # a benchmark's look, not the engine's: it wakes on its own events
    first_delivery_s = time.perf_counter() - began
    log_metric = tc.log_metric

    def calls(first: int, count: int) -> None:
        for i in range(first, first + count):
            log_metric("loss", 0.5, i)

    calls(1, 500)  # warm-up
    tc.flush(timeout=30)
    takeover_s = None
    if os.environ.get("TRACKLANE_SENDER") == "process":  # the phase is the sender process's
        while tc.stats().get("sender_process") != 1.0 and time.perf_counter() < deadline:
            time.sleep(0.005)
        takeover_s = time.perf_counter() - made  # an upper bound: the warm-up came first
    senders = psutil.Process().children()
    sender_cpu0 = sum(sum(p.cpu_times()[:2]) for p in senders)
    delivered0 = tc.stats()["delivered"]
    cpu0, caller0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
    per_call = caller_cost.paced(calls, caller_cost.GROUP, 1, seconds)
    t1 = time.perf_counter()
    # What is not delivered by the phase's end is delivered now: the CPU it takes is counted
    # too, in the training process (the caller waits, idle) and in the sender process alike.
    drained = bool(tc.flush(timeout=60))
    cpu1, caller1 = time.process_time(), time.thread_time()
    events = len(per_call) * caller_cost.GROUP
    sender_cpu = sum(sum(p.cpu_times()[:2]) for p in senders if p.is_running()) - sender_cpu0
    rss = sum(p.memory_info().rss for p in senders if p.is_running())
    stats = tc.stats()
    delivered = stats["delivered"] - delivered0
    tc.close(timeout=30)
    return {
        "per_call_us": harness.median(per_call),
        "others_cpu_s": (cpu1 - cpu0) - (caller1 - caller0),
        "events": events,
        "delivered": delivered,
        "seconds": t1 - t0,
        "sender_cpu_s": sender_cpu,
        "sender_process": stats.get("sender_process", 0.0),
        "sender_rss_bytes": rss,
        "senders": len(senders),
        "first_delivery_s": first_delivery_s,
        "takeover_s": takeover_s,
        "drained": drained,
    }


def short_script(url: str, sender: str, experiment: str) -> float:
    """Wall seconds of ``SHORT_SCRIPT`` in a fresh interpreter with ``sender``."""
    env = {**os.environ, "TRACKLANE_SENDER": sender}
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", SHORT_SCRIPT, url, harness.storage_dir(), experiment],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"the short script failed with TRACKLANE_SENDER={sender}: {done.stderr[-1000:]}")
    return took


def measure(args: Any) -> harness.Figure:
    figure = harness.Figure("13_sender", "Figure 13: the training process's CPU per event, by sender")
    harness.banner(figure, args)
    counts = COUNTS[args.scale]
    figure.params = {**counts, "events_per_s": caller_cost.RATE}
    got: dict[str, list[dict[str, Any]]] = {"thread": [], "process": []}
    short: dict[str, list[float]] = {"thread": [], "process": []}
    with harness.mlflow_server(args) as url:
        floor = harness.child(caller_cost.__file__, "floor", counts["floor_s"])["per_call_us"]
        for _ in range(int(counts["rounds"])):
            for sender in ("thread", "process"):
                env = {**os.environ, "TRACKLANE_SENDER": sender}
                got[sender].append(harness.child(__file__, "sender", [url, counts["seconds"]], env=env))
        experiment = f"bench-short-{uuid.uuid4().hex[:8]}"
        for _ in range(int(counts["short_runs"])):
            for sender in ("thread", "process"):
                short[sender].append(short_script(url, sender, experiment))
    floor_us = harness.median(floor)
    figure.add(
        "deque_floor_us",
        "floor, nothing else running: deque.append of a stamped 4-tuple",
        floor_us,
        "us/call",
    )
    for sender, label in (("thread", "thread sender"), ("process", "sender process")):
        runs = got[sender]
        caller = statistics.median(r["per_call_us"] for r in runs)
        others = statistics.median(r["others_cpu_s"] / max(1, r["delivered"]) * 1e6 for r in runs)
        figure.add(
            f"{sender}_log_metric_us",
            f"{label}: log_metric, the caller's own cost (median)",
            caller,
            "us/call",
        )
        figure.add(
            f"{sender}_other_threads_cpu_per_event_us",
            f"{label}: CPU of the training process's other threads per event delivered",
            others,
            "us/event",
        )
        figure.add(
            f"{sender}_training_process_per_event_us",
            f"{label}: the training process per event (caller plus its other threads)",
            caller + others,
            "us/event",
        )
        if not all(r["drained"] for r in runs):
            figure.note(f"{label}: a phase's events were still undelivered 60 s after it")
    process = got["process"]
    if any(r["senders"] != 1 or r["sender_process"] != 1.0 for r in process):
        figure.note("the sender process did not have the log in every process-sender phase")
    figure.add(
        "sender_process_cpu_per_event_us",
        "sender process: its own CPU per event (another core's, not the training loop's)",
        statistics.median(r["sender_cpu_s"] / max(1, r["delivered"]) * 1e6 for r in process),
        "us/event",
    )
    figure.add(
        "process_first_delivery_ms",
        "process sender: first logging call to first delivery",
        statistics.median(r["first_delivery_s"] for r in process) * 1000,
        "ms",
    )
    figure.add(
        "thread_first_delivery_ms",
        "thread sender: first logging call to first delivery",
        statistics.median(r["first_delivery_s"] for r in got["thread"]) * 1000,
        "ms",
    )
    figure.add(
        "sender_process_takeover_ms",
        "sender process: client made to the sender process taking the log over (at most)",
        statistics.median(r["takeover_s"] for r in process) * 1000,
        "ms",
    )
    figure.add(
        "sender_process_rss_mb",
        "sender process: resident memory after the phase",
        statistics.median(r["sender_rss_bytes"] for r in process) / (1 << 20),
        "MiB",
    )
    for sender, label in (("thread", "thread sender"), ("process", "sender process")):
        figure.add(
            f"short_script_{sender}_s",
            f"a short script (2 params, 10 metrics, one run), start to exit: {label} (median)",
            statistics.median(short[sender]),
            "s",
        )
    figure.params["runs"] = got
    figure.params["short_script_s"] = short
    return figure


def main() -> None:
    args = harness.parse_args(__doc__)
    if args.child == "sender":
        url, seconds = json.loads(args.child_arg)
        harness.child_result(args, sender_child(url, float(seconds)))
    measure(args).finish(args)


if __name__ == "__main__":
    main()
