"""What the user is told: resuming a run by name says so once, the offline notice names
``tracklane ui``, and the README's snippets run as written on a fresh server."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tracklane import TrackingClient

from servers import MlflowServer, Reader

pytestmark = pytest.mark.server

README = Path(__file__).resolve().parents[1] / "README.md"


def test_resuming_a_run_by_name_says_so_once(
    client: TrackingClient, caplog: pytest.LogCaptureFixture, reader: Reader
) -> None:
    with caplog.at_level(logging.WARNING, logger="tracklane"):
        with client.start_run(run_name="smoke_test", log_system_metrics=False) as first:
            client.log_metric("loss", 1.0, step=0)
        fresh = [r for r in caplog.records if "resuming run" in r.getMessage()]
        with client.start_run(run_name="smoke_test", log_system_metrics=False) as second:
            client.log_metric("loss", 0.5, step=1)

    assert fresh == []  # a new run is not a resumption
    assert second.info.run_id == first.info.run_id
    said = [r.getMessage() for r in caplog.records if "resuming run" in r.getMessage()]
    assert said == [said[0]] and f"resuming run smoke_test ({first.info.run_id})" in said[0], said
    assert [s for _, s, _ in reader.history(first.info.run_id, "loss")] == [0, 1]


def test_the_offline_notice_names_tracklane_ui_and_tracklane_sync(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="tracklane"),
        TrackingClient(path_to_storage=str(tmp_path)) as tc,  # no server configured
    ):
        tc.set_experiment("offline")
        with tc.start_run(run_name="local", log_system_metrics=False):
            tc.log_metric("loss", 0.5)

    assert f"tracklane ui {tmp_path}" in caplog.text
    assert f"tracklane sync {tmp_path} --to URL" in caplog.text


def _readme_snippets() -> list[str]:
    """The README's runnable Python blocks that talk to ``http://127.0.0.1:5000``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return [b for b in blocks if '"http://127.0.0.1:5000"' in b and "async with" not in b]


@pytest.mark.slow
def test_the_readme_snippets_run_on_a_fresh_server(tmp_path: Path) -> None:
    snippets = _readme_snippets()
    assert len(snippets) >= 3  # TrackingClient, tracklane.mlflow, MlflowClient
    server = MlflowServer(tmp_path / "fresh")
    server.workdir.mkdir()
    server.start()
    try:
        for snippet in snippets:
            code = snippet.replace("http://127.0.0.1:5000", server.url).replace("100_000", "1_000")
            proc = subprocess.run(
                [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
            )
            assert proc.returncode == 0, f"{snippet}\n{proc.stderr[-2000:]}"
        reader = Reader(server.url)
        runs = reader.runs("0") + reader.runs(reader.experiment("my-first-experiment")["experiment_id"])  # type: ignore[index]
        names = {r["info"]["run_name"] for r in runs}
        assert {"smoke_test", "parent", "fold-1", "by-id"} <= names, names
    finally:
        server.stop()
