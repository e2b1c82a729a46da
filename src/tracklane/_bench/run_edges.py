"""Figure 11: the edges of a run (issue 19): ending a tiny run, a sweep of small runs, ``set_terminated``.

Inside a long run tracklane's cost is an enqueue; at the edges of many short runs it is what
ending a run waits for. ``end_run`` must deliver the run's events and mark it finished before it
returns, so its floor is those round trips; these figures set it beside MLflow's own client on the
same server, in the same run of this script:

- ``end_run`` of a tiny run (``start_run``, ``log_params`` of 2 params, one ``log_metric``, then
  ``end_run`` timed): ``tracklane.mlflow``, ``tracklane.TrackingClient`` and MLflow's fluent
  ``mlflow.end_run`` (synchronous: its params and metric went out in their own calls already).
- A sweep of ``sweep_runs`` small runs (``start_run``, ``log_params`` of 3 params, one
  ``log_metric``, ``end_run``), timed from the first ``start_run`` to the last ``end_run`` returned:
  ``tracklane.mlflow`` against MLflow's synchronous fluent API.
- ``tracklane.MlflowClient.set_terminated`` of a run with nothing pending, against a raw
  ``runs/update`` round trip (``http.client``, one kept-alive connection with ``TCP_NODELAY``: the
  tightest the server allows); MLflow's ``MlflowClient.set_terminated`` beside them.

Each client runs in a process of its own (one warm-up run first, not timed), the clients taking
turns round by round in a rotating order so drift on a shared machine shifts them alike; each
figure is the median over every repetition. Afterwards every run is read back from the server: it
must be FINISHED and hold its params and metric, so a run end that skipped its work cannot pass for
a fast one. Lightning's end of ``fit`` is in figure 10 (``*_end_ms``), judged there.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import logging
import os
import socket
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

from . import harness

COUNTS = {
    "smoke": {"rounds": 1, "end_runs": 2, "sweep_runs": 5, "sweeps": 1, "terminations": 3},
    "quick": {"rounds": 1, "end_runs": 8, "sweep_runs": 60, "sweeps": 1, "terminations": 7},
    "full": {"rounds": 3, "end_runs": 10, "sweep_runs": 60, "sweeps": 1, "terminations": 20},
}
#: The longest one client's process may take (imports, warm-up, every repetition), seconds.
CHILD_TIMEOUT = {"smoke": 40.0, "quick": 40.0, "full": 120.0}
PARAMS = {"lr": 0.01, "batch": 32}
API = "/api/2.0/mlflow"


def child_env() -> dict[str, str]:
    """Every client's child alike: no usage telemetry (no traffic beyond 127.0.0.1), no system
    metrics, and MLflow's own default for the View-run lines, which both clients print at a run's
    end (MLflow reads the run for them first; ``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT`` would save
    MLflow that read, and tracklane does not read the variable)."""
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
    }
    env.pop("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", None)
    return env


def fluent_runs(mlflow: Any, counts: dict[str, int], tag: str) -> dict[str, Any]:
    """With a fluent module (``tracklane.mlflow`` or ``mlflow``): tiny runs' ``end_run`` timed, then
    whole sweeps timed; the runs made, for the check on the server."""
    experiment_id = mlflow.set_experiment(f"bench-edges-{tag}-{uuid.uuid4().hex[:8]}").experiment_id
    runs: list[str] = []
    run_s: list[float] = []

    def tiny(name: str) -> float:
        started = time.perf_counter()
        run = mlflow.start_run(run_name=name, log_system_metrics=False)
        mlflow.log_params(PARAMS)
        mlflow.log_metric("score", 0.5)
        began = time.perf_counter()
        mlflow.end_run()
        ended = time.perf_counter()
        runs.append(run.info.run_id)
        run_s.append(ended - started)
        return ended - began

    tiny("warm-up")
    end_s = [tiny(f"tiny-{i}") for i in range(counts["end_runs"])]
    del run_s[0]
    sweep_s = []
    for s in range(counts["sweeps"]):
        began = time.perf_counter()
        for i in range(counts["sweep_runs"]):
            run = mlflow.start_run(run_name=f"sweep-{s}-{i}", log_system_metrics=False)
            mlflow.log_params({"lr": 0.001 * (i + 1), "batch": 32, "seed": i})
            mlflow.log_metric("score", i / 100)
            mlflow.end_run()
            runs.append(run.info.run_id)
        sweep_s.append(time.perf_counter() - began)
    return {"experiment_id": experiment_id, "runs": runs, "end_s": end_s, "run_s": run_s, "sweep_s": sweep_s}


def tracklane_fluent_child(url: str, counts: dict[str, int]) -> dict[str, Any]:
    import tracklane.mlflow as mlflow

    mlflow.set_tracking_uri(url)
    return fluent_runs(mlflow, counts, "tracklane-fluent")


def mlflow_fluent_child(url: str, counts: dict[str, int]) -> dict[str, Any]:
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    import mlflow

    mlflow.set_tracking_uri(url)
    out = fluent_runs(mlflow, counts, "mlflow-fluent")
    out["runs_bare"] = []
    out["set_terminated_s"] = terminations(mlflow.MlflowClient(url), out["experiment_id"], counts, out)
    return out


def terminations(client: Any, experiment_id: str, counts: dict[str, int], out: dict[str, Any]) -> list[float]:
    """``client.set_terminated`` of fresh runs that have nothing pending, timed (one warm-up first)."""
    times = []
    for i in range(counts["terminations"] + 1):
        run_id = client.create_run(experiment_id, run_name=f"terminate-{i}").info.run_id
        began = time.perf_counter()
        client.set_terminated(run_id)
        times.append(time.perf_counter() - began)
        out["runs_bare"].append(run_id)
    return times[1:]


def tracklane_client_child(url: str, counts: dict[str, int]) -> dict[str, Any]:
    """``TrackingClient``'s tiny runs, then ``tracklane.MlflowClient.set_terminated``."""
    from tracklane import MlflowClient

    tc = harness.client(url)
    experiment_id = tc.set_experiment(f"bench-edges-tracklane-client-{uuid.uuid4().hex[:8]}").experiment_id
    runs: list[str] = []

    def tiny(name: str) -> float:
        run = tc.start_run(run_name=name, log_system_metrics=False)
        tc.log_params(PARAMS)
        tc.log_metric("score", 0.5)
        began = time.perf_counter()
        tc.end_run()
        took = time.perf_counter() - began
        runs.append(run.info.run_id)
        return took

    tiny("warm-up")
    out: dict[str, Any] = {"experiment_id": experiment_id, "runs": runs, "runs_bare": []}
    out["end_s"] = [tiny(f"tiny-{i}") for i in range(counts["end_runs"])]
    out["set_terminated_s"] = terminations(MlflowClient(url), experiment_id, counts, out)
    return out


