"""The one path check (``_artifacts.paths.inside``): names from a server or a journal stay inside
their root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracklane._artifacts.paths import UnsafePathError, inside
from tracklane._settings import strip_credentials

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "a/..", "..", "", "C:/x"])
def test_names_that_climb_or_are_absolute_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafePathError) as raised:
        inside(tmp_path, name, "artifact")
    assert repr(name) in str(raised.value)


def test_a_name_through_a_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "link").symlink_to(elsewhere)
    with pytest.raises(UnsafePathError, match="symlink"):
        inside(root, "link/file.txt", "artifact")


@pytest.mark.parametrize("name", ["a.txt", "plots/loss.png", "a/b/c.txt"])
def test_plain_relative_names_are_kept(tmp_path: Path, name: str) -> None:
    assert inside(tmp_path, name, "artifact") == tmp_path / name


def test_strip_credentials_is_the_one_place_a_url_loses_its_userinfo() -> None:
    assert strip_credentials("http://u:p%3Aw@h:1/api") == ("http://h:1/api", "u", "p:w")
    assert strip_credentials("http://h:1") == ("http://h:1", None, None)
