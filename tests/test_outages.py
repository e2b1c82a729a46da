"""Fault suite: a 30 s outage in the middle of a run, and exits while the server is gone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from tracklane import TrackingClient

from servers import MlflowServer, Reader, tracklane_cli


def test_a_server_stopped_for_thirty_seconds_mid_run_loses_and_duplicates_nothing(
    restartable_server: MlflowServer, tmp_path: Path
) -> None:
    reader = Reader(restartable_server.url)
    tc = TrackingClient(
        api_host=restartable_server.url, path_to_storage=str(tmp_path), retry_window=2.0, exit_timeout=120
    )
    tc.set_experiment("thirty-second-outage")
    run = tc.start_run(log_system_metrics=False)
    logged = 0
    done = threading.Event()

    def training_loop() -> None:  # keeps logging through the whole outage, as a real job would
        nonlocal logged
        while not done.is_set():
            for _ in range(100):
                tc.log_metric("loss", logged, step=logged)
                logged += 1
            time.sleep(0.05)  # ~2,000 events/s: a busy training loop

    loop = threading.Thread(target=training_loop)
    loop.start()
    time.sleep(1.0)
    restartable_server.stop()
    time.sleep(30.0)  # the outage itself is what is being tested
    restartable_server.start()
    time.sleep(1.0)
    done.set()
    loop.join(30)
    stats_before_close = tc.stats()
    tc.close()

    stored = [s for _, s, _ in reader.history(run.info.run_id, "loss")]
    assert stored == list(range(logged))  # every step once: none lost, none stored twice
    assert stats_before_close["dropped"] == 0 and stats_before_close["spilled"] > 0
    assert reader.run(run.info.run_id)["info"]["status"] == "FINISHED"


EXIT_CHILD = """
import sys, time
from tracklane import TrackingClient
url, storage = sys.argv[1], sys.argv[2]
tc = TrackingClient(api_host=url, path_to_storage=storage, retry_window=60, exit_timeout=3)
tc.set_experiment("exit-while-down")
run = tc.start_run(run_name="exits", log_system_metrics=False)
print(run.info.run_id, flush=True)
sys.stdin.readline()  # the parent stops the server, then says go
for step in range(2000):
    tc.log_metric("loss", step, step=step)
print(time.monotonic(), flush=True)  # the script's last line: exit begins here
"""


def test_exit_with_the_server_gone_is_bounded_by_the_exit_wait_and_keeps_everything(
    restartable_server: MlflowServer, tmp_path: Path
) -> None:
    reader = Reader(restartable_server.url)
    storage = tmp_path / "storage"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(EXIT_CHILD), restartable_server.url, str(storage)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    run_id = child.stdout.readline().strip()
    restartable_server.stop()
    child.stdin.write("go\n")
    child.stdin.flush()
    exit_began = float(child.stdout.readline())
    child.wait(60)
    exited = time.monotonic()

    # exit_timeout=3 s, although the retry window is 60 s: exit must not wait for the server.
    assert exited - exit_began < 3 + 5  # 5 s of slack for interpreter teardown on a loaded machine
    stderr = child.stderr.read() if child.stderr else ""
    assert "tracklane sync" in stderr and "2000 event(s)" in stderr

    restartable_server.start()
    synced = tracklane_cli("sync", str(storage), "--to", restartable_server.url)
    assert synced.returncode == 0, synced.stderr
    assert [s for _, s, _ in reader.history(run_id, "loss")] == list(range(2000))
    assert reader.run(run_id)["info"]["status"] == "FINISHED"
