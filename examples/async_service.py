"""An aiohttp web service that logs a metric per request with AsyncTrackingClient.

    OIP_TRACKING_SERVER=http://127.0.0.1:5000 python examples/async_service.py --port 8080
    curl 'http://127.0.0.1:8080/predict?x=1.5'

Logging calls enqueue and return at once: the handler never waits for the tracking server.
With --self-test it serves a few requests to itself and exits (used by the test suite).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import time

from aiohttp import ClientSession, web

from tracklane import AsyncTrackingClient

TRACKER = web.AppKey("tracker", AsyncTrackingClient)
#: Each request's number, logged as the step: two requests as fast as each other in the same
#: millisecond would otherwise be one point (MLflow keeps one copy of an identical key, value,
#: timestamp and step).
REQUESTS = web.AppKey("requests", itertools.count)


async def predict(request: web.Request) -> web.Response:
    started = time.perf_counter()
    x = float(request.query.get("x", "0"))
    y = 3 * x + 2
    tc, n = request.app[TRACKER], next(request.app[REQUESTS])
    tc.log_metric("latency_ms", (time.perf_counter() - started) * 1000, step=n)  # enqueue only: no await
    tc.log_metric("prediction", y, step=n)
    return web.json_response({"y": y})


async def tracking(app: web.Application) -> object:
    """Open the client and a run for the service's lifetime; close both on shutdown."""
    async with AsyncTrackingClient() as tc:
        await tc.set_experiment("async-service")
        async with tc.start_run(run_name=f"serve-{int(time.time())}"):
            app[TRACKER] = tc
            yield


def make_app() -> web.Application:
    app = web.Application()
    app[REQUESTS] = itertools.count()
    app.router.add_get("/predict", predict)
    app.cleanup_ctx.append(tracking)  # type: ignore[arg-type]
    return app


async def self_test(port: int, requests: int) -> None:
    runner = web.AppRunner(make_app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    async with ClientSession() as session:
        for i in range(requests):
            async with session.get(f"http://127.0.0.1:{port}/predict", params={"x": str(i)}) as resp:
                assert resp.status == 200
    tc = runner.app[TRACKER]
    run = tc.active_run()
    print(f"served {requests} requests; run {run.info.run_id if run else '?'}")
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--self-test", type=int, metavar="N", default=0, help="serve N requests, then exit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.self_test:
        asyncio.run(self_test(args.port, args.self_test))
    else:
        web.run_app(make_app(), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
