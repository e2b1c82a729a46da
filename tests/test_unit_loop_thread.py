"""The loop thread's stop: tasks still on the loop are cancelled and unwind before the loop closes.

A task left pending on a closed loop is later closed by the garbage collector, and its cleanup
(``finally``, ``except``) runs on a closed loop: "Event loop is closed", and an uploader that
retried from there logged a traceback at every interpreter exit.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from tracklane._runtime.loop_thread import LoopThread

pytestmark = pytest.mark.unit


def test_stop_cancels_a_pending_task_and_lets_its_cleanup_run_on_the_open_loop() -> None:
    thread = LoopThread("test-loop")
    started, cleaned = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            loop = asyncio.get_running_loop()  # raises on a closed loop, or outside one
            seen["closed"] = loop.is_closed()
            cleaned.set()

    asyncio.run_coroutine_threadsafe(forever(), thread.loop)
    assert started.wait(5)

    thread.stop(timeout=5)

    assert cleaned.wait(5), "the task's cleanup never ran"
    assert seen["closed"] is False
    assert thread.loop.is_closed()
    assert not asyncio.all_tasks(thread.loop)


def test_stop_is_bounded_when_a_task_refuses_to_unwind() -> None:
    thread = LoopThread("test-loop-stubborn")
    started = threading.Event()

    async def stubborn() -> None:
        started.set()
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # swallows every cancellation

    asyncio.run_coroutine_threadsafe(stubborn(), thread.loop)
    assert started.wait(5)

    thread.stop(timeout=10)

    assert thread.loop.is_closed()
