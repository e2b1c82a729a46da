"""Sending a journal run's undelivered rows to a server: shared by the engine's uploader and
``tracklane sync``.

Rows go in journal order (params and tags, then metric points by rowid), cut by ``batching.pack``
into log-batch requests and sent by the outcome rule (``outcome.deliver``). The journal's delivery
mark moves after every request, in order, so an interrupted upload resumes where it stopped and
resends at most the requests that were in flight; the server stores a repeated metric point (same
key, value, timestamp, step) once, and a repeated param or tag is a no-op, so that resend cannot
duplicate anything. Callers hold the journal's ``UploadLock`` for the server, so two uploaders never
interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from pathlib import Path
from typing import Protocol

from .._artifacts.paths import UnsafePathError, inside
from .._exceptions import AuthenticationError, ConfigurationError, ServerError
from .._limits import MAX_METRICS_PER_BATCH
from .._stores.journal import Delivery, Journal
from .._wire.batching import ARTIFACT, TAG, Batch, Event, pack
from .._wire.outcome import BatchTarget, OnRejected, OnSent, deliver


class Uploader(BatchTarget, Protocol):
    """What an upload needs from a store: log-batch by the outcome rule, artifacts, and ending the run."""

    async def update_run(self, run_id: str, status: str, end_time: int | None) -> object: ...
    async def put_artifact(self, run_id: str, path: str, file: Path) -> None: ...


async def upload_run(
    journal: Journal,
    target: Uploader,
    delivery: Delivery,
    server: str,
    *,
    on_sent: OnSent,
    on_rejected: OnRejected,
    upto: tuple[int, int] | None = None,
    in_flight: int = 2,
) -> None:
    """Deliver run ``delivery``'s pending rows (up to ``upto``, see ``Journal.high_water``) to its
    server run, then its artifacts, then its status and end time.

    Raises ServerUnavailableError when the server stops answering and AuthenticationError when it
    refuses the credentials; the marks keep what got there.
    """
    d = delivery
    assert d.server_run_id is not None, "map the run to a server run first"
    run_id = d.server_run_id

    events, text_mark = await journal.call(journal.pending_texts, d, run_id, upto and upto[1])
    events = await _server_parent_ids(journal, server, events)
    if events:
        for batch in pack(events):  # texts in order, one request at a time: the last value wins
            await deliver(batch, target, on_sent, on_rejected)
        await journal.call(journal.advance, d.run, server, 0, text_mark)

    # Metric points: up to ``in_flight`` requests at once (the server's ceiling needs two), with the
    # mark moved only past requests that, and all before them, are done.
    sending: deque[tuple[asyncio.Task[None], int]] = deque()
    mark = d.metric_mark
    try:
        while True:
            events, new_mark = await journal.call(
                journal.pending_metrics, d.run, mark, run_id, MAX_METRICS_PER_BATCH, upto and upto[0]
            )
            if not events:
                break
            task = asyncio.ensure_future(_send_all(list(pack(events)), target, on_sent, on_rejected))
            sending.append((task, new_mark))
            mark = new_mark
            while len(sending) >= in_flight:
                await _settle_first(journal, sending, d.run, server)
        while sending:
            await _settle_first(journal, sending, d.run, server)
    finally:
        for task, _ in sending:
            task.cancel()
    await upload_artifacts(journal, target, d, server, on_sent=on_sent, on_rejected=on_rejected)
    wanted = d.wanted_state
    if wanted is not None and wanted != d.state and d.status is not None:
        await target.update_run(run_id, d.status, d.end_time)
        await journal.call(journal.record_state, d.run, server, wanted)


#: MLflow's tag naming a nested run's parent (``mlflow.parentRunId``).
PARENT_RUN_TAG = "mlflow.parentRunId"


async def _server_parent_ids(journal: Journal, server: str, events: list[Event]) -> list[Event]:
    """An offline child run names its parent by the journal's id: on the server, the parent has the
    id the server gave it when it was synced (parents are created first, in journal order)."""
    out = []
    for e in events:
        if e[0] == TAG and e[2] == PARENT_RUN_TAG:
            mapped = await journal.call(journal.server_run_id, server, e[3])
            if mapped is not None:
                e = (e[0], e[1], e[2], mapped, e[4], e[5])
        out.append(e)
    return out


async def upload_artifacts(
    journal: Journal,
    target: Uploader,
    d: Delivery,
    server: str,
    *,
    on_sent: OnSent,
    on_rejected: OnRejected,
) -> None:
    """Upload run ``d``'s pending artifacts, one at a time in the order they were logged (the mark
    moves past each). A refused one (the server says no, or does not proxy artifacts) is reported
    and passed; its snapshot stays in the journal's artifact area. A spilled run's snapshots are
    deleted once uploaded; an offline run's stay with it (it may be synced elsewhere again)."""
    assert d.server_run_id is not None
    for artifact_id, path, file, size in await journal.call(journal.pending_artifacts, d):
        try:
            snapshot = inside(journal.artifact_dir, file, "artifact snapshot named by the journal")
            await target.put_artifact(d.server_run_id, path, snapshot)
        except (ServerError, ConfigurationError, FileNotFoundError, UnsafePathError) as exc:
            if isinstance(exc, AuthenticationError):
                raise
            on_rejected([(ARTIFACT, d.server_run_id, path, size, 0, 0)], str(exc))
        else:
            on_sent(1)
            if d.origin is not None:
                with contextlib.suppress(OSError):
                    (journal.artifact_dir / file).unlink()
        await journal.call(journal.advance_artifacts, d.run, server, artifact_id)


async def _send_all(
    batches: list[Batch], target: BatchTarget, on_sent: OnSent, on_rejected: OnRejected
) -> None:
    for batch in batches:
        await deliver(batch, target, on_sent, on_rejected)


async def _settle_first(
    journal: Journal, sending: deque[tuple[asyncio.Task[None], int]], run: int, server: str
) -> None:
    task, mark = sending[0]
    await task  # raises what delivery raised; later requests are cancelled by the caller
    sending.popleft()
    await journal.call(journal.advance, run, server, mark, 0)
