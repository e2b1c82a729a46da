"""The promise, case by case (issue 10): logging never waits on the server, and nothing logged is lost.

Each test is one row of the issue's table, against the real MLflow server (a FaultProxy in front of
it where the fault must be scripted). What the server stored is read back through its REST API:
the exact step lists of metric histories (nothing lost, nothing twice), params, final tag values
and run statuses.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tracklane import AuthenticationError, DeliveryError, InvalidInputError, TrackingClient

from servers import FaultProxy, MlflowServer, Reader, tracklane_cli

LONE_SURROGATE_PATH = os.fsdecode(b"/data/caf\xe9.csv")  # a non-UTF-8 file name, as Python decodes it


def _steps(reader: Reader, run_id: str, key: str) -> list[int]:
    return [step for _, step, _ in reader.history(run_id, key)]


def _status(reader: Reader, run_id: str) -> str:
    return str(reader.run(run_id)["info"]["status"])


def _sync_command(storage: Path, url: str) -> str:
    return f"tracklane sync {storage} --to {url}"


def _run(command: str) -> subprocess.CompletedProcess[str]:
    """Run a ``tracklane ...`` command line as printed by the client."""
    return tracklane_cli(*command.split()[1:], timeout=300)


# -- a. the loop is not throttled to the server ----------------------------------------------------


@pytest.mark.thread_sender
@pytest.mark.timeout(600)
def test_a_burst_of_300k_points_does_not_wait_for_the_server_and_all_arrive_once(
    server_url: str, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    tc = TrackingClient(api_host=server_url, path_to_storage=str(tmp_path))
    tc.set_experiment(experiment_name)
    run = tc.start_run(log_system_metrics=False)
    for step in range(300_000):
        tc.log_metric("loss", step, step=step)
    at_loop_end = tc.stats()

    tc.end_run()
    tc.close()

    # The server takes a few thousand events/s: a loop that waited for it would find most delivered.
    assert at_loop_end["delivered"] < 150_000 and at_loop_end["spilled"] > 0, at_loop_end
    assert _steps(reader, run.info.run_id, "loss") == list(range(300_000))
    assert _status(reader, run.info.run_id) == "FINISHED"


# -- b. slow is not down ---------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_a_server_taking_seconds_per_batch_gets_every_point_before_end_run_returns(
    fault_proxy: FaultProxy, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    fault_proxy.delay("runs/log-batch", 1.5)
    # A small buffer: the backlog goes through the journal, which must be empty once end_run returns.
    tc = TrackingClient(api_host=fault_proxy.url, path_to_storage=str(storage), max_buffer=2000)
    tc.set_experiment(experiment_name)
    run = tc.start_run(log_system_metrics=False)
    for step in range(10_000):
        tc.log_metrics({"a": step, "b": -step}, step=step)

    tc.end_run()

    run_id = run.info.run_id
    assert _steps(reader, run_id, "a") == list(range(10_000))
    assert _steps(reader, run_id, "b") == list(range(10_000))
    assert _status(reader, run_id) == "FINISHED"
    tc.close()
    assert fault_proxy.metrics_sent("a") == fault_proxy.metrics_sent("b") == 10_000  # none sent twice
    fault_proxy.heal()
    leftovers = _run(_sync_command(storage, fault_proxy.url))
    assert leftovers.returncode == 0, leftovers.stderr
    assert "0 event(s)" in leftovers.stdout, leftovers.stdout


# -- c. text that cannot be UTF-8 is refused at the call -------------------------------------------


def test_a_param_with_a_lone_surrogate_is_refused_at_the_call_and_the_rest_arrives(
    client: TrackingClient, reader: Reader
) -> None:
    with client.start_run(log_system_metrics=False) as run:
        for step in range(500):
            client.log_metric("loss", step, step=step)
        with pytest.raises(InvalidInputError) as refused:
            client.log_param("data_file", LONE_SURROGATE_PATH)
        client.log_param("lr", 0.1)
        for step in range(500, 1000):
            client.log_metric("loss", step, step=step)
        assert client.flush(timeout=60)

    assert "'data_file'" in str(refused.value)
    run_id = run.info.run_id
    assert _steps(reader, run_id, "loss") == list(range(1000))
    assert reader.params(run_id) == {"lr": "0.1"}
    assert _status(reader, run_id) == "FINISHED"


# -- d. one value the server fails on, every time --------------------------------------------------

POISON = "poison-7f3a91"  # the one value the server's store fails on


@pytest.mark.timeout(300)
def test_a_value_the_server_always_fails_on_blocks_neither_its_run_nor_the_next(
    fault_proxy: FaultProxy, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    fault_proxy.refuse_containing("runs/log-batch", POISON.encode())
    tc = TrackingClient(api_host=fault_proxy.url, path_to_storage=str(tmp_path / "storage"), retry_window=5)
    tc.set_experiment(experiment_name)
    first = tc.start_run(run_name="with-poison", log_system_metrics=False)
    for step in range(3000):
        tc.log_metric("loss", step, step=step)
        if step == 1500:
            tc.log_params({"source": POISON, "lr": 0.1})
    tc.set_tag("phase", "done")
    with pytest.raises(DeliveryError) as refused:
        tc.end_run()
    second = tc.start_run(run_name="healthy", log_system_metrics=False)
    for step in range(5000):
        tc.log_metric("loss", step, step=step)
    tc.end_run()
    tc.close()

    [rejected] = refused.value.rejected
    assert (rejected.run_id, rejected.kind, rejected.key, rejected.value) == (
        first.info.run_id,
        "param",
        "source",
        POISON,
    )
    assert "500" in rejected.reason
    assert _steps(reader, first.info.run_id, "loss") == list(range(3000))
    assert reader.params(first.info.run_id) == {"lr": "0.1"}
    assert reader.tags(first.info.run_id)["phase"] == "done"
    assert _status(reader, first.info.run_id) == "FINISHED"
    assert _steps(reader, second.info.run_id, "loss") == list(range(5000))
    assert _status(reader, second.info.run_id) == "FINISHED"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_gateway_answering_5xx_to_everything_for_a_while_is_an_outage_not_poison(
    fault_proxy: FaultProxy, experiment_name: str, reader: Reader, tmp_path: Path, status: int
) -> None:
    # MLflow restarting behind a gateway: every endpoint answers 5xx for a few seconds. Slow logging
    # makes one-event requests, the ones a mistaken poison verdict would reject outright.
    tc = TrackingClient(api_host=fault_proxy.url, path_to_storage=str(tmp_path / "storage"))
    tc.set_experiment(experiment_name)
    run = tc.start_run(log_system_metrics=False)
    tc.log_metric("loss", 0.0, step=0)
    assert tc.flush(timeout=60)
    for endpoint in ("runs/log-batch", "runs/get", "runs/update"):
        fault_proxy.answer(
            endpoint, status, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "restarting"}'
        )
    for step in range(1, 30):
        tc.log_metric("loss", float(step), step=step)
        tc.set_tag("last", str(step))
        time.sleep(0.2)  # paces the producer (a slow loop), not a synchronisation
        if step == 15:
            fault_proxy.heal()
    tc.end_run()  # raises DeliveryError if anything was taken for poison
    tc.close()

    assert _steps(reader, run.info.run_id, "loss") == list(range(30))
    assert reader.tags(run.info.run_id)["last"] == "29"
    assert _status(reader, run.info.run_id) == "FINISHED"


@pytest.mark.timeout(400)
def test_sync_of_a_journal_with_a_value_the_server_always_fails_on_delivers_the_rest(
    fault_proxy: FaultProxy, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    with TrackingClient(offline_mode=True, path_to_storage=str(storage)) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run(run_name="offline-with-poison"):
            for step in range(3000):
                tc.log_metric("loss", step, step=step)
                if step == 1500:
                    tc.log_params({"source": POISON, "lr": 0.1})
            tc.set_tag("phase", "done")
    fault_proxy.refuse_containing("runs/log-batch", POISON.encode())

    synced = _run(_sync_command(storage, fault_proxy.url))

    assert synced.returncode == 2, synced.stdout + synced.stderr
    assert [line for line in synced.stderr.splitlines() if "refused" in line and "'source'" in line]
    experiment = reader.experiment(experiment_name)
    assert experiment is not None
    [run] = reader.runs(experiment["experiment_id"])
    run_id = run["info"]["run_id"]
    assert _steps(reader, run_id, "loss") == list(range(3000))
    assert reader.params(run_id) == {"lr": "0.1"}
    assert reader.tags(run_id)["phase"] == "done"
    assert _status(reader, run_id) == "FINISHED"


# -- e. a refused key or a login page: stop, keep everything, say what to do -----------------------

AUTH_FAULTS = {
    "401": (401, b'{"error_code": "UNAUTHENTICATED", "message": "Invalid credentials"}', "application/json"),
    "403": (403, b'{"error_code": "PERMISSION_DENIED", "message": "Permission denied"}', "application/json"),
    "html-login-200": (200, b"<html><body><form>Sign in</form></body></html>", "text/html"),
}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("fault", list(AUTH_FAULTS))
def test_a_refused_key_or_login_page_mid_run_keeps_every_event_for_tracklane_sync(
    fault_proxy: FaultProxy, experiment_name: str, reader: Reader, tmp_path: Path, fault: str
) -> None:
    storage = tmp_path / "storage"
    tc = TrackingClient(api_host=fault_proxy.url, path_to_storage=str(storage), retry_window=5)
    tc.set_experiment(experiment_name)
    run = tc.start_run(log_system_metrics=False)
    for step in range(2000):
        tc.log_metric("loss", step, step=step)
    assert tc.flush(timeout=60)
    status, body, content_type = AUTH_FAULTS[fault]
    fault_proxy.answer("runs/log-batch", status, body, content_type)
    before = fault_proxy.requests_to("runs/log-batch")
    for step in range(2000, 7000):
        tc.log_metric("loss", step, step=step)
    tc.set_tag("phase", "after-the-refusal")

    with pytest.raises(AuthenticationError) as on_flush:
        tc.flush(timeout=120)
    with pytest.raises(AuthenticationError):
        tc.end_run(status="FAILED")
    tc.close(timeout=60)
    refused_requests = fault_proxy.requests_to("runs/log-batch") - before

    assert refused_requests <= 11, refused_requests  # the first refusal, then at most ~10: no bisection
    command = _sync_command(storage, fault_proxy.url)
    assert command in str(on_flush.value)
    fault_proxy.heal()
    synced = _run(command)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    run_id = run.info.run_id
    assert _steps(reader, run_id, "loss") == list(range(7000))
    assert fault_proxy.metrics_sent("loss") == 7000  # every point forwarded exactly once
    assert reader.tags(run_id)["phase"] == "after-the-refusal"
    assert _status(reader, run_id) == "FAILED"


# -- f. the server is down when the run ends -------------------------------------------------------


@pytest.mark.timeout(400)
def test_end_run_while_the_server_is_down_returns_and_sync_finishes_the_run_later(
    restartable_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reader = Reader(restartable_server.url)
    storage = tmp_path / "storage"
    caplog.set_level(logging.WARNING, logger="tracklane")
    tc = TrackingClient(api_host=restartable_server.url, path_to_storage=str(storage), retry_window=2)
    tc.set_experiment("end-while-down")
    run = tc.start_run(log_system_metrics=False)
    for step in range(1000):
        tc.log_metric("loss", step, step=step)
    assert tc.flush(timeout=60)
    restartable_server.stop()
    for step in range(1000, 3000):
        tc.log_metric("loss", step, step=step)
    tc.set_tag("phase", "ended-during-the-outage")

    tc.end_run()  # returns: the leftovers and the run's end stay in the journal
    tc.close(timeout=60)

    command = _sync_command(storage, restartable_server.url)
    journal = str(storage / "ml_runs" / "tracklane.db")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if journal in w and command in w], warnings
    restartable_server.start()
    synced = _run(command)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    run_id = run.info.run_id
    assert _steps(reader, run_id, "loss") == list(range(3000))
    assert reader.tags(run_id)["phase"] == "ended-during-the-outage"
    assert _status(reader, run_id) == "FINISHED"


# -- g. memory full, journal unwritable, server down: drop and say so, never block for good ---------


@pytest.mark.timeout(180)  # the bound on the loop below: it must finish, however it handles the drops
def test_with_no_room_anywhere_logging_drops_counts_and_logs_an_error_instead_of_blocking(
    restartable_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("the journal cannot be created under a regular file\n")
    caplog.set_level(logging.WARNING, logger="tracklane")
    tc = TrackingClient(
        api_host=restartable_server.url,
        path_to_storage=str(not_a_directory / "storage"),
        max_buffer=1000,
        block_timeout=1,
        retry_window=2,
    )
    tc.set_experiment("no-room-anywhere")
    tc.start_run(log_system_metrics=False)
    restartable_server.stop()

    for step in range(5000):
        tc.log_metric("loss", step, step=step)
    stats = tc.stats()
    tc.close(timeout=30)

    assert stats["dropped"] > 0, stats
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert [e for e in errors if "dropped" in e], errors


# -- h. a value whose conversion raises is one bad entry, not a lost call -------------------------


class FloatRaises:
    """A metric value whose ``__float__`` fails (a sensor that went away, a lazy tensor)."""

    def __float__(self) -> float:
        raise RuntimeError("sensor unplugged")

    def __repr__(self) -> str:
        return "FloatRaises()"


class StrRaises:
    """A param value whose ``__str__`` fails."""

    def __str__(self) -> str:
        raise RuntimeError("cannot describe myself")

    def __repr__(self) -> str:
        return "StrRaises()"


def test_a_metric_whose_float_raises_is_refused_and_the_other_metrics_are_logged(
    client: TrackingClient, reader: Reader
) -> None:
    with client.start_run(log_system_metrics=False) as run:
        with pytest.raises(InvalidInputError) as refused:
            client.log_metrics({"a": 1.0, "b": FloatRaises(), "c": 3.0}, step=0)  # type: ignore[dict-item]
        assert client.flush(timeout=60)

    assert "'b'" in str(refused.value)
    run_id = run.info.run_id
    assert [(v, s) for v, s, _ in reader.history(run_id, "a")] == [(1.0, 0)]
    assert [(v, s) for v, s, _ in reader.history(run_id, "c")] == [(3.0, 0)]
    assert reader.history(run_id, "b") == []


def test_a_param_whose_str_raises_is_refused_and_the_other_params_are_logged(
    client: TrackingClient, reader: Reader
) -> None:
    with client.start_run(log_system_metrics=False) as run:
        with pytest.raises(InvalidInputError) as refused:
            client.log_params({"p": "x", "q": StrRaises(), "r": 3})
        assert client.flush(timeout=60)

    assert "'q'" in str(refused.value)
    assert reader.params(run.info.run_id) == {"p": "x", "r": "3"}


# -- i. an AsyncTrackingClient nobody closed ------------------------------------------------------

NEVER_CLOSED = """
import asyncio, sys
from tracklane import AsyncTrackingClient

