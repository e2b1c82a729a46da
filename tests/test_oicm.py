"""The OICM platform's conventions, end to end through an OICM-shaped gateway in front of MLflow."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracklane import ConfigurationError, ServerError, ServerUnavailableError, TrackingClient

from servers import MlflowServer, OicmGateway, Reader, free_port


def oicm_client(gateway: OicmGateway, **kwargs: object) -> TrackingClient:
    return TrackingClient(api_host=gateway.api_host, api_key=gateway.token, **kwargs)  # type: ignore[arg-type]


def only_run(reader: Reader, experiment_name: str) -> dict[str, object]:
    experiment = reader.experiment(experiment_name)
    assert experiment is not None, experiment_name
    [run] = reader.runs(experiment["experiment_id"])
    return run


def loop_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "tracklane")


# -- routing, credentials, headers -----------------------------------------------------------------


def test_runs_are_stored_through_the_workspace_path_with_the_bearer_token(
    oicm_gateway: OicmGateway, reader: Reader, experiment_name: str
) -> None:
    with oicm_client(oicm_gateway) as tc:
        tc.set_experiment(experiment_name, workspace_id="ws-one")
        with tc.start_run(run_name="through-gateway") as run:
            tc.log_param("model", "xgboost")
            tc.log_metric("auc", 0.91, step=3)

    assert reader.params(run.info.run_id) == {"model": "xgboost"}
    assert [(v, s) for v, s, _ in reader.history(run.info.run_id, "auc")] == [(0.91, 3)]
    assert set(oicm_gateway.workspaces_seen) == {"ws-one"}
    assert oicm_gateway.refused == 0


def test_a_wrong_api_key_is_refused_with_advice_and_without_the_key(
    oicm_gateway: OicmGateway, experiment_name: str
) -> None:
    secret = "tl-wrong-key-0123456789"
    with TrackingClient(api_host=oicm_gateway.api_host, api_key=secret) as tc:
        with pytest.raises(ServerError, match="api_key") as caught:
            tc.set_experiment(experiment_name, workspace_id="ws-one")
        shown = repr(tc)

    assert oicm_gateway.refused >= 1
    assert secret not in str(caught.value) and secret not in shown


def test_workload_id_header_goes_with_every_request(
    oicm_gateway: OicmGateway, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OIP_WORKLOAD_ID", "wl-42")
    with oicm_client(oicm_gateway) as tc:
        tc.set_experiment(experiment_name, workspace_id="ws-one")
        with tc.start_run():
            tc.log_metric("loss", 1.0)

    assert len(oicm_gateway.calls) >= 4  # experiment, run create, log-batch, run update
    assert oicm_gateway.workload_ids_seen == {"wl-42"}


# -- liveness and version at construction ------------------------------------------------------------


def test_a_service_reporting_itself_down_fails_construction_saying_so(oicm_gateway: OicmGateway) -> None:
    oicm_gateway.alive = False
    threads_before = loop_threads()

    with pytest.raises(ServerUnavailableError, match="down") as caught:
        oicm_client(oicm_gateway)

    assert oicm_gateway.api_host in str(caught.value)
    assert oicm_gateway.token not in str(caught.value)
    deadline = time.monotonic() + 5
    while loop_threads() > threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loop_threads() == threads_before  # the failed client left no loop thread behind


def test_a_host_that_is_not_the_tracking_service_fails_construction_naming_the_expected_form(
    mlflow_server: MlflowServer,
) -> None:
    wrong = f"{mlflow_server.url}/api/tracking"  # a server, but not OICM's tracking service

    with pytest.raises(ConfigurationError, match=r"https://HOST/api/tracking"):
        TrackingClient(api_host=wrong, api_key="k")


@pytest.mark.unit
def test_an_unreachable_host_fails_construction_saying_to_check_api_host() -> None:
    nobody = f"http://127.0.0.1:{free_port()}/api/tracking"

    with pytest.raises(ServerUnavailableError, match="Check api_host"):
        TrackingClient(api_host=nobody, api_key="k")


def test_a_version_reply_without_a_version_is_a_configuration_error(oicm_gateway: OicmGateway) -> None:
    oicm_gateway.version = None  # type: ignore[assignment]

    with pytest.raises(ConfigurationError, match="without a version"):
        oicm_client(oicm_gateway)


# -- UI links ------------------------------------------------------------------------------------------


def test_run_and_experiment_links_are_logged_after_start_run(
    oicm_gateway: OicmGateway, experiment_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    platform = oicm_gateway.api_host.removesuffix("/api/tracking")
    with oicm_client(oicm_gateway) as tc, caplog.at_level(logging.INFO, logger="tracklane"):
        experiment = tc.set_experiment(experiment_name, workspace_id="ws-links")
        with tc.start_run(run_name="linked") as run:
            pass

    experiment_page = f"{platform}/ws/ws-links/tracking/experiments/{experiment.experiment_id}"
    run_page = f"{experiment_page}/run/{run.info.run_id}/overview"
    messages = [r.getMessage() for r in caplog.records if r.name == "tracklane" and r.levelno == logging.INFO]
    assert any(run_page in m and experiment_page in m for m in messages), messages
    assert not any(oicm_gateway.token in r.getMessage() for r in caplog.records)


def test_hide_host_keeps_the_links_out_of_the_log(
    oicm_gateway: OicmGateway, experiment_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with oicm_client(oicm_gateway, hide_host=True) as tc, caplog.at_level(logging.DEBUG, logger="tracklane"):
        tc.set_experiment(experiment_name, workspace_id="ws-links")
        with tc.start_run():
            pass

    assert not [r for r in caplog.records if "/tracking/experiments/" in r.getMessage()]


def test_a_plain_mlflow_server_gets_no_links(
    server_url: str, experiment_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with TrackingClient(api_host=server_url) as tc, caplog.at_level(logging.INFO, logger="tracklane"):
        tc.set_experiment(experiment_name)
        with tc.start_run():
            pass

    assert not [r for r in caplog.records if "/tracking/experiments/" in r.getMessage()]


# -- TLS ---------------------------------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> ssl.SSLContext:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


@pytest.fixture
def tls_gateway(mlflow_server: MlflowServer, tmp_path: Path) -> Iterator[OicmGateway]:
    gateway = OicmGateway(mlflow_server.url, token="tl-secret-tls", ssl_context=_self_signed(tmp_path))
    gateway.start()
    yield gateway
    gateway.stop()


def test_an_untrusted_certificate_fails_construction_pointing_at_verify_ssl(tls_gateway: OicmGateway) -> None:
    with pytest.raises(ConfigurationError, match="verify_ssl=False"):
        oicm_client(tls_gateway)


def test_verify_ssl_false_warns_and_then_works_with_a_self_signed_certificate(
    tls_gateway: OicmGateway, reader: Reader, experiment_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tracklane"):
        tc = oicm_client(tls_gateway, verify_ssl=False)
    with tc:
        tc.set_experiment(experiment_name, workspace_id="ws-tls")
        with tc.start_run() as run:
            tc.log_metric("loss", 0.5)

    assert any("verify_ssl=False" in r.getMessage() for r in caplog.records)
    assert [v for v, _, _ in reader.history(run.info.run_id, "loss")] == [0.5]


# -- independent instances -----------------------------------------------------------------------------


def test_two_clients_in_two_workspaces_keep_their_own_experiment_run_and_environment(
    oicm_gateway: OicmGateway, reader: Reader, experiment_name: str
) -> None:
    environment = dict(os.environ)
    name_a, name_b = f"{experiment_name}-a", f"{experiment_name}-b"
    a, b = oicm_client(oicm_gateway), oicm_client(oicm_gateway)
    a.set_experiment(name_a, workspace_id="ws-a")
    b.set_experiment(name_b, workspace_id="ws-b")
    run_a = a.start_run(run_name="in-a")
    run_b = b.start_run(run_name="in-b")  # both active at once
    for step in range(50):
        a.log_metric("loss", 1.0 + step, step=step)
        b.log_metric("loss", -1.0 - step, step=step)
    a.set_tag("owner", "a")
    b.set_tag("owner", "b")
    assert a.active_run().info.run_id == run_a.info.run_id  # type: ignore[union-attr]
    assert b.active_run().info.run_id == run_b.info.run_id  # type: ignore[union-attr]
    a.close()  # closing one leaves the other working
    b.log_metric("after_a_closed", 1.0)
    b.end_run()
    b.close()

    assert dict(os.environ) == environment
    stored_a, stored_b = only_run(reader, name_a), only_run(reader, name_b)
    assert stored_a["info"]["run_id"] == run_a.info.run_id  # type: ignore[index]
    assert stored_b["info"]["run_id"] == run_b.info.run_id  # type: ignore[index]
    assert [v for v, _, _ in reader.history(run_a.info.run_id, "loss")] == [1.0 + s for s in range(50)]
    assert [v for v, _, _ in reader.history(run_b.info.run_id, "loss")] == [-1.0 - s for s in range(50)]
    assert reader.tags(run_a.info.run_id)["owner"] == "a" and reader.tags(run_b.info.run_id)["owner"] == "b"
    assert reader.history(run_a.info.run_id, "after_a_closed") == []
    for workspace, mine, theirs in (
        ("ws-a", (name_a, run_a.info.run_id), (name_b, run_b.info.run_id)),
        ("ws-b", (name_b, run_b.info.run_id), (name_a, run_a.info.run_id)),
    ):
        sent = [body for ws, _, body in oicm_gateway.calls if ws == workspace]
        assert any(mine[1].encode() in body for body in sent), workspace
        assert not any(key.encode() in body for body in sent for key in theirs), workspace


def test_two_clients_on_one_server_log_to_their_own_runs_side_by_side(
    server_url: str, reader: Reader, experiment_name: str
) -> None:
    environment = dict(os.environ)
    with TrackingClient(api_host=server_url) as a, TrackingClient(api_host=server_url) as b:
        a.set_experiment(f"{experiment_name}-a")
        b.set_experiment(f"{experiment_name}-b")
        with a.start_run() as run_a, b.start_run() as run_b:
            a.log_params({"client": "a"})
            b.log_params({"client": "b"})
            for step in range(20):
                a.log_metric("x", float(step), step=step)
                b.log_metric("x", float(-step), step=step)

    assert dict(os.environ) == environment
    assert only_run(reader, f"{experiment_name}-a")["info"]["run_id"] == run_a.info.run_id  # type: ignore[index]
    assert only_run(reader, f"{experiment_name}-b")["info"]["run_id"] == run_b.info.run_id  # type: ignore[index]
    assert reader.params(run_a.info.run_id) == {"client": "a"}
    assert reader.params(run_b.info.run_id) == {"client": "b"}
    assert [v for v, _, _ in reader.history(run_b.info.run_id, "x")] == [float(-s) for s in range(20)]
