"""Figure 1: what one logging call costs the caller, in microseconds, next to the machine's floor.

The floor is the least any buffered client can do: append a 4-tuple stamped with
``time.time_ns()`` to a ``collections.deque``. It runs in a fresh process where nothing else runs:
no tracklane client, no worker thread, no traffic to a server (a floor timed beside tracklane's
worker is slowed by it, which flatters the ratio).

tracklane runs in a fresh process of its own, against the real MLflow server, with its worker
delivering to the server meanwhile. Both loops produce at the same realistic rate (``RATE``
events/s, below the server's ceiling, so the worker keeps delivering throughout rather than
falling behind): 200 events back to back, timed in groups of 10, then a spin on the clock to the
next slot, holding the GIL as a training step's Python code does. The figure is the median
per-call time over the groups, with the 99th percentile beside it: a group that the worker's
turn with the GIL falls into, or that runs on caches the loop's own work has cooled, lands in
the tail.

Most of the worker's turns fall between the groups, into the loop's own work. So the worker's
whole share is reported too: the CPU time of every thread but the caller's, per event the worker
handled meanwhile, and that added to the median call, which is what a training loop that holds
the GIL throughout (pure-Python steps) pays per call.

The peers (W&B offline, trackio local), when installed, run the same schedule, each in a process
of its own.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import _common

#: Events per second that every loop produces: a busy training loop (10 metrics at 200 steps/s),
#: and below what a local MLflow server ingests (~6,000 events/s), so the worker never idles long.
RATE = 2_000
#: Events made back to back in one slot, then the loop's own work (a spin) to the next slot.
SLOT = 200
#: Events per timed group: 10 ``log_metric`` calls, one ``log_metrics`` of 10 keys, 10 ``set_tag``.
GROUP = 10
#: Seconds of each phase. The floor runs before tracklane and, but at smoke scale, after it too
#: (drift on a shared machine then shifts both alike). ``settle_s`` bounds the unmeasured flush
#: before each phase.
COUNTS = {
    "smoke": {
        "log_metric_s": 0.5,
        "log_metrics_s": 0.3,
        "set_tag_s": 0.3,
        "floor_s": 0.5,
        "floor_runs": 1,
        "settle_s": 10.0,
    },
    "quick": {
        "log_metric_s": 2.5,
        "log_metrics_s": 1.5,
        "set_tag_s": 1.0,
        "floor_s": 1.0,
        "floor_runs": 2,
        "settle_s": 10.0,
    },
    "full": {
        "log_metric_s": 10.0,
        "log_metrics_s": 5.0,
        "set_tag_s": 5.0,
        "floor_s": 5.0,
        "floor_runs": 2,
        "settle_s": 30.0,
    },
}
PEER_SECONDS = {"smoke": 0.3, "quick": 1.0, "full": 3.0}
KEYS10 = {f"metric_{i}": 0.5 + i for i in range(10)}


def paced(
    calls: Callable[[int, int], None], per_group: int, events_per_call: int, seconds: float
) -> list[float]:
    """Make calls at ``RATE`` events/s for ``seconds``: us per call of each timed group.

    Every ``SLOT`` events the caller makes them back to back, in groups of ``GROUP`` events
    timed one by one (``calls`` loops by itself, so no Python call per event is added); then it
    spins on the clock to the next slot, holding the GIL as a training step's Python code does.
    The first group of a slot runs on caches the loop's own work has cooled: it lands in the tail.
    """
    groups_per_slot = max(1, SLOT // (per_group * events_per_call))
    period = groups_per_slot * per_group * events_per_call / RATE
    slots = max(1, round(seconds / period))
    per_call: list[float] = []
    clock, add = time.perf_counter, per_call.append
    gc.collect()
    next_at = clock()
    first = 0
    for _ in range(slots):
        while clock() < next_at:
            pass
        for _ in range(groups_per_slot):
            began = clock()
            calls(first, per_group)
            add((clock() - began) / per_group * 1e6)
            first += per_group
        next_at += period
    return per_call


def p99(values: list[float]) -> float:
    return float(statistics.quantiles(values, n=100)[98]) if len(values) >= 100 else max(values)


def floor_child(seconds: float) -> dict[str, Any]:
    """In a fresh process with no client: the floor, on the same schedule as tracklane."""
    buf: collections.deque[tuple[str, float, int, int]] = collections.deque()
    append, time_ns = buf.append, time.time_ns

    def calls(first: int, count: int) -> None:
        for i in range(first, first + count):
            append(("loss", 0.5, time_ns(), i))

    threads = threading.active_count()  # 1: nothing else runs in this process
    return {"per_call_us": paced(calls, GROUP, 1, seconds), "threads": threads}


def _handled(tc: Any) -> tuple[int, int]:
    """(delivered, delivered + spilled) so far: the events the worker has dealt with."""
    stats = tc.stats()
    delivered = int(stats.get("delivered", 0))
    return delivered, delivered + int(stats.get("spilled", 0))


def tracklane_child(url: str, counts: dict[str, float]) -> dict[str, Any]:
    """In a fresh process: each call on the schedule, with the worker delivering to ``url``."""
    tc = _common.client(url)  # default settings: the buffer, batching and policy a user gets
    tc.set_experiment(f"bench-caller-cost-{uuid.uuid4().hex[:8]}")
    tc.start_run(run_name="caller-cost", log_system_metrics=False)
    log_metric, log_metrics, set_tag = tc.log_metric, tc.log_metrics, tc.set_tag

    def metric_calls(first: int, count: int) -> None:
        for i in range(first, first + count):
            log_metric("loss", 0.5, i)

    def metrics_calls(first: int, count: int) -> None:
        for i in range(first, first + count):
            log_metrics(KEYS10, i)

    def tag_calls(first: int, count: int) -> None:
        for i in range(first, first + count):
            set_tag("phase", "train" if i & 1 else "eval")

    phases = {  # name: (calls, calls per group, events per call, seconds)
        "log_metric": (metric_calls, GROUP, 1, counts["log_metric_s"]),
        "log_metrics_10": (metrics_calls, GROUP // 10, 10, counts["log_metrics_s"]),
        "set_tag": (tag_calls, GROUP, 1, counts["set_tag_s"]),
    }
    for calls, per_group, _, _ in phases.values():  # warm up: first-use key checks, the connection
        calls(0, per_group * 50)
    out: dict[str, Any] = {}
    for name, (calls, per_group, events_per_call, seconds) in phases.items():
        # Unmeasured: each phase starts with nothing left from the one before, so what the
        # worker does during the phase is delivering the phase's own events.
        tc.flush(timeout=counts["settle_s"])
        delivered0, handled0 = _handled(tc)
        cpu0, caller_cpu0, began = time.process_time(), time.thread_time(), time.perf_counter()
        per_call = paced(calls, per_group, events_per_call, seconds)
        cpu1, caller_cpu1, ended = time.process_time(), time.thread_time(), time.perf_counter()
        delivered1, handled1 = _handled(tc)
        out[name] = {
            "per_call_us": per_call,
            "events": len(per_call) * per_group * events_per_call,
            "seconds": ended - began,
            "delivered": delivered1 - delivered0,
            "handled": handled1 - handled0,
            # Every thread but the caller's: the worker, its event loop, the HTTP client.
            "others_cpu_s": (cpu1 - cpu0) - (caller_cpu1 - caller_cpu0),
        }
    tc.close(timeout=1.0)  # not measured, and bounded: the last events need not reach the server
    return out


def peer_child(name: str, seconds: float) -> dict[str, float]:
    """In a fresh process with the peer's environment: one-metric and 10-key calls, us/call."""
    if name == "wandb":
        import wandb

        run = wandb.init(project="tracklane-bench", name="caller-cost")
        log = run.log
        one = lambda i: log({"loss": 0.5}, step=i)  # noqa: E731
        ten = lambda i: log(KEYS10, step=i + 10_000_000)  # noqa: E731
        finish = run.finish
    else:
        import trackio

        trackio.init(project="tracklane-bench", name="caller-cost", auto_log_cpu=False, auto_log_gpu=False)
        one = lambda i: trackio.log({"loss": 0.5}, step=i)  # noqa: E731
        ten = lambda i: trackio.log(KEYS10, step=i + 10_000_000)  # noqa: E731
        finish = trackio.finish

    def one_calls(first: int, count: int) -> None:
        for i in range(first, first + count):
            one(i)

    def ten_calls(first: int, count: int) -> None:
        for i in range(first, first + count):
            ten(i)

    single = paced(one_calls, GROUP, 1, seconds)
    multi = paced(ten_calls, GROUP // 10, 10, seconds)
    finish()
    return {"one": _common.median(single), "ten": _common.median(multi)}


def measure_floor(counts: dict[str, float], figure: _common.Figure) -> list[float]:
    got = _common.child(__file__, "floor", counts["floor_s"])
    if got["threads"] != 1:
        figure.note(f"the floor's process ran {got['threads']} threads, not 1")
    per_call: list[float] = got["per_call_us"]
    return per_call


def measure(args: argparse.Namespace) -> _common.Figure:
    figure = _common.Figure("1_caller_cost", "Figure 1: caller cost per logging call")
    _common.banner(figure, args)
    counts = COUNTS[args.scale]
    figure.params = {**counts, "events_per_s": RATE, "events_per_timed_group": GROUP}
    with _common.mlflow_server(args) as url:
        floor = measure_floor(counts, figure)  # before tracklane, and after it below
        got = _common.child(__file__, "tracklane", {"url": url, "counts": counts}, timeout=120)
        for _ in range(int(counts["floor_runs"]) - 1):
            floor += measure_floor(counts, figure)
    floor_us = _common.median(floor)
    figure.add(
        "deque_floor_us",
        "floor, nothing else running: deque.append of a time_ns-stamped 4-tuple (median)",
        floor_us,
        "us/call",
    )
    figure.add(
        "deque_floor_p99_us", "floor, nothing else running: p99 of 10-call groups", p99(floor), "us/call"
    )
    metric = got["log_metric"]
    figure.add(
        "tracklane_log_metric_us",
        "tracklane log_metric, worker delivering to the server meanwhile (median)",
        _common.median(metric["per_call_us"]),
        "us/call",
    )
    figure.add(
        "tracklane_log_metric_p99_us",
        "tracklane log_metric, worker delivering meanwhile: p99 of 10-call groups",
        p99(metric["per_call_us"]),
        "us/call",
    )
    if metric["handled"]:
        worker_us = metric["others_cpu_s"] / metric["handled"] * 1e6
        figure.add(
            "tracklane_worker_cpu_per_event_us",
            "tracklane worker: CPU per event it handled meanwhile (all threads but the caller's)",
            worker_us,
            "us/event",
        )
        figure.add(
            "tracklane_log_metric_with_worker_us",
            "tracklane log_metric plus its worker's CPU per event (a loop that holds the GIL throughout)",
            _common.median(metric["per_call_us"]) + worker_us,
            "us/call",
        )
    else:
        figure.note("the worker delivered nothing during the log_metric phase; its share is not in figure 1")
    figure.add(
        "tracklane_delivered_meanwhile_events_per_s",
        f"events the worker delivered to the server during the log_metric phase (produced at {RATE:,}/s)",
        metric["delivered"] / metric["seconds"],
        "events/s",
    )
    figure.add(
        "tracklane_log_metrics_10_us",
        "tracklane log_metrics (10 keys), worker delivering meanwhile (median)",
        _common.median(got["log_metrics_10"]["per_call_us"]),
        "us/call",
    )
    figure.add(
        "tracklane_set_tag_us",
        "tracklane set_tag, worker delivering meanwhile (median)",
        _common.median(got["set_tag"]["per_call_us"]),
        "us/call",
    )
    figure.params["tracklane_phases"] = {
        name: {k: v for k, v in phase.items() if k != "per_call_us"} for name, phase in got.items()
    }
    for peer, label in (("wandb", "W&B offline"), ("trackio", "trackio local")):
        missing = _common.peer_available(peer, args.scale)
        if missing:
            figure.skip(missing)
            continue
        with tempfile.TemporaryDirectory(prefix=f"bench-{peer}-") as tmp:
            try:
                spec = {"peer": peer, "seconds": PEER_SECONDS[args.scale]}
                peer_got = _common.child(__file__, "peer", spec, env=_common.peer_env(tmp))
            except RuntimeError as exc:  # an optional peer that breaks is skipped, not fatal
                figure.skip(f"{peer} failed: {str(exc).splitlines()[-1]}")
                continue
        figure.add(f"{peer}_log_1_us", f"{label} log (1 metric)", peer_got["one"], "us/call")
        figure.add(f"{peer}_log_10_us", f"{label} log (10 metrics)", peer_got["ten"], "us/call")
    return figure


def main() -> None:
    args = _common.parse_args(__doc__)
    if args.child == "floor":
        _common.child_result(args, floor_child(float(json.loads(args.child_arg))))
    if args.child == "tracklane":
        spec = json.loads(args.child_arg)
        _common.child_result(args, tracklane_child(spec["url"], spec["counts"]))
    if args.child == "peer":
        spec = json.loads(args.child_arg)
        _common.child_result(args, peer_child(spec["peer"], spec["seconds"]))
    measure(args).finish(args)


if __name__ == "__main__":
    main()
