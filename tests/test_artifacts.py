"""Artifacts: files, trees, text, dicts, figures, images, tables and objects reach a real `mlflow server`
byte for byte, through every face, the OICM gateway, an offline run synced later and a server crash.

What the server stored is read back with MLflow's own ``MlflowClient.download_artifacts``, so a bug in
tracklane's artifact code cannot hide itself; the expected bytes of rendered content come from
``tracklane._artifacts.kinds``, which renders what MLflow's own calls store.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tracklane import DeliveryError, InvalidInputError, MlflowClient, TrackingClient
from tracklane._artifacts import kinds
from tracklane._cli.mlflow_server import QUIET_MLFLOW, stop_process, wait_for_http

from servers import MlflowServer, OicmGateway, Reader, free_port, tracklane_cli

MB = 1024 * 1024


# -- helpers -----------------------------------------------------------------------------------------


def write_random(path: Path, size: int) -> str:
    """A file of ``size`` random bytes; its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for _ in range(size // MB):
            chunk = os.urandom(MB)
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MB):
            digest.update(chunk)
    return digest.hexdigest()


def write_tree(root: Path) -> dict[str, bytes]:
    """A small directory tree; its files' contents by relative posix path."""
    files = {
        "readme.txt": b"top level\n",
        "data/train.csv": b"x,y\n1,2\n3,4\n",
        "data/deeper/weights.bin": os.urandom(70_000),
        "data/deeper/empty.txt": b"",
    }
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
    return files


def online_client(url: str, tmp_path: Path) -> TrackingClient:
    """A TrackingClient on ``url`` with a journal of the test's own (so it shares no engine)."""
    return TrackingClient(api_host=url, path_to_storage=str(tmp_path / "storage"), exit_timeout=60)


def mlflow_download(url: str, run_id: str, path: str, dst: Path) -> Path:
    """``path`` of the run's artifacts, downloaded by MLflow's own client into ``dst``."""
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.MlflowClient(tracking_uri=url).download_artifacts(run_id, path, str(dst)))


def mlflow_listing(url: str, run_id: str, path: str) -> list[str]:
    import mlflow

    return sorted(f.path for f in mlflow.MlflowClient(tracking_uri=url).list_artifacts(run_id, path))


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def only_run_id(reader: Reader, experiment_name: str) -> str:
    experiment = reader.experiment(experiment_name)
    assert experiment is not None, experiment_name
    [run] = reader.runs(experiment["experiment_id"])
    return str(run["info"]["run_id"])


def clean_env() -> dict[str, str]:
    """The test process's environment without the tracking settings of a developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OIP_", "TRACKLANE_"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    return env


# -- files and directory trees, TrackingClient ---------------------------------------------------------


def test_a_large_file_and_a_directory_tree_arrive_byte_for_byte(
    server_url: str, experiment_name: str, tmp_path: Path
) -> None:
    big = tmp_path / "src" / "model.bin"
    big_digest = write_random(big, 50 * MB)
    tree = write_tree(tmp_path / "src" / "tree")

    with TrackingClient(
        api_host=server_url, path_to_storage=str(tmp_path / "storage"), exit_timeout=60
    ) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run(log_system_metrics=False) as run:
            tc.log_artifact(str(big), "checkpoints")
            tc.log_artifacts(str(tmp_path / "src" / "tree"), "tree")
            tc.log_artifact(tmp_path / "src" / "tree" / "readme.txt")  # a PathLike, at the root
            uri = tc.get_artifact_uri("checkpoints")
    run_id = run.info.run_id

    back = tmp_path / "back"
    assert sha256(mlflow_download(server_url, run_id, "checkpoints/model.bin", back)) == big_digest
    assert files_under(mlflow_download(server_url, run_id, "tree", back)) == tree
    assert mlflow_download(server_url, run_id, "readme.txt", back).read_bytes() == b"top level\n"
    assert uri.startswith("mlflow-artifacts:/") and uri.endswith(f"{run_id}/artifacts/checkpoints")
    assert Reader(server_url).run(run_id)["info"]["status"] == "FINISHED"


def test_a_file_changed_or_deleted_right_after_log_artifact_is_uploaded_as_it_was(
    server_url: str, experiment_name: str, tmp_path: Path
) -> None:
    rewritten, deleted = tmp_path / "checkpoint.pt", tmp_path / "notes.txt"
    rewritten.write_bytes(b"epoch 1 weights")
    deleted.write_bytes(b"written before the call")

    with TrackingClient(
        api_host=server_url, path_to_storage=str(tmp_path / "storage"), exit_timeout=60
    ) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run(log_system_metrics=False) as run:
            tc.log_artifact(str(rewritten), "ckpt")
            with open(rewritten, "r+b") as f:  # in place, as torch.save rewrites the same file
                f.write(b"EPOCH 2 WEIGHTS, longer than before")
            tc.log_artifact(str(deleted))
            deleted.unlink()

    back = tmp_path / "back"
    assert mlflow_download(server_url, run.info.run_id, "ckpt/checkpoint.pt", back).read_bytes() == (
        b"epoch 1 weights"
    )
    assert mlflow_download(server_url, run.info.run_id, "notes.txt", back).read_bytes() == (
        b"written before the call"
    )


# -- rendered content, through the fluent module (a process of its own: its state is process-wide) ------

CONTENT = """
import matplotlib
matplotlib.use("Agg")
import numpy as np
from matplotlib.figure import Figure

