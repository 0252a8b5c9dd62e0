"""Secrets: declaration, reading, scope, delivery argv and the API listing (no Docker here).

The real path (sshd, dockerd, a step printing its secret every way it can) is in
tests/e2e/test_secrets.py; masking itself is in tests/test_masking.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import webtest

from narwhal.api.app import make_app
from narwhal.cli.gitrepo import make_git_repo
from narwhal.config.loader import load_config
from narwhal.config.secrets import MIN_LENGTH, grant, parse_secrets
from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.errors import ConfigError
from narwhal.execution import docker
from narwhal.job import JobStatus

VALUE = "hunter2-correct-horse"
ENV = {"NARWHAL_TEST_TOKEN": "tok-" + "x" * 20}


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def load(tmp_path: Path, secrets_yaml: str, environ: dict | None = None):
    import yaml

    from narwhal.config.yamlfile import Document

    raw = yaml.safe_load(secrets_yaml)
    return parse_secrets(raw, "inventory.yaml", Document(raw, "inventory.yaml"), tmp_path,
                         environ if environ is not None else ENV)


# --- reading -------------------------------------------------------------------------


def test_file_and_env_secrets_are_read_and_never_shown(tmp_path):
    write(tmp_path / "deploy", VALUE + "\n")
    secrets, warnings = load(tmp_path, "A: {file: deploy}\nB: {env: NARWHAL_TEST_TOKEN}\n")
    assert secrets["A"].value == VALUE  # one line: the newline `echo` added is dropped
    assert secrets["B"].value == ENV["NARWHAL_TEST_TOKEN"]
    assert warnings == []
    assert VALUE not in repr(secrets) and VALUE not in str(secrets["A"])


def test_a_multi_line_file_keeps_every_byte(tmp_path):
    key = "-----BEGIN KEY-----\nabcdefgh\n-----END KEY-----\n"
    write(tmp_path / "key", key)
    secrets, _ = load(tmp_path, "KEY: {file: key}")
    assert secrets["KEY"].value == key


def test_a_file_others_can_read_is_a_warning(tmp_path):
    write(tmp_path / "loose", VALUE, 0o644)
    secrets, warnings = load(tmp_path, "LOOSE: {file: loose}")
    assert "LOOSE" in secrets
    [warning] = warnings
    assert "mode 0644" in str(warning) and "chmod 600" in str(warning) and VALUE not in str(warning)


@pytest.mark.parametrize("yaml_text, expected", [
    ("A: {file: missing}", "secret A: cannot read file"),
    ("A: {env: NARWHAL_NOT_SET}", "secret A: environment variable NARWHAL_NOT_SET is not set"),
    ("A: {file: short}", f"at least {MIN_LENGTH} are needed"),
    ("A: {file: nul}", "NUL byte"),
    ("A: {file: binary}", "not UTF-8"),
    ("A: {file: big}", "larger than"),
    ("A: {file: dir}", "not a regular file"),
    ("A: {file: fifo}", "not a regular file"),
    ("A: {file: x, env: Y}", "exactly one of file"),
    ("A: {}", "exactly one of file"),
    ("A: {file: x, colour: red}", "unknown key"),
    ("A: {env: NARWHAL_TEST_TOKEN, events: [deploy]}", "expected one of push"),
    ("9A: {env: NARWHAL_TEST_TOKEN}", "expected a secret name"),
    ("NARWHAL_JOB: {env: NARWHAL_TEST_TOKEN}", "reserved"),
    ("CI: {env: NARWHAL_TEST_TOKEN}", "reserved"),
    ("A: [x]", "expected a mapping"),
])
def test_bad_secrets_are_refused_with_the_name_never_the_value(tmp_path, yaml_text, expected):
    write(tmp_path / "short", "abc")
    (tmp_path / "nul").write_bytes(b"abcdefgh\x00ijkl")
    (tmp_path / "binary").write_bytes(b"\xff\xfe" * 8)
    (tmp_path / "big").write_bytes(b"a" * (64 * 1024 + 1))
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")  # opening must not block: O_NONBLOCK, then refused
    with pytest.raises(ConfigError) as info:
        load(tmp_path, yaml_text)
    message = str(info.value)
    assert expected in message
    assert message.startswith("inventory.yaml")
    for leaked in ("abcdefgh", "ijkl", ENV["NARWHAL_TEST_TOKEN"]):
        assert leaked not in message


# --- scope ---------------------------------------------------------------------------


def scoped(tmp_path, body: str):
    secrets, _ = load(tmp_path, f"S: {{env: NARWHAL_TEST_TOKEN, {body}}}")
    return secrets


def test_pull_requests_get_no_secret_unless_allowed(tmp_path):
    secrets = scoped(tmp_path, "branches: [main]")
    assert secrets["S"].refusal("/r", "main", "push") is None
    assert "not available to pull_request events" in secrets["S"].refusal("/r", "main", "pull_request")
    allowed = scoped(tmp_path, "events: [pull_request]")
    assert allowed["S"].refusal("/r", "feature", "pull_request") is None


def test_branch_and_repository_scopes(tmp_path):
    secrets = scoped(tmp_path, "branches: [main, 'release/*'], repos: ['https://git.example.com/team/*']")
    s = secrets["S"]
    assert s.refusal("https://git.example.com/team/app", "release/1.0", "push") is None
    assert "branch feature" in s.refusal("https://git.example.com/team/app", "feature", "push")
    assert "a job without a branch" in s.refusal("https://git.example.com/team/app", None, "api")
    assert "repository" in s.refusal("https://git.example.com/other/app", "main", "push")


def test_grant_refuses_required_and_withholds_optional(tmp_path):
    secrets = scoped(tmp_path, "branches: [main]")
    assert grant(secrets, ["S"], ["S"], "/r", "main", "push").values == {"S": ENV["NARWHAL_TEST_TOKEN"]}
    refused = grant(secrets, ["S"], ["S"], "/r", "dev", "push")
    assert refused.refused and refused.values == {}
    optional = grant(secrets, ["S"], [], "/r", "dev", "push")
    assert optional.refused is None and optional.values == {} and optional.withheld == ("S",)
    gone = grant({}, ["S"], ["S"], "/r", "main", "push")
    assert "no longer declared" in (gone.refused or "")


# --- pipelines and the whole config --------------------------------------------------


def config_dir(tmp_path: Path, pipeline: str, secrets: str = "DEPLOY: {file: deploy}") -> Path:
    root = tmp_path / "config"
    (root / "pipelines").mkdir(parents=True)
    write(root / "deploy", VALUE)
    (root / "inventory.yaml").write_text(
        "runners:\n  - {name: local, transport: local}\n"
        f"settings:\n  local_roots: [{str(tmp_path)!r}]\n"
        "secrets:\n  " + secrets.replace("\n", "\n  ") + "\n")
    (root / "pipelines" / "ci.yaml").write_text(pipeline)
    return root


PIPELINE = """\
repo: "**"
image: busybox
secrets: [DEPLOY]
steps:
  - name: a
    run: echo a
  - name: b
    run: echo b
    secrets: [{name: OTHER, optional: true}]
