"""MLflow's REST API over aiohttp, for a plain MLflow server or the OICM platform.

``RestBackend`` is the only place that knows URLs and headers; what a reply means (status codes,
retries) is ``_wire.outcome``'s. It runs
on the engine's event loop; one aiohttp session is opened lazily and reused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, urlsplit

import orjson

if TYPE_CHECKING:
    import aiohttp

    from .._wire.run_end import RunEnd

from .._entities import Experiment, FileInfo, Metric, Run
from .._exceptions import (
    ConfigurationError,
    NotFoundError,
    ServerError,
    ServerUnavailableError,
)
from .._settings import ServerConfig
from .._wire.batching import Batch, Event
from .._wire.outcome import (
    POISON_AFTER,
    ServerFault,
    Verdict,
    backoff,
    carries_file,
    judge,
    refusal,
    retry_after_seconds,
)
from .journal import server_key

logger = logging.getLogger("tracklane")


async def _file_chunks(file: BinaryIO) -> AsyncIterator[bytes]:
    """A file as an upload body in 1 MiB chunks (aiohttp's own file reader uses 64 KiB), closed
    when the request is done with it."""
    try:
        while chunk := file.read(1 << 20):
            yield chunk
    finally:
        file.close()


async def _stream_to(resp: Any, path: Path) -> None:
    """Write a reply's body to ``path`` chunk by chunk (via a temporary name: a download that
    breaks off leaves no half file under the real one)."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as out:
        async for chunk in resp.content.iter_chunked(1 << 20):
            out.write(chunk)
    os.replace(part, path)


#: ``ViewType`` values as the REST API spells them.
_VIEW_TYPES = {1: "ACTIVE_ONLY", 2: "DELETED_ONLY", 3: "ALL"}


def proxied_path(artifact_uri: str, api_host: str) -> str:
    """Where a run's artifacts are under the server's artifact proxy, from its ``artifact_uri``."""
    anchor = "/api/2.0/mlflow-artifacts/artifacts/"
    if artifact_uri.startswith("mlflow-artifacts:"):
        return urlsplit(artifact_uri).path.strip("/")
    if artifact_uri.startswith(("http://", "https://")) and anchor in artifact_uri:
        return artifact_uri.split(anchor, 1)[1].strip("/")
    raise ConfigurationError(
        f"{server_key(api_host, None)} keeps this run's artifacts at {artifact_uri!r}, which it does not "
        "serve to clients. Start the server with its artifact proxy: `mlflow server --serve-artifacts "
        "--artifacts-destination DIR` (and no --default-artifact-root), then log artifacts to new runs."
    )


def _aiohttp() -> Any:
    """aiohttp, imported on first use: it is most of what ``import tracklane`` would cost, and
    the first request is made on the worker's loop, not on the caller's thread."""
    import aiohttp

    return aiohttp


def _connection_errors() -> tuple[type[BaseException], ...]:
    return (_aiohttp().ClientConnectionError, asyncio.TimeoutError, OSError)


