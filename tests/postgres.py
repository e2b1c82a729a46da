"""A real PostgreSQL on 127.0.0.1 and an MLflow server that stores into it with several workers.

This is the setup users outgrow SQLite into: MLflow's SQLAlchemy store on PostgreSQL behind more
than one server worker. Test-only (and ``benchmarks/capacity_postgres.py``'s): the pytest fixtures
(``conftest.py``) turn ``PostgresNotFound`` into a skip.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tracklane._cli.mlflow_server import MlflowServer, free_port, tail

__all__ = ["PgMlflowServer", "PostgresNotFound", "PostgresServer", "find_postgres_bin"]

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
            raise RuntimeError(f"{cmd!r} did not finish within {timeout:.0f}s. {tail(self.log)}") from exc
        if done.returncode != 0:
            raise RuntimeError(
                f"{cmd!r} exited with {done.returncode}: {done.stdout[-1500:]}{done.stderr[-1500:]}"
                f"\n--- {self.log}:\n{tail(self.log)}"
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