async def main():
    tc = AsyncTrackingClient(api_host=sys.argv[1], path_to_storage=sys.argv[2])
    await tc.set_experiment(sys.argv[3])
    run = await tc.start_run(run_name="never-closed", log_system_metrics=False)
    for step in range(5000):
        tc.log_metric("loss", step, step=step)
    print(run.info.run_id, flush=True)
    # returns without aclose(): asyncio.run closes the loop, then the interpreter exits

asyncio.run(main())
"""


@pytest.mark.timeout(300)
def test_an_async_client_never_closed_keeps_its_events_for_the_next_client(
    server_url: str, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NEVER_CLOSED), server_url, str(storage), experiment_name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    run_id = child.stdout.splitlines()[0]  # then MLflow's View-run lines

    TrackingClient(api_host=server_url, path_to_storage=str(storage)).close()  # resumes, waits

    assert _steps(reader, run_id, "loss") == list(range(5000))
    assert _status(reader, run_id) == "FINISHED"


# -- j. a sane age ---------------------------------------------------------------------------------


def test_oldest_undelivered_age_right_after_log_params_is_a_sane_age(client: TrackingClient) -> None:
    with client.start_run(log_system_metrics=False):
        client.log_params({"lr": 0.1, "batch_size": 32})
        age = client.stats()["oldest_undelivered_age_s"]

    assert 0 <= age < 60, age


# -- k. Ctrl-C that nobody catches -----------------------------------------------------------------

INTERRUPTED = """
import sys
from tracklane import TrackingClient

