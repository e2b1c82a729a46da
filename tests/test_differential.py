"""MLflow's own examples run unchanged on tracklane: every docstring example of the seed 002/003
functions (and seed 003's own), under ``import mlflow`` and with the imports swapped to tracklane,
against one real server, print and store the same, but for the differences listed with their
reasons in ``tests/differential/known.py``. The README's function table is generated from the
results (``python3 -m tests.differential.readme``); this test fails while the two disagree.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from differential import harness, known, readme
from differential.extract import all_examples
from differential.state import collect
from differential.transform import experiment_names, isolate, to_tracklane

from servers import MlflowServer, Reader


def _problems(outcomes: list[harness.Outcome]) -> list[str]:
    """Each difference not listed in KNOWN_DIFFERENCES, and each listed one that is gone."""
    problems = []
    for o in outcomes:
        entry = known.KNOWN_DIFFERENCES.get(o.example.id)
        if o.status == "differs":
            text = "\n".join(o.diffs.values())
            if entry is None:
                problems.append(f"{o.example.id}: an unexplained difference\n{text}")
            elif set(o.diffs) - entry.aspects:
                problems.append(
                    f"{o.example.id}: also differs in {sorted(set(o.diffs) - entry.aspects)}\n{text}"
                )
            elif entry.expect and entry.expect not in text:
                problems.append(f"{o.example.id}: differs otherwise than known ({entry.expect!r})\n{text}")
        elif entry is not None and o.status == "same" and not entry.sometimes:
            problems.append(f"{o.example.id}: now the same both ways; remove it from KNOWN_DIFFERENCES")
    return problems


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(2700)  # ~4 min on 2 quiet cores; far longer on a loaded machine
def test_mlflow_examples_print_and_store_the_same_under_tracklane(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    outcomes = harness.run_all(mlflow_server.url, tmp_path)

    results = harness.results(outcomes)
    readme.RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    problems = _problems(outcomes)
    assert not problems, "\n\n".join(problems)
    assert readme.synced(readme.README.read_text(), readme.render(results)) == readme.README.read_text(), (
        "README.md's function table is not the latest results: run `python3 -m tests.differential.readme`"
    )


@pytest.mark.unit
def test_every_table_entry_names_an_example_mlflow_has() -> None:
    ids = {e.id for e in all_examples()}
    named = set(known.UNRUNNABLE) | set(known.REPAIRS) | set(known.KNOWN_DIFFERENCES)
    assert named <= ids, f"no such example (MLflow changed its docs?): {sorted(named - ids)}"
    assert all(k.reason and k.lane for k in known.KNOWN_DIFFERENCES.values())


@pytest.mark.unit
def test_the_import_swap_touches_only_mlflow_imports() -> None:
    source = (
        "import mlflow\nimport mlflow.sklearn\nimport numpy as np\nfrom mlflow import MlflowClient\n"
        "from mlflow.entities import Metric, ViewType\nfrom mlflow.tracking import MlflowClient as C\n"
        "from mlflow.models import infer_signature\nmlflow.log_metric('mlflow', 1)\n"
    )
    assert to_tracklane(source) == (
        "import tracklane.mlflow as mlflow\nimport tracklane.mlflow as mlflow\nimport numpy as np\n"
        "from tracklane.mlflow import MlflowClient\nfrom tracklane.entities import Metric, ViewType\n"
        "from tracklane.mlflow import MlflowClient as C\nfrom mlflow.models import infer_signature\n"
        "mlflow.log_metric('mlflow', 1)\n"
    )


@pytest.mark.unit
def test_isolation_prefixes_experiment_names_and_moves_default_experiment_runs() -> None:
    source = (
        'name = "Social"\nid = mlflow.create_experiment(name)\nmlflow.get_experiment_by_name("Default")\n'
        'client.rename_experiment(id, "Renamed")\nrun = client.create_run(experiment_id="0")\n'
        'experiment_id = "0"\nlocal_dir = "/tmp/downloads"\n'
    )
    assert experiment_names(source) == {"Social", "Renamed"}
    assert isolate(source, "p.", "42", "/w") == (
        'name = "p.Social"\nid = mlflow.create_experiment(name)\nmlflow.get_experiment_by_name("Default")\n'
        'client.rename_experiment(id, "p.Renamed")\nrun = client.create_run(experiment_id="42")\n'
        'experiment_id = "42"\nlocal_dir = "/w/tmp/downloads"\n'
    )


#: Programs whose end is the interpreter's to handle: a run left active, and a run whose program dies.
EXITS = {
    "left_active": "import mlflow\nmlflow.start_run()\nmlflow.log_metric('m', 1.0)\nprint('logged')\n",
    "dies": "import mlflow\nmlflow.start_run()\nmlflow.log_param('p', 1)\nraise ValueError('boom')\n",
}


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("variant", harness.VARIANTS)
def test_the_fork_runner_ends_a_program_as_the_interpreter_does(
    variant: str, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """The suite runs examples in forked children: their exit (atexit handlers, an uncaught
    exception) must store what a real ``python3 example.py`` stores."""
    reader = Reader(mlflow_server.url)
    tag = uuid.uuid4().hex[:6]
    items: list[dict[str, Any]] = []
    real: dict[str, tuple[str, int]] = {}
    for name, program in EXITS.items():
        source = to_tracklane(program) if variant == "tracklane" else program
        for how in ("real", "forked"):
            workdir = tmp_path / f"{name}-{how}"
            workdir.mkdir()
            exp = reader.call("POST", "experiments/create", {"name": f"exit-{tag}-{variant}-{name}-{how}"})
            if how == "forked":
                items.append(
                    {
                        "id": name,
                        "source": source,
                        "cwd": str(workdir),
                        "env": {"MLFLOW_EXPERIMENT_ID": exp["experiment_id"]},
                        "timeout": 120,
                    }
                )
                continue
            (workdir / "example.py").write_text(source)
            env = {**harness.base_env(mlflow_server.url), "MLFLOW_EXPERIMENT_ID": exp["experiment_id"]}
            proc = subprocess.run(
                [sys.executable, "example.py"],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            (workdir / "stdout.txt").write_text(proc.stdout)
            real[name] = (exp["experiment_id"], proc.returncode)
    forked = harness.run_runners({variant: items}, tmp_path, mlflow_server.url)[variant]

    for item in items:
        name = item["id"]
        real_exp, real_code = real[name]
        real_state, _ = collect(reader, real_exp, f"none-{tag}")
        forked_state, _ = collect(reader, item["env"]["MLFLOW_EXPERIMENT_ID"], f"none-{tag}")
        assert forked[name]["returncode"] == real_code
        assert forked_state == real_state, (name, forked_state, real_state)
        # MLflow's atexit end_run does not know the program died; tracklane's ends its run FAILED.
        died = "FAILED" if variant == "tracklane" else "FINISHED"
        assert [r["status"] for r in real_state["experiments"][0]["runs"]] == (
            ["FINISHED"] if name == "left_active" else [died]
        )
        assert "logged" in (tmp_path / f"{name}-forked" / "stdout.txt").read_text() or name == "dies"
