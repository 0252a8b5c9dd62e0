"""Slow and hostile clients do not starve the API: a real `narwhal serve`, a running job
followed by 200 log streams, 30 connections that never finish a request and 20
submissions naming a git server that never answers. /health still answers and a normal
job still passes (the benchmark's `hostile` scenario at a small size)."""

from __future__ import annotations

import pytest

from bench.hostile import TICKER, siege
from narwhal.cli.gitrepo import make_git_repo
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow


def test_finding5_health_and_a_normal_job_survive_hostile_clients(dispatcher, ssh_host, git_repo, tmp_path):
    ticker = simple_pipeline([{"name": "tick", "run": TICKER}])
    ticker["repo"] = [git_repo.path]
    tarpit = simple_pipeline()
    tarpit["repo"] = ["http://127.0.0.1:*/*"]  # "*" stays in one segment: the path needs its own
    other, commit = make_git_repo(str(tmp_path / "other"))
    normal = simple_pipeline()
    normal["repo"] = [other]
    # The tarpit's port is chosen at run time: the admin lists the host glob (a pipeline's
    # glob alone does not make a host fetchable).
    d = dispatcher([ssh_host.runner_config(capacity=2)], {"ticker": ticker, "tarpit": tarpit, "normal": normal},
                   settings={"fetch_hosts": ["127.0.0.1:*"]})
    running = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    d.wait_for(lambda: d.get(f"/jobs/{running}").json()["status"] == "running", what="the ticker running")

    def normal_job() -> str:  # a first submission of a repository: clone, queue, run, pass
        jobs = d.submit(other, commit)
        return d.wait_job(jobs[0]["id"], timeout=120)["status"]

    # /health is timed with a generous client timeout: a starved server fails the request.
    out = siege(d.port, running, followers=200, slow=30, submissions=20, health_requests=50,
                normal=normal_job)
    assert out["followers_open"] == 200 and out["followers_refused"] == 0
    assert out["health_seconds"]["n"] == 50
    assert out["normal_status"] == "passed"
    assert sum(out["tarpit_status_codes"].values()) == 20
    assert set(out["tarpit_status_codes"]) <= {"202 resolving", "503"}, out["tarpit_status_codes"]
    d.post(f"/jobs/{running}/cancel")
    assert d.wait_job(running)["status"] == "cancelled"
