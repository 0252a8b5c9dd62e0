"""A branch or tag without a commit, end to end: ``POST /commit`` and ``narwhal submit`` against
the real dispatcher process, a repository served over plain HTTP (static files after ``git
update-server-info``), and a ``local`` runner on the real Docker engine."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from testbed import GIT_ENV, GitHttpServer
from tests.e2e.conftest import DispatcherProcess, simple_pipeline

LOCAL = {"name": "local", "transport": "local", "capacity": 2}
STEPS = [{"name": "hello", "run": "echo hello from $NARWHAL_COMMIT; cat version.txt"}]


def post_head(d: DispatcherProcess, body: dict[str, Any], timeout: float = 60) -> dict:
    """POST a branch without a commit; a slow lookup answers 'resolving': ask again until the jobs are there."""
    deadline = time.monotonic() + timeout
    while True:
        r = d.post("/commit", body)
        assert r.status_code in (200, 202), (r.status_code, r.text, d.log())
        answer = r.json()
        if answer.get("status") != "resolving" or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def test_a_branch_head_served_over_http_is_resolved_and_built(dispatcher, git_repo, tmp_path):
    with GitHttpServer(tmp_path / "served") as server:
        first = git_repo.add_commit({"version.txt": "one\n"})
        url = server.publish(git_repo.path, "app.git")
        d = dispatcher([LOCAL], {"ci": simple_pipeline(STEPS, repo=url)})

        answer = post_head(d, {"repo": url, "branch": "main"})
        assert answer["commit"] == {"repo": url, "commit": first, "branch": "main"}
        job = d.wait_job(answer["jobs"][0]["id"])
        assert (job["status"], job["commit"], job["branch"], job["event"]) == ("passed", first, "main", "api"), \
            d.log()
        log = d.get(f"/jobs/{job['id']}/log").text
        assert f"hello from {first}" in log and "one" in log

        # The same head again is the same job; a new head on the server is a new one.
        again = post_head(d, {"repo": url, "branch": "main"})
        assert [j["id"] for j in again["jobs"]] == [job["id"]] and again["commit"]["commit"] == first
        second = git_repo.add_commit({"version.txt": "two\n"})
        subprocess.run(["git", "tag", "-a", "-m", "release", "v2"], cwd=git_repo.path, env=GIT_ENV, check=True)
        server.publish(git_repo.path, "app.git")
        proc = subprocess.run([sys.executable, "-m", "narwhal", "submit", url, "--branch", "main", "--json",
                               "--url", d.url], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        via_cli = json.loads(proc.stdout)
        assert via_cli["commit"]["commit"] == second
        job = d.wait_job(via_cli["jobs"][0]["id"])
        assert job["status"] == "passed" and job["commit"] == second
        assert "two" in d.get(f"/jobs/{job['id']}/log").text

        # A tag names its commit (peeled): built already, so the job is the one there is (as when a
        # commit is posted again with another branch). An unknown name is told, nothing is queued.
        tagged = post_head(d, {"repo": url, "branch": "v2"})
        assert tagged["commit"]["commit"] == second and [j["id"] for j in tagged["jobs"]] == [job["id"]]
        r = d.post("/commit", {"repo": url, "branch": "nope"})
        assert r.status_code == 422 and r.json()["error"] == f"no branch or tag 'nope' in {url}"
        assert len(d.get("/jobs").json()["jobs"]) == 2

        # Strict as before when a commit is given: the branch is not looked up.
        r = d.post("/commit", {"repo": url, "commit": "not-a-sha", "branch": "main"})
        assert r.status_code == 400
        assert any("info/refs" in path for path in server.seen)
