"""A pipeline's matrix: combinations, exclude/include, substitution, names and errors."""

from __future__ import annotations

import pytest

from narwhal.config.matrix import MAX_COMBINATIONS, MatrixError, combinations, substitute
from narwhal.config.pipeline import load_pipelines, parse_pipeline, parse_pipelines
from narwhal.config.yamlfile import parse_yaml
from narwhal.errors import ConfigError

MATRIX = """\
repo: "*"
image: "python:${PY}-slim"
env: {DATABASE: "${DB}-db", HOME_STAYS: "${HOME}", SHELL_STAYS: "$PY"}
matrix:
  PY: ["3.11", "3.12"]
  DB: [pg15, pg16]
steps:
  - {name: test, run: "echo $PY $DB"}
  - {name: other, image: "busybox:${PY}", run: "true"}
"""


def load(text: str, filename: str = "pipelines/ci.yaml"):
    return parse_pipelines(parse_yaml(text, filename))


def test_a_2x2_matrix_is_four_pipelines_with_their_values():
    pipelines = load(MATRIX)
    assert [p.name for p in pipelines] == ["ci[PY=3.11,DB=pg15]", "ci[PY=3.11,DB=pg16]",
                                           "ci[PY=3.12,DB=pg15]", "ci[PY=3.12,DB=pg16]"]
    first = pipelines[0]
    assert first.image == "python:3.11-slim" and first.steps[1].image == "busybox:3.11"
    assert first.env == {"PY": "3.11", "DB": "pg15", "DATABASE": "pg15-db", "HOME_STAYS": "${HOME}",
                         "SHELL_STAYS": "$PY"}
    assert first.steps[0].run == "echo $PY $DB"  # run is the shell's: the values arrive as variables
    assert first.matrix == {"PY": "3.11", "DB": "pg15"}


def test_exclude_removes_and_include_adds():
    text = MATRIX.replace("  DB: [pg15, pg16]\n", "  DB: [pg15, pg16]\n  exclude: [{PY: \"3.11\", DB: pg16}]\n"
                                                  "  include: [{PY: \"3.13\", DB: pg16}]\n")
    names = [p.name for p in load(text)]
    assert "ci[PY=3.11,DB=pg16]" not in names and names[-1] == "ci[PY=3.13,DB=pg16]" and len(names) == 4
    text = MATRIX.replace("  DB: [pg15, pg16]\n", "  DB: [pg15, pg16]\n  exclude: [{DB: pg16}]\n")
    assert [p.matrix["DB"] for p in load(text)] == ["pg15", "pg15"]  # a partial entry excludes every match


@pytest.mark.parametrize("matrix, expected", [
    ("matrix: []", "pipelines/ci.yaml:4: matrix: expected a mapping"),
    ("matrix: {py: [a]}", "matrix.py: expected a variable name in capitals"),
    ("matrix: {PY: []}", "matrix.PY: expected a non-empty list"),
    ("matrix: {PY: [\"a,b\"]}", "matrix.PY[0]: expected a short value"),
    ("matrix: {PY: [\"a\\nb\"]}", "matrix.PY[0]: expected a short value"),
    ("matrix: {NARWHAL_JOB: [a]}", "reserved"),
    ("matrix: {PY: [a], exclude: [{DB: x}]}", "DB is not a variable of this matrix"),
    ("matrix: {PY: [a], exclude: [{PY: a}]}", "every combination is excluded"),
    ("matrix: {PY: [a, b], DB: [c, d], include: [{PY: e}]}", "missing DB"),
    ("matrix: {A: [1,2,3,4,5,6,7,8], B: [1,2,3,4,5,6,7,8], C: [1, 2]}", f"at most {MAX_COMBINATIONS}"),
])
def test_bad_matrices_say_where_and_what(matrix, expected):
    text = "repo: \"*\"\nimage: busybox\nsteps: [{name: s, run: x}]\n" + matrix + "\n"
    with pytest.raises(ConfigError) as info:
        load(text)
    assert expected in str(info.value), str(info.value)


def test_a_substituted_image_is_validated_like_any_other():
    text = MATRIX.replace('PY: ["3.11", "3.12"]', 'PY: ["3.11", "bad image"]')
    with pytest.raises(ConfigError, match="image"):
        load(text)


def test_substitution_touches_only_declared_variables():
    values = {"PY": "3.12"}
    assert substitute({"a": ["${PY}", "${PYX}", "$PY", "${ PY }"]}, values) == {"a": ["3.12", "${PYX}", "$PY", "${ PY }"]}
    with pytest.raises(MatrixError):
        combinations({"exclude": [{"PY": "a"}]})


def test_matrix_files_load_into_the_config_and_single_parsing_refuses_them(tmp_path):
    (tmp_path / "ci.yaml").write_text(MATRIX)
    (tmp_path / "plain.yaml").write_text("repo: \"*\"\nimage: busybox\nsteps: [{name: s, run: x}]\n")
    assert len(load_pipelines(tmp_path)) == 5
    with pytest.raises(ConfigError, match="parse_pipelines"):
        parse_pipeline(parse_yaml(MATRIX, "ci.yaml"))
