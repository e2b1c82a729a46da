"""Fixtures: one real MLflow server per test session, an experiment name per test; and the tiers.

Every test has a tier marker (registered in pyproject.toml): ``unit`` (no server, fast),
``server``, ``postgres``, ``frameworks``, ``slow``. A test that uses a server fixture is marked
``server`` here (``postgres`` too for the PostgreSQL ones), so a module need not say it; a test with
no tier at all, or marked ``unit`` while it uses a server, stops the collection with a message. A
``unit`` test that starts a server anyway fails at the start.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracklane import TrackingClient

from postgres import PgMlflowServer, PostgresNotFound, PostgresServer
from servers import FaultProxy, MlflowServer, OicmGateway, Reader

_counter = itertools.count()

TIERS = ("unit", "server", "postgres", "frameworks", "slow")
#: The fixtures that start (or stand on) a real server, by the tier they put a test in.
SERVER_FIXTURES = frozenset(
    {"mlflow_server", "server_url", "reader", "restartable_server", "oicm_gateway", "client", "fault_proxy"}
)
POSTGRES_FIXTURES = frozenset({"postgres", "pg_mlflow_server"})


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Under ``-m unit`` (or any selection that needs the mark), skip importing the test modules
    that never say ``mark.unit``: the ``unit`` mark is only ever explicit, and importing the
    framework tests' modules alone costs seconds."""
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    if not _selection_needs_unit(config.getoption("markexpr", "")):
        return None
    return b"mark.unit" not in collection_path.read_bytes() or None


def _selection_needs_unit(markexpr: str) -> bool:
    """Whether ``-m markexpr`` selects no test that lacks the ``unit`` mark, whatever else it has."""
    if not markexpr:
        return False
    try:
        from _pytest.mark.expression import Expression  # pytest's own parser of -m

        expression = Expression.compile(markexpr)
    except Exception:  # another pytest's internals, or a bad expression pytest reports itself
        return False
    others = [tier for tier in TIERS if tier != "unit"]
    for bits in itertools.product((False, True), repeat=len(others)):
        present = {name for name, on in zip(others, bits, strict=True) if on}
        try:
            if expression.evaluate(lambda name, present=present, **_: name in present):
                return False
        except Exception:  # an expression with marker arguments: collect everything, as pytest does
            return False
    return True


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by the markers added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    untiered, contradicted = [], []
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & POSTGRES_FIXTURES:
            item.add_marker(pytest.mark.postgres)
        if used & (SERVER_FIXTURES | POSTGRES_FIXTURES):
            item.add_marker(pytest.mark.server)
        names = {mark.name for mark in item.iter_markers()}
        if "unit" in names and names & {"server", "postgres"}:
            contradicted.append(item.nodeid)
        if not names & set(TIERS):
            untiered.append(item.nodeid)
    problems = []
    if untiered:
        problems.append(
            "these tests have no tier: mark the module (pytestmark = pytest.mark.unit, or server, "
            "postgres, frameworks, slow) or the test:\n  " + "\n  ".join(untiered)
        )
    if contradicted:
        problems.append(
            "these tests are marked unit but use a server fixture: drop the unit mark:\n  "
            + "\n  ".join(contradicted)
        )
    if problems:
        raise pytest.UsageError("\n".join(problems))


@pytest.fixture(autouse=True)
def _unit_starts_no_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a ``unit`` test, starting an MLflow server or PostgreSQL fails the test, naming the tier."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{request.node.nodeid} is marked unit but starts a server: mark it server")

    monkeypatch.setattr(MlflowServer, "start", refuse)
    monkeypatch.setattr(PostgresServer, "start", refuse)


#: Modules whose every test runs with both senders (issue 20): the delivery behaviours, once with
#: the in-process worker and once with the sender process. Elsewhere the sender is the shell's
#: ``TRACKLANE_SENDER`` (default thread): ``TRACKLANE_SENDER=process python3 -m pytest`` runs the
#: whole suite with the sender process.
BOTH_SENDERS = frozenset(
    {
        "test_promise_delivery",
        "test_promise_journal",
        "test_outages",
        "test_spill",
        "test_exit_paths",
        "test_exit_flush",
        "test_delivery_errors",
        "test_full_disk",
        "test_counts_are_true",
        "test_fork_signals_threads",
        "test_overflow_and_stats",
        "test_logging_end_to_end",
        "test_wait_progress",
        "test_hostile_servers",
    }
)
_SHELL_SENDER = os.environ.get("TRACKLANE_SENDER", "thread")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "sender" in metafunc.fixturenames and metafunc.module.__name__.rsplit(".", 1)[-1] in BOTH_SENDERS:
        metafunc.parametrize("sender", ["thread", "process"], indirect=True)


