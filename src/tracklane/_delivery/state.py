"""What the engine's parts share: one ``State`` per process, and the mode it delivers in.

``fresh_state`` builds it, and both ``Engine.__init__`` and ``Engine.reset_after_fork`` call it, so a
forked child forgets every piece of its parent's delivery by construction (OpenTelemetry's
``_at_fork_reinit`` shape) rather than by a list of fields someone must keep complete.

The mode (one field, not a set of flags):

=========  ================================================  ===========================================
mode       where new events go                               left when
=========  ================================================  ===========================================
SENDING    the hand, then the server (by the outcome rule)   a request cannot be delivered in the retry
                                                             window (outage), the producer outruns the
                                                             server (``overflow="spill"``), or a run's
                                                             end is given up on: SPOOLING
SPOOLING   the journal; the uploader delivers it in order    the uploader has delivered every row of
                                                             this engine's and nothing is being
                                                             written: SENDING
BLOCKED    the journal only; nothing is sent                 never, in this process: the server refused
                                                             the credentials (``tracklane sync`` later)
=========  ================================================  ===========================================

Beside the mode, two flags that only report: ``outage`` (a request failed for want of a server: say
so once it is over) and ``closing`` (``shutdown`` has begun: a cancelled task is expected).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .._exceptions import AuthenticationError, RejectedEvent
from .._settings import EngineConfig
from .._wire.batching import KIND_NAMES, Batch, Event
from .._wire.outcome import BatchTarget
from .._wire.run_end import RunEnd
from .spool import Spool

logger = logging.getLogger("tracklane")

Marker = asyncio.Future[None]


class Backend(BatchTarget, Protocol):
    """Everything the engine calls on a store (a tracking server, or the local journal)."""

    @property
    def describe(self) -> str: ...
    @property
    def retries(self) -> int: ...
    async def update_run(self, run_id: str, status: str, end_time: int | None) -> object: ...
    async def put_artifact(self, run_id: str, path: str, file: Path) -> None: ...
    async def aclose(self) -> None: ...
    def after_fork(self) -> None: ...
    def keep_now(self, events: list[Event], ends: list[RunEnd]) -> int | None:
        """Store events and run ends synchronously, with no event loop (interpreter exit); the
        number not kept, or None when this store cannot (the engine's journal keeps them)."""
        ...


class Mode(enum.Enum):
    """Where new events go; see the module docstring for the transitions."""

    SENDING = "sending"
    SPOOLING = "spooling"
    BLOCKED = "blocked"


@dataclass(eq=False)
class Signals:
    """The events the parts wake each other with; made on the loop the engine attaches to."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)  # the taker: events wait in the buffer
    hand_ready: asyncio.Event = field(default_factory=asyncio.Event)  # the sender: the hand changed
    giving_up: asyncio.Event = field(default_factory=asyncio.Event)  # waits: stop waiting (Ctrl-C)
    retry_now: asyncio.Event = field(default_factory=asyncio.Event)  # the uploader: stop backing off
    journal_moved: asyncio.Event = field(default_factory=asyncio.Event)  # journal rows got settled
    flush_began: asyncio.Event = field(default_factory=asyncio.Event)  # a batch kept in memory retries
    hand_moved: asyncio.Event = field(default_factory=asyncio.Event)  # the sender tried the journal


@dataclass(eq=False)
class State:
    """One process's delivery: what the worker holds, the mode, the waits, the counters."""

    config: EngineConfig
    spool: Spool | None  # None: the backend is the journal itself (offline)
    #: Events taken from the buffer at a time, hand size, and the buffer depth that means overflow.
    take_size: int
    hand_limit: int
    spill_at: int
    loop: asyncio.AbstractEventLoop | None = None
    signals: Signals | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    uploader: asyncio.Task[None] | None = None
    resumes: list[asyncio.Task[None]] = field(default_factory=list)  # looks for earlier leftovers
    #: Packed requests (and flush markers) taken from the buffer, in order, for the sender.
    hand: deque[Batch | Marker] = field(default_factory=deque)
    hand_events: int = 0
    inflight: dict[asyncio.Task[None], Batch] = field(default_factory=dict)
    orphans: list[Batch] = field(default_factory=list)  # batches of cancelled deliveries
    #: Flushes whose events are in the journal, with the journal position they wait for.
    waiters: list[tuple[Marker, tuple[int, int]]] = field(default_factory=list)
    mode: Mode = Mode.SENDING
    blocked: AuthenticationError | None = None  # set with Mode.BLOCKED: what flush raises
    outage: bool = False
    closing: bool = False
    #: Held while the worker moves events into the journal, so they land in logging order.
    journal_order: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_progress: float = field(default_factory=time.monotonic)
    rejected: list[RejectedEvent] = field(default_factory=list)
    warned: set[str] = field(default_factory=set)
    delivered: int = 0
    rejected_total: int = 0
    spilled: int = 0  # this engine's events now in the journal
    resumed: int = 0  # events of earlier processes this engine delivered from the journal
    lost: int = 0  # events neither delivered nor kept at shutdown (counted in ``dropped``)
    #: Ends of runs whose events are still in memory only (the journal cannot be written): applied
    #: once those events are delivered, never before (a run is not FINISHED while events are missing).
    held_ends: list[RunEnd] = field(default_factory=list)
    #: Told when the uploader has delivered every journal row of this engine's (``relaying``
    #: lets a sender process start sending then).
    on_all_delivered: Callable[[], None] | None = None
    #: Told once, when the worker first takes events (``relaying`` starts the sender process
    #: then: a client that only reads never starts one).
    on_first_events: Callable[[], None] | None = None

    # -- the mode ----------------------------------------------------------------------------------

    @property
    def spooling(self) -> bool:
        """New events go to the journal, not the hand (SPOOLING or BLOCKED)."""
        return self.mode is not Mode.SENDING

    def start_spooling(self) -> None:
        if self.mode is Mode.SENDING:
            self.mode = Mode.SPOOLING

    def back_to_sending(self) -> None:
        if self.mode is Mode.SPOOLING:
            self.mode = Mode.SENDING

    def may_spool(self, why: str) -> bool:
        """Whether the journal can take events now, for ``why`` ("failure" or "overflow")."""
        if self.spool is None or self.spool.broken:
            return False
        return why != "overflow" or self.config.overflow == "spill"

    def block(self, exc: AuthenticationError) -> None:
        """STOP: no more requests; everything goes to the journal until ``tracklane sync``."""
        if self.blocked is not None:
            return
        command = self.spool.sync_command() if self.spool is not None else "tracklane sync"
        where = self.spool.path if self.spool is not None else "the local journal"
        self.blocked = type(exc)(
            f"{exc} Delivery has stopped and every event is kept in the local journal {where}; fix "
            f"the key or the URL, then run: {command}",
            status=exc.status,
            error_code=exc.error_code,
        )
        logger.error("tracklane: %s", self.blocked)
        self.mode = Mode.BLOCKED
        self.signal_hand()
        for marker, _ in self.waiters:
            resolve(marker)
        self.waiters.clear()

    # -- what the worker holds ---------------------------------------------------------------------

    def taken(self) -> int:
        """Events taken from the buffer and not settled: in the hand or in flight."""
        return self.hand_events + sum(len(b) for b in self.inflight.values())

    async def settle(self) -> None:
        """Wait until no request is in flight."""
        while self.inflight:
            await asyncio.wait(set(self.inflight))

    # -- waking the parts --------------------------------------------------------------------------

    def signal_hand(self) -> None:
        if self.signals is not None:
            self.signals.hand_ready.set()

    def wake_taker(self) -> None:
        if self.signals is not None and self.hand_events < self.hand_limit:
            self.signals.wake.set()

    # -- reports -----------------------------------------------------------------------------------

    def sent(self, n: int) -> None:
        self.delivered += n
        self.last_progress = time.monotonic()

    def reject(self, events: Iterable[Event], reason: str) -> None:
        """Events the server (or the journal) refused: counted, listed for the next flush to raise."""
        events = list(events)
        if not events:
            return
        self.last_progress = time.monotonic()  # the server answered
        if self.signals is not None:
            self.signals.journal_moved.set()  # a refused artifact is settled too: its waiter looks again
        self.rejected_total += len(events)
        self.rejected.extend(RejectedEvent(e[1], KIND_NAMES[e[0]], e[2], e[3], reason) for e in events)
        self.warn_once(
            "rejected",
            "tracklane: the server refused %d event(s) (first: %s %r: %s); the next flush() or "
            "end_run() raises DeliveryError listing them.",
            len(events),
            KIND_NAMES[events[0][0]],
            events[0][2],
            reason,
        )

    def warn_once(self, topic: str, message: str, *args: Any) -> None:
        if topic not in self.warned:
            self.warned.add(topic)
            logger.warning(message, *args)


def fresh_state(config: EngineConfig, spool: Spool | None) -> State:
    """The one way a ``State`` is made: at construction, and again in a forked child."""
    # What the worker holds (the hand and the requests in flight) is at most max_buffer again, so
    # memory stays within twice max_buffer whatever the server does.
    take_size = max(1, min(config.batch_size, config.max_buffer // (2 * config.max_in_flight + 2)))
    return State(
        config=config,
        spool=spool,
        take_size=take_size,
        hand_limit=max(take_size, min(take_size * 4, config.max_buffer // 2)),
        spill_at=max(1, config.max_buffer // 2),
    )


def time_left(deadline: float | None) -> float | None:
    """Seconds until the monotonic ``deadline`` (never below 0); None without one."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def time_left_at_most(deadline: float | None, cap: float) -> float:
    """``time_left``, at most ``cap`` (and ``cap`` without a deadline): a bounded wait's timeout."""
    left = time_left(deadline)
    return cap if left is None else min(cap, left)


def resolve(marker: Marker) -> None:
    if not marker.done():
        marker.set_result(None)


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event``, at most ``timeout`` seconds: whether it is set. Not ``asyncio.wait_for``:
    on Python 3.10 and 3.11 that swallows a cancellation racing the event being set (gh-86296), and a
    worker task that misses its cancellation keeps ``shutdown`` waiting for it."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()