TEXT = "loss went down\\nnon-ASCII kept: \\u00e9\\u00fc\\u4e2d\\n"
CONFIG = {"lr": 0.01, "layers": [64, 32], "optimizer": {"name": "adam", "betas": [0.9, 0.999]}}
FIGURE = Figure(figsize=(4, 3))
FIGURE.subplots().plot([0, 1, 2, 3], [1.0, 0.6, 0.4, 0.3])
IMAGE = np.random.default_rng(7).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
TABLE = {"epoch": [1, 2, 3], "loss": [1.0, 0.6, 0.4], "split": ["train", "train", "val"]}
"""

FLUENT_SCRIPT = """
import sys
import tracklane.mlflow as mlflow

url, experiment = sys.argv[1:3]
mlflow.set_tracking_uri(url)
mlflow.set_experiment(experiment)
with mlflow.start_run(log_system_metrics=False) as run:
    mlflow.log_text(TEXT, "notes/summary.txt")
    mlflow.log_dict(CONFIG, "config/params.json")
    mlflow.log_dict(CONFIG, "config/params.yaml")
    mlflow.log_figure(FIGURE, "plots/loss.png")
    mlflow.log_image(IMAGE, "images/sample.png")
    mlflow.log_image(IMAGE, key="samples", step=3)
    mlflow.log_table(TABLE, "tables/scores.json")
