"""``tracklane.mlflow`` is a superset of ``mlflow``: MLflow's other attributes act on tracklane's runs.

Programs run in processes of their own (MLflow's module state is process-wide). Seed 003's own
example and an autolog sweep run once with ``import mlflow`` and once with ``import tracklane.mlflow
as mlflow`` against the same real server; what the server stored must be the same (``mlflow_stored``).
The run-stack checks mix both modules in one program, in several threads, and read back what the
server stored for each run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlflow_stored import differential, run_process, run_program

from servers import Reader

pytestmark = pytest.mark.server

PRELUDE = """
import sys
if sys.argv[3] == "tracklane":
    import tracklane.mlflow as mlflow
else:
    import mlflow
url, experiment = sys.argv[1:3]
"""

# Seed 003's "housing-price-prediction" example as printed, with two changes a user would accept:
# smaller data (and seeds, so both runs compute the same numbers), and the model pickled with
# cloudpickle, since MLflow 3.17's default format (skops) refuses a RandomForest in MLflow itself.
SEED_003_HOUSING = (
    PRELUDE
    + """
import numpy as np
from sklearn.ensemble import RandomForestRegressor
from sklearn.model_selection import train_test_split
from sklearn.metrics import mean_squared_error

mlflow.set_tracking_uri(url)

# Set experiment
mlflow.set_experiment(experiment)

# Generate sample data
rng = np.random.RandomState(0)
X = rng.rand(200, 10)
y = rng.rand(200)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0)

# Start run
with mlflow.start_run(run_name="random-forest-experiment"):
    # Log parameters
    n_estimators = 10
    max_depth = 5
    mlflow.log_param("n_estimators", n_estimators)
    mlflow.log_param("max_depth", max_depth)

    # Train model
    model = RandomForestRegressor(n_estimators=n_estimators, max_depth=max_depth, random_state=0)
    model.fit(X_train, y_train)

    # Make predictions and calculate metrics
    y_pred = model.predict(X_test)
    mse = mean_squared_error(y_test, y_pred)

    # Log metrics
    mlflow.log_metric("mse", mse)
    mlflow.log_metric("rmse", np.sqrt(mse))

    # Log model
    mlflow.sklearn.log_model(model, "model", serialization_format="cloudpickle")

    # Log additional artifacts
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(8, 6))
    plt.scatter(y_test, y_pred, alpha=0.6)
    plt.xlabel("Actual")
    plt.ylabel("Predicted")
    plt.savefig("predictions.png")
    mlflow.log_artifact("predictions.png")
"""
)


def _ways(server_url: str) -> dict[str, tuple[str, str]]:
    return {"mlflow": (server_url, "mlflow"), "tracklane": (server_url, "tracklane")}


@pytest.mark.slow
def test_seed_003_housing_example_stores_with_tracklane_mlflow_what_it_stores_with_mlflow(
    tmp_path: Path, server_url: str
) -> None:
    results = differential(tmp_path, server_url, SEED_003_HOUSING, _ways(server_url))

    (_, expected), (_, got) = results["mlflow"], results["tracklane"]
    assert got == expected
    [run] = got["runs"]
    assert run["status"] == "FINISHED" and run["artifacts"] == ["predictions.png"]
    assert run["params"] == {"n_estimators": "10", "max_depth": "5"} and set(run["metrics"]) == {
        "mse",
        "rmse",
    }
    [model] = got["models"]
    assert model["run"] == run["name"] and model["status"] == "LOGGED_MODEL_READY"
    assert model["artifacts"] == ["MLmodel", "conda.yaml", "model.pkl", "python_env.yaml", "requirements.txt"]


AUTOLOG_PROGRAM = (
    PRELUDE
    + """
from sklearn.datasets import load_iris
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

