"""Runs every example twice against one MLflow server, under ``import mlflow`` and with the imports
swapped to tracklane, and compares what each printed, what it died of, and what the server stored.

Both variants run at once, each in a fork server of its own (``runner.py``) running ``PARALLEL``
examples at a time. The examples cannot see each other's data: each has experiments of its own
(``transform.isolate``), so the two variants' writes never meet.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import known
from .extract import SEED_002_CLIENT, SEED_002_MODULE, SEED_003, Example, all_examples, seed_functions
from .masks import diff, last_error, mask
from .state import collect
from .transform import isolate, to_tracklane
from servers import Reader

VARIANTS = ("mlflow", "tracklane")
SRC = Path(__file__).resolve().parents[2] / "src"
RUNNER = Path(__file__).with_name("runner.py")
PREIMPORT_COMMON = [
    "numpy",
    "pandas",
    "PIL.Image",
    "matplotlib",
    "matplotlib.pyplot",
    "sklearn.ensemble",
    "sklearn.linear_model",
    "sklearn.model_selection",
    "sklearn.metrics",
    "sklearn.datasets",
    # mlflow.autolog() imports torch (through scikit-learn's array API support): ~5 s per example.
    "torch",
]
PREIMPORT = {"mlflow": [*PREIMPORT_COMMON, "mlflow"], "tracklane": [*PREIMPORT_COMMON, "tracklane.mlflow"]}
#: A bound for a hung example, not a speed check. Seed 003's housing example trains a forest and
#: logs it with MLflow's flavor (which infers requirements in a child process): 70-90 s under
#: either module beside two CPU hogs, and past 180 s once beside a whole parallel suite.
EXAMPLE_TIMEOUT = 480.0
#: Children each runner runs at once. Two runners of two: an example mostly waits on the server.
PARALLEL = 2


@dataclass
class Outcome:
    """How one example went: ``same``, ``differs`` (with a diff per aspect) or ``not run`` (why)."""

    example: Example
    status: str
    reason: str = ""
    diffs: dict[str, str] = field(default_factory=dict)  # aspect ("error", "stdout", "server") -> diff
    errors: dict[str, str] = field(default_factory=dict)  # variant -> the exception it died of
    seconds: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The deterministic part, for the results file the README table is generated from."""
        return {
            "id": self.example.id,
            "function": self.example.function,
            "face": self.example.face,
            "digest": self.example.digest,
            "status": self.status,
            "reason": self.reason,
            "aspects": sorted(self.diffs),
            # The start of each: enough to route it, short of what may vary (a list of experiments).
            "errors": {v: _start_of(e) for v, e in self.errors.items()},
        }


def _start_of(error: str) -> str:
    """An error's first 70 characters, and none of the suite's own names (they vary by run)."""
    error = error.split("<suite>")[0]
    return error if len(error) <= 70 else error[:70] + "..."


def missing_modules(source: str) -> list[str]:
    """Top-level modules an example imports that are not installed here."""
    import ast

    wanted = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            wanted |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            wanted.add(node.module.split(".")[0])
    return sorted(m for m in wanted if importlib.util.find_spec(m) is None)


def runnable(example: Example) -> str:
    """Why an example cannot run here, or '' if it can."""
    if example.id in known.UNRUNNABLE:
        return known.UNRUNNABLE[example.id]
    missing = missing_modules(example.source)
    return (
        f"needs {', '.join(missing)}, not installed here (not a tracklane test dependency)" if missing else ""
    )


@dataclass
class Prepared:
    example: Example
    prefix: dict[str, str]
    experiment_id: dict[str, str]
    workdir: dict[str, Path]


def base_env(server: str) -> dict[str, str]:
    """The environment of a runner: this worktree's tracklane first, the server, no telemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OIP_", "TRACKLANE_"))}
    path = [str(SRC), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        PYTHONPATH=os.pathsep.join(path),
        PYTHONIOENCODING="utf-8",
        MPLBACKEND="Agg",
        MLFLOW_TRACKING_URI=server,
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
    )
    return env


def run_all(server: str, root: Path, examples: list[Example] | None = None) -> list[Outcome]:
    """Every example, both ways; the outcomes in the examples' order."""
    examples = all_examples() if examples is None else examples
    started = time.monotonic()
    reader = Reader(server)
    token = uuid.uuid4().hex[:6]
    outcomes: dict[str, Outcome] = {}
    prepared: list[Prepared] = []
    for i, example in enumerate(examples):
        why = runnable(example)
        if why:
            outcomes[example.id] = Outcome(example, "not run", reason=why)
            continue
        p = Prepared(example, {}, {}, {})
        for variant in VARIANTS:
            p.prefix[variant] = f"dt{token}.{variant[0]}{i}."
            name = f"dt{token}.own.{variant[0]}{i} {example.id}"
            p.experiment_id[variant] = reader.call("POST", "experiments/create", {"name": name})[
                "experiment_id"
            ]
            p.workdir[variant] = root / variant / str(i)
            (p.workdir[variant] / "tmp").mkdir(parents=True)
        prepared.append(p)

    items: dict[str, list[dict[str, Any]]] = {}
    for variant in VARIANTS:
        items[variant] = []
        for p in prepared:
            source = known.repaired(p.example)
            source = isolate(source, p.prefix[variant], p.experiment_id[variant], str(p.workdir[variant]))
            if variant == "tracklane":
                source = to_tracklane(source)
            (p.workdir[variant] / "example.py").write_text(source)
            items[variant].append(
                {
                    "id": p.example.id,
                    "source": source,
                    "cwd": str(p.workdir[variant]),
                    "env": {"MLFLOW_EXPERIMENT_ID": p.experiment_id[variant]},
                    "timeout": EXAMPLE_TIMEOUT,
                }
            )
    ran = run_runners(items, root, server)
    ran_at = time.monotonic()
    # Reading the server back is many small requests: a few at a time.
    with ThreadPoolExecutor(4) as pool:
        compared = pool.map(
            lambda p: compare_one(p, reader, server, {v: ran[v][p.example.id] for v in VARIANTS}), prepared
        )
        outcomes.update((o.example.id, o) for o in compared)
    print(
        f"differential: {len(prepared)} examples run both ways in {ran_at - started:.0f} s, "
        f"compared in {time.monotonic() - ran_at:.0f} s",
        file=sys.stderr,
    )
    return [outcomes[e.id] for e in examples]


