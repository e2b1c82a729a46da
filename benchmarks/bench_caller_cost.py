"""Figure 1: what one logging call costs the caller, in microseconds, next to the machine's floor.

The floor is the least any buffered client can do: append a 4-tuple stamped with
``time.time_ns()`` to a ``collections.deque``. tracklane is measured against the real MLflow
server with its worker draining meanwhile (so the worker's share of the GIL is in the figure);
the peers (W&B offline, trackio local), when installed, each in a process of their own.
Medians over repeats; each repeat is one loop of N calls divided by N.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
import uuid

import _common

COUNTS = {  # calls per repeat (log_metric, log_metrics of 10 keys, set_tag), repeats, peer calls
    "smoke": {"n": 2_000, "n10": 200, "repeats": 1, "peer_n": 200},
    "quick": {"n": 20_000, "n10": 2_000, "repeats": 2, "peer_n": 1_000},
    "full": {"n": 20_000, "n10": 2_000, "repeats": 7, "peer_n": 5_000},
}
KEYS10 = {f"metric_{i}": 0.5 + i for i in range(10)}


def floor_loop(n: int) -> None:
    buf: collections.deque[tuple[str, float, int, int]] = collections.deque()
    append, time_ns = buf.append, time.time_ns
    for i in range(n):
        append(("loss", 0.5, time_ns(), i))


def measure_tracklane(url: str, counts: dict[str, int], figure: _common.Figure) -> None:
    n, n10, repeats = counts["n"], counts["n10"], counts["repeats"]
    # A buffer larger than everything logged here: the figure is the hot path, not backpressure.
    tc = _common.client(url, max_buffer=10_000_000)
    tc.set_experiment(f"bench-caller-cost-{uuid.uuid4().hex[:8]}")
    tc.start_run(run_name="caller-cost")
    log_metric, log_metrics, set_tag = tc.log_metric, tc.log_metrics, tc.set_tag

    def metric_loop(n: int) -> None:
        for i in range(n):
            log_metric("loss", 0.5, i)

    def metrics_loop(n: int) -> None:
        for i in range(n):
            log_metrics(KEYS10, i)

    def tag_loop(n: int) -> None:
        for i in range(n):
            set_tag("phase", "train" if i & 1 else "eval")

    loops = {"floor": (floor_loop, n), "metric": (metric_loop, n), "metrics": (metrics_loop, n10)}
    loops["tag"] = (tag_loop, n)
    for fn, count in loops.values():  # warm up: first-use key checks, caches
        _common.timed_calls(fn, min(count, 1_000))
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):  # interleaved, so drift on a noisy machine hits all alike
        for name, (fn, count) in loops.items():
            times[name].append(_common.timed_calls(fn, count) / count * 1e6)
    # Not measured, and bounded: the events need not all reach the server for this figure.
    tc.close(timeout=1.0)
    figure.add(
        "deque_floor_us",
        "floor: deque.append of a time_ns-stamped 4-tuple",
        _common.median(times["floor"]),
        "us/call",
    )
    figure.add("tracklane_log_metric_us", "tracklane log_metric", _common.median(times["metric"]), "us/call")
    figure.add(
        "tracklane_log_metrics_10_us",
        "tracklane log_metrics (10 keys)",
        _common.median(times["metrics"]),
        "us/call",
    )
    figure.add("tracklane_set_tag_us", "tracklane set_tag", _common.median(times["tag"]), "us/call")


def peer_child(name: str, counts: dict[str, int]) -> dict[str, float]:
    """In a fresh process with the peer's environment: one-metric and 10-key calls, us/call."""
    n, repeats = counts["peer_n"], counts["repeats"]
    if name == "wandb":
        import wandb

        run = wandb.init(project="tracklane-bench", name="caller-cost")
        log = run.log
        one = lambda i: log({"loss": 0.5}, step=i)  # noqa: E731
        ten = lambda i: log(KEYS10, step=i + n)  # noqa: E731
        finish = run.finish
    else:
        import trackio

        trackio.init(project="tracklane-bench", name="caller-cost", auto_log_cpu=False, auto_log_gpu=False)
        one = lambda i: trackio.log({"loss": 0.5}, step=i)  # noqa: E731
        ten = lambda i: trackio.log(KEYS10, step=i + n)  # noqa: E731
        finish = trackio.finish

    def loop_one(k: int) -> None:
        for i in range(k):
            one(i)

    def loop_ten(k: int) -> None:
        for i in range(k):
            ten(i)

    _common.timed_calls(loop_one, min(n, 200))
    single = [_common.timed_calls(loop_one, n) / n * 1e6 for _ in range(repeats)]
    multi = [_common.timed_calls(loop_ten, n) / n * 1e6 for _ in range(repeats)]
    finish()
    return {"one": _common.median(single), "ten": _common.median(multi)}


def measure(args: argparse.Namespace) -> _common.Figure:
    figure = _common.Figure("1_caller_cost", "Figure 1: caller cost per logging call")
    _common.banner(figure, args)
    counts = COUNTS[args.scale]
    figure.params = {**counts, "metric_keys_per_log_metrics": 10}
    with _common.mlflow_server(args) as url:
        measure_tracklane(url, counts, figure)
    for peer, label in (("wandb", "W&B offline"), ("trackio", "trackio local")):
        missing = _common.peer_available(peer, args.scale)
        if missing:
            figure.skip(missing)
            continue
        with tempfile.TemporaryDirectory(prefix=f"bench-{peer}-") as tmp:
            try:
                got = _common.child(
                    __file__, "peer", {"peer": peer, "counts": counts}, env=_common.peer_env(tmp)
                )
            except RuntimeError as exc:  # an optional peer that breaks is skipped, not fatal
                figure.skip(f"{peer} failed: {str(exc).splitlines()[-1]}")
                continue
        figure.add(f"{peer}_log_1_us", f"{label} log (1 metric)", got["one"], "us/call")
        figure.add(f"{peer}_log_10_us", f"{label} log (10 metrics)", got["ten"], "us/call")
    return figure


def main() -> None:
    args = _common.parse_args(__doc__)
    if args.child == "peer":
        spec = json.loads(args.child_arg)
        _common.child_result(args, peer_child(spec["peer"], spec["counts"]))
    measure(args).finish(args)


if __name__ == "__main__":
    main()
