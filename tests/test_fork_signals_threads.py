"""Process safety: forked workers, SIGTERM, Ctrl-C at exit, and many threads on one run."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tracklane import TrackingClient

from servers import FaultProxy, Reader, tracklane_cli


def _child_logs(tc: TrackingClient) -> None:
    for step in range(300):
        tc.log_metric("child", step, step=step)


def test_a_forked_child_sends_none_of_the_parents_events_and_can_log(
    fault_proxy: FaultProxy, experiment_name: str, reader: Reader
) -> None:
    # A long flush interval keeps the parent's events in its buffer when the child is forked.
    tc = TrackingClient(api_host=fault_proxy.url, flush_interval=30)
    tc.set_experiment(experiment_name)
    run = tc.start_run(log_system_metrics=False)
    for step in range(500):
        tc.log_metric("parent", step, step=step)

    worker = multiprocessing.get_context("fork").Process(target=_child_logs, args=(tc,))
    worker.start()
    worker.join(60)
    assert worker.exitcode == 0

    tc.end_run()
    tc.close()
    run_id = run.info.run_id
    assert fault_proxy.metrics_sent("parent") == 500  # sent once, by the parent only
    assert [p[1] for p in reader.history(run_id, "parent")] == list(range(500))
    assert [p[1] for p in reader.history(run_id, "child")] == list(range(300))  # flushed at worker exit
    assert reader.run(run_id)["info"]["status"] == "FINISHED"  # the child did not end the parent's run


def test_a_child_of_os_fork_logs_and_flushes_without_deadlock(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    with TrackingClient(api_host=server_url, flush_interval=30) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run(log_system_metrics=False) as run:
            tc.log_metric("before_fork", 1.0)
            pid = os.fork()
            if pid == 0:  # the child
                code = 1
                try:
                    tc.log_metric("in_child", 2.0)
                    code = 0 if tc.flush(timeout=30) else 2
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0

    assert reader.history(run.info.run_id, "in_child")[0][0] == 2.0
    assert len(reader.history(run.info.run_id, "before_fork")) == 1


SIGTERM_CHILD = """
import os, signal, sys, time
from tracklane import TrackingClient
if sys.argv[3] == "app-handler":
    def app_handler(signum, frame):
        os.write(1, b"app handler ran\\n")  # not print(): the signal may land inside a print
        sys.exit(3)
    signal.signal(signal.SIGTERM, app_handler)
tc = TrackingClient(api_host=sys.argv[1], flush_interval=30)
tc.set_experiment(sys.argv[2])
run = tc.start_run(log_system_metrics=False)
for step in range(3000):
    tc.log_metric("loss", step, step=step)
print(run.info.run_id, flush=True)
time.sleep(60)
"""


def _terminate_child(server_url: str, experiment_name: str, mode: str) -> tuple[str, subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SIGTERM_CHILD), server_url, experiment_name, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    return run_id, proc


def test_sigterm_flushes_ends_the_run_killed_and_dies_of_sigterm(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    run_id, proc = _terminate_child(server_url, experiment_name, "default")

    assert proc.returncode == -signal.SIGTERM, proc.stderr.read() if proc.stderr else ""
    assert len(reader.history(run_id, "loss")) == 3000
    assert reader.run(run_id)["info"]["status"] == "KILLED"


def test_sigterm_calls_the_applications_own_handler_after_flushing(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    run_id, proc = _terminate_child(server_url, experiment_name, "app-handler")

    assert proc.returncode == 3, proc.stderr.read() if proc.stderr else ""
    assert proc.stdout is not None and "app handler ran" in proc.stdout.read()
    assert len(reader.history(run_id, "loss")) == 3000
    assert reader.run(run_id)["info"]["status"] == "KILLED"


def test_ctrl_c_during_the_exit_flush_exits_at_once_keeping_what_is_left(
    fault_proxy: FaultProxy, experiment_name: str, tmp_path: Path, reader: Reader
) -> None:
    script = f"""
        from tracklane import TrackingClient
        tc = TrackingClient(api_host={fault_proxy.url!r}, exit_timeout=120, path_to_storage={str(tmp_path)!r})
        tc.set_experiment({experiment_name!r})
        run = tc.start_run(log_system_metrics=False)
        for step in range(100):
            tc.log_metric("stuck", step, step=step)
        print(run.info.run_id, flush=True)
    """
    fault_proxy.script("runs/log-batch", *[(503, {"Retry-After": "1"}, b"")] * 1000)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    time.sleep(1.0)  # the process is now inside its exit flush, which would wait up to 120 s
    interrupted = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    assert time.monotonic() - interrupted < 30
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "interrupted by Ctrl-C; 0 event(s) not kept" in stderr
    assert "tracklane sync" in stderr  # what was left is in the journal, with the command

    fault_proxy.heal()
    synced = tracklane_cli("sync", str(tmp_path), "--to", fault_proxy.url)
    assert synced.returncode == 0, synced.stderr
    assert [p[1] for p in reader.history(run_id, "stuck")] == list(range(100))


@pytest.mark.slow
def test_eight_threads_logging_fifty_thousand_events_each_lose_and_duplicate_nothing(
    fault_proxy: FaultProxy, experiment_name: str, reader: Reader
) -> None:
    with TrackingClient(api_host=fault_proxy.url) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run(log_system_metrics=False) as run:
            start = threading.Barrier(8)

            def worker(i: int) -> None:
                start.wait(10)
                for step in range(50_000):
                    tc.log_metric(f"thread_{i}", step, step=step)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert tc.flush(timeout=300)
            stats = tc.stats()

    assert stats["enqueued"] == stats["delivered"] == 400_000
    for i in range(8):
        assert fault_proxy.metrics_sent(f"thread_{i}") == 50_000  # none sent twice
        assert [p[1] for p in reader.history(run.info.run_id, f"thread_{i}")] == list(range(50_000))
