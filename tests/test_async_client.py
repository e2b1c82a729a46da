"""AsyncTrackingClient: the same engine on the caller's loop, against a real MLflow server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest

from tracklane import AsyncTrackingClient, ConfigurationError

from servers import Reader


async def test_the_issue_example_logs_and_finishes_the_run(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    async with AsyncTrackingClient(api_host=server_url) as tc:
        await tc.set_experiment(experiment_name)
        async with tc.start_run(run_name="canary") as run:
            tc.log_metric("latency_ms", 12.5)
            await tc.log_params({"model": "v3"})

    stored = reader.run(run.info.run_id)
    assert stored["info"]["status"] == "FINISHED" and stored["info"]["run_name"] == "canary"
    assert reader.history(run.info.run_id, "latency_ms")[0][0] == 12.5
    assert reader.params(run.info.run_id) == {"model": "v3"}


@pytest.mark.slow
async def test_a_thousand_concurrent_tasks_deliver_every_event_exactly_once(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    async with AsyncTrackingClient(api_host=server_url) as tc:
        await tc.set_experiment(experiment_name)
        async with tc.start_run(log_system_metrics=False) as run:

            async def handler(task: int) -> None:
                for i in range(100):
                    tc.log_metric("requests", task * 100 + i, step=task * 100 + i)
                    if i % 10 == 0:
                        await asyncio.sleep(0)  # interleave with the other tasks and the drain

            await asyncio.gather(*(handler(t) for t in range(1000)))

    steps = [p[1] for p in reader.history(run.info.run_id, "requests")]
    assert steps == list(range(100_000))


async def test_cancelling_a_flush_loses_no_events(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    async with AsyncTrackingClient(api_host=server_url) as tc:
        await tc.set_experiment(experiment_name)
        async with tc.start_run(log_system_metrics=False) as run:
            for step in range(5000):
                tc.log_metric("x", step, step=step)
            flushing = asyncio.ensure_future(tc.flush())
            await asyncio.sleep(0.01)
            flushing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await flushing
            for step in range(5000, 6000):
                tc.log_metric("x", step, step=step)

    assert [p[1] for p in reader.history(run.info.run_id, "x")] == list(range(6000))


async def test_cancelling_end_run_still_ends_the_run_with_every_event(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    async with AsyncTrackingClient(api_host=server_url) as tc:
        await tc.set_experiment(experiment_name)
        run = await tc.start_run(log_system_metrics=False)
        for step in range(5000):
            tc.log_metric("y", step, step=step)
        ending = asyncio.ensure_future(tc.end_run("FINISHED"))
        await asyncio.sleep(0.01)
        ending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ending
        assert await tc.flush(timeout=60)
        for _ in range(200):  # the shielded end_run finishes on its own; bounded wait for it
            if tc.active_run() is None and tc.last_active_run() is not None:
                break
            await asyncio.sleep(0.05)

    assert len(reader.history(run.info.run_id, "y")) == 5000
    assert reader.run(run.info.run_id)["info"]["status"] == "FINISHED"


@pytest.mark.slow
async def test_the_loop_keeps_serving_while_a_hundred_thousand_events_drain(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    beats: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        while not stop.is_set():
            beats.append(time.monotonic())
            await asyncio.sleep(0.005)

    async with AsyncTrackingClient(api_host=server_url) as tc:
        await tc.set_experiment(experiment_name)
        async with tc.start_run(log_system_metrics=False) as run:
            for step in range(100_000):
                tc.log_metric("drain", step, step=step)
            beating = asyncio.ensure_future(heartbeat())
            drain_started = time.monotonic()
            assert await tc.flush(timeout=120)
            drain_ended = time.monotonic()
            stop.set()
            await beating

    during = [b for b in beats if drain_started <= b <= drain_ended]
    # The drain takes many server round trips; a loop monopolised by it would show no beats.
    assert len(during) >= 20
    assert len(reader.history(run.info.run_id, "drain")) == 100_000


@pytest.mark.thread_sender
async def test_awaited_logging_calls_keep_the_buffer_within_its_bound(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    depths = []
    async with AsyncTrackingClient(api_host=server_url, max_buffer=200) as tc:
        await tc.set_experiment(experiment_name)
        async with tc.start_run(log_system_metrics=False) as run:
            for step in range(5000):
                await tc.log_metric("paced", step, step=step)
                depths.append(tc.stats()["buffer_depth"])

    assert max(depths) <= 200
    assert len(reader.history(run.info.run_id, "paced")) == 5000


def test_overflow_block_is_refused_because_it_would_stop_the_loop(server_url: str) -> None:
    with pytest.raises(ConfigurationError, match="cannot block"):
        AsyncTrackingClient(api_host=server_url, overflow="block")


@pytest.mark.thread_sender
def test_an_unclosed_client_at_loop_shutdown_warns_once_instead_of_hanging(
    server_url: str, experiment_name: str
) -> None:
    script = f"""
        import asyncio
        from tracklane import AsyncTrackingClient
        async def main():
            tc = AsyncTrackingClient(api_host={server_url!r})
            await tc.set_experiment({experiment_name!r})
            await tc.start_run(log_system_metrics=False)
            tc.log_metric("never_flushed", 1.0)
        asyncio.run(main())
        print("returned")
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "returned" in proc.stdout
    assert proc.stderr.count("still open") == 1
    assert "1 event(s) were not delivered" in proc.stderr


def test_works_under_plain_asyncio_run(server_url: str, experiment_name: str, reader: Reader) -> None:
    async def main() -> str:
        async with AsyncTrackingClient(api_host=server_url) as tc:
            await tc.set_experiment(experiment_name)
            async with tc.start_run(log_system_metrics=False) as run:
                tc.log_metrics({"a": 1.0, "b": 2.0}, step=1)
            return run.info.run_id

    run_id = asyncio.run(main())
    assert reader.history(run_id, "b")[0][:2] == (2.0, 1)


def test_works_under_uvloop(server_url: str, experiment_name: str, reader: Reader) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> str:
        async with AsyncTrackingClient(api_host=server_url) as tc:
            await tc.set_experiment(experiment_name)
            async with tc.start_run(log_system_metrics=False) as run:
                for step in range(3000):
                    tc.log_metric("uv", step, step=step)
            return run.info.run_id

    run_id = uvloop.run(main())
    assert [p[1] for p in reader.history(run_id, "uv")] == list(range(3000))
