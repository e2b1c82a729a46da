"""The artifact calls every face shares: render (``_artifacts.kinds``), keep (``ArtifactLog``), read.

Faces differ only in where the run id comes from (the active run, or an explicit one) and in how
they wait; what ``log_text`` stores, or how ``download_artifacts`` walks a directory, is here once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._artifacts import kinds
from .._artifacts.paths import inside
from .._delivery.artifacts import ArtifactLog, artifact_path
from .._delivery.buffer import Buffer, now_ms
from .._delivery.engine import Engine
from .._entities import FileInfo
from .._exceptions import ConfigurationError, InvalidInputError, NotFoundError
from .._stores.mlflow_sql import MlflowSqlBackend
from .._stores.offline import JournalBackend
from .._stores.rest import RestBackend

Store = RestBackend | JournalBackend | MlflowSqlBackend


def log_artifact(log: ArtifactLog, run_id: str, local_path: Any, artifact_path_or_name: str | None) -> None:
    """MLflow's ``log_artifact(local_path, artifact_path)``, and omega|ml's ``log_artifact(obj, name)``
    for an object that is not a path (JSON, bytes, a DataFrame; never pickled)."""
    if isinstance(local_path, (str, os.PathLike)):
        log.log_file(run_id, local_path, artifact_path_or_name)
        return
    if not artifact_path_or_name:
        raise InvalidInputError(
            f"log_artifact: a {type(local_path).__name__} object needs a name: log_artifact(obj, 'name')."
        )
    file_name, data = kinds.object_bytes(local_path, artifact_path_or_name)
    log.log_bytes(run_id, file_name, data)


def log_text(log: ArtifactLog, run_id: str, text: str, artifact_file: str) -> None:
    log.log_bytes(run_id, artifact_file, kinds.text_bytes(text))


def log_dict(log: ArtifactLog, run_id: str, dictionary: Any, artifact_file: str) -> None:
    log.log_bytes(run_id, artifact_file, kinds.dict_bytes(dictionary, artifact_file))


def log_figure(
    log: ArtifactLog, run_id: str, figure: Any, artifact_file: str, save_kwargs: Mapping[str, Any] | None
) -> None:
    log.log_bytes(run_id, artifact_file, kinds.figure_bytes(figure, artifact_file, dict(save_kwargs or {})))


def log_image(
    log: ArtifactLog,
    buffer: Buffer,
    run_id: str,
    image: Any,
    artifact_file: str | None,
    key: str | None,
    step: int | None,
    timestamp: int | None,
) -> None:
    """MLflow's two forms: one file (``artifact_file``), or a step of an image series (``key``)."""
    if (artifact_file is None) == (key is None):
        raise InvalidInputError("log_image: pass either artifact_file= or key= (with step=), not both.")
    if key is not None:
        for path, data in kinds.image_step_files(image, key, step or 0, timestamp or now_ms()):
            log.log_bytes(run_id, path, data)
        buffer.set_tags(
            run_id, {kinds.LOGGED_IMAGES_TAG: kinds.LOGGED_IMAGES_TAG_VALUE}
        )  # MLflow's UI lists them
        return
    assert artifact_file is not None
    log.log_bytes(run_id, artifact_file, kinds.image_bytes(image, artifact_file))


def log_table(log: ArtifactLog, buffer: Buffer, run_id: str, data: Any, artifact_file: str) -> None:
    """The table file (and images in its cells), and the run tag that lists it in MLflow's UI.
    Differs from MLflow: a second table to the same file replaces it (MLflow downloads the first
    and appends, which would cost the caller network I/O)."""
    for path, content in kinds.table_files(data, artifact_file):
        log.log_bytes(run_id, path, content)
    tag = kinds.table_run_tag(artifact_file, log.table_tags.get(run_id))
    if tag is not None:
        log.table_tags[run_id] = tag[1]
        buffer.set_tags(run_id, {tag[0]: tag[1]})


