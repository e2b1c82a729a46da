"""Offline mode: the engine's ``Backend`` on the local journal instead of a tracking server.

The engine cannot tell the difference: the same batches arrive, experiments and runs get ids, and
reads (``get_run``, ``get_metric_history``, resume by name, attach by id) answer as a server would.
Every SQLite call runs on the journal's own thread (``JournalThread``), so the event loop the engine
lives on (possibly the user's own) never waits on the disk; the engine hands over whole batches,
so that costs one thread hop per batch, not per event.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._entities import Experiment, Metric, Run
from .._exceptions import ConfigurationError, NotFoundError, ServerError
from .._settings import ServerConfig, offline_mode_setting
from .._wire.batching import Batch, Event
from .event_log import recover_and_say
from .journal import Journal
from .leftovers import keep_leftovers

if TYPE_CHECKING:
    from .._wire.run_end import RunEnd

logger = logging.getLogger("tracklane")


def offline_backend(
    offline_mode: bool | None, server: ServerConfig | None, path_to_storage: str | None
) -> JournalBackend | None:
    """The journal backend when the client should log offline, else None (log to ``server``).

    Offline when asked (``offline_mode=True`` or ``$OIP_OFFLINE_MODE`` truthy), and by default when
    no server is configured at all; then it says so once, with the command that uploads later.
    """
    offline_mode = offline_mode_setting(offline_mode)
    if offline_mode is False or (offline_mode is None and server is not None):
        return None
    storage = path_to_storage or "."
    backend = JournalBackend(Journal.at(storage))
    if not offline_mode:
        logger.warning(
            "tracklane: no tracking server configured (api_host= or OIP_TRACKING_SERVER), so runs are "
            "logged offline to %s. Look at them in MLflow's web UI with: tracklane ui %s ; upload "
            "them to a server later with: tracklane sync %s --to URL",
            backend.journal.path.parent.resolve(),
            storage,
            storage,
        )
    return backend


def _needs_server(what: str) -> ConfigurationError:
    return ConfigurationError(
        f"{what} needs a tracking server; this client logs offline to the local journal. Upload it "
        "with `tracklane sync DIR --to URL` (or browse it with `tracklane ui DIR`) and use the server."
    )


class JournalBackend:
    """Experiments, runs and events stored in a ``Journal``, for ``TrackingClient(offline_mode=True)``."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.workspace_id: str | None = None  # offline, every workspace is the same local one
        self.retries = 0  # nothing to retry: the disk answers

    def __repr__(self) -> str:
        return f"JournalBackend({str(self.journal.path)!r})"

    @property
    def log_directory(self) -> Path:
        """Where this client's event log lives: beside the journal, so the next client on it, or
        ``tracklane sync``/``ui``, adds what a killed process had accepted to its runs."""
        return self.journal.path.parent.absolute()

    async def recover_dead_logs(self, own: frozenset[str]) -> int:
        """Move the event logs of dead processes beside the journal into it (on the journal's
        thread); how many events. A failure is logged, never raised."""
        journal = self.journal
        return await journal.call(recover_and_say, self.log_directory, lambda: journal, own, journal.path)

    @property
    def describe(self) -> str:
        return f"the local journal {self.journal.path}"

    async def get_experiment_by_name(self, name: str) -> Experiment | None:
        return await self.journal.call(self.journal.get_experiment_by_name, name)

    async def get_experiment(self, experiment_id: str) -> Experiment:
        return await self.journal.call(self.journal.get_experiment, experiment_id)

    async def create_experiment(
        self, name: str, tags: Mapping[str, str], artifact_location: str | None = None
    ) -> str:
        return await self.journal.call(self.journal.create_experiment, name, tags)

    async def delete_experiment(self, experiment_id: str) -> None:
        await self.journal.call(self.journal.delete_experiment, experiment_id)

    async def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        await self.journal.call(self.journal.set_experiment_tag, experiment_id, key, value)

    async def create_run(
        self,
        experiment_id: str,
        run_name: str,
        start_time: int,
        tags: Mapping[str, str],
        user_id: str | None = None,
    ) -> Run:
        return await self.journal.call(self.journal.create_run, experiment_id, run_name, start_time, tags)

    async def get_run(self, run_id: str) -> Run:
        return await self.journal.call(self.journal.get_run, run_id)

    async def search_runs_by_name(self, experiment_id: str, run_name: str) -> list[Run]:
        return await self.journal.call(self.journal.search_runs_by_name, experiment_id, run_name)

    async def update_run(
        self, run_id: str, status: str | None, end_time: int | None, run_name: str | None = None
    ) -> None:
        if run_name is not None:
            raise _needs_server("renaming a run")
        if status is None:
            status = (await self.get_run(run_id)).info.status
        await self.journal.call(self.journal.update_run, run_id, status, end_time)

    # What the journal does not answer offline: searching and restoring belong to a server.

    async def search_experiments(self, *args: Any) -> tuple[list[Experiment], str | None]:
        raise _needs_server("search_experiments")

    async def put_artifact(self, run_id: str, path: str, file: Path) -> None:
        raise _needs_server("uploading an artifact")  # offline, artifacts stay in the journal

    async def delete_experiment_tag(self, experiment_id: str, key: str) -> None:
        raise _needs_server("delete_experiment_tag")

    async def rename_experiment(self, experiment_id: str, new_name: str) -> None:
        raise _needs_server("rename_experiment")

    async def restore_experiment(self, experiment_id: str) -> None:
        raise _needs_server("restore_experiment")

    async def search_runs(self, *args: Any) -> tuple[list[Run], str | None]:
        raise _needs_server("search_runs")

    async def delete_run(self, run_id: str) -> None:
        raise _needs_server("delete_run")

    async def restore_run(self, run_id: str) -> None:
        raise _needs_server("restore_run")

    async def delete_tag(self, run_id: str, key: str) -> None:
        raise _needs_server("delete_tag")

    async def log_batch(self, batch: Batch, body: bytes, once: bool = False) -> None:
        """Store one batch in one transaction; a param that changes value refuses the whole batch
        with the server's 400, so the engine isolates it exactly as it does online, and so does a
        value SQLite will not store."""
        try:
            await self.journal.call(self.journal.write_events, batch.run_id, batch.events(), batch.seq)
        except (ServerError, OSError, sqlite3.OperationalError):
            raise
        except Exception as exc:
            raise ServerError(
                f"cannot be stored in the journal ({type(exc).__name__}: {exc})", status=400
            ) from None

    async def run_is_open(self, run_id: str) -> bool:
        try:
            run = await self.get_run(run_id)
        except NotFoundError:
            return False
        return run.info.lifecycle_stage != "deleted"

    def keep_now(self, events: list[Event], ends: list[RunEnd]) -> int:
        """Blocking: store leftovers when no event loop is left (interpreter exit)."""
        return keep_leftovers(
            events,
            ends,
            self.journal.write_events,
            lambda end: self.journal.update_run(end.run_id, end.status, end.end_time),
        )

    def after_fork(self) -> None:
        """Nothing to forget: the journal reconnects by itself in a forked child."""

    @property
    def mlflow_ui_url(self) -> str | None:
        return None  # offline: `tracklane ui` serves it later

    def ui_links(self, run: Run) -> tuple[str, str] | None:
        return None  # offline: no web UI to point at

    async def check_platform(self) -> str | None:
        return None

    async def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        return await self.journal.call(self.journal.metric_history, run_id, key)

    async def aclose(self) -> None:
        await self.journal.call(self.journal.close)
