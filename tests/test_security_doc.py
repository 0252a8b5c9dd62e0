"""docs/security.md maps every finding to its tests: each pattern it names matches a test."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

from tests.conftest import parse_python

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"


def functions_named_test(path: Path) -> list[str]:
    tree = parse_python(path)
    return [node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")]


def test_every_finding_names_tests_that_exist():
    rows = [line for line in DOC.read_text().splitlines() if re.match(r"\| \d+ ", line)]
    assert [int(row.split()[1]) for row in rows] == list(range(1, 12))
    missing = []
    for row in rows:
        finding = row.split()[1]
        for path, pattern in re.findall(r"`(tests/[\w/]+\.py)::([\w*]+)`", row):
            assert re.search(rf"finding(?:\d+_and_)?{finding}_", pattern), \
                f"{path}::{pattern} is listed under finding {finding}"
            file = ROOT / path
            if not file.exists() or not fnmatch.filter(functions_named_test(file), pattern):
                missing.append(f"finding {finding}: {path}::{pattern}")
    assert not missing, "docs/security.md names tests that do not exist:\n" + "\n".join(missing)
