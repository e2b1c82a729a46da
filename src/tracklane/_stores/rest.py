"""MLflow's REST API over aiohttp, for a plain MLflow server or the OICM platform.

``RestBackend`` is the only place that knows URLs and headers; what a reply means (status codes,
retries) is ``_wire.outcome``'s. It runs
on the engine's event loop; one aiohttp session is opened lazily and reused.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, urlsplit
from uuid import uuid4

import orjson

if TYPE_CHECKING:
    import aiohttp

    from .._wire.run_end import RunEnd

from .._entities import Experiment, FileInfo, Metric, Run, RunInfo
from .._exceptions import (
    CertificateError,
    ConfigurationError,
    NotFoundError,
    ServerError,
    ServerUnavailableError,
)
from .._settings import ServerConfig
from .._wire.batching import Batch, Event
from .._wire.outcome import (
    POISON_AFTER,
    Reply,
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


#: Largest JSON reply read. MLflow's biggest pages, as tracklane asks for them (25,000 metric points
#: of ``get-history``, 1,000 runs of ``runs/search`` with their params and tags) are a few MiB;
#: 64 MiB is ten times that, and parsing it costs ~3x its size in memory (bytes, then objects), so a
#: reply this big is not a page of MLflow's but a wrong URL or a hostile server. It is refused
#: without being read whole (the Content-Length, then the bytes as they come).
MAX_JSON_REPLY = 64 << 20
#: Slowest a streamed body (a file's upload or download) may move, in bytes per second, measured
#: over each ``request_timeout`` seconds: slower than a 64 kbit/s line is a server that trickles,
#: not a slow link, and would hold the call forever without ever tripping the read-gap limit.
MIN_STREAM_RATE = 8 << 10
#: Longest a TCP connect may take (capped by ``request_timeout``).
CONNECT_TIMEOUT = 10.0
#: Until a server has answered once, nothing listening there (connection refused, unknown host) is
#: retried for this long rather than the whole retry window: a wrong URL, or a server not started,
#: is said within seconds, with how to log offline.
FIRST_CONTACT_WINDOW = 5.0
#: Run tag holding the id the client gave a ``runs/create`` (see ``RestBackend.create_run``).
CREATE_ID_TAG = "tracklane.create_id"


class ReplyTooLargeError(ServerError):
    """A reply above ``MAX_JSON_REPLY``."""


class _StalledBody(OSError):
    """A streamed body moving slower than ``MIN_STREAM_RATE``: retried like a dropped connection."""


class _RateGuard:
    """Counts a stream's bytes and raises ``_StalledBody`` when a window of ``window`` seconds
    moved fewer than ``MIN_STREAM_RATE`` bytes a second."""

    def __init__(self, window: float, what: str) -> None:
        self.window = window
        self.what = what
        self._since = time.monotonic()
        self._bytes = 0

    def count(self, n: int) -> None:
        self._bytes += n
        elapsed = time.monotonic() - self._since
        if elapsed < self.window:
            return
        rate = self._bytes / elapsed
        if rate < MIN_STREAM_RATE:
            raise _StalledBody(
                f"{self.what} moved at {rate:,.0f} B/s for {elapsed:.0f} s, under the minimum "
                f"{MIN_STREAM_RATE:,} B/s"
            )
        self._since, self._bytes = time.monotonic(), 0


async def _stream_to(resp: Any, path: Path, window: float) -> None:
    """Write a reply's body to ``path`` chunk by chunk (via a temporary name: a download that
    breaks off leaves no half file under the real one), at no less than ``MIN_STREAM_RATE``."""
    part = path.with_name(path.name + ".part")
    guard = _RateGuard(window, "the download")
    try:
        with open(part, "wb") as out:
            async for chunk in resp.content.iter_chunked(1 << 20):
                out.write(chunk)
                guard.count(len(chunk))
            guard.count(0)
        os.replace(part, path)
    finally:
        if part.exists():
            part.unlink()


async def _read_json_body(resp: Any, endpoint: str, api_host: str) -> bytes:
    """The reply's body, refused (``ReplyTooLargeError``) past ``MAX_JSON_REPLY`` before it is
    read whole: by its Content-Length, else by counting as it arrives."""
    length = resp.content_length

    def too_large(size: str) -> ReplyTooLargeError:
        return ReplyTooLargeError(
            f"{api_host} answered {endpoint} with {size}, more than the {MAX_JSON_REPLY >> 20} MiB "
            "tracklane reads: no MLflow reply to this call is that big. Check that the URL is the "
            "tracking server itself (not a file server or a proxy in front of it).",
            status=resp.status,
        )

    if length is not None and length > MAX_JSON_REPLY:
        raise too_large(f"a body of {length:,} bytes")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 20):
        body += chunk
        if len(body) > MAX_JSON_REPLY:
            raise too_large("a body that went on past that")
    return bytes(body)


def field(reply: Mapping[str, Any], key: str, endpoint: str, api_host: str) -> Any:
    """``reply[key]``, or ConfigurationError naming the call when MLflow's reply would have it."""
    value = reply.get(key) if isinstance(reply, Mapping) else None
    if value is None:
        raise ConfigurationError(
            f"{api_host} answered {endpoint} without {key!r} ({orjson.dumps(reply)[:80]!r}): that is "
            "not MLflow's JSON. Check that the URL is the tracking server itself, e.g. "
            "'http://127.0.0.1:5000' for MLflow."
        )
    return value


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


