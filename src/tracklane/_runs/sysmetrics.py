"""System metrics while a run is active: CPU, memory, disk, network and NVIDIA GPUs.

The sampler is a task on the engine's event loop, not a thread of its own: every interval it makes a
few non-blocking reads (``/proc`` files and a ``statvfs`` through psutil, NVML calls when
``pynvml`` is importable) and puts the values on the engine's hot path, so they travel in the same
buffer and batches as the user's metrics. Names and units are MLflow's
(``mlflow/system_metrics/metrics/*_monitor.py``), so MLflow's and OICM's system charts show them;
the step counts samples, as MLflow's monitor does.

A sampler failure never reaches the training loop: it is logged once and sampling stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING

import psutil

from .._settings import system_metrics_interval, system_metrics_wanted

if TYPE_CHECKING:
    from .._delivery.buffer import Buffer
    from .._entities import Metric, Run

    #: Reads a run's metric history (the store's ``get_metric_history``).
    History = Callable[[str, str], Awaitable[list[Metric]]]

logger = logging.getLogger("tracklane")

PREFIX = "system/"
#: A key the sampler always logs; on a resumed run its last step tells where counting goes on.
_PROBE_KEY = PREFIX + "cpu_utilization_percentage"
#: Longest end_run waits for a cancelled sampler; it stops at its next await, i.e. at once.
_STOP_WAIT = 2.0


class _Gpus:
    """NVIDIA GPUs through NVML (``pynvml``, from the ``nvidia-ml-py`` package)."""

    def __init__(self, nvml: ModuleType) -> None:
        self._nvml = nvml
        nvml.nvmlInit()
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        self._unsupported: set[tuple[int, str]] = set()

    @classmethod
    def open(cls) -> _Gpus | None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            return None  # no GPU extra installed: nothing to say
        try:
            return cls(nvml)
        except Exception as exc:  # no driver, no device: CPU metrics go on without GPUs
            logger.info("tracklane: no GPU metrics (NVML did not start: %s).", exc)
            return None

    def read(self, out: dict[str, float]) -> None:
        """Add each GPU's readings to ``out``; a reading the device does not support is skipped."""
        nvml = self._nvml
        for i, handle in enumerate(self._handles):
            gpu = f"{PREFIX}gpu_{i}_"
            with self._reading(i, "memory"):
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                out[gpu + "memory_usage_percentage"] = round(memory.used / memory.total * 100, 1)
                out[gpu + "memory_usage_megabytes"] = round(memory.used / 1e6, 1)
            with self._reading(i, "utilization"):
                out[gpu + "utilization_percentage"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            with self._reading(i, "power"):
                milliwatts = nvml.nvmlDeviceGetPowerUsage(handle)
                limit = nvml.nvmlDeviceGetEnforcedPowerLimit(handle)
                out[gpu + "power_usage_watts"] = round(milliwatts / 1000, 1)
                out[gpu + "power_usage_percentage"] = round(milliwatts / limit * 100, 1)

    @contextlib.contextmanager
    def _reading(self, index: int, what: str) -> Iterator[None]:
        try:
            yield
        except self._nvml.NVMLError as exc:
            # Some devices do not report power or utilisation: say so once, keep the other readings.
            if (index, what) not in self._unsupported:
                self._unsupported.add((index, what))
                logger.info("tracklane: GPU %d does not report %s (%s); skipping it.", index, what, exc)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


class SystemMetricsSampler:
    """Samples the machine every ``interval`` seconds and logs through the buffer's hot path."""

    def __init__(self, buffer: Buffer, interval: float, first_step: int = 0, node: str | None = None) -> None:
        self.buffer = buffer
        self.node = node  # MLflow's node-id form: system/<node>/...
        self.interval = interval
        self.step = first_step
        self._net_base = (0, 0)
        self._gpus: _Gpus | None = None

    def begin(self) -> None:
        """Take the baselines: CPU times for the first utilisation, network counters since start."""
        psutil.cpu_percent(interval=None)
        net = psutil.net_io_counters()
        self._net_base = (net.bytes_recv, net.bytes_sent)
        self._gpus = _Gpus.open()

    def sample(self) -> dict[str, float]:
        """One reading of every metric, keyed by MLflow's names."""
        memory = psutil.virtual_memory()
        disk = psutil.disk_usage(os.sep)
        net = psutil.net_io_counters()
        out = {
            PREFIX + "cpu_utilization_percentage": round(psutil.cpu_percent(interval=None), 1),
            PREFIX + "system_memory_usage_megabytes": round(memory.used / 1e6, 1),
            PREFIX + "system_memory_usage_percentage": round(memory.used / memory.total * 100, 1),
            PREFIX + "disk_usage_megabytes": round(disk.used / 1e6, 1),
            PREFIX + "disk_usage_percentage": round(disk.percent, 1),
            PREFIX + "disk_available_megabytes": round(disk.free / 1e6, 1),
            PREFIX + "network_receive_megabytes": (net.bytes_recv - self._net_base[0]) / 1e6,
            PREFIX + "network_transmit_megabytes": (net.bytes_sent - self._net_base[1]) / 1e6,
        }
        if self._gpus is not None:
            self._gpus.read(out)
        return out

    async def run(self, run_id: str) -> None:
        try:
            self.begin()
            while True:
                await asyncio.sleep(self.interval)
                sample = self.sample()
                if self.node:
                    sample = {_node_key(k, self.node): v for k, v in sample.items()}
                self.buffer.log_metrics(run_id, sample, step=self.step)
                self.step += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the sampler is a guest on the loop: it must never break the run
            logger.warning(
                "tracklane: system metrics sampling failed for run %s and is stopped (%s: %s); "
                "your own metrics are not affected.",
                run_id,
                type(exc).__name__,
                exc,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
        finally:
            if self._gpus is not None:
                self._gpus.close()


def _node_key(key: str, node: str) -> str:
    return f"{PREFIX}{node}/{key[len(PREFIX) :]}"


async def _resume_step(history: History, run: Run, node: str | None) -> int:
    """The first step for a continued run: one past the last system sample it already holds."""
    probe = _node_key(_PROBE_KEY, node) if node else _PROBE_KEY
    if probe not in run.data.metrics:
        return 0
    points = await history(run.info.run_id, probe)
    return max((p.step for p in points), default=-1) + 1


async def _sample_run(buffer: Buffer, history: History, run: Run, interval: float, node: str | None) -> None:
    try:
        first = await _resume_step(history, run, node)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.warning(
            "tracklane: could not read the last system metrics step of run %s (%s); counting from 0.",
            run.info.run_id,
            exc,
        )
        first = 0
    await SystemMetricsSampler(buffer, interval, first, node).run(run.info.run_id)


def sampler_interval(log_system_metrics: bool | None, configured: float | None) -> float | None:
    """The sampling interval for a run about to start, or None when it samples nothing.

    Called before the run is created, so a bad ``MLFLOW_*`` variable or interval raises
    ConfigurationError without leaving a run behind.
    """
    return system_metrics_interval(configured) if system_metrics_wanted(log_system_metrics) else None


def start_sampler(
    buffer: Buffer, history: History, run: Run, interval: float | None, node: str | None = None
) -> asyncio.Task[None] | None:
    """Start sampling ``run`` on the running loop (None: sampling is off). The caller keeps the task
    and hands it to :func:`stop_sampler` when the run ends."""
    if interval is None:
        return None
    return asyncio.get_running_loop().create_task(
        _sample_run(buffer, history, run, interval, node), name=f"tracklane-sysmetrics-{run.info.run_id}"
    )


async def stop_sampler(task: asyncio.Task[None] | None) -> None:
    """Cancel a sampler and wait for it to finish. The wait is immediate in practice (the sampler
    only ever waits in ``asyncio.sleep``) and bounded regardless; it never swallows a
    cancellation of the caller."""
    if task is None or task.done():
        return
    task.cancel()
    await asyncio.wait({task}, timeout=_STOP_WAIT)
