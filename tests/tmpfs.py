"""A small real disk for the tests: a tmpfs of a given size, mounted for a test and unmounted after.

Root only (or CAP_SYS_ADMIN): where it cannot be mounted, the test is skipped and says why.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """``where`` (made here) as a tmpfs of ``size`` (e.g. ``"256k"``) while the block runs."""
    where.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a small tmpfs: {exc}")
    if mounted.returncode != 0:
        pytest.skip(
            "cannot mount a small tmpfs (needs root, or CAP_SYS_ADMIN): "
            f"{(mounted.stderr or mounted.stdout).strip()}"
        )
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)
