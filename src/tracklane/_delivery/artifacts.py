"""Artifacts at the call site: a snapshot in the journal's artifact area, then the uploader's job.

``log_artifact`` costs the caller a local copy and no network I/O: the file (or the bytes a
``log_text``/``log_dict``/... rendered) is copied under ``ml_runs/artifacts/`` (a copy-on-write clone
where the file system has them) and a journal row names it for its run before the call returns.
The engine's uploader then streams it to the server's artifact proxy, retried like any batch;
``end_run`` waits for the run's artifacts as for its events, and what the server cannot take now
stays in the journal for the next client or ``tracklane sync``. The copy is what makes "a file
changed or deleted after the call does not change what is uploaded" true: a hard link would share
the file's later in-place writes (``torch.save`` truncates and rewrites the same file).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import posixpath
import shutil
import uuid
from pathlib import Path

from .._exceptions import InvalidInputError
from .._stores.journal import Journal
from .engine import Engine
from .spool import Spool

#: ioctl(FICLONE): a copy-on-write clone on btrfs, XFS and others; a plain copy elsewhere.
_FICLONE = 0x40049409


def artifact_path(artifact_path: str | None, name: str) -> str:
    """``name`` under the directory ``artifact_path`` of the run's artifact root, as a clean posix
    path; refuses one that climbs out of the root."""
    joined = posixpath.normpath(posixpath.join(artifact_path or "", name).replace(os.sep, "/"))
    if joined.startswith(("../", "/")) or joined in ("..", ".", ""):
        raise InvalidInputError(
            f"artifact path {joined!r} is not inside the run's artifact root; use a relative path "
            "such as 'plots' or 'checkpoints/epoch_3'."
        )
    return joined


def snapshot_file(src: Path, area: Path) -> tuple[str, int]:
    """Copy ``src`` into ``area`` under a fresh name; (that name, its size). Renamed into place,
    so a crash never leaves a half snapshot under a name a journal row points to."""
    area.mkdir(parents=True, exist_ok=True)
    name = uuid.uuid4().hex
    part = area / f"{name}.part"
    try:
        _clone_or_copy(src, part)
        os.replace(part, area / name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    return name, (area / name).stat().st_size


def snapshot_bytes(data: bytes, area: Path) -> tuple[str, int]:
    area.mkdir(parents=True, exist_ok=True)
    name = uuid.uuid4().hex
    part = area / f"{name}.part"
    part.write_bytes(data)
    os.replace(part, area / name)
    return name, len(data)


def _clone_or_copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return
        except OSError:
            pass  # not a file system that clones
    shutil.copyfile(src, dst)  # in the kernel (sendfile) on Linux


class ArtifactLog:
    """The artifact calls' shared path: snapshot, journal row, wake the uploader.

    Online, rows go to the engine's journal as rows of a run on its server, and the uploader
    delivers them; offline (``spool`` None), to the offline journal with the run, for ``tracklane
    sync``.
    """

    def __init__(self, engine: Engine, offline_journal: Journal | None) -> None:
        self.engine = engine
        self.spool: Spool | None = engine.spool
        self.offline_journal = offline_journal
        #: The value of the run tag listing its tables (``log_table``), per run logged to here.
        self.table_tags: dict[str, str] = {}

    def _journal(self) -> Journal:
        if self.spool is not None:
            return self.spool.open_now()
        assert self.offline_journal is not None
        return self.offline_journal

    def _keep(self, run_id: str, path: str, name: str, size: int) -> None:
        if self.spool is not None:
            self.spool.add_artifact(run_id, path, name, size)
            self.engine.artifact_kept()
        else:
            assert self.offline_journal is not None
            self.offline_journal.add_artifact(None, run_id, path, name, size)

    def log_file(self, run_id: str, local_path: str | os.PathLike[str], artifact_dir: str | None) -> None:
        src = Path(local_path)
        if not src.is_file():
            raise InvalidInputError(
                f"log_artifact: {str(src)!r} is not a file. Pass a file's path (log_artifacts takes a "
                "directory; log_text/log_dict take content)."
            )
        path = artifact_path(artifact_dir, src.name)
        name, size = snapshot_file(src, self._journal().artifact_dir)
        self._keep(run_id, path, name, size)

    def log_dir(self, run_id: str, local_dir: str | os.PathLike[str], artifact_dir: str | None) -> None:
        root = Path(local_dir)
        if not root.is_dir():
            raise InvalidInputError(f"log_artifacts: {str(root)!r} is not a directory.")
        area = self._journal().artifact_dir
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            relative = Path(dirpath).relative_to(root).as_posix()
            for filename in sorted(filenames):
                path = artifact_path(posixpath.join(artifact_dir or "", relative), filename)
                name, size = snapshot_file(Path(dirpath) / filename, area)
                self._keep(run_id, path, name, size)

    def log_bytes(self, run_id: str, artifact_file: str, data: bytes) -> None:
        path = artifact_path(None, artifact_file)
        name, size = snapshot_bytes(data, self._journal().artifact_dir)
        self._keep(run_id, path, name, size)
