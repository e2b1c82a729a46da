"""`tracklane ui`: offline runs shown in MLflow's own server, started next to the journal, synced
into, and stopped with the command (issue 11, item 7)."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tracklane import TrackingClient

from servers import Reader, free_port, tracklane_cli

#: Longest `tracklane ui` may take to start MLflow's server and sync (a first start creates the
#: database; the machine is shared).
READY_TIMEOUT = 150.0
#: Longest it may take to stop after Ctrl-C or SIGTERM (stop_process gives the server 15 s + 5 s).
STOP_TIMEOUT = 40.0
OPEN_LINE = re.compile(r"^tracklane: (\d+) run\(s\) synced; open (http://\S+)$")


def _log_offline(storage: Path, experiment: str, run_name: str, loss: list[float]) -> None:
    with TrackingClient(offline_mode=True, path_to_storage=str(storage)) as tc:
        tc.set_experiment(experiment)
        with tc.start_run(run_name=run_name):
            tc.log_params({"lr": 0.01, "optimizer": "adam"})
            for step, value in enumerate(loss):
                tc.log_metric("loss", value, step=step)


class UiCommand:
    """`tracklane ui STORAGE --port PORT` in a process of its own, as a user runs it."""

    def __init__(self, storage: Path, port: int) -> None:
        self.stderr = storage / f"ui-{port}-{time.monotonic_ns()}.err"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tracklane._cli", "ui", str(storage), "--port", str(port)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.server_pid: int | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_until_open(self) -> tuple[int, str]:
        """(runs synced, URL) from the line that says where to look; fail with the output if the
        command ends or stays silent."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"no 'open URL' line within {READY_TIMEOUT:g} s: {self.output()}")
            if line is None:
                pytest.fail(f"tracklane ui ended (status {self.proc.wait(5)}): {self.output()}")
            self.seen.append(line)
            if found := re.search(r"MLflow server running \(pid (\d+)\)", line):
                self.server_pid = int(found.group(1))
            if found := OPEN_LINE.match(line):
                return int(found.group(1)), found.group(2)

    def stop(self, signum: int) -> int:
        """Send ``signum`` as Ctrl-C or a process manager would; the exit status."""
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"tracklane ui still running {STOP_TIMEOUT:g} s after {signum!r}: {self.output()}")

    def kill(self) -> None:
        """Leave nothing behind, whatever the test got to."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.server_pid is not None and _live_group(self.server_pid):
            os.killpg(self.server_pid, signal.SIGKILL)

    def output(self) -> str:
        return "\n".join(self.seen) + "\n--- stderr:\n" + self.stderr.read_text(errors="replace")


def _live_group(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that still run (zombies are gone for our purpose)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def _assert_server_gone(pgid: int | None) -> None:
    # `mlflow server` runs its web server as a child, in the group the command started it in.
    assert pgid is not None, "tracklane ui did not say which process the server is"
    deadline = time.monotonic() + 10
    while _live_group(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _live_group(pgid), f"processes of the MLflow server left running: {_live_group(pgid)}"


def _server_run(reader: Reader, experiment: str, run_name: str) -> str:
    found = reader.experiment(experiment)
    assert found is not None, f"experiment {experiment!r} is not on the UI's server"
    runs = [r for r in reader.runs(found["experiment_id"]) if r["info"]["run_name"] == run_name]
    assert len(runs) == 1, f"expected one run {run_name!r}, found {len(runs)}"
    return str(runs[0]["info"]["run_id"])


@pytest.mark.slow
@pytest.mark.server
def test_ui_shows_offline_runs_in_mlflow_and_ctrl_c_stops_its_server(
    tmp_path: Path, experiment_name: str
) -> None:
    _log_offline(tmp_path, experiment_name, "offline-1", [1.0, 0.5, 0.25])
    ui = UiCommand(tmp_path, free_port())
    try:
        runs, url = ui.wait_until_open()

        assert runs == 1, ui.output()
        reader = Reader(url)
        run_id = _server_run(reader, experiment_name, "offline-1")
        assert reader.params(run_id) == {"lr": "0.01", "optimizer": "adam"}
        assert [(v, s) for v, s, _ in reader.history(run_id, "loss")] == [(1.0, 0), (0.5, 1), (0.25, 2)]
        assert reader.run(run_id)["info"]["status"] == "FINISHED"
        # The UI's store lives next to the journal.
        assert (tmp_path / "mlflow-ui" / "mlflow.db").is_file()

        assert ui.stop(signal.SIGINT) == 0, ui.output()
        _assert_server_gone(ui.server_pid)
    finally:
        ui.kill()


@pytest.mark.slow
@pytest.mark.server
def test_ui_run_again_syncs_only_what_was_logged_since_and_sigterm_stops_it(
    tmp_path: Path, experiment_name: str
) -> None:
    _log_offline(tmp_path, experiment_name, "first", [3.0, 2.0])
    port = free_port()
    first = UiCommand(tmp_path, port)
    try:
        assert first.wait_until_open()[0] == 1, first.output()
        assert first.stop(signal.SIGTERM) == 0, first.output()
        _assert_server_gone(first.server_pid)
    finally:
        first.kill()
    _log_offline(tmp_path, experiment_name, "second", [9.0])

    again = UiCommand(tmp_path, port)
    try:
        runs, url = again.wait_until_open()

        assert runs == 1, again.output()  # the second run only; the first is there already
        reader = Reader(url)
        first_id = _server_run(reader, experiment_name, "first")
        second_id = _server_run(reader, experiment_name, "second")
        assert [v for v, _, _ in reader.history(first_id, "loss")] == [3.0, 2.0]
        assert [v for v, _, _ in reader.history(second_id, "loss")] == [9.0]
        assert again.stop(signal.SIGTERM) == 0, again.output()
        _assert_server_gone(again.server_pid)
    finally:
        again.kill()


KILLED_OFFLINE = """
import os, signal, sys
from tracklane import TrackingClient

