"""tracklane against the setup of a shared team server: MLflow on PostgreSQL behind two workers."""

from __future__ import annotations

from tracklane import TrackingClient

from postgres import PgMlflowServer
from servers import Reader


def test_run_on_postgres_server_with_two_workers_stores_every_point_once(
    pg_mlflow_server: PgMlflowServer, experiment_name: str
) -> None:
    keys = [f"train/loss_{i}" for i in range(5)]
    base_ts = 1_700_000_000_000
    with TrackingClient(api_host=pg_mlflow_server.url, exit_timeout=30) as client:
        client.set_experiment(experiment_name)
        with client.start_run(run_name="postgres") as run:
            client.log_param("optimizer", "adamw")
            for step in range(1000):  # 5,000 points: several log-batch requests, spread over both workers
                for i, key in enumerate(keys):
                    client.log_metric(key, step + i / 10, step=step, timestamp=base_ts + step)
            client.set_tag("backend", "postgresql")
    run_id = run.info.run_id

    reader = Reader(pg_mlflow_server.url)
    for i, key in enumerate(keys):
        assert reader.history(run_id, key) == [(step + i / 10, step, base_ts + step) for step in range(1000)]
    assert reader.params(run_id) == {"optimizer": "adamw"}
    assert reader.tags(run_id)["backend"] == "postgresql"
    assert reader.run(run_id)["info"]["status"] == "FINISHED"
    experiment = reader.experiment(experiment_name)
    assert experiment is not None
    assert [r["info"]["run_id"] for r in reader.runs(experiment["experiment_id"])] == [run_id]
