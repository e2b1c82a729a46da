"""Credentials in a URL (``http://user:SECRET@host``) are taken out when the settings are parsed, sent
as basic auth, and never appear in a repr, a log line, an exception, ``stats()`` or a file."""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import tracklane.mlflow
from tracklane import MlflowClient, NotFoundError, ServerUnavailableError, TrackingClient
from tracklane._settings import strip_credentials

from faults import HostileProxy
from servers import MlflowServer

pytestmark = pytest.mark.server


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[HostileProxy]:
    p = HostileProxy(mlflow_server.url)
    p.start()
    yield p
    p.stop()


def test_strip_credentials_takes_user_and_password_out_of_the_url() -> None:
    assert strip_credentials("http://alice:s%40cret@host:5000/x") == ("http://host:5000/x", "alice", "s@cret")
    assert strip_credentials("https://token@host") == ("https://host", "token", None)
    assert strip_credentials("http://host:5000") == ("http://host:5000", None, None)


@pytest.mark.slow
def test_a_password_in_api_host_is_sent_as_basic_auth_and_shown_nowhere(
    proxy: HostileProxy, experiment_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "SECRET-" + uuid.uuid4().hex
    basic = base64.b64encode(f"alice:{secret}".encode()).decode()
    host = proxy.url.removeprefix("http://")
    storage = tmp_path / "storage"
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        tc = TrackingClient(
            api_host=f"http://alice:{secret}@{host}",
            path_to_storage=str(storage),
            retry_window=2,
            request_timeout=2,
        )
        texts += [repr(tc), str(tc), repr(tc._engine.backend), repr(tc._engine.backend.config)]  # type: ignore[attr-defined]
        tc.set_experiment(experiment_name)
        with tc.start_run(run_name="secretive", log_system_metrics=False) as run:
            tc.log_metric("loss", 0.5)
            assert tc.flush(timeout=60)
            # An outage: the rest is spilled to the journal, which names the server.
            proxy.answer("runs/log-batch", 503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}')
            for step in range(200):
                tc.log_metric("loss", step, step=step)
            tc.flush(timeout=5)
        texts += [repr(run), repr(tc.stats())]
        with pytest.raises(NotFoundError) as missing:
            tc.get_run("0" * 32)
        proxy.hang("runs/get")
        with pytest.raises(ServerUnavailableError) as hung:
            tc.get_run(run.info.run_id)
        texts += [str(missing.value), str(hung.value)]
        proxy.heal()
        tc.close(timeout=30)

        client = MlflowClient(f"http://alice:{secret}@{host}")
        texts += [repr(client), client._tracking_uri if hasattr(client, "_tracking_uri") else ""]
        tracklane.mlflow.set_tracking_uri(f"http://alice:{secret}@{host}")
        texts.append(tracklane.mlflow.get_tracking_uri())
    texts.append(caplog.text)

    assert proxy.authorization[f"Basic {basic}"] >= 3  # every request carried it
    assert (storage / "ml_runs").exists()  # the journal was written (the spill)
    for text in texts:
        assert secret not in text and basic not in text, text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and basic.encode() not in data, path
