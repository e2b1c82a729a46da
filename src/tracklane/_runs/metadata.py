"""The tags MLflow puts on every run it creates: who ran what, from where.

Without them MLflow's UI shows "Created by -" and no source. Read as MLflow's default and git
context providers read them (``mlflow/tracking/context/``), once per process, without a git
dependency: the commit comes from the checkout's ``.git`` files.
"""

from __future__ import annotations

import functools
import getpass
import sys
from pathlib import Path

USER = "mlflow.user"
SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
GIT_COMMIT = "mlflow.source.git.commit"
PARENT_RUN_ID = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"
NOTE = "mlflow.note.content"


@functools.lru_cache(maxsize=1)
def run_context_tags() -> dict[str, str]:
    """``mlflow.user``, ``mlflow.source.name``, ``mlflow.source.type`` and, in a git checkout,
    ``mlflow.source.git.commit``."""
    try:
        user = getpass.getuser()
    except (ImportError, KeyError, OSError):
        user = "unknown"
    main = sys.argv[0] if sys.argv and sys.argv[0] else None
    tags = {USER: user, SOURCE_NAME: main or "<console>", SOURCE_TYPE: "LOCAL"}
    commit = git_commit(Path(main).resolve().parent if main else Path.cwd())
    if commit:
        tags[GIT_COMMIT] = commit
    return tags


def git_commit(start: Path) -> str | None:
    """The commit checked out in the git work tree holding ``start``, or None."""
    for directory in (start, *start.parents):
        dot_git = directory / ".git"
        try:
            if dot_git.is_file():  # a worktree or submodule: "gitdir: PATH"
                text = dot_git.read_text().strip()
                if not text.startswith("gitdir:"):
                    return None
                dot_git = (directory / text[len("gitdir:") :].strip()).resolve()
            if dot_git.is_dir():
                return _resolve_head(dot_git)
        except OSError:
            return None
    return None


def _resolve_head(git_dir: Path) -> str | None:
    head = (git_dir / "HEAD").read_text().strip()
    if not head.startswith("ref:"):
        return head or None  # detached
    ref = head[len("ref:") :].strip()
    common = git_dir
    commondir = git_dir / "commondir"
    if commondir.is_file():  # a linked worktree keeps its refs in the main repository
        common = (git_dir / commondir.read_text().strip()).resolve()
    for base in (git_dir, common):
        loose = base / ref
        if loose.is_file():
            return loose.read_text().strip() or None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    return None
