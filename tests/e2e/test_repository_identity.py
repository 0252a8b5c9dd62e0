"""Trust boundaries, repository identity and branches, on the real path: a real git server
over dumb HTTP on loopback, the real ``narwhal serve``, a real runner and Docker.

Findings: (1) a repository glob escaped with ``..``; (8) any spelling, any local path and
any host accepted, credentials echoed; (9) ``branches:`` ignored without a branch.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

import testbed
from testbed import GitHttpServer
from tests.e2e.conftest import DispatcherProcess, simple_pipeline

pytestmark = pytest.mark.slow

FAKE_KEY = "fake-deploy-key-0123456789"
PASSWORD = "hunter2-s3cret-pw"


@pytest.fixture
def git_server(tmp_path) -> Iterator[GitHttpServer]:
    with GitHttpServer(tmp_path / "served") as server:
        yield server


@pytest.fixture
def served(dispatcher, git_server, tmp_path):
    """A dispatcher whose `ci` pipeline (deploy key in its env) builds only org/* on the git server."""
    app = git_server.add("org/app.git", tmp_path / "work-app", {"build.sh": "echo app\n"})
    evil = git_server.add("attacker/evil.git", tmp_path / "work-evil", {"build.sh": "echo evil\n"})
    git_server.add("rel/app.git", tmp_path / "work-rel", {"build.sh": "echo rel\n"})
    runner = {"name": "local", "transport": "local", "capacity": 1}
    pipelines = {
        "ci": simple_pipeline(repo=f"{git_server.base}/org/*", env={"DEPLOY_KEY": FAKE_KEY},
                              steps=[{"name": "s", "run": "test -n \"$DEPLOY_KEY\" && cat build.sh"}]),
        "release": simple_pipeline(repo=f"{git_server.base}/rel/*", branches=["release"]),
    }
    d = dispatcher([runner], pipelines)
    return d, git_server, app, evil


def _all_answers(d: DispatcherProcess) -> str:
    """Every read endpoint's answer, as one text."""
    parts = [d.get(path).text for path in ("/jobs?limit=1000", "/commit?limit=1000", "/stats", "/runner", "/health")]
    for job in d.get("/jobs?limit=1000").json()["jobs"]:
        parts += [d.get(f"/jobs/{job['id']}").text, d.get(f"/jobs/{job['id']}/log").text]
    return "\n".join(parts)


def test_finding1_a_dot_dot_path_cannot_escape_the_pipelines_glob(served):
    d, server, app, evil = served
    escaped = f"{server.base}/org/app.git/../../attacker/evil.git"
    for spelling in (escaped, f"{server.base}/org/%2e%2e/attacker/evil.git",
                     f"{server.base}/org/app.git%2F..%2F..%2Fattacker/evil.git",
                     f"{server.base}/org/%252e%252e/attacker/evil.git"):
        r = d.post("/commit", {"repo": spelling, "commit": evil})
        assert r.status_code == 400, (spelling, r.text)
        assert "error" in r.json()
    # An org/* glob does not cross '/': org/sub/x is not org's repository either.
    r = d.post("/commit", {"repo": f"{server.base}/org/sub/evil.git", "commit": evil})
    assert r.status_code == 422, r.text
    assert d.get("/jobs").json()["jobs"] == []
    assert not [p for p in server.seen if "attacker" in p], server.seen  # git never went there


def test_finding8_ten_spellings_of_one_repository_make_one_set_of_jobs(served):
    d, server, app, _ = served
    host = f"127.0.0.1:{server.port}"
    spellings = [
        f"http://{host}/org/app.git",
        f"HTTP://{host}/org/app.git",
        f"http://{host}/org/app.git/",
        f"http://{host}/org/%61pp.git",
        f"Http://{host}/org/app.git//",
        f"http://{host}/%6frg/app.git",
        f"http://{host}/org/app%2Egit",
        f"http://{host}/org/%61%70%70.git/",
        f"HTTP://{host}/%6Frg/%61pp.git",
        f"http://{host}/org/ap%70.git",
    ]
    answers = []
    for spelling in spellings:
        r = d.post("/commit", {"repo": spelling, "commit": app})
        assert r.status_code in (200, 202), (spelling, r.text)
        answers.append(r)
    assert [r.status_code for r in answers] == [202] + [200] * 9
    assert {r.json()["commit"]["repo"] for r in answers} == {f"http://{host}/org/app.git"}
    assert {tuple(j["id"] for j in r.json()["jobs"]) for r in answers} == {(answers[0].json()["jobs"][0]["id"],)}
    jobs = d.get("/jobs").json()["jobs"]
    assert [(j["pipeline"], j["repo"]) for j in jobs] == [("ci", f"http://{host}/org/app.git")]
    for spelling in spellings[:3]:  # any spelling finds it
        assert len(d.get("/jobs", params={"repo": spelling}).json()["jobs"]) == 1
    assert d.wait_job(jobs[0]["id"])["status"] == "passed"  # fetched over HTTP and built
    mirrors = [p for p in (d.state_dir / "mirrors").iterdir() if not p.name.endswith(".tmp")]
    assert len(mirrors) == 1


def test_finding8_credentials_are_refused_and_never_shown(served):
    d, server, app, _ = served
    host = f"127.0.0.1:{server.port}"
    d.submit(f"http://{host}/org/app.git", app)  # something for the read endpoints to show
    for repo in (f"http://user:{PASSWORD}@{host}/org/app.git", f"http://{PASSWORD}@{host}/org/app.git",
                 f"HTTP://x-access-token:{PASSWORD}@127.0.0.1:{server.port}/org/app.git",
                 f"http://{PASSWORD}@127.0.0.1:bad/org/app.git"):
        r = d.post("/commit", {"repo": repo, "commit": app})
        assert r.status_code == 400, r.text
        assert "credentials in repository URLs are not accepted" in r.json()["error"] or "bad port" in r.text
        assert PASSWORD not in r.text
    assert PASSWORD not in _all_answers(d)
    assert PASSWORD not in d.log()


def test_finding8_local_paths_outside_local_roots_and_other_hosts_are_refused(served, tmp_path_factory):
    d, server, _, _ = served
    outside, commit = testbed.make_git_repo(str(tmp_path_factory.mktemp("outside") / "repo"))
    for repo in (outside, f"file://{outside}", "/etc"):
        r = d.post("/commit", {"repo": repo, "commit": commit})
        assert r.status_code == 400, r.text
        assert "local_roots" in r.json()["error"]
    # Not a host any pipeline names (and fetch_hosts is unset): nothing is fetched from it.
    r = d.post("/commit", {"repo": f"http://127.0.0.2:{server.port}/org/app.git", "commit": commit})
    assert r.status_code == 400 and "fetch_hosts" in r.json()["error"], r.text
    assert d.get("/jobs").json()["jobs"] == []
    assert not list((d.state_dir / "mirrors").iterdir())


def test_finding9_branches_need_a_known_matching_branch(served, git_server):
    d, server, _, _ = served
    rel = f"{server.base}/rel/app.git"
    commit = subprocess.run(["git", "--git-dir", str(server.root / "rel/app.git"), "rev-parse", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    r = d.post("/commit", {"repo": rel, "commit": commit})
    assert r.status_code == 422 and "no pipeline matches" in r.json()["error"], r.text
    r = d.post("/commit", {"repo": rel, "commit": commit, "branch": "main"})
    assert r.status_code == 422, r.text
    assert d.get("/jobs").json()["jobs"] == []
    (job,) = d.submit(rel, commit, branch="release")
    assert job["pipeline"] == "release"
