"""``narwhal serve`` starting and stopping as an operator sees it: one line when the port is
taken, "shutting down" (503) while it stops, gone within its grace, and a log that tells the
story of jobs and runners rather than of SSH channels."""

from __future__ import annotations

import shutil
import signal
import subprocess

import pytest

from narwhal.deadline import reserve
from tests.e2e.cli import CLI, LOCAL, cli_env, run
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow


def test_a_port_in_use_is_one_line_naming_it(dispatcher, tmp_path):
    d = dispatcher([LOCAL], {"ci": simple_pipeline()})
    config = tmp_path / "second"
    shutil.copytree(d.config_dir, config)
    proc = subprocess.run([*CLI, "serve", "--config", str(config), "--state", str(tmp_path / "second-state"),
                           "--listen", f"127.0.0.1:{d.port}"], capture_output=True, text=True, timeout=120,
                          env=cli_env(), stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"narwhal: error: cannot listen on 127.0.0.1:{d.port}: the port is in use (another "
                     "narwhal serve or another program; choose another with --listen HOST:PORT)"], proc.stderr
    assert d.answers()  # the first one is untouched


def test_sigterm_answers_shutting_down_then_stops_the_step_and_requeues_the_job(dispatcher, git_repo,
                                                                                docker_engine):
    grace = 6
    d = dispatcher([LOCAL], {"stubborn": simple_pipeline([
        {"name": "deaf", "run": "trap '' TERM; echo deaf to TERM; sleep 300"}])}, settings={"stop_grace": grace})
    job = d.submit(git_repo.path, git_repo.commit)[0]
    d.wait_for(lambda: "deaf to TERM" in d.get(f"/jobs/{job['id']}/log").text, what="the step running")
    owner = d.get("/health").json()["owner"]
    d.send_signal(signal.SIGTERM)

    # While it stops: one line, exit 1, never "internal error" from a closing store.
    for args in (["job", str(job["id"])], ["report"], ["jobs", "--json"]):
        proc = run(*args, "--url", d.url)
        if proc.returncode == 2 and "cannot reach" in proc.stderr:
            pytest.fail(f"the dispatcher was gone before the grace ended:\n{d.log()}")
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert proc.stderr.strip() == ("narwhal: error: the dispatcher is shutting down; "
                                       "try again once it is back"), proc.stderr
    assert d.proc is not None
    assert d.proc.wait(timeout=grace + 120) == 0
    log = d.log()
    assert f"SIGTERM: stopping (grace {grace}s): running jobs get up to {grace - reserve(grace):g}s to finish" in log
    assert "narwhal stopped" in log and "internal error" not in log and "Traceback" not in log
    label = {"label": [f"narwhal.owner={owner}", f"narwhal.job={job['id']}"]}
    assert docker_engine.api.containers(all=True, filters=label) == []  # killed, not left running

    d.start()
    again = d.get(f"/jobs/{job['id']}").json()
    assert again["attempt"] == 2 and again["status"] in ("queued", "running")
    text = d.get(f"/jobs/{job['id']}/log").text
    assert f"[narwhal] the dispatcher is stopping: step stopped within its {grace}s grace" in text
    d.post(f"/jobs/{job['id']}/cancel")
    assert d.wait_job(job["id"])["status"] == "cancelled"


def test_the_log_tells_the_story_of_jobs_and_runners(dispatcher, ssh_hosts, git_repo):
    hosts = ssh_hosts(2)
    d = dispatcher([h.runner_config() for h in hosts], {"ci": simple_pipeline()})
    job = d.submit(git_repo.path, git_repo.commit, branch="main")[0]
    assert d.wait_job(job["id"])["status"] == "passed"

    def checks() -> list:
        return [r["health"]["checked_at"] for r in d.get("/runner").json()["runners"]]

    seen: list[list] = [checks()]

    def more_checks() -> bool:  # five more rounds of health checks of every runner (SSH each time)
        now = checks()
        if now != seen[-1]:
            seen.append(now)
        return len(seen) > 5

    d.wait_for(more_checks, what="five more rounds of health checks")
    lines = d.log().splitlines()
    assert not [line for line in lines if "asyncssh" in line], "\n".join(lines)
    story = "\n".join(lines)
    for name in ("runner-1", "runner-2"):
        assert f"runner {name} healthy (docker " in story, story
    for fact in (f"job {job['id']} queued: ci for", f"job {job['id']} started on runner-",
                 f"job {job['id']} finished on runner-"):
        assert fact in story, story
    assert len(lines) <= 12, story  # the health checks and SSH channels of ~12 rounds say nothing
