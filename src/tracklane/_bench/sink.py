"""A server on 127.0.0.1 that accepts every MLflow request and stores nothing.

The figures that measure tracklane's own cost (drain capacity, the training loop, memory with the
server gone) send into it, so that no server's CPU or storage colours the number.
"""

from __future__ import annotations

import subprocess
import sys

from .._cli.mlflow_server import free_port, stop_process, wait_for_http


class SinkServer:
    """A server on 127.0.0.1 that accepts every MLflow request without storing anything.

    It runs in a process of its own so that it never competes with the client for the GIL.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> SinkServer:
        code = f"from tracklane._bench.sink import serve_sink; serve_sink({self.port})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_http(f"{self.url}/health", self.proc, timeout)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def serve_sink(port: int) -> None:
    """Serve the sink until SIGTERM: ``{}`` for log-batch, minimal objects for run lifecycle."""
    from aiohttp import web

    experiment = {"experiment_id": "1", "name": "sink", "lifecycle_stage": "active", "tags": []}
    run_info = {"run_id": "0" * 32, "experiment_id": "1", "run_name": "sink", "status": "RUNNING"}
    accepted = 0

    async def log_batch(request: web.Request) -> web.Response:
        nonlocal accepted
        await request.read()  # accept the whole body, as a server would, then forget it
        accepted += 1
        return web.json_response({})

    async def experiment_reply(request: web.Request) -> web.Response:
        return web.json_response({"experiment": experiment, "experiment_id": "1"})

    async def run_reply(request: web.Request) -> web.Response:
        return web.json_response({"run": {"info": run_info, "data": {}}})

    async def empty(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text=f"OK {accepted}")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    base = "/api/2.0/mlflow"
    app.router.add_post(f"{base}/runs/log-batch", log_batch)
    app.router.add_get(f"{base}/experiments/get-by-name", experiment_reply)
    app.router.add_get(f"{base}/experiments/get", experiment_reply)
    app.router.add_post(f"{base}/experiments/create", experiment_reply)
    app.router.add_post(f"{base}/runs/create", run_reply)
    app.router.add_get(f"{base}/runs/get", run_reply)
    app.router.add_post(f"{base}/runs/update", empty)
    app.router.add_post(f"{base}/runs/search", empty)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
