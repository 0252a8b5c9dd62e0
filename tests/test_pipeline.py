"""pipeline: models, matching, loading a directory; duration parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from narwhal.config.duration import parse_duration
from narwhal.config.pipeline import Pipeline, load_pipelines, parse_pipeline
from narwhal.config.yamlfile import parse_yaml
from narwhal.errors import ConfigError

GOOD = """\
repo: "*"
image: narwhal-test/busybox:latest
steps:
  - name: build
    run: make
"""


def pipeline(text: str, filename: str = "pipelines/p.yaml") -> Pipeline:
    return parse_pipeline(parse_yaml(text, filename))


def problems(text: str, filename: str = "pipelines/p.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        pipeline(text, filename)
    return [str(p) for p in info.value.problems]


# --- durations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [(90, 90.0), (1.5, 1.5), ("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0),
     ("1h30m", 5400.0), ("500ms", 0.5), ("1m30s", 90.0), (" 2s ", 2.0), ("1.5h", 5400.0), ("1h0m1s500ms", 3601.5),
     ("30d", 2592000.0), ("1d12h", 129600.0)],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [0, -1, "0s", "-5s", "abc", "", "10 minutes", "1m1h", "1h1h", "1h5d", "5x", "s", True,
                                   None, [], float("inf"), float("nan"), "1e3"])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value).startswith("expected a duration > 0 such as 90, '90s', '10m', '1h30m' or '500ms', got ")


# --- models ------------------------------------------------------------------------


def test_minimal_pipeline_defaults():
    p = pipeline(GOOD, "pipelines/build.yaml")
    assert p.name == "build"  # from the file stem
    assert p.repo == ["*"] and p.branches is None and p.labels == []
    assert p.timeout == 3600.0 and p.env == {}
    (step,) = p.steps
    assert p.image_for(step) == "narwhal-test/busybox:latest"
    assert p.timeout_for(step) == 3600.0
    assert p.where(("steps", 0)) == ("pipelines/build.yaml", 4)


def test_full_pipeline():
    p = pipeline(
        "name: web\n"
        "repo: [https://git.example.com/web.git, /srv/git/*]\n"
        "branches: [main, release/*]\n"
        "image: registry.example.com:5000/team/app:1.2\n"
        "labels: [linux]\n"
        "timeout: 20m\n"
        "env: {CI_LEVEL: 2, DEBUG: true, RATIO: 0.5, NAME: x}\n"
        "steps:\n"
        "  - name: unit tests\n"
        "    run: pytest\n"
        "    timeout: 90s\n"
        "    env: {DEBUG: false}\n"
        "  - name: lint\n"
        "    run: ruff .\n"
        "    image: python:3.11-slim@sha256:" + "0" * 64 + "\n"
    )
    assert p.name == "web" and p.branches == ["main", "release/*"]
    assert p.env == {"CI_LEVEL": "2", "DEBUG": "true", "RATIO": "0.5", "NAME": "x"}
    unit, lint = p.steps
    assert p.timeout_for(unit) == 90.0 and p.timeout_for(lint) == 1200.0
    assert p.env_for(unit)["DEBUG"] == "false" and p.env_for(lint)["DEBUG"] == "true"
    assert p.image_for(unit) == "registry.example.com:5000/team/app:1.2"
    assert p.image_for(lint).startswith("python:3.11-slim@sha256:")


def test_repo_and_branches_accept_a_single_string():
    p = pipeline("repo: /srv/a\nbranches: main\nimage: x\nsteps: [{name: s, run: 'true'}]\n")
    assert p.repo == ["/srv/a"] and p.branches == ["main"]


def test_image_may_come_from_every_step_instead():
    p = pipeline("repo: x\nsteps:\n  - {name: a, run: 'true', image: alpine}\n  - {name: b, run: 'true', image: debian}\n")
    assert [p.image_for(s) for s in p.steps] == ["alpine", "debian"]
    assert problems("repo: x\nsteps:\n  - {name: a, run: 'true', image: alpine}\n  - {name: b, run: 'true'}\n") == [
        "pipelines/p.yaml:1: image: required (steps without their own image: b)"
    ]


def test_matches():
    p = pipeline("repo: ['/srv/git/*', https://h/x.git]\nbranches: [main, 'release/*']\nimage: x\nsteps: [{name: s, run: 'true'}]\n")
    assert p.matches("/srv/git/app", "main")
    assert p.matches("https://h/x.git", "release/1.0")
    assert not p.matches("https://h/y.git", "main")
    assert not p.matches("/srv/git/app", "feature")
    assert not p.matches("/srv/git/app", None)  # finding 9: no branch never matches `branches:`
    assert not p.matches("/srv/git/a/b", "main")  # `*` stays within one path segment
    anything = pipeline(GOOD)
    assert anything.matches("/any/where", "any-branch") and anything.matches("/x", None)


def test_unknown_and_dangerous_keys_are_refused():
    for key in ("privileged: true", "volumes: [/:/host]", "cap_add: [SYS_ADMIN]", "network: host", "devices: [/dev/sda]"):
        (message,) = problems(GOOD + key + "\n")
        assert message.endswith(": unknown key (allowed: name, repo, branches, image, labels, timeout, env, "
                                "secrets, when, schedule, matrix, services, parallel, clone, artifacts, steps, cache)")
        assert message.startswith("pipelines/p.yaml:6: ")
    (message,) = problems(GOOD + "    privileged: true\n")
    assert message == ("pipelines/p.yaml:6: steps[0].privileged: unknown key (allowed: name, run, image, env, "
                       "secrets, timeout, depends_on, when, allow_failure, retry)")


def test_empty_and_missing_steps():
    assert problems("repo: x\nimage: x\nsteps: []\n") == ["pipelines/p.yaml:3: steps: expected at least 1 item"]
    assert problems("repo: x\nimage: x\n") == ["pipelines/p.yaml:1: steps: required"]
    assert problems("") == ["pipelines/p.yaml: expected a mapping, got an empty file"]


def test_duplicate_step_names_at_the_duplicate():
    assert problems(GOOD + "  - name: test\n    run: x\n  - name: build\n    run: y\n") == [
        "pipelines/p.yaml:8: steps[2].name: duplicate step name 'build' (first at line 4)"
    ]


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("timeout: soon\n", "pipelines/p.yaml:6: timeout: expected a duration > 0"),
        ("timeout: 0\n", "pipelines/p.yaml:6: timeout: expected a duration > 0"),
        ("env: {A-B: x}\n", "pipelines/p.yaml:6: env.A-B: expected a variable name"),
        ("env: {A: null}\n", "pipelines/p.yaml:6: env.A: expected a string, got null"),
        ("env: [A]\n", "pipelines/p.yaml:6: env: expected a mapping, got a list"),
        ("labels: ['x y']\n", "pipelines/p.yaml:6: labels[0]: expected a label"),
        ("branches: ['-evil']\n", "pipelines/p.yaml:6: branches[0]: expected a branch name"),
        ("name: 'bad name'\n", "pipelines/p.yaml:6: name: expected a name of letters"),
    ],
)
def test_bad_pipeline_values(snippet, expected):
    (message,) = problems(GOOD + snippet)
    assert message.startswith(expected)


@pytest.mark.parametrize("image", ["'bad image'", "-v", "'--privileged'", "UPPER", "'a:'", "'x;rm -rf /'", "'x\\ny'"])
def test_bad_images(image):
    (message,) = problems(f"repo: x\nimage: {image}\nsteps: [{{name: s, run: 'true'}}]\n")
    assert message.startswith("pipelines/p.yaml:2: image: expected an image reference")


def test_bad_repo_and_step_values():
    found = problems("repo: ['-uexec', '']\nimage: x\nsteps:\n  - name: ' lead'\n    run: ''\n    timeout: -1\n")
    assert [m.split(": ")[1] for m in found] == ["repo[0]", "repo[1]", "steps[0].name", "steps[0].run", "steps[0].timeout"]


def test_file_name_that_is_not_a_name():
    assert problems(GOOD, "pipelines/my pipeline.yaml") == [
        "pipelines/my pipeline.yaml:1: name: required: the file name 'my pipeline' is not a valid pipeline name"
    ]
    assert pipeline("name: ok\n" + GOOD, "pipelines/my pipeline.yaml").name == "ok"


def test_all_problems_at_once_sorted_by_line():
    found = problems("repo: 5\nprivileged: true\nsteps:\n  - name: a\n    run: x\n    timeout: never\n  - name: a\n    run: ''\n")
    assert [m.split(": ")[0] for m in found] == [
        "pipelines/p.yaml:1", "pipelines/p.yaml:1", "pipelines/p.yaml:2", "pipelines/p.yaml:6", "pipelines/p.yaml:7", "pipelines/p.yaml:8",
    ]


# --- a directory -------------------------------------------------------------------


def test_load_pipelines_sorted_and_skipping_other_files(tmp_path):
    (tmp_path / "b.yml").write_text(GOOD)
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / ".a.yaml.swp").write_text("junk")
    (tmp_path / "README.md").write_text("# not a pipeline")
    assert [p.name for p in load_pipelines(tmp_path, "pipelines")] == ["a", "b"]


def test_load_pipelines_reports_every_file_and_duplicate_names(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text("name: a\n" + GOOD)
    (tmp_path / "c.yaml").write_text("repo: x\nimage: x\nsteps: []\n")
    (tmp_path / "d.yaml").write_text("repo: [x\n")
    with pytest.raises(ConfigError) as info:
        load_pipelines(tmp_path, "pipelines")
    lines = str(info.value).splitlines()
    assert lines[0] == "pipelines/b.yaml:1: name: duplicate pipeline name 'a' (also in pipelines/a.yaml)"
    assert lines[1] == "pipelines/c.yaml:3: steps: expected at least 1 item"
    assert lines[2].startswith("pipelines/d.yaml:2: invalid YAML")
    with pytest.raises(ConfigError, match="not a directory"):
        load_pipelines(tmp_path / "missing")


def test_shipped_example_pipeline():
    root = Path(__file__).resolve().parent.parent
    (p,) = load_pipelines(root / "pipelines", "pipelines")
    assert p.name == "example" and p.repo == ["*"] and p.image == "narwhal-test/busybox:latest"
    assert [s.name for s in p.steps] == ["list", "count"]
    assert p.matches("/any/repo", "main")


# --- services, failure policy, step conditions (issue 13) ---------------------------------

SERVICE = GOOD.replace("steps:\n", "services:\n  - name: db\n    image: postgres:16\n    {extra}\nsteps:\n")


def test_a_service_with_every_key():
    p = pipeline(SERVICE.format(extra="env: {POSTGRES_PASSWORD: x, N: 1}\n    command: [postgres, -c, fsync=off]\n"
                                      "    ready: {port: 5432, timeout: 30s}"))
    (db,) = p.services
    assert (db.name, db.image, db.env, db.command) == ("db", "postgres:16", {"POSTGRES_PASSWORD": "x", "N": "1"},
                                                        ["postgres", "-c", "fsync=off"])
    assert db.ready is not None and (db.ready.port, db.ready.command, db.ready.timeout) == (5432, None, 30.0)
    shell = pipeline(SERVICE.format(extra="command: 'nc -lk -p 1 -e true'\n    ready: {command: 'true'}"))
    assert shell.services[0].command == "nc -lk -p 1 -e true" and shell.services[0].ready.timeout == 60.0


@pytest.mark.parametrize("extra, message", [
    ("ready: {port: 1, command: x}", "pipelines/p.yaml:6: services[0].ready: give either command or port"),
    ("ready: {}", "pipelines/p.yaml:6: services[0].ready: give either command or port"),
    ("ready: {port: 70000}", "pipelines/p.yaml:6: services[0].ready.port: expected a number <= 65535, got 70000"),
    ("command: []", "pipelines/p.yaml:6: services[0].command: expected a shell command (a string) or a list of "
                    "arguments (strings), got a list"),
    ("command: [a, 1]", "pipelines/p.yaml:6: services[0].command: expected a shell command (a string) or a list of "
                        "arguments (strings), got a list"),
    ("network: host", "pipelines/p.yaml:6: services[0].network: unknown key (allowed: name, image, env, command, ready)"),
    ("privileged: true", "pipelines/p.yaml:6: services[0].privileged: unknown key (allowed: name, image, env, command, "
                         "ready)"),
])
def test_service_problems_are_located(extra, message):
    assert problems(SERVICE.format(extra=extra)) == [message]


@pytest.mark.parametrize("name", ["DB", "-db", "db-", "d_b", "a" * 64, "db.local", "db 1"])
def test_a_service_name_must_be_a_host_name(name):
    (message,) = problems(SERVICE.replace("name: db", f"name: '{name}'").format(extra="env: {}"))
    assert message.startswith("pipelines/p.yaml:4: services[0].name: expected a service name of lowercase letters")


def test_service_images_are_checked_like_step_images():
    (message,) = problems(SERVICE.replace("postgres:16", "'--privileged'").format(extra="env: {}"))
    assert message.startswith("pipelines/p.yaml:5: services[0].image: expected an image reference")


def test_duplicate_service_names():
    text = SERVICE.format(extra="env: {}").replace("steps:\n", "  - name: db\n    image: redis\nsteps:\n")
    assert problems(text) == ["pipelines/p.yaml:7: services[1].name: duplicate service name 'db' (first at line 4)"]


def test_failure_policy_and_step_when():
    p = pipeline(GOOD + "    allow_failure: true\n    retry: 2\n"
                        "    when: {branch: [main, 'release/*'], event: push, status: [success, failure]}\n")
    (step,) = p.steps
    assert step.allow_failure is True and step.retry == 2
    assert step.when is not None and step.when.branch == ["main", "release/*"] and step.when.event == ["push"]
    assert step.when.status == ["success", "failure"]
    defaults = pipeline(GOOD).steps[0]
    assert (defaults.allow_failure, defaults.retry, defaults.when, defaults.depends_on) == (False, 0, None, [])
    assert pipeline(GOOD).parallel == 4 and pipeline(GOOD).services == []


@pytest.mark.parametrize("extra, message", [
    ("    retry: 11\n", "pipelines/p.yaml:6: steps[0].retry: expected a number <= 10, got 11"),
    ("    retry: true\n", "pipelines/p.yaml:6: steps[0].retry: expected an integer, got true"),
    ("    allow_failure: 'yes'\n", "pipelines/p.yaml:6: steps[0].allow_failure: expected true or false, got 'yes'"),
    ("    when: {status: [broken]}\n", "pipelines/p.yaml:6: steps[0].when.status[0]: expected one of 'success', "
                                     "'failure', got 'broken'"),
    ("    when: {branch: ['-x']}\n", "pipelines/p.yaml:6: steps[0].when.branch[0]: expected a branch name or glob "
                                   "without spaces (not starting with '-'), got '-x'"),
])
def test_failure_policy_problems(extra, message):
    assert problems(GOOD + extra) == [message]


def test_a_pipeline_when_takes_neither_branch_nor_status():
    (message,) = problems(GOOD + "when: {status: [failure]}\n")
    assert message.startswith("pipelines/p.yaml:6: when.status: unknown key (allowed: event, paths)")


def test_parallel_bounds():
    assert problems(GOOD + "parallel: 0\n") == ["pipelines/p.yaml:6: parallel: expected a number >= 1, got 0"]
    assert pipeline(GOOD + "parallel: 64\n").parallel == 64


def test_the_readme_examples_are_valid_pipelines():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for start in ("# pipelines/ci.yaml", "# pipelines/release.yaml"):
        block = text[text.index(start):]
        block = block[:min(i for i in (block.find("```"), block.find("\n# inventory.yaml")) if i >= 0)]
        assert pipeline(block, start[2:]).steps


# --- artifacts ---------------------------------------------------------------------


def test_artifacts_parse_with_defaults():
    p = pipeline(GOOD + "artifacts: {paths: ['dist/*.whl', ./report.xml]}\n")
    assert p.artifacts is not None
    assert p.artifacts.paths == ["dist/*.whl", "report.xml"]
    assert p.artifacts.expire is None and p.artifacts.when == "on_success"
    one = pipeline(GOOD + "artifacts: {paths: out, expire: 30d, when: always}\n").artifacts
    assert one is not None and one.paths == ["out"] and one.expire == 30 * 86400 and one.when == "always"


@pytest.mark.parametrize("when, passed, failed", [("on_success", True, False), ("on_failure", False, True),
                                                  ("always", True, True)])
def test_artifacts_when(when, passed, failed):
    a = pipeline(GOOD + f"artifacts: {{paths: [x], when: {when}}}\n").artifacts
    assert a is not None and a.wanted(True) is passed and a.wanted(False) is failed


@pytest.mark.parametrize("pattern, why", [
    ("/etc/passwd", "relative to the workspace"),
    ("../secret", "no '..'"),
    ("a/../../b", "no '..'"),
    ("dist/..", "no '..'"),
    ("./", "a file or glob"),
    ("a\\x00b", "control character"),
    ("a\\nb", "control character"),
    ("x" * 513, "at most 512 characters"),
])
def test_artifact_patterns_that_could_escape_are_config_errors(pattern, why):
    (message,) = problems(GOOD + f'artifacts:\n  paths: ["{pattern}"]\n')
    assert message.startswith("pipelines/p.yaml:7: artifacts.paths[0]: "), message
    assert why in message


def test_artifacts_are_strict():
    (message,) = problems(GOOD + "artifacts: {paths: [x], keep: forever}\n")
    assert message.startswith("pipelines/p.yaml:6: artifacts.keep: ") and "unknown key" in message
    (message,) = problems(GOOD + "artifacts: {paths: [x], when: sometimes}\n")
    assert "artifacts.when" in message
    (message,) = problems(GOOD + "artifacts: {paths: []}\n")
    assert "artifacts.paths" in message
    many = ", ".join(f"f{i}" for i in range(65))
    (message,) = problems(GOOD + f"artifacts: {{paths: [{many}]}}\n")
    assert "artifacts.paths" in message
