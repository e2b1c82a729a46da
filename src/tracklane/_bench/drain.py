"""Figure 4: drain capacity, the events/s tracklane's worker can pack, encode and send.

The server is a sink on 127.0.0.1 (its own process) that accepts every request without storing
it, so the figure is the client's own ceiling, independent of MLflow's server. The caller logs N
metric events (10 keys a step) as fast as it can into a buffer large enough for all of them, then
calls ``flush()``. Two figures:

- end to end into the sink: N / (first call .. end of flush());
- drain capacity: the backlog left when the caller stops / the time ``flush()`` takes to send it.
  While the caller runs, it and the worker share the GIL; after, the worker has the process to
  itself, which is what "capacity" means here. The backlog is read from the engine's delivered
  count.
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

from . import harness

COUNTS = {
    "smoke": {"events": 20_000, "repeats": 1},
    "quick": {"events": 200_000, "repeats": 1},
    "full": {"events": 1_000_000, "repeats": 3},
}
KEYS = [f"metric_{i}" for i in range(10)]


def delivered(tc: Any) -> int | None:
    stats = getattr(tc, "stats", None)
    if callable(stats):
        got = stats().get("delivered")
        if got is not None:
            return int(got)
    engine = getattr(tc, "_engine", None)
    return None if engine is None else getattr(engine, "delivered", None)


def one_run(url: str, events: int) -> tuple[float, float | None, int, int]:
    steps = events // len(KEYS)
    values = {key: 0.25 * i for i, key in enumerate(KEYS)}
    with harness.client(url, max_buffer=events + 10_000) as tc:
        tc.set_experiment(f"bench-drain-{uuid.uuid4().hex[:8]}")
        with tc.start_run(run_name="drain"):
            log_metrics = tc.log_metrics
            before = delivered(tc) or 0
            began = time.perf_counter()
            for step in range(steps):
                log_metrics(values, step)
            logged = time.perf_counter()
            sent = delivered(tc)
            if not tc.flush(timeout=300):
                raise RuntimeError("flush() did not finish within 300s")
            ended = time.perf_counter()
            spilled = harness.spilled(tc)
    total = steps * len(KEYS)
    backlog = None if sent is None else total - (sent - before)
    drain = None if not backlog else backlog / (ended - logged)
    return total / (ended - began), drain, backlog or 0, spilled


def measure(args: argparse.Namespace) -> harness.Figure:
    figure = harness.Figure("4_drain", "Figure 4: drain capacity into a sink that stores nothing")
    harness.banner(figure, args)
    counts = COUNTS[args.scale]
    figure.params = {**counts, "keys_per_step": len(KEYS)}
    e2e: list[float] = []
    drains: list[float] = []
    backlogs: list[int] = []
    with harness.sink_server() as sink:
        for _ in range(counts["repeats"]):
            total_rate, drain_rate, backlog, spilled = one_run(sink.url, counts["events"])
            if spilled:
                figure.note(f"{spilled:,} events went through the local journal (outage spill)")
            e2e.append(total_rate)
            backlogs.append(backlog)
            if drain_rate is not None:
                drains.append(drain_rate)
    n = f"{counts['events']:,}"
    figure.add(
        "sink_end_to_end_events_per_s",
        f"tracklane end to end into the sink, {n} events",
        harness.median(e2e),
        "events/s",
    )
    if drains:
        figure.add(
            "drain_events_per_s",
            f"tracklane drain capacity (backlog of {int(harness.median(backlogs)):,} after the calls)",
            harness.median(drains),
            "events/s",
        )
    else:
        figure.skip(
            "drain capacity: the engine exposes no delivered count; only the end-to-end figure is given"
        )
    figure.params["backlogs"] = backlogs
    return figure


def main() -> None:
    args = harness.parse_args(__doc__)
    measure(args).finish(args)


if __name__ == "__main__":
    main()
