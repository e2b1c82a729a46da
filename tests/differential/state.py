"""What the server stored for one example run, read through MLflow's REST API and made comparable.

An example owns its experiments (the one the suite made for it, and those it created, found by
their prefix), so its state is: each experiment (name without the prefix, lifecycle stage, tags,
artifact location), each run in it (name, status, lifecycle stage, params, tags, every metric's
history as (value, step), the artifacts listed with their sizes) and each MLflow 3 logged model.
What differs between any two runs of one program is masked: ids become labels in creation order,
times are dropped, and the tags that name the user, the source file or the commit are left out, as
is the tag tracklane's creates carry (``BOOKKEEPING_RUN_TAGS``).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
import urllib.request
from typing import Any

from .masks import Labels, mask_path
from servers import Reader

#: Run tags that differ between any two processes (who, which file, which commit), not between clients.
VOLATILE_RUN_TAGS = re.compile(
    r"^mlflow\.(user|source\.name|source\.type|source\.git\..*|runName|log-model\.history)$"
)
#: tracklane's tag on each run it creates (``RestBackend.create_run``): a create retried after a
#: lost reply finds the run by it instead of making a second. Its value is random, and MLflow has no
#: such tag: left out of the server comparison, said once in the README (``readme.BOOKKEEPING``);
#: an example that prints a run's tags still shows it, and is listed as differing.
BOOKKEEPING_RUN_TAGS = frozenset({"tracklane.create_id"})
#: MLflow's generated run names (``bemused-crab-857``, up to ``-1000``): random in both variants.
RANDOM_RUN_NAME = re.compile(r"^[a-z]+-[a-z]+-\d{1,4}$")  # randint(0, 10**3): 1000 too


def _list_proxied(reader: Reader, root: str, sub: str = "") -> list[tuple[str, int]]:
    path = f"{root}/{sub}" if sub else root
    url = (
        reader.base.removesuffix("/mlflow")
        + "/mlflow-artifacts/artifacts?"
        + urllib.parse.urlencode({"path": path})
    )
    with urllib.request.urlopen(url, timeout=30) as reply_body:
        reply = json.loads(reply_body.read() or b"{}")
    found: list[tuple[str, int]] = []
    for entry in reply.get("files") or []:
        rel = f"{sub}/{entry['path']}" if sub else entry["path"]
        if entry.get("is_dir"):
            found += _list_proxied(reader, root, rel)
        else:
            found.append((rel, int(entry.get("file_size") or 0)))
    return found


def list_artifacts(reader: Reader, uri: str) -> list[tuple[str, int]]:
    """Every file under an artifact URI, with its size: through the server's proxy for
    ``mlflow-artifacts:/`` locations, straight from the disk for ``file://`` ones."""
    if uri.startswith("mlflow-artifacts:"):
        found = _list_proxied(reader, urllib.parse.urlparse(uri).path.lstrip("/"))
        return sorted((mask_path(path), size) for path, size in found)
    if uri.startswith("file://") or uri.startswith("/"):
        root = urllib.parse.urlparse(uri).path if uri.startswith("file://") else uri
        found = []
        for folder, _dirs, files in os.walk(root):
            for name in files:
                full = os.path.join(folder, name)
                found.append((mask_path(os.path.relpath(full, root)), os.path.getsize(full)))
        return sorted(found)
    return [(f"<unlisted {uri.split(':')[0]} location>", 0)]


def _history(reader: Reader, run_id: str, key: str) -> list[tuple[float, int]]:
    return sorted((value, step) for value, step, _ts in reader.history(run_id, key))


def _tags(entity: dict[str, Any], labels: Labels) -> dict[str, str]:
    tags = {}
    for tag in entity.get("tags") or []:
        key, value = tag["key"], tag.get("value", "")
        if VOLATILE_RUN_TAGS.match(key) or key in BOOKKEEPING_RUN_TAGS:
            continue
        if key == "mlflow.parentRunId":
            value = labels.run(value)
        tags[key] = value
    return dict(sorted(tags.items()))