class RestBackend:
    """Experiments, runs and log-batch on a tracking server that speaks MLflow's REST API."""

    def __init__(self, config: ServerConfig, *, retry_window: float = 30.0) -> None:
        self.config = config
        self.retry_window = retry_window
        self.workspace_id: str | None = None
        self.retries = 0
        self._artifact_roots: dict[str, str] = {}
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

    def _streaming_timeout(self) -> Any:
        """A file's upload or download: no total limit, but the server must keep the bytes moving."""
        aiohttp = _aiohttp()
        timeout = self.config.request_timeout
        return aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)

    def after_fork(self) -> None:
        """In a forked child: the session belongs to the parent's loop. Keep it, unused and
        unclosed, so it is not finalized here (with an "Unclosed client session" warning)."""
        self._parents_session, self._session = self._session, None

    def keep_now(self, events: list[Event], ends: list[RunEnd]) -> None:
        """A server cannot be reached without an event loop: the engine's journal keeps them."""
        return None

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
        poison_after: int | None = None,
        artifact: bool = False,
        upload: Path | None = None,
        download: Path | None = None,
    ) -> dict[str, Any]:
        """Call ``endpoint`` and return its JSON reply, retrying what the outcome rule says to retry
        until ``deadline`` (monotonic; default: now + the retry window).

        ``artifact``: ``endpoint`` is under the artifact proxy; ``upload`` streams that file as the
        body (opened afresh for every attempt), ``download`` streams the reply's body into that file.
        Neither is held whole in memory, and their requests have no total time limit (a big file on a
        slow link), only one between reads.

        Raises ServerError (NotFoundError for 404) for a refusal, AuthenticationError for refused
        credentials or a reply that is not MLflow's, ServerUnavailableError when the deadline passes
        first, and ServerFault after ``poison_after`` 5xx replies in a row (if given).
        """
        base = self.config.artifacts_base if artifact else self.config.rest_base
        url = f"{base(self.workspace_id)}/{endpoint}" if endpoint else base(self.workspace_id)
        if body is None and payload is not None:
            body = orjson.dumps(payload)
        if deadline is None:
            deadline = time.monotonic() + self.retry_window
        streaming = upload is not None or download is not None
        attempt = faults = 0
        while True:
            wait: float | None = None
            try:
                data: Any = body if upload is None else _file_chunks(open(upload, "rb"))  # noqa: SIM115
                try:
                    async with self._session_now().request(
                        method,
                        url,
                        data=data,
                        params=query,
                        headers=self._headers()
                        if upload is None
                        else {**self._headers(), "Content-Length": str(upload.stat().st_size)},
                        timeout=self._streaming_timeout() if streaming else None,
                    ) as resp:
                        if download is not None and carries_file(resp.status):
                            await _stream_to(resp, download)
                            return {}
                        reply = judge(resp.status, await resp.read())
                        status, retry_after = resp.status, resp.headers.get("Retry-After")
                finally:
                    if upload is not None:
                        await data.aclose()
                if reply.verdict is Verdict.DELIVERED:
                    assert reply.body is not None
                    return reply.body
                if reply.verdict is not Verdict.RETRY:
                    raise refusal(reply, endpoint, self.config.api_host)
                problem = f"HTTP {status} {reply.error_code}".rstrip()
                wait = retry_after_seconds(retry_after)
                faults = faults + 1 if reply.server_error else 0
                if poison_after is not None and faults >= poison_after:
                    raise ServerFault(
                        f"{endpoint}: {problem} {faults} times in a row: {reply.message[:200]}",
                        status=status,
                        error_code=reply.error_code,
                    )
            except _connection_errors() as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                faults = 0
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
        reply = judge(status, raw)
        if reply.refused_credentials:
            raise ConfigurationError(
                f"{url} refused the credentials (HTTP {status}). Check api_key / "
                "OIP_WORKLOAD_ACCESS_KEY (OICM: user menu -> API Keys)."
            )
        if reply.verdict is Verdict.RETRY:
            raise ServerUnavailableError(
                f"The OICM tracking service at {host} is not available ({endpoint}: HTTP {status}). "
                "The host is right but the service is down or restarting: try again later, or ask "
                "the platform's administrators."
            )
        if reply.verdict is not Verdict.DELIVERED:
            raise ConfigurationError(
                f"{url} answered HTTP {status} ({reply.message[:80]!r}): {host} does not look like an OICM "
                "tracking service. api_host must be the platform's address followed by /api/tracking, "
                "e.g. 'https://HOST/api/tracking'; for a plain MLflow server drop the /api/tracking suffix."
            )
        assert reply.body is not None
        return reply.body

    def ui_links(self, run: Run) -> tuple[str, str] | None:
        """The run's and its experiment's pages in the OICM web UI (None: not OICM, or hide_host)."""
        return self.config.ui_links(self.workspace_id, run.info.experiment_id, run.info.run_id)

    @property
    def mlflow_ui_url(self) -> str | None:
        """Where MLflow's own web UI is: a plain MLflow server's address (None on OICM)."""
        return None if self.config.is_oicm else self.config.api_host

    def server_key(self) -> str:
        """How the journal names this server (and workspace): see ``journal.server_key``."""
        return server_key(self.config.api_host, self.workspace_id)

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

    async def create_experiment(
        self, name: str, tags: Mapping[str, str], artifact_location: str | None = None
    ) -> str:
        payload: dict[str, Any] = {"name": name, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
        if artifact_location:
            payload["artifact_location"] = artifact_location
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

    async def search_experiments(
        self,
        view_type: int,
        max_results: int | None,
        filter_string: str | None,
        order_by: list[str] | None,
        page_token: str | None,
    ) -> tuple[list[Experiment], str | None]:
        payload: dict[str, Any] = {"view_type": _VIEW_TYPES[view_type]}
        if max_results is not None:
            payload["max_results"] = max_results
        if filter_string:
            payload["filter"] = filter_string
        if order_by:
            payload["order_by"] = list(order_by)
        if page_token:
            payload["page_token"] = page_token
        reply = await self.request("POST", "experiments/search", payload=payload)
        found = [Experiment.from_json(e) for e in reply.get("experiments") or ()]
        return found, reply.get("next_page_token") or None

    async def delete_experiment_tag(self, experiment_id: str, key: str) -> None:
        payload = {"experiment_id": experiment_id, "key": key}
        await self.request("POST", "experiments/delete-experiment-tag", payload=payload)

    async def rename_experiment(self, experiment_id: str, new_name: str) -> None:
        payload = {"experiment_id": experiment_id, "new_name": new_name}
        await self.request("POST", "experiments/update", payload=payload)

    async def restore_experiment(self, experiment_id: str) -> None:
        await self.request("POST", "experiments/restore", payload={"experiment_id": experiment_id})

    # -- runs ----------------------------------------------------------------------------------

    async def create_run(
        self,
        experiment_id: str,
        run_name: str,
        start_time: int,
        tags: Mapping[str, str],
        user_id: str | None = None,
    ) -> Run:
        payload: dict[str, Any] = {
            "experiment_id": experiment_id,
            "run_name": run_name,
            "start_time": start_time,
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        if user_id:
            payload["user_id"] = user_id
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

    async def update_run(
        self, run_id: str, status: str | None, end_time: int | None, run_name: str | None = None
    ) -> None:
        payload: dict[str, Any] = {"run_id": run_id}
        if status is not None:
            payload["status"] = status
        if end_time is not None:
            payload["end_time"] = end_time
        if run_name is not None:
            payload["run_name"] = run_name
        await self.request("POST", "runs/update", payload=payload)

    async def search_runs(
        self,
        experiment_ids: list[str],
        filter_string: str,
        view_type: int,
        max_results: int,
        order_by: list[str] | None,
        page_token: str | None,
    ) -> tuple[list[Run], str | None]:
        payload: dict[str, Any] = {
            "experiment_ids": experiment_ids,
            "filter": filter_string or "",
            "run_view_type": _VIEW_TYPES[view_type],
            "max_results": max_results,
        }
        if order_by:
            payload["order_by"] = list(order_by)
        if page_token:
            payload["page_token"] = page_token
        reply = await self.request("POST", "runs/search", payload=payload)
        return [Run.from_json(r) for r in reply.get("runs") or ()], reply.get("next_page_token") or None

    async def delete_run(self, run_id: str) -> None:
        await self.request("POST", "runs/delete", payload={"run_id": run_id})

    async def restore_run(self, run_id: str) -> None:
        await self.request("POST", "runs/restore", payload={"run_id": run_id})

    async def delete_tag(self, run_id: str, key: str) -> None:
        await self.request("POST", "runs/delete-tag", payload={"run_id": run_id, "key": key})

    async def log_batch(self, batch: Batch, body: bytes, once: bool = False) -> None:
        """Send one log-batch request (``body``: ``batch`` encoded, already cut to the server's limits).

        Raises ServerFault when the server keeps failing this payload (see ``_wire.outcome``);
        ``once``: a single attempt.
        """
        if once:
            await self.request("POST", "runs/log-batch", body=body, deadline=time.monotonic(), poison_after=1)
        else:
            await self.request("POST", "runs/log-batch", body=body, poison_after=POISON_AFTER)

    async def run_is_open(self, run_id: str) -> bool:
        """Whether the server has run ``run_id`` and it can take data (not deleted): the outcome
        rule's probe: one attempt, no retries. Raises ServerUnavailableError when the server does
        not answer it."""
        try:
            reply = await self.request("GET", "runs/get", query={"run_id": run_id}, deadline=time.monotonic())
        except NotFoundError:
            return False
        except ServerError as exc:
            if exc.error_code == "INVALID_PARAMETER_VALUE":  # MLflow's answer for a malformed id
                return False
            raise
        return bool(Run.from_json(reply["run"]).info.lifecycle_stage != "deleted")

    # -- artifacts (MLflow's artifact proxy) -------------------------------------------------------

    async def artifact_root(self, run_id: str) -> str:
        """The run's artifact root as a path under the artifact proxy (``1/<run id>/artifacts``).

        Raises ConfigurationError when the server keeps the run's artifacts somewhere it does not
        proxy (``--default-artifact-root`` on a path or a bucket the client would need to reach)."""
        root = self._artifact_roots.get(run_id)
        if root is None:
            uri = (await self.get_run(run_id)).info.artifact_uri
            root = self._artifact_roots[run_id] = proxied_path(uri, self.config.api_host)
        return root

    async def put_artifact(self, run_id: str, path: str, file: Path) -> None:
        """Upload ``file`` as the run's artifact ``path``, streamed."""
        root = await self.artifact_root(run_id)
        await self.request("PUT", f"{root}/{quote(path)}", artifact=True, upload=file)

    async def list_artifacts(self, run_id: str, path: str | None) -> list[FileInfo]:
        root = await self.artifact_root(run_id)
        where = f"{root}/{path.strip('/')}" if path else root
        reply = await self.request("GET", "", artifact=True, query={"path": where})
        prefix = f"{path.strip('/')}/" if path else ""
        return [
            FileInfo(prefix + f["path"], bool(f.get("is_dir", False)), f.get("file_size"))
            for f in reply.get("files") or ()
        ]

    async def download_artifact(self, run_id: str, path: str, dst: Path) -> None:
        root = await self.artifact_root(run_id)
        await self.request("GET", f"{root}/{quote(path)}", artifact=True, download=dst)

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