"""


def test_a_pipeline_may_only_ask_for_declared_secrets(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(config_dir(tmp_path, PIPELINE))
    [problem] = info.value.problems
    assert str(problem).startswith("pipelines/ci.yaml:9: steps.1.secrets[0]: unknown secret 'OTHER'")


def test_a_secret_may_not_shadow_env(tmp_path):
    pipeline = PIPELINE.replace("secrets: [{name: OTHER, optional: true}]", "env: {DEPLOY: x}")
    with pytest.raises(ConfigError, match="has the name of a variable in env"):
        load_config(config_dir(tmp_path, pipeline))


def test_steps_get_the_pipeline_secrets_and_their_own(tmp_path):
    root = config_dir(tmp_path, PIPELINE, "DEPLOY: {file: deploy}\nOTHER: {file: deploy}")
    config = load_config(root)
    pipe = config.pipelines[0]
    assert [r.name for r in pipe.secrets_for(pipe.steps[0])] == ["DEPLOY"]
    assert [r.name for r in pipe.secrets_for(pipe.steps[1])] == ["DEPLOY", "OTHER"]
    assert pipe.required_secrets() == ["DEPLOY"]
    [listed] = [s for s in config.secrets_overview() if s["name"] == "DEPLOY"]
    assert listed["pipelines"] == ["ci"] and "value" not in listed and VALUE not in json.dumps(listed)


def test_check_lists_secrets_and_warns_about_loose_files(tmp_path):
    root = config_dir(tmp_path, PIPELINE.replace("    secrets: [{name: OTHER, optional: true}]\n", ""))
    (root / "deploy").chmod(0o644)
    result = subprocess.run(["narwhal", "check", "--config", str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "DEPLOY" in result.stdout and "mode 0644" in result.stdout
    assert VALUE not in result.stdout + result.stderr


# --- submission ----------------------------------------------------------------------


def test_a_job_that_may_not_have_its_secret_fails_at_submission(tmp_path):
    root = config_dir(tmp_path, PIPELINE.replace("    secrets: [{name: OTHER, optional: true}]\n", ""),
                      "DEPLOY: {file: deploy, branches: [main]}")
    dispatcher = Dispatcher(load_config(root), tmp_path / "state")
    try:
        path, sha = make_git_repo(str(tmp_path / "repo"))
        [(job, created)] = dispatcher.submit(path, sha, "feature")
        assert created and job.status is JobStatus.ERROR
        assert job.reason == "secret DEPLOY is not available to branch feature (secrets.DEPLOY.branches)"
        [(ok, _)] = dispatcher.submit(path, sha.replace(sha[0], sha[0]), "main")  # same commit: same job
        assert ok.id == job.id
        assert VALUE not in (tmp_path / "state" / "narwhal.db").read_bytes().decode("latin-1")
    finally:
        dispatcher.stop()


def test_get_secrets_lists_names_and_needs_the_token(tmp_path):
    dispatcher = Dispatcher(load_config(config_dir(tmp_path, PIPELINE.replace(
        "    secrets: [{name: OTHER, optional: true}]\n", ""))), tmp_path / "state")
    try:
        app = webtest.TestApp(make_app(dispatcher, token="t0ken"))
        assert app.get("/secrets", expect_errors=True).status_int == 401
        body = app.get("/secrets", headers={"Authorization": "Bearer t0ken"}).json
        assert [s["name"] for s in body["secrets"]] == ["DEPLOY"]
        assert VALUE not in json.dumps(body)
    finally:
        dispatcher.stop()


# --- delivery ------------------------------------------------------------------------


def test_secret_values_never_reach_the_docker_command_line():
    header = docker.secrets_header({"TOKEN": VALUE, "KEY": "multi\nline 'quoted' $x \\c"})
    argv = docker.run_step("n", "busybox", "echo hi", volume="v", label_values={"narwhal": "1"},
                           env={"A": "b"}, checkout="ab" * 16, secrets_size=len(header))
    joined = "\x00".join(argv)
    assert VALUE not in joined and "multi" not in joined
    assert "-i" in argv and any(a.startswith("type=tmpfs,destination=/run/secrets") for a in argv)
    assert header.endswith(b"\n\n") and b"TOKEN=" in header
    assert all(32 <= b < 127 or b == 10 for b in header)  # escaped: one line per secret


@pytest.mark.parametrize("shell", ["dash", "busybox sh", "bash"])
def test_the_wrapper_reads_secrets_then_leaves_the_rest_of_stdin(shell, tmp_path):
    """The same wrapper the container runs, under each common /bin/sh, outside Docker."""
    from tests.conftest import need

    need(shutil.which(shell.split()[0]), f"{shell} is not installed")
    values = {"TOKEN": VALUE, "KEY": "multi\nline 'q' $HOME \\c %s é\n\n"}
    script = docker.wrapper(checkout=False, secrets=True)[2].replace(docker.SECRETS_DIR, str(tmp_path))
    script = script.replace("exec </dev/null; ", "")  # read what follows, to prove none was eaten
    run = f'printf "%s|%s|" "$TOKEN" "$KEY"; cat; printf "|%s" "$(cat {tmp_path}/KEY)"'
    result = subprocess.run([*shell.split(), "-c", script, "sh", run],
                            input=docker.secrets_header(values) + b"REST", capture_output=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"{VALUE}|{values['KEY']}|REST|{values['KEY'].rstrip(chr(10))}"
    assert (tmp_path / "KEY").stat().st_mode & 0o777 == 0o600
