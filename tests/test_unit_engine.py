"""The engine's parts against a scripted in-memory server (the ``Backend`` protocol), no server and
no subprocess: delivery in order, retry, bisection, auth stop, spill to the journal, flush ordering
and the fork reset. Every wait is bounded by a deadline passed to ``flush``/``shutdown``."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tracklane._delivery.engine import Engine
from tracklane._delivery.spool import Spool
from tracklane._delivery.state import Mode
from tracklane._exceptions import (
    AuthenticationError,
    DeliveryError,
    NotFoundError,
    ServerError,
    ServerUnavailableError,
)
from tracklane._settings import EngineConfig, ServerConfig
from tracklane._stores.journal import Journal
from tracklane._wire.batching import METRIC, PARAM, TAG, Batch, Event
from tracklane._wire.run_end import RunEnd

pytestmark = pytest.mark.unit

T = TypeVar("T")
HOST = "http://scripted.invalid"


class ScriptedServer:
    """An in-memory tracking server implementing the engine's ``Backend``: it stores what it takes,
    in arrival order, and fails as scripted (``faults``: exceptions raised by the next log-batch
    requests, in order; ``refused``: keys answered with 400; ``gate``: requests wait for it)."""

    describe = HOST
    retries = 0

    def __init__(self) -> None:
        self.faults: deque[BaseException] = deque()
        self.refused: set[str] = set()
        self.gate: asyncio.Event | None = None
        self.delay = 0.0  # seconds each log-batch request takes to answer
        self.arrived: list[Event] = []
        self.requests: list[Batch] = []
        self.ends: dict[str, str] = {}
        self.forked = False

    async def log_batch(self, batch: Batch, body: bytes, once: bool = False) -> None:
        self.requests.append(batch)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        if self.faults:
            raise self.faults.popleft()
        if {e[2] for e in batch.events()} & self.refused:
            raise ServerError("runs/log-batch: HTTP 400", status=400, error_code="INVALID_PARAMETER_VALUE")
        self.arrived.extend(batch.events())

    async def run_is_open(self, run_id: str) -> bool:
        return True

    async def update_run(self, run_id: str, status: str, end_time: int | None) -> None:
        self.ends[run_id] = status

    async def put_artifact(self, run_id: str, path: str, file: Path) -> None:
        raise NotFoundError("no artifacts here")

    async def aclose(self) -> None:
        pass

    def after_fork(self) -> None:
        self.forked = True

    def keep_now(self, events: list[Event], ends: list[RunEnd]) -> int | None:
        return None

    # What the server holds, as a reader sees it.
    def steps(self, key: str) -> list[int]:
        return [e[5] for e in self.arrived if e[0] == METRIC and e[2] == key]

    def last_text(self, kind: int, key: str) -> Any:
        return [e[3] for e in self.arrived if e[0] == kind and e[2] == key][-1]


class Destination:
    """What a spool needs to know of its server."""

    config = ServerConfig(HOST)
    workspace_id = None

    def server_key(self) -> str:
        return HOST


def _config(**overrides: Any) -> EngineConfig:
    settings: dict[str, Any] = {"flush_interval": 0.05, "retry_window": 5.0, "exit_timeout": 5.0}
    settings.update(overrides)
    return EngineConfig(**settings)


def _run(make: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(make(), 60))  # bounded whatever the engine does


def _deadline(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def _journal_rows(storage: Path) -> int:
    journal = Journal.at(storage)
    try:
        runs = {d.run_uuid for d in journal.deliveries(HOST)}
        return journal.pending_upto(HOST, runs, journal.high_water())
    finally:
        journal.close()


async def _engine(server: ScriptedServer, config: EngineConfig, storage: Path | None) -> Engine:
    spool = Spool(str(storage), Destination()) if storage is not None else None
    engine = Engine(server, config, spool)  # type: ignore[arg-type]  # Destination is a protocol
    engine.attach(asyncio.get_running_loop())
    return engine


def _flushed(server: ScriptedServer, log: Callable[[Engine], None]) -> tuple[bool, dict[str, float]]:
    """An engine delivering to ``server``: ``log`` logs, then one flush; its result and the
    counters after it (the engine is shut down)."""

    async def scenario() -> tuple[bool, dict[str, float]]:
        engine = await _engine(server, _config(), None)
        log(engine)
        done = await engine.flush(_deadline())
        stats = engine.stats()
        await engine.shutdown(_deadline())
        return done, stats

    return _run(scenario)


def test_flush_delivers_every_event_logged_before_it_in_order() -> None:
    server = ScriptedServer()

    def log(engine: Engine) -> None:
        engine.buffer.log_params("r", {"lr": 0.1}, {})
        for step in range(2_500):
            engine.buffer.log_metric("r", "loss", float(step), step=step)
        engine.buffer.set_tags("r", {"state": "training"})
        engine.buffer.set_tags("r", {"state": "done"})

    done, stats = _flushed(server, log)
    assert done
    assert server.steps("loss") == list(range(2_500))
    assert server.last_text(PARAM, "lr") == "0.1" and server.last_text(TAG, "state") == "done"
    assert (stats["delivered"], stats["enqueued"], stats["in_flight_events"]) == (2_502, 2_503, 0)


def test_a_steady_stream_goes_out_in_full_requests_not_one_per_round_trip() -> None:
    # Events keep arriving while each request is answered (10 ms, as a server on 127.0.0.1): a
    # taker that took whatever had arrived after each request would send one per ~20 events; a
    # partial request waits for the interval (or a flush).
    server = ScriptedServer()
    server.delay = 0.01
    interval = 0.3

    async def scenario() -> float:
        engine = await _engine(server, _config(flush_interval=interval, batch_size=1_000), None)

        def training_loop() -> None:  # on its own thread, as a user's loop is
            for step in range(1_600):  # ~0.8 s at 2,000 events/s, in slices of 20
                engine.buffer.log_metric("r", "loss", float(step), step=step)
                if step % 20 == 19:
                    time.sleep(0.01)

        await asyncio.to_thread(training_loop)
        logged = time.monotonic()
        while len(server.arrived) < 1_600 and time.monotonic() < logged + 10:
            await asyncio.sleep(0.01)
        waited = time.monotonic() - logged
        await engine.shutdown(_deadline())
        return waited

    waited = _run(scenario)
    assert server.steps("loss") == list(range(1_600))
    # 1,600 events: one full request of 1,000, and the rest in a few interval-paced partial ones.
    assert len(server.requests) <= 6, [len(b) for b in server.requests]
    # No flush was asked: the last partial request still went out, within about an interval.
    assert waited < interval + 5.0


def test_an_idle_worker_looks_at_the_buffer_once_per_interval_not_in_a_loop() -> None:
    server = ScriptedServer()
    looks = 0

    async def scenario() -> None:
        nonlocal looks
        engine = await _engine(server, _config(flush_interval=0.05), None)
        take = engine._taker.take

        async def counted() -> None:
            nonlocal looks
            looks += 1
            await take()

        engine._taker.take = counted  # type: ignore[method-assign]
        await asyncio.sleep(1.0)
        await engine.shutdown(_deadline())

    _run(scenario)
    assert 5 <= looks <= 40  # ~20 at 0.05 s; a busy loop makes millions (and never yields)


def test_a_flush_takes_a_partial_request_at_once() -> None:
    server = ScriptedServer()

    async def scenario() -> float:
        engine = await _engine(server, _config(flush_interval=30.0), None)
        engine.buffer.log_metric("r", "loss", 1.0, step=0)
        await asyncio.sleep(0.05)  # the taker has looked (and waits for the interval)
        began = time.monotonic()
        assert await engine.flush(_deadline())
        took = time.monotonic() - began
        await engine.shutdown(_deadline())
        return took

    took = _run(scenario)
    assert server.steps("loss") == [0]
    assert took < 10.0  # far under the 30 s interval: the flush did not wait for it


def test_a_tag_request_waits_for_the_requests_before_it() -> None:
    # A tag's last value must arrive last: requests with params or tags never overtake others.
    server = ScriptedServer()

    async def scenario() -> None:
        engine = await _engine(server, _config(max_in_flight=4), None)
        for value in ("a", "b", "c"):
            for step in range(1_500):
                engine.buffer.log_metric("r", "m", float(step), step=step)
            engine.buffer.set_tags("r", {"phase": value})
            await asyncio.sleep(0)  # each its own window
            await engine.flush(_deadline())
        await engine.shutdown(_deadline())

    _run(scenario)
    assert [e[3] for e in server.arrived if e[0] == TAG] == ["a", "b", "c"]


def test_a_refused_event_is_reported_and_the_rest_delivered() -> None:
    server = ScriptedServer()
    server.refused = {"bad key"}

    async def scenario() -> DeliveryError:
        engine = await _engine(server, _config(), None)
        engine.buffer.log_metrics("r", {f"m{i}": float(i) for i in range(40)} | {"bad key": 1.0})
        with pytest.raises(DeliveryError) as caught:
            await engine.flush(_deadline())
        await engine.shutdown(_deadline())
        return caught.value

    error = _run(scenario)
    assert [(r.kind, r.key) for r in error.rejected] == [("metric", "bad key")]
    assert len(server.arrived) == 40


def test_a_server_down_for_a_while_without_journal_gets_the_batch_again() -> None:
    server = ScriptedServer()
    server.faults.extend([ServerUnavailableError("down"), ServerUnavailableError("down")])

    async def scenario() -> bool:
        engine = await _engine(server, _config(retry_window=2.0), None)
        for step in range(10):
            engine.buffer.log_metric("r", "m", float(step), step=step)
        # The batch waits in memory between attempts; a flush beginning cuts the pause short, so
        # the second flush sees the server back at once, whatever the first one saw.
        await engine.flush(_deadline(20))
        done = await engine.flush(_deadline(20))
        await engine.shutdown(_deadline())
        return done

    assert _run(scenario)
    assert server.steps("m") == list(range(10)) and len(server.requests) == 3


def test_an_outage_puts_events_in_the_journal_and_the_uploader_delivers_them(tmp_path: Path) -> None:
    server = ScriptedServer()
    server.faults.append(ServerUnavailableError("down"))

    async def scenario() -> tuple[bool, dict[str, float]]:
        engine = await _engine(server, _config(), tmp_path)
        for step in range(3_000):
            engine.buffer.log_metric("r", "m", float(step), step=step)
        done = await engine.flush(_deadline(20))
        stats = engine.stats()
        await engine.shutdown(_deadline())
        return done, stats

    done, stats = _run(scenario)
    assert done and sorted(server.steps("m")) == list(range(3_000))
    assert (stats["delivered"], stats["spilled"]) == (3_000, 0)
    assert _journal_rows(tmp_path) == 0


def test_a_producer_outrunning_the_server_spills_to_the_journal_and_loses_nothing(tmp_path: Path) -> None:
    server = ScriptedServer()

    async def scenario() -> tuple[float, bool]:
        server.gate = asyncio.Event()  # the server takes nothing until opened
        engine = await _engine(server, _config(max_buffer=2_000, batch_size=200), tmp_path)
        for step in range(20_000):
            engine.buffer.log_metric("r", "m", float(step), step=step)
            if step % 500 == 0:
                await asyncio.sleep(0.005)  # the worker moves the backlog meanwhile
        spilled = engine.stats()["spilled"]
        server.gate.set()
        done = await engine.flush(_deadline(30))
        await engine.shutdown(_deadline())
        return spilled, done

    spilled, done = _run(scenario)
    assert spilled > 0 and done
    assert sorted(server.steps("m")) == list(range(20_000))


def test_refused_credentials_stop_delivery_and_keep_every_event(tmp_path: Path) -> None:
    server = ScriptedServer()
    server.faults.append(AuthenticationError("HTTP 401", status=401))

    async def scenario() -> tuple[AuthenticationError, int, int]:
        engine = await _engine(server, _config(), tmp_path)
        for step in range(100):
            engine.buffer.log_metric("r", "m", float(step), step=step)
        with pytest.raises(AuthenticationError) as caught:
            await engine.flush(_deadline())
        requests = len(server.requests)
        engine.buffer.log_metric("r", "m", 100.0, step=100)  # after the stop: to the journal only
        with pytest.raises(AuthenticationError):
            await engine.flush(_deadline())
        lost = await engine.shutdown(_deadline())
        # Every worker task took its cancellation: none lingers to hold shutdown at its bound.
        assert all(task.done() for task in engine.state.tasks)
        return caught.value, requests, lost

    error, requests, lost = _run(scenario)
    assert "tracklane sync" in str(error) and lost == 0
    assert len(server.requests) == requests == 1  # nothing sent after the refusal
    assert _journal_rows(tmp_path) == 101


def test_a_run_end_given_up_on_is_kept_in_the_journal_after_its_events(tmp_path: Path) -> None:
    server = ScriptedServer()

    async def scenario() -> bool:
        server.gate = asyncio.Event()  # never opened: the server does not answer
        engine = await _engine(server, _config(retry_window=0.5), tmp_path)
        engine.buffer.log_metric("r", "m", 1.0, step=0)
        delivered = await engine.flush(_deadline(5))
        kept = await engine.keep_run_end(RunEnd("r", "FINISHED", 1, "run"))
        await engine.shutdown(time.monotonic() + 1)
        return not delivered and kept

    assert _run(scenario)
    journal = Journal.at(tmp_path)
    try:
        (delivery,) = journal.deliveries(HOST)
        assert delivery.run_uuid == "r" and delivery.status == "FINISHED"
    finally:
        journal.close()


def test_flush_gives_up_when_told_to() -> None:
    server = ScriptedServer()

    async def scenario() -> tuple[bool, float]:
        server.gate = asyncio.Event()
        engine = await _engine(server, _config(retry_window=30.0), None)
        engine.buffer.log_metric("r", "m", 1.0)
        asyncio.get_running_loop().call_later(0.2, engine.give_up)
        started = time.monotonic()
        done = await engine.flush()
        waited = time.monotonic() - started
        server.gate.set()
        await engine.shutdown(_deadline())
        return done, waited

    done, waited = _run(scenario)
    assert not done and waited < 25  # woke on the give-up, not at the end of the window


def test_after_fork_the_engine_starts_afresh(tmp_path: Path) -> None:
    server = ScriptedServer()
    server.faults.append(AuthenticationError("HTTP 401", status=401))

    async def in_parent(engine_box: list[Engine]) -> None:
        engine = await _engine(server, _config(), tmp_path)
        engine_box.append(engine)
        engine.buffer.log_metric("r", "m", 1.0)
        with pytest.raises(AuthenticationError):
            await engine.flush(_deadline())
        engine.buffer.log_metric("r", "m", 2.0)  # the parent's: never the child's to send

    box: list[Engine] = []
    _run(lambda: in_parent(box))
    engine = box[0]
    engine.reset_after_fork()
    assert server.forked and engine.blocked is None and engine.pending() == 0
    assert {k: v for k, v in engine.stats().items() if v} == {}
    assert engine.state.mode is Mode.SENDING and not engine.state.outage and not engine.state.warned

    async def in_child() -> bool:
        engine.attach(asyncio.get_running_loop())
        engine.buffer.log_metric("r", "child", 3.0)
        done = await engine.flush(_deadline())
        await engine.shutdown(_deadline())
        return done

    assert _run(in_child)
    assert server.steps("child") == [0]
    # The parent's events in the journal are delivered once, by whoever uploads the journal next
    # (here the child, which resumes leftovers); none of the parent's memory is sent twice.
    parents = [e[3] for e in server.arrived if e[2] == "m"]
    assert 1.0 in parents and len(parents) == len(set(parents))


def test_a_blocked_producer_resumes_when_the_worker_makes_room() -> None:
    server = ScriptedServer()

    async def scenario() -> tuple[bool, dict[str, float]]:
        server.gate = asyncio.Event()  # the server takes nothing at first: the buffer fills
        config = _config(max_buffer=100, batch_size=50, overflow="block", block_timeout=30.0)
        engine = await _engine(server, config, None)

        def produce() -> None:  # a training loop on its own thread: it waits for room, not drops
            for step in range(1_000):
                engine.buffer.log_metric("r", "m", float(step), step=step)

        producing = asyncio.ensure_future(asyncio.to_thread(produce))
        await asyncio.sleep(0.2)
        server.gate.set()
        await asyncio.wait_for(producing, 30)
        done = await engine.flush(_deadline(20))
        stats = engine.stats()
        await engine.shutdown(_deadline())
        return done, stats

    done, stats = _run(scenario)
    assert done and stats["dropped"] == 0
    assert server.steps("m") == list(range(1_000))


def test_a_failing_first_events_hook_costs_no_event() -> None:
    """The worker's first take tells ``State.on_first_events`` (the sender process starts there).
    If that fails, the worker here delivers the events, none of them lost with the hook."""
    server = ScriptedServer()

    def cannot_start() -> None:
        raise RuntimeError("can't start new thread")

    def log(engine: Engine) -> None:
        engine.state.on_first_events = cannot_start
        for step in range(100):
            engine.buffer.log_metric("r", "loss", float(step), step=step)

    done, stats = _flushed(server, log)
    assert done
    assert server.steps("loss") == list(range(100))
    assert (stats["delivered"], stats["enqueued"]) == (100, 100)
