"""Masks what differs between any two runs of one program, then compares the two variants.

Masked in stdout, in this order: the variant's experiment-name prefix (removed), its working
directory and temporary directories, the server's address, run and logged-model ids (the labels of
``state.Labels``, so "the run the example created second" is ``<run2>`` in both), experiment ids
where the text names one, millisecond timestamps, MLflow's generated run names, and the durations
MLflow's and tracklane's log lines print. What remains must be equal.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any


class Labels:
    """Ids to stable labels (``<run1>``, ``<exp:own>``), in the order the example created them."""

    def __init__(self) -> None:
        self.runs: dict[str, str] = {}
        self.experiments: dict[str, str] = {}
        self.models: dict[str, str] = {}

    def run(self, run_id: str) -> str:
        return self.runs.setdefault(run_id, f"<run{len(self.runs) + 1}>")

    def model(self, model_id: str) -> str:
        return self.models.setdefault(model_id, f"<model{len(self.models) + 1}>")


_RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")
_MODEL_ID = re.compile(r"\bm-[0-9a-f]{32}\b")
_EXPERIMENT_ID = re.compile(
    r"(?i)(experiment[ _]?id\W{1,4}|mlflow-artifacts:/|#/experiments/|experiments/)(\d+)"
)
_TIMESTAMP = re.compile(r"\b1[5-9]\d{11}\b")
_RANDOM_NAME = re.compile(r"\b[a-z]+-[a-z]+-\d{1,4}\b")  # MLflow draws 0..1000 inclusive
_TMP = re.compile(r"/tmp/(tmp[\w-]+|pytest-of-\w+/[\w/.-]+)")
_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_TMP_NAME = re.compile(r"\btmp[a-z0-9_]{8}\b")


def mask_path(path: str) -> str:
    """An artifact path without what is random in it: the names ``tempfile`` makes, and the
    timestamp and uuid of MLflow's step-wise image names (``dogs+step+3+timestamp+T+UUID.png``)."""
    return _TIMESTAMP.sub("<ts>", _UUID.sub("<uuid>", _TMP_NAME.sub("<tmpname>", path)))


def mask(text: str, *, prefix: str, workdir: str, server: str, labels: Labels) -> str:
    text = (
        text.replace(prefix, "")
        .replace(prefix.split(".")[0], "<suite>")
        .replace(workdir, "<cwd>")
        .replace(server.rstrip("/"), "<server>")
    )
    text = _TMP.sub("<tmp>", text)
    text = _MODEL_ID.sub(lambda m: labels.models.get(m[0], "<model id>"), text)
    text = _RUN_ID.sub(lambda m: labels.runs.get(m[0], "<id>"), text)
    text = _EXPERIMENT_ID.sub(lambda m: m[1] + labels.experiments.get(m[2], "<experiment id>"), text)
    text = mask_path(text)
    return _RANDOM_NAME.sub("<random name>", text)


def last_error(stderr: str) -> str:
    """The exception an example died of (the traceback's last line), or ''."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback (most recent call last)"):
            tail = [line for line in lines[i + 1 :] if not line.startswith((" ", "\t"))]
            return tail[0] if tail else ""
    return ""


def diff(name: str, mlflow_side: Any, tracklane_side: Any) -> str:
    """A unified diff of the two sides (text, or JSON for the stored state), '' when equal."""
    if mlflow_side == tracklane_side:
        return ""
    if not isinstance(mlflow_side, str):
        mlflow_side = json.dumps(mlflow_side, indent=1, sort_keys=True)
        tracklane_side = json.dumps(tracklane_side, indent=1, sort_keys=True)
    lines = difflib.unified_diff(
        mlflow_side.splitlines(),
        tracklane_side.splitlines(),
        f"{name} (mlflow)",
        f"{name} (tracklane)",
        lineterm="",
        n=2,
    )
    return "\n".join(lines)
