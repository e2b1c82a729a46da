"""The tags MLflow puts on every run it creates: who ran what, from where.

Without them MLflow's UI shows "Created by -" and no source. Read as MLflow's default and git
context providers read them (``mlflow/tracking/context/``), once per process, without a git
dependency: the commit comes from the checkout's ``.git`` files.
"""

from __future__ import annotations

import configparser
import functools
import getpass
import sys
from pathlib import Path
from urllib.parse import urlsplit

from .._settings import strip_credentials

USER = "mlflow.user"
SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
GIT_COMMIT = "mlflow.source.git.commit"
GIT_BRANCH = "mlflow.source.git.branch"
GIT_REPO_URL = "mlflow.source.git.repoURL"
PARENT_RUN_ID = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"
NOTE = "mlflow.note.content"


@functools.lru_cache(maxsize=1)
def run_context_tags() -> dict[str, str]:
    """``mlflow.user``, ``mlflow.source.name``, ``mlflow.source.type`` and, in a git checkout,
    ``mlflow.source.git.commit``, ``.branch`` and ``.repoURL``."""
    try:
        user = getpass.getuser()
    except (ImportError, KeyError, OSError):
        user = "unknown"
    main = sys.argv[0] if sys.argv and sys.argv[0] else None
    tags = {USER: user, SOURCE_NAME: main or "<console>", SOURCE_TYPE: "LOCAL"}
    tags.update(git_tags(Path(main).resolve().parent if main else Path.cwd()))
    return tags


def git_tags(start: Path) -> dict[str, str]:
    """Commit, branch and first remote's URL (credentials stripped) of the git work tree holding
    ``start``; empty outside one."""
    git_dir = _git_dir(start)
    if git_dir is None:
        return {}
    try:
        head = (git_dir / "HEAD").read_text().strip()
        common = git_dir
        if (git_dir / "commondir").is_file():  # a linked worktree keeps refs in the main repository
            common = (git_dir / (git_dir / "commondir").read_text().strip()).resolve()
        tags: dict[str, str] = {}
        if head.startswith("ref:"):
            ref = head[len("ref:") :].strip()
            commit = _resolve_ref(ref, git_dir, common)
            if ref.startswith("refs/heads/"):
                tags[GIT_BRANCH] = ref[len("refs/heads/") :]
        else:
            commit = head or None  # detached
        if commit is None:
            return {}
        tags[GIT_COMMIT] = commit
        url = _first_remote_url(common / "config")
        if url:
            tags[GIT_REPO_URL] = url
        return {GIT_COMMIT: tags.pop(GIT_COMMIT), **tags}
    except OSError:
        return {}


def _git_dir(start: Path) -> Path | None:
    for directory in (start, *start.parents):
        dot_git = directory / ".git"
        try:
            if dot_git.is_file():  # a worktree or submodule: "gitdir: PATH"
                text = dot_git.read_text().strip()
                if not text.startswith("gitdir:"):
                    return None
                dot_git = (directory / text[len("gitdir:") :].strip()).resolve()
            if dot_git.is_dir():
                return dot_git
        except OSError:
            return None
    return None


def _resolve_ref(ref: str, git_dir: Path, common: Path) -> str | None:
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


def _first_remote_url(config: Path) -> str | None:
    if not config.is_file():
        return None
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        parser.read(config)
    except configparser.Error:
        return None
    for section in parser.sections():
        if section.startswith('remote "') and parser.has_option(section, "url"):
            return _without_credentials(parser.get(section, "url"))
    return None


def _without_credentials(url: str) -> str:
    """A token in an https remote (``https://user:TOKEN@host/...``) must not become a tag."""
    if urlsplit(url).scheme in ("http", "https"):
        return strip_credentials(url)[0]
    return url