def _run(reader: Reader, run: dict[str, Any], labels: Labels) -> dict[str, Any]:
    info, data = run["info"], run.get("data") or {}
    name = info.get("run_name", "")
    return {
        "run": labels.run(info["run_id"]),
        "name": "<random name>" if RANDOM_RUN_NAME.match(name) else name,
        "status": info["status"],
        "lifecycle_stage": info["lifecycle_stage"],
        "ended": bool(info.get("end_time")),
        "params": dict(sorted((p["key"], p["value"]) for p in data.get("params") or [])),
        "tags": _tags(data, labels),
        "metrics": {
            key: _history(reader, info["run_id"], key)
            for key in sorted({m["key"] for m in data.get("metrics") or []})
        },
        "artifacts": list_artifacts(reader, info["artifact_uri"]),
    }


def _models(reader: Reader, experiment_id: str, labels: Labels) -> list[dict[str, Any]]:
    try:
        reply = reader.call(
            "POST", "logged-models/search", {"experiment_ids": [experiment_id], "max_results": 50}
        )
    except AssertionError:  # a server without MLflow 3's logged models
        return []
    models = []
    for model in sorted(
        reply.get("models") or [], key=lambda m: int(m["info"].get("creation_timestamp_ms", 0))
    ):
        info, data = model["info"], model.get("data") or {}
        models.append(
            {
                "model": labels.model(info["model_id"]),
                "name": info.get("name"),
                "status": info.get("status"),
                "source_run": labels.run(info["source_run_id"]) if info.get("source_run_id") else None,
                "params": dict(sorted((p["key"], p["value"]) for p in data.get("params") or [])),
                "tags": _tags(info, labels),
                "artifacts": list_artifacts(reader, info.get("artifact_uri", "")),
            }
        )
    return models


def _experiments(reader: Reader, prefix: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    token = None
    while True:
        query: dict[str, Any] = {"max_results": 1000, "view_type": "ALL", "filter": f"name LIKE '{prefix}%'"}
        if token:
            query["page_token"] = token
        reply = reader.call("POST", "experiments/search", query)
        found += reply.get("experiments") or []
        token = reply.get("next_page_token")
        if not token:
            return found


def _creation_order(run: dict[str, Any]) -> tuple[int, int, str]:
    """Runs in the order they were started; within one millisecond a parent before its children
    (tracklane starts a run without waiting for the server, so two can share a start time)."""
    tags = {t["key"] for t in (run.get("data") or {}).get("tags") or []}
    return int(run["info"]["start_time"]), int("mlflow.parentRunId" in tags), run["info"].get("run_name", "")


def collect(reader: Reader, own_experiment_id: str, prefix: str) -> tuple[dict[str, Any], Labels]:
    """The example's stored state, and the labels its ids were given (for masking its output)."""
    labels = Labels()
    own = reader.call("GET", "experiments/get", {"experiment_id": own_experiment_id})["experiment"]
    created = sorted(_experiments(reader, prefix), key=lambda e: int(e["experiment_id"]))
    labels.experiments[own_experiment_id] = "<exp:own>"
    for e in created:
        labels.experiments[e["experiment_id"]] = f"<exp:{e['name'].removeprefix(prefix)}>"
    experiments = []
    for e in [own, *created]:
        runs = (
            reader.call(
                "POST",
                "runs/search",
                {"experiment_ids": [e["experiment_id"]], "max_results": 1000, "run_view_type": "ALL"},
            ).get("runs")
            or []
        )
        runs.sort(key=_creation_order)
        for r in runs:
            labels.run(r["info"]["run_id"])
        experiments.append(
            {
                "experiment": labels.experiments[e["experiment_id"]],
                "name": "<own>" if e is own else e["name"].removeprefix(prefix),
                "lifecycle_stage": e["lifecycle_stage"],
                "artifact_location": mask_location(e.get("artifact_location", ""), e["experiment_id"]),
                "tags": {t["key"]: t["value"] for t in sorted(e.get("tags") or [], key=lambda t: t["key"])},
                "runs": [_run(reader, r, labels) for r in runs],
                "logged_models": _models(reader, e["experiment_id"], labels),
            }
        )
    return {"experiments": experiments}, labels


def mask_location(location: str, experiment_id: str) -> str:
    if location == f"mlflow-artifacts:/{experiment_id}":
        return "mlflow-artifacts:/<experiment id>"
    return re.sub(r"^file://.*/mlruns$", "file://<cwd>/mlruns", location)
