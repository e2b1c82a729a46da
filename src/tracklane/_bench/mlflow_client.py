"""Figure 3: figures 1 and 2 for MLflow's own client, synchronous and with ``synchronous=False``.

Synchronous: ``MlflowClient.log_metric``, one request per call, so the caller cost is the
end-to-end figure too; measured over few calls (see ``params``). Asynchronous: the fluent
``mlflow.log_metric(..., synchronous=False)`` (one metric a call) and ``mlflow.log_metrics(10 keys,
synchronous=False)`` (the call pattern of figure 2): caller cost per call, and events/s from the
first call to the end of ``mlflow.flush_async_logging()``, a wait bounded here by a timeout.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

from . import harness

COUNTS = {  # synchronous calls, async one-metric calls, async 10-key steps
    "smoke": {"sync_calls": 5, "async_calls": 10, "async_steps_10": 5},
    "quick": {"sync_calls": 10, "async_calls": 50, "async_steps_10": 20},
    "full": {"sync_calls": 100, "async_calls": 1_000, "async_steps_10": 300},
}
KEYS10 = {f"metric_{i}": 0.5 + i for i in range(10)}
DRAIN_TIMEOUT = 120.0


def bounded(fn: Callable[[], object], timeout: float) -> bool:
    """Run ``fn`` on a daemon thread; False if it is still running after ``timeout`` seconds
    (MLflow's flush has no timeout of its own)."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


def measure(args: argparse.Namespace) -> harness.Figure:
    figure = harness.Figure("3_mlflow_client", "Figure 3: MLflow's client, synchronous and synchronous=False")
    harness.banner(figure, args)
    counts = COUNTS[args.scale]
    figure.params = dict(counts)
    if importlib.util.find_spec("mlflow") is None:
        figure.skip("mlflow is not installed; `pip install 'tracklane[bench]'` adds it")
        return figure
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow

    with harness.mlflow_server(args) as url:
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment(f"bench-mlflow-client-{uuid.uuid4().hex[:8]}")
        client = mlflow.MlflowClient(url)

        with mlflow.start_run(run_name="sync") as run:
            run_id = run.info.run_id
            client.log_metric(run_id, "warmup", 0.5, step=0)
            n = counts["sync_calls"]
            began = time.perf_counter()
            for i in range(n):
                client.log_metric(run_id, "loss", 0.5, step=i)
            per_call = (time.perf_counter() - began) / n
        figure.add(
            "mlflow_sync_log_metric_ms",
            f"MLflow log_metric synchronous ({n} calls)",
            per_call * 1e3,
            "ms/call",
        )
        figure.add("mlflow_sync_events_per_s", "MLflow synchronous end to end", 1 / per_call, "events/s")

        phases: tuple[tuple[str, str, int, int, Callable[[int], object]], ...] = (
            (
                "log_metric",
                "log_metric",
                counts["async_calls"],
                1,
                lambda i: mlflow.log_metric("loss", 0.5, step=i, synchronous=False),
            ),
            (
                "log_metrics (10 keys)",
                "log_metrics_10",
                counts["async_steps_10"],
                10,
                lambda i: mlflow.log_metrics(KEYS10, step=i, synchronous=False),
            ),
        )
        for label, key, n, per_call_events, call in phases:
            with mlflow.start_run(run_name=f"async-{key}"):
                call(0)
                mlflow.flush_async_logging()
                began = time.perf_counter()
                for i in range(1, n + 1):
                    call(i)
                called = time.perf_counter()
                drained = bounded(mlflow.flush_async_logging, DRAIN_TIMEOUT)
                ended = time.perf_counter()
                if not drained:
                    figure.note(
                        f"MLflow async {label}: flush_async_logging() still busy after {DRAIN_TIMEOUT:.0f}s"
                    )
                    os._exit(1)
            figure.add(
                f"mlflow_async_{key}_us",
                f"MLflow {label} synchronous=False",
                (called - began) / n * 1e6,
                "us/call",
            )
            figure.add(
                f"mlflow_async_{key}_events_per_s",
                f"MLflow {label} synchronous=False end to end ({n * per_call_events:,} events)",
                n * per_call_events / (ended - began),
                "events/s",
            )
    return figure


def main() -> None:
    args = harness.parse_args(__doc__)
    measure(args).finish(args)
    # MLflow's exit hooks join its async queue without a timeout; everything is drained by now.


if __name__ == "__main__":
    main()
