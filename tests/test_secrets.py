"""The API key never appears in a repr, a log line (even at DEBUG), an exception, stats or a file."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest

from tracklane import ServerError, TrackingClient

from servers import OicmGateway


def test_the_api_key_stays_out_of_reprs_logs_errors_stats_and_files(
    oicm_gateway: OicmGateway,
    experiment_name: str,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    key = oicm_gateway.token
    with caplog.at_level(logging.DEBUG):
        tc = TrackingClient(api_host=oicm_gateway.api_host, api_key=key, path_to_storage=str(tmp_path))
        texts = [repr(tc), str(tc), repr(tc._engine.backend), repr(tc._engine.backend.config)]  # type: ignore[attr-defined]
        tc.set_experiment(experiment_name, workspace_id="ws-secret")
        with tc.start_run() as run:
            tc.log_metric("loss", 0.5)
            tc.log_param("api_key_name", "not the key itself")
        texts.append(repr(run))
        texts.append(repr(tc.stats()))
        tc.close()

        wrong = TrackingClient(api_host=oicm_gateway.api_host, api_key=key + "-wrong")
        with pytest.raises(ServerError) as refused:
            wrong.set_experiment(experiment_name, workspace_id="ws-secret")
        texts.append(str(refused.value))
        wrong.close()

    assert oicm_gateway.refused >= 1  # the wrong key really was refused by the gateway
    texts.append(caplog.text)
    for text in texts:
        assert key not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_a_client_cannot_be_pickled_with_its_key(server_url: str) -> None:
    with TrackingClient(api_host=server_url, api_key="sk-do-not-pickle") as tc, pytest.raises(TypeError):
        pickle.dumps(tc._engine.backend.config)  # type: ignore[attr-defined]


def test_tls_verification_is_on_unless_turned_off_with_a_warning(
    server_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with TrackingClient(api_host=server_url) as tc:
        assert tc._engine.backend.config.verify_ssl is True  # type: ignore[attr-defined]
    with (
        caplog.at_level(logging.WARNING, logger="tracklane"),
        TrackingClient(api_host=server_url, verify_ssl=False),
    ):
        pass
    assert "verification is off" in caplog.text
