"""System metrics: sampled on the client's loop while a run is active, stored under MLflow's names."""

from __future__ import annotations

import logging
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from tracklane import ConfigurationError, TrackingClient

from servers import Reader

INTERVAL = 0.2
SYSTEM_KEYS = [
    "system/cpu_utilization_percentage",
    "system/system_memory_usage_megabytes",
    "system/system_memory_usage_percentage",
    "system/disk_usage_megabytes",
    "system/disk_usage_percentage",
    "system/disk_available_megabytes",
    "system/network_receive_megabytes",
    "system/network_transmit_megabytes",
]
CPU = "system/cpu_utilization_percentage"


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.05)


def stored_samples(tc: TrackingClient, reader: Reader, run_id: str, key: str = CPU) -> int:
    tc.flush(timeout=10)
    return len(reader.history(run_id, key))


def system_keys_stored(reader: Reader, run_id: str) -> set[str]:
    metrics = reader.run(run_id)["data"].get("metrics", [])
    return {m["key"] for m in metrics if m["key"].startswith("system/")}


@pytest.fixture
def sampling_client(server_url: str, experiment_name: str) -> Iterator[TrackingClient]:
    tc = TrackingClient(api_host=server_url, system_metrics_interval=INTERVAL)
    tc.set_experiment(experiment_name)
    yield tc
    tc.close()


def test_run_stores_every_system_metric_with_steps_counting_samples(
    sampling_client: TrackingClient, reader: Reader
) -> None:
    tc = sampling_client
    with tc.start_run() as run:
        run_id = run.info.run_id
        wait_until(lambda: stored_samples(tc, reader, run_id) >= 3, what="3 system samples")

    assert system_keys_stored(reader, run_id) == set(SYSTEM_KEYS)
    samples = len(reader.history(run_id, CPU))
    for key in SYSTEM_KEYS:
        points = reader.history(run_id, key)
        assert [step for _, step, _ in points] == list(range(samples)), key
    for key in (CPU, "system/system_memory_usage_percentage", "system/disk_usage_percentage"):
        assert all(0.0 <= value <= 100.0 for value, _, _ in reader.history(run_id, key)), key
    assert all(v > 0 for v, _, _ in reader.history(run_id, "system/system_memory_usage_megabytes"))
    assert all(v >= 0 for v, _, _ in reader.history(run_id, "system/network_receive_megabytes"))
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


def test_sampling_stops_with_the_run_and_the_next_run_counts_from_step_zero(
    sampling_client: TrackingClient, reader: Reader, caplog: pytest.LogCaptureFixture
) -> None:
    tc = sampling_client
    with caplog.at_level(logging.WARNING, logger="tracklane"):
        with tc.start_run() as first:
            wait_until(lambda: stored_samples(tc, reader, first.info.run_id) >= 2, what="first run samples")
        ended_with = len(reader.history(first.info.run_id, CPU))

        # The second run's own samples are the clock: while they accumulate, the first run's
        # sampler would have added points too had it outlived its run.
        with tc.start_run() as second:
            wait_until(lambda: stored_samples(tc, reader, second.info.run_id) >= 4, what="second run samples")

    assert len(reader.history(first.info.run_id, CPU)) == ended_with
    assert [step for _, step, _ in reader.history(second.info.run_id, CPU)][:4] == [0, 1, 2, 3]
    assert not [r for r in caplog.records if "system metrics" in r.getMessage()]  # none failed


def test_continued_run_counts_on_from_its_last_system_step(
    sampling_client: TrackingClient, reader: Reader
) -> None:
    tc = sampling_client
    with tc.start_run(run_name="resumable") as run:
        wait_until(lambda: stored_samples(tc, reader, run.info.run_id) >= 2, what="first samples")
    before = len(reader.history(run.info.run_id, CPU))

    with tc.start_run(run_name="resumable") as again:
        assert again.info.run_id == run.info.run_id
        wait_until(lambda: stored_samples(tc, reader, run.info.run_id) >= before + 2, what="more samples")

    steps = [step for _, step, _ in reader.history(run.info.run_id, CPU)]
    assert steps == list(range(len(steps)))


