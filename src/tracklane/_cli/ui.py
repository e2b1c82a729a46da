"""``tracklane ui [PATH]``: look at a journal's offline runs in MLflow's own web UI.

Starts ``mlflow server`` on 127.0.0.1 with a store of its own next to the journal
(``<PATH>/mlflow-ui/``: a SQLite database and the artifacts it serves), delivers the journal to it
exactly as ``tracklane sync PATH --to URL`` does, prints the URL and keeps the server in the
foreground until Ctrl-C or SIGTERM. The journal records what each destination has received, so
running it again sends only what was logged since.

The server runs in a session of its own: Ctrl-C reaches tracklane only, which then stops the
server's whole process group (``mlflow server`` starts its web server as a child), so nothing is
left listening on the port.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from .._exceptions import TrackingError
from .._settings import ServerConfig
from .._stores.journal import JOURNAL_DIR, Journal, journal_file, server_key
from .mlflow_server import QUIET_MLFLOW, stop_process, tail, wait_for_http
from .sync import _deliver, pending, recover_event_logs

#: The folder next to the journal that holds the UI server's own store.
UI_DIR = "mlflow-ui"
DEFAULT_PORT = 5000
#: Longest the server may take to answer ``/health``: a first start creates its database, and
#: ``import mlflow`` alone takes seconds on a busy machine.
START_TIMEOUT = 90.0
#: How long the sync keeps retrying the local server if it stops answering.
RETRY_WINDOW = 30.0
MISSING_MLFLOW = "tracklane ui needs MLflow's server: pip install mlflow"

HELP = "show offline runs in MLflow's web UI (starts a local mlflow server and syncs into it)"
DESCRIPTION = """\
Show the runs of a local journal in MLflow's web UI.

Starts MLflow's server (mlflow server) here with a store of its own next to the
journal (PATH/mlflow-ui: mlflow.db, artifacts, server.log), uploads what the
journal holds to it (as tracklane sync PATH --to URL does), prints the URL to
open, and serves until Ctrl-C. Run it again later: only what was logged since
is uploaded. Needs MLflow installed in this Python environment."""
EPILOG = """\
exit status: 0 stopped with Ctrl-C after a full upload; 1 the server could not
start, or not everything could be uploaded (the message says why); 2 MLflow is
not installed (pip install mlflow).

examples:
  tracklane ui                 (the journal under the current directory)
  tracklane ui ./runs --port 5001"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ui",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The same default as the client's path_to_storage and as `tracklane sync`.
    parser.add_argument(
        "path", nargs="?", default=".", help="path_to_storage you logged to (default .), or its ml_runs"
    )
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to serve on (default 127.0.0.1, this machine only; 0.0.0.0 for every one)",
    )
    parser.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    """Run ``tracklane ui``; the exit status: 0 stopped after a full upload, 1 failed, 2 no MLflow."""
    if not mlflow_installed():
        print(MISSING_MLFLOW, file=sys.stderr)
        return 2
    try:
        recover_event_logs(journal_file(args.path))
        journal = Journal(journal_file(args.path), create=False)
    except TrackingError as exc:
        _error(str(exc))
        return 1
    try:
        problem = port_problem(args.host, args.port)
        if problem is not None:
            _error(problem)
            return 1
        with _sigterm_as_interrupt():
            return _serve(journal, UiServer(storage_dir(journal.path) / UI_DIR, args.host, args.port))
    finally:
        journal.close()


def mlflow_installed() -> bool:
    """Whether ``python -m mlflow`` can run here (without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["mlflow"] is None or has no spec
        return False


def storage_dir(journal: Path) -> Path:
    """The directory the client logged to (path_to_storage) for a journal file."""
    journal = journal.resolve()
    return journal.parent.parent if journal.parent.name == JOURNAL_DIR else journal.parent


def port_problem(host: str, port: int) -> str | None:
    """Why ``mlflow server`` could not listen on ``host:port``, or None when it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the server will: a port whose old connections linger in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"port {port} on {host} is taken (another mlflow server or tracklane ui?); "
                    f"pick another with --port, e.g. tracklane ui --port {port + 1}"
                )
            return f"cannot serve on {host}:{port}: {exc.strerror or exc}"
    return None


