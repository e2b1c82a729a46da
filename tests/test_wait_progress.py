"""A wait the user can see: end_run on a slow server says what it waits for, how fast it goes,
how long is left at the recent rate, and how to leave; the lines reach stderr with no logging set up.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tracklane._runtime.waiting import RecentRate

from servers import FaultProxy, Reader, tracklane_cli

pytestmark = pytest.mark.server

SLOW_END = """
import sys
from tracklane import TrackingClient
url, storage, experiment = sys.argv[1:4]
tc = TrackingClient(api_host=url, path_to_storage=storage)
tc.set_experiment(experiment)
run = tc.start_run(run_name="slow-end", log_system_metrics=False)
print(run.info.run_id, flush=True)
for step in range(100_000):
    tc.log_metric("loss", float(step), step=step)
tc.end_run()
print("ended", flush=True)
"""

LINE = re.compile(
    r"^tracklane: end_run waiting (\d+) s for (\S+): ([\d,]+) event\(s\) left, ([\d,]+) events/s over "
    r"the last (\d+) s, about (\d+) (s|min) to go; Ctrl-C leaves the rest in (\S+) for: (tracklane sync .+)$"
)


@pytest.mark.slow
def test_end_run_on_a_slow_server_shows_progress_with_rate_eta_and_the_way_out(
    fault_proxy: FaultProxy, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    storage = str(tmp_path / "storage")
    # Each batch of 1,000 held 0.15 s, two in flight: 100,000 points take well over 6 s to end.
    fault_proxy.delay("runs/log-batch", 0.15)

    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SLOW_END), fault_proxy.url, storage, experiment_name],
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a speed target
    )

    assert proc.returncode == 0, proc.stderr
    lines = [m for m in map(LINE.match, proc.stderr.splitlines()) if m]
    assert len(lines) >= 2, proc.stderr  # after ~2 s, then every few seconds
    for m in lines:
        assert m[2] == fault_proxy.url
        assert int(m[4].replace(",", "")) > 0  # the server is taking events: a rate, and a time left
        assert m[9] == f"tracklane sync {storage} --to {fault_proxy.url}"
    waited = [int(m[1]) for m in lines]
    left = [int(m[3].replace(",", "")) for m in lines]
    assert waited == sorted(waited) and waited[0] >= 2
    assert left == sorted(left, reverse=True) and left[0] <= 100_000
    run_id = proc.stdout.split()[0]
    assert [s for _, s, _ in reader.history(run_id, "loss")] == list(range(100_000))
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


@pytest.mark.slow
def test_ctrl_c_after_a_progress_line_keeps_the_rest_and_the_runs_end_for_tracklane_sync(
    fault_proxy: FaultProxy, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    storage = str(tmp_path / "storage")
    fault_proxy.delay("runs/log-batch", 0.15)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SLOW_END), fault_proxy.url, storage, experiment_name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    guard = threading.Timer(300, child.kill)  # a hang guard, not a speed target
    guard.start()
    try:
        assert child.stdout is not None and child.stderr is not None
        run_id = child.stdout.readline().strip()
        seen = []
        for line in child.stderr:
            seen.append(line)
            if LINE.match(line.rstrip("\n")):
                child.send_signal(signal.SIGINT)  # what the line offers
                break
        rest = child.stderr.read()
        child.wait(60)
    finally:
        guard.cancel()

    assert child.returncode != 0 and "KeyboardInterrupt" in rest, "".join(seen) + rest
    assert "ended" not in (child.stdout.read() or "")  # end_run did not return normally
    assert f"tracklane sync {storage} --to {fault_proxy.url}" in rest, rest
    fault_proxy.heal()
    synced = tracklane_cli("sync", storage, "--to", fault_proxy.url)
    assert synced.returncode == 0, synced.stderr
    assert [s for _, s, _ in reader.history(run_id, "loss")] == list(range(100_000))
    assert reader.run(run_id)["info"]["status"] == "FINISHED"  # the end end_run was asked for


def test_recent_rate_follows_the_last_window_not_the_average_since_the_start() -> None:
    rate = RecentRate(window=10.0)
    total = 0
    for second in range(60):  # a minute at 100 events/s, then the server speeds up to 1,000
        total += 100 if second < 50 else 1000
        rate.add(float(second), total)

    assert rate.rate() == pytest.approx(1000, rel=0.15)  # the average since the start is ~250


def test_tracklane_lines_reach_stderr_once_whether_or_not_the_program_configured_logging(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.root, "handlers", [])  # a plain script: nothing configured
    log = logging.getLogger("tracklane.probe")

    log.info("tracklane: shown by the fallback")
    program = logging.StreamHandler(sys.stdout)
    monkeypatch.setattr(logging.root, "handlers", [program])  # the program sets logging up
    log.info("tracklane: shown once, by the program's handler")

    out, err = capsys.readouterr()
    assert err == "tracklane: shown by the fallback\n"
    assert out == "tracklane: shown once, by the program's handler\n"
    assert logging.root.level == logging.WARNING  # the library never configures the root logger
