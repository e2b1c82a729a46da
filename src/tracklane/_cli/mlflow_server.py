"""``mlflow server`` on 127.0.0.1, started and stopped: what ``tracklane ui`` and ``tracklane bench`` run.

Small on purpose: a free port, a bounded wait for ``/health``, and a stop that ends the server's
whole process group. The tests start their servers with it too (``tests/servers.py``), so the
server they check against is started exactly as a user's is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

#: For every MLflow process we start (servers, peer benchmarks): no job-runner processes, and no
#: usage reports to a host beyond this machine.
QUIET_MLFLOW = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path | None = None) -> None:
    """Poll ``url`` until it answers with success; raise if ``proc`` exits or ``timeout`` passes.

    ``urlopen`` raises on an error status (``HTTPError``), so a reply that opens is the answer.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = tail(log) if log is not None else ""
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before answering. {said}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a server started with ``start_new_session=True``: SIGTERM its group, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def tail(path: Path, chars: int = 3000) -> str:
    """The last ``chars`` characters of a log, or nothing when it cannot be read."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with ``workers`` processes, storing into ``backend_store_uri``
    (default: a fresh SQLite database in ``workdir``).

    ``start`` may be called again after ``stop``: the same port and database, as after an outage.
    """

    def __init__(self, workdir: Path, backend_store_uri: str | None = None, workers: int = 1) -> None:
        self.workdir = workdir
        self.backend_store_uri = backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "mlflow-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> MlflowServer:
        """Start the server and wait until ``/health`` answers; raise with its log if it does not."""
        exe = shutil.which("mlflow")
        if exe is None and importlib.util.find_spec("mlflow") is None:
            raise SystemExit(
                "tracklane bench starts an MLflow server, and mlflow is not installed: "
                "`pip install 'tracklane[bench]'`, or pass --api-host of a running server."
            )
        cmd = [exe] if exe else [sys.executable, "-m", "mlflow"]
        cmd += [
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            # Artifacts through the server's proxy (mlflow-artifacts:/), as clients upload them.
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.workdir / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        env = {**os.environ, **QUIET_MLFLOW}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        try:
            wait_for_http(f"{self.url}/health", self.proc, timeout, self.log)
        except RuntimeError as exc:
            exited = self.proc.poll() is not None  # then the message already ends with the log
            self.stop()
            if exited:
                raise
            raise RuntimeError(f"{exc}\n--- {self.log}:\n{tail(self.log)}") from exc
        except BaseException:
            self.stop()
            raise
        self._warm_up()
        return self

    def _warm_up(self) -> None:
        """One ``runs/search`` per worker before anyone else asks. MLflow 3.17's handler imports
        ``mlflow.server.auth`` lazily on the first search; two first searches at once can see it
        half-imported and one gets an HTTP 500 (``AttributeError: ... 'auth_config'``)."""
        body = b'{"experiment_ids": ["0"], "max_results": 1}'
        for _ in range(2 * self.workers):
            req = urllib.request.Request(
                f"{self.url}/api/2.0/mlflow/runs/search",
                data=body,
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            with contextlib.suppress(OSError), urllib.request.urlopen(req, timeout=30):
                pass

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
