"""A pipeline's clone: key: strict like every key, with file:line errors."""

from __future__ import annotations

import pytest

from narwhal.config.pipeline import Clone, Pipeline, parse_pipeline
from narwhal.config.yamlfile import parse_yaml
from narwhal.errors import ConfigError

BASE = """\
repo: "*"
image: narwhal-test/busybox:latest
steps:
  - name: build
    run: make
"""


def pipeline(extra: str) -> Pipeline:
    return parse_pipeline(parse_yaml(BASE + extra, "pipelines/p.yaml"))


def problems(extra: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        pipeline(extra)
    return [str(p) for p in info.value.problems]


def test_without_clone_nothing_changes():
    assert pipeline("").clone is None


def test_clone_git_and_submodules():
    clone = pipeline("clone: {git: true, submodules: true, depth: 20}\n").clone
    assert clone == Clone(git=True, submodules=True, depth=20)
    assert pipeline("clone: {submodules: true}\n").clone == Clone(submodules=True)


@pytest.mark.parametrize("extra, expected", [
    ("clone: {gti: true}\n", "pipelines/p.yaml:6: clone.gti"),
    ("clone: true\n", "pipelines/p.yaml:6: clone"),
    ("clone: {git: yes please}\n", "pipelines/p.yaml:6: clone.git"),
    ("clone: {git: true, depth: 0}\n", "pipelines/p.yaml:6: clone.depth"),
    ("clone: {git: true, depth: '5'}\n", "pipelines/p.yaml:6: clone.depth"),
    ("clone: {depth: 5}\n", "depth is the history of .git: it needs git: true"),
    ("clone: {git: true, url: 'file:///etc'}\n", "pipelines/p.yaml:6: clone.url"),
])
def test_bad_clone_keys_are_located_errors(extra, expected):
    found = problems(extra)
    assert any(expected in p for p in found), found
