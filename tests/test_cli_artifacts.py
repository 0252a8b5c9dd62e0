"""narwhal artifacts: where a name from the dispatcher may land (tests/e2e/test_artifacts.py fetches for real)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from narwhal.cli.commands.artifacts import FetchRefused, destination


def test_a_plain_name_lands_under_the_directory(tmp_path: Path):
    assert destination(tmp_path / "out", "dist/app.whl") == (tmp_path / "out" / "dist" / "app.whl").resolve()


@pytest.mark.parametrize("name", ["/etc/passwd", "../up", "a/../../up", "a/./b", "a//b", "a\nb", "", None, 7,
                                  "x" * 2000])
def test_names_that_would_escape_or_are_not_plain_are_refused(tmp_path: Path, name):
    with pytest.raises(FetchRefused):
        destination(tmp_path, name)


def test_a_link_in_the_directory_is_not_followed_out(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "out"
    root.mkdir()
    os.symlink(outside, root / "d")
    with pytest.raises(FetchRefused):
        destination(root, "d/x.txt")
    os.symlink(outside / "f", root / "f")
    with pytest.raises(FetchRefused):
        destination(root, "f")
