"""What an MLflow server stored for one experiment, in a form two runs of the same program compare by.

For the differential tests: the same program runs once as MLflow would run it (``import mlflow``,
``http://``) and once through tracklane (``import tracklane.mlflow as mlflow``, or the plugin's
``tracklane+http://``), each into its own experiment; ``stored`` reads back both through the
server's REST API (urllib only) with what differs between any two runs masked: ids, times, the
user and source tags. Runs are named by their place (start order, parent), artifacts by path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from servers import Reader

#: Tags that differ between two runs of one program (who, where, which process, when).
VOLATILE_TAGS = {
    "mlflow.user",
    "mlflow.source.name",
    "mlflow.source.type",
    "mlflow.source.git.commit",
    "mlflow.source.git.repoURL",
    "mlflow.source.git.branch",
    "mlflow.gitRepoURL",
    "mlflow.runName",
    "mlflow.log-model.history",
    "mlflow.parentRunId",
    "mlflow.autologging",
}

#: What tracklane's creates add and MLflow's do not: the client-made id a retried ``runs/create``
#: looks for, so a lost reply never makes a second run (README, reliability). Left out of both sides.
BOOKKEEPING_TAGS = {"tracklane.create_id"}


def artifact_paths(base: str, root: str) -> list[str]:
    """Every file under ``root`` of the server's artifact proxy (``<experiment>/<run>/artifacts``)."""
    found: list[str] = []
    pending = [root]
    while pending:
        path = pending.pop()
        query = urllib.parse.urlencode({"path": path})
        url = f"{base}/api/2.0/mlflow-artifacts/artifacts?{query}"
        with urllib.request.urlopen(url, timeout=30) as reply:
            files = json.loads(reply.read() or b"{}").get("files") or []
        for f in files:
            child = f"{path}/{f['path']}"
            if f.get("is_dir"):
                pending.append(child)
            else:
                found.append(child[len(root) + 1 :])
    return sorted(found)


def _proxy_root(artifact_uri: str) -> str:
    """``mlflow-artifacts:/1/abc/artifacts`` -> ``1/abc/artifacts``."""
    assert artifact_uri.startswith("mlflow-artifacts:"), artifact_uri
    return artifact_uri[len("mlflow-artifacts:") :].lstrip("/")


def _place(run: dict[str, Any]) -> tuple[Any, ...]:
    """Runs in an order two runs of one program share: top-level runs by start, children (autolog's,
    which MLflow may create before or after their parent) by their params."""
    tags = {t["key"]: t["value"] for t in run["data"].get("tags") or ()}
    params = sorted((p["key"], p["value"]) for p in run["data"].get("params") or ())
    child = "mlflow.parentRunId" in tags
    return (child, 0 if child else run["info"]["start_time"], params)


def stored(base: str, experiment_name: str, metric_values: bool = True) -> dict[str, Any]:
    """The experiment's runs and logged models, ids and times masked (see the module docstring)."""
    reader = Reader(base)
    experiment = reader.experiment(experiment_name)
    assert experiment is not None, f"no experiment {experiment_name!r} on the server"
    runs = sorted(reader.runs(experiment["experiment_id"]), key=_place)
    names = {r["info"]["run_id"]: f"run{i}" for i, r in enumerate(runs)}
    out_runs = []
    for r in runs:
        info, data = r["info"], r["data"]
        run_id = info["run_id"]
        tags = {t["key"]: t["value"] for t in data.get("tags") or () if t["key"] not in BOOKKEEPING_TAGS}
        metrics: dict[str, Any] = {}
        for m in data.get("metrics") or ():
            history = reader.history(run_id, m["key"])
            timing = "time" in m["key"] or "per_second" in m["key"]  # differs between any two runs
            metrics[m["key"]] = [(v if metric_values and not timing else None, s) for v, s, _ in history]
        out_runs.append(
            {
                "name": names[run_id],
                "parent": names.get(tags.get("mlflow.parentRunId", "")),
                "status": info["status"],
                "params": {p["key"]: p["value"] for p in data.get("params") or ()},
                "metrics": metrics,
                "tags": {k: v for k, v in tags.items() if k not in VOLATILE_TAGS},
                "tag_keys": sorted(tags),
                "artifacts": artifact_paths(base, _proxy_root(info["artifact_uri"])),
                "inputs": sorted(
                    d["dataset"]["name"] for d in (r.get("inputs") or {}).get("dataset_inputs") or ()
                ),
                "model_outputs": len((r.get("outputs") or {}).get("model_outputs") or ()),
            }
        )
    models = (
        reader.call(
            "POST",
            "logged-models/search",
            {"experiment_ids": [experiment["experiment_id"]], "max_results": 100},
        ).get("models")
        or []
    )
    out_models = []
    for m in sorted(models, key=lambda m: m["info"]["creation_timestamp_ms"]):
        info = m["info"]
        out_models.append(
            {
                "name": info["name"],
                "run": names.get(info.get("source_run_id", "")),
                "status": info.get("status"),
                "tag_keys": sorted(t["key"] for t in info.get("tags") or ()),
                "params": {p["key"]: p["value"] for p in (m.get("data") or {}).get("params") or ()},
                "artifacts": artifact_paths(base, _proxy_root(info["artifact_uri"])),
            }
        )
    return {"runs": out_runs, "models": out_models}


def run_process(
    tmp_path: Path, source: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``source`` in a fresh interpreter (MLflow's process-wide state starts clean), in a working
    directory of its own under ``tmp_path``, without the caller's MLflow settings."""
    workdir = tmp_path / f"program-{len(list(tmp_path.glob('program-*')))}"
    workdir.mkdir()
    script = workdir / "program.py"
    script.write_text(textwrap.dedent(source))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OIP_", "HF_MLFLOW"))}
    clean.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", **(env or {}))
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean,
        cwd=workdir,
    )


def run_program(tmp_path: Path, source: str, *args: str, env: dict[str, str] | None = None) -> str:
    """``run_process``, which must succeed; its stdout."""
    result = run_process(tmp_path, source, *args, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def differential(
    tmp_path: Path,
    base: str,
    program: str,
    ways: dict[str, tuple[str, str]],
    env: dict[str, str] | None = None,
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Run ``program`` once per way (a name -> (tracking URI, import) pair: ``sys.argv[1:4]`` are the
    URI, a fresh experiment name and the import), and read back what each stored: name ->
    (stdout, ``stored``)."""
    out = {}
    for name, (uri, module) in ways.items():
        experiment = f"{tmp_path.name[:40]}-{name}-{len(list(tmp_path.glob('program-*')))}"
        stdout = run_program(tmp_path, program, uri, experiment, module, env=env)
        out[name] = (stdout, stored(base, experiment))
    return out
