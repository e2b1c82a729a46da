"""One MLflow scenario, written against MLflow's fluent API and ``MlflowClient`` only.

Run it with MLflow's own client or with tracklane's drop-in, each in a process of its own (the fluent
module keeps process-global state and ends open runs at exit)::

    MLFLOW_TRACKING_URI=http://127.0.0.1:P python mlflow_scenario.py {mlflow|tracklane} EXPERIMENT OUT.json

It writes to OUT.json what the program itself saw (run ids by name, search results, what the read calls
answered); ``tests/test_mlflow_faces.py`` then reads what the server stored and compares the two variants.
Importing this module imports neither MLflow nor tracklane.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NamedTuple

#: Timestamps the scenario passes itself (ms since the epoch): the server must store them as given.
FIXED_TS = 1_700_000_000_000
#: Metric keys logged only with explicit timestamps: their stored timestamps are compared too.
EXPLICIT_TS_KEYS = frozenset({"batch_loss", "killed_x", "stamped"})
#: Run names the scenario creates, in order.
RUN_NAMES = ("parent", "child-a", "child-b", "adopted", "killed", "failing", "left-open")


class Api(NamedTuple):
    mlflow: Any
    client_class: Any
    metric: Any
    param: Any
    run_tag: Any


def load(variant: str) -> Api:
    """MLflow's modules, or tracklane's drop-ins for them."""
    if variant == "mlflow":
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag
    elif variant == "tracklane":
        import tracklane.mlflow as mlflow  # type: ignore[no-redef]
        from tracklane import MlflowClient  # type: ignore[no-redef]
        from tracklane.entities import Metric, Param, RunTag  # type: ignore[no-redef]
    else:
        raise SystemExit(f"unknown variant {variant!r}: use mlflow or tracklane")
    return Api(mlflow, MlflowClient, Metric, Param, RunTag)


def _names(runs: Any) -> list[str]:
    return [r.info.run_name for r in runs]


def scenario(api: Api, experiment: str) -> dict[str, Any]:
    """Log the scenario into ``experiment``; return what the program saw (JSON-able)."""
    mlflow = api.mlflow
    client = api.client_class()  # the tracking URI comes from MLFLOW_TRACKING_URI
    ids: dict[str, str] = {}
    seen: dict[str, Any] = {}

    exp = mlflow.set_experiment(experiment)
    exp_id = exp.experiment_id
    seen["experiment_name"] = exp.name
    mlflow.set_experiment_tag("purpose", "differential")
    mlflow.set_experiment_tags({"suite": "faces", "round": 1})

    with mlflow.start_run(run_name="parent", description="the parent run", tags={"team": "nlp"}) as parent:
        ids["parent"] = parent.info.run_id
        seen["parent_info"] = {
            "name": parent.info.run_name,
            "status": parent.info.status,
            "experiment_id_matches": parent.info.experiment_id == exp_id,
        }
        mlflow.log_params({"lr": 0.1, "layers": 4})
        mlflow.log_param("optimizer", "adam")
        mlflow.set_tag("stage", "train")
        mlflow.set_tags({"owner": "ci", "scratch": "to-delete", "epochs": 3})
        mlflow.delete_tag("scratch")
        for step in range(3):
            mlflow.log_metric("loss", 1.0 - 0.25 * step, step=step)
        mlflow.log_metrics({"acc": 0.5, "f1": 0.25}, step=7)
        mlflow.log_metric("no_step", 2.5)  # MLflow's default step is 0
        mlflow.log_metric("stamped", 3.5, step=1, timestamp=FIXED_TS + 5)
        mlflow.log_metric("async_loss", 0.75, step=1, synchronous=False)
        with mlflow.start_run(run_name="child-a", nested=True) as child_a:
            ids["child-a"] = child_a.info.run_id
            seen["active_in_child_a"] = mlflow.active_run().info.run_name
            mlflow.log_param("lr", "0.1")
            mlflow.log_metrics({"loss": 0.5, "acc": 0.7}, step=1)
        with mlflow.start_run(run_name="child-b", nested=True) as child_b:
            ids["child-b"] = child_b.info.run_id
            mlflow.log_param("lr", 0.01)
            mlflow.log_metric("loss", 0.3, step=1)
        seen["active_after_children"] = mlflow.active_run().info.run_name
    seen["active_after_parent"] = mlflow.active_run()

    # A child whose parent has ended: parent_run_id instead of nesting.
    with mlflow.start_run(run_name="adopted", parent_run_id=ids["parent"]) as adopted:
        ids["adopted"] = adopted.info.run_id
        mlflow.log_param("lr", "0.1")
        mlflow.log_metric("loss", 0.2, step=2)

    # MlflowClient.log_batch with entities, into a run that has ended (MLflow allows it).
    client.log_batch(
        ids["child-b"],
        metrics=[
            api.metric("batch_loss", 0.9, FIXED_TS, 0),
            api.metric("batch_loss", 0.8, FIXED_TS + 1000, 1),
        ],
        params=[api.param("source", "batch")],
        tags=[api.run_tag("batch", "yes")],
    )

    killed = client.create_run(exp_id, run_name="killed", tags={"origin": "client"})
    ids["killed"] = killed.info.run_id
    seen["killed_info"] = {"name": killed.info.run_name, "status": killed.info.status}
    client.log_param(ids["killed"], "lr", "0.5")
    client.log_metric(ids["killed"], "killed_x", 1.5, timestamp=FIXED_TS + 2000, step=4)
    client.set_tag(ids["killed"], "phase", "warmup")
    client.set_tag(ids["killed"], "tmp", "x")
    client.delete_tag(ids["killed"], "tmp")
    client.set_terminated(ids["killed"], status="KILLED")

    # Resume a finished run by id, log more, end it again.
    with mlflow.start_run(run_id=ids["child-a"]) as resumed:
        seen["resumed"] = {"id_matches": resumed.info.run_id == ids["child-a"], "name": resumed.info.run_name}
        mlflow.log_metric("loss", 0.1, step=5)
        mlflow.set_tag("resumed", "yes")

    failing = mlflow.start_run(run_name="failing")
    ids["failing"] = failing.info.run_id
    mlflow.log_param("lr", "0.1")
    mlflow.log_metric("loss", 0.95, step=0)
    mlflow.end_run(status="FAILED")

    # What the read calls answer once every run above has ended.
    seen["active_at_end"] = mlflow.active_run()
    seen["last_active_run"] = mlflow.last_active_run().info.run_name
    seen["parent_of_child_a"] = mlflow.get_parent_run(ids["child-a"]).info.run_name
    seen["parent_of_adopted"] = mlflow.get_parent_run(ids["adopted"]).info.run_name
    seen["parent_of_parent"] = mlflow.get_parent_run(ids["parent"])
    run = mlflow.get_run(ids["parent"])
    seen["get_run_parent"] = {
        "name": run.info.run_name,
        "status": run.info.status,
        "params": run.data.params,
        "metrics": run.data.metrics,
        "user_tags": {k: v for k, v in run.data.tags.items() if not k.startswith(("mlflow.", "tracklane."))},
    }
    killed_run = client.get_run(ids["killed"])
    seen["get_run_killed"] = {"status": killed_run.info.status, "params": killed_run.data.params}
    seen["history_parent_loss"] = [
        (m.key, m.value, m.step) for m in client.get_metric_history(ids["parent"], "loss")
    ]
    seen["history_child_b_batch_loss"] = [
        (m.value, m.step, m.timestamp) for m in client.get_metric_history(ids["child-b"], "batch_loss")
    ]
    seen["get_experiment_by_name"] = client.get_experiment_by_name(experiment).experiment_id == exp_id
    seen["get_experiment_tags"] = {
        k: v for k, v in mlflow.get_experiment(exp_id).tags.items() if not k.startswith("mlflow.")
    }

    seen["search_fluent_list"] = _names(
        mlflow.search_runs(
            experiment_names=[experiment],
            filter_string="params.lr = '0.1'",
            order_by=["metrics.loss ASC"],
            output_format="list",
        )
    )
    frame = mlflow.search_runs(
        experiment_ids=[exp_id], filter_string="metrics.loss < 0.5", order_by=["metrics.loss DESC"]
    )
    seen["search_fluent_pandas"] = {
        "names": list(frame["tags.mlflow.runName"]),
        "lr": list(frame["params.lr"]),
        "columns": sorted(
            c for c in frame.columns if not c.startswith(("tags.mlflow.source", "tags.tracklane"))
        ),
    }
    seen["search_client_status"] = _names(
        client.search_runs(
            [exp_id], filter_string="attributes.status = 'FINISHED'", order_by=["attributes.run_name DESC"]
        )
    )
    page1 = client.search_runs([exp_id], order_by=["attributes.run_name ASC"], max_results=4)
    page2 = client.search_runs(
        [exp_id], order_by=["attributes.run_name ASC"], max_results=4, page_token=page1.token
    )
    seen["search_client_pages"] = [_names(page1), _names(page2), page1.token is None, page2.token is None]
    seen["search_client_tag_and_param"] = _names(
        client.search_runs(
            [exp_id], filter_string="tags.team = 'nlp' and params.layers = '4'", order_by=["metrics.acc DESC"]
        )
    )

    # Left open on purpose: MLflow ends the active run FINISHED when the process exits.
    left_open = mlflow.start_run(run_name="left-open")
    ids["left-open"] = left_open.info.run_id
    mlflow.log_metric("loss", 0.42, step=9)
    return {"ids": ids, "seen": seen}


def main(argv: list[str]) -> None:
    variant, experiment, out = argv
    result = scenario(load(variant), experiment)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
