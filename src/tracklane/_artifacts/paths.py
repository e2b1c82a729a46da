"""Where a file named by someone else may be written or read locally: only inside its root.

A server's artifact listing, and a journal's snapshot names, are input: a name that is absolute,
climbs with ``..``, or reaches outside through a symlink already there would make a download write
(or an upload read) any file the process can reach. ``inside`` is the one check, used by
``download_artifacts``, ``restore_artifact`` and the uploads of ``tracklane sync`` / ``tracklane ui``.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .._exceptions import TrackingError

__all__ = ["UnsafePathError", "inside"]


class UnsafePathError(TrackingError):
    """A name that would reach outside the directory it must stay in."""


def inside(root: Path, name: str, what: str) -> Path:
    """``root / name``, refused (``UnsafePathError`` naming ``name`` and ``what`` gave it) when
    ``name`` is absolute, has a ``..`` part, or resolves outside ``root`` through a symlink.
    Nothing is created or written."""
    parts = PurePosixPath(name.replace(os.sep, "/")).parts
    why = None
    if not name or name.startswith(("/", "\\")) or os.path.isabs(name) or (parts and ":" in parts[0]):
        why = "it is an absolute path"
    elif ".." in parts:
        why = "it has a '..' part"
    if why is None:
        target = root.joinpath(*parts)
        base = root.resolve()
        if not target.resolve().is_relative_to(base):
            why = f"it resolves to {str(target.resolve())!r} through a symlink"
        else:
            return target
    raise UnsafePathError(
        f"Refusing {what} {name!r}: {why}, outside {str(root)!r}. Nothing was written there. "
        "A tracking server only lists names under the run's artifact root; check the server (or the "
        "journal) this came from."
    )
