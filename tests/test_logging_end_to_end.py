"""What a training loop logs arrives on a real MLflow server exactly: values, steps, timestamps."""

from __future__ import annotations

import math
import time

from tracklane import TrackingClient

from servers import Reader


def test_hundred_thousand_metrics_over_ten_keys_params_and_tags_arrive_exactly(
    client: TrackingClient, reader: Reader
) -> None:
    keys = [f"train/metric_{i}" for i in range(10)]
    base_ts = 1_700_000_000_000
    with client.start_run(run_name="bulk") as run:
        client.log_params({"model": "xgboost", "lr": 0.1, "layers": [64, 32]})
        for step in range(10_000):
            for i, key in enumerate(keys):
                client.log_metric(key, step * 10 + i + 0.5, step=step, timestamp=base_ts + step)
        client.set_tags({"stage": "bulk", "owner": "ci"})
        client.set_run_tags(["baseline"])
    run_id = run.info.run_id

    for i, key in enumerate(keys):
        points = reader.history(run_id, key)
        assert len(points) == 10_000, key
        assert points == [(step * 10 + i + 0.5, step, base_ts + step) for step in range(10_000)]
    assert reader.params(run_id) == {"model": "xgboost", "lr": "0.1", "layers": "[64, 32]"}
    tags = reader.tags(run_id)
    assert tags["stage"] == "bulk" and tags["owner"] == "ci" and tags["baseline"] == "_OI_USER_TAG"
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


def test_nan_and_infinities_reach_server_as_nan_and_infinity(client: TrackingClient, reader: Reader) -> None:
    with client.start_run() as run:
        client.log_metric("loss", float("nan"), step=0)
        client.log_metric("loss", float("inf"), step=1)
        client.log_metric("loss", float("-inf"), step=2)
        client.log_metric("loss", 0.25, step=3)

    values = [v for v, _, _ in reader.history(run.info.run_id, "loss")]
    assert math.isnan(values[0])
    assert values[1] > 1e308 and values[2] < -1e308  # MLflow stores +-inf as +-max float
    assert values[3] == 0.25


def test_timestamp_is_stamped_at_call_time_in_milliseconds(client: TrackingClient, reader: Reader) -> None:
    with client.start_run() as run:
        before = int(time.time() * 1000)
        client.log_metric("acc", 0.9)
        after = int(time.time() * 1000)
        time.sleep(0.05)  # the delivery happens later; the stamp must not move with it

    [(value, step, ts)] = reader.history(run.info.run_id, "acc")
    assert (value, step) == (0.9, 0)
    assert before <= ts <= after


def test_log_metrics_logs_every_key_at_one_step(client: TrackingClient, reader: Reader) -> None:
    with client.start_run() as run:
        client.log_metrics({"a": 1, "b": 2.5, "c": -3}, step=7)

    for key, value in {"a": 1.0, "b": 2.5, "c": -3.0}.items():
        [(stored, step, _)] = reader.history(run.info.run_id, key)
        assert (stored, step) == (value, 7)


def test_tag_set_twice_ends_with_the_last_value(client: TrackingClient, reader: Reader) -> None:
    with client.start_run() as run:
        for i in range(2500):  # spans several worker windows and requests
            client.set_tag("phase", f"phase-{i}")
            client.log_metric("m", i, step=i)
        client.set_tag("phase", "done")

    assert reader.tags(run.info.run_id)["phase"] == "done"


def test_read_your_writes_get_run_and_history_see_everything_logged_before(
    client: TrackingClient,
) -> None:
    with client.start_run() as run:
        for step in range(3000):
            client.log_metric("loss", 1 / (step + 1), step=step)
        client.log_param("optimizer", "adam")

        seen = client.get_run(run.info.run_id)
        history = client.get_metric_history(run.info.run_id, "loss")

    assert seen.data.metrics["loss"] == 1 / 3000
    assert seen.data.params["optimizer"] == "adam"
    assert [m.step for m in history] == list(range(3000))


def test_flush_returns_true_once_everything_before_it_is_stored(
    client: TrackingClient, reader: Reader
) -> None:
    with client.start_run() as run:
        for step in range(1500):
            client.log_metric("x", step, step=step)
        assert client.flush(timeout=60) is True
        assert len(reader.history(run.info.run_id, "x")) == 1500
