"""``tracklane bench``: how fast tracklane logs to a server, and beside MLflow's own client.

Two measurements. The capacity plan (the default) is self-contained, so it runs from an installed
wheel against the user's own server (``--api-host``): N processes log into one run, side by side
with the raw ``runs/log-batch`` ceiling of N senders that bypass tracklane, and each rank's cost
per call. The figures (``--figures``, ``--quick``) are measured by the scripts in a source
checkout's ``benchmarks/`` directory, each in a process of its own so that no client's threads or
imports colour another's numbers, with a markdown table and a JSON file holding every figure, the
versions and the machine.

This module also holds the servers both start and the tests share: ``mlflow server`` on SQLite,
PostgreSQL and ``mlflow server`` on it with several workers (``--postgres``), and a sink.

Only the console script imports this module; ``import tracklane`` never does.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import glob
import http.client
import importlib.util
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._exceptions import ConfigurationError, TrackingError
from .._settings import EngineConfig, ServerConfig, resolve_server
from .args import positive_float, positive_int

#: Figure keys in the JSON file, in table order, with the script that measures each.
FIGURES: dict[str, str] = {
    "1_caller_cost": "bench_caller_cost.py",
    "2_end_to_end": "bench_end_to_end.py",
    "3_mlflow_client": "bench_mlflow_client.py",
    "4_drain": "bench_drain.py",
    "5_training_loop": "bench_training_loop.py",
    "6_memory": "bench_memory.py",
    "7_import": "bench_import.py",
    "8_offline": "bench_offline.py",
    "9_artifacts": "bench_artifacts.py",
    "10_lightning_logger": "bench_lightning_logger.py",
}
SCALES = ("smoke", "quick", "full")
#: The longest one script may run before it is stopped, by scale (seconds).
SCRIPT_TIMEOUT = {"smoke": 60.0, "quick": 60.0, "full": 300.0}


# -- servers -------------------------------------------------------------------------------------


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
    """Poll ``url`` until it answers 200; raise if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(log) if log is not None else ""
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before answering. {tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
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


def _tail(path: Path, chars: int = 3000) -> str:
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
            raise RuntimeError(f"{exc}\n--- {self.log}:\n{_tail(self.log)}") from exc
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


class SinkServer:
    """A server on 127.0.0.1 that accepts every MLflow request without storing anything.

    It runs in a process of its own so that it never competes with the client for the GIL.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> SinkServer:
        code = f"import tracklane._cli.bench as b; b.serve_sink({self.port})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_http(f"{self.url}/health", self.proc, timeout)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def serve_sink(port: int) -> None:
    """Serve the sink until SIGTERM: ``{}`` for log-batch, minimal objects for run lifecycle."""
    from aiohttp import web

    experiment = {"experiment_id": "1", "name": "sink", "lifecycle_stage": "active", "tags": []}
    run_info = {"run_id": "0" * 32, "experiment_id": "1", "run_name": "sink", "status": "RUNNING"}
    accepted = 0

    async def log_batch(request: web.Request) -> web.Response:
        nonlocal accepted
        await request.read()  # accept the whole body, as a server would, then forget it
        accepted += 1
        return web.json_response({})

    async def experiment_reply(request: web.Request) -> web.Response:
        return web.json_response({"experiment": experiment, "experiment_id": "1"})

    async def run_reply(request: web.Request) -> web.Response:
        return web.json_response({"run": {"info": run_info, "data": {}}})

    async def empty(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text=f"OK {accepted}")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    base = "/api/2.0/mlflow"
    app.router.add_post(f"{base}/runs/log-batch", log_batch)
    app.router.add_get(f"{base}/experiments/get-by-name", experiment_reply)
    app.router.add_get(f"{base}/experiments/get", experiment_reply)
    app.router.add_post(f"{base}/experiments/create", experiment_reply)
    app.router.add_post(f"{base}/runs/create", run_reply)
    app.router.add_get(f"{base}/runs/get", run_reply)
    app.router.add_post(f"{base}/runs/update", empty)
    app.router.add_post(f"{base}/runs/search", empty)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- PostgreSQL ----------------------------------------------------------------------------------

#: Settings for a throwaway database: no durability, the disk and the shared CPU left to others.
FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "64MB",
    "max_connections": "200",  # MLflow's pool: up to 15 connections per worker process
}


class PostgresNotFound(RuntimeError):
    """PostgreSQL's server binaries (``initdb``, ``pg_ctl``) are not installed on this machine."""


def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``: Debian's newest version, else ``PATH``."""
    found: list[tuple[int, Path]] = []
    for pg_ctl in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"):
        bindir = Path(pg_ctl).parent
        version = re.match(r"\d+", bindir.parent.name)
        if version and (bindir / "initdb").exists():
            found.append((int(version.group()), bindir))
    if found:
        return max(found)[1]
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    return None


class PostgresServer:
    """PostgreSQL on 127.0.0.1 at a free port, trust authentication, one database, in a temp dir.

    Debian's ``postgresql`` binaries (``initdb``, ``pg_ctl``) on a data directory of its own in a
    fresh temporary directory; as root they run as the ``postgres`` user, who owns that directory.
    ``url`` is the SQLAlchemy URI of the database (``postgresql://USER@127.0.0.1:PORT/DB``, which
    SQLAlchemy 2 opens with psycopg 3). ``durable=False`` turns fsync off: a test database that a
    crash may lose. ``stop`` shuts the server down and removes the directory; a process that exits
    without calling it stops the server at exit.
    """

    def __init__(self, user: str = "tracklane", database: str = "tracklane", durable: bool = False) -> None:
        self.user = user
        self.database = database
        self.durable = durable
        self.port = free_port()
        self.url = f"postgresql://{user}@127.0.0.1:{self.port}/{database}"
        self.bindir: Path | None = None
        self.workdir: Path | None = None
        self._running = False

    @property
    def log(self) -> Path:
        """The server's log (``pg_ctl -l``)."""
        assert self.workdir is not None, "start() first"
        return self.workdir / "postgres.log"

    @property
    def datadir(self) -> Path:
        assert self.workdir is not None, "start() first"
        return self.workdir / "data"

    def _as_owner(self, argv: Sequence[str]) -> list[str]:
        # PostgreSQL refuses to run as root: root hands its commands to the package's system user.
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)

    def _run(self, argv: Sequence[str], timeout: float) -> None:
        cmd = self._as_owner(argv)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.workdir)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{cmd!r} did not finish within {timeout:.0f}s. {_tail(self.log)}") from exc
        if done.returncode != 0:
            raise RuntimeError(
                f"{cmd!r} exited with {done.returncode}: {done.stdout[-1500:]}{done.stderr[-1500:]}"
                f"\n--- {self.log}:\n{_tail(self.log)}"
            )

    def start(self, timeout: float = 120.0) -> PostgresServer:
        """initdb, pg_ctl start (waits until it accepts connections), createdb.

        Raises ``PostgresNotFound`` when the binaries are missing, ``RuntimeError`` (with the
        server's log) when a step fails or outlasts ``timeout``.
        """
        self.bindir = find_postgres_bin()
        if self.bindir is None:
            raise PostgresNotFound(
                "PostgreSQL's initdb/pg_ctl were not found in /usr/lib/postgresql/*/bin or on PATH: "
                "install Debian's `postgresql` package (`apt-get install -y postgresql`)."
            )
        # A fresh directory in the system temp dir, which the postgres user can reach (a test's
        # or a user's own temp dir may be root's alone, mode 0700).
        self.workdir = Path(tempfile.mkdtemp(prefix="tracklane-pg-"))
        if os.geteuid() == 0:
            import pwd  # POSIX only, as is running PostgreSQL as its own user

            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                self.stop()
                raise RuntimeError("running as root needs the `postgres` user the package creates") from None
            os.chown(self.workdir, owner.pw_uid, owner.pw_gid)
        try:
            initdb = [str(self.bindir / "initdb"), "-D", str(self.datadir), "--username", self.user]
            self._run([*initdb, "--auth", "trust", "--encoding", "UTF8", "--no-locale"], timeout)
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(self.port),
                "unix_socket_directories": f"'{self.workdir}'",
                **({} if self.durable else FAST_SETTINGS),
            }
            with open(self.datadir / "postgresql.conf", "a") as conf:
                conf.write("\n# tracklane\n")
                conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
            self._running = True
            atexit.register(self.stop)
            pg_ctl = [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.log)]
            self._run([*pg_ctl, "-w", "-t", str(int(timeout)), "start"], timeout + 10)
            address = ["-h", "127.0.0.1", "-p", str(self.port), "-U", self.user]
            self._run([str(self.bindir / "createdb"), *address, self.database], 60)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Fast shutdown (bounded), then remove the directory. Safe to call twice."""
        atexit.unregister(self.stop)
        if self._running and self.bindir is not None:
            self._running = False
            pg_ctl = [str(self.bindir / "pg_ctl"), "-D", str(self.datadir)]
            try:
                subprocess.run(
                    self._as_owner([*pg_ctl, "-m", "fast", "-w", "-t", "30", "stop"]),
                    capture_output=True,
                    timeout=40,
                    cwd=self.workdir,
                )
            except subprocess.TimeoutExpired:
                self._kill_postmaster()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _kill_postmaster(self) -> None:
        # The first line of postmaster.pid is the postmaster's pid; SIGKILL ends its children too.
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)


class PgMlflowServer(MlflowServer):
    """``mlflow server`` on 127.0.0.1 storing into ``backend_store_uri`` with ``workers`` processes.

    Same ``url``/``log``/``stop`` as ``MlflowServer``. The first start on a fresh database runs
    MLflow's migrations, which take a few seconds.
    """

    def __init__(self, workdir: Path, backend_store_uri: str, workers: int = 2) -> None:
        super().__init__(workdir, backend_store_uri, workers)

    def start(self, timeout: float = 180.0) -> PgMlflowServer:
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is None:
            raise RuntimeError(
                "mlflow server opens postgresql:// with SQLAlchemy's psycopg driver, which is not "
                "installed here: `pip install 'psycopg[binary]'`."
            )
        super().start(timeout)
        return self


# -- targets -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One target of the issues (5; 11 for the MLflow faces, 12 for artifacts): ``value`` must be at
    most (or at least) ``limit``."""

    name: str
    figure: str
    key: str
    text: str
    at_most: bool
    limit: Callable[[Mapping[str, Mapping[str, float]]], float | None]


