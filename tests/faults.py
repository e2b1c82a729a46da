"""Fault kinds beyond ``servers.FaultProxy``'s, for the exit and waiting tests."""

from __future__ import annotations

import asyncio

from aiohttp import web

from servers import FaultProxy

__all__ = ["SlowFor"]


class SlowFor(FaultProxy):
    """A FaultProxy that also holds each request of an endpoint whose body holds a byte string
    for some seconds before handling it: a server slow for one run only (an earlier process's
    leftovers, say) while the others go at full speed."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self._slow: list[tuple[str, bytes, float]] = []

    def slow_containing(self, endpoint: str, needle: bytes, seconds: float) -> None:
        """Hold every request of ``endpoint`` whose body holds ``needle`` for ``seconds``."""
        self._slow.append((endpoint, needle, seconds))

    def heal(self) -> None:
        super().heal()
        self._slow.clear()

    async def _handle(self, request: web.Request) -> web.Response:
        endpoint = request.match_info["rest"]
        body = await request.read()  # aiohttp keeps it: the proxy's own handler reads it again
        for where, needle, seconds in list(self._slow):
            if where == endpoint and needle in body:
                await asyncio.sleep(seconds)
        return await super()._handle(request)
