"""Figure 9: ``log_artifact`` of a 50 MB file: what the call costs the caller, and how fast it uploads.

tracklane's promise for artifacts is the one for metrics: the call does no network I/O. It copies
the file into the journal's artifact area and returns; the worker uploads it in the background,
and ``end_run`` waits for the upload. So the caller's time is set against a local copy of the same
file on the same disk (``shutil.copyfile``, timed in the same process just before), and the time
from the call's return to ``end_run``'s return (the upload, then the run's end) gives the upload
rate, set against a raw PUT of the same file to the same endpoint.

Three measurements against the same server, in one run of this script, each in a process of its
own and each logging to a fresh run per repeat (median of the repeats):

- ``tracklane.mlflow.log_artifact(file)`` in a run from ``mlflow.start_run()``: the call, then
  ``end_run()``; after one unmeasured run that logs a small file (first-use imports, the journal).
- MLflow's own ``mlflow.log_artifact(file)``, which uploads before it returns (the same warm-up);
  its rate is the file's size over that call.
- The ceiling: ``PUT /api/2.0/mlflow-artifacts/artifacts/<exp>/<run>/artifacts/<name>`` with
  ``http.client``, the file streamed from disk in 1 MiB blocks, into a run created over REST; half
  of its repeats before the clients and half after them, so drift on a shared machine shifts both.

The source file (random bytes, so nothing compresses it) was just written and sits in the page
cache for all three alike. After the measurements every run's artifact is listed on the server
and its size checked: an upload that did not happen cannot pass for a fast one.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import logging
import os
import shutil
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from . import harness

#: File size (bytes) and repeats per client. The issue's figure is 50 MB; smoke scale only checks
#: that the figure is produced.
COUNTS = {
    "smoke": {"bytes": 2_000_000, "repeats": 1},
    "quick": {"bytes": 50_000_000, "repeats": 3},
    "full": {"bytes": 50_000_000, "repeats": 7},
}
#: The longest one client's process may take (imports, warm-up, every repeat), seconds.
CHILD_TIMEOUT = {"smoke": 40.0, "quick": 50.0, "full": 240.0}
#: Bytes per write of the raw PUT (http.client's default is 8 KiB).
BLOCK = 1 << 20
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


def mlflow_env() -> dict[str, str]:
    """MLflow's client in a child: no usage telemetry (no traffic beyond 127.0.0.1), no URL prints."""
    return {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }


def write_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = min(left, BLOCK)
            f.write(os.urandom(chunk))
            left -= chunk


def local_copy_s(src: Path) -> float:
    """Seconds for a plain copy of ``src`` into the working directory (the journal's disk)."""
    dst = Path.cwd() / f"copy-{uuid.uuid4().hex}"
    began = time.perf_counter()
    shutil.copyfile(src, dst)
    took = time.perf_counter() - began
    dst.unlink()
    return took


def tracklane_child(url: str, file: str, small: str, repeats: int) -> dict[str, Any]:
    """In a fresh process: ``tracklane.mlflow.log_artifact`` then ``end_run``, one run per repeat."""
    import tracklane.mlflow as mlflow

    mlflow.set_tracking_uri(url)
    experiment_id = mlflow.set_experiment(f"bench-artifacts-tracklane-{uuid.uuid4().hex[:8]}").experiment_id
    with mlflow.start_run(run_name="warm-up", log_system_metrics=False):
        mlflow.log_artifact(small)
    copy_s, call_s, upload_s, runs = [], [], [], []
    for i in range(repeats):
        copy_s.append(local_copy_s(Path(file)))
        run = mlflow.start_run(run_name=f"log-artifact-{i}", log_system_metrics=False)
        began = time.perf_counter()
        mlflow.log_artifact(file)
        returned = time.perf_counter()
        mlflow.end_run()
        ended = time.perf_counter()
        call_s.append(returned - began)
        upload_s.append(ended - returned)
        runs.append(run.info.run_id)
    return {
        "experiment_id": experiment_id,
        "runs": runs,
        "copy_s": copy_s,
        "call_s": call_s,
        "upload_s": upload_s,
    }


