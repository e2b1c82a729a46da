"""The outcome rule: what a server's reply means, and what delivery does about it.

One rule for the live worker, the journal's uploader and ``tracklane sync``, decided by HTTP status
and MLflow error code, never by message text:

=====================================================  =========  ==========================================
reply                                                  verdict    what delivery does
=====================================================  =========  ==========================================
2xx with MLflow's JSON                                 DELIVERED  count it, move on
another 4xx (400, 404 ...) with MLflow's JSON error    REFUSED    bisect; deliver the rest; report the
                                                                  refused events (``DeliveryError``)
408, 429, 5xx, connection error, timeout               RETRY      back off (honouring Retry-After) and
                                                                  retry; a batch that keeps getting 500
                                                                  while the server answers a probe at
                                                                  once, and again when re-sent once, is
                                                                  *poison*: bisect it like REFUSED
401, 403, or a reply that is not MLflow's JSON         STOP       stop sending; keep every event in the
(a login page, even with 200)                                     journal; ``AuthenticationError``
=====================================================  =========  ==========================================

A batch whose run is gone (deleted, or unknown to the server) is refused whole, found with one probe
of the run rather than by bisecting it event by event: no refusal floods the server with requests.
"""

from __future__ import annotations

import email.utils
import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from .._exceptions import AuthenticationError, NotFoundError, ServerError
from .batching import Batch, Event

#: Statuses retried (MLflow's own client retries these: ``mlflow/utils/request_utils.py``).
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: Consecutive 5xx replies to one batch before the server is probed to tell poison from an outage.
POISON_AFTER = 3

#: (events, reason) of events the server refused; they are reported, not retried.
OnRejected = Callable[[list[Event], str], None]
#: How many events just reached the server.
OnSent = Callable[[int], None]


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    REFUSED = "refused"
    RETRY = "retry"
    STOP = "stop"


@dataclass(frozen=True)
class Reply:
    """A server's reply, judged."""

    verdict: Verdict
    status: int
    body: dict[str, Any] | None  # MLflow's JSON, when the reply is MLflow's
    error_code: str = ""
    message: str = ""

    @property
    def refused_credentials(self) -> bool:
        return self.status in (401, 403)

    @property
    def not_mlflow(self) -> bool:
        """A reply that is not MLflow's JSON to a path or method the server does not have (404,
        405, 501): no MLflow behind the URL at all (a file or web server), not a login page."""
        return self.verdict is Verdict.STOP and self.body is None and self.status in (404, 405, 501)

    @property
    def server_error(self) -> bool:
        """A 500: counted towards telling a poison batch from an outage. (502, 503 and 504 say the
        server is unavailable or restarting behind a gateway: an outage, never the payload's fault.)"""
        return self.status == 500


def judge(status: int, raw: bytes) -> Reply:
    """What a reply with HTTP ``status`` and body ``raw`` means. See the module docstring."""
    body = _mlflow_json(raw)
    if status in (401, 403):
        return Reply(Verdict.STOP, status, body, *_error(body, raw))
    if status in RETRY_STATUSES:
        return Reply(Verdict.RETRY, status, body, *_error(body, raw))
    if body is None:
        # Not MLflow's JSON at all: an HTML login page, a proxy's error page, a wrong URL.
        return Reply(Verdict.STOP, status, None, "", _snippet(raw))
    if status < 300:
        return Reply(Verdict.DELIVERED, status, body)
    return Reply(Verdict.REFUSED, status, body, *_error(body, raw))


def carries_file(status: int) -> bool:
    """A download's reply carries the file itself (any bytes, not MLflow's JSON) on success."""
    return 200 <= status < 300


def _mlflow_json(raw: bytes) -> dict[str, Any] | None:
    if not raw.strip():
        return {}  # MLflow answers some calls with an empty body
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _error(body: dict[str, Any] | None, raw: bytes) -> tuple[str, str]:
    if body:
        return str(body.get("error_code", "")), str(body.get("message", "")) or _snippet(raw)
    return "", _snippet(raw)


