"""The outcome rule as a table: every status and error code a server answers with, and what delivery
does about it (bisection, poison, a run the server lost, a refused key), against a scripted target."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tracklane._exceptions import AuthenticationError, NotFoundError, ServerError, ServerUnavailableError
from tracklane._wire.batching import METRIC, Batch, Event, batch_of
from tracklane._wire.outcome import (
    RETRY_STATUSES,
    ServerFault,
    Verdict,
    backoff,
    deliver,
    judge,
    refusal,
    retry_after_seconds,
)

pytestmark = pytest.mark.unit

JSON_OK = b'{"run": {}}'
HTML = b"<html><body>Please log in</body></html>"


def _error(code: str, message: str = "nope") -> bytes:
    return orjson.dumps({"error_code": code, "message": message})


# (status, body, verdict, error_code): one row per reply a tracking server (or what sits in front of
# it) gives. MLflow's error codes: mlflow/protos/databricks.proto.
TABLE = [
    (200, JSON_OK, Verdict.DELIVERED, ""),
    (200, b"", Verdict.DELIVERED, ""),  # MLflow answers some calls with an empty body
    (200, b"{}", Verdict.DELIVERED, ""),
    (201, JSON_OK, Verdict.DELIVERED, ""),
    (200, HTML, Verdict.STOP, ""),  # a login page with 200 is not a delivery
    (200, b"[1, 2]", Verdict.STOP, ""),  # JSON, but not MLflow's object
    (400, _error("INVALID_PARAMETER_VALUE"), Verdict.REFUSED, "INVALID_PARAMETER_VALUE"),
    (400, _error("BAD_REQUEST"), Verdict.REFUSED, "BAD_REQUEST"),
    (400, _error("RESOURCE_ALREADY_EXISTS"), Verdict.REFUSED, "RESOURCE_ALREADY_EXISTS"),
    (404, _error("RESOURCE_DOES_NOT_EXIST"), Verdict.REFUSED, "RESOURCE_DOES_NOT_EXIST"),
    (404, _error("ENDPOINT_NOT_FOUND"), Verdict.REFUSED, "ENDPOINT_NOT_FOUND"),
    (409, _error("RESOURCE_CONFLICT"), Verdict.REFUSED, "RESOURCE_CONFLICT"),
    (413, _error("REQUEST_LIMIT_EXCEEDED"), Verdict.REFUSED, "REQUEST_LIMIT_EXCEEDED"),
    (404, HTML, Verdict.STOP, ""),  # a wrong URL's HTML page: not MLflow at all
    (401, _error("UNAUTHENTICATED"), Verdict.STOP, "UNAUTHENTICATED"),
    (401, HTML, Verdict.STOP, ""),
    (403, _error("PERMISSION_DENIED"), Verdict.STOP, "PERMISSION_DENIED"),
    (403, b"", Verdict.STOP, ""),
    (408, b"", Verdict.RETRY, ""),
    (429, _error("REQUEST_LIMIT_EXCEEDED"), Verdict.RETRY, "REQUEST_LIMIT_EXCEEDED"),
    (500, _error("INTERNAL_ERROR"), Verdict.RETRY, "INTERNAL_ERROR"),
    (500, HTML, Verdict.RETRY, ""),
    (502, HTML, Verdict.RETRY, ""),  # a gateway's page while the server restarts
    (503, _error("TEMPORARILY_UNAVAILABLE"), Verdict.RETRY, "TEMPORARILY_UNAVAILABLE"),
    (504, b"", Verdict.RETRY, ""),
]


@pytest.mark.parametrize(("status", "body", "verdict", "code"), TABLE)
def test_every_reply_has_one_verdict(status: int, body: bytes, verdict: Verdict, code: str) -> None:
    reply = judge(status, body)
    assert (reply.verdict, reply.status, reply.error_code) == (verdict, status, code)


def test_the_table_covers_every_retried_status() -> None:
    assert {row[0] for row in TABLE if row[2] is Verdict.RETRY} == RETRY_STATUSES


@pytest.mark.parametrize("status", sorted(RETRY_STATUSES))
def test_only_a_500_counts_towards_poison(status: int) -> None:
    assert judge(status, b"").server_error is (status == 500)


def test_refusal_names_the_endpoint_code_and_message() -> None:
    exc = refusal(judge(400, _error("INVALID_PARAMETER_VALUE", "bad key")), "runs/log-batch", "http://h")
    assert type(exc) is ServerError and (exc.status, exc.error_code) == (400, "INVALID_PARAMETER_VALUE")
    assert "runs/log-batch" in str(exc) and "bad key" in str(exc)


@pytest.mark.parametrize(
    ("status", "body"), [(404, _error("RESOURCE_DOES_NOT_EXIST")), (400, _error("RESOURCE_DOES_NOT_EXIST"))]
)
def test_a_missing_resource_is_not_found(status: int, body: bytes) -> None:
    assert isinstance(refusal(judge(status, body), "runs/get", "http://h"), NotFoundError)


@pytest.mark.parametrize(("status", "body", "hint"), [(401, b"", "api_key"), (200, HTML, "api_host")])
def test_a_stop_is_an_authentication_error_naming_what_to_check(status: int, body: bytes, hint: str) -> None:
    exc = refusal(judge(status, body), "runs/log-batch", "http://h")
    assert isinstance(exc, AuthenticationError) and hint in str(exc)


@pytest.mark.parametrize(
    ("header", "expected"), [(None, None), ("", None), ("3", 3.0), ("-1", 0.0), ("soon", None)]
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert retry_after_seconds(header) == expected


def test_retry_after_an_http_date_in_the_past_is_now() -> None:
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_backoff_stays_within_its_cap() -> None:
    assert all(0 <= backoff(attempt, base=0.25, cap=2.0) <= 2.0 for attempt in range(40))


# -- delivery by the rule, against a scripted target ---------------------------------------------


class Target:
    """A scripted server: refuses batches holding a refused key (400), answers 500 to batches holding
    a poison key, knows only the runs in ``open_runs``, and may be down for the probe."""

    def __init__(self, refused: set[str] = frozenset(), poison: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.refused, self.poison = set(refused), set(poison)
        self.open_runs = {"r"}
        self.probe_down = False
        self.stored: list[Event] = []
        self.requests = 0
        self.probes = 0

    async def log_batch(self, batch: Batch, body: bytes, once: bool = False) -> None:
        self.requests += 1
        orjson.loads(body)  # the body is valid JSON whatever the values
        keys = {e[2] for e in batch.events()}
        if batch.run_id not in self.open_runs:
            raise NotFoundError("run gone", status=404, error_code="RESOURCE_DOES_NOT_EXIST")
        if keys & self.poison:
            raise ServerFault("runs/log-batch: HTTP 500", status=500, error_code="INTERNAL_ERROR")
        if keys & self.refused:
            raise ServerError("runs/log-batch: HTTP 400", status=400, error_code="INVALID_PARAMETER_VALUE")
        self.stored.extend(batch.events())

    async def run_is_open(self, run_id: str) -> bool:
        self.probes += 1
        if self.probe_down:
            raise ServerUnavailableError("down")
        return run_id in self.open_runs


def _metrics(n: int, run_id: str = "r", bad: dict[int, str] | None = None) -> Batch:
    bad = bad or {}
    return batch_of(run_id, [(METRIC, run_id, bad.get(i, f"m{i}"), float(i), 1, i) for i in range(n)])


def _deliver(batch: Batch, target: Target) -> tuple[int, list[tuple[list[Event], str]]]:
    sent: list[int] = []
    refused: list[tuple[list[Event], str]] = []
    asyncio.run(deliver(batch, target, sent.append, lambda events, why: refused.append((events, why))))
    return sum(sent), refused


def test_a_refused_event_is_isolated_by_bisection_and_the_rest_delivered() -> None:
    target = Target(refused={"bad"})
    sent, refused = _deliver(_metrics(64, bad={37: "bad"}), target)
    assert sent == 63 and len(target.stored) == 63
    assert [[e[2] for e in events] for events, _ in refused] == [["bad"]]
    assert target.requests <= 2 * 7 + 1  # log2(64) levels, two requests each, and the first


def test_a_poison_batch_is_probed_resent_once_then_bisected() -> None:
    target = Target(poison={"poison"})
    sent, refused = _deliver(_metrics(8, bad={3: "poison"}), target)
    assert sent == 7 and [e[2] for e in refused[0][0]] == ["poison"]
    assert "every time" in refused[0][1] or "HTTP 500" in refused[0][1]
    # Each 500 is probed (poison, or an outage answering 500?): once per level of the bisection.
    assert target.probes == 4


def test_a_run_the_server_lost_is_refused_whole_after_one_probe() -> None:
    target = Target()
    target.open_runs = set()
    sent, refused = _deliver(_metrics(500), target)
    assert sent == 0 and sum(len(events) for events, _ in refused) == 500
    assert target.requests == 1 and target.probes == 1
    assert "deleted or unknown" in refused[0][1]


def test_a_poison_batch_while_the_server_is_down_is_kept_not_refused() -> None:
    target = Target(poison={"m0"})
    target.probe_down = True
    with pytest.raises(ServerUnavailableError):
        _deliver(_metrics(4), target)


def test_nan_and_infinities_reach_the_body_as_strings() -> None:
    batch = batch_of("r", [(METRIC, "r", k, v, 1, 0) for k, v in (("a", float("nan")), ("b", float("inf")))])
    values = [m["value"] for m in orjson.loads(batch.encode())["metrics"]]
    assert values == ["NaN", "Infinity"]
