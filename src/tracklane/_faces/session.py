"""One engine per process and destination, shared by the synchronous faces.

A ``TrackingClient``, ``MlflowClient`` objects and the ``tracklane.mlflow`` module logging to the same
server from one program batch together: they hold one ``Session`` (an engine, the store its run
models call, and the loop thread that runs it) instead of one worker each. The session lives until
the last holder that can close lets go, or until interpreter exit, when every run model holding it
ends its active runs before the engine delivers what is left (see ``_runtime.process``).

Two ``TrackingClient`` objects never share a session: each keeps the settings it was built with. An
MLflow face joins whatever session is registered for its destination (its settings are the
defaults), and a ``TrackingClient`` joins one an MLflow face made if it asks for the same settings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from .._delivery.artifacts import ArtifactLog
from .._delivery.engine import Engine
from .._delivery.spool import Spool
from .._runtime.process import RunModel, SyncRuntime
from .._settings import EngineConfig, ServerConfig
from .._stores.mlflow_sql import MlflowSqlBackend
from .._stores.offline import JournalBackend, offline_backend
from .._stores.rest import RestBackend

T = TypeVar("T")
Store = RestBackend | JournalBackend | MlflowSqlBackend


def build_engine(
    server: ServerConfig | None, journal: JournalBackend | None, config: EngineConfig, storage: str | None
) -> tuple[Engine, Store]:
    """An engine and the store its run models call: the journal when offline, else the server (with
    the journal as the engine's disk)."""
    if journal is not None:
        return Engine(journal, config, spool=None), journal
    assert server is not None
    rest = RestBackend(server, retry_window=config.retry_window)
    return Engine(rest, config, spool=Spool(storage, rest)), rest


def destination_key(server: ServerConfig | None, storage: str | None, database: str | None = None) -> str:
    """Offline, the journal's directory names the destination; else the server (or the database)."""
    if database is not None:
        return f"database:{database}"
    if server is None:
        return f"journal:{Path(storage or '.').resolve()}"
    return f"server:{server.api_host}"


class Session:
    """An engine, its store and its loop thread, held by one or more faces."""

    def __init__(self, key: str, engine: Engine, store: Store, models: list[RunModel] | None = None) -> None:
        self.key = key
        self.engine = engine
        self.store = store
        self.models: list[RunModel] = list(models or ())
        self.runtime = SyncRuntime(engine, self.models)
        self.artifacts = ArtifactLog(engine, store.journal if isinstance(store, JournalBackend) else None)
        self.holders = 1
        self.from_mlflow_face = False

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None, what: str = "") -> T:
        """Run ``coro`` on the engine's loop and wait for it (at most ``timeout`` s); a long wait
        logs progress lines naming ``what`` (see ``SyncRuntime.call``)."""
        return self.runtime.call(coro, timeout, what)

    def hold(self, model: RunModel | None) -> None:
        with _lock:
            self.holders += 1
            if model is not None:
                self.models.append(model)

    def release(self, model: RunModel | None, status: str, timeout: float | None) -> int:
        """A holder lets go: the last one shuts the engine down (see ``SyncRuntime.shutdown``);
        otherwise only ``model``'s active run ends (its events delivered, as ``end_run`` does).
        Returns how many events could not even be kept."""
        with _lock:
            self.holders -= 1
            last = self.holders <= 0
            if last and _shared.get(self.key) is self:
                del _shared[self.key]
        if last:
            return self.runtime.shutdown(timeout, status)
        if model is not None and not self.runtime.closed:
            deadline = None if timeout is None else _deadline(timeout)
            self.runtime.call(model.end_active(status, deadline), what="close")
            with _lock:
                if model in self.models:
                    self.models.remove(model)
        return 0


_lock = threading.RLock()
_shared: dict[str, Session] = {}
#: What else holds process-wide state of the MLflow faces (the fluent API), cleared by ``reset``.
_reset_hooks: list[Callable[[], None]] = []


def _deadline(timeout: float) -> float:
    return time.monotonic() + timeout


def register(session: Session) -> None:
    """Make ``session`` the one MLflow faces for its destination join (unless one is already)."""
    with _lock:
        current = _shared.get(session.key)
        if current is None or current.runtime.closed:
            _shared[session.key] = session


def joinable(key: str, config: EngineConfig, server: ServerConfig | None) -> Session | None:
    """A session an MLflow face made for ``key`` with these settings (engine bounds, and the same
    credentials and TLS settings), for a ``TrackingClient``."""
    with _lock:
        session = _shared.get(key)
        if session is None or session.runtime.closed or not session.from_mlflow_face:
            return None
        if session.engine.config != config:
            return None
        if server is not None and (
            not isinstance(session.store, RestBackend) or session.store.config != server
        ):
            return None
        session.holders += 1
        return session


def shared_session(server: ServerConfig | None, storage: str | None, database: str | None = None) -> Session:
    """The session for this destination (a server, MLflow's database store, or offline the journal
    under ``storage``), made with default settings if there is none yet."""
    key = destination_key(server, storage, database)
    with _lock:
        session = _shared.get(key)
        if session is not None and not session.runtime.closed:
            session.holders += 1
            return session
        store: Store
        if database is not None:
            # The journal in front of the database as in front of a server: artifacts are snapshot
            # there, and events wait there while the database is away (a PostgreSQL restart).
            sql = MlflowSqlBackend(database)
            engine, store = Engine(sql, EngineConfig(journal_dir=storage), spool=Spool(storage, sql)), sql
        else:
            journal = offline_backend(True, None, storage) if server is None else None
            engine, store = build_engine(server, journal, EngineConfig(journal_dir=storage), storage)
        session = Session(key, engine, store)
        session.from_mlflow_face = True
        _shared[key] = session
        return session


def on_reset(hook: Callable[[], None]) -> None:
    """Have ``reset`` call ``hook``: the fluent API clears its state there."""
    with _lock:
        _reset_hooks.append(hook)


def reset(timeout: float = 10.0) -> None:
    """Forget what the MLflow faces share in this process, as in a fresh interpreter: shut down every
    session they made (at most ``timeout`` s each) and clear the fluent API's state.

    For tests, so that each starts with no engine another test's ``MlflowClient`` or
    ``tracklane.mlflow`` left (they live for the process, as MLflow's do). A ``TrackingClient``'s own
    session is left alone: its holder closes it.
    """
    with _lock:
        left = [s for s in _shared.values() if s.from_mlflow_face]
        for s in left:
            del _shared[s.key]
        hooks = list(_reset_hooks)
    for s in left:
        s.runtime.shutdown(timeout)
    for hook in hooks:
        hook()