def _snippet(raw: bytes) -> str:
    return " ".join(raw[:200].decode(errors="replace").split())


def refusal(reply: Reply, endpoint: str, api_host: str) -> ServerError:
    """The exception for a REFUSED or STOP reply to ``endpoint``."""
    if reply.verdict is Verdict.STOP:
        if reply.status in (401, 403):
            what = f"refused the credentials (HTTP {reply.status}: {reply.message})"
            fix = "Check api_key / OIP_WORKLOAD_ACCESS_KEY and that the key may use this workspace"
        else:
            what = f"answered {endpoint} with something that is not MLflow's JSON (HTTP {reply.status}: "
            what += f"{reply.message[:80]!r})"
            fix = (
                "Check api_host: it must be the tracking server itself, not a web page, login page or "
                "proxy in front of it"
            )
        return AuthenticationError(
            f"{api_host} {what}. {fix}.", status=reply.status, error_code=reply.error_code
        )
    cls = (
        NotFoundError if reply.status == 404 or reply.error_code == "RESOURCE_DOES_NOT_EXIST" else ServerError
    )
    return cls(
        f"{endpoint}: HTTP {reply.status} {reply.error_code}: {reply.message}",
        status=reply.status,
        error_code=reply.error_code,
    )


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


class ServerFault(ServerError):
    """A request kept getting 5xx replies (``POISON_AFTER`` times in a row)."""


class BatchTarget(Protocol):
    """What delivering a batch needs from a store."""

    async def log_batch(self, batch: Batch, body: bytes, once: bool = False) -> None:
        """Send ``body``; with ``once``, a single attempt (ServerFault on a 500, ServerUnavailableError
        on anything else the rule retries)."""
        ...

    async def run_is_open(self, run_id: str) -> bool:
        """The probe: one attempt, no retries. Whether the run exists and can take data; raises
        ServerUnavailableError when the server does not answer it."""
        ...


async def deliver(batch: Batch, target: BatchTarget, on_sent: OnSent, on_rejected: OnRejected) -> None:
    """Send ``batch`` by the rule above: what the server refuses (or cannot take) is isolated and
    reported, everything else delivered.

    Raises ServerUnavailableError when the server does not answer (the caller keeps the batch for
    later) and AuthenticationError on STOP (the caller keeps it and stops sending).
    """
    await _deliver(batch, target, on_sent, on_rejected, run_checked=False)


async def _deliver(
    batch: Batch, target: BatchTarget, on_sent: OnSent, on_rejected: OnRejected, *, run_checked: bool
) -> None:
    try:
        body = batch.encode()
    except Exception as exc:  # a value orjson cannot write: isolate it, never lose the batch
        reason = f"cannot be encoded as JSON ({type(exc).__name__}: {exc})"
    else:
        try:
            await target.log_batch(batch, body)
        except AuthenticationError:
            raise
        except ServerFault as exc:
            # Poison, or an outage that answers 500? Ask the server something else, once: a server
            # that is down fails that too (raised: the caller keeps the batch). One that answers gets
            # this payload once more, and only a second 500 makes it poison.
            if not await target.run_is_open(batch.run_id):
                on_rejected(batch.events(), f"the run is deleted or unknown on the server ({exc})")
                return
            run_checked = True
            try:
                await target.log_batch(batch, body, once=True)
            except ServerFault:
                reason = f"{exc} (every time, while the server answered other requests)"
            else:
                on_sent(len(batch))
                return
        except ServerError as exc:  # REFUSED
            reason = str(exc)
        else:
            on_sent(len(batch))
            return
    if len(batch) == 1:
        on_rejected(batch.events(), reason)
        return
    if not run_checked:
        if not await target.run_is_open(batch.run_id):
            on_rejected(batch.events(), f"the run is deleted or unknown on the server ({reason})")
            return
        run_checked = True
    first, second = batch.halves()
    await _deliver(first, target, on_sent, on_rejected, run_checked=run_checked)
    await _deliver(second, target, on_sent, on_rejected, run_checked=run_checked)
