"""Events logged after the exit flush: kept in the journal, never lost behind a traceback.

An ``atexit`` handler registered before tracklane's runs after it (handlers run last-registered
first): a training script's "save the final metrics" hook, or a framework's, logs to a run the exit
has just ended, with no loop thread left to deliver anything. Such events are kept as a late
client of the same run would want them: each one written at once to the local journal (a disk
write, bounded; there is no later moment to write them at), under the run it was logged to, and
delivered to that run by the next client on this storage or ``tracklane sync`` (MLflow takes data
into an ended run). One line says so, with the command. If the journal cannot be written, one line
says they are lost, and they are counted in ``stats()["dropped"]``.
"""

from __future__ import annotations

import logging

from .._delivery.engine import Engine

logger = logging.getLogger("tracklane")


class LateKeeper:
    """Takes over the engine's buffer once the exit flush is done (``install``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.kept = 0
        self.broken = False

    def install(self) -> None:
        """From now on every event appended to the buffer is journaled by the logging call itself:
        the buffer's wake-up (``notify``), called once per event, is this keeper."""
        buffer = self.engine.buffer
        buffer.notify = self.keep
        buffer.wake_at = 1
        self.keep()  # anything logged between the shutdown's last look and now

    def keep(self) -> None:
        """Journal what the buffer holds; called on the logging thread, inside the logging call."""
        buffer = self.engine.buffer
        buffer.take(0)  # re-arms the wake-up for the next event (it fires once per take)
        waiting = len(buffer)
        if not waiting:
            return
        if self.broken:
            buffer.dropped += waiting
            buffer.clear()
            return
        lost = self.engine.keep_now([])
        if lost:
            self.broken = True
            buffer.dropped += lost
            buffer.clear()
            logger.error(
                "tracklane: %d event(s) logged after the exit flush could not be kept in the local "
                "journal and are lost (counted as dropped); log before the interpreter exits, or end "
                "the run yourself before it does.",
                lost,
            )
            return
        if not self.kept:
            logger.warning("tracklane: %s", self.notice())
        self.kept += waiting

    def notice(self) -> str:
        spool = self.engine.spool
        if spool is None:
            return (
                f"events logged after the exit flush are kept in {self.engine.backend.describe}, "
                "for `tracklane sync` or the next client on this storage."
            )
        return (
            f"events logged after the exit flush (from an atexit handler that runs after "
            f"tracklane's) are kept in {spool.path}; the next client on this storage delivers them "
            f"to their run, or: {spool.sync_command()}"
        )