def raw_child(url: str, counts: dict[str, int]) -> dict[str, Any]:
    """``runs/update`` straight to the REST API over one kept-alive ``http.client`` connection."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    connection.connect()
    # http.client writes the headers and the body apart: without TCP_NODELAY the body waits for the
    # server's delayed ACK of the headers (~40 ms on Linux), which would flatter every client.
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload)
        connection.request(
            "POST", f"{parts.path}{API}/{endpoint}", body=body, headers={"Content-Type": "application/json"}
        )
        reply = connection.getresponse()
        text = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"raw {endpoint}: HTTP {reply.status}: {text[:300]!r}")
        found: dict[str, Any] = json.loads(text or b"{}")
        return found

    experiment_id = post("experiments/create", {"name": f"bench-edges-raw-{uuid.uuid4().hex[:8]}"})[
        "experiment_id"
    ]
    runs: list[str] = []
    bare: list[str] = []

    def create(name: str, into: list[str]) -> str:
        info = post("runs/create", {"experiment_id": experiment_id, "run_name": name})["run"]["info"]
        into.append(info["run_id"])
        return str(info["run_id"])

    def end(run_id: str, params: dict[str, Any], score: float) -> None:
        now = int(time.time() * 1000)
        batch = {
            "run_id": run_id,
            "params": [{"key": k, "value": str(v)} for k, v in params.items()],
            "metrics": [{"key": "score", "value": score, "timestamp": now, "step": 0}],
        }
        post("runs/log-batch", batch)
        post("runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": now})

    end_s = []
    for i in range(counts["end_runs"] + 1):
        run_id = create(f"raw-tiny-{i}", runs)
        began = time.perf_counter()
        end(run_id, PARAMS, 0.5)
        end_s.append(time.perf_counter() - began)
    sweep_s = []
    for s in range(counts["sweeps"]):
        began = time.perf_counter()
        for i in range(counts["sweep_runs"]):
            end(create(f"raw-sweep-{s}-{i}", runs), {"lr": 0.001 * (i + 1), "batch": 32, "seed": i}, i / 100)
        sweep_s.append(time.perf_counter() - began)
    times = []
    for i in range(counts["terminations"] + 1):
        run_id = create(f"raw-terminate-{i}", bare)
        began = time.perf_counter()
        post("runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": int(time.time() * 1000)})
        times.append(time.perf_counter() - began)
    connection.close()
    return {
        "experiment_id": experiment_id,
        "runs": runs,
        "runs_bare": bare,
        "end_s": end_s[1:],
        "sweep_s": sweep_s,
        "set_terminated_s": times[1:],
    }


CHILDREN: dict[str, Callable[[str, dict[str, int]], dict[str, Any]]] = {
    "tracklane_fluent": tracklane_fluent_child,
    "tracklane_client": tracklane_client_child,
    "mlflow": mlflow_fluent_child,
    "raw": raw_child,
}


def check_runs(url: str, runs: list[str], *, logged: bool) -> list[str]:
    """What is wrong on the server with each run (not FINISHED; params or metric missing)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    wrong = []
    try:
        for run_id in runs:
            connection.request("GET", f"{parts.path}{API}/runs/get?run_id={run_id}")
            run = json.loads(connection.getresponse().read())["run"]
            status = run["info"]["status"]
            data = run.get("data", {})
            params = {p["key"] for p in data.get("params", ())}
            metrics = {m["key"] for m in data.get("metrics", ())}
            if status != "FINISHED":
                wrong.append(f"{run_id}: {status}")
            elif logged and (not set(PARAMS) <= params or "score" not in metrics):
                wrong.append(f"{run_id}: params {sorted(params)}, metrics {sorted(metrics)}")
    finally:
        connection.close()
    return wrong