def tls_context(config: ServerConfig) -> ssl.SSLContext | bool:
    """aiohttp's ``ssl=`` for this server: True (the system's trust store), False (no check), or a
    context with the CA file and client certificate MLflow's variables name."""
    verify = config.verify_ssl and config.tls_verify is not False
    if verify and config.tls_verify is True and config.client_cert is None:
        return True
    if not verify and config.client_cert is None:
        return False
    try:
        ctx = ssl.create_default_context(
            cafile=config.tls_verify if isinstance(config.tls_verify, str) else None
        )
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if config.client_cert is not None:
            ctx.load_cert_chain(config.client_cert)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"TLS settings for {config.api_host} cannot be used ({exc}): MLFLOW_TRACKING_SERVER_CERT_PATH "
            "must name a PEM file of CA certificates, MLFLOW_TRACKING_CLIENT_CERT_PATH a PEM file holding "
            "the client's certificate and its key."
        ) from None
    return ctx


def certificate_error(exc: BaseException, api_host: str) -> CertificateError:
    """A TLS failure is not an outage: say what it is, and the setting that fixes it, at once."""
    if isinstance(exc, _aiohttp().ClientConnectorCertificateError):
        what = f"the server's TLS certificate could not be verified ({exc.certificate_error})"
        fix = (
            "If the server uses a self-signed or private-CA certificate, set "
            "MLFLOW_TRACKING_SERVER_CERT_PATH to its CA file (PEM), or MLFLOW_TRACKING_INSECURE_TLS=true "
            "on a network you trust"
        )
    else:
        what = f"the TLS handshake failed ({exc})"
        fix = (
            "If the server asks for a client certificate, set MLFLOW_TRACKING_CLIENT_CERT_PATH to a PEM "
            "file with the certificate and its key; check MLFLOW_TRACKING_SERVER_CERT_PATH too"
        )
    return CertificateError(f"{api_host}: {what}. {fix}.")


def _aiohttp() -> Any:
    """aiohttp, imported on first use: it is most of what ``import tracklane`` would cost, and
    the first request is made on the worker's loop, not on the caller's thread."""
    import aiohttp

    return aiohttp


def _connection_errors() -> tuple[type[BaseException], ...]:
    return (_aiohttp().ClientConnectionError, _aiohttp().ClientPayloadError, asyncio.TimeoutError, OSError)


def _nothing_listens(exc: BaseException) -> bool:
    """A connection refused or a host that does not resolve: nothing is there to answer."""
    return isinstance(exc, _aiohttp().ClientConnectorError) and not isinstance(exc, _aiohttp().ClientSSLError)


