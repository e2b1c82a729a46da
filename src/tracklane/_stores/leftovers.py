"""What a store does with the engine's leftovers at interpreter exit, when no event loop is left:
write each run's events, then each run end, straight away. Shared by the stores that can keep them
(the offline journal, MLflow's SQL store); a failure is logged and counted, never raised."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .._wire.batching import Event
from .._wire.run_end import RunEnd

logger = logging.getLogger("tracklane")


def keep_leftovers(
    events: list[Event],
    ends: list[RunEnd],
    write_events: Callable[[str, list[Event]], object],
    write_end: Callable[[RunEnd], object],
) -> int:
    """Write ``events`` run by run and then ``ends``; the number of events that could not be kept."""
    lost = 0
    per_run: dict[str, list[Event]] = {}
    for e in events:
        per_run.setdefault(e[1], []).append(e)
    for run_id, run_events in per_run.items():
        try:
            write_events(run_id, run_events)
        except Exception as exc:
            logger.error("tracklane: could not keep %d event(s) of run %s: %s", len(run_events), run_id, exc)
            lost += len(run_events)
    for end in ends:
        try:
            write_end(end)
        except Exception as exc:
            logger.error("tracklane: could not record the end of run %s: %s", end.run_id, exc)
    return lost
