"""Configuration as MLflow reads it: ``MlflowClient()`` follows ``set_tracking_uri``; MLflow's
connection variables (basic auth, TLS, client certificate, timeout, retries) apply to every request
tracklane sends (engine, reads, artifact uploads, the plugin's log-batch, ``tracklane sync``); and
database URIs write into MLflow's own SQL store. Real servers: an auth proxy, a TLS proxy with a
certificate made at test time, and the session's MLflow server behind them."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

import tracklane.mlflow as tlm
from tracklane import AuthenticationError, ConfigurationError, ServerUnavailableError, TrackingClient
from tracklane._cli import main as cli
from tracklane._exceptions import CertificateError

from auth_tls import AuthProxy, Certs, make_certs, server_context
from servers import FaultProxy, MlflowServer, Reader

pytestmark = pytest.mark.server

USER, PASSWORD = "alice", "s3cret-pw"


@pytest.fixture
def auth_proxy(mlflow_server: MlflowServer) -> Iterator[AuthProxy]:
    proxy = AuthProxy(mlflow_server.url, USER, PASSWORD)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_proxy(mlflow_server: MlflowServer, certs: Certs) -> Iterator[AuthProxy]:
    proxy = AuthProxy(mlflow_server.url, ssl_context=server_context(certs))
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def mtls_proxy(mlflow_server: MlflowServer, certs: Certs) -> Iterator[AuthProxy]:
    proxy = AuthProxy(mlflow_server.url, ssl_context=server_context(certs, require_client_cert=True))
    proxy.start()
    yield proxy
    proxy.stop()


def _log_a_run(url: str, experiment: str) -> str:
    """The fluent module's everyday calls (runs/create, log-batch, an artifact upload, reads)."""
    tlm.set_tracking_uri(url)
    tlm.set_experiment(experiment)
    with tlm.start_run() as run:
        tlm.log_param("lr", 0.1)
        tlm.log_metrics({"loss": 0.5, "acc": 0.9}, step=1)
        tlm.set_tag("team", "ml")
        tlm.log_text("hello", "notes/hello.txt")
    assert tlm.get_run(run.info.run_id).data.params == {"lr": "0.1"}
    return run.info.run_id


def _assert_stored(reader: Reader, run_id: str) -> None:
    assert reader.params(run_id) == {"lr": "0.1"}
    assert reader.tags(run_id)["team"] == "ml"
    assert [p[0] for p in reader.history(run_id, "loss")] == [0.5]
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


# -- the tracking URI ------------------------------------------------------------------------------


def test_mlflow_client_without_uri_uses_the_fluent_tracking_uri(
    server_url: str, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    tlm.set_tracking_uri(server_url)
    client = tlm.MlflowClient()
    assert client.tracking_uri == server_url
    experiment_id = client.create_experiment(experiment_name)
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 0.25)
    client.set_terminated(run.info.run_id)
    assert [p[0] for p in reader.history(run.info.run_id, "loss")] == [0.25]
    # Nothing went to the offline journal (the directory holds the live client's event log).
    assert not (tmp_path / "ml_runs" / "tracklane.db").exists()


def test_mlflow_client_without_uri_then_env_then_default(
    server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_url)
    assert tlm.MlflowClient().tracking_uri == server_url
    tlm.set_tracking_uri("/tmp/elsewhere")
    assert tlm.MlflowClient().tracking_uri == "/tmp/elsewhere"  # set_tracking_uri wins, as in MLflow


# -- basic auth ------------------------------------------------------------------------------------