print("RUN_ID", run.info.run_id, flush=True)
"""


def test_text_dicts_a_figure_an_image_and_a_table_are_stored_as_mlflow_renders_them(
    server_url: str, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    script = textwrap.dedent(CONTENT) + textwrap.dedent(FLUENT_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-c", script, server_url, experiment_name],
        env=clean_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [run_id] = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("RUN_ID ")]
    content: dict[str, Any] = {}
    exec(textwrap.dedent(CONTENT), content)  # the same objects, rendered here for the expected bytes

    expected = {
        "notes/summary.txt": kinds.text_bytes(content["TEXT"]),
        "config/params.json": kinds.dict_bytes(content["CONFIG"], "config/params.json"),
        "config/params.yaml": kinds.dict_bytes(content["CONFIG"], "config/params.yaml"),
        "plots/loss.png": kinds.figure_bytes(content["FIGURE"], "plots/loss.png"),
        "images/sample.png": kinds.image_bytes(content["IMAGE"], "images/sample.png"),
        "tables/scores.json": kinds.table_bytes(content["TABLE"], "tables/scores.json"),
    }
    back = tmp_path / "back"
    for path, data in expected.items():
        assert mlflow_download(server_url, run_id, path, back).read_bytes() == data, path
    assert json.loads(expected["config/params.json"]) == content["CONFIG"]

    steps = [
        p for p in mlflow_listing(server_url, run_id, "images") if p.startswith("images/samples+step+3+")
    ]
    assert len(steps) == 2 and sum(p.endswith("+compressed.webp") for p in steps) == 1, steps
    [full] = [p for p in steps if p.endswith(".png")]
    assert mlflow_download(server_url, run_id, full, back).read_bytes() == kinds.image_bytes(content["IMAGE"])

    tags = reader.tags(run_id)
    assert tags[kinds.LOGGED_IMAGES_TAG] == kinds.LOGGED_IMAGES_TAG_VALUE
    assert {"path": "tables/scores.json", "type": "table"} in json.loads(tags[kinds.LOGGED_ARTIFACTS_TAG])
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


# -- the OICM gateway ----------------------------------------------------------------------------------


def test_artifacts_go_through_the_oicm_workspace_path_with_the_bearer_token(
    oicm_gateway: OicmGateway, server_url: str, experiment_name: str, tmp_path: Path
) -> None:
    data = tmp_path / "dataset.bin"
    digest = write_random(data, 12 * MB)  # more than the gateway would take as one body

    with TrackingClient(
        api_host=oicm_gateway.api_host,
        api_key=oicm_gateway.token,
        path_to_storage=str(tmp_path / "storage"),
        exit_timeout=60,
    ) as tc:
        tc.set_experiment(experiment_name, workspace_id="ws-artifacts")
        with tc.start_run(log_system_metrics=False) as run:
            tc.log_artifact(str(data), "data")
            tc.log_text("through the gateway", "notes/readme.txt")
        run_id = run.info.run_id
        listed = tc.list_artifacts("data", run_id=run_id)
        (tmp_path / "via-gateway").mkdir()
        local = tc.download_artifacts("notes", str(tmp_path / "via-gateway"), run_id=run_id)

    back = tmp_path / "back"
    assert sha256(mlflow_download(server_url, run_id, "data/dataset.bin", back)) == digest
    assert (
        mlflow_download(server_url, run_id, "notes/readme.txt", back).read_bytes() == b"through the gateway"
    )
    assert [(f.path, f.is_dir, f.file_size) for f in listed] == [("data/dataset.bin", False, 12 * MB)]
    assert files_under(Path(local)) == {"readme.txt": b"through the gateway"}
    artifact_calls = [c for c in oicm_gateway.calls if c[1].startswith("mlflow-artifacts/")]
    assert artifact_calls and {ws for ws, _, _ in artifact_calls} == {"ws-artifacts"}
    assert oicm_gateway.refused == 0


# -- offline, then `tracklane sync` ---------------------------------------------------------------------


def test_offline_artifacts_arrive_with_tracklane_sync(
    server_url: str, experiment_name: str, reader: Reader, tmp_path: Path
) -> None:
    storage = tmp_path / "offline"
    data = tmp_path / "src" / "features.bin"
    digest = write_random(data, 3 * MB)
    tree = write_tree(tmp_path / "src" / "tree")

    with TrackingClient(offline_mode=True, path_to_storage=str(storage)) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run(run_name="offline-artifacts", log_system_metrics=False):
            tc.log_param("lr", "0.1")
            tc.log_artifact(str(data), "data")
            tc.log_artifacts(str(tmp_path / "src" / "tree"), "tree")
            tc.log_text("logged offline", "notes.txt")
            tc.log_dict({"epochs": 3}, "config.json")
    data.unlink()  # the journal holds its own copies

    synced = tracklane_cli("sync", str(storage), "--to", server_url, timeout=180)
    assert synced.returncode == 0, synced.stdout[-2000:] + synced.stderr[-2000:]

    run_id = only_run_id(reader, experiment_name)
    back = tmp_path / "back"
    assert sha256(mlflow_download(server_url, run_id, "data/features.bin", back)) == digest
    assert files_under(mlflow_download(server_url, run_id, "tree", back)) == tree
    assert mlflow_download(server_url, run_id, "notes.txt", back).read_bytes() == b"logged offline"
    assert mlflow_download(server_url, run_id, "config.json", back).read_bytes() == kinds.dict_bytes(
        {"epochs": 3}, "config.json"
    )
    assert reader.params(run_id) == {"lr": "0.1"}
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


# -- a server crash during a large upload --------------------------------------------------------------


def crash(server: MlflowServer) -> None:
    """Kill the server's whole process group at once: the upload it is receiving is cut off."""
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)


