"""The journal and its uploaders (issue 10, items 6 and 8): two ``tracklane sync`` at once, a sync
beside a client replaying its outage, a damaged or foreign journal file, and a sync pointed at the
right server under another name.

Everything runs as a user would: clients in this process, ``tracklane`` in processes of its own,
and what the server stored is read back through its REST API.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tracklane import ConfigurationError, TrackingClient
from tracklane._stores.journal import Journal, journal_file, server_key

from servers import FaultProxy, MlflowServer, Reader, tracklane_cli

OFFLINE_RUN_TAG = "tracklane.offline_run_id"


def _steps(reader: Reader, run_id: str, key: str) -> list[int]:
    return [step for _, step, _ in reader.history(run_id, key)]


def _runs(reader: Reader, experiment: str) -> list[dict[str, object]]:
    found = reader.experiment(experiment)
    assert found is not None, f"experiment {experiment!r} is not on the server"
    return reader.runs(found["experiment_id"])


def _sync_process(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tracklane._cli", "sync", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    return proc.returncode, out + err


# -- two uploaders at once ---------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_two_syncs_at_once_leave_each_of_20_offline_runs_once_and_complete(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader
) -> None:
    offline_ids = set()
    with TrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc:
        tc.set_experiment(experiment_name)
        for r in range(20):
            with tc.start_run(run_name=f"run-{r}", log_system_metrics=False) as run:
                tc.log_param("index", r)
                tc.set_tag("phase", "first")
                for step in range(300):
                    tc.log_metric("loss", r + step / 1000, step=step)
                tc.set_tag("phase", "last")
            offline_ids.add(run.info.run_id)

    first, second = (
        _sync_process(str(tmp_path), "--to", server_url),
        _sync_process(str(tmp_path), "--to", server_url),
    )
    results = [_finish(first), _finish(second)]

    assert [code for code, _ in results] == [0, 0], results
    runs = _runs(reader, experiment_name)
    assert len(runs) == 20, f"{len(runs)} runs on the server for 20 offline runs"
    tags = {r["info"]["run_id"]: reader.tags(r["info"]["run_id"]) for r in runs}  # type: ignore[index]
    assert {t[OFFLINE_RUN_TAG] for t in tags.values()} == offline_ids
    for run_id, run_tags in tags.items():
        index = int(reader.params(run_id)["index"])
        assert run_tags["phase"] == "last"
        assert [(v, s) for v, s, _ in reader.history(run_id, "loss")] == [
            (index + s / 1000, s) for s in range(300)
        ]
        assert reader.run(run_id)["info"]["status"] == "FINISHED"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("trial", [1, 2])
def test_sync_beside_the_client_replaying_its_outage_leaves_the_last_tag_value(
    trial: int, restartable_server: MlflowServer, tmp_path: Path
) -> None:
    reader = Reader(restartable_server.url)
    tc = TrackingClient(
        api_host=restartable_server.url, path_to_storage=str(tmp_path), retry_window=1.0, exit_timeout=300
    )
    tc.set_experiment("replay-and-sync")
    run = tc.start_run(run_name=f"trial-{trial}", log_system_metrics=False)
    tc.set_tag("phase", "before")
    tc.flush(timeout=60)
    step = 0

    def train(points: int, phase: str) -> None:
        nonlocal step
        for _ in range(points):
            tc.log_metric("loss", step, step=step)
            step += 1
        tc.set_tag("phase", phase)

    restartable_server.stop()
    for i in range(6):  # spread over more than the retry window: some retried, some spilled
        train(2000, f"outage-{i}")
        time.sleep(0.4)
    tc.flush(timeout=60)  # gives up on the stopped server: the events wait in the journal
    restartable_server.start()
    sync = _sync_process(str(tmp_path), "--to", restartable_server.url)
    try:
        # Training goes on while the client replays and the sync uploads: the tag keeps changing.
        for i in range(30):
            train(500, f"after-{i}")
            time.sleep(0.2)  # the pace of a training loop, not a synchronisation
        tc.close()
    finally:
        code, output = _finish(sync)

    assert code == 0, output
    run_id = run.info.run_id
    assert reader.tags(run_id)["phase"] == "after-29"
    assert _steps(reader, run_id, "loss") == list(range(step))
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


# -- the journal file is checked ---------------------------------------------------------------------


def _damaged_journal(storage: Path) -> Path:
    path = storage / "ml_runs" / "tracklane.db"
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(64 * 1024))  # never starts with SQLite's 16-byte header
    return path


def _foreign_database(storage: Path) -> Path:
    path = storage / "ml_runs" / "tracklane.db"
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO users (name) VALUES ('ada')")
    db.close()
    return path


def _tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()


def _assert_one_clear_message(result: subprocess.CompletedProcess[str], path: Path) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip()
    assert message.startswith("tracklane sync: ") and "\n\n" not in message, message
    assert str(path) in message, message
    assert re.search(r"\bmove\b|path_to_storage", message, re.I), message  # says what to do


def test_sync_of_a_damaged_journal_file_says_which_file_in_one_message(
    tmp_path: Path, server_url: str
) -> None:
    path = _damaged_journal(tmp_path)
    before = path.read_bytes()

    result = tracklane_cli("sync", str(tmp_path), "--to", server_url, timeout=120)

    _assert_one_clear_message(result, path)
    assert path.read_bytes() == before


def test_sync_of_another_programs_database_says_which_file_and_leaves_it_alone(
    tmp_path: Path, server_url: str
) -> None:
    path = _foreign_database(tmp_path)

    result = tracklane_cli("sync", str(tmp_path), "--to", server_url, timeout=120)

    _assert_one_clear_message(result, path)
    assert _tables(path) == {"users"}


@pytest.mark.unit
def test_offline_client_on_a_damaged_journal_file_raises_configuration_error_naming_it(
    tmp_path: Path,
) -> None:
    path = _damaged_journal(tmp_path)

    with (
        pytest.raises(ConfigurationError, match=re.escape(str(path))),
        TrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc,
    ):
        tc.set_experiment("never")


@pytest.mark.unit
def test_offline_client_on_another_programs_database_raises_and_leaves_it_alone(tmp_path: Path) -> None:
    path = _foreign_database(tmp_path)

    with (
        pytest.raises(ConfigurationError, match=re.escape(str(path))),
        TrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc,
    ):
        tc.set_experiment("never")

    assert _tables(path) == {"users"}


# -- the right server under another name -------------------------------------------------------------


def _spill_one_run(server: MlflowServer, storage: Path, points: int) -> str:
    """A run whose server goes away for good before the end: its tail stays in the journal."""
    tc = TrackingClient(api_host=server.url, path_to_storage=str(storage), retry_window=1.0, exit_timeout=30)
    tc.set_experiment("spilled")
    run = tc.start_run(run_name="spilled", log_system_metrics=False)
    tc.log_param("lr", 0.1)
    tc.flush(timeout=60)
    server.stop()
    for step in range(points):
        tc.log_metric("loss", step, step=step)
    tc.close()  # gives up after the retry window: the events and the run's end stay in the journal
    server.start()
    return run.info.run_id


@pytest.mark.timeout(600)
def test_sync_to_localhost_for_runs_spilled_from_127_0_0_1_names_the_server_to_use(
    restartable_server: MlflowServer, tmp_path: Path
) -> None:
    reader = Reader(restartable_server.url)
    run_id = _spill_one_run(restartable_server, tmp_path, points=3000)
    localhost = restartable_server.url.replace("127.0.0.1", "localhost")

    wrong = tracklane_cli("sync", str(tmp_path), "--to", localhost, timeout=120)

    assert wrong.returncode == 1, wrong
    assert "Traceback" not in wrong.stderr
    assert f"nothing to send to {localhost}" in wrong.stderr, wrong.stderr
    assert f"{restartable_server.url}: 1 run(s), 3000 event(s) pending" in wrong.stderr, wrong.stderr
    commands = re.findall(r"^\s+(tracklane sync .*)$", wrong.stderr, re.M)
    assert commands == [f"tracklane sync {tmp_path.resolve()} --to {restartable_server.url}"], wrong.stderr
    assert _steps(reader, run_id, "loss") == []  # nothing was sent meanwhile

    right = tracklane_cli(*commands[0].split()[1:])

    assert right.returncode == 0, right
    assert _steps(reader, run_id, "loss") == list(range(3000))
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


@pytest.mark.timeout(600)
def test_sync_without_a_server_sends_spilled_runs_home_and_says_offline_runs_need_to(
    restartable_server: MlflowServer, tmp_path: Path
) -> None:
    reader = Reader(restartable_server.url)
    run_id = _spill_one_run(restartable_server, tmp_path, points=2000)
    with TrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc:
        tc.set_experiment("logged-offline")
        with tc.start_run(log_system_metrics=False):
            tc.log_metric("acc", 0.5, step=0)

    result = tracklane_cli("sync", str(tmp_path), timeout=300)  # no --to, no $OIP_TRACKING_SERVER

    assert result.returncode == 0, result
    assert f"synced 1 run(s), 2000 event(s) to {restartable_server.url}" in result.stdout
    assert _steps(reader, run_id, "loss") == list(range(2000))
    assert reader.run(run_id)["info"]["status"] == "FINISHED"
    assert "offline" in result.stderr and "--to URL" in result.stderr, result.stderr
    assert reader.experiment("logged-offline") is None  # offline runs go only where the user says


def test_close_that_gives_up_at_once_during_an_outage_keeps_every_event_in_the_journal(
    fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """close(timeout=0) cancels the worker wherever it is: moving the hand to the journal, or
    holding a chunk it just took from the buffer. Every event must be in the journal afterwards."""
    fault_proxy.answer("runs/log-batch", 503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}')
    for trial in range(4):
        storage = tmp_path / f"trial{trial}"
        tc = TrackingClient(api_host=fault_proxy.url, path_to_storage=str(storage), retry_window=0.5)
        tc.set_experiment(f"cancelled-mid-placement-{trial}")
        run = tc.start_run(log_system_metrics=False)
        for step in range(10_000):
            tc.log_metric("loss", float(step), step=step)
        tc.flush(timeout=0.5)  # the outage is seen: the worker writes to the journal now
        # Another rank on this node holds the journal for a moment: the worker's writes wait, and
        # chunks it has taken from the buffer wait behind them when close() cancels it.
        other = sqlite3.connect(journal_file(storage), timeout=30, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        for step in range(10_000, 30_000):
            tc.log_metric("loss", float(step), step=step)
        time.sleep(0.2 + 0.1 * trial)
        releaser = threading.Timer(1.0, other.commit)
        releaser.start()

        assert tc.close(timeout=0) == 0
        releaser.join()
        other.close()

        journal = Journal(journal_file(storage), create=False)
        try:
            events, _ = journal.pending_summary(server_key(fault_proxy.url, None), [run.info.run_id])
        finally:
            journal.close()
        assert events == 30_000, f"trial {trial}: {events} of 30000 kept"