tc = TrackingClient(api_host=sys.argv[1])
tc.set_experiment(sys.argv[2])
run = tc.start_run(log_system_metrics=False)  # no `with`: nothing in the program ends the run
for step in range(1000):
    tc.log_metric("loss", step, step=step)
print(run.info.run_id, flush=True)
raise KeyboardInterrupt
"""


def test_an_uncaught_keyboard_interrupt_ends_the_active_run_killed(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(INTERRUPTED), server_url, experiment_name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    run_id = child.stdout.splitlines()[0]  # then MLflow's View-run lines

    assert "KeyboardInterrupt" in child.stderr, child.stderr
    assert _steps(reader, run_id, "loss") == list(range(1000))
    assert _status(reader, run_id) == "KILLED"


@pytest.mark.timeout(300)
def test_a_damaged_journal_during_an_outage_keeps_events_in_memory_until_the_server_answers(
    fault_proxy: FaultProxy, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    (storage / "ml_runs").mkdir(parents=True)
    (storage / "ml_runs" / "tracklane.db").write_bytes(b"not a journal " * 100)
    tc = TrackingClient(api_host=fault_proxy.url, path_to_storage=str(storage), retry_window=1)
    tc.set_experiment(experiment_name)
    run = tc.start_run(log_system_metrics=False)
    fault_proxy.answer("runs/log-batch", 503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}')
    for step in range(3000):
        tc.log_metric("loss", float(step), step=step)
    assert not tc.flush(timeout=30)  # the server takes nothing, and the journal cannot be used
    fault_proxy.heal()
    tc.end_run()
    tc.close()

    assert _steps(reader, run.info.run_id, "loss") == list(range(3000))
    assert _status(reader, run.info.run_id) == "FINISHED"