#: What ``RestBackend.request`` calls before a retry of a create: the resource, if the lost
#: attempt made it (then the call returns that), else None (then the create is sent again).
BeforeRetry = Callable[[], Awaitable[dict[str, Any] | None]]


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
        #: Whether the server has answered anything yet (see ``FIRST_CONTACT_WINDOW``).
        self._answered = False

    def __repr__(self) -> str:
        return f"RestBackend({self.config.api_host!r}, workspace_id={self.workspace_id!r})"

    @property
    def describe(self) -> str:
        return self.config.api_host

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.config.username is not None:  # basic auth first, as MLflow's own client does
            password = self.config.password.reveal() if self.config.password is not None else ""
            pair = base64.b64encode(f"{self.config.username}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {pair}"
        elif self.config.api_key is not None:
            headers["Authorization"] = f"Bearer {self.config.api_key.reveal()}"
        if self.config.workload_id:
            headers["OIP-Workload-Id"] = self.config.workload_id
        return headers

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            aiohttp = _aiohttp()
            self._session = aiohttp.ClientSession(
                timeout=self._timeout(),
                connector=aiohttp.TCPConnector(limit=8, ssl=tls_context(self.config)),
            )
        return self._session

    def _timeout(self, *, upload: int | None = None, download: bool = False) -> Any:
        """Every request's limits: connect, the longest gap between reads, and a total. A JSON call's
        total is ``request_timeout``. A file's upload may take ``request_timeout`` plus its size at
        ``MIN_STREAM_RATE``; a download has no total but must keep ``MIN_STREAM_RATE`` (checked
        while it streams, ``_RateGuard``). No request is ever sent without them."""
        timeout = self.config.request_timeout
        if upload is not None:
            total: float | None = timeout + upload / MIN_STREAM_RATE
        else:
            total = None if download else timeout
        return _aiohttp().ClientTimeout(
            total=total, sock_connect=min(timeout, CONNECT_TIMEOUT), sock_read=timeout
        )

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
        before_retry: BeforeRetry | None = None,
        delivering: bool = False,
    ) -> dict[str, Any]:
        """Call ``endpoint`` and return its JSON reply, retrying what the outcome rule says to retry
        until ``deadline`` (monotonic; default: now + the retry window). Every attempt has the limits
        of ``_timeout``, so this returns or raises within the deadline plus one attempt.

        ``artifact``: ``endpoint`` is under the artifact proxy; ``upload`` streams that file as the
        body (opened afresh for every attempt), ``download`` streams the reply's body into that file.
        Neither is held whole in memory. ``before_retry``: a create that must not be applied twice
        (see ``BeforeRetry``); until it answers, nothing is sent again. ``delivering``: the engine's
        delivery calls, for which a reply that is not MLflow's is an AuthenticationError (stop, keep
        the events); elsewhere a URL with no MLflow behind it is a ConfigurationError.

        Raises ServerError (NotFoundError for 404; ReplyTooLargeError) for a refusal,
        AuthenticationError for refused credentials or a login page, ConfigurationError for a server
        that is not MLflow, ServerUnavailableError when the deadline passes first, and ServerFault
        after ``poison_after`` 5xx replies in a row (if given).
        """
        base = self.config.artifacts_base if artifact else self.config.rest_base
        url = f"{base(self.workspace_id)}/{endpoint}" if endpoint else base(self.workspace_id)
        if artifact:  # how errors name it: the path under the artifact proxy, or its listing
            what = f"the artifact listing of {query.get('path', '') if query else ''}".rstrip()
            endpoint = f"mlflow-artifacts/artifacts/{endpoint}" if endpoint else what
        if body is None and payload is not None:
            body = orjson.dumps(payload)
        if deadline is None:
            deadline = time.monotonic() + self.retry_window
        started = time.monotonic()
        size = upload.stat().st_size if upload is not None else None
        timeout = self._timeout(upload=size, download=download is not None)
        attempt = faults = 0
        problem = ""
        while True:
            wait: float | None = None
            refused_connection = False
            try:
                if attempt and before_retry is not None:
                    found = await before_retry()
                    if found is not None:
                        return found
                reply, status, retry_after = await self._attempt(
                    method, url, endpoint, body, query, timeout, upload, size, download
                )
                if reply is None:  # a download, done
                    return {}
                if reply.verdict is Verdict.DELIVERED:
                    assert reply.body is not None
                    return reply.body
                if reply.verdict is not Verdict.RETRY:
                    if reply.not_mlflow and not delivering:
                        raise self._not_mlflow(reply, endpoint, artifact)
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
            except _aiohttp().ClientSSLError as exc:
                raise certificate_error(exc, self.config.api_host) from None
            except ServerUnavailableError as exc:  # before_retry could not look: do not resend yet
                problem = f"looking for what the lost attempt made: {exc}"
                faults = 0
            except _connection_errors() as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                refused_connection = _nothing_listens(exc)
                faults = 0
            if wait is None:
                wait = backoff(attempt)
            attempt += 1
            remaining = deadline - time.monotonic()
            if refused_connection and not self._answered:
                remaining = min(remaining, started + FIRST_CONTACT_WINDOW - time.monotonic())
            retries_left = self.config.max_retries is None or attempt <= self.config.max_retries
            if wait > remaining or not retries_left:
                raise self._unavailable(endpoint, attempt, problem, refused_connection)
            self.retries += 1
            logger.debug("retrying %s in %.2fs after %s", endpoint, wait, problem)
            await asyncio.sleep(wait)

    async def _attempt(
        self,
        method: str,
        url: str,
        endpoint: str,
        body: bytes | None,
        query: Mapping[str, str] | None,
        timeout: Any,
        upload: Path | None,
        size: int | None,
        download: Path | None,
    ) -> tuple[Reply | None, int, str | None]:
        """One request: (the judged reply, status, Retry-After); (None, ...) for a finished download."""
        data: Any = body if upload is None else _file_chunks(open(upload, "rb"))  # noqa: SIM115
        headers = self._headers() if size is None else {**self._headers(), "Content-Length": str(size)}
        try:
            async with self._session_now().request(
                method, url, data=data, params=query, headers=headers, timeout=timeout
            ) as resp:
                self._answered = True
                if download is not None and carries_file(resp.status):
                    await _stream_to(resp, download, self.config.request_timeout)
                    return None, resp.status, None
                raw = await _read_json_body(resp, endpoint, self.config.api_host)
                return judge(resp.status, raw), resp.status, resp.headers.get("Retry-After")
        finally:
            if upload is not None:
                await data.aclose()

    def _not_mlflow(self, reply: Reply, endpoint: str, artifact: bool) -> ConfigurationError:
        if artifact:
            return ConfigurationError(
                f"{self.config.api_host} does not serve MLflow's artifact proxy: {endpoint} answered "
                f"HTTP {reply.status} with something that is not MLflow's JSON. Start the server with "
                "`mlflow server --serve-artifacts` (the default unless --no-serve-artifacts is given)."
            )
        return ConfigurationError(
            f"{self.config.api_host} is not an MLflow tracking server: it answered {endpoint} with "
            f"HTTP {reply.status} and something that is not MLflow's JSON ({reply.message[:80]!r}). "
            "Check the URL: it must be the address `mlflow server` listens on (e.g. "
            "'http://127.0.0.1:5000'), not a web or file server."
        )

    def _unavailable(
        self, endpoint: str, attempts: int, problem: str, nothing_listens: bool
    ) -> ServerUnavailableError:
        host = self.config.api_host
        if nothing_listens and not self._answered:
            return ServerUnavailableError(
                f"Nothing answers at {host} ({endpoint}: {problem}). Check that the tracking server "
                "is running and that the URL (scheme, host, port) is right. To log without a server, "
                "log offline: TrackingClient(offline_mode=True) (or OIP_OFFLINE_MODE=true), or a local "
                "directory as the tracking URI for tracklane.mlflow / MlflowClient; browse it with "
                "`tracklane ui DIR`, upload later with `tracklane sync DIR --to URL`."
            )
        return ServerUnavailableError(
            f"{host} did not answer {endpoint} within the retry window ({attempts} attempt(s), "
            f"last: {problem}). Check that the server is up and reachable from this machine (and any "
            "proxy or gateway in front of it); retry_window= and request_timeout= set how long to wait."
        )

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
                status, raw = resp.status, await _read_json_body(resp, endpoint, host)
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

    async def get_experiment_by_name(self, name: str, *, once: bool = False) -> Experiment | None:
        """``once``: a single attempt (ServerUnavailableError if the server does not answer it)."""
        deadline = time.monotonic() if once else None
        try:
            reply = await self.request(
                "GET", "experiments/get-by-name", query={"experiment_name": name}, deadline=deadline
            )
        except NotFoundError:
            return None
        return Experiment.from_json(self._field(reply, "experiment", "experiments/get-by-name"))

    async def get_experiment(self, experiment_id: str) -> Experiment:
        reply = await self.request("GET", "experiments/get", query={"experiment_id": experiment_id})
        return Experiment.from_json(self._field(reply, "experiment", "experiments/get"))

    def _field(self, reply: Mapping[str, Any], key: str, endpoint: str) -> Any:
        return field(reply, key, endpoint, self.config.api_host)

    async def create_experiment(
        self, name: str, tags: Mapping[str, str], artifact_location: str | None = None
    ) -> str:
        payload: dict[str, Any] = {"name": name, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
        if artifact_location:
            payload["artifact_location"] = artifact_location
        retried = False

        async def adopt() -> dict[str, Any] | None:
            # The lost attempt may have made it: then that experiment is this call's.
            nonlocal retried
            retried = True
            found = await self.get_experiment_by_name(name, once=True)
            return {"experiment_id": found.experiment_id} if found is not None else None

        try:
            reply = await self.request("POST", "experiments/create", payload=payload, before_retry=adopt)
        except ServerError as exc:
            # RESOURCE_ALREADY_EXISTS after a retry of our own create: the first attempt made it.
            if not (retried and exc.error_code == "RESOURCE_ALREADY_EXISTS"):
                raise
            found = await self.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id
        return str(self._field(reply, "experiment_id", "experiments/create"))

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
        *,
        identity: tuple[str, str] | None = None,
    ) -> Run:
        """Create a run, once: it carries the tag ``identity`` (default ``CREATE_ID_TAG`` with a
        fresh id), and before any retry the experiment is searched for it, so a reply lost after
        the server made the run adopts that run instead of making a second one."""
        tag, value = identity if identity is not None else (CREATE_ID_TAG, uuid4().hex)
        payload: dict[str, Any] = {
            "experiment_id": experiment_id,
            "run_name": run_name,
            "start_time": start_time,
            "tags": [{"key": k, "value": v} for k, v in {**tags, tag: value}.items()],
        }
        if user_id:
            payload["user_id"] = user_id

        async def adopt() -> dict[str, Any] | None:
            found = await self.find_run_by_tag(experiment_id, tag, value, once=True)
            return {"run": found} if found is not None else None

        reply = await self.request("POST", "runs/create", payload=payload, before_retry=adopt)
        return Run.from_json(self._field(reply, "run", "runs/create"))

    async def find_run_by_tag(
        self, experiment_id: str, tag: str, value: str, *, once: bool = False
    ) -> dict[str, Any] | None:
        """The run of ``experiment_id`` whose tag ``tag`` is ``value`` (MLflow's JSON), or None.
        ``once``: a single attempt (ServerUnavailableError if the server does not answer it)."""
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        payload = {
            "experiment_ids": [experiment_id],
            "filter": f"tags.`{tag}` = '{quoted}'",
            "run_view_type": "ALL",
            "max_results": 1,
        }
        deadline = time.monotonic() if once else None
        reply = await self.request("POST", "runs/search", payload=payload, deadline=deadline)
        runs = reply.get("runs") or []
        return dict(runs[0]) if runs else None

    async def get_run(self, run_id: str) -> Run:
        reply = await self.request("GET", "runs/get", query={"run_id": run_id})
        return Run.from_json(self._field(reply, "run", "runs/get"))

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
    ) -> RunInfo | None:
        """Change the run; the run's info as the server holds it now (MLflow's reply carries it)."""
        payload: dict[str, Any] = {"run_id": run_id}
        if status is not None:
            payload["status"] = status
        if end_time is not None:
            payload["end_time"] = end_time
        if run_name is not None:
            payload["run_name"] = run_name
        reply = await self.request("POST", "runs/update", payload=payload, delivering=True)
        info = reply.get("run_info")
        return RunInfo.from_json(info) if isinstance(info, dict) and info.get("experiment_id") else None

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
            once_by = time.monotonic()
            await self.request(
                "POST", "runs/log-batch", body=body, deadline=once_by, poison_after=1, delivering=True
            )
        else:
            await self.request(
                "POST", "runs/log-batch", body=body, poison_after=POISON_AFTER, delivering=True
            )

    async def run_is_open(self, run_id: str) -> bool:
        """Whether the server has run ``run_id`` and it can take data (not deleted): the outcome
        rule's probe: one attempt, no retries. Raises ServerUnavailableError when the server does
        not answer it."""
        try:
            reply = await self.request(
                "GET", "runs/get", query={"run_id": run_id}, deadline=time.monotonic(), delivering=True
            )
        except NotFoundError:
            return False
        except ServerError as exc:
            if exc.error_code == "INVALID_PARAMETER_VALUE":  # MLflow's answer for a malformed id
                return False
            raise
        return bool(Run.from_json(self._field(reply, "run", "runs/get")).info.lifecycle_stage != "deleted")

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
        await self.request("PUT", f"{root}/{quote(path)}", artifact=True, upload=file, delivering=True)

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
