"""The local journal: one SQLite file that keeps experiments, runs and every event durably.

Three users share it: offline mode (``JournalBackend`` logs here instead of to a server), outage
spill (the engine writes batches a server could not take, to replay them later), and
``tracklane sync`` (uploads what a server has not received yet). So the journal also records, per
run and server, how far delivery has got.

Why it is shaped this way:
- WAL mode with ``synchronous=NORMAL``: a committed batch survives a process crash (a power cut may
  lose the last transactions, never corrupt the file), and a commit costs no fsync.
- One short ``BEGIN IMMEDIATE`` transaction per worker batch, with a busy timeout, so several
  processes (ranks of one job) can append to one file without corrupting or losing anything.
- Metric points live in a rowid table of small integers and one REAL, with no index: about 30
  bytes a point. Runs and keys are integer ids through lookup tables. Rowids only grow, so "what
  has been delivered" is one high-water mark per (run, server) and table.
- SQLite stores a NaN REAL as NULL. A point always has a value, so NULL in ``metrics.value``
  means NaN; the infinities are stored as they are.
- The schema version is ``PRAGMA user_version``; an older journal is migrated in place when opened,
  and a file that is not a journal (damaged, another program's database, a newer tracklane's) is
  refused with an error that names it and says what to do, never a raw ``sqlite3`` traceback.
- One uploader at a time per journal and server, across processes (``UploadLock``): two
  ``tracklane sync`` runs, or a sync beside a client replaying its outage, never send the same rows
  twice, create a server run twice, or reorder a tag's values.

All methods are blocking and thread-safe (one lock around the connection); async callers run them
with ``await journal.call(journal.method, ...)`` on the journal's own thread (``JournalThread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from .._entities import Experiment, Metric, Run, RunData, RunInfo
from .._exceptions import ConfigurationError, NotFoundError, ServerError
from .._settings import strip_credentials
from .._wire.batching import METRIC, PARAM, TAG, Event
from .event_log import OFFLINE

#: ``<path_to_storage>/ml_runs/<JOURNAL_FILE>``.
JOURNAL_DIR = "ml_runs"
JOURNAL_FILE = "tracklane.db"
#: ``PRAGMA user_version`` of the journal this tracklane writes. 1 (kept in ``meta``): the first
#: journal; 2: ``texts.seq``, so a late retry never replaces a newer tag value.
SCHEMA_VERSION = 3
_BUSY_TIMEOUT_MS = 30_000
_NAN = float("nan")
T = TypeVar("T")
logger = logging.getLogger("tracklane")

#: Tables every journal version has (version 3 added ``artifacts``).
_TABLES = ("meta", "experiments", "runs", "keys", "metrics", "texts", "deliveries")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, lifecycle_stage TEXT NOT NULL,
    creation_time INTEGER, last_update_time INTEGER, tags TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, uuid TEXT NOT NULL UNIQUE, experiment INTEGER, name TEXT NOT NULL,
    status TEXT, start_time INTEGER, end_time INTEGER, lifecycle_stage TEXT NOT NULL,
    origin TEXT);
CREATE TABLE IF NOT EXISTS keys (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS metrics (
    run INTEGER NOT NULL, key INTEGER NOT NULL, value REAL, ts INTEGER NOT NULL, step INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS texts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run INTEGER NOT NULL, kind INTEGER NOT NULL,
    key INTEGER NOT NULL, value TEXT NOT NULL, seq INTEGER NOT NULL DEFAULT 0, UNIQUE (run, kind, key));
CREATE TABLE IF NOT EXISTS deliveries (
    run INTEGER NOT NULL, server TEXT NOT NULL, server_run_id TEXT NOT NULL,
    metric_mark INTEGER NOT NULL DEFAULT 0, text_mark INTEGER NOT NULL DEFAULT 0, state TEXT,
    artifact_mark INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (run, server));
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run INTEGER NOT NULL, path TEXT NOT NULL,
    file TEXT NOT NULL, size INTEGER NOT NULL);
"""
#: Where snapshots of logged artifacts live, next to the journal file.
ARTIFACT_DIR = "artifacts"


def server_key(api_host: str, workspace_id: str | None) -> str:
    """How the journal names a destination: the host (never with credentials in it), and the
    workspace on OICM."""
    host = strip_credentials(api_host.rstrip("/"))[0]
    return f"{host}#workspace={workspace_id}" if workspace_id else host