def run_runners(items: dict[str, list[dict[str, Any]]], root: Path, server: str) -> dict[str, dict[str, Any]]:
    """One fork server per variant, all at once; each example's exit status, by variant and id."""
    env = base_env(server)
    procs = {}
    for variant, examples in items.items():
        spec, result = root / f"{variant}-spec.json", root / f"{variant}-result.json"
        spec.write_text(
            json.dumps(
                {"env": {}, "preimport": PREIMPORT[variant], "parallel": PARALLEL, "examples": examples}
            )
        )
        with (root / f"{variant}-runner.log").open("w") as log:  # the child keeps its own descriptor
            procs[variant] = (
                subprocess.Popen(
                    [sys.executable, str(RUNNER), str(spec), str(result)],
                    cwd=root,
                    env=env,
                    stdout=log,
                    stderr=log,
                ),
                result,
            )
    budget = EXAMPLE_TIMEOUT * 2 + 20 * max(len(e) for e in items.values())
    deadline = time.monotonic() + budget
    ran = {}
    for variant, (proc, result) in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            raise AssertionError(f"the {variant} runner did not finish within {budget:.0f} s") from None
        if proc.returncode != 0:
            log_text = (root / f"{variant}-runner.log").read_text()[-3000:]
            raise AssertionError(f"the {variant} runner failed ({proc.returncode}):\n{log_text}")
        ran[variant] = {r["id"]: r for r in json.loads(result.read_text())}
    return ran


def compare_one(p: Prepared, reader: Reader, server: str, ran: dict[str, dict[str, Any]]) -> Outcome:
    sides: dict[str, dict[str, Any]] = {}
    outcome = Outcome(p.example, "same")
    for variant in VARIANTS:
        workdir = p.workdir[variant]
        state, labels = collect(reader, p.experiment_id[variant], p.prefix[variant])

        def masked(text: str, variant: str = variant, labels: Any = labels) -> str:
            return mask(
                text, prefix=p.prefix[variant], workdir=str(p.workdir[variant]), server=server, labels=labels
            )

        stderr = (workdir / "stderr.txt").read_text(errors="replace")
        error = masked(last_error(stderr))
        if ran[variant]["timed_out"]:
            error = f"timed out after {EXAMPLE_TIMEOUT:.0f} s"
        elif ran[variant]["returncode"] != 0 and not error:
            error = f"exit status {ran[variant]['returncode']}"
        sides[variant] = {
            "error": error,
            "stdout": masked((workdir / "stdout.txt").read_text(errors="replace")),
            "server": state,
        }
        outcome.seconds[variant] = ran[variant]["seconds"]
        if error:
            outcome.errors[variant] = error
    for aspect in ("error", "stdout", "server"):
        text = diff(f"{p.example.id} {aspect}", sides["mlflow"][aspect], sides["tracklane"][aspect])
        if text:
            outcome.diffs[aspect] = text
    if outcome.diffs:
        outcome.status = "differs"
    return outcome


def native(name: str) -> dict[str, bool]:
    """Whether tracklane implements ``name`` itself, per face of the seeds that has it (an
    attribute reached through a module ``__getattr__`` onto MLflow's own does not count)."""
    import tracklane.mlflow as face
    from tracklane import MlflowClient

    found: dict[str, bool] = {}
    if name in SEED_003 or name in SEED_002_MODULE:
        found["mlflow"] = name in vars(face)
    if name in SEED_002_CLIENT:
        found["MlflowClient"] = any(name in vars(k) for k in MlflowClient.__mro__ if k is not object)
    return found


def results(outcomes: list[Outcome]) -> dict[str, Any]:
    """What the README table is generated from: deterministic, so the file changes only when an
    outcome does."""
    import mlflow

    records = []
    for o in outcomes:
        record = o.record()
        entry = known.KNOWN_DIFFERENCES.get(o.example.id)
        if entry is not None and entry.sometimes and record["status"] == "same":
            record.update(status="differs", aspects=sorted(entry.aspects))
        records.append(record)
    return {
        "mlflow_version": mlflow.__version__,
        "examples": records,
        "native": {name: native(name) for name in seed_functions()},
    }
