"""Hung, trickling, flooding and hostile servers: every call ends, within the retry window plus one
request timeout, with an error that names the call and what to check; nothing is read whole,
nothing is written outside the destination.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tracklane import (
    ConfigurationError,
    MlflowClient,
    ServerError,
    ServerUnavailableError,
    TrackingClient,
    TrackingError,
)
from tracklane._stores.rest import MAX_JSON_REPLY

from faults import HostileProxy, run_json
from servers import MlflowServer, free_port

pytestmark = pytest.mark.server

RETRY_WINDOW = 3.0
REQUEST_TIMEOUT = 2.0
#: What "ends" means here: the retry window, one request timeout, and slack for a loaded machine.
BOUND = RETRY_WINDOW + REQUEST_TIMEOUT + 25.0


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[HostileProxy]:
    p = HostileProxy(mlflow_server.url)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def tc(proxy: HostileProxy, experiment_name: str, tmp_path: Path) -> Iterator[TrackingClient]:
    client = TrackingClient(
        api_host=proxy.url,
        retry_window=RETRY_WINDOW,
        request_timeout=REQUEST_TIMEOUT,
        exit_timeout=10,
        path_to_storage=str(tmp_path / "storage"),
    )
    client.set_experiment(experiment_name)
    yield client
    client.close(timeout=10)


def _ended(call: Callable[[], Any]) -> BaseException:
    """Run ``call`` in a thread; it must end within BOUND seconds by raising. Returns what it raised."""
    outcome: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(BOUND)
    assert not worker.is_alive(), f"the call was still blocked after {BOUND:.0f} s"
    assert outcome, "the call returned instead of raising"
    return outcome[0]


def _finished_run(tc: TrackingClient) -> str:
    with tc.start_run(run_name="target", log_system_metrics=False) as run:
        tc.log_text("hello", "notes/hello.txt")
    return run.info.run_id


# -- 1. every wait has a bound ------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["runs/get", "runs/search"])
def test_a_server_that_never_answers_ends_reads_and_searches_with_the_endpoint_named(
    tc: TrackingClient, proxy: HostileProxy, endpoint: str
) -> None:
    run_id = _finished_run(tc)
    proxy.hang(endpoint)
    call: Callable[[], Any] = (
        (lambda: tc.get_run(run_id))
        if endpoint == "runs/get"
        else (lambda: tc.start_run(run_name="target", log_system_metrics=False))  # resume by name: a search
    )

    error = _ended(call)

    assert isinstance(error, ServerUnavailableError), repr(error)
    assert endpoint in str(error) and "Check that the server is up" in str(error)
    assert proxy.requests_to(endpoint) >= 2  # retried within the window, then gave up


def test_a_reply_that_trickles_ends_get_run(tc: TrackingClient, proxy: HostileProxy) -> None:
    run_id = _finished_run(tc)
    proxy.trickle("runs/get", run_json(run_id), interval=0.5)

    error = _ended(lambda: tc.get_run(run_id))

    assert isinstance(error, ServerUnavailableError), repr(error)
    assert "runs/get" in str(error)


@pytest.mark.parametrize("fault", ["trickle", "hang"])
def test_a_download_that_trickles_or_hangs_ends_and_leaves_no_file(
    tc: TrackingClient, proxy: HostileProxy, tmp_path: Path, fault: str
) -> None:
    run_id = _finished_run(tc)
    dst = tmp_path / "dst"
    dst.mkdir()
    if fault == "trickle":
        proxy.trickle("artifacts", b"x" * 10_000, interval=0.5)
    else:
        proxy.hang("artifacts")

    error = _ended(lambda: tc.download_artifacts("notes/hello.txt", str(dst), run_id=run_id))

    assert isinstance(error, ServerUnavailableError), repr(error)
    assert "mlflow-artifacts/artifacts/" in str(error) and "notes/hello.txt" in str(error)
    assert not [p for p in dst.rglob("*") if p.is_file()]  # no half file left


# -- 2. replies are bounded and checked -------------------------------------------------------------


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_huge_reply_is_refused_without_being_read_whole(
    tc: TrackingClient, proxy: HostileProxy, declared: bool
) -> None:
    run_id = _finished_run(tc)
    size = 2 << 30 if declared else 300 << 20  # the 2 GB reply; 300 MB of spaces, chunked
    proxy.huge("runs/get", size, declared=declared)

    error = _ended(lambda: tc.get_run(run_id))

    assert isinstance(error, ServerError) and not isinstance(error, KeyError), repr(error)
    assert "runs/get" in str(error) and "64 MiB" in str(error)
    assert proxy.sent["runs/get"] < MAX_JSON_REPLY + (32 << 20)  # stopped reading at the cap


@pytest.mark.parametrize("body", [b"", b"{}", b'{"runs": []}'], ids=["blank", "empty-object", "other-key"])
def test_a_run_reply_without_the_run_says_it_is_not_mlflows_json(
    tc: TrackingClient, proxy: HostileProxy, body: bytes
) -> None:
    run_id = _finished_run(tc)
    proxy.answer("runs/get", 200, body)

    with pytest.raises(ConfigurationError, match="not MLflow's JSON") as raised:
        tc.get_run(run_id)

    assert "runs/get" in str(raised.value) and "'run'" in str(raised.value)


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[str]:
    """``python3 -m http.server``: a web server with no MLflow behind it."""
    port = free_port()
    (tmp_path / "www").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path / "www",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_web_server_that_is_not_mlflow_is_a_configuration_error_not_an_auth_error(
    file_server: str, experiment_name: str
) -> None:
    from tracklane import AuthenticationError

    with TrackingClient(api_host=file_server) as tc, pytest.raises(ConfigurationError) as get:
        tc.set_experiment(experiment_name)  # a GET: 404 and an HTML page
    with pytest.raises(ConfigurationError) as post:
        MlflowClient(file_server).create_experiment(experiment_name)  # a POST: 501

    for error in (get.value, post.value):
        assert not isinstance(error, AuthenticationError)
        assert "is not an MLflow tracking server" in str(error) and file_server in str(error)


def test_nothing_listening_fails_within_seconds_and_says_how_to_log_offline(experiment_name: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with TrackingClient(api_host=url) as tc, pytest.raises(ServerUnavailableError) as raised:
        tc.set_experiment(experiment_name)  # the default 30 s retry window
    waited = time.monotonic() - started

    assert waited < 15, waited  # the first contact is not retried for the whole window
    text = str(raised.value)
    assert "Nothing answers at" in text and url in text
    assert "offline_mode=True" in text and "tracklane sync" in text


# -- 3. downloads stay inside the destination --------------------------------------------------------


@pytest.mark.parametrize(
    "hostile", ["../../../../tmp/x", "/tmp/y", "sub/../../escape"], ids=["dotdot", "absolute", "inner-dotdot"]
)
def test_a_listing_that_names_a_path_outside_the_destination_is_refused_and_writes_nothing(
    tc: TrackingClient, proxy: HostileProxy, tmp_path: Path, hostile: str
) -> None:
    run_id = _finished_run(tc)
    outside = tmp_path / "outside"
    dst = outside / "a" / "b" / "c" / "dst"  # ../../../../ from here is still under tmp_path
    dst.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")}
    proxy.listing([{"path": "fine.txt", "is_dir": False, "file_size": 7}, {"path": hostile, "is_dir": False}])

    with pytest.raises(TrackingError) as raised:
        tc.download_artifacts("", str(dst), run_id=run_id)

    assert hostile in str(raised.value) and "Refusing" in str(raised.value)
    assert {p for p in tmp_path.rglob("*")} == before  # nothing written anywhere, not even fine.txt


def test_a_listed_name_through_a_symlink_out_of_the_destination_is_refused(
    tc: TrackingClient, proxy: HostileProxy, tmp_path: Path
) -> None:
    run_id = _finished_run(tc)
    dst, elsewhere = tmp_path / "dst", tmp_path / "elsewhere"
    dst.mkdir()
    elsewhere.mkdir()
    (dst / "link").symlink_to(elsewhere)
    proxy.listing([{"path": "link/planted.txt", "is_dir": False, "file_size": 7}])

    with pytest.raises(TrackingError, match=r"link/planted\.txt"):
        tc.download_artifacts("", str(dst), run_id=run_id)

    assert list(elsewhere.iterdir()) == []


def test_restore_artifact_refuses_a_hostile_listing(tc: TrackingClient, proxy: HostileProxy) -> None:
    run_id = _finished_run(tc)
    proxy.listing([{"path": "../../model.json", "is_dir": False, "file_size": 7}])

    with pytest.raises(TrackingError, match=r"Refusing .*'\.\./\.\./model\.json'"):
        tc.restore_artifact("../../model", run_id=run_id)


def test_an_honest_listing_still_downloads(tc: TrackingClient, tmp_path: Path) -> None:
    run_id = _finished_run(tc)
    dst = tmp_path / "dst"
    dst.mkdir()

    local = tc.download_artifacts("", str(dst), run_id=run_id)

    assert (Path(local) / "notes" / "hello.txt").read_text() == "hello"


def test_an_upload_to_a_server_that_never_answers_ends(
    tc: TrackingClient, proxy: HostileProxy, tmp_path: Path
) -> None:
    import asyncio

    from tracklane._settings import resolve_server
    from tracklane._stores.rest import RestBackend

    run_id = _finished_run(tc)
    config = resolve_server(proxy.url, None, request_timeout=REQUEST_TIMEOUT)
    assert config is not None
    backend = RestBackend(config, retry_window=RETRY_WINDOW)
    model = tmp_path / "model.bin"
    model.write_bytes(b"m" * (1 << 20))
    proxy.hang("artifacts")

    async def upload() -> None:
        try:
            await backend.put_artifact(run_id, "model.bin", model)
        finally:
            await backend.aclose()

    error = _ended(lambda: asyncio.run(upload()))

    assert isinstance(error, ServerUnavailableError), repr(error)
    assert "mlflow-artifacts/artifacts/" in str(error) and "model.bin" in str(error)


def test_sync_reads_no_snapshot_outside_the_journals_artifact_area(
    tmp_path: Path, mlflow_server: MlflowServer, experiment_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    from tracklane._cli import main as cli

    from servers import Reader

    storage = tmp_path / "storage"
    with TrackingClient(offline_mode=True, path_to_storage=str(storage)) as offline:
        offline.set_experiment(experiment_name)
        with offline.start_run(run_name="tampered", log_system_metrics=False):
            offline.log_text("fine", "notes.txt")
    secret = tmp_path / "not-yours.txt"
    secret.write_text("private")
    db = sqlite3.connect(storage / "ml_runs" / "tracklane.db")
    with db:
        db.execute("UPDATE artifacts SET file = ?", ("../../../not-yours.txt",))
    db.close()

    code = cli(["sync", str(storage), "--to", mlflow_server.url])
    out = capsys.readouterr()

    assert code == 2, out.out + out.err  # the row is refused and listed, the rest delivered
    assert "Refusing" in out.err and "not-yours.txt" in out.err
    reader = Reader(mlflow_server.url)
    found = reader.experiment(experiment_name)
    assert found is not None
    [run] = reader.runs(found["experiment_id"])
    assert run["info"]["status"] == "FINISHED"
    import json
    import urllib.parse
    import urllib.request

    where = urllib.parse.urlencode({"path": run["info"]["artifact_uri"].split("artifacts:/")[-1].strip("/")})
    with urllib.request.urlopen(f"{mlflow_server.url}/api/2.0/mlflow-artifacts/artifacts?{where}") as reply:
        listing = json.loads(reply.read() or b"{}")
    assert not listing.get("files"), listing  # nothing uploaded from outside the journal
