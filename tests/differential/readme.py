"""The README's function table, generated from the differential suite's latest results.

``python3 -m tests.differential.readme`` (from the repository's root) rewrites the table in
README.md from ``tests/differential/results.json``, which ``tests/test_differential.py`` writes on
every run; the test then fails while the README says something else. Why a results file between
the two, rather than the test writing the README: the suite takes minutes and needs a server, the
README is prose a person reviews, and the results file shows in a diff exactly which example
changed (its text's digest, its status, the exception each side died of).

A row per seed 002/003 function: ``same`` when every example of it that runs here prints and
stores the same both ways (and ``NOTES`` has no behaviour difference for it), ``differs`` with the
reason of each known difference, ``MLflow's own`` when tracklane has no implementation of its own
and ``tracklane.mlflow`` hands out MLflow's (the superset: it acts on tracklane's runs), ``missing``
when MLflow itself no longer has the function.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from . import known
from .extract import SEED_002_CLIENT, SEED_002_MODULE, SEED_003, seed_functions

RESULTS = Path(__file__).with_name("results.json")
README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN = (
    "<!-- differential table: generated from tests/differential/results.json by "
    "`python3 -m tests.differential.readme`; edit tests/differential/known.py, not this table -->"
)
END = "<!-- end of differential table -->"

#: Functions of the seeds that MLflow no longer has, and what replaced them.
REMOVED = {
    "list_experiments": "removed from MLflow in 2.0; use `search_experiments`",
    "list_run_infos": "removed from MLflow in 2.0; use `search_runs`",
}


#: What the comparison of stored runs leaves out on tracklane's side (``state.BOOKKEEPING_RUN_TAGS``).
BOOKKEEPING = (
    "Left out of the stored-state comparison: each run tracklane creates carries a `tracklane.create_id` "
    "tag (a random id, so that a create retried after a lost reply finds the run it made instead of "
    "making a second); an example that prints a run's tags shows it and is counted as differing."
)


def faces_of(name: str) -> list[str]:
    faces = []
    if name in SEED_003 or name in SEED_002_MODULE:
        faces.append("mlflow")
    if name in SEED_002_CLIENT:
        faces.append("MlflowClient")
    return faces


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _example_notes(examples: list[dict[str, Any]]) -> list[str]:
    """The reason of each example that is not the same, examples with one reason together."""
    by_reason: dict[str, list[str]] = {}
    for example in examples:
        if example["status"] == "same":
            continue
        if example["status"] == "not run":
            reason = f"not run: {example['reason']}"
        else:
            entry = known.KNOWN_DIFFERENCES.get(example["id"])
            reason = entry.reason if entry else "an unexplained difference (the test fails)"
        by_reason.setdefault(reason, []).append(f"`{example['id']}`")
    return [f"{', '.join(ids)}: {reason}" for reason, ids in by_reason.items()]


def row(name: str, examples: list[dict[str, Any]], native: dict[str, bool]) -> str:
    faces = faces_of(name)
    ran = [e for e in examples if e["status"] != "not run"]
    same = [e for e in ran if e["status"] == "same"]
    counted = f"{len(same)} of {len(ran)} same" if ran else "none runs here"
    if len(ran) < len(examples):
        counted += f" ({len(examples) - len(ran)} not run)"
    if not examples:
        counted = "none"
    notes = []
    note_status, note = known.NOTES.get(name, ("same", ""))
    if note:
        notes.append(note)
    if name in REMOVED:
        return f"| `{name}` | {', '.join(faces)} | none | missing | {REMOVED[name]} |"
    implemented = [face for face in native if native[face]]
    absent = [face for face in native if not native[face]]
    for face in absent:
        notes.append(f"`{'tracklane.mlflow' if face == 'mlflow' else 'MlflowClient'}.{name}` is MLflow's own")
    notes += _example_notes(examples)
    if not implemented:
        status = "MLflow's own"
    elif absent or note_status == "differs" or len(same) < len(ran):
        status = "differs"
    else:
        status = "same"
    return f"| `{name}` | {', '.join(faces)} | {counted} | {status} | {_cell('; '.join(notes))} |"


def render(results: dict[str, Any]) -> str:
    by_function: dict[str, list[dict[str, Any]]] = {}
    for example in results["examples"]:
        by_function.setdefault(example["function"], []).append(example)
    ran = [e for e in results["examples"] if e["status"] != "not run"]
    same = [e for e in ran if e["status"] == "same"]
    lines = [
        BEGIN,
        f"Every function of MLflow's `MlflowClient` reference (seed 002) and fluent API (seed 003), with "
        f"MLflow {results['mlflow_version']}'s own docstring examples for it run under `import mlflow` and "
        f"with the imports swapped to tracklane, against one server (`tests/test_differential.py`): "
        f"{len(results['examples'])} examples, {len(ran)} run here, {len(same)} print and store the same. "
        + BOOKKEEPING,
        "",
        "| MLflow function | in | MLflow's examples | tracklane | how |",
        "|---|---|---|---|---|",
    ]
    for name in seed_functions():
        examples = [e for e in by_function.get(name, []) if not e["id"].startswith("seed003.")]
        lines.append(row(name, examples, results["native"].get(name, {})))
    seeds = [e for e in results["examples"] if e["id"].startswith("seed003.")]
    seed_ran = [e for e in seeds if e["status"] != "not run"]
    seed_same = [e for e in seed_ran if e["status"] == "same"]
    notes = "; ".join(_example_notes(seeds))
    lines.append(
        f"| seed 003's usage examples | mlflow | {len(seed_same)} of {len(seed_ran)} same | "
        f"{'same' if len(seed_same) == len(seeds) else 'differs'} | {_cell(notes)} |"
    )
    lines.append(END)
    return "\n".join(lines)


def synced(readme: str, table: str) -> str:
    """The README with its table replaced by ``table``."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < 0:
        raise SystemExit(f"README.md has no differential table between {BEGIN!r} and {END!r}")
    return readme[:start] + table + readme[end + len(END) :]


def main() -> int:
    results = json.loads(RESULTS.read_text())
    text = README.read_text()
    new = synced(text, render(results))
    if new != text:
        README.write_text(new)
        print(f"README.md: the function table is rewritten from {RESULTS.name}")
    else:
        print("README.md: the function table already matches the results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
