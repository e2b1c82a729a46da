"""Async face: how long the caller's event loop stalls while 100,000 events drain to the server.

A heartbeat task sleeps 1 ms at a time on the same loop as AsyncTrackingClient's worker; every
gap beyond that 1 ms is time the loop could not serve anyone else (a web handler, say).
"""

from __future__ import annotations

import asyncio
import statistics
import time

from tracklane import AsyncTrackingClient
from tracklane._bench.harness import mlflow_server, parse_args

EVENTS = {"smoke": 2_000, "quick": 20_000, "full": 100_000}


async def measure(url: str, n: int) -> dict[str, float]:
    stalls: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stalls.append(max(0.0, now - last - 0.001))
            last = now

    async with AsyncTrackingClient(api_host=url) as tc:
        await tc.set_experiment(f"bench-async-stall-{time.time_ns()}")
        async with tc.start_run(log_system_metrics=False):
            started = time.perf_counter()
            for step in range(n):
                tc.log_metric("drain", step, step=step)
            logging_s = time.perf_counter() - started
            beating = asyncio.ensure_future(heartbeat())
            drain_started = time.perf_counter()
            await tc.flush()
            drain_s = time.perf_counter() - drain_started
            stop.set()
            await beating
    stalls.sort()
    return {
        "events": n,
        "caller_us_per_call": logging_s / n * 1e6,
        "drain_events_per_s": n / drain_s,
        "worst_stall_ms": stalls[-1] * 1000,
        "p99_stall_ms": stalls[int(len(stalls) * 0.99)] * 1000,
        "median_stall_ms": statistics.median(stalls) * 1000,
        "heartbeats": len(stalls),
    }


def main() -> None:
    args = parse_args(__doc__)
    with mlflow_server(args) as url:
        result = asyncio.run(measure(url, EVENTS[args.scale]))
    for name, value in result.items():
        print(f"{name:>20}: {value:,.3f}" if isinstance(value, float) else f"{name:>20}: {value:,}")


if __name__ == "__main__":
    main()