def _value(values: Mapping[str, Mapping[str, float]], figure: str, key: str) -> float | None:
    return values.get(figure, {}).get(key)


def _scaled(
    figure: str, key: str, factor: float
) -> Callable[[Mapping[str, Mapping[str, float]]], float | None]:
    def limit(values: Mapping[str, Mapping[str, float]]) -> float | None:
        found = _value(values, figure, key)
        return None if found is None else found * factor

    return limit


def _ceiling(values: Mapping[str, Mapping[str, float]]) -> float | None:
    found = [
        v
        for v in (
            _value(values, "2_end_to_end", "ceiling_1_in_flight_events_per_s"),
            _value(values, "2_end_to_end", "ceiling_2_in_flight_events_per_s"),
        )
        if v is not None
    ]
    return 0.9 * max(found) if found else None


def _fixed(limit: float) -> Callable[[Mapping[str, Mapping[str, float]]], float | None]:
    return lambda values: limit


TARGETS = (
    Target(
        "log_metric caller cost",
        "1_caller_cost",
        "tracklane_log_metric_us",
        "<= 3x the floor (nothing else running)",
        True,
        _scaled("1_caller_cost", "deque_floor_us", 3.0),
    ),
    Target(
        "tracklane.mlflow.log_metric caller cost",
        "1_caller_cost",
        "tracklane_mlflow_log_metric_us",
        "<= 3x the floor (nothing else running)",
        True,
        _scaled("1_caller_cost", "deque_floor_us", 3.0),
    ),
    Target(
        "MlflowClient.log_metric caller cost",
        "1_caller_cost",
        "tracklane_mlflow_client_log_metric_us",
        "<= 3x the floor (nothing else running)",
        True,
        _scaled("1_caller_cost", "deque_floor_us", 3.0),
    ),
    Target(
        "log_metrics (10 keys) caller cost",
        "1_caller_cost",
        "tracklane_log_metrics_10_us",
        "< 8 us",
        True,
        _fixed(8.0),
    ),
    Target(
        "end-to-end vs server ceiling",
        "2_end_to_end",
        "tracklane_events_per_s",
        ">= 90% of the raw ceiling",
        False,
        _ceiling,
    ),
    Target(
        "end-to-end vs MLflow async",
        "2_end_to_end",
        "tracklane_events_per_s",
        ">= 50x MLflow synchronous=False",
        False,
        # MLflow's one-metric-a-call path, as in the reference figure (78 events/s); the
        # ratio against its 10-key path is listed with the other ratios.
        _scaled("3_mlflow_client", "mlflow_async_log_metric_events_per_s", 50.0),
    ),
    Target(
        "drain capacity",
        "4_drain",
        "drain_events_per_s",
        ">= 1,000,000 events/s",
        False,
        _fixed(1_000_000.0),
    ),
    Target(
        "training-loop overhead",
        "5_training_loop",
        "tracklane_overhead_pct",
        "< 2%",
        True,
        _fixed(2.0),
    ),
    Target(
        "memory per buffered event",
        "6_memory",
        "tracklane_log_metric_bytes_per_event",
        "<= 150 bytes",
        True,
        _fixed(150.0),
    ),
    Target(
        "import time",
        "7_import",
        "import_tracklane_ms",
        "< 150 ms",
        True,
        _fixed(150.0),
    ),
    # The promise: the call does no network I/O, only a local copy of the file (a journal row
    # beside it), so it costs what copying the file costs, whatever the link to the server.
    Target(
        "log_artifact caller time (50 MB)",
        "9_artifacts",
        "tracklane_log_artifact_ms",
        "<= 2x a local copy of the file",
        True,
        _scaled("9_artifacts", "local_copy_ms", 2.0),
    ),
    Target(
        "artifact upload rate",
        "9_artifacts",
        "tracklane_upload_mb_per_s",
        ">= 80% of a raw PUT of the same file",
        False,
        _scaled("9_artifacts", "raw_put_mb_per_s", 0.8),
    ),
    # A training step with a logger costs the loop what the logger's call costs: tracklane's is an
    # enqueue, so its per-step overhead is a sliver of the stock logger's request per step.
    Target(
        "TracklaneLogger per-step overhead",
        "10_lightning_logger",
        "tracklane_logger_overhead_us",
        "<= 5% of MLFlowLogger's (http) per-step overhead",
        True,
        _scaled("10_lightning_logger", "mlflow_logger_overhead_us", 0.05),
    ),
    Target(
        "MLFlowLogger via tracklane+http per-step overhead",
        "10_lightning_logger",
        "mlflow_logger_tracklane_store_overhead_us",
        "<= 5% of MLFlowLogger's (http) per-step overhead",
        True,
        _scaled("10_lightning_logger", "mlflow_logger_overhead_us", 0.05),
    ),
)


