"""MLflow's exceptions from the MLflow faces: ``except mlflow.exceptions.MlflowException`` catches
what tracklane raises (fluent, client, plugin), with MLflow's error_code and HTTP status, and
tracklane's own hierarchy still holds. Without MLflow, ``tracklane.mlflow.exceptions`` stands in."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import mlflow
import pytest
from mlflow.exceptions import MlflowException

import tracklane.mlflow as tlm
from tracklane import (
    AuthenticationError,
    ConfigurationError,
    DeliveryError,
    InvalidInputError,
    NoActiveRunError,
    NotFoundError,
    ServerError,
    ServerUnavailableError,
    TrackingClient,
    TrackingError,
)
from tracklane._exceptions import RejectedEvent
from tracklane._faces.mlflow_errors import as_mlflow

pytestmark = pytest.mark.server


def test_fluent_bad_key_is_an_mlflow_invalid_parameter_value(server_url: str, experiment_name: str) -> None:
    tlm.set_tracking_uri(server_url)
    tlm.set_experiment(experiment_name)
    with tlm.start_run(), pytest.raises(MlflowException) as caught:
        tlm.log_metric("bad key!", 1.0)
    err = caught.value
    assert err.error_code == "INVALID_PARAMETER_VALUE"
    assert err.get_http_status_code() == 400
    assert (
        isinstance(err, InvalidInputError) and isinstance(err, ValueError) and isinstance(err, TrackingError)
    )
    assert "bad key!" in str(err) and err.message == str(err)


def test_fluent_changed_param_is_caught_by_mlflow_exception(server_url: str, experiment_name: str) -> None:
    tlm.set_tracking_uri(server_url)
    tlm.set_experiment(experiment_name)
    with tlm.start_run():
        tlm.log_param("lr", 0.1)
        with pytest.raises(mlflow.exceptions.MlflowException) as caught:
            tlm.log_param("lr", 0.2)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_client_unknown_run_is_resource_does_not_exist(server_url: str) -> None:
    client = tlm.MlflowClient(server_url)
    with pytest.raises(MlflowException) as caught:
        client.get_run("0" * 32)
    err = caught.value
    assert err.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert err.get_http_status_code() == 404
    assert isinstance(err, NotFoundError) and err.status == 404


def test_client_taken_experiment_name_keeps_the_servers_error_code(
    server_url: str, experiment_name: str
) -> None:
    client = tlm.MlflowClient(server_url)
    client.create_experiment(experiment_name)
    with pytest.raises(MlflowException) as caught:
        client.create_experiment(experiment_name)
    assert caught.value.error_code == "RESOURCE_ALREADY_EXISTS"
    assert caught.value.get_http_status_code() == 400


def test_client_hot_path_error_is_an_mlflow_exception(server_url: str) -> None:
    client = tlm.MlflowClient(server_url)
    with pytest.raises(MlflowException) as caught:
        client.log_metric("0" * 32, "loss", "not a number")  # type: ignore[arg-type]
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_tracklane_mlflow_exceptions_is_mlflows_class_when_installed() -> None:
    assert tlm.exceptions.MlflowException is MlflowException
    assert tlm.MlflowException is MlflowException
    from tracklane.mlflow.exceptions import MlflowException as imported

    assert imported is MlflowException


def test_plugin_validation_raises_mlflow_exception(server_url: str, experiment_name: str) -> None:
    mlflow.set_tracking_uri(f"tracklane+{server_url}")
    try:
        mlflow.set_experiment(experiment_name)
        with mlflow.start_run():
            mlflow.log_param("lr", 0.1)
            # MLflow's client re-raises an MlflowException of INVALID_PARAMETER_VALUE with its own
            # hint: only an MlflowException from the store gets that far.
            with pytest.raises(MlflowException) as caught:
                mlflow.log_param("lr", 0.2)
            assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
            assert "params cannot change" in str(caught.value)
    finally:
        mlflow.set_tracking_uri(None)


def test_oicm_face_raises_plain_tracklane_errors(server_url: str, experiment_name: str) -> None:
    """The OICM face is not an MLflow face: its errors are not made MlflowExceptions."""
    tc = TrackingClient(api_host=server_url)
    try:
        tc.set_experiment(experiment_name)
        tc.start_run()
        with pytest.raises(InvalidInputError) as caught:
            tc.log_metric("bad key!", 1.0)
        assert not isinstance(caught.value, MlflowException)
    finally:
        tc.close()


def _run_without_mlflow(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a Python where ``import mlflow`` fails, as where MLflow is not installed."""
    prelude = "import sys\nsys.modules['mlflow'] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_without_mlflow_tracklane_exceptions_stand_in(tmp_path: pytest.TempPathFactory) -> None:
    done = _run_without_mlflow(
        f"""
        import tracklane.mlflow as mlflow
        from tracklane.mlflow.exceptions import MlflowException
        assert mlflow.MlflowException is MlflowException is mlflow.exceptions.MlflowException
        mlflow.set_tracking_uri({str(tmp_path)!r})
        with mlflow.start_run():
            try:
                mlflow.log_metric("bad key!", 1.0)
            except mlflow.exceptions.MlflowException as e:
                print(type(e).__name__, e.error_code, e.get_http_status_code(), isinstance(e, ValueError))
        print("mlflow" in sys.modules and sys.modules["mlflow"] is not None)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["InvalidInputError INVALID_PARAMETER_VALUE 400 True", "False"]


def test_import_does_not_import_mlflow() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, tracklane, tracklane.mlflow; print('mlflow' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (InvalidInputError("x"), "INVALID_PARAMETER_VALUE", 400),
        (NotFoundError("x", status=404), "RESOURCE_DOES_NOT_EXIST", 404),
        (AuthenticationError("x", status=401), "UNAUTHENTICATED", 401),
        (AuthenticationError("x", status=403), "PERMISSION_DENIED", 403),
        (ServerError("x", status=503), "TEMPORARILY_UNAVAILABLE", 503),
        (ServerError("x", status=400, error_code="RESOURCE_ALREADY_EXISTS"), "RESOURCE_ALREADY_EXISTS", 400),
        (ServerUnavailableError("x"), "TEMPORARILY_UNAVAILABLE", 503),
        (NoActiveRunError("x"), "BAD_REQUEST", 400),
        (ConfigurationError("x"), "INVALID_PARAMETER_VALUE", 400),
        (TrackingError("x"), "INTERNAL_ERROR", 500),
    ],
)
def test_each_error_gets_mlflows_code_and_status(exc: TrackingError, code: str, status: int) -> None:
    err = as_mlflow(exc)
    assert isinstance(err, MlflowException) and isinstance(err, type(exc))
    assert (err.error_code, err.get_http_status_code()) == (code, status)
    assert str(err) == str(exc)


def test_delivery_error_keeps_its_rejected_events() -> None:
    rejected = [RejectedEvent("r" * 32, "param", "lr", "0.2", "Changing param values is not allowed")]
    err = as_mlflow(DeliveryError(rejected))
    assert isinstance(err, MlflowException) and isinstance(err, DeliveryError)
    assert err.rejected == rejected and err.error_code == "INVALID_PARAMETER_VALUE"


def test_fluent_server_refusals_are_mlflow_exceptions(server_url: str, experiment_name: str) -> None:
    """Refusals only the server makes (logging to, and ending, a run deleted meanwhile): flush raises
    DeliveryError, end_run the server's ServerError; both are MlflowExceptions with its code."""
    tlm.set_tracking_uri(server_url)
    tlm.set_experiment(experiment_name)
    run = tlm.start_run()
    tlm.MlflowClient(server_url).delete_run(run.info.run_id)
    tlm.log_param("lr", 0.1)
    with pytest.raises(MlflowException) as refused:
        tlm.flush()
    assert isinstance(refused.value, DeliveryError) and refused.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException) as ended:
        tlm.end_run()
    assert isinstance(ended.value, ServerError) and ended.value.error_code == "INVALID_PARAMETER_VALUE"
    assert ended.value.get_http_status_code() == 400
