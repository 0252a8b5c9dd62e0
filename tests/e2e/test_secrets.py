"""Issue "Secrets" on the real path: `narwhal serve`, a real sshd runner host and dockerd.

A step prints its secret every way it can (plainly, one byte at a time with sleeps, as
base64, inside a longer line, from its file, a multi-line value); every occurrence is
masked in the stored log, the live stream and `narwhal logs`. While it runs, the value
is in no process's argv, not in `docker inspect`, not in the dispatcher's debug log and
nowhere in the state directory.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading

import pytest
import requests

from narwhal.config.loader import load_config
from narwhal.execution.source import Mirror
from narwhal.execution.transport import LocalTransport
from narwhal.job import JobStatus
from testbed import every_cmdline, everything_under
from tests.e2e.conftest import simple_pipeline, sse_events
from tests.e2e.test_runner_local import execute, new_owner, spec_for
from tests.test_secrets import config_dir

pytestmark = pytest.mark.slow

VALUE = "s3cr3t-Narwhal-VALUE-9f2a/+="
KEY = "-----BEGIN TEST KEY-----\nAAAAB3NzaC1yc2EAAAADAQABAAABAQ\nsecond-line-of-the-key\n-----END TEST KEY-----"
ENV_VALUE = "env-sourced-secret-77c1"

PRINT_EVERY_WAY = r"""
echo "plain: $DEPLOY_TOKEN"
echo "inside:xx${DEPLOY_TOKEN}yy and more"
printf %s "$DEPLOY_TOKEN" | base64
cat /run/secrets/DEPLOY_TOKEN; echo
printf '%s\n' "$SSH_KEY"
echo "env: $ENV_TOKEN"
v="$DEPLOY_TOKEN"; while [ -n "$v" ]; do r="${v#?}"; printf %s "${v%"$r"}"; v="$r"; sleep 0.05; done; echo
echo ready-for-inspection
sleep 5
"""


def spellings(value: str) -> list[bytes]:
    return [value.encode(), base64.b64encode(value.encode())]


def leaks(data: bytes | str) -> list[str]:
    data = data.encode("utf-8", "replace") if isinstance(data, str) else data
    found = []
    for value in (VALUE, ENV_VALUE, "second-line-of-the-key"):
        found += [s.decode() for s in spellings(value) if s in data]
    return found


def test_a_step_printing_its_secret_every_way_leaks_nothing(dispatcher, ssh_host, git_repo, docker_engine,
                                                            tmp_path):
    secret_file = tmp_path / "deploy_token"
    secret_file.write_text(VALUE + "\n")
    secret_file.chmod(0o600)
    key_file = tmp_path / "ssh_key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    pipeline = simple_pipeline([{"name": "show", "run": PRINT_EVERY_WAY},
                                {"name": "after", "run": 'echo "step two still has $DEPLOY_TOKEN"'}],
                               secrets=["DEPLOY_TOKEN", "SSH_KEY", "ENV_TOKEN"])
    d = dispatcher([ssh_host.runner_config()], {"ci": pipeline},
                   inventory={"secrets": {"DEPLOY_TOKEN": {"file": str(secret_file)},
                                          "SSH_KEY": {"file": str(key_file)},
                                          "ENV_TOKEN": {"env": "NARWHAL_E2E_TOKEN"}}},
                   args=("--log-level", "debug"), env={"NARWHAL_E2E_TOKEN": ENV_VALUE})
    [job] = d.submit(git_repo.path, git_repo.commit, "main")
    live: list[str] = []

    def follow() -> None:
        with requests.get(f"{d.url}/jobs/{job['id']}/log", headers={"Accept": "text/event-stream"},
                          stream=True, timeout=120) as r:
            for event in sse_events(r):
                if event.get("event") == "end":
                    return
                live.append(event.get("data", ""))

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    d.wait_for(lambda: "ready-for-inspection" in d.get(f"/jobs/{job['id']}/log").text, 120, "the marker line")

    # While the step runs: argv of every process here (dispatcher, sshd, docker CLI, the
    # container's own processes), the container as Docker shows it, the dispatcher's debug
    # log and every byte of the state directory.
    assert leaks(every_cmdline()) == []
    [container] = docker_engine.api.containers(filters={"label": f"narwhal.job={job['id']}"})
    inspected = json.dumps(docker_engine.api.inspect_container(container["Id"]))
    assert leaks(inspected) == [] and "/run/secrets" in inspected
    assert leaks(d.log_path.read_bytes()) == []
    assert leaks(everything_under(d.state_dir)) == []

    done = d.wait_job(job["id"])
    follower.join(60)
    assert done["status"] == "passed", (done, d.log())
    stored = d.get(f"/jobs/{job['id']}/log").text
    cli = subprocess.run([sys.executable, "-m", "narwhal", "logs", str(job["id"]), "--url", d.url],
                         capture_output=True, text=True, timeout=60)
    for shown in (stored, "\n".join(live), cli.stdout + cli.stderr):
        assert leaks(shown) == [], shown
        assert shown.count("[masked:DEPLOY_TOKEN]") >= 6, shown  # plain, inside, base64, file, bytes, step 2
        assert "[masked:SSH_KEY]" in shown and "[masked:ENV_TOKEN]" in shown
        assert "inside:xx[masked:DEPLOY_TOKEN]yy and more" in shown
    assert leaks(d.log_path.read_bytes()) == [] and leaks(everything_under(d.state_dir)) == []
    listed = requests.get(f"{d.url}/secrets", timeout=30).json()["secrets"]
    assert [s["name"] for s in listed] == ["DEPLOY_TOKEN", "ENV_TOKEN", "SSH_KEY"] and leaks(json.dumps(listed)) == []


PR_PIPELINE = """\
repo: "**"
image: {image}
secrets: [{{name: DEPLOY, optional: true}}]
steps:
  - name: a
    run: echo "token=${{DEPLOY:-unset}}"
