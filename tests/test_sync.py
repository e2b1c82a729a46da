"""`tracklane sync`: offline runs and their data arrive on a real server, once, resumably."""

from __future__ import annotations

import asyncio
import io
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tracklane import ServerUnavailableError, TrackingClient
from tracklane._cli import main as cli
from tracklane._cli.sync import sync
from tracklane._settings import resolve_server
from tracklane._stores.journal import Journal, journal_file, server_key
from tracklane._stores.rest import RestBackend
from tracklane._wire.batching import Batch

from servers import OicmGateway, Reader

MAX_DOUBLE = 1.7976931348623157e308  # how the server stores the infinities


def _log_offline(storage: Path, experiment: str, run_name: str, points: int) -> tuple[str, dict[str, int]]:
    """Log a complete offline run; return its id and its start/end times as the client saw them."""
    with TrackingClient(offline_mode=True, path_to_storage=str(storage)) as tc:
        tc.set_experiment(experiment)
        with tc.start_run(run_name=run_name, tags=["baseline"]) as run:
            tc.log_params({"lr": 0.01, "optimizer": "adam"})
            tc.set_tag("owner", "ml-team")
            for step in range(points):
                tc.log_metrics({"loss": 1.0 / (step + 1), "acc": step / points}, step=step)
            tc.log_metric("special", math.nan, step=0)
            tc.log_metric("special", math.inf, step=1)
            tc.log_metric("special", -math.inf, step=2)
        stored = tc.get_run(run.info.run_id)
    assert stored.info.end_time is not None and stored.info.start_time is not None
    return run.info.run_id, {"start": stored.info.start_time, "end": stored.info.end_time}


def _server_run(reader: Reader, experiment: str) -> dict[str, object]:
    found = reader.experiment(experiment)
    assert found is not None, f"experiment {experiment!r} is not on the server"
    runs = reader.runs(found["experiment_id"])
    assert len(runs) == 1, f"expected exactly one run, found {len(runs)}"
    return runs[0]