def test_sampler_reads_on_the_clients_loop_thread(
    sampling_client: TrackingClient, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads_that_sampled: set[str] = set()
    real = psutil.virtual_memory

    def recording_virtual_memory() -> Any:
        threads_that_sampled.add(threading.current_thread().name)
        return real()

    monkeypatch.setattr(psutil, "virtual_memory", recording_virtual_memory)
    tc = sampling_client
    before = {t.ident for t in threading.enumerate()}
    with tc.start_run() as run:
        wait_until(lambda: stored_samples(tc, reader, run.info.run_id) >= 2, what="samples")
        started = {t.name for t in threading.enumerate() if t.ident not in before}

    assert threads_that_sampled == {"tracklane"}  # the LoopThread the engine lives on
    assert not [name for name in started if "sys" in name.lower() or "metric" in name.lower()]


def _run_briefly(tc: TrackingClient, **start_run_args: Any) -> str:
    """A run that lasts ten sampling intervals and logs one metric of its own."""
    with tc.start_run(**start_run_args) as run:
        tc.log_metric("loss", 0.5)
        time.sleep(10 * INTERVAL)  # absence of samples cannot be waited for; ten intervals is ample
    return run.info.run_id


def test_environment_variable_false_turns_system_metrics_off(
    sampling_client: TrackingClient, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

    run_id = _run_briefly(sampling_client)

    assert system_keys_stored(reader, run_id) == set()
    assert [v for v, _, _ in reader.history(run_id, "loss")] == [0.5]


def test_log_system_metrics_false_turns_them_off(sampling_client: TrackingClient, reader: Reader) -> None:
    run_id = _run_briefly(sampling_client, log_system_metrics=False)

    assert system_keys_stored(reader, run_id) == set()


def test_log_system_metrics_true_wins_over_the_environment(
    sampling_client: TrackingClient, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "0")
    tc = sampling_client

    with tc.start_run(log_system_metrics=True) as run:
        wait_until(lambda: stored_samples(tc, reader, run.info.run_id) >= 1, what="a sample")

    assert system_keys_stored(reader, run.info.run_id) == set(SYSTEM_KEYS)


def test_sampling_interval_comes_from_the_environment_without_an_argument(
    server_url: str, experiment_name: str, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    with TrackingClient(api_host=server_url) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run() as run:
            # The default interval is 10 s: three samples well before that come from the variable.
            wait_until(lambda: stored_samples(tc, reader, run.info.run_id) >= 3, timeout=8.0, what="samples")


def test_a_malformed_enable_variable_is_refused_before_any_run_is_created(
    sampling_client: TrackingClient, reader: Reader, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "sometimes")

    with pytest.raises(ConfigurationError, match="MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"):
        sampling_client.start_run()

    experiment = reader.experiment(experiment_name)
    assert experiment is not None and reader.runs(experiment["experiment_id"]) == []


@pytest.mark.parametrize("interval", [0, -1.0, float("nan")])
def test_a_non_positive_interval_is_refused_at_construction(server_url: str, interval: float) -> None:
    with pytest.raises(ConfigurationError, match="system_metrics_interval"):
        TrackingClient(api_host=server_url, system_metrics_interval=interval)


def test_a_failing_sampler_logs_once_stops_and_the_run_goes_on(
    sampling_client: TrackingClient,
    reader: Reader,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> Any:
        raise PermissionError("/proc/meminfo: permission denied")

    monkeypatch.setattr(psutil, "virtual_memory", broken)
    tc = sampling_client

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "system metrics sampling failed" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="tracklane"), tc.start_run() as run:
        tc.log_metric("loss", 0.25, step=7)
        wait_until(lambda: bool(failures()), what="the sampler's failure report")
        time.sleep(5 * INTERVAL)  # would a stopped sampler try again, it would fail again by now
        tc.log_metric("loss", 0.125, step=8)

    assert len(failures()) == 1
    assert "permission denied" in failures()[0].getMessage()
    assert [v for v, _, _ in reader.history(run.info.run_id, "loss")] == [0.25, 0.125]
    assert system_keys_stored(reader, run.info.run_id) == set()
    assert reader.run(run.info.run_id)["info"]["status"] == "FINISHED"


# -- NVIDIA GPUs, through a stand-in for pynvml (no GPU on the test machine) ---------------------


class FakeNVMLError(Exception):
    pass


def fake_pynvml(power_supported: tuple[bool, ...] = (True, True)) -> types.ModuleType:
    """Two GPUs: 2 GB of 8 GB used and 73 % busy, 4 GB of 16 GB and 5 %; 150 W of 300 W each."""
    nvml = types.ModuleType("pynvml")
    devices = [
        {"used": 2_000_000_000, "total": 8_000_000_000, "gpu": 73},
        {"used": 4_000_000_000, "total": 16_000_000_000, "gpu": 5},
    ]
    state = {"inits": 0, "shutdowns": 0}

    def handle(i: int) -> int:
        return i

    def power(h: int) -> int:
        if not power_supported[h]:
            raise FakeNVMLError("Not Supported")
        return 150_000

    nvml.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    nvml.state = state  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: state.__setitem__("inits", state["inits"] + 1)  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: state.__setitem__("shutdowns", state["shutdowns"] + 1)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        used=devices[h]["used"], total=devices[h]["total"], free=devices[h]["total"] - devices[h]["used"]
    )
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        gpu=devices[h]["gpu"], memory=0
    )
    nvml.nvmlDeviceGetPowerUsage = power  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetEnforcedPowerLimit = lambda h: 300_000  # type: ignore[attr-defined]
    return nvml


def test_each_gpu_is_logged_under_mlflows_gpu_names(
    sampling_client: TrackingClient, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    tc = sampling_client

    with tc.start_run() as run:
        wait_until(lambda: stored_samples(tc, reader, run.info.run_id) >= 2, what="samples")

    latest = {m["key"]: m["value"] for m in reader.run(run.info.run_id)["data"]["metrics"]}
    assert latest["system/gpu_0_utilization_percentage"] == 73.0
    assert latest["system/gpu_0_memory_usage_megabytes"] == 2000.0
    assert latest["system/gpu_0_memory_usage_percentage"] == 25.0
    assert latest["system/gpu_0_power_usage_watts"] == 150.0
    assert latest["system/gpu_0_power_usage_percentage"] == 50.0
    assert latest["system/gpu_1_utilization_percentage"] == 5.0
    assert latest["system/gpu_1_memory_usage_megabytes"] == 4000.0
    assert latest["system/gpu_1_memory_usage_percentage"] == 25.0
    samples = len(reader.history(run.info.run_id, CPU))
    gpu_steps = [step for _, step, _ in reader.history(run.info.run_id, "system/gpu_1_power_usage_watts")]
    assert gpu_steps == list(range(samples))
    assert nvml.state == {"inits": 1, "shutdowns": 1}  # type: ignore[attr-defined]


def test_a_gpu_reading_the_device_lacks_is_skipped_and_the_rest_logged(
    sampling_client: TrackingClient,
    reader: Reader,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(power_supported=(True, False)))
    tc = sampling_client

    with caplog.at_level(logging.INFO, logger="tracklane"), tc.start_run() as run:
        wait_until(lambda: stored_samples(tc, reader, run.info.run_id) >= 3, what="samples")

    stored = system_keys_stored(reader, run.info.run_id)
    assert "system/gpu_0_power_usage_watts" in stored
    assert "system/gpu_1_power_usage_watts" not in stored
    assert "system/gpu_1_utilization_percentage" in stored
    assert set(SYSTEM_KEYS) <= stored
    notes = [r for r in caplog.records if "GPU 1 does not report power" in r.getMessage()]
    assert len(notes) == 1
