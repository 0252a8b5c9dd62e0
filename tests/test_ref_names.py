"""Branch and tag names narwhal accepts (``narwhal.job.is_ref_name``): one rule for POST /commit's
``branch``, head lookups in the mirror and scheduled builds, so no name reads as an option or a
revision expression wherever it reaches git."""

from __future__ import annotations

import pytest

from narwhal.dispatch.dispatcher import validate_branch
from narwhal.errors import BadRequest
from narwhal.job import is_ref_name

ACCEPTED = ["main", "feature/x", "release-1.2", "v1.2.3", "a+b", "HEAD", "x" * 255, "a" * 40]
REFUSED = [
    "", "-x", "--upload-pack=x", "a..b", "a//b", "a/", "a.", "a@{1}", "x.lock", "x" * 256,
    "main\n", "main\r", "\nmain", "ma in", "a~1", "a^", "a:b", "a*", "a?", "a[1]", "a\\b",
    "ma\x00in", "mäin", 7, b"main",
]


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted(name):
    assert is_ref_name(name)
    assert validate_branch(name) == name


@pytest.mark.parametrize("name", REFUSED, ids=repr)
def test_refused(name):
    assert not is_ref_name(name)
    with pytest.raises(BadRequest, match="invalid branch"):
        validate_branch(name)


def test_no_branch_is_no_branch():
    assert validate_branch(None) is None
