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

The MLflow faces (issue 11) run the same schedule in processes of their own, after
``TrackingClient``: ``tracklane.mlflow.log_metric`` in a run started with ``mlflow.start_run()``,
and ``tracklane.MlflowClient(url).log_metric(run_id, ...)``, each for as many calls as
``TrackingClient.log_metric`` makes, into a run of its own on the same server. Beside them, in the
same run of this script, MLflow's own ``mlflow.log_metric(..., synchronous=False)``. Its queue
sends one request per call (~40-80 events/s here), so it makes fewer calls (``mlflow_calls``) to
keep its drain short; its cost per call is its own Python path (hundreds of us), which a longer
queue does not change (``Queue.put``). Every one of these measurements ends with its events
delivered (``flush()``, ``flush_async_logging()``) and its run ended before the next starts, so no
two overlap on the server.

The peers (W&B offline, trackio local), when installed, run the same schedule, each in a process
of its own.
"""

from __future__ import annotations

import argparse
import collections
import gc
import importlib.util
import json
import logging
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from . import harness

#: Events per second that every loop produces: a busy training loop (10 metrics at 200 steps/s),
#: and below what a local MLflow server ingests (~6,000 events/s), so the worker never idles long.
RATE = 2_000
#: Events made back to back in one slot, then the loop's own work (a spin) to the next slot.
SLOT = 200
#: Events per timed group: 10 ``log_metric`` calls, one ``log_metrics`` of 10 keys, 10 ``set_tag``.
GROUP = 10
#: Seconds of each phase. The floor runs before tracklane and, but at smoke scale, after it too
#: (drift on a shared machine then shifts both alike). ``settle_s`` bounds the unmeasured flush
#: before each phase and the drain after the last. The MLflow faces make as many ``log_metric``
#: calls as ``TrackingClient`` (``log_metric_s``); MLflow's own ``synchronous=False`` makes
#: ``mlflow_calls`` (a multiple of ``SLOT``), and ``mlflow_drain_s`` bounds each wait for its queue.
COUNTS = {
    "smoke": {
        "log_metric_s": 0.5,
        "log_metrics_s": 0.3,
        "set_tag_s": 0.3,
        "floor_s": 0.5,
        "floor_runs": 1,
        "settle_s": 10.0,
        "mlflow_calls": 200,
        "mlflow_drain_s": 30.0,
    },
    "quick": {
        "log_metric_s": 2.5,
        "log_metrics_s": 1.5,
        "set_tag_s": 1.0,
        "floor_s": 1.0,
        "floor_runs": 2,
        "settle_s": 10.0,
        "mlflow_calls": 400,
        "mlflow_drain_s": 30.0,
    },
    "full": {
        "log_metric_s": 10.0,
        "log_metrics_s": 5.0,
        "set_tag_s": 5.0,
        "floor_s": 5.0,
        "floor_runs": 2,
        "settle_s": 30.0,
        "mlflow_calls": 2_000,
        "mlflow_drain_s": 120.0,
    },
}
#: Unmeasured ``log_metric`` calls before a face's phase (first-use key checks, the connection).
WARMUP_CALLS = 20
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
    tc = harness.client(url)  # default settings: the buffer, batching and policy a user gets
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
    # Not measured: the last phase's events reach the server before the next measurement starts.
    out["drained"] = bool(tc.flush(timeout=counts["settle_s"]))
    tc.close(timeout=1.0)
    return out


def bounded(fn: Callable[[], object], timeout: float) -> bool:
    """Run ``fn`` on a daemon thread; False if it is still running after ``timeout`` seconds
    (MLflow's ``flush_async_logging`` has no timeout of its own)."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


def engine_stats(face: Any) -> Callable[[], dict[str, float]] | None:
    """The counters of the engine behind an MLflow face, which has no ``stats()`` of its own: a
    benchmark's look inside (None when the face is built otherwise, and the count is not reported)."""
    engine = getattr(getattr(face, "_session", None), "engine", None)
    stats = getattr(engine, "stats", None)
    return stats if callable(stats) else None


def face_phase(
    calls: Callable[[int, int], None],
    seconds: float,
    flush: Callable[[float], bool],
    bound_s: float,
    stats: Callable[[], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """One ``log_metric`` phase of a face, on the schedule of ``paced``, while its worker delivers.

    Unmeasured: warm-up calls, then a flush, so the phase starts with nothing in flight; and after
    it the drain, so the next measurement starts with none of this one's events left (``flush``
    waits at most ``bound_s``; ``settled``/``drained`` say whether it finished).
    """
    calls(0, WARMUP_CALLS)
    settled = flush(bound_s)
    before = stats() if stats is not None else {}
    cpu0, caller_cpu0, began = time.process_time(), time.thread_time(), time.perf_counter()
    per_call = paced(calls, GROUP, 1, seconds)
    cpu1, caller_cpu1, called = time.process_time(), time.thread_time(), time.perf_counter()
    after = stats() if stats is not None else {}
    drained = flush(bound_s)
    ended = time.perf_counter()
    delivered = int(after.get("delivered", 0)) - int(before.get("delivered", 0)) if stats else None
    return {
        "per_call_us": per_call,
        "calls": len(per_call) * GROUP,
        "seconds": called - began,
        "drain_s": ended - called,
        "settled": settled,
        "drained": drained,
        "delivered": delivered,  # during the phase; None when the face's counters are not reachable
        "others_cpu_s": (cpu1 - cpu0) - (caller_cpu1 - caller_cpu0),
    }


def tracklane_mlflow_child(url: str, counts: dict[str, float]) -> dict[str, Any]:
    """In a fresh process: ``tracklane.mlflow.log_metric`` in an active run on ``url``."""
    import tracklane.mlflow as mlflow

    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(f"bench-caller-cost-fluent-{uuid.uuid4().hex[:8]}")
    mlflow.start_run(run_name="caller-cost-fluent", log_system_metrics=False)
    log_metric = mlflow.log_metric

    def calls(first: int, count: int) -> None:
        for i in range(first, first + count):
            log_metric("loss", 0.5, i)

    stats = engine_stats(getattr(mlflow, "_fluent", None))
    out = face_phase(
        calls, counts["log_metric_s"], lambda t: mlflow.flush(timeout=t), counts["settle_s"], stats
    )
    mlflow.end_run()
    return out


def tracklane_mlflow_client_child(url: str, counts: dict[str, float]) -> dict[str, Any]:
    """In a fresh process: ``tracklane.MlflowClient(url).log_metric(run_id, ...)``."""
    from tracklane import MlflowClient

    client = MlflowClient(url)
    experiment_id = client.create_experiment(f"bench-caller-cost-client-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment_id, run_name="caller-cost-client").info.run_id
    log_metric = client.log_metric

    def calls(first: int, count: int) -> None:
        for i in range(first, first + count):
            log_metric(run_id, "loss", 0.5, step=i)

    out = face_phase(
        calls,
        counts["log_metric_s"],
        lambda t: client.flush(timeout=t),
        counts["settle_s"],
        engine_stats(client),
    )
    client.set_terminated(run_id)
    return out


def mlflow_env() -> dict[str, str]:
    """MLflow's client in a child: no usage telemetry (no traffic beyond 127.0.0.1), no URL prints."""
    return {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }


def mlflow_child(url: str, counts: dict[str, float]) -> dict[str, Any]:
    """In a fresh process: MLflow's ``mlflow.log_metric(..., synchronous=False)`` in an active run,
    its async queue delivering to ``url`` meanwhile; the figure counts once the queue is flushed."""
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    import mlflow

    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(f"bench-caller-cost-mlflow-{uuid.uuid4().hex[:8]}")
    mlflow.start_run(run_name="caller-cost-mlflow-async", log_system_metrics=False)
    log_metric = mlflow.log_metric

    def calls(first: int, count: int) -> None:
        for i in range(first, first + count):
            log_metric("loss", 0.5, step=i, synchronous=False)

    def flush(timeout: float) -> bool:
        return bounded(mlflow.flush_async_logging, timeout)

    out = face_phase(calls, counts["mlflow_calls"] / RATE, flush, counts["mlflow_drain_s"])
    if out["drained"]:  # else the queue is still busy; ending the run would wait on it unbounded
        mlflow.end_run()
    return out


def peer_child(name: str, seconds: float) -> dict[str, float]:
    """In a fresh process with the peer's environment: one-metric and 10-key calls, us/call."""
    if name == "wandb":
        import wandb

        run = wandb.init(project="tracklane-bench", name="caller-cost")
        log = run.log
        one: Callable[[int], object] = lambda i: log({"loss": 0.5}, step=i)  # noqa: E731
        ten: Callable[[int], object] = lambda i: log(KEYS10, step=i + 10_000_000)  # noqa: E731
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
    return {"one": harness.median(single), "ten": harness.median(multi)}


def measure_floor(counts: dict[str, float], figure: harness.Figure) -> list[float]:
    got = harness.child(__file__, "floor", counts["floor_s"])
    if got["threads"] != 1:
        figure.note(f"the floor's process ran {got['threads']} threads, not 1")
    per_call: list[float] = got["per_call_us"]
    return per_call


def measure(args: argparse.Namespace) -> harness.Figure:
    figure = harness.Figure("1_caller_cost", "Figure 1: caller cost per logging call")
    harness.banner(figure, args)
    counts = COUNTS[args.scale]
    figure.params = {**counts, "events_per_s": RATE, "events_per_timed_group": GROUP}
    spec: dict[str, Any] = {"url": "", "counts": counts}
    faces: dict[str, dict[str, Any]] = {}
    with harness.mlflow_server(args) as url:
        spec["url"] = url
        floor = measure_floor(counts, figure)  # before tracklane, and after it below
        got = harness.child(__file__, "tracklane", spec, timeout=120)
        # One after the other, each in a fresh process that ends with its events delivered.
        for face in ("tracklane_mlflow", "tracklane_mlflow_client"):
            faces[face] = harness.child(__file__, face, spec, timeout=120)
        if importlib.util.find_spec("mlflow") is None:
            figure.skip(
                "MLflow log_metric(synchronous=False): mlflow is not installed "
                "(`pip install 'tracklane[bench]'` adds it); no MLflow row beside the MLflow faces"
            )
        else:
            bound = 2 * float(counts["mlflow_drain_s"]) + 60  # two bounded flushes, import, run
            try:
                faces["mlflow"] = harness.child(__file__, "mlflow", spec, env=mlflow_env(), timeout=bound)
            except RuntimeError as exc:  # MLflow's failure is noted; it does not cost tracklane's rows
                figure.skip(f"MLflow log_metric(synchronous=False) failed: {str(exc).splitlines()[-1]}")
        for _ in range(int(counts["floor_runs"]) - 1):
            floor += measure_floor(counts, figure)
    floor_us = harness.median(floor)
    figure.add(
        "deque_floor_us",
        "floor, nothing else running: deque.append of a time_ns-stamped 4-tuple (median)",
        floor_us,
        "us/call",
    )
    figure.add(
        "deque_floor_p99_us", "floor, nothing else running: p99 of 10-call groups", p99(floor), "us/call"
    )
    drained = got.pop("drained", True)
    metric = got["log_metric"]
    figure.add(
        "tracklane_log_metric_us",
        "tracklane log_metric, worker delivering to the server meanwhile (median)",
        harness.median(metric["per_call_us"]),
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
            harness.median(metric["per_call_us"]) + worker_us,
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
        harness.median(got["log_metrics_10"]["per_call_us"]),
        "us/call",
    )
    figure.add(
        "tracklane_set_tag_us",
        "tracklane set_tag, worker delivering meanwhile (median)",
        harness.median(got["set_tag"]["per_call_us"]),
        "us/call",
    )
    figure.params["tracklane_phases"] = {
        name: {k: v for k, v in phase.items() if k != "per_call_us"} for name, phase in got.items()
    }
    if not drained:
        figure.note(f"TrackingClient: its last events were still undelivered after {counts['settle_s']:.0f}s")
    add_faces(figure, faces, counts)
    for peer, label in (("wandb", "W&B offline"), ("trackio", "trackio local")):
        missing = harness.peer_available(peer, args.scale)
        if missing:
            figure.skip(missing)
            continue
        with tempfile.TemporaryDirectory(prefix=f"bench-{peer}-") as tmp:
            try:
                spec = {"peer": peer, "seconds": PEER_SECONDS[args.scale]}
                peer_got = harness.child(__file__, "peer", spec, env=harness.peer_env(tmp))
            except RuntimeError as exc:  # an optional peer that breaks is skipped, not fatal
                figure.skip(f"{peer} failed: {str(exc).splitlines()[-1]}")
                continue
        figure.add(f"{peer}_log_1_us", f"{label} log (1 metric)", peer_got["one"], "us/call")
        figure.add(f"{peer}_log_10_us", f"{label} log (10 metrics)", peer_got["ten"], "us/call")
    return figure


FACES = {  # child: (key prefix, label)
    "tracklane_mlflow": ("tracklane_mlflow_log_metric", "tracklane.mlflow.log_metric (fluent, active run)"),
    "tracklane_mlflow_client": (
        "tracklane_mlflow_client_log_metric",
        "tracklane MlflowClient.log_metric(run_id, ...)",
    ),
    "mlflow": ("mlflow_async_log_metric", "MLflow mlflow.log_metric(synchronous=False)"),
}


def add_faces(figure: harness.Figure, faces: dict[str, dict[str, Any]], counts: dict[str, float]) -> None:
    """The MLflow faces' rows, and MLflow's own beside them: median and p99 per call."""
    for face, phase in faces.items():
        key, label = FACES[face]
        worker = "its async queue" if face == "mlflow" else "worker"
        calls = f"{phase['calls']:,} calls"
        figure.add(
            f"{key}_us",
            f"{label}, {worker} delivering meanwhile ({calls}, median)",
            harness.median(phase["per_call_us"]),
            "us/call",
        )
        figure.add(
            f"{key}_p99_us",
            f"{label}, {worker} delivering meanwhile: p99 of 10-call groups",
            p99(phase["per_call_us"]),
            "us/call",
        )
        bound = counts["mlflow_drain_s"] if face == "mlflow" else counts["settle_s"]
        if not phase["settled"] or not phase["drained"]:
            when = "before" if not phase["settled"] else "after"
            figure.note(f"{label}: delivery {when} the phase did not finish within {bound:.0f}s")
        if phase["delivered"] == 0:
            figure.note(f"{label}: the worker delivered nothing during the phase")
    figure.params["face_phases"] = {
        face: {k: v for k, v in phase.items() if k != "per_call_us"} for face, phase in faces.items()
    }


def main() -> None:
    args = harness.parse_args(__doc__)
    if args.child == "floor":
        harness.child_result(args, floor_child(float(json.loads(args.child_arg))))
    if args.child == "tracklane":
        spec = json.loads(args.child_arg)
        harness.child_result(args, tracklane_child(spec["url"], spec["counts"]))
    children = {
        "tracklane_mlflow": tracklane_mlflow_child,
        "tracklane_mlflow_client": tracklane_mlflow_client_child,
        "mlflow": mlflow_child,
    }
    if args.child in children:
        spec = json.loads(args.child_arg)
        harness.child_result(args, children[args.child](spec["url"], spec["counts"]))
    if args.child == "peer":
        spec = json.loads(args.child_arg)
        harness.child_result(args, peer_child(spec["peer"], spec["seconds"]))
    measure(args).finish(args)


if __name__ == "__main__":
    main()
