"""Fixtures: one real MLflow server per test session, an experiment name per test."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracklane import TrackingClient

from postgres import PgMlflowServer, PostgresNotFound, PostgresServer
from servers import FaultProxy, MlflowServer, OicmGateway, Reader

_counter = itertools.count()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The client reads these; a developer's shell must not leak into the tests.
    for name in (
        "OIP_TRACKING_SERVER",
        "OIP_WORKLOAD_ACCESS_KEY",
        "OIP_OFFLINE_MODE",
        "OIP_WORKLOAD_ID",
        "TRACKLANE_OVERFLOW",
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
    import tracklane.mlflow
    from tracklane._faces import session

    with session._lock:
        left = [s for s in session._shared.values() if s.from_mlflow_face]
        for s in left:
            del session._shared[s.key]
    for s in left:
        s.runtime.shutdown(10.0)
    tracklane.mlflow._fluent.__init__()  # type: ignore[misc]


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
