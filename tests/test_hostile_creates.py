"""Creating is idempotent: a reply lost after the server made the run (or experiment) never makes a
second one, through every face and through ``tracklane sync``.

The proxy forwards the create to the real server and drops the connection instead of the answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import tracklane.mlflow
from tracklane import MlflowClient, TrackingClient
from tracklane._cli import main as cli

from faults import HostileProxy
from servers import MlflowServer, Reader

pytestmark = pytest.mark.server


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[HostileProxy]:
    p = HostileProxy(mlflow_server.url)
    p.start()
    yield p
    p.stop()


def _runs(reader: Reader, experiment: str) -> list[dict[str, object]]:
    found = reader.experiment(experiment)
    assert found is not None, experiment
    return reader.runs(found["experiment_id"])


def test_tracking_client_start_run_with_its_reply_lost_makes_one_run(
    proxy: HostileProxy, experiment_name: str, reader: Reader
) -> None:
    with TrackingClient(api_host=proxy.url, exit_timeout=30) as tc:
        tc.set_experiment(experiment_name)
        proxy.drop_reply("runs/create")
        run = tc.start_run(run_name="once", log_system_metrics=False)
        for step in range(100):
            tc.log_metric("loss", step, step=step)
        tc.end_run()

    assert proxy.dropped["runs/create"] == 1  # the server made the run, its answer was lost
    [stored] = _runs(reader, experiment_name)
    assert stored["info"]["run_id"] == run.info.run_id  # type: ignore[index]
    assert stored["info"]["status"] == "FINISHED"  # type: ignore[index]
    assert len(reader.history(run.info.run_id, "loss")) == 100


def test_mlflow_client_create_run_with_its_reply_lost_makes_one_run(
    proxy: HostileProxy, experiment_name: str, reader: Reader
) -> None:
    client = MlflowClient(proxy.url)
    experiment_id = client.create_experiment(experiment_name)
    proxy.drop_reply("runs/create")
    run = client.create_run(experiment_id, run_name="once")
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    client.set_terminated(run.info.run_id)

    assert proxy.dropped["runs/create"] == 1
    [stored] = _runs(reader, experiment_name)
    assert stored["info"]["run_id"] == run.info.run_id  # type: ignore[index]
    assert stored["info"]["status"] == "FINISHED"  # type: ignore[index]
    assert [v for v, _, _ in reader.history(run.info.run_id, "loss")] == [0.5]


def test_fluent_start_run_with_its_reply_lost_makes_one_run(
    proxy: HostileProxy, experiment_name: str, reader: Reader
) -> None:
    tracklane.mlflow.set_tracking_uri(proxy.url)
    tracklane.mlflow.set_experiment(experiment_name)
    proxy.drop_reply("runs/create")
    with tracklane.mlflow.start_run(run_name="once") as run:
        tracklane.mlflow.log_metric("loss", 0.25)

    assert proxy.dropped["runs/create"] == 1
    [stored] = _runs(reader, experiment_name)
    assert stored["info"]["run_id"] == run.info.run_id  # type: ignore[index]
    assert stored["info"]["status"] == "FINISHED"  # type: ignore[index]


def test_create_experiment_with_its_reply_lost_returns_the_experiment_it_made(
    proxy: HostileProxy, experiment_name: str, reader: Reader
) -> None:
    client = MlflowClient(proxy.url)
    proxy.drop_reply("experiments/create")

    experiment_id = client.create_experiment(experiment_name)  # not RESOURCE_ALREADY_EXISTS

    assert proxy.dropped["experiments/create"] == 1
    found = reader.experiment(experiment_name)
    assert found is not None and found["experiment_id"] == experiment_id


def test_tracking_client_set_experiment_with_the_create_reply_lost_uses_the_one_made(
    proxy: HostileProxy, experiment_name: str, reader: Reader
) -> None:
    with TrackingClient(api_host=proxy.url) as tc:
        proxy.drop_reply("experiments/create")
        experiment = tc.set_experiment(experiment_name)

    found = reader.experiment(experiment_name)
    assert found is not None and found["experiment_id"] == experiment.experiment_id


def test_sync_with_the_create_reply_lost_makes_one_run_and_says_so_truly(
    proxy: HostileProxy,
    experiment_name: str,
    reader: Reader,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with TrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run(run_name="offline", log_system_metrics=False):
            for step in range(500):
                tc.log_metric("loss", step, step=step)
    proxy.drop_reply("runs/create")

    code = cli(["sync", str(tmp_path), "--to", proxy.url])
    out = capsys.readouterr()

    assert code == 0, out.out + out.err
    assert proxy.dropped["runs/create"] == 1
    [stored] = _runs(reader, experiment_name)
    run_id = stored["info"]["run_id"]  # type: ignore[index]
    assert stored["info"]["status"] == "FINISHED"  # type: ignore[index]
    assert [s for _, s, _ in reader.history(run_id, "loss")] == list(range(500))
    assert "synced 1 run(s)" in out.out

    assert cli(["sync", str(tmp_path), "--to", proxy.url]) == 0  # again: nothing new, still one run
    assert len(_runs(reader, experiment_name)) == 1