"""


def test_a_pull_request_gets_no_secret_limited_to_main_pushes(docker_engine, test_image, git_repo, tmp_path):
    """Optional: the job runs without it. Required: it fails at submission, with the reason."""
    root = config_dir(tmp_path, PR_PIPELINE.format(image=test_image),
                      "DEPLOY: {file: deploy, branches: [main], events: [push]}")
    config = load_config(root)
    pipeline = config.pipelines[0]
    granted = config.grant(pipeline, git_repo.path, "main", "pull_request")
    assert granted.values == {} and granted.withheld == ("DEPLOY",) and granted.refused is None
    outcome, sink = execute(LocalTransport(), spec_for(pipeline, git_repo.commit, secrets=granted.values),
                            git_repo.path, Mirror(tmp_path / "mirrors"), new_owner())
    assert outcome.status is JobStatus.PASSED and "token=unset" in sink.lines
    pushed = config.grant(pipeline, git_repo.path, "main", "push")
    outcome, sink = execute(LocalTransport(), spec_for(pipeline, git_repo.commit, secrets=pushed.values),
                            git_repo.path, Mirror(tmp_path / "mirrors2"), new_owner())
    assert outcome.status is JobStatus.PASSED and "token=[masked:DEPLOY]" in sink.lines

    required = load_config(config_dir(tmp_path / "required", PR_PIPELINE.format(image=test_image).replace(
        "[{name: DEPLOY, optional: true}]", "[DEPLOY]"), "DEPLOY: {file: deploy, branches: [main], events: [push]}"))
    refused = required.grant(required.pipelines[0], git_repo.path, "main", "pull_request")
    assert refused.refused == ("secret DEPLOY is not available to pull_request events "
                               "(secrets.DEPLOY.events allows push)")


def test_a_reload_rotates_secrets_and_a_running_job_keeps_its_value(dispatcher, git_repo, tmp_path):
    import hashlib

    def digest(value: str) -> str:
        return hashlib.sha256(value.encode()).hexdigest()

    old, new = "rotation-old-value-1234", "rotation-new-value-5678"
    secret_file = tmp_path / "rotating"
    secret_file.write_text(old)
    secret_file.chmod(0o600)
    steps = [{"name": "first", "run": 'printf %s "$TOKEN" | sha256sum; echo waiting-for-reload; sleep 4'},
             {"name": "second", "run": 'printf %s "$TOKEN" | sha256sum'}]
    d = dispatcher([{"name": "local", "transport": "local", "capacity": 2}],
                   {"ci": simple_pipeline(steps, secrets=["TOKEN"])},
                   inventory={"secrets": {"TOKEN": {"file": str(secret_file)}}})
    [job] = d.submit(git_repo.path, git_repo.commit, "main")
    d.wait_for(lambda: "waiting-for-reload" in d.get(f"/jobs/{job['id']}/log").text, 120, "the first step")
    secret_file.write_text(new)
    assert d.post("/reload").status_code == 200
    done = d.wait_job(job["id"])
    assert done["status"] == "passed", d.log()
    log = d.get(f"/jobs/{job['id']}/log").text
    assert log.count(digest(old)) == 2 and digest(new) not in log  # both steps: the value it started with
    retried = d.post(f"/jobs/{job['id']}/retry").json()
    again = d.wait_job(retried["id"])
    assert again["status"] == "passed"
    log = d.get(f"/jobs/{job['id']}/log").text
    assert digest(new) in log and old not in log and new not in log
