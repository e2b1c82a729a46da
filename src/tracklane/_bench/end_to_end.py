"""Figure 2: end-to-end events/s into the MLflow server, next to the server's own ceiling.

tracklane: from the first ``log_metrics`` call (10 keys a step) to the end of ``flush()``, with
default settings. The ceiling: the same events, pre-encoded as 1,000-metric ``runs/log-batch``
bodies before the clock starts, posted straight to the server with aiohttp, 1 and 2 requests in
flight. Each repeat runs the three in turn on new runs of the same server; medians over repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import aiohttp
import orjson

from . import harness

COUNTS = {  # metric events per measurement, repeats
    "smoke": {"events": 2_000, "repeats": 1},
    "quick": {"events": 10_000, "repeats": 1},
    "full": {"events": 100_000, "repeats": 3},
}
KEYS = [f"metric_{i}" for i in range(10)]
FLUSH_TIMEOUT = 600.0


def tracklane_run(url: str, experiment: str, events: int) -> tuple[float, int]:
    steps = events // len(KEYS)
    values = {key: 0.25 * i for i, key in enumerate(KEYS)}
    with harness.client(url) as tc:
        tc.set_experiment(experiment)
        with tc.start_run(run_name=f"tracklane-{uuid.uuid4().hex[:6]}"):
            log_metrics = tc.log_metrics
            began = time.perf_counter()
            for step in range(steps):
                log_metrics(values, step)
            if not tc.flush(timeout=FLUSH_TIMEOUT):
                raise RuntimeError(f"flush() did not finish within {FLUSH_TIMEOUT}s")
            elapsed = time.perf_counter() - began
            spilled = harness.spilled(tc)
    return steps * len(KEYS) / elapsed, spilled


async def _rest(
    session: aiohttp.ClientSession, url: str, method: str, endpoint: str, **kw: Any
) -> dict[str, Any]:
    async with session.request(method, f"{url}/api/2.0/mlflow/{endpoint}", **kw) as reply:
        body = await reply.read()
        if reply.status >= 300:
            raise RuntimeError(f"{endpoint}: HTTP {reply.status}: {body[:200]!r}")
        return orjson.loads(body) if body.strip() else {}


async def ceiling_run(url: str, experiment: str, events: int, in_flight: int) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as session:
        found = await _rest(
            session, url, "GET", "experiments/get-by-name", params={"experiment_name": experiment}
        )
        experiment_id = found["experiment"]["experiment_id"]
        run = await _rest(
            session,
            url,
            "POST",
            "runs/create",
            json={"experiment_id": experiment_id, "run_name": f"ceiling-{in_flight}", "start_time": 0},
        )
        run_id = run["run"]["info"]["run_id"]
        now = time.time_ns() // 1_000_000
        metrics = [
            {"key": key, "value": 0.25 * i, "timestamp": now, "step": step}
            for step in range(events // len(KEYS))
            for i, key in enumerate(KEYS)
        ]
        bodies = [
            orjson.dumps({"run_id": run_id, "metrics": metrics[i : i + 1000]})
            for i in range(0, len(metrics), 1000)
        ]
        headers = {"Content-Type": "application/json"}
        queue = iter(bodies)

        async def sender() -> None:
            for body in queue:  # the shared iterator hands each body to exactly one sender
                await _rest(session, url, "POST", "runs/log-batch", data=body, headers=headers)

        began = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(in_flight))), FLUSH_TIMEOUT)
        elapsed = time.perf_counter() - began
        await _rest(session, url, "POST", "runs/update", json={"run_id": run_id, "status": "FINISHED"})
    return len(metrics) / elapsed


def measure(args: argparse.Namespace) -> harness.Figure:
    figure = harness.Figure("2_end_to_end", "Figure 2: end-to-end events/s into the MLflow server")
    harness.banner(figure, args)
    counts = COUNTS[args.scale]
    figure.params = {**counts, "keys_per_step": len(KEYS), "events_per_request": 1000}
    results: dict[str, list[float]] = {"tracklane": [], "c1": [], "c2": []}
    with harness.mlflow_server(args) as url:
        experiment = f"bench-end-to-end-{uuid.uuid4().hex[:8]}"
        for _ in range(counts["repeats"]):
            rate, spilled = tracklane_run(url, experiment, counts["events"])
            results["tracklane"].append(rate)
            if spilled:
                figure.note(f"tracklane: {spilled:,} events went through the local journal (outage spill)")
            results["c1"].append(asyncio.run(ceiling_run(url, experiment, counts["events"], 1)))
            results["c2"].append(asyncio.run(ceiling_run(url, experiment, counts["events"], 2)))
    n = f"{counts['events']:,}"
    figure.add(
        "tracklane_events_per_s",
        f"tracklane end to end, {n} events",
        harness.median(results["tracklane"]),
        "events/s",
    )
    figure.add(
        "ceiling_1_in_flight_events_per_s",
        f"server ceiling: pre-encoded log-batch, 1 in flight, {n} events",
        harness.median(results["c1"]),
        "events/s",
    )
    figure.add(
        "ceiling_2_in_flight_events_per_s",
        f"server ceiling: pre-encoded log-batch, 2 in flight, {n} events",
        harness.median(results["c2"]),
        "events/s",
    )
    figure.params["all_runs_events_per_s"] = results
    return figure


def main() -> None:
    args = harness.parse_args(__doc__)
    measure(args).finish(args)


if __name__ == "__main__":
    main()
