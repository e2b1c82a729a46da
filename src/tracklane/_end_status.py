"""The status a run ends with when no one names it: the one rule, for every way a run can end.

A ``with start_run()`` block left by an exception, an interpreter exiting of one, SIGTERM, a
framework reporting that training did not complete: each face, the process glue and the
integrations ask ``end_status`` instead of deciding for themselves, so a run ends the same way
whichever face started it. An explicit ``end_run(status)`` is the caller's own choice and is not
decided here.
"""

from __future__ import annotations

import asyncio
import sys

#: Exceptions that mean the run was stopped from outside rather than that it failed: Ctrl-C, and a
#: task cancelled (an ``asyncio`` shutdown). A framework's own (Lightning's SIGTERMException) is
#: given by its integration as ``killed_by``.
STOPPED_BY: tuple[type[BaseException], ...] = (KeyboardInterrupt, asyncio.CancelledError)


def end_status(
    exc: BaseException | type[BaseException] | None = None,
    *,
    signal: bool = False,
    failed: bool = False,
    killed_by: tuple[type[BaseException], ...] = (),
) -> str:
    """FINISHED, FAILED or KILLED, by how the run's block, process or owner ended.

    ``signal``: the process is ending on SIGTERM (KILLED). ``exc``, an exception or its type, ended
    the block or is ending the process: KILLED for Ctrl-C, a cancelled task or one of ``killed_by``,
    FAILED for any other. ``failed``: the run's owner says it did not complete (a Trainer whose
    ``train()`` never returned, Lightning's ``finalize("failed")``): FAILED, or KILLED when ``exc``
    says it was stopped. Otherwise FINISHED.
    """
    if signal:
        return "KILLED"
    kind = exc if isinstance(exc, type) or exc is None else type(exc)
    if kind is not None:
        return "KILLED" if issubclass(kind, STOPPED_BY + killed_by) else "FAILED"
    return "FAILED" if failed else "FINISHED"


def exit_status_of_process(*, failed: bool = False) -> str:
    """``end_status`` of a run still active at interpreter exit: by the uncaught exception the
    interpreter is exiting of, if any (``sys.last_exc``, ``sys.last_value`` before Python 3.12)."""
    dying = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return end_status(dying if isinstance(dying, BaseException) else None, failed=failed)
