"""Outage spill: events a server cannot take go to the local journal and reach it later."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tracklane import TrackingClient
from tracklane._delivery.spool import Spool
from tracklane._settings import ServerConfig
from tracklane._stores.journal import Journal, JournalThread
from tracklane._stores.rest import RestBackend
from tracklane._wire.batching import batch_of

from servers import MlflowServer, Reader, tracklane_cli


def test_run_logged_through_a_server_outage_ends_complete_on_the_server(
    restartable_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reader = Reader(restartable_server.url)
    caplog.set_level(logging.WARNING, logger="tracklane")
    tc = TrackingClient(
        api_host=restartable_server.url, path_to_storage=str(tmp_path), retry_window=1.0, exit_timeout=120
    )
    tc.set_experiment("outage")
    run = tc.start_run(run_name="through-the-outage")
    for step in range(2000):
        tc.log_metric("loss", step, step=step)
    assert tc.flush(timeout=60)

    restartable_server.stop()
    for step in range(2000, 6000):
        tc.log_metric("loss", step, step=step)
    tc.set_tag("phase", "during-outage")
    # The server takes nothing for retry_window: flush gives up, and every event goes to the journal
    # (a request still in flight when the flush gave up joins it once its own retry window ends).
    assert not tc.flush(timeout=60)
    deadline = time.monotonic() + 30
    while tc.stats()["spilled"] < 4001 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tc.stats()["spilled"] == 4001 and tc.stats()["buffer_depth"] == tc.stats()["in_flight_events"] == 0
    restartable_server.start()
    for step in range(6000, 7000):
        tc.log_metric("loss", step, step=step)
    tc.close()  # no intervention: the client replays the journal before it exits

    run_id = run.info.run_id
    assert [s for _, s, _ in reader.history(run_id, "loss")] == list(range(7000))
    assert reader.tags(run_id)["phase"] == "during-outage"
    assert reader.run(run_id)["info"]["status"] == "FINISHED"
    assert "answers again" in caplog.text
    assert "did not reach" not in caplog.text  # nothing left behind


CHILD = """
import sys
from tracklane import TrackingClient
url, storage = sys.argv[1], sys.argv[2]
tc = TrackingClient(api_host=url, path_to_storage=storage, retry_window=1.0, exit_timeout=5)
tc.set_experiment("child-outage")
run = tc.start_run(run_name="child")
tc.log_param("lr", 0.5)
tc.flush()
print(run.info.run_id, flush=True)
sys.stdin.readline()  # the parent stops the server, then says go
for step in range(3000):
    tc.log_metric("loss", step * 0.5, step=step)
tc.set_tag("done", "yes")
# exits without end_run, with the server down
"""


def test_child_exiting_while_the_server_is_down_leaves_its_events_for_tracklane_sync(
    restartable_server: MlflowServer, tmp_path: Path
) -> None:
    reader = Reader(restartable_server.url)
    storage = tmp_path / "storage"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), restartable_server.url, str(storage)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        run_id = child.stdout.readline().strip()
        restartable_server.stop()
        child.stdin.write("go\n")
        child.stdin.flush()
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=30)

    assert child.returncode == 0, stderr
    [notice] = [line for line in stderr.splitlines() if "did not reach" in line]
    assert "3001 event(s)" in notice and "FINISHED" in notice
    command = notice.split("Deliver them with: ", 1)[1]
    assert command == f"tracklane sync {storage} --to {restartable_server.url}"

    restartable_server.start()
    synced = tracklane_cli(*command.split()[1:])

    assert synced.returncode == 0, synced.stderr
    assert [(v, s) for v, s, _ in reader.history(run_id, "loss")] == [(s * 0.5, s) for s in range(3000)]
    assert reader.params(run_id) == {"lr": "0.5"}
    assert reader.tags(run_id)["done"] == "yes"
    assert reader.run(run_id)["info"]["status"] == "FINISHED"
    again = tracklane_cli(*command.split()[1:])
    assert "synced 0 run(s), 0 event(s)" in again.stdout


def test_full_speed_logging_during_an_outage_neither_stalls_nor_loses_events(
    restartable_server: MlflowServer, tmp_path: Path
) -> None:
    reader = Reader(restartable_server.url)
    tc = TrackingClient(
        api_host=restartable_server.url,
        path_to_storage=str(tmp_path),
        max_buffer=2000,  # far fewer than the events logged: memory must stay bounded
        overflow="spill",
        retry_window=30.0,  # longer than the test waits: the full buffer is what spills
        exit_timeout=120,
    )
    tc.set_experiment("spill-under-load")
    run = tc.start_run(run_name="fast")
    restartable_server.stop()
    for step in range(50_000):
        tc.log_metric("loss", step, step=step)
    assert not tc.flush(timeout=120)  # nothing taken for retry_window: the journal holds the events
    stats = tc.stats()
    # Every event accepted (system metrics too) is on disk, none dropped: in the journal, or, with
    # a sender process, still in the event log, unread (it waits for the journal's older events).
    assert stats["dropped"] == 0 and stats["in_flight_events"] == 0
    assert stats["spilled"] + stats["buffer_depth"] == stats["enqueued"] >= 50_000
    if not stats.get("sender_process"):
        assert stats["buffer_depth"] == 0  # the in-process buffer is memory: it spilled
    elif stats["buffer_depth"]:
        assert stats["oldest_undelivered_age_s"] >= 20  # (logged before the flush's 30 s wait)
    restartable_server.start()
    tc.close()

    assert [s for _, s, _ in reader.history(run.info.run_id, "loss")] == list(range(50_000))
    assert reader.run(run.info.run_id)["info"]["status"] == "FINISHED"


def test_online_client_that_never_spills_creates_no_files(
    server_url: str, experiment_name: str, tmp_path: Path
) -> None:
    with TrackingClient(api_host=server_url, path_to_storage=str(tmp_path / "s")) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run():
            for step in range(3000):
                tc.log_metric("loss", step, step=step)

    assert not (tmp_path / "s").exists()
    assert not (tmp_path / "ml_runs").exists()


@pytest.mark.unit
async def test_batches_failing_together_share_one_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two requests in flight can fail at the same moment; both spills must land in one journal
    # (a second connection racing the first to create the file fails with "database is locked").
    opened: list[Journal] = []
    open_journal = Journal.at

    def counting_open(storage: str, thread: JournalThread | None = None) -> Journal:
        opened.append(open_journal(storage, thread))
        return opened[-1]

    monkeypatch.setattr(Journal, "at", counting_open)
    spool = Spool(str(tmp_path), RestBackend(ServerConfig("http://127.0.0.1:9")))
    batches = [
        batch_of(f"run{r}", [(0, f"run{r}", "loss", float(i), 1_700_000_000 + i, i) for i in range(500)])
        for r in range(8)
    ]

    written = await asyncio.gather(*(spool.write([batch], lambda events, reason: None) for batch in batches))

    assert written == [True] * 8 and not spool.broken
    assert len(opened) == 1 and spool.journal is opened[0]
    assert await spool.pending(spool.runs) == 8 * 500
