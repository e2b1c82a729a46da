"""Figure 6: resident memory per buffered event while the server is unreachable.

Each measurement runs in a fresh process: it starts a sink server, sets the experiment and starts
a run on it, then stops the sink, so the port is closed and every event stays buffered (a large
``max_buffer`` and an hour-long retry window keep them all). RSS (psutil) is read after a
collection before and after logging N events; the delta over N is the figure. Each event has a
value of its own (``i * 0.5``), a timestamp and a step, as a training loop's would. The floor is
the same N time_ns-stamped 4-tuples in a ``collections.deque``.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import time
from typing import Any

import psutil

from . import harness

COUNTS = {"smoke": {"events": 50_000}, "quick": {"events": 200_000}, "full": {"events": 1_000_000}}
KEYS = [f"metric_{i}" for i in range(10)]


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def memory_child(variant: str, events: int) -> dict[str, Any]:
    if variant == "floor":
        buf: collections.deque[tuple[str, float, int, int]] = collections.deque()
        before = rss()
        for i in range(events):
            buf.append(("loss", i * 0.5, time.time_ns(), i))
        return {"bytes": rss() - before, "buffered": len(buf)}

    from .sink import SinkServer

    sink = SinkServer().start()
    tc = harness.client(sink.url, max_buffer=events + 10_000, retry_window=3600.0, exit_timeout=0.1)
    tc.set_experiment("bench-memory")
    tc.start_run(run_name="unreachable")
    sink.stop()  # the port is closed from here on: nothing logged below can leave
    before = rss()
    if variant == "log_metric":
        log_metric = tc.log_metric
        for i in range(events):
            log_metric("loss", i * 0.5, i)
    else:
        log_metrics = tc.log_metrics
        values = dict.fromkeys(KEYS, 0.0)
        for step in range(events // len(KEYS)):
            for i, key in enumerate(KEYS):
                values[key] = step * 0.5 + i
            log_metrics(values, step)
    grown = rss() - before
    stats = tc.stats() if hasattr(tc, "stats") else {}
    in_memory = stats.get("buffer_depth", events) + stats.get("in_flight_events", 0)
    return {"bytes": grown, "in_memory": int(in_memory), "stats": stats}


def measure(args: argparse.Namespace) -> harness.Figure:
    figure = harness.Figure("6_memory", "Figure 6: resident memory per buffered event, server unreachable")
    harness.banner(figure, args)
    events = COUNTS[args.scale]["events"]
    figure.params = {"events": events, "keys_per_log_metrics": len(KEYS)}
    labels = {
        "floor": ("deque_floor_bytes_per_event", "floor: deque of time_ns-stamped 4-tuples"),
        "log_metric": ("tracklane_log_metric_bytes_per_event", "tracklane, buffered by log_metric"),
        "log_metrics": (
            "tracklane_log_metrics_10_bytes_per_event",
            "tracklane, buffered by log_metrics (10 keys)",
        ),
    }
    for variant, (key, label) in labels.items():
        got = harness.child(__file__, "memory", {"variant": variant, "events": events})
        stats = got.get("stats") or {}
        if stats.get("spilled") or stats.get("delivered"):  # events that left memory flatter the figure
            figure.note(f"{variant}: not every event stayed in memory: {stats}")
        elif got.get("in_memory", events) < events:
            figure.note(
                f"{variant}: stats() accounts for {got['in_memory']:,} of {events:,} buffered events "
                "(the batch the worker holds while it waits for a send slot is not counted)"
            )
        figure.add(key, f"{label}, {events:,} events", got["bytes"] / events, "bytes/event")
    return figure


def main() -> None:
    args = harness.parse_args(__doc__)
    if args.child == "memory":
        spec = json.loads(args.child_arg)
        harness.child_result(args, memory_child(spec["variant"], spec["events"]))
    measure(args).finish(args)


if __name__ == "__main__":
    main()
