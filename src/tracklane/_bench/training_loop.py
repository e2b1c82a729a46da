"""Figure 5: training-loop overhead, the wall time a loop of ~1 ms CPU steps loses to logging.

Each step does ~1 ms of pure-Python work (it holds the GIL, as a data-loading or Python-heavy step
does: the worst case for a client whose worker thread needs the GIL too) and logs 10 metrics.
Each client runs in a fresh process: tracklane (``log_metrics``), MLflow ``log_metrics(...,
synchronous=False)``, and the peers when installed (W&B offline, trackio local). In that process
the same loop runs without logging before (and, once the client has drained, after) the loop
with logging: a paired baseline, so load from other processes on a shared machine shifts both
alike. The baseline before runs before the client exists, with nothing else in the process; the
logged loop starts once the client's warm-up events are delivered. The figure is the loop's wall
time; the time to drain what is still buffered after the loop is reported beside it, bounded: a
client still draining then is reported, not waited for.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from . import harness

COUNTS = {
    "smoke": {"steps": 100, "repeats": 1, "drain_bound_s": 10.0},
    "quick": {"steps": 300, "repeats": 1, "drain_bound_s": 1.0},
    "full": {"steps": 5_000, "repeats": 3, "drain_bound_s": 15.0},
}
KEYS = [f"metric_{i}" for i in range(10)]


def work(k: int) -> int:
    x = 0
    for i in range(k):
        x += i * i
    return x


def calibrate(target_s: float = 0.001) -> int:
    k = 10_000
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(20):
            work(k)
        took = (time.perf_counter() - began) / 20
        k = max(1, int(k * target_s / took))
    return k


def bounded(fn: Callable[[], object], timeout: float) -> float | None:
    """Seconds ``fn`` took, or None if still running after ``timeout`` (left on a daemon thread)."""
    began = time.perf_counter()
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout)
    return None if thread.is_alive() else time.perf_counter() - began


def open_client(
    variant: str, url: str
) -> tuple[Callable[[dict[str, float], int], object], Callable[[], object], Callable[[], object], Any]:
    """The variant's client, started: (log, settle, drain, sink); ``settle`` waits until what was
    logged so far is delivered (where the client can say so), ``drain`` ends the run."""
    sink: Any = None
    settle: Callable[[], object] = lambda: None  # noqa: E731
    if variant in ("tracklane", "tracklane_sink"):
        if variant == "tracklane_sink":
            from .sink import SinkServer

            sink = SinkServer().start()
            url = sink.url
        tc = harness.client(url)
        tc.set_experiment("bench-training-loop")
        tc.start_run(run_name=f"tracklane-{uuid.uuid4().hex[:6]}", log_system_metrics=False)
        return tc.log_metrics, tc.flush, tc.end_run, sink
    if variant == "mlflow":
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        import mlflow

        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("bench-training-loop")
        mlflow.start_run(run_name=f"mlflow-async-{uuid.uuid4().hex[:6]}")
        log = lambda metrics, step: mlflow.log_metrics(metrics, step=step, synchronous=False)  # noqa: E731
        # Not settled: flush_async_logging shuts MLflow's async queue down for good.
        return log, settle, mlflow.flush_async_logging, sink
    if variant == "wandb":
        import wandb

        run = wandb.init(project="tracklane-bench", name="training-loop")
        return lambda metrics, step: run.log(metrics, step=step), settle, run.finish, sink
    if variant == "trackio":
        import trackio

        trackio.init(project="tracklane-bench", name="training-loop", auto_log_cpu=False, auto_log_gpu=False)
        return lambda metrics, step: trackio.log(metrics, step=step), settle, trackio.finish, sink
    raise ValueError(variant)


def variant_child(variant: str, url: str, k: int, steps: int, drain_bound: float) -> dict[str, Any]:
    """One loop in this (fresh) process; returns wall seconds of the loop and of the drain."""
    values = {key: 0.0 for key in KEYS}
    no_log: Callable[[dict[str, float], int], object] = lambda metrics, step: None  # noqa: E731

    def loop(fn: Callable[[dict[str, float], int], object], first: int, count: int) -> tuple[float, float]:
        cpu_began, began = time.process_time(), time.perf_counter()
        for step in range(first, first + count):
            work(k)
            for i, key in enumerate(KEYS):
                values[key] = step * 0.001 + i
            fn(values, step)
        return time.perf_counter() - began, time.process_time() - cpu_began

    loop(no_log, 0, 20)  # warm up the loop itself
    # The baseline before runs with nothing else in the process: no client yet, so no worker
    # thread still delivering the warm-up's events, which would slow the baseline and flatter
    # the client's overhead.
    before = loop(no_log, 0, steps)
    log, settle, drain, sink = open_client(variant, url)
    loop(log, 0, 20)  # warm up the client: first-use checks, connections
    bounded(settle, drain_bound)  # the logged loop starts with the warm-up's events delivered
    logged = loop(log, 20, steps)
    drain_s = bounded(drain, drain_bound)
    # The baseline after counts only once the client is idle again; a client still draining
    # would slow it and flatter its own overhead.
    after = loop(no_log, 0, steps) if drain_s is not None else None
    baselines = [before] if after is None else [before, after]
    if sink is not None:
        sink.stop()
    return {
        "loop_s": logged[0],
        "cpu_s": logged[1],
        "base_loop_s": sum(b[0] for b in baselines) / len(baselines),
        "base_cpu_s": sum(b[1] for b in baselines) / len(baselines),
        "drain_s": drain_s,
    }


def measure(args: argparse.Namespace) -> harness.Figure:
    figure = harness.Figure(
        "5_training_loop", "Figure 5: training-loop overhead (~1 ms CPU step, 10 metrics)"
    )
    harness.banner(figure, args)
    counts = COUNTS[args.scale]
    k = calibrate()
    figure.params = {**counts, "metrics_per_step": len(KEYS), "work_iterations_per_step": k}
    # Into the sink: the client's own cost without the server's CPU on these cores (full runs).
    variants = ["tracklane"] if args.scale == "quick" else ["tracklane", "tracklane_sink"]
    if importlib.util.find_spec("mlflow") is None:
        figure.skip("mlflow is not installed; `pip install 'tracklane[bench]'` adds it")
    else:
        variants.append("mlflow")
    for peer in ("wandb", "trackio"):
        missing = harness.peer_available(peer, args.scale)
        if missing:
            figure.skip(missing)
        else:
            variants.append(peer)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with harness.mlflow_server(args) as url, tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        for repeat in range(int(counts["repeats"])):
            for variant in variants:
                if repeat and not variant.startswith("tracklane"):
                    continue  # the peers' overheads are far from the target; tracklane's is not
                spec = {
                    "variant": variant,
                    "url": url,
                    "k": k,
                    "steps": counts["steps"],
                    "drain": counts["drain_bound_s"],
                }
                try:
                    runs[variant].append(harness.child(__file__, "loop", spec, env=harness.peer_env(tmp)))
                except RuntimeError as exc:
                    if variant.startswith("tracklane") or variant == "mlflow":
                        raise
                    figure.skip(f"{variant} failed: {str(exc).splitlines()[-1]}")
    variants = [v for v in variants if runs[v]]
    steps = counts["steps"]
    base = harness.median([r["base_loop_s"] for rs in runs.values() for r in rs])
    figure.add("no_logging_loop_s", f"no logging: {steps:,} steps", base, "s")
    labels = {
        "tracklane": "tracklane",
        "tracklane_sink": "tracklane into the sink (no server CPU on this machine)",
        "mlflow": "MLflow synchronous=False",
        "wandb": "W&B offline",
        "trackio": "trackio local",
    }
    for variant in variants:
        label = labels[variant]
        got = runs[variant]
        wall = harness.median([r["loop_s"] for r in got])
        figure.add(f"{variant}_loop_s", f"{label}: {steps:,} steps", wall, "s")
        overheads = [(r["loop_s"] / r["base_loop_s"] - 1) * 100 for r in got]
        cpu = harness.median([(r["cpu_s"] / r["base_cpu_s"] - 1) * 100 for r in got])
        spread = (
            f" (median of {len(got)}: {min(overheads):.1f} .. {max(overheads):.1f})" if len(got) > 1 else ""
        )
        figure.add(
            f"{variant}_overhead_pct",
            f"{label}: wall-time overhead vs no logging{spread}",
            harness.median(overheads),
            "%",
        )
        figure.add(f"{variant}_cpu_overhead_pct", f"{label}: process CPU overhead vs no logging", cpu, "%")
        drains = [r["drain_s"] for r in got]
        if all(d is not None for d in drains):
            figure.add(
                f"{variant}_drain_after_loop_s", f"{label}: drain after the loop", harness.median(drains), "s"
            )
        else:
            figure.note(
                f"{label}: still draining {counts['drain_bound_s']:.0f}s after the loop; not waited for"
            )
    figure.params["runs"] = runs
    return figure


def main() -> None:
    args = harness.parse_args(__doc__)
    if args.child == "loop":
        spec = json.loads(args.child_arg)
        result = variant_child(spec["variant"], spec["url"], spec["k"], spec["steps"], spec["drain"])
        harness.child_result(args, result)
    measure(args).finish(args)


if __name__ == "__main__":
    main()