# -- reads: on the engine's loop ---------------------------------------------------------------------


def _server(store: Store) -> RestBackend | MlflowSqlBackend:
    if not isinstance(store, (RestBackend, MlflowSqlBackend)):
        raise ConfigurationError(
            "Reading artifacts needs a tracking server; offline, they are in the local journal until "
            "`tracklane sync` (or `tracklane ui`) uploads them."
        )
    return store


async def list_artifacts(engine: Engine, store: Store, run_id: str, path: str | None) -> list[FileInfo]:
    """The run's artifacts under ``path`` (after its own pending uploads, read your writes)."""
    await engine.deliver_artifacts(run_id)
    return await _server(store).list_artifacts(run_id, path)


async def download_artifacts(
    engine: Engine, store: Store, run_id: str, path: str, dst_path: str | None
) -> str:
    """Download a file or a directory tree of the run's artifacts under ``dst_path`` (a new temporary
    directory if None), streamed; returns the local path of what ``path`` names."""
    server = _server(store)
    await engine.deliver_artifacts(run_id)
    dst = Path(dst_path) if dst_path is not None else Path(tempfile.mkdtemp(prefix="tracklane-artifacts-"))
    if not dst.is_dir():
        raise InvalidInputError(f"download_artifacts: dst_path {str(dst)!r} is not an existing directory.")
    path = path.strip("/")
    if path:
        inside(dst, path, "artifact path")
    entries = await server.list_artifacts(run_id, path or None)
    if not entries and path:  # a file (or nothing: then the download says 404)
        local = inside(dst, path, "artifact path")
        local.parent.mkdir(parents=True, exist_ok=True)
        await server.download_artifact(run_id, artifact_path(None, path), local)
        return str(local)
    await _download_tree(server, run_id, entries, dst)
    return str(dst / path) if path else str(dst)


async def _download_tree(
    server: RestBackend | MlflowSqlBackend, run_id: str, entries: list[FileInfo], dst: Path
) -> None:
    """Every listed name is checked before anything is written: a hostile listing writes nothing."""
    checked = [(entry, inside(dst, entry.path, f"artifact listed by {server.describe}")) for entry in entries]
    for entry, local in checked:
        if entry.is_dir:
            local.mkdir(parents=True, exist_ok=True)
            await _download_tree(server, run_id, await server.list_artifacts(run_id, entry.path), dst)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            await server.download_artifact(run_id, entry.path, local)


async def restore_artifact(engine: Engine, store: Store, run_id: str, name: str) -> Any:
    """omega|ml's ``restore_artifact(name)``: the object ``log_artifact(obj, name)`` stored."""
    server = _server(store)
    await engine.deliver_artifacts(run_id)
    for entry in await server.list_artifacts(run_id, None):
        if not entry.is_dir and _stored_name(entry.path) == name:
            with tempfile.TemporaryDirectory(prefix="tracklane-restore-") as tmp:
                inside(Path(tmp), entry.path, f"artifact listed by {server.describe}")
                local = Path(tmp) / "object"
                await server.download_artifact(run_id, entry.path, local)
                return kinds.restore_object(entry.path, local.read_bytes())
    raise NotFoundError(f"restore_artifact: run {run_id} has no artifact named {name!r}.")


def _stored_name(path: str) -> str:
    """The name ``log_artifact(obj, name)`` was given, from the file it stored (name + format suffix)."""
    stem, dot, suffix = path.rpartition(".")
    return stem if dot and f".{suffix}" in kinds.OBJECT_SUFFIXES else path


async def artifact_uri(store: Store, run_id: str, artifact_path: str | None) -> str:
    """MLflow's ``get_artifact_uri``: the run's artifact root (and ``artifact_path`` under it)."""
    run = await store.get_run(run_id)
    root = run.info.artifact_uri
    return root if not artifact_path else f"{root.rstrip('/')}/{artifact_path.lstrip('/')}"
