"""``pack``: every request it cuts stays inside the server's log-batch limits (REFERENCE.md, MLflow's
``mlflow/utils/validation.py``), keeps each run's events in order, and sends a param or tag set twice
in one window once, with its last value."""

from __future__ import annotations

import orjson
import pytest

from tracklane._limits import (
    MAX_BATCH_REQUEST_BYTES,
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)
from tracklane._wire.batching import METRIC, PARAM, TAG, Event, pack

pytestmark = pytest.mark.unit


def _metric(i: int, run: str = "r", key: str = "loss") -> Event:
    return (METRIC, run, key, float(i), 1_000 + i, i)


def _text(kind: int, i: int, run: str = "r", value: str = "v") -> Event:
    return (kind, run, f"k{i}", value, 0, 0)


def test_the_servers_limits_are_mlflows() -> None:
    assert (MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, MAX_ENTITIES_PER_BATCH) == (1000, 100, 1000)


def test_metrics_are_cut_at_1000_per_request_in_order() -> None:
    batches = list(pack([_metric(i) for i in range(2_500)]))
    assert [len(b.metrics) for b in batches] == [1000, 1000, 500]
    assert [e[5] for b in batches for e in b.metrics] == list(range(2_500))


def test_params_and_tags_are_cut_at_100_each_and_1000_entities_in_all() -> None:
    events = [_text(PARAM, i) for i in range(250)] + [_text(TAG, i) for i in range(250)]
    events += [_metric(i) for i in range(3_000)]
    batches = list(pack(events))
    for b in batches:
        assert len(b.params) <= MAX_PARAMS_TAGS_PER_BATCH and len(b.tags) <= MAX_PARAMS_TAGS_PER_BATCH
        assert len(b.metrics) <= MAX_METRICS_PER_BATCH and len(b) <= MAX_ENTITIES_PER_BATCH
    assert sum(len(b.params) for b in batches) == 250 and sum(len(b.tags) for b in batches) == 250
    assert sum(len(b.metrics) for b in batches) == 3_000
    # Texts go before the window's metrics, so a reader sees the run's params first.
    first_metric = next(i for i, b in enumerate(batches) if b.metrics)
    assert all(not b.params and not b.tags for b in batches[first_metric + 1 :])


def test_long_values_keep_every_request_under_the_byte_limit() -> None:
    events = [_text(PARAM, i, value='"' * 6000) for i in range(100)]  # escaping doubles each char
    batches = list(pack(events))
    assert len(batches) > 1
    assert all(len(b.encode()) < MAX_BATCH_REQUEST_BYTES for b in batches)
    assert sum(len(b.params) for b in batches) == 100


def test_a_tag_set_twice_in_a_window_is_sent_once_with_its_last_value() -> None:
    events = [(TAG, "r", "state", "a", 0, 0), _metric(0), (TAG, "r", "state", "b", 0, 0)]
    (batch,) = pack(events)
    assert [(e[2], e[3]) for e in batch.tags] == [("state", "b")]


def test_each_run_gets_requests_of_its_own() -> None:
    events = [_metric(i, run=f"r{i % 3}") for i in range(30)]
    batches = list(pack(events, seq=7))
    assert sorted(b.run_id for b in batches) == ["r0", "r1", "r2"]
    assert all({e[1] for e in b.events()} == {b.run_id} and b.seq == 7 for b in batches)


def test_halves_split_a_batch_without_losing_an_event() -> None:
    (batch,) = pack([_metric(i) for i in range(7)] + [_text(PARAM, 0)])
    first, second = batch.halves()
    assert sorted(first.events() + second.events()) == sorted(batch.events())
    assert (len(first), len(second)) == (4, 4)


def test_the_body_is_mlflows_log_batch() -> None:
    (batch,) = pack([_metric(0), _text(PARAM, 1), _text(TAG, 2)])
    assert orjson.loads(batch.encode()) == {
        "run_id": "r",
        "metrics": [{"key": "loss", "value": 0.0, "timestamp": 1000, "step": 0}],
        "params": [{"key": "k1", "value": "v"}],
        "tags": [{"key": "k2", "value": "v"}],
    }