def _sync(storage: Path, url: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = cli(["sync", str(storage), "--to", url, *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_offline_run_synced_later_arrives_complete(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader, capsys: pytest.CaptureFixture[str]
) -> None:
    offline_id, times = _log_offline(tmp_path, experiment_name, "trained-offline", points=2500)

    code, out = _sync(tmp_path, server_url, capsys)

    assert code == 0, out
    run = _server_run(reader, experiment_name)
    info, run_id = run["info"], run["info"]["run_id"]  # type: ignore[index]
    assert info["run_name"] == "trained-offline" and info["status"] == "FINISHED"
    assert (info["start_time"], info["end_time"]) == (times["start"], times["end"])
    loss = reader.history(run_id, "loss")
    assert [(v, s) for v, s, _ in loss] == [(1.0 / (s + 1), s) for s in range(2500)]
    assert len(reader.history(run_id, "acc")) == 2500
    special = [v for v, _, _ in reader.history(run_id, "special")]
    assert math.isnan(special[0]) and special[1:] == [MAX_DOUBLE, -MAX_DOUBLE]
    assert reader.params(run_id) == {"lr": "0.01", "optimizer": "adam"}
    tags = reader.tags(run_id)
    assert tags["owner"] == "ml-team" and tags["baseline"] == "_OI_USER_TAG"
    assert tags["tracklane.offline_run_id"] == offline_id


def test_repeated_sync_uploads_nothing_twice(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader, capsys: pytest.CaptureFixture[str]
) -> None:
    _log_offline(tmp_path, experiment_name, "once", points=300)
    assert _sync(tmp_path, server_url, capsys)[0] == 0

    code, out = _sync(tmp_path, server_url, capsys)

    assert code == 0 and "synced 0 run(s), 0 event(s)" in out
    run_id = _server_run(reader, experiment_name)["info"]["run_id"]  # type: ignore[index]
    assert len(reader.history(run_id, "loss")) == 300


class _FailsAfter(RestBackend):
    """A server connection that goes down for good after ``ok`` log-batch requests."""

    def __init__(self, url: str, ok: int) -> None:
        config = resolve_server(url, None)
        assert config is not None
        super().__init__(config, retry_window=1.0)
        self.ok = ok

    async def log_batch(self, batch: Batch, deadline: float | None = None) -> None:
        if self.ok <= 0:
            raise ServerUnavailableError("injected outage half-way through the sync")
        self.ok -= 1
        await super().log_batch(batch, deadline)


def _sync_with(backend: RestBackend, storage: Path, url: str) -> int:
    journal = Journal(journal_file(storage), create=False)

    async def go() -> int:
        try:
            return (await sync(journal, backend, server_key(url, None), out=io.StringIO())).sent
        finally:
            await backend.aclose()

    try:
        return asyncio.run(go())
    finally:
        journal.close()


def test_sync_interrupted_half_way_then_run_again_delivers_everything_exactly_once(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader
) -> None:
    _log_offline(tmp_path, experiment_name, "interrupted", points=3000)  # 6003 points, 5 params/tags
    flaky = _FailsAfter(server_url, ok=3)

    with pytest.raises(ServerUnavailableError, match="injected"):
        _sync_with(flaky, tmp_path, server_url)
    run_id = _server_run(reader, experiment_name)["info"]["run_id"]  # type: ignore[index]
    assert 0 < len(reader.history(run_id, "loss")) < 3000  # really half-way
    config = resolve_server(server_url, None)
    assert config is not None
    sent_second = _sync_with(RestBackend(config), tmp_path, server_url)
    sent_third = _sync_with(RestBackend(config), tmp_path, server_url)

    # The first sync delivered 3 requests (the params and tags, then 2 x 1000 points); the
    # second sends exactly the rest and the third nothing: no request is sent twice.
    assert sent_second == 6003 + 5 - (5 + 2000)
    assert sent_third == 0
    assert len(_server_run_ids(reader, experiment_name)) == 1
    assert [s for _, s, _ in reader.history(run_id, "loss")] == list(range(3000))
    assert len(reader.history(run_id, "acc")) == 3000
    assert reader.params(run_id) == {"lr": "0.01", "optimizer": "adam"}
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


def _server_run_ids(reader: Reader, experiment: str) -> list[str]:
    found = reader.experiment(experiment)
    assert found is not None
    return [r["info"]["run_id"] for r in reader.runs(found["experiment_id"])]


def test_sync_killed_mid_way_resumes_without_a_second_run(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader
) -> None:
    _log_offline(tmp_path, experiment_name, "killed", points=20_000)
    command = [sys.executable, "-m", "tracklane._cli", "sync", str(tmp_path), "--to", server_url]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Kill it as soon as the server has the run and some points, whatever the timing.
        journal = Journal(journal_file(tmp_path), create=False)
        try:
            _wait_until_mapped(journal, server_key(server_url, None), proc)
        finally:
            journal.close()
        proc.kill()
    finally:
        proc.communicate(timeout=60)

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert resumed.returncode == 0, resumed.stderr
    run_ids = _server_run_ids(reader, experiment_name)
    assert len(run_ids) == 1
    run_id = run_ids[0]
    assert [s for _, s, _ in reader.history(run_id, "loss")] == list(range(20_000))
    assert len(reader.history(run_id, "acc")) == 20_000


def _wait_until_mapped(journal: Journal, server: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(d.metric_mark > 0 for d in journal.deliveries(server)):
            return
        time.sleep(0.02)
    raise AssertionError(f"the sync never got going (exit {proc.poll()})")


def test_dry_run_prints_what_would_be_sent_and_sends_nothing(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader, capsys: pytest.CaptureFixture[str]
) -> None:
    _log_offline(tmp_path, experiment_name, "preview", points=10)

    code, out = _sync(tmp_path, server_url, capsys, "--dry-run")

    assert code == 0
    assert f"new run 'preview' in experiment {experiment_name!r}: 23 metric point(s)" in out
    assert "then status FINISHED" in out
    assert reader.experiment(experiment_name) is None


def test_sync_to_an_oicm_host_needs_a_workspace_and_uses_it(
    tmp_path: Path,
    oicm_gateway: OicmGateway,
    experiment_name: str,
    reader: Reader,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _log_offline(tmp_path, experiment_name, "to-oicm", points=50)
    key = ["--api-key", oicm_gateway.token]

    refused = _sync(tmp_path, oicm_gateway.api_host, capsys, *key)
    code, out = _sync(tmp_path, oicm_gateway.api_host, capsys, *key, "--workspace-id", "ws-42")

    assert refused[0] == 1 and "--workspace-id" in refused[1]
    assert code == 0, out
    assert "ws-42" in oicm_gateway.workspaces_seen
    assert oicm_gateway.token not in out
    run_id = _server_run(reader, experiment_name)["info"]["run_id"]  # type: ignore[index]
    assert len(reader.history(run_id, "loss")) == 50
