"""Hostile servers for the reliability tests: the FaultProxy of ``servers.py`` with the faults a real
MLflow server never makes on demand.

``HostileProxy`` forwards to the real server like ``FaultProxy`` (and keeps its script, answers and
delays), and adds, per endpoint (``runs/get``; ``artifacts`` for the artifact proxy's downloads and
uploads, ``artifacts-listing`` for its listings):

- ``drop_reply(endpoint, times)``: forward the request (the server applies it), then close the
  connection without an answer: a reply lost on the way back;
- ``hang(endpoint)``: accept the request and never answer (until ``heal``/``stop``);
- ``trickle(endpoint, body, interval)``: answer 200 and send ``body`` one byte per ``interval`` s;
- ``huge(endpoint, size, declared)``: answer 200 with ``size`` bytes of spaces, with a
  Content-Length saying so (``declared``) or chunked; ``sent[endpoint]`` counts what went out;
- ``listing(files)``: answer every artifact listing with ``files`` (names the test chooses:
  ``../../x``, ``/tmp/y``), and every artifact download with ``b"hostile"``.

``SlowFor`` holds the requests of one run only (those whose body holds a given byte string), for the
exit and waiting tests.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from aiohttp import web

from servers import FaultProxy

__all__ = ["HostileProxy", "SlowFor"]


class HostileProxy(FaultProxy):
    """A ``FaultProxy`` that can also lose replies, hang, trickle, flood and list hostile names."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self._drops: Counter[str] = Counter()
        self._hangs: set[str] = set()
        self._trickles: dict[str, tuple[bytes, float]] = {}
        self._huge: dict[str, tuple[int, bool]] = {}
        self._listing: list[dict[str, Any]] | None = None
        self.sent: Counter[str] = Counter()  # body bytes written by ``huge`` and ``trickle``
        self.dropped: Counter[str] = Counter()  # replies lost after the server applied the request
        self._release: asyncio.Event | None = None
        self.authorization: Counter[str | None] = Counter()  # Authorization headers received

    # -- scripting (from the test's thread) ---------------------------------------------------

    def drop_reply(self, endpoint: str, times: int = 1) -> None:
        self._drops[endpoint] += times

    def hang(self, endpoint: str) -> None:
        self._hangs.add(endpoint)

    def trickle(self, endpoint: str, body: bytes, interval: float = 0.5) -> None:
        self._trickles[endpoint] = (body, interval)

    def huge(self, endpoint: str, size: int, declared: bool = True) -> None:
        self._huge[endpoint] = (size, declared)

    def listing(self, files: list[dict[str, Any]]) -> None:
        self._listing = files

    def heal(self) -> None:
        super().heal()
        self._drops.clear()
        self._hangs.clear()
        self._trickles.clear()
        self._huge.clear()
        self._listing = None
        if self._release is not None:
            self._loop.call_soon_threadsafe(self._release.set)

    def stop(self) -> None:
        if self._release is not None:
            self._loop.call_soon_threadsafe(self._release.set)
        super().stop()

    # -- serving (on the proxy's loop) -----------------------------------------------------------

    async def _start(self) -> None:
        self._release = asyncio.Event()
        await super()._start()

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/api/2.0/mlflow/{rest:.*}", self._hostile)
        app.router.add_route("*", "/api/2.0/mlflow-artifacts/artifacts", self._artifacts)
        app.router.add_route("*", "/api/2.0/mlflow-artifacts/artifacts/{rest:.*}", self._artifacts)

    async def _hostile(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.match_info["rest"]
        self.authorization[request.headers.get("Authorization")] += 1
        faulted = await self._fault_of(endpoint, request)
        if faulted is not None:
            return faulted
        if self._drops[endpoint] > 0:
            self._drops[endpoint] -= 1
            self.requests[endpoint] += 1
            body = await request.read()
            async with self._session.request(  # type: ignore[union-attr]
                request.method,
                f"{self.upstream}/api/2.0/mlflow/{endpoint}",
                params=request.query,
                data=body,
                headers={"Content-Type": "application/json"},
            ) as upstream:
                await upstream.read()  # the server has applied it; the answer goes nowhere
            self.dropped[endpoint] += 1
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError  # aiohttp drops the handler without writing a reply
        return await self._handle(request)

    async def _fault_of(self, endpoint: str, request: web.Request) -> web.StreamResponse | None:
        if endpoint in self._hangs:
            self.requests[endpoint] += 1
            assert self._release is not None
            await self._release.wait()
            raise asyncio.CancelledError
        if endpoint in self._trickles:
            self.requests[endpoint] += 1
            body, interval = self._trickles[endpoint]
            reply = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            reply.content_length = len(body)
            await reply.prepare(request)
            try:
                for i in range(len(body)):
                    await reply.write(body[i : i + 1])
                    self.sent[endpoint] += 1
                    await asyncio.sleep(interval)
            except (ConnectionError, RuntimeError):
                return reply
            return reply
        if endpoint in self._huge:
            self.requests[endpoint] += 1
            size, declared = self._huge[endpoint]
            reply = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            if declared:
                reply.content_length = size
            else:
                reply.enable_chunked_encoding()
            await reply.prepare(request)
            chunk = b" " * (1 << 20)
            try:
                while self.sent[endpoint] < size:
                    piece = chunk[: size - self.sent[endpoint]]
                    await reply.write(piece)
                    self.sent[endpoint] += len(piece)
                await reply.write_eof()
            except (ConnectionError, RuntimeError):
                pass
            return reply
        return None

    async def _artifacts(self, request: web.Request) -> web.StreamResponse:
        rest = request.match_info.get("rest", "")
        faulted = await self._fault_of("artifacts" if rest else "artifacts-listing", request)
        if faulted is not None:
            return faulted
        if self._listing is not None:
            if not rest:
                return web.json_response({"files": self._listing})
            return web.Response(body=b"hostile", content_type="application/octet-stream")
        raw = request.rel_url.raw_path
        target = f"{self.upstream}{raw}"
        if request.rel_url.raw_query_string:
            target += f"?{request.rel_url.raw_query_string}"
        data = await request.read() if request.body_exists else None
        assert self._session is not None
        from yarl import URL

        async with self._session.request(request.method, URL(target, encoded=True), data=data) as upstream:
            return web.Response(
                body=await upstream.read(),
                status=upstream.status,
                content_type=upstream.content_type,
            )


def run_json(run_id: str) -> bytes:
    """A ``runs/get`` reply MLflow would send, for a trickle."""
    return json.dumps({"run": {"info": {"run_id": run_id}, "data": {}}}).encode()


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
