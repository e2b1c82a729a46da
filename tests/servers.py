"""Real servers for the tests: an MLflow tracking server and an OICM-shaped gateway in front of it.

The Reader imports nothing of tracklane: the tests check what the server stored through MLflow's
REST API with the standard library, so a bug in tracklane's own REST code cannot hide itself. The
server itself is started by the launcher ``tracklane ui`` and ``tracklane bench`` use
(``tracklane._cli.mlflow_server``): it can be stopped and started again on the same port and
database, to simulate an outage.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from typing import Any, NamedTuple

from aiohttp import ClientSession, web
from yarl import URL

from tracklane._cli.mlflow_server import MlflowServer, free_port

__all__ = ["FaultProxy", "MlflowServer", "OicmGateway", "Reader", "free_port", "tracklane_cli"]

#: What MLflow's server answers when its store fails on a request (a database error, say).
INTERNAL_ERROR = b'{"error_code": "INTERNAL_ERROR", "message": "(sqlite3.OperationalError) database failure"}'


def tracklane_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the ``tracklane`` console script in a process of its own, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "tracklane._cli", *args], capture_output=True, text=True, timeout=timeout
    )


class Reader:
    """Reads what a tracking server stored, through MLflow's REST API (urllib only)."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base.rstrip("/") + "/api/2.0/mlflow"
        self.token = token

    def call(self, method: str, endpoint: str, payload: dict[str, Any] | None = None) -> Any:
        url = f"{self.base}/{endpoint}"
        data = None
        if method == "GET" and payload:
            url += "?" + urllib.parse.urlencode(payload)
        elif payload is not None:
            data = json.dumps(payload).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            body = exc.read()
            raise AssertionError(f"{endpoint}: HTTP {exc.code}: {body[:300]!r}") from None

    def experiment(self, name: str) -> dict[str, Any] | None:
        try:
            return self.call("GET", "experiments/get-by-name", {"experiment_name": name})["experiment"]
        except AssertionError as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc):
                return None
            raise

    def runs(self, experiment_id: str) -> list[dict[str, Any]]:
        reply = self.call("POST", "runs/search", {"experiment_ids": [experiment_id], "max_results": 1000})
        return list(reply.get("runs") or [])

    def run(self, run_id: str) -> dict[str, Any]:
        return self.call("GET", "runs/get", {"run_id": run_id})["run"]

    def params(self, run_id: str) -> dict[str, str]:
        return {p["key"]: p["value"] for p in self.run(run_id)["data"].get("params", [])}

    def tags(self, run_id: str) -> dict[str, str]:
        return {t["key"]: t["value"] for t in self.run(run_id)["data"].get("tags", [])}

    def history(self, run_id: str, key: str) -> list[tuple[float, int, int]]:
        """(value, step, timestamp) of every stored point, sorted by step then timestamp."""
        points: list[tuple[float, int, int]] = []
        token = None
        while True:
            q = {"run_id": run_id, "metric_key": key, "max_results": 25000}
            if token:
                q["page_token"] = token
            reply = self.call("GET", "metrics/get-history", q)
            points += [
                (float(m["value"]), int(m["step"]), int(m["timestamp"])) for m in reply.get("metrics", [])
            ]
            token = reply.get("next_page_token")
            if not token:
                return sorted(points, key=lambda p: (p[1], p[2]))