mlflow.set_tracking_uri(url)
mlflow.set_experiment(experiment)
mlflow.autolog()  # MLflow's generic autolog: sklearn's
X, y = load_iris(return_X_y=True)
search = GridSearchCV(SVC(kernel="linear", random_state=0), {"C": [1, 10]}, cv=2)
search.fit(X, y)  # no run started: autolog starts one, and ends it
with mlflow.start_run(run_name="explicit"):
    mlflow.log_input(mlflow.data.from_numpy(X, name="iris"), context="training")
    search.fit(X, y)
"""
)


@pytest.mark.slow
def test_autolog_and_log_input_through_tracklane_mlflow_store_what_mlflow_stores(
    tmp_path: Path, server_url: str
) -> None:
    results = differential(tmp_path, server_url, AUTOLOG_PROGRAM, _ways(server_url))

    (_, expected), (_, got) = results["mlflow"], results["tracklane"]
    assert got == expected
    parents = [r for r in got["runs"] if r["parent"] is None]
    assert len(parents) == 2 and len(got["runs"]) == 2 + 2 * 2  # each search's two candidates
    assert all(r["status"] == "FINISHED" for r in got["runs"])
    assert all("estimator.html" in p["artifacts"] for p in parents)
    assert any("iris" in p["inputs"] for p in parents)
    assert len(got["models"]) == 4


RUN_STACK_PROGRAM = """
import json, sys, threading
import numpy as np
from sklearn.linear_model import LinearRegression
import tracklane.mlflow as tm
import mlflow  # MLflow's own module, in the same program: the two must agree

url, experiment = sys.argv[1:3]
tm.set_tracking_uri(url)
tm.set_experiment(experiment)
sklearn = tm.sklearn  # MLflow's own attribute through tracklane.mlflow: MLflow now follows tracklane
X = np.random.RandomState(0).rand(10, 2)
y = X @ np.array([1.0, 2.0])
report = {"threads": {}}

def worker(i):
    with tm.start_run(run_name=f"thread-{i}") as run:
        seen = mlflow.active_run().info.run_id
        tm.log_metric("m", float(i))
        mlflow.log_param("via_mlflow", i)  # MLflow's fluent call, on tracklane's active run
        info = sklearn.log_model(LinearRegression().fit(X, y), name=f"model-{i}")
    report["threads"][i] = {
        "run": run.info.run_id, "mlflow_sees": seen, "after": mlflow.active_run() is None,
        "model_run": mlflow.get_logged_model(info.model_id).source_run_id,
    }

threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join(300)

with mlflow.start_run(run_name="started-by-mlflow") as run:  # MLflow's own start_run
    report["tracklane_sees"] = tm.active_run().info.run_id == run.info.run_id
    tm.log_metric("x", 1.0)
report["from_mlflow"] = run.info.run_id
report["tracklane_after"] = tm.active_run() is None

with tm.start_run(run_name="killed-by-mlflow") as run:
    mlflow.end_run(status="KILLED")  # ended from MLflow's side: the with block must not end it again
    report["none_active"] = tm.active_run() is None and mlflow.active_run() is None
report["killed"] = run.info.run_id

with tm.start_run(run_name="parent") as parent:
    with tm.start_run(run_name="child", nested=True) as child:
        mlflow.end_run()  # ends the child only
    report["parent_still_active"] = mlflow.active_run().info.run_id == parent.info.run_id