def measure(args: argparse.Namespace) -> harness.Figure:
    figure = harness.Figure("11_run_edges", "Figure 11: the edges of a run: end_run, a sweep, set_terminated")
    harness.banner(figure, args)
    counts = COUNTS[args.scale]
    figure.params = dict(counts)
    names = list(CHILDREN)
    if importlib.util.find_spec("mlflow") is None:
        figure.skip("MLflow's client: mlflow is not installed; `pip install 'tracklane[bench]'` adds it")
        names.remove("mlflow")
    got: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    timeout = CHILD_TIMEOUT[args.scale]
    with harness.mlflow_server(args) as url:
        spec = {"url": url, "counts": counts}
        for round_ in range(counts["rounds"]):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                got[name].append(harness.child(__file__, name, spec, env=child_env(), timeout=timeout))
        wrong = []
        for name, results in got.items():
            for result in results:
                wrong += [f"{name} {line}" for line in check_runs(url, result["runs"], logged=True)]
                wrong += [
                    f"{name} {line}" for line in check_runs(url, result.get("runs_bare", []), logged=False)
                ]
    for line in wrong:
        figure.note(f"not as logged on the server after the run ended: {line}")
    checked = sum(len(r["runs"]) + len(r.get("runs_bare", [])) for rs in got.values() for r in rs)
    figure.params.update(runs_checked=checked, runs_wrong=len(wrong))

    def pooled(name: str, key: str) -> list[float]:
        return [t for result in got.get(name, []) for t in result.get(key, [])]

    # What each timed field measures: the row's label (``{who}``, the count ``{n}``) and its unit.
    measured = {
        "end_s": ("{who} of a tiny run (2 params, 1 metric; median of {n})", "ms"),
        "run_s": ("{who}: the whole tiny run, start_run to end_run returned (median of {n})", "ms"),
        "sweep_s": ("{who}: a sweep of {runs} small runs (3 params, 1 metric each; median of {n})", "s"),
        "set_terminated_s": ("{who}, nothing pending (median of {n})", "ms"),
    }
    rows = (
        ("tracklane_mlflow_end_run_ms", "tracklane_fluent", "end_s", "tracklane.mlflow.end_run()"),
        ("tracklane_client_end_run_ms", "tracklane_client", "end_s", "TrackingClient.end_run()"),
        ("mlflow_end_run_ms", "mlflow", "end_s", "MLflow mlflow.end_run()"),
        ("raw_end_run_ms", "raw", "end_s", "raw log-batch + runs/update round trips (the floor)"),
        ("tracklane_mlflow_tiny_run_ms", "tracklane_fluent", "run_s", "tracklane.mlflow"),
        ("mlflow_tiny_run_ms", "mlflow", "run_s", "MLflow fluent (synchronous)"),
        ("tracklane_mlflow_sweep_s", "tracklane_fluent", "sweep_s", "tracklane.mlflow"),
        ("mlflow_sweep_s", "mlflow", "sweep_s", "MLflow fluent (synchronous)"),
        (
            "raw_sweep_s",
            "raw",
            "sweep_s",
            "raw runs/create, log-batch, runs/update (the floor of 3 requests a run)",
        ),
        (
            "tracklane_set_terminated_ms",
            "tracklane_client",
            "set_terminated_s",
            "tracklane MlflowClient.set_terminated",
        ),
        (
            "raw_runs_update_ms",
            "raw",
            "set_terminated_s",
            "raw runs/update round trip (http.client, kept alive)",
        ),
        ("mlflow_set_terminated_ms", "mlflow", "set_terminated_s", "MLflow MlflowClient.set_terminated"),
    )
    for key, name, field, who in rows:
        if got.get(name):
            times = pooled(name, field)
            label, unit = measured[field]
            value = harness.median(times) * (1e3 if unit == "ms" else 1.0)
            figure.add(key, label.format(who=who, n=len(times), runs=counts["sweep_runs"]), value, unit)
    figure.params.update(
        seconds={
            name: {k: pooled(name, k) for k in ("end_s", "run_s", "sweep_s", "set_terminated_s")}
            for name in got
        },
    )
    return figure


def main() -> None:
    args = harness.parse_args(__doc__)
    if args.child in CHILDREN:
        spec = json.loads(args.child_arg)
        harness.child_result(args, CHILDREN[args.child](spec["url"], spec["counts"]))
    measure(args).finish(args)


if __name__ == "__main__":
    main()
