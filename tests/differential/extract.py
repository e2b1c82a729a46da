"""The examples the differential suite runs: MLflow's docstring examples for every function of seeds
002 and 003, read from the installed MLflow at test time, and seed 003's own two examples.

Why at test time: the examples then follow the MLflow the suite compares against (a new MLflow
brings its new examples, and an example it changed is run as it now reads), with nothing copied
that could go stale. The seed examples are checked in (``seed_examples/``): the seeds are not part
of the repository, and their text lost its indentation.

An example is named ``<face>.<function>#<n>``: ``mlflow.log_metric#1`` is the first code block in
the docstring of ``mlflow.log_metric``, ``MlflowClient.log_batch#1`` the first in
``MlflowClient.log_batch``'s.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

SEED_EXAMPLES = Path(__file__).parent / "seed_examples"

#: Seed 002, MLflow's ``MlflowClient`` reference: its methods, and the module functions it documents.
SEED_002_CLIENT = (
    "create_experiment",
    "create_run",
    "delete_experiment",
    "delete_run",
    "delete_tag",
    "download_artifacts",
    "get_experiment",
    "get_experiment_by_name",
    "get_metric_history",
    "get_run",
    "list_artifacts",
    "list_experiments",
    "list_run_infos",
    "log_artifact",
    "log_artifacts",
    "log_batch",
    "log_metric",
    "log_param",
    "rename_experiment",
    "restore_experiment",
    "restore_run",
    "search_runs",
    "set_tag",
    "set_terminated",
)
SEED_002_MODULE = ("get_tracking_uri", "set_tracking_uri")

#: Seed 003, MLflow's fluent tracking API.
SEED_003 = (
    "start_run",
    "end_run",
    "active_run",
    "get_run",
    "delete_run",
    "search_runs",
    "create_experiment",
    "set_experiment",
    "get_experiment",
    "get_experiment_by_name",
    "delete_experiment",
    "search_experiments",
    "log_param",
    "log_params",
    "log_metric",
    "log_metrics",
    "log_artifact",
    "log_artifacts",
    "log_dict",
    "log_figure",
    "log_image",
    "log_table",
    "log_text",
    "set_tag",
    "set_tags",
    "delete_tag",
    "set_experiment_tag",
    "set_experiment_tags",
    "delete_experiment_tag",
    "autolog",
    "get_artifact_uri",
    "get_parent_run",
    "last_active_run",
)


def seed_functions() -> list[str]:
    """Every function name of seeds 002 and 003, in one sorted list (the README table's rows)."""
    return sorted(set(SEED_002_CLIENT) | set(SEED_002_MODULE) | set(SEED_003))


@dataclass(frozen=True)
class Example:
    """One runnable example: where it comes from and its source as MLflow wrote it."""

    id: str
    function: str
    face: str  # "mlflow" (the module) or "MlflowClient"
    caption: str
    source: str

    @property
    def digest(self) -> str:
        """A short hash of the source: the results file says which text each outcome is for."""
        return hashlib.sha256(self.source.encode()).hexdigest()[:12]


_BLOCK = re.compile(r"^(?P<indent>\s*)\.\. code-block:: python\s*$")
_OPTION = re.compile(r"^\s+:(?P<name>[\w-]+):\s*(?P<value>.*)$")


def code_blocks(docstring: str) -> list[tuple[str, str]]:
    """The ``.. code-block:: python`` blocks of a reST docstring, as (caption, dedented source)."""
    lines = docstring.splitlines()
    blocks: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        match = _BLOCK.match(lines[i])
        i += 1
        if not match:
            continue
        indent = len(match["indent"])
        caption = ""
        while i < len(lines) and (option := _OPTION.match(lines[i])):
            if option["name"] == "caption":
                caption = option["value"].strip()
            i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        source = textwrap.dedent("\n".join(body)).strip()
        if source:
            blocks.append((caption, source + "\n"))
    return blocks


def docstring_examples() -> list[Example]:
    """MLflow's own examples for every seed 002/003 function, from the installed MLflow."""
    import mlflow
    from mlflow import MlflowClient

    examples: list[Example] = []
    # Both faces, for every seed function either has: MLflow's fluent `restore_run` documents a
    # seed 002 function as much as `MlflowClient.restore_run` does.
    faces = (("MlflowClient", MlflowClient), ("mlflow", mlflow))
    for face, owner in faces:
        for name in seed_functions():
            obj = getattr(owner, name, None)
            if obj is None:  # removed from MLflow (list_experiments, list_run_infos): no example
                continue
            for n, (caption, source) in enumerate(code_blocks(inspect.getdoc(obj) or ""), start=1):
                examples.append(Example(f"{face}.{name}#{n}", name, face, caption, source))
    return examples


def seed_examples() -> list[Example]:
    """Seed 003's two usage examples (checked in: the seeds are not in the repository)."""
    examples = []
    for path in sorted(SEED_EXAMPLES.glob("*.txt")):
        source = path.read_text()
        examples.append(Example(f"seed003.{path.stem}", "start_run", "mlflow", path.stem, source))
    return examples


def all_examples() -> list[Example]:
    return docstring_examples() + seed_examples()
