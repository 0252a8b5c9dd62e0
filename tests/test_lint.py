"""CI runs the linters through the test suite: ruff and mypy must pass as configured in pyproject.toml."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv", [
    [sys.executable, "-m", "ruff", "check", "narwhal", "testbed", "tests", "bench"],
    [sys.executable, "-m", "mypy"],  # packages and strictness come from pyproject.toml
], ids=["ruff", "mypy"])
def test_linter_passes(argv):
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv[2:])} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}", pytrace=False)
