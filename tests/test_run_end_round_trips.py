"""Ending a run costs the round trips it must make and no more (issue 19): ``set_terminated`` with
nothing pending is one ``runs/update``, and MLflow's View-run lines come from that reply's run info
instead of a read of the run. Counted at a proxy in front of the real server."""

from __future__ import annotations

import pytest

from tracklane import MlflowClient

from servers import FaultProxy, Reader

pytestmark = pytest.mark.server


def test_set_terminated_with_nothing_pending_is_one_update_and_still_prints_the_view_run_lines(
    fault_proxy: FaultProxy, experiment_name: str, reader: Reader, capsys: pytest.CaptureFixture[str]
) -> None:
    client = MlflowClient(fault_proxy.url)
    experiment_id = client.create_experiment(experiment_name)
    run_id = client.create_run(experiment_id, run_name="ends-in-one").info.run_id
    before = dict(fault_proxy.requests)

    client.set_terminated(run_id)

    sent = {k: n - before.get(k, 0) for k, n in fault_proxy.requests.items() if n != before.get(k, 0)}
    assert sent == {"runs/update": 1}
    assert reader.run(run_id)["info"]["status"] == "FINISHED"
    lines = capsys.readouterr().out.splitlines()
    experiment_url = f"{fault_proxy.url}/#/experiments/{experiment_id}"
    assert f"🏃 View run ends-in-one at: {experiment_url}/runs/{run_id}" in lines
    assert f"🧪 View experiment at: {experiment_url}" in lines


def test_a_logged_runs_end_sends_its_events_then_the_update_and_nothing_else(
    fault_proxy: FaultProxy, experiment_name: str, reader: Reader
) -> None:
    client = MlflowClient(fault_proxy.url)
    experiment_id = client.create_experiment(experiment_name)
    run_id = client.create_run(experiment_id, run_name="tiny").info.run_id
    before = dict(fault_proxy.requests)
    client.log_param(run_id, "lr", 0.1)
    client.log_metric(run_id, "score", 0.5)

    client.set_terminated(run_id)

    sent = {k: n - before.get(k, 0) for k, n in fault_proxy.requests.items() if n != before.get(k, 0)}
    assert sent == {"runs/log-batch": 1, "runs/update": 1}
    assert reader.params(run_id) == {"lr": "0.1"}
    assert reader.run(run_id)["info"]["status"] == "FINISHED"