class BackgroundApp:
    """An aiohttp app on 127.0.0.1, served from a thread of its own, with a client session for
    forwarding requests upstream. Subclasses add routes in ``routes``."""

    def __init__(self, ssl_context: Any = None) -> None:
        self.port = free_port()
        self.ssl_context = ssl_context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def _start(self) -> None:
        self._session = ClientSession()
        app = web.Application(client_max_size=8 * 1024 * 1024)
        self.routes(app)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context).start()

    async def _stop(self) -> None:
        assert self._runner is not None and self._session is not None
        await self._runner.cleanup()
        await self._session.close()

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class OicmGateway(BackgroundApp):
    """A small stand-in for the OICM platform's tracking service.

    Serves ``/api/tracking/liveness`` and ``/api/tracking/version``, checks the bearer token, and
    forwards ``/api/tracking/v1/workspaces/{ws}/mlflow/api/2.0/mlflow/...`` to the real MLflow
    server, recording which workspaces and workload ids it saw, and in ``calls`` each forwarded
    request as (workspace, endpoint, body or query string). The artifact proxy beside it,
    ``.../mlflow/api/2.0/mlflow-artifacts/artifacts[/<path>]``, is forwarded to the server's own,
    request and reply bodies streamed (a 50 MB file is never held whole); its ``calls`` entries
    are (workspace, ``mlflow-artifacts/artifacts[/<path>]``, query string), without the body.
    """

    def __init__(
        self, upstream: str, token: str, version: str = "2.4.0", ssl_context: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(ssl_context)  # serve https with it (a test's self-signed certificate)
        self.upstream = upstream
        self.token = token
        self.version = version
        scheme = "https" if ssl_context is not None else "http"
        self.api_host = f"{scheme}://127.0.0.1:{self.port}/api/tracking"
        self.workspaces_seen: list[str] = []
        self.workload_ids_seen: set[str | None] = set()
        self.calls: list[tuple[str, str, bytes]] = []
        self.refused = 0
        self.alive = True

    async def _forward(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self.refused += 1
            return web.json_response({"error_code": "UNAUTHENTICATED", "message": "bad token"}, status=401)
        ws = request.match_info["ws"]
        self.workspaces_seen.append(ws)
        self.workload_ids_seen.add(request.headers.get("OIP-Workload-Id"))
        body = await request.read()
        self.calls.append((ws, request.match_info["rest"], body or request.query_string.encode()))
        url = f"{self.upstream}/api/2.0/mlflow/{request.match_info['rest']}"
        assert self._session is not None
        async with self._session.request(
            request.method,
            url,
            params=request.query,
            data=body,
            headers={"Content-Type": "application/json"},
        ) as upstream:
            return web.Response(
                body=await upstream.read(), status=upstream.status, content_type="application/json"
            )

    async def _forward_artifacts(self, request: web.Request) -> web.StreamResponse:
        """The artifact proxy: PUT bodies and GET replies streamed through in 1 MiB chunks."""
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self.refused += 1
            return web.json_response({"error_code": "UNAUTHENTICATED", "message": "bad token"}, status=401)
        ws = request.match_info["ws"]
        self.workspaces_seen.append(ws)
        self.workload_ids_seen.add(request.headers.get("OIP-Workload-Id"))
        rest = request.match_info.get("rest", "")
        endpoint = f"mlflow-artifacts/artifacts/{rest}" if rest else "mlflow-artifacts/artifacts"
        self.calls.append((ws, endpoint, request.query_string.encode()))
        # The path as the client encoded it (a '+' or '%2B' in a file name reaches MLflow unchanged).
        raw = request.rel_url.raw_path
        target = f"{self.upstream}/api/2.0{raw[raw.index('/mlflow-artifacts/artifacts') :]}"
        if request.rel_url.raw_query_string:
            target += f"?{request.rel_url.raw_query_string}"
        assert self._session is not None
        return await stream_through(self._session, request, target)

    async def _liveness(self, request: web.Request) -> web.Response:
        if not self.alive:
            return web.Response(status=503, text="down")
        return web.json_response({"status": "ok"})

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self.version})

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/tracking/liveness", self._liveness)
        app.router.add_get("/api/tracking/version", self._version)
        app.router.add_route(
            "*", "/api/tracking/v1/workspaces/{ws}/mlflow/api/2.0/mlflow/{rest:.*}", self._forward
        )
        artifacts = "/api/tracking/v1/workspaces/{ws}/mlflow/api/2.0/mlflow-artifacts/artifacts"
        app.router.add_route("*", artifacts, self._forward_artifacts)
        app.router.add_route("*", artifacts + "/{rest:.*}", self._forward_artifacts)


class Reply(NamedTuple):
    """A canned answer of the FaultProxy."""

    status: int
    body: bytes
    content_type: str = "application/json"


