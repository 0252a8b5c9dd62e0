"""conditions: the when: model, path globs and the run-or-skip decision (pure, no I/O)."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from narwhal.config.conditions import (
    EVENTS,
    MAX_PATTERN,
    MAX_PATTERNS,
    StepWhen,
    When,
    decide,
    decide_step,
    path_matches,
)
from narwhal.config.repository import glob_match
from narwhal.config.yamlfile import parse_yaml, validation_problems


def problems(text: str, filename: str = "pipelines/p.yaml") -> list[str]:
    """when:'s problems as the loader will show them: file:line: when.key: what."""
    document = parse_yaml(text, filename)
    with pytest.raises(ValidationError) as info:
        When.model_validate(document.data["when"])
    return [str(p) for p in validation_problems(info.value, When, filename, document, base=("when",))]


def refused(data: object) -> str:
    with pytest.raises(ValidationError) as info:
        When.model_validate(data)
    return str(info.value)


# --- the model ---------------------------------------------------------------------


def test_fields_default_to_no_filter():
    when = When.model_validate({})
    assert when.event is None and when.paths is None
    assert When.model_validate({"event": None, "paths": None}) == when  # `event:` left blank in YAML


def test_a_single_string_is_a_list_of_one():
    when = When.model_validate({"event": "push", "paths": "src/**"})
    assert when.event == ["push"] and when.paths == ["src/**"]


def test_every_event_is_accepted():
    assert When.model_validate({"event": list(EVENTS)}).event == list(EVENTS)
    assert EVENTS == ("push", "pull_request", "tag", "cron", "manual", "api")


def test_problems_carry_file_line_and_path():
    text = ("name: x\n"
            "when:\n"
            "  event: [push, pr]\n"
            "  paths:\n"
            "    - src/**\n"
            "    - /etc/**\n"
            "    - 3\n"
            "  branches: [main]\n")
    assert problems(text) == [
        "pipelines/p.yaml:3: when.event[1]: unknown event 'pr' "
        "(expected one of: push, pull_request, tag, cron, manual, api)",
        "pipelines/p.yaml:6: when.paths[1]: path glob '/etc/**' is absolute; paths are relative to the "
        "repository root (write 'etc/**')",
        "pipelines/p.yaml:7: when.paths[2]: expected a string, got 3",
        "pipelines/p.yaml:8: when.branches: unknown key (allowed: event, paths)",
    ]


@pytest.mark.parametrize("event", ["Push", "PUSH", "pull-request", "pr", "", " push", "push ", "merge_request",
                                   "push\n", "deploy"])
def test_unknown_events_are_refused_with_the_allowed_list(event):
    assert "expected one of: push, pull_request, tag, cron, manual, api" in refused({"event": event})


@pytest.mark.parametrize("data", [
    {"event": []}, {"paths": []}, {"event": 1}, {"event": [True]}, {"event": {"push": 1}},
    {"paths": [None]}, {"paths": {"src": 1}}, {"paths": 3}, {"branches": ["main"]}, {"event": ["push"], "x": 1},
])
def test_shapes_that_are_refused(data):
    refused(data)


@pytest.mark.parametrize("pattern, why", [
    ("", "empty string"),
    ("/src/**", "is absolute"),
    ("/", "is absolute"),
    ("//x", "is absolute"),
    ("../x", "'..' segments"),
    ("src/../../etc/passwd", "'..' segments"),
    ("src/..", "'..' segments"),
    ("./src/**", "'.' and '..' segments"),
    ("src/./x", "'.' and '..' segments"),
    ("src/", "empty segment (for everything under it: src/**)"),
    ("src//x", "empty segment"),
    ("src\x00.py", "control characters"),
    ("src/\n**", "control characters"),
    ("a\tb", "control characters"),
    ("a\x7fb", "control characters"),
    ("a\x85b", "control characters"),
    ("a\x1b[31mred", "control characters"),
    ("!docs/**", "negation"),
    ("[z-a].py", "range z-a is backwards"),
    ("x" * (MAX_PATTERN + 1), f"longer than {MAX_PATTERN} characters"),
])
def test_hostile_or_mistaken_globs_are_refused(pattern, why):
    assert why in refused({"paths": [pattern]})


