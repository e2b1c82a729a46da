"""Sending a journal run's undelivered rows to a server: shared by outage replay and ``tracklane sync``.

Rows go in journal order (params and tags, then metric points by rowid), cut by ``_batching.pack``
into log-batch requests, and the journal's delivery mark moves after every request. So an
interrupted upload resumes where it stopped and resends at most the request that was in flight;
the server stores a repeated metric point (same key, value, timestamp, step) once, and a repeated
param or tag is a no-op, so that resend cannot duplicate anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from .._delivery.batching import Batch, Event, pack
from .._exceptions import NotFoundError, ServerError
from .._limits import MAX_METRICS_PER_BATCH
from .._stores.journal import Delivery, Journal

#: (events, reason) of rows the server refused; they are skipped, not retried.
OnRejected = Callable[[list[Event], str], None]
#: How many events just reached the server.
OnSent = Callable[[int], None]


class Sender(Protocol):
    """The part of ``RestBackend`` an upload needs."""

    async def log_batch(self, batch: Batch, deadline: float | None = None) -> None: ...
    async def update_run(self, run_id: str, status: str, end_time: int | None) -> None: ...


async def upload_run(
    journal: Journal,
    sender: Sender,
    delivery: Delivery,
    server: str,
    *,
    on_sent: OnSent,
    on_rejected: OnRejected,
    attempt_timeout: float | None = None,
) -> None:
    """Deliver run ``delivery``'s pending rows to its server run, then its status and end time.

    ``attempt_timeout`` bounds each request (the outage probe); None uses the retry window.
    Raises ServerUnavailableError when the server stops answering; the marks keep what got there.
    """
    d = delivery
    assert d.server_run_id is not None, "map the run to a server run first"
    run_id = d.server_run_id

    async def send(batch: Batch) -> None:
        deadline = None if attempt_timeout is None else time.monotonic() + attempt_timeout
        await _send(sender, batch, deadline, on_rejected)
        on_sent(len(batch))

    events, text_mark = await journal.call(journal.pending_texts, d, run_id)
    if events:
        for batch in pack(events):
            await send(batch)
        await journal.call(journal.advance, d.run, server, 0, text_mark)
    mark = d.metric_mark
    while True:
        events, new_mark = await journal.call(
            journal.pending_metrics, d.run, mark, run_id, MAX_METRICS_PER_BATCH
        )
        if not events:
            break
        for batch in pack(events):
            await send(batch)
        await journal.call(journal.advance, d.run, server, new_mark, 0)
        mark = new_mark
    wanted = d.wanted_state
    if wanted is not None and wanted != d.state and d.status is not None:
        await sender.update_run(run_id, d.status, d.end_time)
        await journal.call(journal.record_state, d.run, server, wanted)


async def _send(sender: Sender, batch: Batch, deadline: float | None, on_rejected: OnRejected) -> None:
    # A 400 refuses the whole request: bisect to find the refused rows and deliver the rest,
    # as the engine does online.
    try:
        await sender.log_batch(batch, deadline)
    except ServerError as exc:
        if len(batch) == 1 or isinstance(exc, NotFoundError) or "deleted" in str(exc):
            on_rejected(batch.events(), str(exc))
            return
        first, second = batch.halves()
        await _send(sender, first, deadline, on_rejected)
        await _send(sender, second, deadline, on_rejected)