def test_basic_auth_variables_reach_every_request(
    auth_proxy: AuthProxy, experiment_name: str, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    run_id = _log_a_run(auth_proxy.url, experiment_name)
    _assert_stored(reader, run_id)
    assert auth_proxy.refused() == []
    assert auth_proxy.accepted("runs/log-batch") and auth_proxy.accepted("mlflow-artifacts/artifacts/")
    assert reader  # the artifact arrived through the proxy's artifact route
    assert "hello.txt" in str(tlm.MlflowClient(auth_proxy.url).list_artifacts(run_id, "notes"))


def test_basic_auth_missing_is_an_authentication_error(auth_proxy: AuthProxy, experiment_name: str) -> None:
    tlm.set_tracking_uri(auth_proxy.url)
    with pytest.raises(AuthenticationError) as caught:
        tlm.set_experiment(experiment_name)
    assert isinstance(caught.value, MlflowException) and caught.value.error_code == "UNAUTHENTICATED"
    assert PASSWORD not in str(caught.value)


def test_password_never_shows_in_a_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    from tracklane._settings import resolve_server

    config = resolve_server("http://127.0.0.1:1", None)
    assert config is not None and config.username == USER
    assert PASSWORD not in repr(config)


def test_plugin_log_batch_carries_basic_auth(
    auth_proxy: AuthProxy, experiment_name: str, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    mlflow.set_tracking_uri(f"tracklane+{auth_proxy.url}")
    try:
        mlflow.set_experiment(experiment_name)
        with mlflow.start_run() as run:
            mlflow.log_metric("loss", 0.5, step=1)
            mlflow.log_param("lr", 0.1)
    finally:
        mlflow.set_tracking_uri(None)
    assert reader.params(run.info.run_id) == {"lr": "0.1"}
    assert [p[0] for p in reader.history(run.info.run_id, "loss")] == [0.5]
    assert auth_proxy.accepted("runs/log-batch") and auth_proxy.refused() == []


def test_sync_sends_basic_auth(
    auth_proxy: AuthProxy,
    experiment_name: str,
    reader: Reader,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with TrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run():
            tc.log_metric("loss", 0.5)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    assert cli(["sync", str(tmp_path), "--to", auth_proxy.url]) == 0
    found = reader.experiment(experiment_name)
    assert found is not None and len(reader.runs(found["experiment_id"])) == 1
    assert auth_proxy.refused() == []


# -- TLS -------------------------------------------------------------------------------------------


def test_untrusted_certificate_fails_at_once_naming_the_setting(
    tls_proxy: AuthProxy, experiment_name: str
) -> None:
    tlm.set_tracking_uri(tls_proxy.url)
    with pytest.raises(CertificateError) as caught:  # not ServerUnavailableError after retries
        tlm.set_experiment(experiment_name)
    message = str(caught.value)
    assert "certificate" in message and "MLFLOW_TRACKING_SERVER_CERT_PATH" in message
    assert "MLFLOW_TRACKING_INSECURE_TLS" in message
    assert isinstance(caught.value, MlflowException)
    assert tls_proxy.seen == []  # the handshake failed: no request was ever made


def test_insecure_tls_variable_skips_the_certificate_check(
    tls_proxy: AuthProxy, experiment_name: str, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    _assert_stored(reader, _log_a_run(tls_proxy.url, experiment_name))


def test_server_cert_path_verifies_a_private_ca(
    tls_proxy: AuthProxy, certs: Certs, experiment_name: str, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(certs.ca))
    _assert_stored(reader, _log_a_run(tls_proxy.url, experiment_name))


def test_client_cert_path_is_presented(
    mtls_proxy: AuthProxy, certs: Certs, experiment_name: str, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(certs.ca))
    monkeypatch.setenv("MLFLOW_TRACKING_CLIENT_CERT_PATH", str(certs.client))
    _assert_stored(reader, _log_a_run(mtls_proxy.url, experiment_name))


def test_missing_client_cert_gets_no_request_through(
    mtls_proxy: AuthProxy, certs: Certs, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under TLS 1.3 a server that wants a client certificate just closes the connection (no TLS
    error reaches the client), so this is reported as a server that does not answer."""
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(certs.ca))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tlm.set_tracking_uri(mtls_proxy.url)
    with pytest.raises(ServerUnavailableError):
        tlm.set_experiment(experiment_name)
    assert mtls_proxy.seen == []


def test_insecure_and_cert_path_together_are_refused(monkeypatch: pytest.MonkeyPatch, certs: Certs) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(certs.ca))
    with pytest.raises(ConfigurationError, match="both set"):
        tlm.MlflowClient("https://127.0.0.1:1")


# -- timeout and retries -----------------------------------------------------------------------------


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    p = FaultProxy(mlflow_server.url)
    p.start()
    yield p
    p.stop()


def test_max_retries_variable_bounds_the_attempts(
    proxy: FaultProxy, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    proxy.answer("experiments/get-by-name", 503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}')
    client = tlm.MlflowClient(proxy.url)
    with pytest.raises(ServerUnavailableError):
        client.get_experiment_by_name(experiment_name)
    assert proxy.requests_to("experiments/get-by-name") == 3  # the first attempt and 2 retries


def test_request_timeout_variable_applies(
    proxy: FaultProxy, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "0.5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    proxy.delay("experiments/get-by-name", 5.0)
    client = tlm.MlflowClient(proxy.url)
    with pytest.raises(ServerUnavailableError, match="TimeoutError"):
        client.get_experiment_by_name(experiment_name)
    assert proxy.requests_to("experiments/get-by-name") == 1


def test_bad_connection_variables_are_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "soon"),
        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "-1"),
        ("MLFLOW_TRACKING_SERVER_CERT_PATH", "/no/such/ca.pem"),
        ("MLFLOW_TRACKING_INSECURE_TLS", "maybe"),
    ):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(ConfigurationError, match=name):
                tlm.MlflowClient("http://127.0.0.1:1")
    with monkeypatch.context() as m:
        m.setenv("MLFLOW_TRACKING_USERNAME", USER)
        with pytest.raises(ConfigurationError, match="MLFLOW_TRACKING_PASSWORD"):
            tlm.MlflowClient("http://127.0.0.1:1")


# -- database URIs: MLflow's own SQL store -----------------------------------------------------------


def test_sqlite_uri_writes_into_mlflows_own_store(tmp_path: Path, experiment_name: str) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tlm.set_tracking_uri(uri)
    tlm.set_experiment(experiment_name)
    with tlm.start_run(run_name="on-sqlite") as run:
        for step in range(50):
            tlm.log_metric("loss", 1.0 / (step + 1), step=step)
        tlm.log_param("lr", 0.1)
        tlm.set_tag("team", "ml")
        tlm.log_text("hello", "notes/hello.txt")
    # What `mlflow ui --backend-store-uri` would show: MLflow's own client on the same database.
    theirs = mlflow.MlflowClient(uri)
    stored = theirs.get_run(run.info.run_id)
    assert stored.info.status == "FINISHED" and stored.info.run_name == "on-sqlite"
    assert stored.data.params == {"lr": "0.1"} and stored.data.tags["team"] == "ml"
    assert [m.step for m in theirs.get_metric_history(run.info.run_id, "loss")] == list(range(50))
    assert [f.path for f in theirs.list_artifacts(run.info.run_id, "notes")] == ["notes/hello.txt"]
    assert theirs.get_experiment_by_name(experiment_name) is not None
    # tracklane reads it back as well, artifacts included
    assert tlm.search_runs(output_format="list")[0].info.run_id == run.info.run_id
    ours = tlm.MlflowClient(uri)
    assert [f.path for f in ours.list_artifacts(run.info.run_id, "notes")] == ["notes/hello.txt"]
    local = ours.download_artifacts(run.info.run_id, "notes/hello.txt", str(tmp_path))
    assert Path(local).read_text() == "hello"


def test_sqlite_uri_refusals_come_back_as_a_servers(tmp_path: Path, experiment_name: str) -> None:
    tlm.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(MlflowException) as caught:
        tlm.get_run("0" * 32)
    assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"


@pytest.mark.postgres
def test_postgresql_uri_writes_into_mlflows_own_store(postgres: object, experiment_name: str) -> None:
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is None:
        pytest.skip("no PostgreSQL driver installed")
    uri = postgres.url  # type: ignore[attr-defined]
    tlm.set_tracking_uri(uri)
    tlm.set_experiment(experiment_name)
    with tlm.start_run() as run:
        tlm.log_metric("loss", 0.5)
    assert mlflow.MlflowClient(uri).get_run(run.info.run_id).data.metrics == {"loss": 0.5}


def test_database_uri_without_mlflow_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(ConfigurationError, match=r"pip install 'tracklane\[mlflow\]'"):
        tlm.MlflowClient("sqlite:///mlflow.db")
