"""Issue "Forges" on the real path: a signed webhook to the real `narwhal serve` builds the
pushed commit of a repository served over HTTP on loopback, on a real runner, and the
stand-in forge (a real HTTP server implementing the documented status endpoint) receives
pending, then success, at the right path, with the forge's state names, the context
`narwhal/<pipeline>` and a link to the job."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
import requests

from narwhal.cli.gitrepo import add_commit, make_git_repo
from testbed import GitHttpServer, StandInForge
from tests import hookpayloads as hp
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow

TOKEN = "ghp_e2eForgeStatusToken0123"
HOOK = "e2e-webhook-secret-456789"
LOCAL = {"name": "local", "transport": "local", "capacity": 2}


@pytest.fixture
def git(tmp_path) -> Iterator[GitHttpServer]:
    with GitHttpServer(tmp_path / "served") as server:
        yield server


@pytest.mark.parametrize("kind", ["github", "gitea", "gitlab"])
def test_a_signed_push_builds_and_its_statuses_reach_the_forge(dispatcher, git, tmp_path, kind):
    commit = git.add("org/app.git", tmp_path / "work", {"build.sh": "echo built\n"})
    repo = git.url_for("org/app.git")
    with StandInForge(TOKEN, kinds=kind) as forge:
        d = dispatcher([LOCAL], {"ci": simple_pipeline([{"name": "build", "run": "sh build.sh; echo $NARWHAL_EVENT"}],
                                                       repo=f"{git.base}/org/*")},
                       settings={"public_url": "https://ci.example.com"},
                       inventory={"secrets": {"TOKEN": {"env": "E2E_TOKEN"}, "HOOK": {"env": "E2E_HOOK"}},
                                  "forges": [{"name": "f", "kind": kind, "url": forge.url, "token": "TOKEN",
                                              "webhook_secret": "HOOK"}]},
                       env={"E2E_TOKEN": TOKEN, "E2E_HOOK": HOOK})

        def deliver(event: str, data: object, secret: str = HOOK, delivery: str | None = None):
            headers, body = hp.signed(kind, secret, event, data, delivery)
            return requests.post(f"{d.url}/hooks/f", data=body, headers=headers, timeout=30)

        assert deliver(*hp.push(kind, repo, commit), secret="wrong-secret-0000000").status_code == 401
        assert requests.post(f"{d.url}/hooks/f", data=b"{}", headers={"Content-Type": "application/json"},
                             timeout=30).status_code == 401
        assert d.get("/jobs").json()["jobs"] == []
        assert deliver(*hp.delete_branch(kind, repo)).json()["ignored"].endswith("deleted")

        first = deliver(*hp.push(kind, repo, commit), delivery="delivery-1")
        assert first.status_code == 200, first.text
        [job] = first.json()["jobs"]
        again = deliver(*hp.push(kind, repo, commit), delivery="delivery-1")
        assert again.json()["redelivery"] is True and len(d.get("/jobs").json()["jobs"]) == 1
        done = d.wait_job(job["id"])
        assert done["status"] == "passed" and done["event"] == "push", d.log()
        assert "push" in d.get(f"/jobs/{job['id']}/log").text  # NARWHAL_EVENT in the step

        final = {"github": "success", "gitea": "success", "gitlab": "success"}[kind]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not forge.statuses or forge.statuses[-1].state != final):
            time.sleep(0.1)
        states = [s.state for s in forge.statuses]
        assert states[0] == "pending" and states[-1] == final, states
        for status in forge.statuses:
            assert status.sha == commit and status.context == "narwhal/ci"
            assert status.target_url == f"https://ci.example.com/jobs/{job['id']}"
        path = forge.statuses[-1].path
        assert path.endswith(f"/statuses/{commit}") and "org" in path and "app" in path
        assert "passed" in forge.statuses[-1].description
        forges = d.get("/forges").json()["forges"]
        assert forges[0]["failed"] == 0 and forges[0]["delivered"] == len(states)
        assert TOKEN not in d.log() and HOOK not in d.log()


def test_a_docs_only_pull_request_skips_a_src_pipeline_with_the_reason(dispatcher, git, tmp_path):
    """`when: {paths: ["src/**"]}` against the files the pull request changes (read from the
    dispatcher's mirror, from the merge base with the target branch)."""
    work, _ = make_git_repo(str(tmp_path / "work"), {"src/app.py": "x = 1\n", "docs/a.md": "a\n"})
    subprocess.run(["git", "-C", work, "checkout", "-q", "-b", "feature"], check=True)
    docs_only = add_commit(work, {"docs/a.md": "changed\n"}, "docs only")
    subprocess.run(["git", "-C", work, "checkout", "-q", "main"], check=True)
    repo = git.publish(work, "org/app.git")
    pattern = f"{git.base}/org/*"
    d = dispatcher([LOCAL], {"src": simple_pipeline(repo=pattern, when={"paths": ["src/**"]}),
                             "docs": simple_pipeline(repo=pattern, when={"paths": ["docs/**"],
                                                                         "event": ["pull_request"]})},
                   inventory={"secrets": {"HOOK": {"env": "E2E_HOOK"}},
                              "forges": [{"name": "f", "kind": "gitea", "url": "http://127.0.0.1:9",
                                          "webhook_secret": "HOOK"}]},
                   env={"E2E_HOOK": HOOK})
    headers, body = hp.signed("gitea", HOOK, *hp.pull_request("gitea", repo, docs_only, 9))
    r = requests.post(f"{d.url}/hooks/f", data=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    jobs = {j["pipeline"]: j for j in r.json()["jobs"]}
    skipped = d.get(f"/jobs/{jobs['src']['id']}").json()
    assert skipped["status"] == "skipped" and skipped["event"] == "pull_request" and skipped["pr"] == 9
    assert skipped["reason"] == "no changed file matches when.paths [src/**] (1 file changed)"
    assert d.wait_job(jobs["docs"]["id"])["status"] == "passed", d.log()
