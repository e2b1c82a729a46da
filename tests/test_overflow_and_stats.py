"""A full buffer follows the chosen overflow policy; every drop is counted and warned about once."""

from __future__ import annotations

import logging

import pytest

from tracklane import ConfigurationError, TrackingClient

from servers import FaultProxy, Reader

STALL = (503, {"Retry-After": "2"}, b"")  # holds the worker's requests so the buffer fills


def _flood(tc: TrackingClient, n: int) -> None:
    for step in range(n):
        tc.log_metric("flood", step, step=step)


@pytest.mark.thread_sender
@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_drop_policies_count_every_dropped_event_and_warn_once(
    fault_proxy: FaultProxy,
    experiment_name: str,
    reader: Reader,
    caplog: pytest.LogCaptureFixture,
    policy: str,
) -> None:
    fault_proxy.script("runs/log-batch", STALL, STALL)
    with (
        caplog.at_level(logging.WARNING, logger="tracklane"),
        TrackingClient(api_host=fault_proxy.url, max_buffer=100, overflow=policy) as tc,
    ):
        tc.set_experiment(experiment_name)
        with tc.start_run(log_system_metrics=False) as run:
            _flood(tc, 2000)
            assert tc.flush(timeout=60)
            stats = tc.stats()

    stored = [p[1] for p in reader.history(run.info.run_id, "flood")]
    assert stats["dropped"] > 0
    assert len(stored) + stats["dropped"] == 2000  # every event is either stored or counted
    assert stats["delivered"] == len(stored)
    if policy == "drop_oldest":
        assert stored[-1] == 1999  # the newest survive
    else:
        assert 1999 not in stored  # the newest were refused
    assert caplog.text.count("buffer is full") == 1


def test_block_policy_waits_for_room_and_loses_nothing(
    fault_proxy: FaultProxy, experiment_name: str, reader: Reader
) -> None:
    fault_proxy.script("runs/log-batch", STALL)
    with TrackingClient(api_host=fault_proxy.url, max_buffer=100, overflow="block") as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run(log_system_metrics=False) as run:
            _flood(tc, 2000)
        assert tc.stats()["dropped"] == 0

    assert [p[1] for p in reader.history(run.info.run_id, "flood")] == list(range(2000))


@pytest.mark.thread_sender
def test_block_policy_with_a_max_wait_drops_and_counts_after_it(
    fault_proxy: FaultProxy, experiment_name: str, reader: Reader
) -> None:
    fault_proxy.script("runs/log-batch", *[(503, {"Retry-After": "3"}, b"")] * 4)
    with TrackingClient(api_host=fault_proxy.url, max_buffer=50, overflow="block", block_timeout=0.05) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run(log_system_metrics=False) as run:
            _flood(tc, 400)
            assert tc.flush(timeout=60)
            stats = tc.stats()

    stored = len(reader.history(run.info.run_id, "flood"))
    assert stats["dropped"] > 0 and stored + stats["dropped"] == 400


def test_the_overflow_policy_comes_from_the_environment(
    server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKLANE_OVERFLOW", "drop_everything")
    with pytest.raises(ConfigurationError, match="drop_everything"):
        TrackingClient(api_host=server_url)


def test_stats_count_what_the_client_did(client: TrackingClient, reader: Reader) -> None:
    with client.start_run(log_system_metrics=False):
        for step in range(2500):
            client.log_metric("m", step, step=step)
        client.log_params({"a": 1, "b": 2})
        assert client.flush(timeout=60)
        stats = client.stats()

    assert stats["enqueued"] == stats["delivered"] == 2502
    assert stats["dropped"] == stats["rejected"] == stats["buffer_depth"] == stats["in_flight_requests"] == 0
    assert stats["oldest_undelivered_age_s"] == 0.0
