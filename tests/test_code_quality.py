"""The project's own standards, checked by the same command as the behaviour: mypy --strict
on the package, ruff lint and format on the tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_package_type_checks_under_mypy_strict() -> None:
    result = _run("mypy", "--strict", "src/tracklane")
    assert result.returncode == 0, result.stdout + result.stderr


def test_tree_passes_ruff_lint() -> None:
    result = _run("ruff", "check", "src", "tests", "benchmarks", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_tree_is_ruff_formatted() -> None:
    result = _run("ruff", "format", "--check", "src", "tests", "benchmarks", "examples")
    assert result.returncode == 0, result.stdout + result.stderr
