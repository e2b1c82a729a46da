"""What both client faces share: turning arguments into a store, an engine and a run model that
holds it, and views of the run model's context.

Like httpx's ``BaseClient``: the faces add only how they wait (a loop thread for
``TrackingClient``, the caller's loop for ``AsyncTrackingClient``).
"""

from __future__ import annotations

import logging
from typing import Generic, TypeVar

from .._delivery.artifacts import ArtifactLog
from .._delivery.buffer import Buffer
from .._delivery.engine import Engine
from .._entities import ActiveRun, Run
from .._exceptions import ConfigurationError, NoActiveRunError
from .._runs.lifecycle import OicmRuns
from .._runs.ranks import PrefixedMetrics, Silent
from .._settings import (
    EngineConfig,
    ServerConfig,
    check_rank_logging,
    job_ranks,
    overflow_setting,
    resolve_server,
)
from .._stores.offline import JournalBackend, offline_backend
from .session import Store, build_engine, destination_key

logger = logging.getLogger("tracklane")
RunT = TypeVar("RunT", bound=ActiveRun)


class ClientBase(Generic[RunT]):
    """Settings to engine; see ``TrackingClient`` for what each argument means."""

    def __init__(
        self,
        api_host: str | None = None,
        api_key: str | None = None,
        path_to_storage: str | None = None,
        offline_mode: bool | None = None,
        *,
        verify_ssl: bool = True,
        max_buffer: int = 100_000,
        overflow: str | None = None,
        block_timeout: float | None = 10.0,
        flush_interval: float = 0.5,
        retry_window: float = 30.0,
        exit_timeout: float = 10.0,
        request_timeout: float = 30.0,
        system_metrics_interval: float | None = None,
        hide_host: bool = False,
        rank_logging: str = "all",
    ) -> None:
        server = resolve_server(
            api_host, api_key, verify_ssl=verify_ssl, request_timeout=request_timeout, hide_host=hide_host
        )
        journal = offline_backend(offline_mode, server, path_to_storage)  # None: log to the server
        if server is None and journal is None:
            raise ConfigurationError(
                "No tracking server: pass api_host= (e.g. 'http://127.0.0.1:5000') or set "
                "OIP_TRACKING_SERVER, or log offline with offline_mode=True."
            )
        if not verify_ssl:
            logger.warning(
                "tracklane: TLS certificate verification is off (verify_ssl=False); use this only "
                "with a server you trust on a network you trust."
            )
        config = EngineConfig(
            max_buffer=max_buffer,
            overflow=overflow_setting(overflow),
            block_timeout=block_timeout,
            flush_interval=flush_interval,
            retry_window=retry_window,
            exit_timeout=exit_timeout,
            journal_dir=path_to_storage,
            system_metrics_interval=system_metrics_interval,
        )
        ranks = job_ranks()
        mode = check_rank_logging(rank_logging)
        self._destination = destination_key(server if journal is None else None, path_to_storage)
        self._engine, self._store = self._engine_for(server, journal, config, path_to_storage)
        self._runs = OicmRuns(self._engine, self._store, config, ranks)
        self._artifacts = ArtifactLog(
            self._engine, self._store.journal if isinstance(self._store, JournalBackend) else None
        )
        self._buffer: Buffer | PrefixedMetrics | Silent = self._engine.buffer
        if ranks.distributed and mode == "prefixed":
            self._buffer = PrefixedMetrics(self._engine.buffer, ranks.rank)
        elif ranks.distributed and mode == "zero_only" and not ranks.leader:
            self._buffer = Silent()
        self._start()

    def _engine_for(
        self,
        server: ServerConfig | None,
        journal: JournalBackend | None,
        config: EngineConfig,
        storage: str | None,
    ) -> tuple[Engine, Store]:
        """A new engine of the face's own (a face may join a shared one instead)."""
        return build_engine(server, journal, config, storage)

    def _start(self) -> None:
        """What a face does once its engine exists (start a loop thread, check settings)."""

    def _wrap(self, run: Run) -> RunT:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._engine.backend.describe!r})"

    def active_run(self) -> RunT | None:
        """The active run, or None."""
        run = self._runs.active
        return None if run is None else self._wrap(run)

    def last_active_run(self) -> RunT | None:
        """The active run, else the run most recently ended by this client, else None."""
        run = self._runs.active or self._runs.last_run
        return None if run is None else self._wrap(run)

    def _active_run_id(self) -> str:
        run_id = self._runs.run_id
        if run_id is None:
            raise NoActiveRunError(
                "No active run: call start_run() first, e.g. `with tc.start_run(run_name=...):`."
            )
        return run_id

    def stats(self) -> dict[str, float]:
        """Counters of the client's own work: enqueued, delivered, spilled (in the journal, to be
        delivered from there), dropped, rejected, resumed (left by earlier processes, delivered by
        this one), retries, in-flight requests and events, buffer depth, oldest undelivered event's
        age (s)."""
        return self._engine.stats()
