"""Issue 13 on the real path: `narwhal serve`, an sshd runner host, dockerd, busybox images.

Services on the job's own network, steps side by side (timed by Docker's own event clock),
conditions, allow_failure, retry and the NARWHAL_* variables; nothing left behind.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from testbed import TEST_IMAGE
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow

WEB = {"name": "web", "image": TEST_IMAGE,
       "command": "mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 8080 -h /www",
       "ready": {"command": "wget -q -O /dev/null http://127.0.0.1:8080/", "timeout": "30s"}}
DB = {"name": "db", "image": TEST_IMAGE, "command": ["nc", "-ll", "-p", "5432", "-e", "/bin/echo", "pong"],
      "ready": {"port": 5432, "timeout": "30s"}}


def owner_of(d) -> str:
    return d.get("/health").json()["owner"]


def leftovers(docker_engine, d, job_id: int) -> dict[str, list]:
    """Containers, networks and volumes of this job (any state), by its labels."""
    labels = [f"narwhal.owner={owner_of(d)}", f"narwhal.job={job_id}"]
    return {"containers": docker_engine.api.containers(all=True, filters={"label": labels}),
            "networks": docker_engine.api.networks(filters={"label": labels}),
            "volumes": docker_engine.api.volumes(filters={"label": labels}).get("Volumes") or []}


def nothing_left(docker_engine, d, job_id: int) -> bool:
    return not any(leftovers(docker_engine, d, job_id).values())


def steps_of(job: dict) -> dict[str, tuple[str, str | None]]:
    return {s["name"]: (s["status"], s.get("reason")) for s in job["steps"]}


def log_of(d, job_id: int) -> str:
    return d.get(f"/jobs/{job_id}/log").text


def wait_log(d, job_id: int, text: str, timeout: float = 120) -> None:
    d.wait_for(lambda: text in log_of(d, job_id), timeout, f"{text!r} in the log of job {job_id}")


# --- services ---------------------------------------------------------------------------------


def test_a_job_talks_to_its_services_and_leaves_nothing(dispatcher, ssh_host, git_repo, docker_engine):
    steps = [{"name": "test", "run": "wget -q -O - http://web:8080/ && echo \"db says $(nc db 5432 </dev/null)\""}]
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(steps, services=[WEB, DB])})
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    networks: list[dict] = []

    def network_seen() -> bool:
        labels = [f"narwhal.owner={owner_of(d)}", f"narwhal.job={job_id}"]
        networks.extend(docker_engine.api.networks(filters={"label": labels}))
        return bool(networks)

    d.wait_for(network_seen, 60, "the job's network")
    job = d.wait_job(job_id)
    text = log_of(d, job_id)
    assert job["status"] == "passed", (job, text)
    assert "hello-from-web" in text and "db says pong" in text
    assert "[narwhal] service web: ready (" in text and "[narwhal] service db: ready (" in text
    # The runner's network is `none`: the job's network is internal (the engine here, with
    # --iptables=false, cannot enforce it; docs/security.md says so).
    detail = docker_engine.api.inspect_network(networks[0]["Id"])
    assert detail["Internal"] is True and detail["Labels"]["narwhal.attempt"] == "1"
    d.wait_for(lambda: nothing_left(docker_engine, d, job_id), 30, "no container, network or volume")


def test_a_service_stopped_mid_job_fails_it_naming_the_service(dispatcher, ssh_host, git_repo, docker_engine):
    steps = [{"name": "test", "run": "echo talking to db; sleep 60; echo never"},
             {"name": "report", "run": "echo collecting reports", "when": {"status": ["failure"]}}]
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(steps, services=[DB])})
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    wait_log(d, job_id, "talking to db")
    [service] = docker_engine.api.containers(filters={"label": [f"narwhal.owner={owner_of(d)}",
                                                                f"narwhal.job={job_id}", "narwhal.service=db"]})
    docker_engine.api.stop(service["Id"], timeout=1)
    job = d.wait_job(job_id)
    assert job["status"] == "failed" and job["reason"].startswith("service db exited with "), job
    assert job["reason"].endswith(" during the job")
    assert steps_of(job) == {"test": ("failed", f"stopped: {job['reason']}"), "report": ("passed", None)}
    text = log_of(d, job_id)
    assert "never" not in text and "collecting reports" in text
    d.wait_for(lambda: nothing_left(docker_engine, d, job_id), 30, "no container, network or volume")


def test_a_service_that_never_gets_ready_fails_the_job(dispatcher, ssh_host, git_repo, docker_engine):
    late = {**DB, "command": "sleep 60", "ready": {"port": 5432, "timeout": "2s"}}
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(services=[late])})
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    job = d.wait_job(job_id)
    assert (job["status"], job["reason"]) == ("failed", "service db not ready after 2s"), job
    assert steps_of(job) == {"hello": ("skipped", "not run: the job ended")}
    d.wait_for(lambda: nothing_left(docker_engine, d, job_id), 30, "no container, network or volume")


# --- steps side by side ---------------------------------------------------------------------------


def test_two_independent_sleeps_overlap_by_dockers_own_clock(dispatcher, ssh_host, git_repo, docker_engine):
    steps = [{"name": "a", "run": "test -f README.md; sleep 3", "depends_on": []},
             {"name": "b", "run": "test -f README.md; sleep 3", "depends_on": []},
             {"name": "after", "run": "echo both done", "depends_on": ["a", "b"]}]
    d = dispatcher([ssh_host.runner_config(capacity=2)], {"ci": simple_pipeline(steps)})
    since = int(time.time()) - 1
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    job = d.wait_job(job_id)
    text = log_of(d, job_id)
    assert job["status"] == "passed", (job, text)
    until = int(time.time()) + 1
    events = docker_engine.events(since=since, until=until, decode=True, filters={
        "type": "container", "label": [f"narwhal.owner={owner_of(d)}", f"narwhal.job={job_id}"]})
    times: dict[tuple[str, str], int] = {}
    for event in events:
        if event.get("status") in ("start", "die"):
            times[(event["Actor"]["Attributes"]["narwhal.step"], event["status"])] = event["timeNano"]
    # Each ran while the other ran; "after" started when both had ended.
    assert times[("a", "start")] < times[("b", "die")] and times[("b", "start")] < times[("a", "die")], times
    assert times[("after", "start")] > max(times[("a", "die")], times[("b", "die")])
    # Lines say which step wrote them; the checkout happened once, before both.
    assert "after | both done" in text and "[narwhal] steps at once: up to 2" in text
    d.wait_for(lambda: nothing_left(docker_engine, d, job_id), 30, "no container, network or volume")


def test_a_cycle_is_refused_at_its_line(tmp_path):
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "inventory.yaml").write_text("runners: [{name: local, transport: local}]\n")
    pipeline = simple_pipeline([{"name": "a", "run": "x", "depends_on": ["b"]},
                                {"name": "b", "run": "y", "depends_on": ["a"]}])
    (tmp_path / "pipelines" / "ci.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "narwhal", "check", "--config", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "pipelines/ci.yaml:6: steps[0].depends_on: steps depend on each other in a cycle: a -> b -> a"]


# --- conditions, failure policy, variables --------------------------------------------------------

FLAKY = ('n=$(cat .tries 2>/dev/null || echo 0); n=$((n + 1)); echo $n > .tries; '
         'echo "run $n (NARWHAL_STEP_TRY=$NARWHAL_STEP_TRY)"; [ $n -ge 3 ]')


def test_conditions_allow_failure_retry_and_variables(dispatcher, ssh_host, git_repo, docker_engine):
    passing = simple_pipeline([
        {"name": "flaky", "run": FLAKY, "retry": 2},
        {"name": "lint", "run": "echo lint has opinions; exit 1", "allow_failure": True},
        {"name": "deploy", "run": "echo deploying", "when": {"branch": ["main"]}},
        {"name": "report", "run": "echo collecting reports", "when": {"status": ["failure"]}},
        {"name": "vars", "run": "env | grep -E '^(CI|NARWHAL_[A-Z_]+)=' | sort"},
    ])
    failing = simple_pipeline([
        {"name": "test", "run": "exit 4"},
        {"name": "skipped", "run": "echo not after a failure"},
        {"name": "report", "run": "echo collecting reports", "when": {"status": ["failure"]}},
    ])
    d = dispatcher([ssh_host.runner_config(capacity=2)], {"passing": passing, "failing": failing},
                   settings={"public_url": "https://ci.example.com"})
    jobs = {j["pipeline"]: j["id"] for j in d.submit(git_repo.path, git_repo.commit, branch="dev")}

    job = d.wait_job(jobs["passing"])
    text = log_of(d, jobs["passing"])
    assert (job["status"], job["reason"]) == ("passed", None), (job, text)
    assert steps_of(job) == {
        "flaky": ("passed", None),
        "lint": ("failed_allowed", "exit 1 in step lint"),
        "deploy": ("skipped", "branch dev is not in when.branch [main]"),
        "report": ("skipped", "nothing failed (when.status [failure])"),
        "vars": ("passed", None)}
    assert "run 1 (NARWHAL_STEP_TRY=1)" in text and "run 3 (NARWHAL_STEP_TRY=3)" in text
    assert text.count("[narwhal] step flaky: retrying after exit 1") == 2
    assert "deploying" not in text and "collecting reports" not in text
    env = dict(line.split("=", 1) for line in text.splitlines() if line.startswith(("CI=", "NARWHAL_")))
    commit = git_repo.commit
    assert env == {
        "CI": "true", "NARWHAL_REPO": git_repo.path, "NARWHAL_COMMIT": commit, "NARWHAL_SHORT_COMMIT": commit[:8],
        "NARWHAL_BRANCH": "dev", "NARWHAL_EVENT": "api", "NARWHAL_JOB": str(jobs["passing"]),
        "NARWHAL_JOB_URL": f"https://ci.example.com/jobs/{jobs['passing']}", "NARWHAL_PIPELINE": "passing",
        "NARWHAL_STEP": "vars", "NARWHAL_ATTEMPT": "1", "NARWHAL_STEP_TRY": "1", "NARWHAL_WORKSPACE": "/workspace",
        # no tag, ref or pull request for an API submission: set, and empty
        "NARWHAL_TAG": "", "NARWHAL_REF": "", "NARWHAL_PR": "", "NARWHAL_SOURCE_REPO": ""}

    job = d.wait_job(jobs["failing"])
    text = log_of(d, jobs["failing"])
    assert (job["status"], job["reason"]) == ("failed", "exit 4 in step test"), (job, text)
    assert steps_of(job) == {"test": ("failed", "exit 4 in step test"),
                             "skipped": ("skipped", "not run after a failure (exit 4 in step test)"),
                             "report": ("passed", None)}
    assert "collecting reports" in text and "not after a failure" not in text
    d.wait_for(lambda: all(nothing_left(docker_engine, d, i) for i in jobs.values()), 30,
               "no container, network or volume")