def journal_file(path: str | Path) -> Path:
    """The journal file for ``path``: a storage directory, its ``ml_runs`` folder, or the file."""
    p = Path(path)
    if p.is_file():
        return p
    if p.name == JOURNAL_DIR or (p / JOURNAL_FILE).exists():
        return p / JOURNAL_FILE
    return p / JOURNAL_DIR / JOURNAL_FILE


class JournalThread:
    """One daemon thread that runs blocking journal calls in order for async callers.

    Not ``asyncio.to_thread``: its executor cannot start threads once the interpreter is exiting,
    which is exactly when the exit flush writes the journal. If no thread can be started at all,
    the call runs inline (a short stall of the loop beats losing the events).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0

    async def call(self, func: Callable[..., T], *args: Any) -> T:
        if not self._started():
            return func(*args)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, future, func, args))
        return await future

    def _started(self) -> bool:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return True
        self._queue = queue.SimpleQueue()  # a forked child starts afresh
        thread = threading.Thread(
            target=self._main, args=(self._queue,), name="tracklane-journal", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:
            return False
        self._thread, self._pid = thread, os.getpid()
        return True

    @staticmethod
    def _main(jobs: queue.SimpleQueue[Any]) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            loop, future, func, args = job
            try:
                result, error = func(*args), None
            except BaseException as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, future, result, error)

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass
class _Held:
    """Delivery marks of one run the journal file could not record (see ``Journal._progress``)."""

    metric_mark: int = 0
    text_mark: int = 0
    artifact_mark: int = 0
    state: str | None = field(default=None)


@dataclass(frozen=True)
class Delivery:
    """How far one journal run has been delivered to one server."""

    run: int
    run_uuid: str
    run_name: str
    experiment: int | None
    status: str | None
    start_time: int | None
    end_time: int | None
    server_run_id: str | None
    metric_mark: int
    text_mark: int
    state: str | None
    artifact_mark: int = 0
    origin: str | None = None  # the server a spilled run lives on; None: a run logged offline

    @property
    def wanted_state(self) -> str | None:
        """The run's lifecycle as the server should end up holding it (None: leave it alone)."""
        return None if self.status is None else f"{self.status}:{self.end_time}"