def mlflow_child(url: str, file: str, small: str, repeats: int) -> dict[str, Any]:
    """In a fresh process: MLflow's ``mlflow.log_artifact`` (it uploads before returning)."""
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    import mlflow

    mlflow.set_tracking_uri(url)
    experiment_id = mlflow.set_experiment(f"bench-artifacts-mlflow-{uuid.uuid4().hex[:8]}").experiment_id
    with mlflow.start_run(run_name="warm-up", log_system_metrics=False):
        mlflow.log_artifact(small)
    call_s, runs = [], []
    for i in range(repeats):
        with mlflow.start_run(run_name=f"log-artifact-{i}", log_system_metrics=False) as run:
            began = time.perf_counter()
            mlflow.log_artifact(file)
            call_s.append(time.perf_counter() - began)
        runs.append(run.info.run_id)
    return {"experiment_id": experiment_id, "runs": runs, "call_s": call_s}


def rest(url: str, method: str, endpoint: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """One MLflow REST call with the standard library; its JSON reply."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        f"{url}{endpoint}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        found: dict[str, Any] = json.loads(reply.read() or b"{}")
        return found


def raw_put(url: str, experiment_id: str, file: Path) -> tuple[str, float]:
    """A fresh run, then one streamed PUT of ``file`` into its artifact root: (run id, seconds)."""
    run = rest(url, "POST", "/api/2.0/mlflow/runs/create", {"experiment_id": experiment_id})["run"]["info"]
    if not run.get("artifact_uri", "").startswith("mlflow-artifacts:"):
        raise RuntimeError(
            f"the server does not proxy artifacts (a new run's artifact_uri is {run.get('artifact_uri')!r}); "
            "start it with `mlflow server --serve-artifacts` and no --default-artifact-root"
        )
    root = run["artifact_uri"].removeprefix("mlflow-artifacts:")
    path = f"{ARTIFACTS}{urllib.parse.quote(root)}/{urllib.parse.quote(file.name)}"
    parts = urllib.parse.urlsplit(url)
    size = file.stat().st_size
    began = time.perf_counter()
    connection = http.client.HTTPConnection(
        parts.hostname or "127.0.0.1", parts.port, timeout=60, blocksize=BLOCK
    )
    try:
        with open(file, "rb") as body:
            connection.request("PUT", path, body=body, headers={"Content-Length": str(size)})
            reply = connection.getresponse()
            text = reply.read()
    finally:
        connection.close()
    took = time.perf_counter() - began
    if reply.status != 200:
        raise RuntimeError(f"raw PUT {path}: HTTP {reply.status}: {text[:300]!r}")
    rest(url, "POST", "/api/2.0/mlflow/runs/update", {"run_id": run["run_id"], "status": "FINISHED"})
    return run["run_id"], took


def stored_size(url: str, run_id: str, name: str) -> int | None:
    """The size the server lists for the run's artifact ``name`` (None if it has none)."""
    info = rest(url, "GET", f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]["info"]
    root = info["artifact_uri"].removeprefix("mlflow-artifacts:").strip("/")
    listing = rest(url, "GET", f"{ARTIFACTS}?path={urllib.parse.quote(root)}")
    for entry in listing.get("files") or ():
        if entry.get("path") == name:
            return int(entry.get("file_size", -1))
    return None


def measure(args: argparse.Namespace) -> harness.Figure:
    figure = harness.Figure(
        "9_artifacts", "Figure 9: log_artifact of a large file: caller time and upload rate"
    )
    harness.banner(figure, args)
    counts = COUNTS[args.scale]
    size, repeats = counts["bytes"], counts["repeats"]
    mb = size / 1e6
    figure.params = {**counts, "put_block_bytes": BLOCK}
    work = Path(harness.storage_dir())
    file, small = work / f"artifact-{int(mb)}MB.bin", work / "warm-up.txt"
    write_file(file, size)
    small.write_text("warm-up\n")
    spec = {"url": "", "file": str(file), "small": str(small), "repeats": repeats}
    timeout = CHILD_TIMEOUT[args.scale]
    checks: list[tuple[str, str]] = []  # (who, run id) whose artifact must be on the server
    with harness.mlflow_server(args) as url:
        spec["url"] = url
        ceiling_experiment = rest(
            url,
            "POST",
            "/api/2.0/mlflow/experiments/create",
            {"name": f"bench-artifacts-raw-{uuid.uuid4().hex[:8]}"},
        )["experiment_id"]
        put_s: list[float] = []
        try:
            for _ in range((repeats + 1) // 2):
                run_id, took = raw_put(url, ceiling_experiment, file)
                put_s.append(took)
                checks.append(("raw PUT", run_id))
        except (RuntimeError, OSError) as exc:  # a server that does not proxy artifacts: no figure
            figure.skip(f"the raw PUT to the artifact proxy failed, so nothing is measured: {exc}")
            return figure
        got = harness.child(__file__, "tracklane", spec, timeout=timeout)
        checks += [("tracklane", run_id) for run_id in got["runs"]]
        theirs: dict[str, Any] | None = None
        if importlib.util.find_spec("mlflow") is None:
            figure.skip(
                "MLflow log_artifact: mlflow is not installed (`pip install 'tracklane[bench]'` adds it)"
            )
        else:
            try:
                theirs = harness.child(__file__, "mlflow", spec, env=mlflow_env(), timeout=timeout)
            except RuntimeError as exc:  # MLflow's failure is noted; it does not cost tracklane's rows
                figure.skip(f"MLflow log_artifact failed: {str(exc).splitlines()[-1]}")
        if theirs is not None:
            checks += [("MLflow", run_id) for run_id in theirs["runs"]]
        for _ in range(max(1, repeats // 2)):
            run_id, took = raw_put(url, ceiling_experiment, file)
            put_s.append(took)
            checks.append(("raw PUT", run_id))
        stored = [(who, run_id, stored_size(url, run_id, file.name)) for who, run_id in checks]
    missing = [f"{who} run {run_id}: {found}" for who, run_id, found in stored if found != size]
    for line in missing:
        figure.note(f"the server does not hold the {size:,}-byte artifact ({line} bytes listed)")
    figure.params.update(
        raw_put_s=put_s,
        tracklane={k: got[k] for k in ("copy_s", "call_s", "upload_s")},
        mlflow=None if theirs is None else theirs["call_s"],
        artifacts_checked=len(checks),
        artifacts_missing=len(missing),
    )
    label = f"{mb:g} MB"
    figure.add(
        "local_copy_ms",
        f"local copy of the {label} file (shutil.copyfile, same disk as the journal; median of {repeats})",
        harness.median(got["copy_s"]) * 1e3,
        "ms",
    )
    figure.add(
        "tracklane_log_artifact_ms",
        f"tracklane.mlflow.log_artifact({label}): caller time (median of {repeats})",
        harness.median(got["call_s"]) * 1e3,
        "ms",
    )
    if theirs is not None:
        figure.add(
            "mlflow_log_artifact_ms",
            f"MLflow mlflow.log_artifact({label}): caller time, upload included (median of {repeats})",
            harness.median(theirs["call_s"]) * 1e3,
            "ms",
        )
    figure.add(
        "tracklane_upload_s",
        f"tracklane: log_artifact({label}) returned to end_run() returned (upload, run end; median)",
        harness.median(got["upload_s"]),
        "s",
    )
    figure.add(
        "tracklane_upload_mb_per_s",
        "tracklane upload rate: the file's size over that time",
        mb / harness.median(got["upload_s"]),
        "MB/s",
    )
    if theirs is not None:
        figure.add(
            "mlflow_upload_mb_per_s",
            "MLflow log_artifact upload rate: the file's size over its call",
            mb / harness.median(theirs["call_s"]),
            "MB/s",
        )
    figure.add(
        "raw_put_mb_per_s",
        f"raw PUT of the same file to the artifact proxy (http.client, streamed; median of {len(put_s)})",
        mb / harness.median(put_s),
        "MB/s",
    )
    return figure


def main() -> None:
    args = harness.parse_args(__doc__)
    children = {"tracklane": tracklane_child, "mlflow": mlflow_child}
    if args.child in children:
        spec = json.loads(args.child_arg)
        harness.child_result(
            args, children[args.child](spec["url"], spec["file"], spec["small"], spec["repeats"])
        )
    measure(args).finish(args)


if __name__ == "__main__":
    main()