def test_the_number_of_globs_is_capped():
    When.model_validate({"paths": [f"d{i}/**" for i in range(MAX_PATTERNS)]})
    refused({"paths": [f"d{i}/**" for i in range(MAX_PATTERNS + 1)]})


def test_a_long_glob_is_not_echoed_whole():
    message = refused({"paths": ["/" + "x" * 400]})
    assert "x" * 100 not in message


@pytest.mark.parametrize("pattern", ["src/**", "docs/*.md", "**/*.py", "*", "**", "Makefile", "a b/c d.txt",
                                     "[!.]*", "src/[a-z]*/**", "x]", "[", "docs\\*.md", "ünïcode/**", "a" * MAX_PATTERN])
def test_good_globs_are_kept_as_written(pattern):
    assert When.model_validate({"paths": pattern}).paths == [pattern]


def test_the_model_is_strict_and_closed():
    assert When.model_config["extra"] == "forbid" and When.model_config["strict"] is True


# --- path globs --------------------------------------------------------------------


@pytest.mark.parametrize("pattern, path, expected", [
    ("src/**", "src/main.py", True),
    ("src/**", "src/a/b/c.py", True),
    ("src/**", "src", False),
    ("src/**", "srcx/a.py", False),
    ("src/**", "lib/src/a.py", False),
    ("docs/*.md", "docs/index.md", True),
    ("docs/*.md", "docs/api/index.md", False),
    ("docs/*.md", "docs/index.md.bak", False),
    ("**/*.py", "setup.py", True),
    ("**/*.py", "src/app/main.py", True),
    ("**/*.py", "src/app/main.pyc", False),
    ("**/*.py", "src/app.py/readme", False),
    ("*.md", "README.md", True),
    ("*.md", "docs/README.md", False),
    ("*", "Makefile", True),
    ("*", "src/Makefile", False),
    ("**", "a/b/c", True),
    ("**", "", True),
    ("src/**/test_*.py", "src/test_a.py", True),
    ("src/**/test_*.py", "src/x/y/test_a.py", True),
    ("src/**/test_*.py", "src/x/y/a_test.py", False),
    ("a**b", "a/x/b", True),
    ("a***b", "a/x/b", True),
    ("x/**.py", "x/a/b.py", True),
    ("?.txt", "a.txt", True),
    ("?.txt", "ab.txt", False),
    ("a?b", "a/b", False),
    ("[abc].txt", "b.txt", True),
    ("[abc].txt", "d.txt", False),
    ("[a-c0-9].txt", "7.txt", True),
    ("[!a-c].txt", "d.txt", True),
    ("[!a-c].txt", "a.txt", False),
    ("[^a-c].txt", "a.txt", False),
    ("a[!x]b", "a/b", False),
    ("a[/]b", "a/b", False),
    ("[]]", "]", True),
    ("[!]]", "a", True),
    ("[!]]", "]", False),
    ("[a-]", "-", True),
    ("[", "[", True),
    ("[]", "[]", True),
    ("Makefile", "Makefile", True),
    ("Makefile", "makefile", False),
    (".github/**", ".github/workflows/ci.yml", True),
    ("*", ".hidden", True),
    ("a.b", "axb", False),
    ("(a|b)", "(a|b)", True),
    ("(a|b)", "a", False),
    ("a+", "aa", False),
    ("\\*", "\\x", True),
    ("ünï/*", "ünï/ç", True),
])
def test_path_matches(pattern, path, expected):
    assert path_matches(pattern, path) is expected


def test_a_bad_character_class_raises():
    with pytest.raises(ValueError, match="backwards"):
        path_matches("[z-a]", "b")


