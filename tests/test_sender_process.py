"""``TRACKLANE_SENDER=process``: a sender process delivers the event log, off the trainer's GIL.

What the server stores is what the in-process worker stores; ``end_run`` still delivers the run's
events before it ends the run; a sender that dies mid-run costs nothing (this process takes its log
back and delivers it itself); and the counters stay true.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tracklane import TrackingClient
from tracklane._delivery import relay as relay_module

from servers import Reader


@pytest.fixture
def process_client(
    server_url: str, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TrackingClient]:
    """A TrackingClient on the session server whose events a sender process delivers."""
    monkeypatch.setenv("TRACKLANE_SENDER", "process")
    tc = TrackingClient(api_host=server_url, exit_timeout=30)
    tc.set_experiment(experiment_name)
    yield tc
    tc.close()


def _senders() -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children()
        if "tracklane._delivery.sender_process" in " ".join(p.cmdline())
    ]


def _sender_up(tc: TrackingClient) -> None:
    """The sender process starts with the client's first events: log a warm-up run, then wait
    until it has taken the log over."""
    with tc.start_run(run_name="warm-up", log_system_metrics=False):
        tc.log_metric("warm", 0.0)
    _wait_for_the_sender(tc)


def _wait_for_the_sender(tc: TrackingClient) -> None:
    """Bounded: the sender process has started and taken the log over."""
    deadline = time.monotonic() + 60
    while tc.stats().get("sender_process") != 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tc.stats().get("sender_process") == 1.0, tc.stats()


def _log_a_run(tc: TrackingClient, steps: int, name: str) -> str:
    with tc.start_run(run_name=name, log_system_metrics=False) as run:
        tc.log_params({"lr": 0.1, "layers": [64, 32]})
        tc.set_tag("phase", "warmup")
        for step in range(steps):
            tc.log_metric("loss", 1.0 / (step + 1), step=step)
            if step % 100 == 0:
                tc.log_metrics({"acc": step / steps, "lr": 0.1}, step=step)
        tc.set_tag("phase", "done")
    return run.info.run_id


def _stored(reader: Reader, run_id: str) -> dict[str, object]:
    return {
        "loss": [(v, s) for v, s, _ in reader.history(run_id, "loss")],
        "acc": [(v, s) for v, s, _ in reader.history(run_id, "acc")],
        "params": reader.params(run_id),
        "phase": reader.tags(run_id)["phase"],
        "status": reader.run(run_id)["info"]["status"],
    }


@pytest.fixture
def two_clients(
    server_url: str, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[TrackingClient]]:
    made = []
    for sender in ("thread", "process"):
        monkeypatch.setenv("TRACKLANE_SENDER", sender)
        tc = TrackingClient(api_host=server_url, exit_timeout=30)
        tc.set_experiment(experiment_name)
        made.append(tc)
    yield made
    for tc in made:
        tc.close()


def test_the_server_stores_the_same_run_from_either_sender(
    two_clients: list[TrackingClient], reader: Reader
) -> None:
    thread, process = two_clients
    _sender_up(process)
    assert len(_senders()) == 1  # the process client's
    by_thread = _stored(reader, _log_a_run(thread, 20_000, "by-thread"))
    by_process = _stored(reader, _log_a_run(process, 20_000, "by-process"))
    assert by_process == by_thread
    assert len(by_process["loss"]) == 20_000  # type: ignore[arg-type]
    assert by_process["phase"] == "done" and by_process["status"] == "FINISHED"


def test_end_run_delivers_the_runs_events_before_it_ends_it(
    process_client: TrackingClient, reader: Reader
) -> None:
    tc = process_client
    for n in range(3):
        run_id = _log_a_run(tc, 3_000, f"run-{n}")
        # Read at once, with nothing waited for after end_run: everything is there already.
        assert len(reader.history(run_id, "loss")) == 3_000
        assert reader.run(run_id)["info"]["status"] == "FINISHED"
    stats = tc.stats()
    assert stats["enqueued"] == stats["delivered"] == 3 * (3_000 + 30 * 2 + 4)
    assert stats["buffer_depth"] == stats["in_flight_events"] == stats["dropped"] == 0
    tc.close()
    assert not _senders()  # close ends the sender, once it has delivered
    assert not list(Path("ml_runs").glob("events-*.tll"))  # delivered: the log's files are gone


def test_a_sender_killed_mid_run_loses_nothing_this_process_takes_its_log_back(
    process_client: TrackingClient, reader: Reader, caplog: pytest.LogCaptureFixture
) -> None:
    tc = process_client
    with caplog.at_level(logging.WARNING, logger="tracklane"), tc.start_run(log_system_metrics=False) as run:
        for step in range(15_000):  # some before the sender takes over, delivered in-process
            tc.log_metric("loss", step * 0.5, step=step)
        _wait_for_the_sender(tc)
        for step in range(15_000, 30_000):
            tc.log_metric("loss", step * 0.5, step=step)
            if step == 20_000:
                [sender] = _senders()
                sender.send_signal(signal.SIGKILL)
                sender.wait(10)
    run_id = run.info.run_id
    steps = [s for _, s, _ in reader.history(run_id, "loss")]
    assert sorted(steps) == list(range(30_000))
    assert reader.run(run_id)["info"]["status"] == "FINISHED"
    assert "the sender process exited" in caplog.text
    # From now on this process delivers by itself.
    with tc.start_run(log_system_metrics=False) as second:
        tc.log_metric("loss", 1.0)
    assert len(reader.history(second.info.run_id, "loss")) == 1


def test_flush_waits_for_the_senders_acknowledgement(process_client: TrackingClient, reader: Reader) -> None:
    tc = process_client
    _sender_up(tc)  # every event below is the sender process's to deliver
    delivered = tc.stats()["delivered"]
    run = tc.start_run(log_system_metrics=False)
    for step in range(5_000):
        tc.log_metric("loss", 0.5, step=step)
    assert tc.flush(timeout=60)
    assert len(reader.history(run.info.run_id, "loss")) == 5_000  # there when flush returned
    assert tc.stats()["delivered"] - delivered == 5_000
    tc.end_run()


ASYNC_PARENT = """
import asyncio, os, signal, sys, time
import psutil
from tracklane import AsyncTrackingClient

