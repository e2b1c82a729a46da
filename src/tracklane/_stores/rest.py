"""MLflow's REST API over aiohttp, for a plain MLflow server or the OICM platform.

``RestBackend`` is the only place that knows URLs, headers, status codes and retry rules. It runs
on the engine's event loop; one aiohttp session is opened lazily and reused.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import aiohttp

from .._delivery.batching import Batch
from .._entities import Experiment, Metric, Run
from .._exceptions import (
    ConfigurationError,
    NotFoundError,
    ServerError,
    ServerUnavailableError,
)
from .._settings import ServerConfig

logger = logging.getLogger("tracklane")

#: Statuses MLflow's own client retries (``mlflow/utils/request_utils.py``).
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def _aiohttp() -> Any:
    """aiohttp, imported on first use: it is most of what ``import tracklane`` would cost, and
    the first request is made on the worker's loop, not on the caller's thread."""
    import aiohttp

    return aiohttp


def _connection_errors() -> tuple[type[BaseException], ...]:
    return (_aiohttp().ClientConnectionError, asyncio.TimeoutError, OSError)


def retry_after_seconds(header: str | None) -> float | None:
    """Parse a Retry-After header: delta-seconds or an HTTP date."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff(attempt: int, *, base: float = 0.25, cap: float = 8.0) -> float:
    """Exponential backoff with full jitter (the AWS architecture blog's recipe)."""
    return random.uniform(0, min(cap, base * 2**attempt))


