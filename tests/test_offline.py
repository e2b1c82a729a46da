"""Offline mode: the same API and semantics as online, stored in the local journal."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from tracklane import ConfigurationError, NotFoundError, TrackingClient

pytestmark = pytest.mark.unit

VALUES = [0.5, math.nan, math.inf, -math.inf, -0.0, 1e-300, 123456789.125]


def test_offline_run_reads_back_like_a_server_run(tmp_path: Path) -> None:
    with TrackingClient(offline_mode=True, path_to_storage=str(tmp_path / "store")) as tc:
        experiment = tc.set_experiment("offline-exp")
        with tc.start_run(run_name="first") as run:
            for step, value in enumerate(VALUES):
                tc.log_metric("loss", value, step=step)
            tc.log_params({"lr": 0.1, "layers": 3})
            tc.set_tags({"team": "a", "stage": "dev"})
            tc.set_tag("stage", "prod")
        stored = tc.get_run(run.info.run_id)
        history = tc.get_metric_history(run.info.run_id, "loss")

    assert stored.info.experiment_id == experiment.experiment_id
    assert stored.info.run_name == "first"
    assert stored.info.status == "FINISHED"
    assert stored.info.end_time is not None and stored.info.end_time >= stored.info.start_time
    assert stored.data.params == {"lr": "0.1", "layers": "3"}
    assert stored.data.tags["team"] == "a" and stored.data.tags["stage"] == "prod"
    got = [p.value for p in history]
    assert [p.step for p in history] == list(range(len(VALUES)))
    assert math.isnan(got[1]) and got[:1] + got[2:] == VALUES[:1] + VALUES[2:]
    assert stored.data.metrics["loss"] == VALUES[-1]
    assert (tmp_path / "store" / "ml_runs" / "tracklane.db").is_file()


def test_no_server_configured_logs_offline_to_ml_runs_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tracklane")
    with TrackingClient() as tc:
        tc.set_experiment("embedded-default")
        with tc.start_run(run_name="r"):
            for step in range(100):
                tc.log_metric("x", step, step=step)

    notices = [r.getMessage() for r in caplog.records if "offline" in r.getMessage()]
    assert len(notices) == 1
    assert "tracklane sync" in notices[0] and "--to" in notices[0]
    assert (tmp_path / "ml_runs" / "tracklane.db").is_file()  # the test runs in tmp_path


def test_offline_mode_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OIP_OFFLINE_MODE", "true")
    monkeypatch.setenv("OIP_TRACKING_SERVER", "http://127.0.0.1:9")  # configured, but offline wins
    with TrackingClient(path_to_storage=str(tmp_path / "env")) as tc:
        tc.set_experiment("from-env")
        with tc.start_run(run_name="r") as run:
            tc.log_metric("x", 1.0)
        assert tc.get_run(run.info.run_id).data.metrics == {"x": 1.0}
    assert (tmp_path / "env" / "ml_runs" / "tracklane.db").is_file()


def test_offline_mode_false_without_a_server_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="offline_mode=True"):
        TrackingClient(offline_mode=False)


def test_offline_resume_by_name_continues_the_same_run(tmp_path: Path) -> None:
    storage = str(tmp_path)
    with TrackingClient(offline_mode=True, path_to_storage=storage) as tc:
        tc.set_experiment("resume")
        with tc.start_run(run_name="long-job") as first:
            tc.log_metric("loss", 1.0, step=0)
    with TrackingClient(offline_mode=True, path_to_storage=storage) as tc:  # a later process
        tc.set_experiment("resume")
        with tc.start_run(run_name="long-job") as second:
            tc.log_metric("loss", 0.5, step=1)
        history = tc.get_metric_history(second.info.run_id, "loss")

    assert second.info.run_id == first.info.run_id
    assert [(p.step, p.value) for p in history] == [(0, 1.0), (1, 0.5)]


def test_offline_attach_by_id_and_unknown_id(tmp_path: Path) -> None:
    with TrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc:
        tc.set_experiment("attach")
        with tc.start_run(run_name="r") as run:
            tc.log_param("p", "v")
        with tc.start_run(run_id=run.info.run_id) as again:
            tc.log_metric("m", 2.0)
        with pytest.raises(NotFoundError, match="no run with id"):
            tc.start_run(run_id="0" * 32)
        stored = tc.get_run(run.info.run_id)

    assert again.info.run_id == run.info.run_id
    assert stored.data.params == {"p": "v"} and stored.data.metrics == {"m": 2.0}


def test_offline_experiments_by_name_and_deletion(tmp_path: Path) -> None:
    with TrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc:
        assert tc.get_experiment_by_name("nope") is None
        created = tc.create_experiment("tagged", tags=["vision"])
        found = tc.get_experiment_by_name("tagged")
        tc.delete_experiment(created.experiment_id)
        deleted = tc.get_experiment_by_name("tagged")

    assert found is not None and found.experiment_id == created.experiment_id
    assert "vision" in found.tags
    assert deleted is not None and deleted.lifecycle_stage == "deleted"


def test_offline_param_change_is_refused_like_online(tmp_path: Path) -> None:
    with TrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc:
        tc.set_experiment("params")
        with tc.start_run(run_name="r"):
            tc.log_param("lr", 0.1)
            with pytest.raises(ValueError, match="cannot change"):
                tc.log_param("lr", 0.2)


OFFLINE_CHILD = """
import sys
from tracklane import TrackingClient
tc = TrackingClient(offline_mode=True, path_to_storage=sys.argv[1])
tc.set_experiment("exits-early")
run = tc.start_run(run_name="no-end-run")
print(run.info.run_id, flush=True)
for step in range(5000):
    tc.log_metric("loss", step, step=step)
# no end_run, no close: the interpreter's exit flush writes the journal
"""


def test_offline_process_exiting_without_end_run_keeps_every_event(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip()

    with TrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc:
        history = tc.get_metric_history(run_id, "loss")
        stored = tc.get_run(run_id)

    assert [p.step for p in history] == list(range(5000))
    assert stored.info.status == "FINISHED"


async def test_async_client_logs_offline_without_blocking_its_loop(tmp_path: Path) -> None:
    from tracklane import AsyncTrackingClient

    async with AsyncTrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc:
        await tc.set_experiment("async-offline")
        async with tc.start_run(run_name="r") as run:
            for step in range(3000):
                tc.log_metric("loss", step, step=step)
            await tc.log_param("p", 1)
        history = await tc.get_metric_history(run.info.run_id, "loss")
        stored = await tc.get_run(run.info.run_id)

    assert [p.step for p in history] == list(range(3000))
    assert stored.info.status == "FINISHED" and stored.data.params == {"p": "1"}