def wait_for_upload_to_begin(destination: Path, run_id: str, timeout: float = 60.0) -> None:
    """Until a file (MLflow's hidden staging file, or the artifact itself) appears under the run's
    directory in the server's artifact store. Bounded; returns either way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.is_file() for p in destination.glob(f"*/{run_id}/artifacts/**/*")):
            return
        time.sleep(0.01)


def test_a_server_killed_during_a_large_upload_and_restarted_loses_nothing(
    restartable_server: MlflowServer, tmp_path: Path
) -> None:
    big = tmp_path / "model.bin"
    digest = write_random(big, 50 * MB)
    storage = tmp_path / "storage"
    url = restartable_server.url

    tc = TrackingClient(api_host=url, path_to_storage=str(storage), retry_window=60.0, exit_timeout=120)
    try:
        tc.set_experiment("artifact-outage")
        run = tc.start_run(log_system_metrics=False)
        tc.log_artifact(str(big), "checkpoints")
        wait_for_upload_to_begin(restartable_server.workdir / "artifacts", run.info.run_id)
        crash(restartable_server)
        restartable_server.start()
        tc.end_run()
    finally:
        tc.close(timeout=120)

    reader = Reader(url)
    run_id = run.info.run_id
    if reader.run(run_id)["info"]["status"] != "FINISHED":  # the client gave up: the journal has it all
        synced = tracklane_cli("sync", str(storage), "--to", url, timeout=300)
        assert synced.returncode == 0, synced.stdout[-2000:] + synced.stderr[-2000:]
    assert sha256(mlflow_download(url, run_id, "checkpoints/model.bin", tmp_path / "back")) == digest
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


# -- a server that does not proxy artifacts ------------------------------------------------------------


@pytest.fixture
def unproxied_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` keeping artifacts under a local path it does not serve to clients."""
    port = free_port()
    log_path = tmp_path / "unproxied-server.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'unproxied.db'}",
        "--no-serve-artifacts",
        "--default-artifact-root",
        str(tmp_path / "unproxied-artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=log, env={**os.environ, **QUIET_MLFLOW}, start_new_session=True
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, 90, log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@pytest.mark.server
def test_a_server_that_does_not_proxy_artifacts_fails_end_run_saying_how_to_start_it(
    unproxied_server: str, experiment_name: str, tmp_path: Path
) -> None:
    reader = Reader(unproxied_server)
    with TrackingClient(
        api_host=unproxied_server, path_to_storage=str(tmp_path / "storage"), exit_timeout=30
    ) as tc:
        tc.set_experiment(experiment_name)
        run = tc.start_run(log_system_metrics=False)
        tc.log_param("lr", "0.1")
        tc.log_text("nowhere to go", "notes.txt")
        with pytest.raises(DeliveryError) as caught:
            tc.end_run()

    assert "--serve-artifacts" in str(caught.value)
    assert "notes.txt" in str(caught.value)
    assert reader.params(run.info.run_id) == {"lr": "0.1"}  # everything else was delivered


# -- MlflowClient: explicit run ids --------------------------------------------------------------------


def test_mlflow_client_artifacts_of_two_interleaved_runs_land_on_their_own_runs(
    server_url: str, experiment_name: str, tmp_path: Path
) -> None:
    client = MlflowClient(server_url)
    experiment_id = client.create_experiment(experiment_name)
    runs = {name: client.create_run(experiment_id, run_name=name).info.run_id for name in ("a", "b")}
    written: dict[str, dict[str, bytes]] = {name: {} for name in runs}
    for epoch in range(3):
        for name, run_id in runs.items():  # the same file names in both runs, different contents
            source = tmp_path / name / f"epoch-{epoch}.txt"
            source.parent.mkdir(exist_ok=True)
            source.write_bytes(f"run {name}, epoch {epoch}".encode())
            client.log_artifact(run_id, str(source), "outputs")
            written[name][f"epoch-{epoch}.txt"] = source.read_bytes()

    listed = client.list_artifacts(runs["a"], "outputs")
    (tmp_path / "mine").mkdir()
    local = client.download_artifacts(runs["a"], "outputs", str(tmp_path / "mine"))
    for run_id in runs.values():
        client.set_terminated(run_id)

    assert sorted((f.path, f.is_dir) for f in listed) == [(f"outputs/epoch-{e}.txt", False) for e in range(3)]
    assert files_under(Path(local)) == written["a"]
    for name, run_id in runs.items():
        assert (
            files_under(mlflow_download(server_url, run_id, "outputs", tmp_path / "back" / name))
            == (written[name])
        )


# -- omega|ml's object form ----------------------------------------------------------------------------


def test_objects_logged_by_name_are_restored_and_anything_needing_pickle_is_refused(
    server_url: str, experiment_name: str, tmp_path: Path
) -> None:
    import pandas as pd

    frame = pd.DataFrame({"feature": [0.5, 1.5, 2.5], "label": ["a", "b", "c"]})

    class Model:
        pass

    with TrackingClient(
        api_host=server_url, path_to_storage=str(tmp_path / "storage"), exit_timeout=60
    ) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run(log_system_metrics=False) as run:
            tc.log_artifact({"a": [1, 2]}, "config")
            tc.log_artifact(b"\x00\x01raw bytes\xff", "blob")
            tc.log_artifact(frame, "frame")
            with pytest.raises(InvalidInputError, match="pickle"):
                tc.log_artifact(Model(), "model")
            assert tc.restore_artifact("config") == {"a": [1, 2]}  # read your writes, in the run
        run_id = run.info.run_id
        restored_bytes = tc.restore_artifact("blob", run_id=run_id)
        restored_frame = tc.restore_artifact("frame", run_id=run_id)

    assert restored_bytes == b"\x00\x01raw bytes\xff"
    pd.testing.assert_frame_equal(restored_frame, frame)
    stored = mlflow_listing(server_url, run_id, "")
    assert stored == ["blob.bin", "config.json", "frame.parquet"]  # no pickle, nothing for the refused one