def _reference(pattern: str) -> re.Pattern[str]:
    """The glob semantics written as a backtracking regex (fine for the small inputs below)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "*":
            j = i
            while j < len(pattern) and pattern[j] == "*":
                j += 1
            if j - i == 1:
                out.append("[^/]*")
            elif (i == 0 or pattern[i - 1] == "/") and pattern[j:j + 1] == "/":
                out.append("(?:.*/)?")
                j += 1
            else:
                out.append(".*")
            i = j
            continue
        out.append("[^/]" if pattern[i] == "?" else re.escape(pattern[i]))
        i += 1
    return re.compile("".join(out), re.DOTALL)


globs = st.text(alphabet="ab/*?.", max_size=10)
paths = st.text(alphabet="ab/.", max_size=12)


@settings(max_examples=500, deadline=None)
@given(globs, paths)
def test_path_matches_agrees_with_a_regex(pattern, path):
    assert path_matches(pattern, path) == (_reference(pattern).fullmatch(path) is not None)


@settings(max_examples=300, deadline=None)
@given(globs.filter(lambda p: "**/" not in p and p not in ("*", "**")), paths)
def test_path_matches_agrees_with_repository_globs_without_a_leading_doublestar(pattern, path):
    """Only ``**/`` (which may match no directory) differs from the repository globs."""
    assert path_matches(pattern, path) == glob_match(pattern, path)


@pytest.mark.parametrize("pattern, path", [
    ("*a" * 20 + "*b", "a" * 5000),                 # exponential for a backtracking regex
    ("**a" * 20 + "**b", "a" * 5000),
    ("**/" * 30 + "x", "a/" * 3000 + "y"),
    ("*" * (MAX_PATTERN - 1) + "b", "a" * 10000),
    ("?" * 400 + "x", "a" * 10000),
])
def test_hostile_paths_cost_linear_time(pattern, path):
    started = time.monotonic()
    assert path_matches(pattern, path) is False
    assert time.monotonic() - started < 2.0


# --- the decision ------------------------------------------------------------------


def when(**fields: object) -> When:
    return When.model_validate(fields)


def test_no_when_runs_for_everything():
    for event in EVENTS:
        assert decide(None, event, None) is None
        assert decide(None, event, ["x"]) is None


def test_an_empty_when_runs_for_everything():
    assert decide(when(), "push", ["a.txt"]) is None


def test_event_filter():
    w = when(event="push")
    assert decide(w, "push", None) is None
    assert decide(w, "pull_request", None) == "event pull_request is not in when.event [push]"
    assert decide(when(event=["push", "tag"]), "cron", None) == "event cron is not in when.event [push, tag]"


def test_paths_filter_push_and_pull_request():
    w = when(paths="src/**")
    for event in ("push", "pull_request"):
        assert decide(w, event, ["src/a.py", "README.md"]) is None
        assert decide(w, event, ["README.md", "docs/x.md", "setup.cfg"]) == \
            "no changed file matches when.paths [src/**] (3 files changed)"
    assert decide(w, "push", ["README.md"]) == "no changed file matches when.paths [src/**] (1 file changed)"


def test_any_glob_and_any_file_is_enough():
    w = when(paths=["docs/*.md", "**/*.py"])
    assert decide(w, "push", ["README.md", "tools/x/gen.py"]) is None
    assert decide(w, "push", ["docs/a.md"]) is None
    assert decide(w, "push", ["docs/a/b.md"]) == \
        "no changed file matches when.paths [docs/*.md, **/*.py] (1 file changed)"


def test_unknown_changes_do_not_filter():
    """The first push of a branch, a tag: what changed is unknown, so the pipeline runs."""
    assert decide(when(paths="src/**"), "push", None) is None
    assert decide(when(paths="src/**"), "pull_request", None) is None


def test_an_empty_commit_runs():
    assert decide(when(paths="src/**"), "push", []) is None


@pytest.mark.parametrize("event", ["tag", "cron", "manual", "api"])
def test_paths_do_not_filter_runs_asked_for_as_such(event):
    assert decide(when(paths="src/**"), event, ["README.md"]) is None


def test_event_is_checked_before_paths():
    w = when(event="push", paths="src/**")
    assert decide(w, "tag", ["README.md"]) == "event tag is not in when.event [push]"
    assert decide(w, "push", ["README.md"]) == "no changed file matches when.paths [src/**] (1 file changed)"
    assert decide(w, "push", ["src/x"]) is None


def test_a_long_list_of_globs_is_shortened_in_the_reason():
    w = when(paths=[f"d{i}/**" for i in range(8)])
    assert decide(w, "push", ["x"]) == \
        "no changed file matches when.paths [d0/**, d1/**, d2/**, d3/**, d4/**, +3 more] (1 file changed)"


def test_many_changed_files_are_decided_quickly():
    w = when(paths=["src/**", "**/*.rs", "docs/*.md"])
    changed = [f"vendor/pkg{i}/deep/er/file{i}.go" for i in range(50_000)]
    started = time.monotonic()
    assert decide(w, "push", changed) == \
        "no changed file matches when.paths [src/**, **/*.rs, docs/*.md] (50000 files changed)"
    assert time.monotonic() - started < 10.0
    assert decide(w, "push", [*changed, "src/x"]) is None
    # files the literal head and tail cannot tell apart run the automaton, still in linear time
    w = when(paths="**/test_*.py")
    changed = [f"pkg{i}/deep/er/mod_{i}_test.py" for i in range(50_000)]
    started = time.monotonic()
    assert decide(w, "push", changed) is not None
    assert time.monotonic() - started < 10.0


def test_hostile_file_names_are_just_names():
    w = when(paths="src/**")
    for name in ("src/../etc/passwd", "src/\x00", "src/\n", "src/" + "a" * 100_000):
        assert decide(w, "push", [name]) is None   # under src/ as git names it; decide reads no files
    for name in ("../src/x", "/src/x", "", "\x00src/x", "SRC/x"):
        assert decide(w, "push", [name]) is not None


# --- a step's when: branch, event, paths, status --------------------------------------------


def step(when: dict | None, *, event: str = "push", branch: str | None = "main",
         changed: list[str] | None = None, failed: str | None = None) -> str | None:
    model = None if when is None else StepWhen.model_validate(when)
    return decide_step(model, event=event, branch=branch, changed=changed, failed=failed)


def test_a_step_without_when_runs_until_something_failed():
    assert step(None) is None
    assert step(None, failed="exit 1 in step test") == "not run after a failure (exit 1 in step test)"


def test_status_failure_runs_only_after_a_failure():
    assert step({"status": "failure"}) == "nothing failed (when.status [failure])"
    assert step({"status": ["failure"]}, failed="exit 2 in step a") is None
    assert step({"status": ["success", "failure"]}) is None
    assert step({"status": ["success", "failure"]}, failed="x") is None


def test_branch_globs():
    assert step({"branch": ["main", "release/*"]}, branch="release/1.2") is None
    assert step({"branch": "main"}, branch="dev") == "branch dev is not in when.branch [main]"
    assert step({"branch": "main"}, branch=None) == "the job has no branch; when.branch is [main]"


def test_event_and_paths_as_for_a_pipeline():
    assert step({"event": ["tag"]}) == "event push is not in when.event [tag]"
    assert step({"paths": ["docs/**"]}, changed=["src/a.py"]) == ("no changed file matches when.paths [docs/**] "
                                                                  "(1 file changed)")
    assert step({"paths": ["docs/**"]}, changed=["docs/a.md"]) is None
    assert step({"paths": ["docs/**"]}, changed=None) is None  # unknown: runs
    assert step({"paths": ["docs/**"]}, event="tag", changed=["src/a.py"]) is None


def test_conditions_before_status():
    assert step({"branch": "main", "status": "failure"}, branch="dev", failed="x") == (
        "branch dev is not in when.branch [main]")