class FaultProxy(BackgroundApp):
    """A proxy on 127.0.0.1 in front of the real MLflow server that answers from a script first.

    ``proxy.script("runs/log-batch", (503, {"Retry-After": "1"}, b""), ...)`` makes the next
    requests to that endpoint fail as scripted; every other request is forwarded. ``calls``
    records (monotonic time, endpoint, status) of each request, so tests can check the waits.
    Used for what a real server will not do on demand: a 503/429 storm, a malformed reply.

    Faults that last until ``heal()``: ``refuse_containing`` answers every request whose body
    holds a byte string (a server that fails on one value, every time), ``delay`` holds each
    request of an endpoint before forwarding it (a slow server), and ``answer`` answers every
    request of an endpoint (a revoked key, a login page). ``requests_to`` counts the requests
    an endpoint received, faulted ones included.
    """

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream
        self.url = f"http://127.0.0.1:{self.port}"
        self.calls: list[tuple[float, str, int]] = []
        self.batches: list[dict[str, Any]] = []  # every log-batch body forwarded
        self.requests: Counter[str] = Counter()  # every request received, per endpoint
        self._script: dict[str, list[tuple[int, dict[str, str], bytes]]] = {}
        self._refusals: list[tuple[str, bytes, Reply]] = []
        self._answers: dict[str, Reply] = {}
        self._delays: dict[str, float] = {}

    def script(self, endpoint: str, *responses: tuple[int, dict[str, str], bytes]) -> None:
        self._script.setdefault(endpoint, []).extend(responses)

    def refuse_containing(
        self, endpoint: str, needle: bytes, status: int = 500, body: bytes = INTERNAL_ERROR
    ) -> None:
        """Answer ``status`` to every request of ``endpoint`` whose body holds ``needle``."""
        self._refusals.append((endpoint, needle, Reply(status, body)))

    def answer(self, endpoint: str, status: int, body: bytes, content_type: str = "application/json") -> None:
        """Answer every request of ``endpoint`` from now on, forwarding none."""
        self._answers[endpoint] = Reply(status, body, content_type)

    def delay(self, endpoint: str, seconds: float) -> None:
        """Hold each request of ``endpoint`` for ``seconds`` before forwarding it."""
        self._delays[endpoint] = seconds

    def heal(self) -> None:
        """Forget the script and every fault: forward everything from now on."""
        self._script.clear()
        self._refusals.clear()
        self._answers.clear()
        self._delays.clear()

    def requests_to(self, endpoint: str) -> int:
        """How many requests ``endpoint`` received so far, faulted or forwarded."""
        return self.requests[endpoint]

    def metrics_sent(self, key: str) -> int:
        """How many metric entities with ``key`` were posted to the server, duplicates included."""
        return sum(1 for b in self.batches for m in b.get("metrics", []) if m["key"] == key)

    def calls_to(self, endpoint: str) -> list[tuple[float, int]]:
        return [(t, status) for t, e, status in self.calls if e == endpoint]

    def _fault(self, endpoint: str, body: bytes) -> Reply | None:
        if endpoint in self._answers:
            return self._answers[endpoint]
        for where, needle, reply in self._refusals:
            if where == endpoint and needle in body:
                return reply
        return None

    async def _handle(self, request: web.Request) -> web.Response:
        endpoint = request.match_info["rest"]
        self.requests[endpoint] += 1
        queue = self._script.get(endpoint)
        if queue:
            status, headers, body = queue.pop(0)
            self.calls.append((time.monotonic(), endpoint, status))
            return web.Response(status=status, headers=headers, body=body, content_type="application/json")
        body = await request.read()
        fault = self._fault(endpoint, body or request.query_string.encode())
        if fault is not None:
            self.calls.append((time.monotonic(), endpoint, fault.status))
            return web.Response(status=fault.status, body=fault.body, content_type=fault.content_type)
        if endpoint in self._delays:
            await asyncio.sleep(self._delays[endpoint])
        if endpoint == "runs/log-batch":
            self.batches.append(json.loads(body))
        async with self._session.request(
            request.method,
            f"{self.upstream}/api/2.0/mlflow/{endpoint}",
            params=request.query,
            data=body,
            headers={"Content-Type": "application/json"},
        ) as upstream:
            self.calls.append((time.monotonic(), endpoint, upstream.status))
            return web.Response(
                body=await upstream.read(), status=upstream.status, content_type="application/json"
            )

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/api/2.0/mlflow/{rest:.*}", self._handle)


async def stream_through(session: ClientSession, request: web.Request, target: str) -> web.StreamResponse:
    """Send ``request`` on to ``target`` (the path as the client encoded it) and stream the reply back."""
    headers = {k: request.headers[k] for k in ("Content-Type", "Content-Length") if k in request.headers}
    body = request.content.iter_chunked(1 << 20) if request.body_exists else None
    async with session.request(
        request.method, URL(target, encoded=True), data=body, headers=headers
    ) as upstream:
        reply = web.StreamResponse(status=upstream.status)
        # The client session decodes a compressed body: its length would then be wrong.
        copied = ("Content-Type", "Content-Disposition")
        if "Content-Encoding" not in upstream.headers:
            copied += ("Content-Length",)
        for name in copied:
            if name in upstream.headers:
                reply.headers[name] = upstream.headers[name]
        await reply.prepare(request)
        async for chunk in upstream.content.iter_chunked(1 << 20):
            await reply.write(chunk)
        await reply.write_eof()
        return reply
