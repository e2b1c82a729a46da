"""Refused events are isolated and reported; transient failures are retried until delivered."""

from __future__ import annotations

import itertools
import logging
import time

import pytest

from tracklane import DeliveryError, ServerError, ServerUnavailableError, TrackingClient

from servers import FaultProxy, Reader


def test_an_event_the_server_refuses_does_not_take_the_batch_down(
    client: TrackingClient, reader: Reader, caplog: pytest.LogCaptureFixture
) -> None:
    with client.start_run() as run:
        run_id = run.info.run_id
        # Another writer sets lr on the server; this client cannot know, so only the server refuses.
        reader.call("POST", "runs/log-batch", {"run_id": run_id, "params": [{"key": "lr", "value": "0.1"}]})
        for step in range(600):
            client.log_metric("loss", step, step=step)
        client.log_param("lr", "0.2")
        client.log_param("batch_size", 32)
        for step in range(600, 1200):
            client.log_metric("loss", step, step=step)
        with caplog.at_level(logging.WARNING, logger="tracklane"), pytest.raises(DeliveryError) as refused:
            client.flush(timeout=60)

    [rejected] = refused.value.rejected
    assert (rejected.run_id, rejected.kind, rejected.key, rejected.value) == (run_id, "param", "lr", "0.2")
    assert "Changing param values is not allowed" in rejected.reason
    assert "'lr'" in str(refused.value)
    assert [p[1] for p in reader.history(run_id, "loss")] == list(range(1200))
    assert reader.params(run_id) == {"lr": "0.1", "batch_size": "32"}
    assert caplog.text.count("refused") == 1  # warned once
    assert reader.run(run_id)["info"]["status"] == "FINISHED"  # the run still ended


def test_end_run_raises_delivery_error_after_ending_the_run(client: TrackingClient, reader: Reader) -> None:
    run = client.start_run()
    reader.call("POST", "runs/log-batch", {"run_id": run.info.run_id, "params": [{"key": "p", "value": "a"}]})
    client.log_param("p", "b")
    with pytest.raises(DeliveryError, match="'p'"):
        client.end_run()
    assert reader.run(run.info.run_id)["info"]["status"] == "FINISHED"
    assert client.active_run() is None


def test_a_503_and_429_storm_with_retry_after_loses_nothing_and_honours_the_waits(
    fault_proxy: FaultProxy, experiment_name: str, reader: Reader
) -> None:
    storm = [(503, {"Retry-After": "0.4"}, b""), (429, {"Retry-After": "0.4"}, b""), (503, {}, b"")] * 2
    fault_proxy.script("runs/log-batch", *storm)
    with TrackingClient(api_host=fault_proxy.url) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run() as run:
            for step in range(500):  # one request, so its attempts follow each other
                tc.log_metric("loss", step, step=step)
            assert tc.flush(timeout=60)
            for step in range(500, 3000):
                tc.log_metric("loss", step, step=step)

    assert [p[1] for p in reader.history(run.info.run_id, "loss")] == list(range(3000))
    attempts = fault_proxy.calls_to("runs/log-batch")
    assert [status for _, status in attempts[:7]] == [503, 429, 503, 503, 429, 503, 200]
    waits = [later[0] - earlier[0] for earlier, later in itertools.pairwise(attempts[:7])]
    assert all(waits[i] >= 0.4 for i in (0, 1, 3, 4))  # each Retry-After: 0.4 was honoured


def test_a_persistent_outage_ends_in_server_unavailable_after_the_retry_window(
    fault_proxy: FaultProxy, experiment_name: str
) -> None:
    fault_proxy.script("experiments/get-by-name", *[(503, {}, b"")] * 200)
    with TrackingClient(api_host=fault_proxy.url, retry_window=1.0) as tc:
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="retry window"):
            tc.set_experiment(experiment_name)
        assert time.monotonic() - started < 10


def test_a_malformed_reply_is_a_clear_server_error(fault_proxy: FaultProxy, experiment_name: str) -> None:
    fault_proxy.script("experiments/get-by-name", (200, {}, b"<html>login</html>"))
    with (
        TrackingClient(api_host=fault_proxy.url) as tc,
        pytest.raises(ServerError, match=r"not MLflow.s JSON"),
    ):
        tc.set_experiment(experiment_name)


def test_a_refused_api_key_says_to_check_the_key(fault_proxy: FaultProxy, experiment_name: str) -> None:
    fault_proxy.script("experiments/get-by-name", (401, {}, b'{"error_code": "UNAUTHENTICATED"}'))
    with (
        TrackingClient(api_host=fault_proxy.url, api_key="k") as tc,
        pytest.raises(ServerError, match="api_key"),
    ):
        tc.set_experiment(experiment_name)