tc = TrackingClient(offline_mode=True, path_to_storage=sys.argv[1])
tc.set_experiment(sys.argv[2])
tc.start_run(run_name="killed", log_system_metrics=False)
for step in range(5_000):
    tc.log_metric("loss", step * 0.5, step=step)
os.kill(os.getpid(), signal.SIGKILL)  # every call above returned; most events are still in memory
"""


@pytest.mark.slow
@pytest.mark.server
def test_ui_shows_what_a_killed_offline_process_had_logged(tmp_path: Path, experiment_name: str) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_OFFLINE, str(tmp_path), experiment_name],
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ui = UiCommand(tmp_path, free_port())
    try:
        runs, url = ui.wait_until_open()

        assert runs == 1, ui.output()
        reader = Reader(url)
        run_id = _server_run(reader, experiment_name, "killed")
        assert [s for _, s, _ in reader.history(run_id, "loss")] == list(range(5_000))
        assert reader.run(run_id)["info"]["status"] == "RUNNING"  # nobody ended it
        assert ui.stop(signal.SIGINT) == 0, ui.output()
    finally:
        ui.kill()


@pytest.mark.unit
def test_ui_without_mlflow_says_pip_install_mlflow_and_exits_2(tmp_path: Path) -> None:
    # As if MLflow were not installed: the import system is told the module does not exist.
    code = (
        "import sys; sys.modules['mlflow'] = None; "
        "from tracklane._cli import main; sys.exit(main(['ui', sys.argv[1]]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 2, result.stdout + result.stderr
    assert "tracklane ui needs MLflow's server: pip install mlflow" in result.stderr
    assert not (tmp_path / "mlflow-ui").exists()


@pytest.mark.unit
def test_ui_on_a_taken_port_says_so_and_suggests_another(tmp_path: Path, experiment_name: str) -> None:
    _log_offline(tmp_path, experiment_name, "offline", [1.0])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = tracklane_cli("ui", str(tmp_path), "--port", str(port), timeout=60)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"port {port} on 127.0.0.1 is taken" in result.stderr
    assert "--port" in result.stderr


@pytest.mark.unit
def test_ui_without_a_journal_names_the_path_and_starts_nothing(tmp_path: Path) -> None:
    result = tracklane_cli("ui", str(tmp_path / "nowhere"), "--port", str(free_port()), timeout=60)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "No tracklane journal at" in result.stderr and "nowhere" in result.stderr
    assert "starting" not in result.stdout


@pytest.mark.unit
def test_ui_is_listed_in_tracklane_help() -> None:
    result = tracklane_cli("--help", timeout=60)

    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+ui\s+show offline runs in MLflow's web UI", result.stdout, re.M), result.stdout