class UiServer:
    """``mlflow server`` in the foreground's background: its own session, its own store, one worker."""

    def __init__(self, store: Path, host: str, port: int) -> None:
        self.store = store
        self.host = host
        self.port = port
        # Bound to every interface, it still answers on this machine's loopback.
        local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        self.url = f"http://[{local}]:{port}" if ":" in local else f"http://{local}:{port}"
        self.log = store / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        # `python -m mlflow`, not `mlflow`: the MLflow of this environment, whatever PATH says.
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.store / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.store / "artifacts"),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and wait until it answers; raise TrackingError, with the end of its
        log, when it stops or stays silent for ``timeout`` seconds."""
        self.store.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **QUIET_MLFLOW}  # no job runner processes, no usage reports
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        try:
            wait_for_http(f"{self.url}/health", self.proc, timeout)
        except RuntimeError:
            code = self.proc.poll()
            self.stop()
            what = (
                f"stopped (exit status {code}) before answering"
                if code is not None
                else f"did not answer within {timeout:g} s"
            )
            raise TrackingError(
                f"the MLflow server {what}. The end of its log, {self.log}:\n{tail(self.log).rstrip()}"
            ) from None

    def wait(self) -> int:
        """Serve until the server stops by itself (its exit status) or an interrupt arrives."""
        assert self.proc is not None
        return self.proc.wait()

    def stop(self) -> None:
        """Stop the server and every process it started; bounded (SIGTERM, then SIGKILL)."""
        stop_process(self.proc)
        self.proc = None


def _serve(journal: Journal, server: UiServer) -> int:
    code = 0
    try:
        print(f"tracklane ui: starting MLflow's server on {server.url} (log: {server.log})", flush=True)
        server.start()
        assert server.proc is not None
        print(f"tracklane ui: MLflow server running (pid {server.proc.pid})", flush=True)
        code = _sync(journal, server.url)
        print("tracklane ui: press Ctrl-C to stop the server", flush=True)
        status = server.wait()
        _error(
            f"the MLflow server stopped by itself (exit status {status}). The end of its log, "
            f"{server.log}:\n{tail(server.log).rstrip()}"
        )
        return 1
    except KeyboardInterrupt:
        print("\ntracklane ui: stopping the MLflow server", file=sys.stderr, flush=True)
        return 1 if code == 1 else 0
    except TrackingError as exc:
        _error(str(exc))
        return 1
    finally:
        with _signals_held():  # a second Ctrl-C must not leave the server running
            server.stop()


def _sync(journal: Journal, url: str) -> int:
    """Deliver the journal to the UI's server as ``tracklane sync PATH --to URL`` does; say where
    to look. Returns sync's exit status, mapped to this command's (a failure is 1)."""
    # No API key: whatever $OIP_WORKLOAD_ACCESS_KEY holds is not for this local server.
    server = ServerConfig(api_host=url)
    target = server_key(server.api_host, None)
    runs = len(pending(journal, target).runs)
    try:
        code = _deliver(
            journal, server, None, target, argparse.Namespace(retry_window=RETRY_WINDOW), sys.stdout
        )
    except TrackingError as exc:  # e.g. an experiment deleted in the UI: restore it there, run again
        _error(str(exc))
        code = 1
    if code == 0:
        print(f"tracklane: {runs} run(s) synced; open {url}", flush=True)
        return 0
    what = "some rows were refused (listed above)" if code == 2 else "the upload did not finish"
    print(f"tracklane: {what}; open {url} to see what arrived, then run tracklane ui again", flush=True)
    return 1


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM stop the command as Ctrl-C does, so the server is stopped on the way out."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM for a bounded cleanup (``stop_process`` gives up after 20 s)."""
    try:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number; it must be a port, 1-65535"
        ) from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; it must be a port, 1-65535")
    return value


def _error(message: str) -> None:
    print(f"tracklane ui: {message}", file=sys.stderr, flush=True)