def verdicts(figures: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each target whose inputs were measured: the value, the limit, met or missed by how much."""
    values = {name: _plain_values(figure) for name, figure in figures.items()}
    out = []
    for target in TARGETS:
        value = _value(values, target.figure, target.key)
        limit = target.limit(values)
        if value is None or limit is None:
            continue
        met = value <= limit if target.at_most else value >= limit
        bound = f"{_fmt(value)} vs {'at most' if target.at_most else 'at least'} {_fmt(limit)}"
        if met:
            note = f"met ({bound})"
        elif target.key.endswith("_pct"):  # a limit in percent: miss by points, not by a ratio
            note = f"MISSED by {abs(value - limit):.1f} points ({bound})"
        else:
            short = value / limit - 1 if target.at_most else 1 - value / limit
            note = f"MISSED by {short:.0%} ({bound})"
        out.append(
            {
                "target": target.name,
                "figure": target.figure,
                "key": target.key,
                "rule": target.text,
                "value": value,
                "limit": limit,
                "met": met,
                "note": note,
            }
        )
    return out


RATIOS = (
    (
        "tracklane log_metric (worker delivering meanwhile) / floor (nothing else running)",
        ("1_caller_cost", "tracklane_log_metric_us"),
        ("1_caller_cost", "deque_floor_us"),
    ),
    (
        "tracklane log_metric plus its worker's CPU per event / floor (nothing else running)",
        ("1_caller_cost", "tracklane_log_metric_with_worker_us"),
        ("1_caller_cost", "deque_floor_us"),
    ),
    (
        "tracklane.mlflow.log_metric (worker delivering meanwhile) / floor (nothing else running)",
        ("1_caller_cost", "tracklane_mlflow_log_metric_us"),
        ("1_caller_cost", "deque_floor_us"),
    ),
    (
        "tracklane MlflowClient.log_metric (worker delivering meanwhile) / floor (nothing else running)",
        ("1_caller_cost", "tracklane_mlflow_client_log_metric_us"),
        ("1_caller_cost", "deque_floor_us"),
    ),
    (
        "MLflow log_metric(synchronous=False) / tracklane.mlflow.log_metric, per call (same run)",
        ("1_caller_cost", "mlflow_async_log_metric_us"),
        ("1_caller_cost", "tracklane_mlflow_log_metric_us"),
    ),
    (
        "tracklane end to end / server ceiling (1 in flight)",
        ("2_end_to_end", "tracklane_events_per_s"),
        ("2_end_to_end", "ceiling_1_in_flight_events_per_s"),
    ),
    (
        "tracklane end to end / server ceiling (2 in flight)",
        ("2_end_to_end", "tracklane_events_per_s"),
        ("2_end_to_end", "ceiling_2_in_flight_events_per_s"),
    ),
    (
        "tracklane end to end / MLflow synchronous=False, log_metric",
        ("2_end_to_end", "tracklane_events_per_s"),
        ("3_mlflow_client", "mlflow_async_log_metric_events_per_s"),
    ),
    (
        "tracklane end to end / MLflow synchronous=False, log_metrics (10 keys, the same calls)",
        ("2_end_to_end", "tracklane_events_per_s"),
        ("3_mlflow_client", "mlflow_async_log_metrics_10_events_per_s"),
    ),
    (
        "tracklane end to end / MLflow synchronous",
        ("2_end_to_end", "tracklane_events_per_s"),
        ("3_mlflow_client", "mlflow_sync_events_per_s"),
    ),
    (
        "MLflow log_artifact / tracklane.mlflow.log_artifact, caller time (same file, same run)",
        ("9_artifacts", "mlflow_log_artifact_ms"),
        ("9_artifacts", "tracklane_log_artifact_ms"),
    ),
    (
        "tracklane.mlflow.log_artifact caller time / a local copy of the file",
        ("9_artifacts", "tracklane_log_artifact_ms"),
        ("9_artifacts", "local_copy_ms"),
    ),
    (
        "tracklane upload rate (to end_run returned) / raw PUT",
        ("9_artifacts", "tracklane_upload_mb_per_s"),
        ("9_artifacts", "raw_put_mb_per_s"),
    ),
    (
        "MLFlowLogger (http) / TracklaneLogger, wall time per step",
        ("10_lightning_logger", "mlflow_logger_step_ms"),
        ("10_lightning_logger", "tracklane_logger_step_ms"),
    ),
    (
        "MLFlowLogger (http) / MLFlowLogger (tracklane+http), wall time per step",
        ("10_lightning_logger", "mlflow_logger_step_ms"),
        ("10_lightning_logger", "mlflow_logger_tracklane_store_step_ms"),
    ),
)


def ratios(figures: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Ratios across figures that the targets and the reader compare."""
    values = {name: _plain_values(figure) for name, figure in figures.items()}
    out = {}
    for label, (fig_a, key_a), (fig_b, key_b) in RATIOS:
        a, b = _value(values, fig_a, key_a), _value(values, fig_b, key_b)
        if a is not None and b:
            out[label] = a / b
    return out


def _plain_values(figure: Mapping[str, Any]) -> dict[str, float]:
    measurements = figure.get("measurements", {})
    return {key: float(m["value"]) for key, m in measurements.items()}


def _fmt(value: float) -> str:
    if value >= 100_000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


# -- machine and versions ------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import psutil

    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("tracklane", "mlflow", "aiohttp", "orjson", "anyio", "psutil", "wandb", "trackio"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


# -- capacity plan -------------------------------------------------------------------------------

#: Metric points each process logs, and the process counts measured, unless told otherwise.
CAPACITY_EVENTS = 50_000
CAPACITY_PROCESSES = "1,2,4"
#: Metrics per pre-encoded request of the ceiling: the most ``runs/log-batch`` takes
#: (``MAX_METRICS_PER_BATCH``, mlflow/utils/validation.py), as many as tracklane's own batches hold.
CEILING_BATCH = 1000
#: Requests each ceiling process keeps in flight: as many as tracklane's worker keeps at most, so
#: that the ceiling asks the server as much at once as tracklane may.
CEILING_IN_FLIGHT = EngineConfig().max_in_flight
#: log_metric calls timed together: reading the clock around each call would cost more than the call.
CALL_GROUP = 100
#: tracklane's aggregate events/s, as a share of the ceiling's, that the capacity plan aims for.
CEILING_GOAL = 0.9
#: Longest a process may take to start, import tracklane and reach its run (seconds).
STARTUP_TIMEOUT = 120.0
DEFAULT_EXPERIMENT = "tracklane-bench-capacity"
#: Set for each process as a launcher (torchrun) sets them, or not at all: never the caller's own.
_JOB_ENV = ("OIP_WORKLOAD_ACCESS_KEY", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MLFLOW_RUN_ID")


def process_counts(text: str) -> list[int]:
    """``--processes``: comma-separated whole numbers greater than zero (``1,2,4``), each once."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} names no process count; give e.g. 1,2,4")
    return list(dict.fromkeys(positive_int(part) for part in parts))


def rest_target(server: ServerConfig, workspace_id: str | None) -> tuple[str, dict[str, str]]:
    """The REST root and the headers of a plain MLflow REST call to ``server``, without tracklane.

    The same headers tracklane's REST store sends: the ceiling must ask what tracklane asks.
    """
    headers = {"Content-Type": "application/json"}
    if server.api_key is not None:
        headers["Authorization"] = f"Bearer {server.api_key.reveal()}"
    if server.workload_id:
        headers["OIP-Workload-Id"] = server.workload_id
    return server.rest_base(workspace_id), headers


@dataclass
class Phase:
    """One measurement: ``processes`` processes of one kind (tracklane or ceiling) into one run."""

    kind: str
    processes: int
    run_id: str | None = None
    events_per_s: float | None = None
    ranks: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


class _Rank:
    """One process of a measurement, driven over its stdin and stdout, one JSON object a line.

    It runs ``capacity_worker`` of the installed package (``python -c``), so nothing of a source
    checkout is needed. Its stderr goes to ``log``, quoted when it fails.
    """

    def __init__(self, rank: int, spec: Mapping[str, Any], env: Mapping[str, str], workdir: Path) -> None:
        self.rank = rank
        self.log = workdir / f"{spec['mode']}-n{spec['world']}-rank{rank}.log"
        code = "import tracklane._cli.bench as bench; bench.capacity_worker()"
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=dict(env),
                cwd=workdir,
                start_new_session=True,
            )
        self._lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, name=f"bench-rank-{rank}", daemon=True).start()
        self.send(spec)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(b"")  # its output ended: it exited

    def send(self, message: Mapping[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise RuntimeError(self._gone()) from None

    def receive(self, deadline: float) -> dict[str, Any]:
        """Its next answer; raise with its log if it exits, reports an error or misses ``deadline``."""
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(
                f"rank {self.rank} gave no answer in time. Its log:\n{_tail(self.log)}"
            ) from None
        if not line:
            raise RuntimeError(self._gone())
        message: dict[str, Any] = json.loads(line)
        if "error" in message:
            raise RuntimeError(f"rank {self.rank}: {message['error']}\nIts log:\n{_tail(self.log)}")
        return message

    def _gone(self) -> str:
        try:
            code: int | str = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            code = "nothing (still running)"
        return f"rank {self.rank} exited with {code}. Its log:\n{_tail(self.log)}"

    def stop(self, timeout: float) -> None:
        """Close its stdin (a rank still waiting to start leaves), wait, then end its group."""
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)


class CapacityPlan:
    """For each N: tracklane's aggregate events/s with N processes logging into one run, beside
    the raw ``runs/log-batch`` ceiling of N processes posting the same points without tracklane.

    The processes are the ranks of a job on one node, with the environment torchrun sets; each
    logs ``events`` points of a key of its own (``rank<r>/loss``, through ``rank_logging=
    "prefixed"``): rank 0 creates the run, the others attach to it by id. tracklane's clock runs
    from the first process's first call until the last process's ``close()`` returned, when the
    server holds everything.
    """

    def __init__(
        self,
        server: ServerConfig,
        *,
        workspace_id: str | None,
        experiment: str,
        events: int,
        timeout: float,
        workdir: Path,
    ) -> None:
        self.server = server
        self.workspace_id = workspace_id
        self.experiment = experiment
        self.events = events
        self.timeout = timeout
        self.workdir = workdir
        self.base, self.headers = rest_target(server, workspace_id)
        self.tag = uuid.uuid4().hex[:6]
        # The processes read the key where tracklane reads it; it never goes on a command line.
        self.env = {k: v for k, v in os.environ.items() if k not in _JOB_ENV}
        if server.api_key is not None:
            self.env["OIP_WORKLOAD_ACCESS_KEY"] = server.api_key.reveal()

    def run(self, counts: Sequence[int], repeats: int) -> list[dict[str, Any]]:
        """Measure every N of ``counts``, ``repeats`` times in turn; a row per N."""
        experiment_id = self._experiment()
        phases: dict[int, list[Phase]] = {n: [] for n in counts}
        for repeat in range(repeats):
            for n in counts:
                suffix = f"n{n}-{self.tag}" + (f"-{repeat + 1}" if repeats > 1 else "")
                phases[n].append(self._phase("tracklane", n, None, f"tracklane-{suffix}"))
                phases[n].append(self._ceiling(n, experiment_id, f"ceiling-{suffix}"))
        return [capacity_row(n, found, self.events) for n, found in phases.items()]

    def _experiment(self) -> str:
        """The experiment's id, created through tracklane (on OICM, in the workspace) if new."""
        from tracklane import TrackingClient

        key = self.server.api_key.reveal() if self.server.api_key is not None else ""
        storage = self.workdir / "journal-setup"
        with TrackingClient(
            api_host=self.server.api_host, api_key=key, offline_mode=False, path_to_storage=str(storage)
        ) as tc:
            try:
                return tc.set_experiment(self.experiment, self.workspace_id).experiment_id
            except TrackingError as exc:
                raise SystemExit(f"tracklane bench: {exc}") from None

    def _ceiling(self, n: int, experiment_id: str, run_name: str) -> Phase:
        try:
            created = self._rest(
                "runs/create",
                {"experiment_id": experiment_id, "run_name": run_name, "start_time": time.time_ns() // 10**6},
            )
        except RuntimeError as exc:
            return Phase("ceiling", n, error=str(exc))
        run_id = str(created["run"]["info"]["run_id"])
        phase = self._phase("ceiling", n, run_id, run_name)
        with contextlib.suppress(RuntimeError):
            self._rest(
                "runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": time.time_ns() // 10**6}
            )
        return phase

    def _phase(self, kind: str, n: int, run_id: str | None, run_name: str) -> Phase:
        print(f"  N={n} {kind} ...", end="", flush=True)
        phase = Phase(kind, n, run_id)
        ranks: list[_Rank] = []
        try:
            ranks.append(self._start(kind, 0, n, run_id, run_name))
            phase.run_id = str(ranks[0].receive(time.monotonic() + STARTUP_TIMEOUT)["run_id"])
            for r in range(1, n):  # one at a time: a failed start leaves the others in `ranks`
                ranks.append(self._start(kind, r, n, phase.run_id, run_name))
            deadline = time.monotonic() + STARTUP_TIMEOUT
            for rank in ranks[1:]:
                rank.receive(deadline)
            for rank in ranks:  # all ready: start them as close together as a loop can
                rank.send({"go": True})
            deadline = time.monotonic() + self.timeout
            phase.ranks = [rank.receive(deadline) for rank in ranks]
        except RuntimeError as exc:
            phase.error = str(exc)
        finally:
            for rank in ranks:
                rank.stop(30.0)
        if phase.error is None:
            elapsed = max(r["ended"] for r in phase.ranks) - min(r["began"] for r in phase.ranks)
            phase.events_per_s = n * self.events / elapsed
            print(f" {_fmt(phase.events_per_s)} events/s", flush=True)
        else:
            print(f" FAILED: {phase.error.splitlines()[0]}", flush=True)
        return phase

    def _start(self, kind: str, rank: int, n: int, run_id: str | None, run_name: str) -> _Rank:
        storage = self.workdir / f"journal-{kind}-n{n}-{self.tag}-rank{rank}"
        storage.mkdir(parents=True, exist_ok=True)
        spec = {
            "mode": kind,
            "rank": rank,
            "world": n,
            "url": self.server.api_host,
            "workspace_id": self.workspace_id,
            "experiment": self.experiment,
            "run_id": run_id,
            "run_name": run_name,
            "events": self.events,
            "in_flight": CEILING_IN_FLIGHT,
            "timeout": self.timeout,
            "storage": str(storage),
        }
        # One node's job as torchrun starts it: rank 0 creates and ends the run, the others never end it.
        env = {**self.env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n)}
        return _Rank(rank, spec, env, self.workdir)

    def _rest(self, endpoint: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base}/{endpoint}", data=json.dumps(payload).encode(), headers=self.headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                body = reply.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{endpoint}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeError(f"{endpoint}: {exc}") from None
        found: dict[str, Any] = json.loads(body or b"{}")
        return found


def capacity_row(n: int, phases: Sequence[Phase], events: int) -> dict[str, Any]:
    """One row of the table: medians over repeats, each rank's caller cost, what went wrong."""
    tracklane = [p for p in phases if p.kind == "tracklane"]
    ceiling = [p for p in phases if p.kind == "ceiling"]
    tl_rates = [p.events_per_s for p in tracklane if p.events_per_s is not None]
    ce_rates = [p.events_per_s for p in ceiling if p.events_per_s is not None]
    row: dict[str, Any] = {
        "processes": n,
        "events_per_process": events,
        "tracklane_events_per_s": statistics.median(tl_rates) if tl_rates else None,
        "ceiling_events_per_s": statistics.median(ce_rates) if ce_rates else None,
        "ratio": None,
        "goal_met": None,
        "caller_us_per_rank": [],
        "runs": {"tracklane": [p.run_id for p in tracklane], "ceiling": [p.run_id for p in ceiling]},
        "errors": [f"{p.kind}: {p.error}" for p in phases if p.error],
        "notes": [],
        "measurements": [
            {"kind": p.kind, "run_id": p.run_id, "events_per_s": p.events_per_s, "ranks": p.ranks}
            for p in phases
        ],
    }
    # Each repeat measures tracklane and then the ceiling: the ratio of the pair, which the drift of a
    # shared machine between repeats moves less than it moves either rate.
    paired = [
        t.events_per_s / c.events_per_s
        for t, c in zip(tracklane, ceiling, strict=True)
        if t.events_per_s is not None and c.events_per_s
    ]
    if paired:
        row["ratio"] = statistics.median(paired)
        row["goal_met"] = row["ratio"] >= CEILING_GOAL
    per_rank: dict[int, list[float]] = {}
    for phase in tracklane:
        for rank, result in enumerate(phase.ranks):
            per_rank.setdefault(rank, []).append(float(result["call_us"]))
            stats = result.get("stats") or {}
            trouble = {k: stats.get(k, 0) for k in ("spilled", "dropped", "rejected") if stats.get(k)}
            if result.get("lost"):
                trouble["kept nowhere at close"] = result["lost"]
            if trouble:
                said = ", ".join(f"{k} {v:,.0f}" for k, v in trouble.items())
                row["notes"].append(f"N={n} rank {rank} ({phase.run_id}): {said}")
    row["caller_us_per_rank"] = [statistics.median(per_rank[r]) for r in sorted(per_rank)]
    return row


def capacity_table(report: Mapping[str, Any]) -> str:
    """The capacity plan as a markdown table, then how it was measured and on what."""
    goal = f"{CEILING_GOAL:.0%}"
    lines = [
        f"| N | tracklane events/s | ceiling events/s | tracklane / ceiling (goal >= {goal}) "
        "| caller us per log_metric, median rank (slowest) |",
        "|---:|---:|---:|---|---:|",
    ]
    errors: list[str] = []
    notes: list[str] = []
    runs: list[str] = []
    for row in report["rows"]:
        n = row["processes"]
        tl, ce, ratio = row["tracklane_events_per_s"], row["ceiling_events_per_s"], row["ratio"]
        calls = row["caller_us_per_rank"]
        verdict = "" if ratio is None else f"{ratio:.0%} ({'met' if row['goal_met'] else 'MISSED'})"
        caller = f"{statistics.median(calls):.2f} ({max(calls):.2f})" if calls else ""
        rates = [_fmt(rate) if rate else "failed" for rate in (tl, ce)]
        lines.append(f"| {n} | {rates[0]} | {rates[1]} | {verdict} | {caller} |")
        errors += [f"N={n} {error.splitlines()[0]}" for error in row["errors"]]
        notes += row["notes"]
        ids = ", ".join(f"{kind} {' '.join(str(i) for i in found)}" for kind, found in row["runs"].items())
        runs.append(f"N={n}: {ids}")
    server = report["server"]
    machine = report["machine"]
    versions = report["versions"]
    events = f"{report['events_per_process']:,}"
    foot = [
        "",
        f"Each of N processes logs {events} points (one `log_metric` a point) into one run, started as "
        "torchrun starts a job's ranks (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`): rank 0 creates the run and "
        'ends it, the others attach with `start_run(run_id=...)`; with `rank_logging="prefixed"` each '
        "rank's `loss` is stored as `rank<r>/loss` when N > 1. tracklane events/s: N x points over the "
        "time from the first process's first call to the last process's `close()` returning "
        "(everything on the server). "
        f"Ceiling: N processes post the same points, pre-encoded as {CEILING_BATCH:,}-metric "
        "`runs/log-batch` bodies before the clock starts, straight to the server (http.client, no "
        f"tracklane), into one run, each with {CEILING_IN_FLIGHT} requests in flight as tracklane's worker "
        "keeps at most. Caller cost: each rank's median time per "
        f"call over groups of {CALL_GROUP} back-to-back `log_metric` calls while its worker delivers.",
        "",
        f"`{report['command']}`: server {server['url']} ({server['backend']}; MLflow "
        f"{server.get('version')}), {machine['cpu_count']} x {machine['cpu_model']}, "
        f"{machine['ram_gib']} GiB RAM, Python {machine['python']}, tracklane {versions.get('tracklane')}; "
        f"{report['repeats']} measurement(s) per N (medians; the ratio: the median of each repeat's), "
        f"{report.get('duration_s', 0):.0f}s. The "
        "server, the database and every process share this machine's cores: on a small or busy machine "
        "compare the ratios of one run, not absolute figures across runs.",
        "",
        f"Runs in experiment {report['experiment']!r}: " + "; ".join(runs) + ".",
    ]
    if notes:
        foot += ["", "Notes:", *[f"- {line}" for line in notes]]
    if errors:
        foot += ["", "Failed:", *[f"- {line}" for line in errors]]
    return "\n".join(lines + foot)


def capacity_worker() -> None:
    """One process of the capacity plan, driven by the ``tracklane bench`` process that started it.

    Reads its orders on stdin (a JSON spec, then ``{"go": true}``) and answers on stdout, one JSON
    object a line: ready (with the run id), then its figures, or ``{"error": ...}``.
    """
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to the log, not among the answers

    def send(message: Mapping[str, Any]) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    def go() -> bool:
        line = sys.stdin.readline()  # the parent closing stdin instead: give up
        return bool(line.strip()) and bool(json.loads(line).get("go"))

    spec = json.loads(sys.stdin.readline() or "{}")
    measure = _ceiling_rank if spec.get("mode") == "ceiling" else _tracklane_rank
    try:
        measure(spec, send, go)
    except Exception as exc:  # the parent quotes it, with this process's log
        send({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)


def _tracklane_rank(
    spec: Mapping[str, Any], send: Callable[[Mapping[str, Any]], None], go: Callable[[], bool]
) -> None:
    from tracklane import TrackingClient

    events = int(spec["events"])
    tc = TrackingClient(  # in a job of N > 1 (WORLD_SIZE), "loss" is stored as rank<r>/loss
        api_host=spec["url"],
        offline_mode=False,
        path_to_storage=spec["storage"],
        exit_timeout=5.0,
        rank_logging="prefixed",
    )
    tc.set_experiment(spec["experiment"], spec["workspace_id"])
    if spec["run_id"] is None:
        run = tc.start_run(run_name=spec["run_name"], log_system_metrics=False)
    else:
        run = tc.start_run(run_id=spec["run_id"], log_system_metrics=False)
    send({"run_id": run.info.run_id})
    if not go():
        tc.close(timeout=5.0)
        return
    key = "loss"
    log_metric = tc.log_metric
    clock = time.perf_counter
    per_call: list[float] = []
    began = time.monotonic()  # system-wide: comparable with the other ranks' clocks
    for first in range(0, events, CALL_GROUP):
        last = min(first + CALL_GROUP, events)
        t0 = clock()
        for step in range(first, last):
            log_metric(key, step * 0.001, step)
        per_call.append((clock() - t0) / (last - first))
    logged = time.monotonic()
    lost = tc.close(timeout=float(spec["timeout"]))
    ended = time.monotonic()
    send(
        {
            "began": began,
            "logged": logged,
            "ended": ended,
            "call_us": statistics.median(per_call) * 1e6,
            "lost": lost,
            "stats": tc.stats(),
        }
    )


def _ceiling_rank(
    spec: Mapping[str, Any], send: Callable[[Mapping[str, Any]], None], go: Callable[[], bool]
) -> None:
    server = resolve_server(spec["url"], None)  # the key, as tracklane reads it, from the environment
    assert server is not None
    base, headers = rest_target(server, spec["workspace_id"])
    root = urlsplit(base)
    events, key, now = int(spec["events"]), f"rank{spec['rank']}/loss", time.time_ns() // 10**6
    bodies = [
        json.dumps(
            {
                "run_id": spec["run_id"],
                "metrics": [
                    {"key": key, "value": step * 0.001, "timestamp": now, "step": step}
                    for step in range(first, min(first + CEILING_BATCH, events))
                ],
            }
        ).encode()
        for first in range(0, events, CEILING_BATCH)
    ]
    kind = http.client.HTTPSConnection if root.scheme == "https" else http.client.HTTPConnection
    path, pending, lock = f"{root.path}/runs/log-batch", iter(bodies), threading.Lock()
    failures: list[Exception] = []

    def sender() -> None:  # one connection each; http.client lets go of the GIL while it waits
        connection = kind(root.netloc, timeout=float(spec["timeout"]))
        try:
            while not failures:
                with lock:
                    body = next(pending, None)
                if body is None:
                    return
                _post(connection, path, body, headers)
        except Exception as exc:
            failures.append(exc)
        finally:
            connection.close()

    senders = [threading.Thread(target=sender) for _ in range(int(spec["in_flight"]))]
    send({"run_id": spec["run_id"]})
    if not go():
        return
    began = time.monotonic()
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join()
    ended = time.monotonic()
    if failures:
        raise failures[0]
    send({"began": began, "ended": ended})


def _post(connection: http.client.HTTPConnection, path: str, body: bytes, headers: Mapping[str, str]) -> None:
    """POST on a kept-alive connection; once more on a new one if the server had closed it idle."""
    for attempt in (1, 2):
        try:
            connection.request("POST", path, body=body, headers=dict(headers))
            reply = connection.getresponse()
            answer = reply.read()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            connection.close()
            if attempt == 2:
                raise
            continue
        if reply.status != 200:
            raise RuntimeError(f"runs/log-batch answered HTTP {reply.status}: {answer[:300]!r}")
        return


# -- the command ---------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure how fast tracklane logs to a server (a capacity plan), or the figures of benchmarks/",
        description=(
            "Capacity plan (default): N processes log into one run on the server (--api-host, else "
            "one started here on 127.0.0.1: SQLite, or PostgreSQL with --postgres), side by side with "
            "the raw log-batch ceiling of N senders without tracklane; prints a markdown table. "
            "--figures (or --quick): the figures of a source checkout's benchmarks/ next to MLflow's "
            "client, a table and a JSON file."
        ),
    )
    server = parser.add_argument_group("server")
    server.add_argument("--api-host", help="measure against this server instead of starting one")
    server.add_argument(
        "--api-key", help="its API key (default: $OIP_WORKLOAD_ACCESS_KEY); never printed or written"
    )
    server.add_argument("--workspace-id", help="the OICM workspace to log into (OICM hosts only)")
    server.add_argument(
        "--postgres",
        action="store_true",
        help="start PostgreSQL and `mlflow server` on it here (needs Debian's postgresql and mlflow)",
    )
    server.add_argument(
        "--server-workers",
        type=positive_int,
        default=2,
        help="worker processes of the `mlflow server` started with --postgres (default: 2)",
    )
    plan = parser.add_argument_group("capacity plan")
    plan.add_argument(
        "--processes",
        type=process_counts,
        default=CAPACITY_PROCESSES,
        help=f"process counts to measure, comma-separated (default: {CAPACITY_PROCESSES})",
    )
    plan.add_argument(
        "--events",
        type=positive_int,
        default=CAPACITY_EVENTS,
        help=f"metric points each process logs (default: {CAPACITY_EVENTS:,})",
    )
    plan.add_argument(
        "--repeats", type=positive_int, default=1, help="measurements per N; the table shows medians"
    )
    plan.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        help="longest one measurement may take, in seconds (default: 600)",
    )
    plan.add_argument(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        help=f"experiment that holds the runs measured (default: {DEFAULT_EXPERIMENT})",
    )
    figures = parser.add_argument_group("figures (a source checkout's benchmarks/)")
    figures.add_argument(
        "--figures", action="store_true", help="run the figures instead of the capacity plan"
    )
    figures.add_argument("--quick", action="store_true", help="the figures, smaller counts: under a minute")
    figures.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    figures.add_argument("--benchmarks", type=Path, help="the benchmarks/ directory (default: found)")
    figures.add_argument(
        "--readme",
        type=Path,
        help="also write the table between the <!-- bench:start/end --> markers of this file",
    )
    figures.add_argument(
        "--only", help="comma-separated figure numbers to run (e.g. 1,4); default: all", default=""
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write the JSON report here (figures: default bench-results/bench.json; capacity plan: none)",
    )
    parser.set_defaults(run=run, _parser=parser)


def run(args: argparse.Namespace) -> int:
    if args.api_host and args.postgres:
        args._parser.error("--api-host and --postgres exclude each other: measure one server")
    if args.figures or args.quick or args.smoke or args.only or args.benchmarks or args.readme:
        if args.api_key or args.workspace_id:
            args._parser.error("--api-key and --workspace-id apply to the capacity plan, not to --figures")
        return run_figures(args)
    return run_capacity(args)


def run_capacity(args: argparse.Namespace) -> int:
    """The capacity plan against ``--api-host`` (or a server started here); the table on stdout."""
    started = time.monotonic()
    report: dict[str, Any] = {
        "command": _command_line(args),
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "events_per_process": args.events,
        "repeats": args.repeats,
        "experiment": args.experiment,
    }
    with tempfile.TemporaryDirectory(prefix="tracklane-bench-") as tmp, _server(args, Path(tmp)) as found:
        url, backend = found
        try:
            # An explicit --api-key, else $OIP_WORKLOAD_ACCESS_KEY, read the way the client reads it;
            # a server started here needs none.
            server = resolve_server(url, args.api_key if args.api_host else "")
        except ConfigurationError as exc:
            raise SystemExit(f"tracklane bench: {exc}") from None
        assert server is not None
        report["server"] = {
            "url": _shown(server.api_host),
            "backend": backend,
            "started_by_bench": args.api_host is None,
            "version": _server_version(url),
        }
        print(
            f"tracklane bench: capacity plan against {report['server']['url']} ({backend}), "
            f"N = {', '.join(map(str, args.processes))}, {args.events:,} points per process",
            flush=True,
        )
        plan = CapacityPlan(
            server,
            workspace_id=args.workspace_id,
            experiment=args.experiment,
            events=args.events,
            timeout=args.timeout,
            workdir=Path(tmp),
        )
        report["rows"] = plan.run(args.processes, args.repeats)
    report["duration_s"] = round(time.monotonic() - started, 1)
    report["table"] = table = capacity_table(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table)
    if args.out is not None:
        print(f"\nWrote {args.out}.")
    return 1 if any(row["errors"] for row in report["rows"]) else 0


def _command_line(args: argparse.Namespace) -> str:
    """The command as run, for the report: every option but the key, and no host's credentials."""
    parts = ["tracklane bench"]
    if args.api_host:
        parts.append(f"--api-host {_shown(args.api_host)}")
    if args.workspace_id:
        parts.append(f"--workspace-id {args.workspace_id}")
    if args.postgres:
        parts.append(
            "--postgres" + (f" --server-workers {args.server_workers}" if args.server_workers != 2 else "")
        )
    parts.append(f"--processes {','.join(map(str, args.processes))}")
    if args.events != CAPACITY_EVENTS:
        parts.append(f"--events {args.events}")
    if args.repeats != 1:
        parts.append(f"--repeats {args.repeats}")
    return " ".join(parts)


def _shown(url: str) -> str:
    """``url`` without any user:password part, fit to print."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=host).geturl().rstrip("/")


def find_benchmarks(given: Path | None) -> Path:
    candidates = (
        [given]
        if given is not None
        else [
            # A source checkout: <root>/src/tracklane/_cli/bench.py beside <root>/benchmarks.
            Path(__file__).resolve().parents[3] / "benchmarks",
            Path.cwd() / "benchmarks",
        ]
    )
    for path in candidates:
        if path is not None and (path / "_common.py").is_file():
            return path
    raise SystemExit(
        "tracklane bench --figures: no benchmarks/ directory found (looked in "
        f"{', '.join(str(p) for p in candidates)}). The figures live in a source checkout of "
        "tracklane: run from one, or pass --benchmarks DIR. Without --figures, tracklane bench "
        "measures the capacity plan, which needs no checkout."
    )


def run_figures(args: argparse.Namespace) -> int:
    """The figures of ``benchmarks/``: a table on stdout and every figure in a JSON file."""
    scale = "smoke" if args.smoke else "quick" if args.quick else "full"
    bench_dir = find_benchmarks(args.benchmarks)
    out: Path = args.out if args.out is not None else Path("bench-results/bench.json")
    wanted = {part.strip() for part in args.only.split(",") if part.strip()}
    figures = {k: v for k, v in FIGURES.items() if not wanted or k.split("_", 1)[0] in wanted}
    started = time.monotonic()
    report: dict[str, Any] = {
        "command": f"tracklane bench --{'figures' if scale == 'full' else scale}",
        "scale": scale,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "figures": {},
        "failures": {},
    }
    with tempfile.TemporaryDirectory(prefix="tracklane-bench-") as tmp, _server(args, Path(tmp)) as found:
        url, backend = found
        report["server"] = {
            "url": url,
            "backend": backend,
            "started_by_bench": args.api_host is None,
            "version": _server_version(url),
        }
        print(f"tracklane bench ({scale}): MLflow server at {url}", flush=True)
        for figure, script in figures.items():
            result, error = _run_script(bench_dir / script, url, scale, Path(tmp))
            if result is not None:
                report["figures"][figure] = result
            if error is not None:
                report["failures"][figure] = error
                print(f"  {figure}: FAILED: {error.splitlines()[-1] if error else ''}", flush=True)
    report["targets"] = verdicts(report["figures"])
    report["ratios"] = ratios(report["figures"])
    report["duration_s"] = round(time.monotonic() - started, 1)
    report["table"] = table = markdown_table(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")  # first: the table below may be cut short
    print()
    print(table)
    print(f"\nWrote {out} ({report['duration_s']:.0f}s).")
    if args.readme is not None:
        update_readme(args.readme, report)
        print(f"Updated the table in {args.readme}.")
    return 1 if report["failures"] else 0


@contextlib.contextmanager
def _server(args: argparse.Namespace, tmp: Path) -> Iterator[tuple[str, str]]:
    """The server to measure and what it is: ``--api-host``, else one started here (and stopped)."""
    if args.api_host:
        yield args.api_host.rstrip("/"), "given"
        return
    workdir = tmp / "mlflow"
    workdir.mkdir()
    if not args.postgres:
        server = MlflowServer(workdir).start()
        try:
            yield server.url, "MLflow on SQLite, 1 worker, started here"
        finally:
            server.stop()
        return
    print("starting PostgreSQL and mlflow server on it ...", flush=True)
    database = PostgresServer()
    try:
        database.start()
        pg_server = PgMlflowServer(workdir, database.url, workers=args.server_workers).start()
    except (PostgresNotFound, RuntimeError) as exc:
        database.stop()
        raise SystemExit(f"tracklane bench --postgres: {exc}") from None
    try:
        yield pg_server.url, f"MLflow on PostgreSQL, {args.server_workers} workers, started here"
    finally:
        pg_server.stop()
        database.stop()


def _server_version(url: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{url}/version", timeout=5) as reply:
            return reply.read(100).decode(errors="replace").strip() or None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _run_script(script: Path, url: str, scale: str, tmp: Path) -> tuple[dict[str, Any] | None, str | None]:
    out = tmp / f"{script.stem}.json"
    cmd = [sys.executable, str(script), "--api-host", url, "--scale", scale, "--json", str(out)]
    began = time.monotonic()
    print(f"  {script.name} ...", end="", flush=True)
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT[scale],
            cwd=tmp,
            env={**os.environ, **QUIET_MLFLOW},
        )
    except subprocess.TimeoutExpired as exc:
        print(" timed out", flush=True)
        return None, f"{script.name} did not finish within {exc.timeout:.0f}s"
    print(f" {time.monotonic() - began:.1f}s", flush=True)
    if done.returncode != 0 or not out.exists():
        return (
            None,
            f"{script.name} exited with {done.returncode}:\n{done.stdout[-1500:]}{done.stderr[-3000:]}",
        )
    result: dict[str, Any] = json.loads(out.read_text())
    return result, None


def markdown_table(report: Mapping[str, Any]) -> str:
    """The report as one markdown table: a row per measurement, targets beside their figure."""
    by_key = {(t["figure"], t["key"]): t for t in report.get("targets", [])}
    lines = [
        "| # | measurement | value | target |",
        "|---|---|---:|---|",
    ]
    skipped: list[str] = []
    notes: list[str] = []
    for figure, result in report["figures"].items():
        number = figure.split("_", 1)[0]
        for key, m in result.get("measurements", {}).items():
            target = by_key.get((figure, key))
            verdict = ""
            if target is not None:
                verdict = f"{target['rule']}: {target['note']}"
                for other in report.get("targets", []):
                    if other is not target and (other["figure"], other["key"]) == (figure, key):
                        verdict += f"; {other['rule']}: {other['note']}"
            lines.append(f"| {number} | {m['label']} | {_fmt(float(m['value']))} {m['unit']} | {verdict} |")
        skipped += [f"{number}: {line}" for line in result.get("skipped", [])]
        notes += [f"{number}: {line}" for line in result.get("notes", [])]
    machine = report["machine"]
    versions = report["versions"]
    foot = [
        "",
        f"`{report['command']}` on {machine['cpu_count']} x {machine['cpu_model']}, "
        f"{machine['ram_gib']} GiB RAM, Python {machine['python']}; tracklane {versions.get('tracklane')}, "
        f"mlflow {versions.get('mlflow')} (server {report.get('server', {}).get('version')} on 127.0.0.1), "
        f"{report.get('duration_s', 0):.0f}s.",
    ]
    if report.get("ratios"):
        foot += ["", "Ratios:", *[f"- {label}: {value:,.2f}x" for label, value in report["ratios"].items()]]
    if notes:
        foot += ["", "Notes:", *[f"- {line}" for line in notes]]
    if skipped:
        foot += ["", "Skipped:", *[f"- {line}" for line in skipped]]
    for figure, error in report.get("failures", {}).items():
        foot.append(f"- {figure} FAILED: {error.splitlines()[0]}")
    return "\n".join(lines + foot)


def update_readme(path: Path, report: Mapping[str, Any]) -> None:
    """Replace what stands between the bench markers of ``path`` with the command and the table."""
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    text = path.read_text()
    if start not in text or end not in text.split(start, 1)[1]:
        raise SystemExit(f"{path} has no {start} ... {end} markers to put the table between.")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    body = (
        f"\nProduced by `{report['command']}` ({report['started_at']}); `tracklane bench --quick` takes "
        "under a minute, and `benchmarks/README.md` says what each figure measures.\n\n"
        f"{report['table']}\n"
    )
    path.write_text(f"{head}{start}{body}{end}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tracklane._cli.bench ...``: the same as ``tracklane bench ...``."""
    parser = argparse.ArgumentParser(prog="tracklane")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