class RestBackend:
    """Experiments, runs and log-batch on a tracking server that speaks MLflow's REST API."""

    def __init__(self, config: ServerConfig, *, retry_window: float = 30.0) -> None:
        self.config = config
        self.retry_window = retry_window
        self.workspace_id: str | None = None
        self.retries = 0
        self.platform_version: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._parents_session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"RestBackend({self.config.api_host!r}, workspace_id={self.workspace_id!r})"

    @property
    def describe(self) -> str:
        return self.config.api_host

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.config.api_key is not None:
            headers["Authorization"] = f"Bearer {self.config.api_key.reveal()}"
        if self.config.workload_id:
            headers["OIP-Workload-Id"] = self.config.workload_id
        return headers

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            aiohttp = _aiohttp()
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.request_timeout),
                connector=aiohttp.TCPConnector(limit=8, ssl=self.config.verify_ssl),
            )
        return self._session

    def after_fork(self) -> None:
        """In a forked child: the session belongs to the parent's loop. Keep it, unused and
        unclosed, so it is not finalized here (with an "Unclosed client session" warning)."""
        self._parents_session, self._session = self._session, None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        endpoint: str,
        *,
        payload: Mapping[str, Any] | None = None,
        body: bytes | None = None,
        query: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Call ``endpoint`` and return its JSON reply, retrying transient failures until
        ``deadline`` (monotonic; default: now + the retry window).

        Raises ServerError (NotFoundError for 404) for an error reply that retrying cannot mend,
        ServerUnavailableError when the deadline passes first.
        """
        url = f"{self.config.rest_base(self.workspace_id)}/{endpoint}"
        if body is None and payload is not None:
            body = orjson.dumps(payload)
        if deadline is None:
            deadline = time.monotonic() + self.retry_window
        attempt = 0
        while True:
            wait: float | None
            try:
                async with self._session_now().request(
                    method, url, data=body, params=query, headers=self._headers()
                ) as resp:
                    raw = await resp.read()
                    if resp.status < 300:
                        return _parse_json(raw, endpoint)
                    if resp.status not in TRANSIENT_STATUSES:
                        raise _error_from_reply(resp.status, raw, endpoint)
                    problem = f"HTTP {resp.status}"
                    wait = retry_after_seconds(resp.headers.get("Retry-After"))
            except _connection_errors() as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                wait = None
            if wait is None:
                wait = backoff(attempt)
            attempt += 1
            remaining = deadline - time.monotonic()
            if wait > remaining:
                raise ServerUnavailableError(
                    f"{self.config.api_host} did not answer {endpoint} within the retry window "
                    f"({attempt} attempt(s), last: {problem}). Check that the server is up and "
                    "reachable from this machine."
                )
            self.retries += 1
            logger.debug("retrying %s in %.2fs after %s", endpoint, wait, problem)
            await asyncio.sleep(wait)

    # -- the OICM platform's own endpoints -------------------------------------------------------

    async def check_platform(self) -> str | None:
        """On an OICM host, check ``{api_host}/liveness`` then ``{api_host}/version``; return the
        platform's version (None on a plain MLflow server, where there is nothing to check).

        One attempt each, at construction, so a wrong host or a service that is down is reported
        at once, not after a retry window. Raises ConfigurationError when the host does not look
        like an OICM tracking service, ServerUnavailableError when it cannot be reached or says
        it is down.
        """
        if not self.config.is_oicm:
            return None
        await self._platform_get("liveness")
        reply = await self._platform_get("version")
        version = reply.get("version")
        if not isinstance(version, str) or not version:
            raise ConfigurationError(
                f"{self.config.api_host}/version answered without a version ({reply!r:.80}). Is "
                "api_host the platform's tracking service, 'https://HOST/api/tracking'?"
            )
        self.platform_version = version
        logger.debug("OICM tracking service %s, version %s", self.config.api_host, version)
        return version

    async def _platform_get(self, endpoint: str) -> dict[str, Any]:
        host = self.config.api_host
        url = f"{host}/{endpoint}"
        try:
            async with self._session_now().get(url, headers=self._headers()) as resp:
                status, raw = resp.status, await resp.read()
        except _aiohttp().ClientSSLError as exc:
            raise ConfigurationError(
                f"TLS to {host} failed ({exc}). If the platform uses a private certificate authority, "
                "add it to the system trust store, or pass verify_ssl=False on a network you trust."
            ) from None
        except _connection_errors() as exc:
            raise ServerUnavailableError(
                f"Cannot reach the OICM tracking service at {host} ({type(exc).__name__}: {exc}). "
                "Check api_host (scheme, host name, port) and that this machine can reach it."
            ) from None
        if status in (404, 405):
            raise ConfigurationError(
                f"{url} answered HTTP {status}: {host} does not look like an OICM tracking service. "
                "api_host must be the platform's address followed by /api/tracking, e.g. "
                "'https://HOST/api/tracking'; for a plain MLflow server drop the /api/tracking suffix."
            )
        if status in (401, 403):
            raise ConfigurationError(
                f"{url} refused the credentials (HTTP {status}). Check api_key / "
                "OIP_WORKLOAD_ACCESS_KEY (OICM: user menu -> API Keys)."
            )
        if status >= 300:
            raise ServerUnavailableError(
                f"The OICM tracking service at {host} is not available ({endpoint}: HTTP {status}). "
                "The host is right but the service is down or restarting: try again later, or ask "
                "the platform's administrators."
            )
        try:
            return _parse_json(raw, endpoint)
        except ServerError as exc:
            raise ConfigurationError(
                f"{exc} api_host should be 'https://HOST/api/tracking' (the platform's tracking service)."
            ) from None

    def ui_links(self, run: Run) -> tuple[str, str] | None:
        """The run's and its experiment's pages in the OICM web UI (None: not OICM, or hide_host)."""
        return self.config.ui_links(self.workspace_id, run.info.experiment_id, run.info.run_id)

    # -- experiments ---------------------------------------------------------------------------

    async def get_experiment_by_name(self, name: str) -> Experiment | None:
        try:
            reply = await self.request("GET", "experiments/get-by-name", query={"experiment_name": name})
        except NotFoundError:
            return None
        return Experiment.from_json(reply["experiment"])

    async def get_experiment(self, experiment_id: str) -> Experiment:
        reply = await self.request("GET", "experiments/get", query={"experiment_id": experiment_id})
        return Experiment.from_json(reply["experiment"])

    async def create_experiment(self, name: str, tags: Mapping[str, str]) -> str:
        payload = {"name": name, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
        reply = await self.request("POST", "experiments/create", payload=payload)
        return str(reply["experiment_id"])

    async def delete_experiment(self, experiment_id: str) -> None:
        await self.request("POST", "experiments/delete", payload={"experiment_id": experiment_id})

    async def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        await self.request(
            "POST",
            "experiments/set-experiment-tag",
            payload={"experiment_id": experiment_id, "key": key, "value": value},
        )

    # -- runs ----------------------------------------------------------------------------------

    async def create_run(
        self, experiment_id: str, run_name: str, start_time: int, tags: Mapping[str, str]
    ) -> Run:
        payload = {
            "experiment_id": experiment_id,
            "run_name": run_name,
            "start_time": start_time,
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        reply = await self.request("POST", "runs/create", payload=payload)
        return Run.from_json(reply["run"])

    async def get_run(self, run_id: str) -> Run:
        reply = await self.request("GET", "runs/get", query={"run_id": run_id})
        return Run.from_json(reply["run"])

    async def search_runs_by_name(self, experiment_id: str, run_name: str) -> list[Run]:
        quoted = run_name.replace("\\", "\\\\").replace("'", "\\'")
        payload = {
            "experiment_ids": [experiment_id],
            "filter": f"attributes.run_name = '{quoted}'",
            "max_results": 1000,
        }
        reply = await self.request("POST", "runs/search", payload=payload)
        return [Run.from_json(r) for r in reply.get("runs") or ()]

    async def update_run(self, run_id: str, status: str, end_time: int | None) -> None:
        payload: dict[str, Any] = {"run_id": run_id, "status": status}
        if end_time is not None:
            payload["end_time"] = end_time
        await self.request("POST", "runs/update", payload=payload)

    async def log_batch(self, batch: Batch, deadline: float | None = None) -> None:
        """Send one log-batch request (``batch`` is already cut to the server's limits)."""
        await self.request("POST", "runs/log-batch", body=batch.encode(), deadline=deadline)

    async def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        points: list[Metric] = []
        token: str | None = None
        while True:
            query = {"run_id": run_id, "metric_key": key, "max_results": "25000"}
            if token:
                query["page_token"] = token
            reply = await self.request("GET", "metrics/get-history", query=query)
            points.extend(Metric.from_json(m) for m in reply.get("metrics") or ())
            token = reply.get("next_page_token")
            if not token:
                return points


def log_ui_links(backend: object, run: Run) -> None:
    """Log where the platform's UI shows ``run`` (INFO, logger "tracklane"); only for an OICM
    server without ``hide_host``, and never the API key."""
    links = backend.ui_links(run) if isinstance(backend, RestBackend) else None
    if links is not None:
        logger.info("tracklane: run %s: %s (experiment: %s)", run.info.run_name or run.info.run_id, *links)


def _parse_json(raw: bytes, endpoint: str) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        reply = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ServerError(
            f"{endpoint}: the server's reply is not JSON ({raw[:80]!r}). Is api_host the tracking "
            "server's address, not a web page or proxy in front of it?"
        ) from None
    if not isinstance(reply, dict):
        raise ServerError(f"{endpoint}: the server's reply is not a JSON object ({raw[:80]!r}).")
    return reply


def _error_from_reply(status: int, raw: bytes, endpoint: str) -> ServerError:
    try:
        body = orjson.loads(raw)
        code = str(body.get("error_code", ""))
        message = str(body.get("message", "")) or raw[:200].decode(errors="replace")
    except (orjson.JSONDecodeError, AttributeError):
        code, message = "", raw[:200].decode(errors="replace")
    if status in (401, 403):
        return ServerError(
            f"{endpoint}: the server refused the credentials (HTTP {status}: {message}). Check "
            "api_key / OIP_WORKLOAD_ACCESS_KEY and that the key may use this workspace.",
            status=status,
            error_code=code,
        )
    cls = NotFoundError if status == 404 or code == "RESOURCE_DOES_NOT_EXIST" else ServerError
    return cls(f"{endpoint}: HTTP {status} {code}: {message}", status=status, error_code=code)