async def main():
    tc = AsyncTrackingClient(api_host=sys.argv[1], path_to_storage=sys.argv[2], exit_timeout=5)
    await tc.set_experiment(sys.argv[3])
    run = await tc.start_run(log_system_metrics=False)
    deadline = time.monotonic() + 60
    while tc.stats().get("sender_process") != 1.0 and time.monotonic() < deadline:
        tc.log_metric("x", 0.0, step=0)
        await asyncio.sleep(0.01)
    for step in range(1, 2001):
        tc.log_metric("x", float(step), step=step)
    (sender,) = psutil.Process().children()
    child = os.fork()
    if child == 0:  # a child (a data worker, say) that logs nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # (the test reads the parent's stdout to its end)
        if sys.argv[4] == "exits":
            sys.exit(0)  # a normal exit: the client's exit hooks run here too
        time.sleep(120)  # outlives its parent
        os._exit(0)
    if sys.argv[4] == "exits":
        os.waitpid(child, 0)
    print(run.info.run_id, tc.stats().get("sender_process"), child, sender.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


@pytest.mark.parametrize("child_exit", ["lingers", "exits"])
def test_a_forked_child_of_an_async_client_leaves_its_parents_sender_and_log_alone(
    server_url: str, experiment_name: str, reader: Reader, tmp_path: Path, child_exit: str
) -> None:
    """The sender process learns that its trainer died when its stdin pipe closes. A forked child
    holding a copy of that pipe would keep the sender waiting (and its log locked) for as long as
    the child lives; a child that exits normally runs the client's exit hooks on its copy of the
    parent's log, which must not close or delete the parent's files. Whichever face started the
    sender, a fork leaves the parent's pipes and log to the parent: the trainer is SIGKILLed (its
    child still alive, or gone after a normal exit), and the sender delivers what the log holds
    and exits within ``exit_timeout``."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(ASYNC_PARENT),
            server_url,
            str(tmp_path),
            experiment_name,
            child_exit,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TRACKLANE_SENDER": "process"},
    )
    try:
        out, _ = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == -signal.SIGKILL, out
    run_id, took_over, child_pid, sender_pid = out.split()
    sender = psutil.Process(int(sender_pid))
    child = psutil.Process(int(child_pid)) if child_exit == "lingers" else None  # (else reaped)
    try:
        assert took_over == "1.0", "the sender process never took the log over"
        if child is not None:
            assert child.is_running(), "the forked child is not alive: the test proves nothing"
        _gone, alive = psutil.wait_procs([sender], timeout=60)
        assert not alive, "the sender process is still waiting for a parent that is gone"
        if child is not None:
            assert child.is_running()
        steps = sorted({s for _, s, _ in reader.history(run_id, "x")})
        assert steps == list(range(2001))
    finally:
        for p in (child, sender):
            if p is not None:
                with contextlib.suppress(psutil.Error):
                    p.kill()


def test_a_frozen_application_delivers_its_events_itself_and_starts_nothing(
    server_url: str,
    experiment_name: str,
    reader: Reader,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In a PyInstaller-style bundle ``sys.executable`` is the application: ``-m`` would start the
    application again, not a sender. The client says so once and delivers with its own worker."""
    monkeypatch.setenv("TRACKLANE_SENDER", "process")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    caplog.set_level(logging.WARNING, logger="tracklane")
    with TrackingClient(api_host=server_url, exit_timeout=30) as tc:
        tc.set_experiment(experiment_name)
        run_id = _log_a_run(tc, 300, "frozen")
        assert not _senders()
        assert tc.stats().get("sender_process") == 0.0
    assert "cannot start a sender process (a frozen application)" in caplog.text
    assert len(reader.history(run_id, "loss")) == 300
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


def test_a_client_that_only_reads_starts_no_sender_process(
    server_url: str, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender process costs an interpreter and ~40 MiB: it starts with the first events to
    deliver, not with the client (a notebook's MlflowClient that searches runs never needs one)."""
    monkeypatch.setenv("TRACKLANE_SENDER", "process")
    with TrackingClient(api_host=server_url, exit_timeout=30) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run(run_name="read-only", log_system_metrics=False) as run:
            pass
        tc.get_run(run.info.run_id)
        time.sleep(1.0)  # (a sender started with the client would be running by now)
        assert not _senders()
        with tc.start_run(run_name="logs", log_system_metrics=False):
            tc.log_metric("loss", 0.5, step=0)
        _wait_for_the_sender(tc)
        assert len(_senders()) == 1


def test_a_stopped_sender_does_not_hang_an_unbounded_flush(
    process_client: TrackingClient,
    reader: Reader,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``flush()`` with no timeout waits on the sender's reply. A sender that is stopped (SIGSTOP,
    a debugger) or hung never replies and never exits: once it has been silent for ``STALL``
    seconds (it beats every second otherwise), it is ended and this process takes its records back
    and delivers them itself: every point once."""
    monkeypatch.setattr(relay_module, "STALL", 3.0)
    tc = process_client
    _sender_up(tc)
    [sender] = _senders()
    with caplog.at_level(logging.WARNING, logger="tracklane"):
        run = tc.start_run(log_system_metrics=False)
        for step in range(3_000):
            tc.log_metric("loss", step * 0.5, step=step)
        sender.send_signal(signal.SIGSTOP)
        for step in range(3_000, 6_000):
            tc.log_metric("loss", step * 0.5, step=step)
        flushed: list[bool] = []
        flusher = threading.Thread(target=lambda: flushed.append(tc.flush()), daemon=True)
        flusher.start()
        flusher.join(120)
        assert not flusher.is_alive(), "flush() is still waiting on a stopped sender"
        assert flushed == [True]
        tc.end_run()
    assert "silent: stopped or hung" in caplog.text
    assert not sender.is_running() or sender.status() == psutil.STATUS_ZOMBIE
    steps = [s for _, s, _ in reader.history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(6_000))