@pytest.fixture(autouse=True)
def sender(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, _clean_env: None) -> str:
    """Who delivers the event log in this test (``TRACKLANE_SENDER``, for the test's own clients
    and the processes it starts). A test marked ``thread_sender`` pins the in-process worker's own
    mechanics (the memory buffer's bound and overflow policies, the journal taking the overflow,
    recovery of a dead writer's log with no sender): it is skipped with the sender process."""
    which = str(getattr(request, "param", _SHELL_SENDER))
    if which == "process" and request.node.get_closest_marker("thread_sender") is not None:
        pytest.skip("pins the in-process worker's mechanics (TRACKLANE_SENDER=thread)")
    monkeypatch.setenv("TRACKLANE_SENDER", which)
    return which


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The client reads these; a developer's shell must not leak into the tests.
    for name in (
        "OIP_TRACKING_SERVER",
        "OIP_WORKLOAD_ACCESS_KEY",
        "OIP_OFFLINE_MODE",
        "OIP_WORKLOAD_ID",
        "TRACKLANE_OVERFLOW",
        "TRACKLANE_EVENT_LOG_MAX_BYTES",
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
        "MLFLOW_SYSTEM_METRICS_NODE_ID",
        "MLFLOW_RUN_ID",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_INSECURE_TLS",
        "MLFLOW_TRACKING_SERVER_CERT_PATH",
        "MLFLOW_TRACKING_CLIENT_CERT_PATH",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_TRUNCATE_LONG_VALUES",
        "MLFLOW_REGISTRY_URI",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_TAGS",
        "MLFLOW_NESTED_RUN",
        "MLFLOW_FLATTEN_PARAMS",
        "HF_MLFLOW_LOG_ARTIFACTS",
        "MLFLOW_MAX_LOG_PARAMS",
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    # MLflow 3 reports usage to a host beyond this machine unless told not to.
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _fresh_mlflow_faces() -> Iterator[None]:
    """Each test starts with no engine left by another test's MlflowClient or tracklane.mlflow
    (they live for the process, as MLflow's do), so a TrackingClient built here never joins one."""
    yield
    from tracklane._faces import session

    session.reset(timeout=10.0)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server_url(mlflow_server: MlflowServer) -> str:
    return mlflow_server.url


@pytest.fixture
def reader(mlflow_server: MlflowServer) -> Reader:
    return Reader(mlflow_server.url)


@pytest.fixture
def experiment_name(request: pytest.FixtureRequest) -> str:
    return f"{request.node.name[:60]}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def restartable_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A server of the test's own, which the test may stop and start again (an outage)."""
    server = MlflowServer(tmp_path / "restartable")
    server.workdir.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def oicm_gateway(mlflow_server: MlflowServer) -> Iterator[OicmGateway]:
    gateway = OicmGateway(mlflow_server.url, token="tl-secret-" + uuid.uuid4().hex)
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture
def client(server_url: str, experiment_name: str) -> Iterator[TrackingClient]:
    """A TrackingClient on the session server, with its own experiment set."""
    tc = TrackingClient(api_host=server_url, exit_timeout=10)
    tc.set_experiment(experiment_name)
    yield tc
    tc.close()


@pytest.fixture
def fault_proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(mlflow_server.url)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the session's own on 127.0.0.1; skips where the binaries are not installed."""
    server = PostgresServer()
    try:
        server.start()
    except PostgresNotFound as exc:
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_mlflow_server(
    postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgMlflowServer]:
    """``mlflow server`` with 2 workers storing into ``postgres``: the setup of a shared team server."""
    server = PgMlflowServer(tmp_path_factory.mktemp("pg-mlflow"), postgres.url, workers=2)
    server.start()
    yield server
    server.stop()
