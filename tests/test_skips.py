"""Every skip goes through conftest's rule (``need``/``require``): under CI a missing tool fails.

A bare ``pytest.skip``, ``importorskip`` or ``skipif`` would quietly pass CI on a machine
that lacks what the test checks; this test keeps them out of tests/.
"""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
BARE = re.compile(r"pytest\.skip\(|importorskip\(|mark\.skipif|mark\.skip\b|pytest\.xfail\(")


def test_no_skip_bypasses_the_ci_rule():
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        if path == TESTS / "conftest.py" or path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if BARE.search(line):
                found.append(f"{path.relative_to(TESTS)}:{number}: {line.strip()}")
    assert not found, "use tests.conftest.need/need_module/require instead:\n" + "\n".join(found)