class Journal:
    """A journal file opened by this process. See the module docstring."""

    def __init__(self, path: str | Path, *, create: bool = True, thread: JournalThread | None = None) -> None:
        self.path = Path(path)
        self.thread = thread or JournalThread()
        if not create and not self.path.exists():
            raise ConfigurationError(
                f"No tracklane journal at {self.path}. Pass the directory you logged to "
                "(path_to_storage, default '.'), its ml_runs folder, or the journal file."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._connect()
            with self._write() as db:
                self._check_schema(db)
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(Exception):
                self._db.close()
            raise ConfigurationError(
                f"{self.path} is not a tracklane journal, or it is damaged ({exc}). Move it out of the "
                f"way (e.g. `mv {self.path} {self.path}.bad`) to start a new journal there, or give "
                "path_to_storage= another directory."
            ) from None
        self._run_ids: dict[str, int] = {}
        self._key_ids: dict[str, int] = {}
        self._key_names_by_id: dict[int, str] = {}
        #: Delivery progress the file could not record (a full disk): (run, server) -> marks.
        self._held: dict[tuple[int, str], _Held] = {}

    def _connect(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_MS / 1000
        )
        self._db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")

    def _check_schema(self, db: sqlite3.Connection) -> None:
        """Create, migrate or refuse the file; inside the write lock, so processes opening one new
        journal together do it once."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables.discard("sqlite_sequence")
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"{self.path} was written by a newer tracklane (journal version {version}; this one "
                f"reads up to {SCHEMA_VERSION}). Upgrade tracklane (pip install -U tracklane) to use it."
            )
        if version == 0 and tables:
            first = (
                db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
                if "meta" in tables
                else None
            )
            if first is None or first[0] != "1" or not set(_TABLES) <= tables:
                raise sqlite3.DatabaseError(f"it holds tables {sorted(tables)} of another program")
            version = 1
        if version and not set(_TABLES) <= tables:
            raise sqlite3.DatabaseError(f"tables {sorted(set(_TABLES) - tables)} are missing")
        if version == 1:  # journal version 1 -> 2
            db.execute("ALTER TABLE texts ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
        if version in (1, 2):  # 2 -> 3: artifacts (the table itself is created below)
            db.execute("ALTER TABLE deliveries ADD COLUMN artifact_mark INTEGER NOT NULL DEFAULT 0")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_fork(self) -> None:
        # SQLite forbids using a connection opened before fork() in the child; the lock may also
        # have been held by a thread that does not exist there. A forked child opens its own.
        if self._pid != os.getpid():
            self._connect()

    @classmethod
    def at(cls, storage: str | Path, thread: JournalThread | None = None) -> Journal:
        """Open (creating if needed) the journal of storage directory ``storage``."""
        return cls(Path(storage) / JOURNAL_DIR / JOURNAL_FILE, thread=thread)

    async def call(self, func: Callable[..., T], *args: Any) -> T:
        """Run blocking ``func(*args)`` (a method of this journal) off the event loop, in order."""
        return await self.thread.call(func, *args)

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r})"

    def close(self) -> None:
        """Close the file; the journal thread ends after the calls already queued."""
        if self._held and not self._save_held():
            logger.warning(
                "tracklane: %s could not record which of its rows the server already has (%s); a "
                "later upload from it sends them again (the server keeps one copy of each).",
                self.path,
                "the disk is full or read-only",
            )
        with self._lock:
            self._db.close()
        self.thread.stop()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so a busy file waits (busy_timeout)
        # instead of failing half-way through a transaction with SQLITE_BUSY.
        self._check_fork()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:  # a full disk: the next write must not find this one still open
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        self._check_fork()
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- experiments -----------------------------------------------------------------------------

    def _experiment(self, row: Any) -> Experiment:
        return Experiment(
            experiment_id=str(row[0]),
            name=row[1],
            artifact_location=f"{self.path.parent}/{row[0]}",
            lifecycle_stage=row[2],
            tags=json.loads(row[5]),
            creation_time=row[3],
            last_update_time=row[4],
        )

    def get_experiment_by_name(self, name: str) -> Experiment | None:
        rows = self._read("SELECT * FROM experiments WHERE name = ?", (name,))
        return self._experiment(rows[0]) if rows else None

    def get_experiment(self, experiment_id: str) -> Experiment:
        rows = self._read("SELECT * FROM experiments WHERE id = ?", (_int_id(experiment_id),))
        if not rows:
            raise NotFoundError(
                f"No experiment with id {experiment_id!r} in the journal {self.path}.",
                status=404,
                error_code="RESOURCE_DOES_NOT_EXIST",
            )
        return self._experiment(rows[0])

    def create_experiment(self, name: str, tags: Mapping[str, str]) -> str:
        now = _now_ms()
        try:
            with self._write() as db:
                cursor = db.execute(
                    "INSERT INTO experiments (name, lifecycle_stage, creation_time, last_update_time, tags) "
                    "VALUES (?, 'active', ?, ?, ?)",
                    (name, now, now, json.dumps(dict(tags))),
                )
        except sqlite3.IntegrityError:
            raise ServerError(
                f"Experiment {name!r} already exists in the journal.", error_code="RESOURCE_ALREADY_EXISTS"
            ) from None
        return str(cursor.lastrowid)

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        with self._write() as db:
            row = db.execute(
                "SELECT tags FROM experiments WHERE id = ?", (_int_id(experiment_id),)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"No experiment with id {experiment_id!r} in the journal {self.path}.")
            tags = {**json.loads(row[0]), key: value}
            db.execute(
                "UPDATE experiments SET tags = ?, last_update_time = ? WHERE id = ?",
                (json.dumps(tags), _now_ms(), _int_id(experiment_id)),
            )

    def delete_experiment(self, experiment_id: str) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE experiments SET lifecycle_stage = 'deleted', last_update_time = ? WHERE id = ?",
                (_now_ms(), _int_id(experiment_id)),
            )

    # -- runs ------------------------------------------------------------------------------------

    def create_run(self, experiment_id: str, run_name: str, start_time: int, tags: Mapping[str, str]) -> Run:
        run_uuid = uuid.uuid4().hex  # ids made here never collide with another process's
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO runs (uuid, experiment, name, status, start_time, lifecycle_stage) "
                "VALUES (?, ?, ?, 'RUNNING', ?, 'active')",
                (run_uuid, _int_id(experiment_id), run_name, start_time),
            )
            assert cursor.lastrowid is not None
            self._put_texts(db, cursor.lastrowid, [(TAG, k, v) for k, v in tags.items()], {}, 0)
        return self.get_run(run_uuid)

    def _run_id(self, run_uuid: str) -> int:
        found = self._run_ids.get(run_uuid)
        if found is None:
            rows = self._read("SELECT id FROM runs WHERE uuid = ?", (run_uuid,))
            if not rows:
                raise NotFoundError(
                    f"No run with id {run_uuid!r} in the journal {self.path}.",
                    status=404,
                    error_code="RESOURCE_DOES_NOT_EXIST",
                )
            found = self._run_ids[run_uuid] = rows[0][0]
        return found

    def get_run(self, run_uuid: str) -> Run:
        run = self._run_id(run_uuid)
        row = self._read(
            "SELECT uuid, experiment, name, status, start_time, end_time, lifecycle_stage FROM runs "
            "WHERE id = ?",
            (run,),
        )[0]
        info = RunInfo(
            run_id=row[0],
            experiment_id=str(row[1]),
            run_name=row[2],
            status=row[3] or "RUNNING",
            start_time=row[4],
            end_time=row[5],
            artifact_uri=f"{self.path.parent}/{row[1]}/{row[0]}/artifacts",
            lifecycle_stage=row[6],
        )
        texts = self._read(
            "SELECT t.kind, k.name, t.value FROM texts t JOIN keys k ON k.id = t.key WHERE t.run = ?", (run,)
        )
        params = {k: v for kind, k, v in texts if kind == PARAM}
        tags = {k: v for kind, k, v in texts if kind == TAG}
        tags.setdefault("mlflow.runName", row[2])
        # The latest value of a metric is the one with the largest (step, timestamp), as on MLflow.
        latest: dict[int, tuple[int, int, float]] = {}
        for key, value, ts, step in self._read(
            "SELECT key, value, ts, step FROM metrics WHERE run = ?", (run,)
        ):
            best = latest.get(key)
            if best is None or (step, ts) >= best[:2]:
                latest[key] = (step, ts, _NAN if value is None else value)
        names = self._key_names(latest)
        metrics = {names[k]: v[2] for k, v in latest.items()}
        return Run(info, RunData(metrics=metrics, params=params, tags=tags))

    def _key_names(self, ids: Iterable[int]) -> dict[int, str]:
        ids = list(ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        return dict(self._read(f"SELECT id, name FROM keys WHERE id IN ({marks})", ids))

    def search_runs_by_name(self, experiment_id: str, run_name: str) -> list[Run]:
        """Runs of the experiment called ``run_name``, the most recently started first."""
        rows = self._read(
            "SELECT uuid FROM runs WHERE experiment = ? AND name = ? AND lifecycle_stage = 'active' "
            "ORDER BY start_time DESC, id DESC",
            (_int_id(experiment_id), run_name),
        )
        return [self.get_run(r[0]) for r in rows]

    def update_run(self, run_uuid: str, status: str, end_time: int | None) -> None:
        run = self._run_id(run_uuid)
        with self._write() as db:
            db.execute("UPDATE runs SET status = ?, end_time = ? WHERE id = ?", (status, end_time, run))

    # -- events ----------------------------------------------------------------------------------

    def write_events(self, run_uuid: str, events: Sequence[Event], seq: int = 0) -> None:
        """Append one run's events in one transaction: all of them are stored, or none.

        Raises ServerError (HTTP 400, as the server would) when a param would change value.
        """
        run = self._run_id(run_uuid)
        self._write_rows(run, events, seq)

    def _write_rows(self, run: int, events: Sequence[Event], seq: int) -> None:
        new_keys: dict[str, int] = {}
        with self._write() as db:
            self._put_metrics(db, run, events, new_keys)
            texts = [(e[0], e[2], e[3]) for e in events if e[0] != METRIC]
            if texts:
                self._put_texts(db, run, texts, new_keys, seq)
        self._key_ids.update(new_keys)  # only ids that are committed are remembered

    def _put_metrics(
        self, db: sqlite3.Connection, run: int, events: Sequence[Event], new: dict[str, int]
    ) -> None:
        """The metric points among ``events``, as rows of ``run`` (in the caller's transaction)."""
        metrics = [e for e in events if e[0] == METRIC]
        ids = self._ids_for(db, {e[2] for e in metrics}, new)
        # NaN is stored as NULL (SQLite's own rule), so no conversion is needed on the way in.
        db.executemany(
            "INSERT INTO metrics VALUES (?, ?, ?, ?, ?)",
            [(run, ids[e[2]], e[3], e[4], e[5]) for e in metrics],
        )

    def _ids_for(self, db: sqlite3.Connection, names: Iterable[str], new: dict[str, int]) -> dict[str, int]:
        known = self._key_ids
        out: dict[str, int] = {}
        for name in names:
            found = known.get(name) or new.get(name)
            if found is None:
                db.execute("INSERT OR IGNORE INTO keys (name) VALUES (?)", (name,))
                found = new[name] = db.execute("SELECT id FROM keys WHERE name = ?", (name,)).fetchone()[0]
            out[name] = found
        return out

    def _put_texts(
        self,
        db: sqlite3.Connection,
        run: int,
        texts: Sequence[tuple[int, str, str]],
        new: dict[str, int],
        seq: int,
    ) -> None:
        ids = self._ids_for(db, {t[1] for t in texts}, new)
        for kind, name, value in texts:
            row = db.execute(
                "SELECT value, seq FROM texts WHERE run = ? AND kind = ? AND key = ?", (run, kind, ids[name])
            ).fetchone()
            if row is not None and (row[0] == value or (kind == TAG and row[1] > seq)):
                continue  # unchanged, or a late retry of a tag value set again since
            if row is not None and kind == PARAM:
                raise ServerError(
                    f"Changing param values is not allowed. Param with key={name!r} was already logged "
                    f"with value={row[0]!r}; the new value is {value!r}.",
                    status=400,
                    error_code="INVALID_PARAMETER_VALUE",
                )
            # REPLACE gives the row a new, never reused id: a changed tag counts as undelivered again.
            db.execute(
                "INSERT OR REPLACE INTO texts (run, kind, key, value, seq) VALUES (?, ?, ?, ?, ?)",
                (run, kind, ids[name], value, seq),
            )

    def metric_history(self, run_uuid: str, key: str) -> list[Metric]:
        run = self._run_id(run_uuid)
        rows = self._read("SELECT id FROM keys WHERE name = ?", (key,))
        if not rows:
            return []
        points = self._read(
            "SELECT value, ts, step FROM metrics WHERE run = ? AND key = ? ORDER BY rowid", (run, rows[0][0])
        )
        return [Metric(key, _NAN if v is None else v, ts, step) for v, ts, step in points]

    # -- delivery: spill and sync ----------------------------------------------------------------

    def spill(self, server: str, run_uuid: str, run_name: str, events: Sequence[Event], seq: int = 0) -> None:
        """Keep events a server could not take, for run ``run_uuid`` that lives on ``server``."""
        run = self._run_ids.get(run_uuid)
        if run is None:
            with self._write() as db:
                run = self._spilled_run(db, server, run_uuid, run_name)
            self._run_ids[run_uuid] = run
        self._write_rows(run, events, seq)

    def _spilled_run(self, db: sqlite3.Connection, server: str, run_uuid: str, run_name: str) -> int:
        """The journal's id of run ``run_uuid`` that lives on ``server``, made if it is new, with
        its delivery to that server (in the caller's transaction)."""
        db.execute(
            "INSERT OR IGNORE INTO runs (uuid, name, lifecycle_stage, origin) VALUES (?, ?, 'active', ?)",
            (run_uuid, run_name, server),
        )
        run: int = db.execute("SELECT id FROM runs WHERE uuid = ?", (run_uuid,)).fetchone()[0]
        db.execute(
            "INSERT OR IGNORE INTO deliveries (run, server, server_run_id) VALUES (?, ?, ?)",
            (run, server, run_uuid),
        )
        return run

    def recovered(self, names: list[str]) -> set[str]:
        """Which of these event-log segment names were already moved here (``event_log.recover``)."""
        marks = {f"recovered:{n}": n for n in names}
        found = self._read(f"SELECT name FROM meta WHERE name IN ({','.join('?' * len(marks))})", list(marks))
        return {marks[r[0]] for r in found}

    def keep_recovered(self, rows: dict[tuple[str, str], list[Event]], names: list[str], seq: int) -> int:
        """A dead process's event-log records, as rows of their run, and the segments' names as
        done, in one transaction: all of it is here, or none. Records of an offline client
        (server ``OFFLINE``) join its run here; the others are spilled rows of their server's run.
        A point the journal already holds (written, its acknowledgement lost with the process) is
        not kept twice. Returns how many records were added (a point already here, or a record
        of a run the journal does not have, logged, is not)."""
        new_keys: dict[str, int] = {}
        run_ids: dict[str, int] = {}
        added = 0
        with self._write() as db:
            for (server, run_uuid), events in rows.items():
                if server == OFFLINE:
                    found = db.execute(
                        "SELECT id FROM runs WHERE uuid = ? AND origin IS NULL", (run_uuid,)
                    ).fetchone()
                    if found is None:  # the run's journal was replaced or deleted meanwhile
                        logger.warning(
                            "tracklane: %d recovered event(s) of offline run %s are skipped: the "
                            "journal %s has no such run.",
                            len(events),
                            run_uuid,
                            self.path,
                        )
                        continue
                    run = run_ids[run_uuid] = found[0]
                else:
                    run = run_ids[run_uuid] = self._spilled_run(db, server, run_uuid, "")
                events = self._new_points(db, run, events)
                added += len(events)
                self._put_metrics(db, run, events, new_keys)
                for e in events:
                    if e[0] != METRIC:
                        try:
                            self._put_texts(db, run, [(e[0], e[2], e[3])], new_keys, seq)
                        except ServerError as exc:  # a param another process changed meanwhile
                            logger.warning("tracklane: recovered param of run %s skipped: %s", run_uuid, exc)
            db.executemany(
                "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)",
                [(f"recovered:{n}", str(seq)) for n in names],
            )
        self._key_ids.update(new_keys)
        self._run_ids.update(run_ids)
        return added

    def _new_points(self, db: sqlite3.Connection, run: int, events: Sequence[Event]) -> list[Event]:
        """The metric points of ``events`` that ``run`` does not hold yet (same key, value,
        timestamp and step: MLflow's identity of a point), in their order; other events as they are."""
        metrics = [e for e in events if e[0] == METRIC]
        if not metrics:
            return list(events)
        held = {
            (name, _point_value(value), ts, step)
            for name, value, ts, step in db.execute(
                "SELECT k.name, m.value, m.ts, m.step FROM metrics m JOIN keys k ON k.id = m.key "
                "WHERE m.run = ? AND m.ts >= ?",
                (run, min(e[4] for e in metrics)),
            )
        }
        return [e for e in events if e[0] != METRIC or (e[2], _point_value(e[3]), e[4], e[5]) not in held]

    def deliveries(
        self, server: str, runs: Iterable[str] | None = None, spilled_only: bool = False
    ) -> list[Delivery]:
        """Every run that ``server`` should get: runs logged offline (unless ``spilled_only``), and
        runs spilled from it."""
        offline = "r.origin IS NULL OR " if not spilled_only else ""
        rows = self._read(
            "SELECT r.id, r.uuid, r.name, r.experiment, r.status, r.start_time, r.end_time, "
            "d.server_run_id, coalesce(d.metric_mark, 0), coalesce(d.text_mark, 0), d.state, "
            "coalesce(d.artifact_mark, 0), r.origin "
            "FROM runs r LEFT JOIN deliveries d ON d.run = r.id AND d.server = ? "
            f"WHERE {offline}r.origin = ? ORDER BY r.id",
            (server, server),
        )
        wanted = None if runs is None else set(runs)
        found = [Delivery(*row) for row in rows if wanted is None or row[1] in wanted]
        return [self._with_held(d, server) for d in found] if self._held else found

    def _with_held(self, d: Delivery, server: str) -> Delivery:
        held = self._held.get((d.run, server))
        if held is None:
            return d
        return replace(
            d,
            metric_mark=max(d.metric_mark, held.metric_mark),
            text_mark=max(d.text_mark, held.text_mark),
            artifact_mark=max(d.artifact_mark, held.artifact_mark),
            state=held.state if held.state is not None else d.state,
        )

    @property
    def unrecorded(self) -> bool:
        """Some delivery progress is held in memory only: the file could not record it."""
        return bool(self._held)

    def _progress(self, run: int, server: str, **marks: int | str) -> None:
        """Record delivery progress of ``run`` to ``server``. When the file cannot take it (a full
        disk: SQLite says 'database or disk is full'), it is held in memory, where ``deliveries`` (and
        every reader built on it) sees it, so this process delivers each row once and goes on; it is
        written with the next progress that the file takes. What a process never writes, a later
        upload resends (the server stores a repeated point once; params and tags are the same)."""
        held = self._held.setdefault((run, server), _Held())
        for name, value in marks.items():
            if name == "state":
                held.state = str(value)
            else:
                setattr(held, name, max(int(getattr(held, name)), int(value)))
        self._save_held()

    def _save_held(self) -> bool:
        """Write the held progress to the file: whether it took it (then nothing is held)."""
        try:
            with self._write() as db:
                for (r, s), h in self._held.items():
                    db.execute(
                        "UPDATE deliveries SET metric_mark = max(metric_mark, ?), text_mark = "
                        "max(text_mark, ?), artifact_mark = max(artifact_mark, ?), state = "
                        "coalesce(?, state) WHERE run = ? AND server = ?",
                        (h.metric_mark, h.text_mark, h.artifact_mark, h.state, r, s),
                    )
        except (sqlite3.OperationalError, OSError):
            return False  # held; the caller goes on (``unrecorded`` says so)
        self._held.clear()
        return True

    def origins(self) -> list[str]:
        """Servers that have spilled runs in this journal."""
        return [r[0] for r in self._read("SELECT DISTINCT origin FROM runs WHERE origin IS NOT NULL")]

    def server_run_id(self, server: str, run_uuid: str) -> str | None:
        """The id ``server`` gave this journal's run ``run_uuid`` when it was synced (None: not yet)."""
        rows = self._read(
            "SELECT d.server_run_id FROM deliveries d JOIN runs r ON r.id = d.run "
            "WHERE r.uuid = ? AND d.server = ?",
            (run_uuid, server),
        )
        return rows[0][0] if rows else None

    def record_server_run(self, run: int, server: str, server_run_id: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO deliveries (run, server, server_run_id) VALUES (?, ?, ?)",
                (run, server, server_run_id),
            )

    def pending_counts(self, d: Delivery) -> tuple[int, int]:
        """(metric points, params, tags and artifacts) of run ``d`` not yet delivered."""
        metrics = self._read(
            "SELECT count(*) FROM metrics WHERE rowid > ? AND run = ?", (d.metric_mark, d.run)
        )
        texts = self._read("SELECT count(*) FROM texts WHERE id > ? AND run = ?", (d.text_mark, d.run))
        return metrics[0][0], texts[0][0] + self.pending_artifact_count(d)

    # -- artifacts -------------------------------------------------------------------------------

    @property
    def artifact_dir(self) -> Path:
        return self.path.parent / ARTIFACT_DIR

    def add_artifact(self, server: str | None, run_uuid: str, path: str, file: str, size: int) -> None:
        """Keep an artifact (its snapshot ``file`` under ``artifact_dir``) for run ``run_uuid``:
        a run on ``server``, or (``server`` None) a run of this journal's own (offline)."""
        if server is not None:
            self.spill(server, run_uuid, "", [])  # the run, as a run of that server
        run = self._run_id(run_uuid)
        with self._write() as db:
            db.execute(
                "INSERT INTO artifacts (run, path, file, size) VALUES (?, ?, ?, ?)", (run, path, file, size)
            )

    def pending_artifacts(self, d: Delivery) -> list[tuple[int, str, str, int]]:
        """(id, artifact path, snapshot file, size) of run ``d``'s artifacts past its mark, in order."""
        rows = self._read(
            "SELECT id, path, file, size FROM artifacts WHERE run = ? AND id > ? ORDER BY id",
            (d.run, d.artifact_mark),
        )
        return [tuple(r) for r in rows]

    def pending_artifact_count(self, d: Delivery) -> int:
        return int(
            self._read("SELECT count(*) FROM artifacts WHERE run = ? AND id > ?", (d.run, d.artifact_mark))[
                0
            ][0]
        )

    def pending_artifacts_for(self, server: str, run_uuid: str) -> int:
        return sum(self.pending_artifact_count(d) for d in self.deliveries(server, [run_uuid]))

    def advance_artifacts(self, run: int, server: str, mark: int) -> None:
        self._progress(run, server, artifact_mark=mark)

    def run_artifacts(self, run_uuid: str) -> list[tuple[str, str, int]]:
        """(artifact path, snapshot file, size) of every artifact of a run, for offline reads."""
        run = self._run_id(run_uuid)
        return [
            tuple(r)
            for r in self._read("SELECT path, file, size FROM artifacts WHERE run = ? ORDER BY id", (run,))
        ]

    def high_water(self) -> tuple[int, int]:
        """(largest metric rowid, largest text id) written so far: rows up to these exist now."""
        metric = self._read("SELECT max(rowid) FROM metrics")[0][0] or 0
        text = self._read("SELECT seq FROM sqlite_sequence WHERE name = 'texts'")
        return metric, (text[0][0] if text else 0)

    def pending_upto(self, server: str, runs: Iterable[str], upto: tuple[int, int]) -> int:
        """Rows of ``runs`` (uuids) up to ``upto`` (see ``high_water``) that ``server`` has not got."""
        left = 0
        for d in self.deliveries(server, runs):
            left += self._read(
                "SELECT count(*) FROM metrics WHERE rowid > ? AND rowid <= ? AND run = ?",
                (d.metric_mark, upto[0], d.run),
            )[0][0]
            left += self._read(
                "SELECT count(*) FROM texts WHERE id > ? AND id <= ? AND run = ?",
                (d.text_mark, upto[1], d.run),
            )[0][0]
            if d.wanted_state is not None and d.wanted_state != d.state:
                left += 1  # the run's end, still to be applied
        return left

    def pending_summary(self, server: str, runs: Iterable[str]) -> tuple[int, list[tuple[str, str]]]:
        """(events of ``runs`` ``server`` has not got, [(run uuid, status) of ends not applied])."""
        events, ends = 0, []
        for d in self.deliveries(server, runs):
            events += sum(self.pending_counts(d))
            if d.status is not None and d.wanted_state != d.state:
                ends.append((d.run_uuid, d.status))
        return events, ends

    def pending_texts(self, d: Delivery, run_id: str, upto: int | None = None) -> tuple[list[Event], int]:
        """Params and tags of run ``d`` past its mark (and at most ``upto``), as events of ``run_id``;
        and the new mark."""
        rows = self._read(
            "SELECT t.id, t.kind, k.name, t.value FROM texts t JOIN keys k ON k.id = t.key "
            "WHERE t.run = ? AND t.id > ? AND t.id <= ? ORDER BY t.id",
            (d.run, d.text_mark, _MAX_ID if upto is None else upto),
        )
        events = [(kind, run_id, name, value, 0, 0) for _, kind, name, value in rows]
        return events, (rows[-1][0] if rows else d.text_mark)

    def pending_metrics(
        self, run: int, mark: int, run_id: str, limit: int, upto: int | None = None
    ) -> tuple[list[Event], int]:
        """Up to ``limit`` metric points of ``run`` after rowid ``mark`` (and at most ``upto``), and
        the new mark."""
        rows = self._read(
            "SELECT rowid, key, value, ts, step FROM metrics WHERE rowid > ? AND rowid <= ? AND run = ? "
            "ORDER BY rowid LIMIT ?",
            (mark, _MAX_ID if upto is None else upto, run, limit),
        )
        if not rows:
            return [], mark
        names = self._key_names_by_id
        missing = {r[1] for r in rows} - names.keys()
        if missing:
            names.update(self._key_names(missing))
        events = [
            (METRIC, run_id, names[k], _NAN if v is None else v, ts, step) for _, k, v, ts, step in rows
        ]
        return events, rows[-1][0]

    def advance(self, run: int, server: str, metric_mark: int, text_mark: int) -> None:
        """Record that run ``run``'s rows up to these marks have reached ``server``."""
        self._progress(run, server, metric_mark=metric_mark, text_mark=text_mark)

    def record_state(self, run: int, server: str, state: str) -> None:
        self._progress(run, server, state=state)

    def set_spilled_status(self, run_uuid: str, status: str, end_time: int) -> None:
        """A spilled run's end, which the server did not get: ``tracklane sync`` sets it."""
        with self._write() as db:
            db.execute(
                "UPDATE runs SET status = ?, end_time = ? WHERE uuid = ? AND origin IS NOT NULL",
                (status, end_time, run_uuid),
            )


_MAX_ID = 2**63 - 1


class UploadLock:
    """One uploader at a time per journal and server, across processes (an ``flock`` on a file
    beside the journal; the kernel releases it when the holder dies, so a crash never leaves it)."""

    def __init__(self, journal_path: Path, server: str) -> None:
        digest = hashlib.sha256(server.encode()).hexdigest()[:16]
        self.path = journal_path.with_name(f"{journal_path.name}.upload-{digest}.lock")
        self._fd: int | None = None
        self._pid = 0

    def acquire(self, wait: bool = False) -> bool:
        """Take the lock; False if another process holds it (or, with ``wait``, block until free)."""
        if self.held:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._pid = fd, os.getpid()
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def release(self) -> None:
        if self._fd is not None:
            if self._pid == os.getpid():  # a forked child's copy is not its lock to drop
                with contextlib.suppress(OSError):
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _int_id(experiment_id: str) -> int:
    try:
        return int(experiment_id)
    except (TypeError, ValueError):
        raise NotFoundError(
            f"No experiment with id {experiment_id!r} in the journal: offline experiment ids are numbers.",
            status=404,
            error_code="RESOURCE_DOES_NOT_EXIST",
        ) from None


def _point_value(value: float | None) -> float | None:
    """A metric value as the journal stores it: NaN is NULL (SQLite's own rule)."""
    return None if value is None or value != value else value


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