report["parent"], report["child"] = parent.info.run_id, child.info.run_id
print(json.dumps(report), flush=True)
"""


def test_runs_started_by_either_module_are_the_active_run_of_both_in_every_thread_and_end_once(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader
) -> None:
    stdout = run_program(tmp_path, RUN_STACK_PROGRAM, server_url, experiment_name)
    [line] = [line for line in stdout.splitlines() if line.startswith("{")]
    report = json.loads(line)

    assert len(report["threads"]) == 3
    for i, seen in report["threads"].items():
        run_id = seen["run"]
        assert seen["mlflow_sees"] == run_id and seen["model_run"] == run_id and seen["after"]
        assert reader.params(run_id) == {"via_mlflow": i}
        assert [v for v, _, _ in reader.history(run_id, "m")] == [float(i)]
        assert reader.run(run_id)["info"]["status"] == "FINISHED"
    assert report["tracklane_sees"] and report["tracklane_after"]
    assert [v for v, _, _ in reader.history(report["from_mlflow"], "x")] == [1.0]
    assert reader.run(report["from_mlflow"])["info"]["status"] == "FINISHED"
    assert report["none_active"]
    assert reader.run(report["killed"])["info"]["status"] == "KILLED"
    assert report["parent_still_active"]
    assert reader.tags(report["child"])["mlflow.parentRunId"] == report["parent"]
    assert reader.run(report["child"])["info"]["status"] == "FINISHED"
    assert reader.run(report["parent"])["info"]["status"] == "FINISHED"


CRASH_PROGRAM = """
import sys
import numpy as np
import tracklane.mlflow as mlflow

mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment(sys.argv[2])
mlflow.start_run(run_name="crashes")
mlflow.log_input(mlflow.data.from_numpy(np.zeros(2), name="d"))  # MLflow linked: its exit hook too
print(mlflow.active_run().info.run_id, flush=True)
raise RuntimeError("the training crashed")
"""


def test_a_run_active_when_the_process_dies_of_an_exception_ends_failed_with_mlflow_linked(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader
) -> None:
    result = run_process(tmp_path, CRASH_PROGRAM, server_url, experiment_name)

    assert result.returncode == 1 and "the training crashed" in result.stderr
    run_id = result.stdout.split()[0]
    assert reader.run(run_id)["info"]["status"] == "FAILED"  # tracklane's exit, not MLflow's FINISHED


LAZY_PROGRAM = """
import json, sys
import tracklane.mlflow as mlflow

imported_at_import = "mlflow" in sys.modules
mlflow.set_tracking_uri(sys.argv[1])
with mlflow.start_run():
    mlflow.log_metric("loss", 0.5)
    mlflow.log_params({"lr": 0.1})
dunder = hasattr(mlflow, "__wrapped__")
report = {"at_import": imported_at_import, "after_logging": "mlflow" in sys.modules, "dunder": dunder}
exception = mlflow.MlflowException  # an attribute of MLflow's: now MLflow is imported
import mlflow as real
report["forwarded"] = all(
    getattr(mlflow, name) is getattr(real, name)
    for name in ("MlflowException", "Image", "models", "data", "log_input", "evaluate",
                 "register_model", "autolog", "sklearn", "pytorch", "transformers")
)
# ``exceptions`` is tracklane's own module (it must exist without MLflow too); with MLflow installed
# every name in it is MLflow's.
report["forwarded"] = report["forwarded"] and all(
    getattr(mlflow.exceptions, name) is getattr(real.exceptions, name)
    for name in ("MlflowException", "RestException", "MlflowTracingException")
)
print(json.dumps(report), flush=True)
"""


def test_mlflow_is_imported_only_when_one_of_its_own_attributes_is_used(
    tmp_path: Path, server_url: str
) -> None:
    stdout = run_program(tmp_path, LAZY_PROGRAM, server_url)

    report = json.loads(stdout.splitlines()[-1])
    assert report == {"at_import": False, "after_logging": False, "dunder": False, "forwarded": True}


WITHOUT_MLFLOW = """
import sys
sys.modules["mlflow"] = None  # as if MLflow were not installed
import tracklane.mlflow as mlflow
try:
    mlflow.sklearn
except ImportError as exc:
    print(exc)
"""


def test_without_mlflow_its_attributes_raise_an_import_error_naming_the_extra(tmp_path: Path) -> None:
    stdout = run_program(tmp_path, WITHOUT_MLFLOW)

    assert "tracklane.mlflow.sklearn is MLflow's own" in stdout
    assert "pip install 'tracklane[mlflow]'" in stdout
