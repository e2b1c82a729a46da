"""tracklane's MLflow faces (``tracklane.mlflow``, ``tracklane.MlflowClient``) store what MLflow's own
client stores.

The differential test runs one scenario (``mlflow_scenario.py``) twice against the same real server,
once with ``import mlflow`` and once with ``import tracklane.mlflow as mlflow``, each in a process of
its own, and compares what the server holds afterwards, read through its REST API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from mlflow_scenario import EXPLICIT_TS_KEYS, RUN_NAMES

from servers import MlflowServer, Reader

TESTS = Path(__file__).parent
SCENARIO = TESTS / "mlflow_scenario.py"
VARIANTS = ("mlflow", "tracklane")
#: Tags whose values depend on the machine or the client library: compared apart from the rest.
METADATA_TAGS = ("mlflow.user", "mlflow.source.")
#: Tags no comparison looks at.
IGNORED_TAGS = ("mlflow.log-model.history", "tracklane.")
#: What the scenario's programs saw that comes from a search.
SEARCHES = (
    "search_fluent_list",
    "search_fluent_pandas",
    "search_client_status",
    "search_client_pages",
    "search_client_tag_and_param",
)


def subprocess_env(server_url: str, **extra: str) -> dict[str, str]:
    """The test process's environment without any tracking settings of the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OIP_", "TRACKLANE_"))}
    # MLflow 3 reports usage to a server outside this machine unless told not to.
    env.update(MLFLOW_TRACKING_URI=server_url, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --- reading what the server stored ----------------------------------------------------------------


def stored_snapshot(reader: Reader, experiment: str) -> dict[str, Any]:
    """What the server holds for ``experiment``, per run name, without ids and call-time timestamps.

    Parents are given by name (from the ``mlflow.parentRunId`` tag). Metric histories are
    ``key -> [(value, step)]``, with the timestamp added for the keys the scenario stamps itself.
    Machine-dependent tags are kept apart under ``metadata``.
    """
    exp = reader.experiment(experiment)
    assert exp is not None, f"experiment {experiment!r} was not created"
    runs = reader.runs(exp["experiment_id"])
    name_of = {r["info"]["run_id"]: r["info"]["run_name"] for r in runs}
    assert len(set(name_of.values())) == len(runs), f"run names are not unique: {sorted(name_of.values())}"
    snapshot: dict[str, Any] = {
        "experiment_tags": {
            t["key"]: t["value"] for t in exp.get("tags", []) if not t["key"].startswith("mlflow.")
        },
        "runs": {},
    }
    for run in runs:
        info, data = run["info"], run["data"]
        tags = {t["key"]: t["value"] for t in data.get("tags", []) if not t["key"].startswith(IGNORED_TAGS)}
        parent = tags.pop("mlflow.parentRunId", None)
        metadata = {k: tags.pop(k) for k in list(tags) if k.startswith(METADATA_TAGS)}
        metadata["user_id"] = info.get("user_id")
        keys = sorted({m["key"] for m in data.get("metrics", [])})
        snapshot["runs"][info["run_name"]] = {
            "status": info["status"],
            "lifecycle_stage": info["lifecycle_stage"],
            "ended": info.get("end_time") is not None,
            "parent": name_of.get(parent, parent) if parent else None,
            "params": {p["key"]: p["value"] for p in data.get("params", [])},
            "tags": tags,
            "latest": {m["key"]: (float(m["value"]), int(m["step"])) for m in data.get("metrics", [])},
            "history": {
                key: [
                    (value, step, ts) if key in EXPLICIT_TS_KEYS else (value, step)
                    for value, step, ts in reader.history(info["run_id"], key)
                ]
                for key in keys
            },
            "metadata": metadata,
        }
    return snapshot


def without_metadata(stored: dict[str, Any]) -> dict[str, Any]:
    runs = {name: {k: v for k, v in run.items() if k != "metadata"} for name, run in stored["runs"].items()}
    return {**stored, "runs": runs}


def differences(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Readable differences between two JSON-like values: ``where: mlflow has X, tracklane has Y``."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out: list[str] = []
        for key in sorted(set(expected) | set(actual), key=str):
            path = f"{where}.{key}" if where else str(key)
            if key not in actual:
                out.append(f"{path}: mlflow has {expected[key]!r}, tracklane has nothing")
            elif key not in expected:
                out.append(f"{path}: mlflow has nothing, tracklane has {actual[key]!r}")
            else:
                out += differences(expected[key], actual[key], path)
        return out
    if _jsonable(expected) != _jsonable(actual):
        return [f"{where}: mlflow has {expected!r}, tracklane has {actual!r}"]
    return []


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples and lists compare equal, as after a JSON round trip


# --- the differential scenario ---------------------------------------------------------------------


class Outcome(NamedTuple):
    """One variant's run of the scenario: what the program saw, and what the server then held."""

    variant: str
    experiment: str
    returncode: int
    output: str
    seen: dict[str, Any]
    ids: dict[str, str]
    stored: dict[str, Any] | None

    def require(self) -> Outcome:
        if self.returncode != 0:
            pytest.fail(f"the scenario with {self.variant} exited {self.returncode}:\n{_tail(self.output)}")
        return self


@pytest.fixture(scope="module")
def outcomes(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Both variants of the scenario, run at the same time on the session's server."""
    workdir = tmp_path_factory.mktemp("mlflow-faces")
    tag = uuid.uuid4().hex[:6]
    started = {}
    for variant in VARIANTS:
        experiment = f"faces-scenario-{variant}-{tag}"
        out = workdir / f"{variant}.json"
        log = open(workdir / f"{variant}.log", "w+")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, str(SCENARIO), variant, experiment, str(out)],
            env=subprocess_env(mlflow_server.url),
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started[variant] = (proc, experiment, out, log)
    reader = Reader(mlflow_server.url)
    results = {}
    for variant, (proc, experiment, out, log) in started.items():
        try:
            returncode = proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait(timeout=30)
            log.write("\n[the test killed the scenario after 240 s]\n")
        log.seek(0)
        output = log.read()
        log.close()
        result = json.loads(out.read_text()) if returncode == 0 and out.exists() else {"seen": {}, "ids": {}}
        stored = None
        if reader.experiment(experiment):
            try:
                stored = stored_snapshot(reader, experiment)
            except AssertionError as exc:  # reported by the tests that need the snapshot
                output += f"\n[reading what the server stored failed: {exc}]\n"
        results[variant] = Outcome(
            variant, experiment, returncode, output, result["seen"], result["ids"], stored
        )
    return results


def test_scenario_with_mlflow_stores_what_mlflow_documents(outcomes: dict[str, Outcome]) -> None:
    """Pins the reference side: if this fails, the scenario or the snapshot is wrong, not tracklane."""
    ref = outcomes["mlflow"].require()
    assert ref.stored is not None
    runs = ref.stored["runs"]
    assert sorted(runs) == sorted(RUN_NAMES)
    assert {name: r["status"] for name, r in runs.items()} == {
        "parent": "FINISHED",
        "child-a": "FINISHED",
        "child-b": "FINISHED",
        "adopted": "FINISHED",
        "killed": "KILLED",
        "failing": "FAILED",
        "left-open": "FINISHED",  # ended by the fluent module at process exit
    }
    assert {name: r["parent"] for name, r in runs.items() if r["parent"]} == {
        "child-a": "parent",
        "child-b": "parent",
        "adopted": "parent",
    }
    parent = runs["parent"]
    assert parent["params"] == {"lr": "0.1", "layers": "4", "optimizer": "adam"}
    assert parent["tags"] == {
        "mlflow.runName": "parent",
        "mlflow.note.content": "the parent run",
        "team": "nlp",
        "stage": "train",
        "owner": "ci",
        "epochs": "3",
    }
    assert parent["history"]["loss"] == [(1.0, 0), (0.75, 1), (0.5, 2)]
    assert parent["history"]["no_step"] == [(2.5, 0)]
    assert runs["child-b"]["history"]["batch_loss"] == [
        (0.9, 0, 1_700_000_000_000),
        (0.8, 1, 1_700_000_001_000),
    ]
    assert runs["child-b"]["params"] == {"lr": "0.01", "source": "batch"}
    assert runs["child-a"]["history"]["loss"] == [(0.5, 1), (0.1, 5)]
    assert runs["child-a"]["tags"]["resumed"] == "yes"
    assert runs["killed"]["tags"] == {"mlflow.runName": "killed", "origin": "client", "phase": "warmup"}
    assert ref.stored["experiment_tags"] == {"purpose": "differential", "suite": "faces", "round": "1"}
    assert ref.seen["search_fluent_list"] == ["child-a", "adopted", "parent", "failing"]


def test_tracklane_drop_in_stores_the_same_runs_as_mlflow(outcomes: dict[str, Outcome]) -> None:
    ref, ours = outcomes["mlflow"].require(), outcomes["tracklane"]
    assert ref.stored is not None
    assert ours.stored is not None, f"tracklane created no experiment:\n{_tail(ours.output)}"
    diffs = differences(without_metadata(ref.stored), without_metadata(ours.stored))
    assert not diffs, "the server holds something else after the tracklane run:\n" + "\n".join(diffs)
    ours.require()


def test_tracklane_drop_in_answers_searches_like_mlflow(outcomes: dict[str, Outcome]) -> None:
    ref, ours = outcomes["mlflow"].require(), outcomes["tracklane"].require()
    diffs = differences({k: ref.seen[k] for k in SEARCHES}, {k: ours.seen.get(k) for k in SEARCHES})
    assert not diffs, "searches answer differently:\n" + "\n".join(diffs)


def test_tracklane_drop_in_read_calls_answer_like_mlflow(outcomes: dict[str, Outcome]) -> None:
    ref, ours = outcomes["mlflow"].require(), outcomes["tracklane"].require()
    expected = {k: v for k, v in ref.seen.items() if k not in SEARCHES and k != "experiment_name"}
    actual = {k: v for k, v in ours.seen.items() if k not in SEARCHES and k != "experiment_name"}
    diffs = differences(expected, actual)
    assert not diffs, "the program saw something else with tracklane:\n" + "\n".join(diffs)


def test_tracklane_drop_in_sets_mlflows_run_metadata_tags(outcomes: dict[str, Outcome]) -> None:
    ref, ours = outcomes["mlflow"].require(), outcomes["tracklane"].require()
    assert ref.stored is not None and ours.stored is not None
    for outcome in (ref, ours):
        for name, run in outcome.stored["runs"].items():  # type: ignore[index]
            if name != "killed":  # MlflowClient.create_run adds no context tags, in MLflow either
                assert {"mlflow.user", "mlflow.source.name"} <= set(run["metadata"]), (outcome.variant, name)
    # Both programs ran as the same user from the same script, so even these values must agree.
    diffs = differences(
        {n: r["metadata"] for n, r in ref.stored["runs"].items()},
        {n: r["metadata"] for n, r in ours.stored["runs"].items()},
    )
    assert not diffs, "run metadata differs:\n" + "\n".join(diffs)


# --- MlflowClient: many runs from one client --------------------------------------------------------


@pytest.fixture
def tracklane_mlflow_client(server_url: str) -> Iterator[Any]:
    from tracklane import MlflowClient

    client = MlflowClient(server_url)
    yield client
    assert client.flush(timeout=60), "tracklane's MlflowClient did not deliver everything within 60 s"


def test_mlflow_client_log_metric_interleaved_across_three_runs_puts_every_point_on_its_run(
    tracklane_mlflow_client: Any, experiment_name: str, reader: Reader
) -> None:
    client = tracklane_mlflow_client
    points = 5000
    experiment_id = client.create_experiment(experiment_name)
    run_ids = [client.create_run(experiment_id, run_name=name).info.run_id for name in ("a", "b", "c")]

    for step in range(points):
        for index, run_id in enumerate(run_ids):
            client.log_metric(run_id, "x", float(index * 1_000_000 + step), step=step)
    for run_id in run_ids:
        client.set_terminated(run_id)

    for index, run_id in enumerate(run_ids):
        stored = [(value, step) for value, step, _ in reader.history(run_id, "x")]
        assert stored == [(float(index * 1_000_000 + step), step) for step in range(points)], run_id
        assert reader.run(run_id)["info"]["status"] == "FINISHED"


# --- the fluent module, in processes of their own -----------------------------------------------------

PRELUDE = {
    "mlflow": "import mlflow\nfrom mlflow import MlflowClient\n",
    "tracklane": "import tracklane.mlflow as mlflow\nfrom tracklane import MlflowClient\n",
}


def run_fluent(
    variant: str, body: str, server_url: str, cwd: Path, timeout: float = 180, **env: str
) -> dict[str, Any]:
    """Run ``body`` with ``mlflow`` bound to ``variant``'s fluent module; return what it put in ``out``."""
    out_file = cwd / f"out-{uuid.uuid4().hex[:8]}.json"
    script = (
        "import json, sys\n"
        + PRELUDE[variant]
        + "out = {}\n"
        + body
        + f"\njson.dump(out, open({str(out_file)!r}, 'w'))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env(server_url, **env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{variant} exited {proc.returncode}:\n{_tail(proc.stdout + proc.stderr)}"
    return dict(json.loads(out_file.read_text()))


def create_run_over_rest(reader: Reader, experiment_name: str, run_name: str) -> tuple[str, str]:
    """An experiment and a FINISHED run in it, made without any client library: (experiment id, run id)."""
    experiment_id = reader.call("POST", "experiments/create", {"name": experiment_name})["experiment_id"]
    run = reader.call(
        "POST",
        "runs/create",
        {"experiment_id": experiment_id, "run_name": run_name, "start_time": int(time.time() * 1000)},
    )["run"]
    run_id = run["info"]["run_id"]
    reader.call(
        "POST", "runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": int(time.time() * 1000)}
    )
    return experiment_id, run_id


def test_start_run_tags_dict_stores_mlflow_tags_and_list_stores_oicm_user_tags(
    server_url: str, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    body = f"""
mlflow.set_experiment({experiment_name!r})
with mlflow.start_run(run_name="dict", tags={{"team": "nlp"}}) as run:
    out["dict"] = run.info.run_id
with mlflow.start_run(run_name="list", tags=["baseline"]) as run:
    out["list"] = run.info.run_id
"""
    ids = run_fluent("tracklane", body, server_url, tmp_path)

    dict_tags, list_tags = reader.tags(ids["dict"]), reader.tags(ids["list"])
    assert dict_tags["team"] == "nlp"
    assert list_tags["baseline"] == "_OI_USER_TAG"
    assert "team" not in list_tags and "baseline" not in dict_tags


def test_synchronous_log_calls_are_on_the_server_when_they_return(
    server_url: str, experiment_name: str, tmp_path: Path
) -> None:
    # A backlog of queued points first, so that a call which only queued would be caught reading too early.
    body = f"""
from servers import Reader
reader = Reader({server_url!r})
mlflow.set_experiment({experiment_name!r})
with mlflow.start_run(run_name="sync") as run:
    run_id = run.info.run_id
    for i in range(20000):
        mlflow.log_metric("backlog", float(i), step=i)
    mlflow.log_metric("probe", 1.5, step=7, synchronous=True)
    out["fluent_metric"] = [p[:2] for p in reader.history(run_id, "probe")]
    mlflow.log_param("probe_param", "v1", synchronous=True)
    out["fluent_param"] = reader.params(run_id).get("probe_param")
    mlflow.set_tag("probe_tag", "t1", synchronous=True)
    out["fluent_tag"] = reader.tags(run_id).get("probe_tag")
    client = MlflowClient()
    for i in range(20000):
        client.log_metric(run_id, "backlog2", float(i), step=i)
    client.log_metric(run_id, "probe_client", 2.5, step=3, synchronous=True)
    out["client_metric"] = [p[:2] for p in reader.history(run_id, "probe_client")]
"""
    seen = run_fluent("tracklane", body, server_url, tmp_path)

    assert seen == {
        "fluent_metric": [[1.5, 7]],
        "fluent_param": "v1",
        "fluent_tag": "t1",
        "client_metric": [[2.5, 3]],
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_mlflow_run_id_env_makes_start_run_resume_that_run_once(
    variant: str, server_url: str, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    experiment_id, run_id = create_run_over_rest(reader, experiment_name, "to-resume")
    body = f"""
with mlflow.start_run() as run:
    out["resumed"] = run.info.run_id
    mlflow.log_metric("after_resume", 1.0, step=1)
with mlflow.start_run(run_name="next", experiment_id={experiment_id!r}) as run:
    out["next"] = run.info.run_id
"""
    seen = run_fluent(variant, body, server_url, tmp_path, MLFLOW_RUN_ID=run_id)

    assert seen["resumed"] == run_id
    assert seen["next"] != run_id  # the variable resumes one run, not every later one
    assert [p[:2] for p in reader.history(run_id, "after_resume")] == [(1.0, 1)]
    assert reader.run(run_id)["info"]["status"] == "FINISHED"
    assert sorted(r["info"]["run_name"] for r in reader.runs(experiment_id)) == ["next", "to-resume"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_mlflow_experiment_name_env_picks_the_experiment_and_creates_it(
    variant: str, server_url: str, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    body = """
with mlflow.start_run(run_name="env-picked") as run:
    mlflow.log_param("a", "1")
"""
    run_fluent(variant, body, server_url, tmp_path, MLFLOW_EXPERIMENT_NAME=experiment_name)

    experiment = reader.experiment(experiment_name)
    assert experiment is not None
    runs = reader.runs(experiment["experiment_id"])
    assert [(r["info"]["run_name"], r["info"]["status"]) for r in runs] == [("env-picked", "FINISHED")]
    assert reader.params(runs[0]["info"]["run_id"]) == {"a": "1"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_mlflow_experiment_id_env_picks_the_experiment(
    variant: str, server_url: str, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    experiment_id = reader.call("POST", "experiments/create", {"name": experiment_name})["experiment_id"]
    body = """
with mlflow.start_run(run_name="env-picked-by-id") as run:
    out["experiment_id"] = run.info.experiment_id
"""
    seen = run_fluent(variant, body, server_url, tmp_path, MLFLOW_EXPERIMENT_ID=experiment_id)

    assert seen["experiment_id"] == experiment_id
    assert [r["info"]["run_name"] for r in reader.runs(experiment_id)] == ["env-picked-by-id"]
