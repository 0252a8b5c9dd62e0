"""POST /hooks/NAME in process: the forges' documented payloads against a real git server
on loopback and the real store (the scheduler is not started: jobs stay queued).

The end-to-end twin (real `narwhal serve`, runner, Docker and a stand-in forge taking the
commit statuses) is tests/e2e/test_forges.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import webtest

from narwhal.api.app import make_app
from narwhal.cli.gitrepo import add_commit, make_git_repo
from narwhal.config.loader import load_config
from narwhal.dispatch.dispatcher import Dispatcher
from testbed import GitHttpServer
from tests import hookpayloads as hp
from tests.test_secrets import Granted, record_grants

SECRET = "hook-secret-0123456789"
TOKEN = "api-token-abcdef"
KINDS = ["github", "gitea", "forgejo", "gitlab"]


@pytest.fixture
def git(tmp_path) -> Iterator[GitHttpServer]:
    with GitHttpServer(tmp_path / "served") as server:
        yield server


def make_dispatcher(tmp_path: Path, git: GitHttpServer, pipelines: dict[str, str], extra: str = "") -> Dispatcher:
    root = tmp_path / "config"
    (root / "pipelines").mkdir(parents=True)
    secret = root / "hook_secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    forges = "".join(f"  - {{name: {k}, kind: {k}, url: 'http://127.0.0.1:9', webhook_secret: HOOK}}\n"
                     for k in KINDS)
    (root / "inventory.yaml").write_text(
        "runners:\n  - {name: local, transport: local}\n"
        "settings: {max_hook_body: 64k}\n"
        f"secrets:\n  HOOK: {{file: hook_secret}}\n{extra}"
        f"forges:\n{forges}")
    for name, text in pipelines.items():
        (root / "pipelines" / f"{name}.yaml").write_text(text.replace("BASE", git.base))
    return Dispatcher(load_config(root), tmp_path / "state")


CI = """\
repo: "BASE/org/*"
image: busybox
steps:
  - {name: build, run: "true"}
"""


@pytest.fixture
def served(tmp_path, git) -> Iterator[tuple[webtest.TestApp, Dispatcher, str, str]]:
    commit = git.add("org/app.git", tmp_path / "work", {"README.md": "hi\n"})
    d = make_dispatcher(tmp_path, git, {"ci": CI})
    try:
        yield webtest.TestApp(make_app(d, token=TOKEN)), d, git.url_for("org/app.git"), commit
    finally:
        d.stop()


def deliver(app: webtest.TestApp, kind: str, event: str, data: object, *, secret: str = SECRET,
            delivery: str | None = None, body: bytes | None = None, headers: dict | None = None,
            forge: str | None = None) -> webtest.TestResponse:
    sent, raw = hp.signed(kind, secret, event, data, delivery, body)
    sent.update(headers or {})
    return app.post(f"/hooks/{forge or kind}", raw, headers=sent, expect_errors=True)


@pytest.mark.parametrize("kind", KINDS)
def test_a_signed_push_queues_once_however_often_it_is_delivered(served, kind):
    app, d, repo, commit = served
    event, data = hp.push(kind, repo, commit)
    first = deliver(app, kind, event, data, delivery="d-1")
    assert first.status_int == 200, first.text
    [job] = first.json["jobs"]
    assert job["created"] and job["pipeline"] == "ci" and job["status"] == "queued"
    stored = d.job(job["id"])
    assert (stored["event"], stored["branch"], stored["ref"], stored["commit"]) == ("push", "main", "refs/heads/main",
                                                                                  commit)
    again = deliver(app, kind, event, data, delivery="d-1")
    assert again.status_int == 200 and again.json["redelivery"] is True and again.json["jobs"] == first.json["jobs"]
    other_id = deliver(app, kind, event, data, delivery="d-2")  # the forge's "redeliver" may mint a new id
    assert [j["id"] for j in other_id.json["jobs"]] == [job["id"]] and not other_id.json["jobs"][0]["created"]
    assert len(d.jobs(None, None, 50)) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_or_missing_signature_is_401_and_nothing_is_read_or_stored(served, kind):
    app, d, repo, commit = served
    event, data = hp.push(kind, repo, commit)
    assert deliver(app, kind, event, data, secret="wrong-secret-9876543").status_int == 401
    sent, raw = hp.signed(kind, SECRET, event, data)
    for name in [h for h in sent if "Signature" in h or "Token" in h]:
        del sent[name]
    r = app.post(f"/hooks/{kind}", raw, headers=sent, expect_errors=True)
    assert r.status_int == 401 and r.json["error"].startswith("missing or wrong webhook signature")
    if kind != "gitlab":  # GitLab sends a shared token, not a signature of the body
        sent, _ = hp.signed(kind, SECRET, event, data)
        tampered = json.dumps({**data, "after": "f" * 40}).encode()  # signed one body, sent another
        assert app.post(f"/hooks/{kind}", tampered, headers=sent, expect_errors=True).status_int == 401
    not_json = b"\xff{{{ not json"
    assert deliver(app, kind, event, None, body=not_json, secret="x" * 20).status_int == 401
    assert d.jobs(None, None, 50) == [] and d.store.delivery_answer(kind, "d-1") is None


def test_ping_deletion_and_other_refs_build_nothing(served):
    app, d, repo, commit = served
    r = deliver(app, "github", "ping", hp.payload("github_ping.json"))
    assert r.status_int == 200 and r.json["ping"] == "ok"
    for kind in KINDS:
        event, data = hp.delete_branch(kind, repo)
        r = deliver(app, kind, event, data)
        assert r.status_int == 200 and "deleted" in r.json["ignored"], r.text
    event, data = hp.push("github", repo, commit)
    data["ref"] = "refs/notes/commits"
    assert "ignored" in deliver(app, "github", event, data).json
    event, data = hp.pull_request("github", repo, commit, 3, action="closed")
    assert "ignored" in deliver(app, "github", event, data).json
    assert d.jobs(None, None, 50) == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_pull_request_is_a_job_of_its_own(served, kind):
    app, d, repo, commit = served
    deliver(app, kind, *hp.push(kind, repo, commit))
    r = deliver(app, kind, *hp.pull_request(kind, repo, commit, 7))
    assert r.status_int == 200, r.text
    [job] = r.json["jobs"]
    stored = d.job(job["id"])
    assert stored["event"] == "pull_request" and stored["pr"] == 7 and stored["branch"] == "main"
    assert len(d.jobs(None, None, 50)) == 2


def test_hooks_need_no_api_token_but_everything_else_still_does(served):
    app, _, repo, commit = served
    assert deliver(app, "github", *hp.push("github", repo, commit)).status_int == 200
    assert app.post_json("/commit", {"repo": repo, "commit": commit}, expect_errors=True).status_int == 401


def test_bad_deliveries_get_clear_errors_that_echo_nothing(served):
    app, d, repo, commit = served
    assert deliver(app, "github", "push", {}, forge="nobody").status_int == 404
    event, data = hp.push("github", repo, commit)
    r = deliver(app, "github", event, data, headers={"Content-Type": "text/plain"})
    assert r.status_int == 415
    r = deliver(app, "github", event, None, body=b'{"ref": "refs/heads/main", "after": "SECRET-looking-value"')
    assert r.status_int == 400 and "SECRET-looking" not in r.text
    r = deliver(app, "github", event, None, body=b"[" * 70 + b"]" * 70)
    assert r.status_int == 400
    big = json.dumps({**data, "padding": "x" * 70_000}).encode()
    assert deliver(app, "github", event, None, body=big).status_int == 413  # max_hook_body: 64k
    data["after"] = "not-a-commit"
    r = deliver(app, "github", event, data)
    assert r.status_int == 400 and "not-a-commit" not in r.text
    assert d.jobs(None, None, 50) == []


def test_a_repository_no_pipeline_builds_is_ignored(served, git, tmp_path):
    app, d, _, _ = served
    other = git.add("elsewhere/x.git", tmp_path / "w2", {"a": "b\n"})
    r = deliver(app, "gitea", *hp.push("gitea", git.url_for("elsewhere/x.git"), other))
    assert r.status_int == 200 and r.json["ignored"].startswith("no pipeline matches")
    assert d.jobs(None, None, 50) == []


DEPLOY = """\
repo: "BASE/org/*"
image: busybox
secrets: [DEPLOY]
steps:
  - {name: deploy, run: "true"}
"""


def test_a_pull_request_may_not_have_a_secret_limited_to_main_pushes(tmp_path, git):
    commit = git.add("org/app.git", tmp_path / "work", {"README.md": "hi\n"})
    (tmp_path / "config").mkdir()
    deploy = tmp_path / "config" / "deploy"
    deploy.write_text("deploy-token-0123456789")
    deploy.chmod(0o600)
    d = make_dispatcher(tmp_path, git, {"deploy": DEPLOY},
                        "  DEPLOY: {file: deploy, branches: [main], events: [push]}\n")
    try:
        app = webtest.TestApp(make_app(d))
        pushed = deliver(app, "github", *hp.push("github", git.url_for("org/app.git"), commit)).json["jobs"][0]
        assert pushed["status"] == "queued"
        pr = deliver(app, "github", *hp.pull_request("github", git.url_for("org/app.git"), commit, 4)).json["jobs"][0]
        assert pr["status"] == "error"
        assert pr["reason"] == "secret DEPLOY is not available to pull_request events (secrets.DEPLOY.events allows push)"
    finally:
        d.stop()


SRC_ONLY = """\
repo: "BASE/org/*"
image: busybox
when: {paths: ["src/**"]}
steps:
  - {name: test, run: "true"}
"""
ALWAYS = CI


def test_a_pull_request_touching_only_docs_skips_a_pipeline_limited_to_src(tmp_path, git):
    """The files a pull request changes come from the mirror (from the merge base with its
    target branch): forges do not list them in the payload."""
    work, _ = make_git_repo(str(tmp_path / "work"), {"src/app.py": "x = 1\n", "docs/a.md": "a\n"})
    subprocess.run(["git", "-C", work, "checkout", "-q", "-b", "feature"], check=True)
    docs_only = add_commit(work, {"docs/a.md": "changed\n"}, "docs only")
    both = add_commit(work, {"src/app.py": "x = 2\n"}, "touch src")
    subprocess.run(["git", "-C", work, "checkout", "-q", "main"], check=True)
    url = git.publish(work, "org/app.git")
    d = make_dispatcher(tmp_path, git, {"src": SRC_ONLY, "always": ALWAYS})
    try:
        app = webtest.TestApp(make_app(d))
        jobs = {j["pipeline"]: j for j in deliver(app, "github", *hp.pull_request("github", url, docs_only, 5)).json["jobs"]}
        assert jobs["always"]["status"] == "queued"
        assert jobs["src"]["status"] == "skipped"
        assert jobs["src"]["reason"] == "no changed file matches when.paths [src/**] (1 file changed)"
        assert d.job(jobs["src"]["id"])["reason"] == jobs["src"]["reason"]
        jobs = {j["pipeline"]: j for j in deliver(app, "github", *hp.pull_request("github", url, both, 6)).json["jobs"]}
        assert jobs["src"]["status"] == "queued"
    finally:
        d.stop()


# --- attack pass ---------------------------------------------------------------------------


def test_attack_a_forge_cannot_claim_a_push_to_a_repository_it_does_not_serve(tmp_path, git):
    """Whoever holds one forge's webhook secret (every repository admin there who set up the
    hook) could sign a push to a repository on another host the dispatcher fetches from: a
    push event, on main, of any commit that repository has (a fork's pull request head), so
    with its push-only secrets. A forge speaks only for the repositories it serves."""
    commit = git.add("org/app.git", tmp_path / "work", {"README.md": "hi\n"})
    (tmp_path / "config").mkdir()
    deploy = tmp_path / "config" / "deploy"
    deploy.write_text("deploy-token-0123456789")
    deploy.chmod(0o600)
    d = make_dispatcher(tmp_path, git, {"deploy": DEPLOY},
                        "  DEPLOY: {file: deploy, branches: [main], events: [push]}\n")
    try:
        inventory = tmp_path / "config" / "inventory.yaml"
        text = inventory.read_text().replace("{name: gitea, kind: gitea, url: 'http://127.0.0.1:9'",
                                             "{name: gitea, kind: gitea, url: 'https://gitea.example'")
        inventory.write_text(text)
        d.reload(load_config(tmp_path / "config"))
        app = webtest.TestApp(make_app(d))
        r = deliver(app, "gitea", *hp.push("gitea", git.url_for("org/app.git"), commit))
        assert r.status_int == 200 and "not served by forge 'gitea'" in r.json["ignored"], r.text
        assert d.jobs(None, None, 50) == []
        # The forge that does serve it still builds it.
        r = deliver(app, "github", *hp.push("github", git.url_for("org/app.git"), commit))
        assert [j["status"] for j in r.json["jobs"]] == ["queued"]
    finally:
        d.stop()


@pytest.fixture
def scripted(monkeypatch) -> Granted:
    return record_grants(monkeypatch)


def test_attack_a_push_of_a_commit_not_on_its_branch_gets_no_secret_limited_to_it(tmp_path, git, scripted):
    """One webhook secret per forge is shared by every repository admin who set up a hook there:
    any of them can sign "a push to main" of another repository on that forge, naming a commit
    a fork's pull request put under refs/pull/. A secret limited to main (and to pushes) goes
    to a push's commit only when it is on the branch the push names."""
    from narwhal.cli.gitrepo import make_git_repo
    from tests.test_secrets import _fork_pull_request

    work, on_main = make_git_repo(str(tmp_path / "work"), {"README.md": "hi\n"})
    fork = _fork_pull_request(work)
    url = git.publish(work, "org/app.git")
    bare = git.root / "org/app.git"
    subprocess.run(["git", "-C", work, "push", "-q", str(bare), "refs/pull/7/head:refs/pull/7/head"], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)
    (tmp_path / "config").mkdir()
    deploy = tmp_path / "config" / "deploy"
    deploy.write_text("deploy-token-0123456789")
    deploy.chmod(0o600)
    d = make_dispatcher(tmp_path, git, {"deploy": DEPLOY},
                        "  DEPLOY: {file: deploy, branches: [main], events: [push]}\n")
    d.start()
    try:
        app = webtest.TestApp(make_app(d))
        ids = {}
        for commit in (fork, on_main):
            r = deliver(app, "github", *hp.push("github", url, commit))
            [job] = r.json["jobs"]
            ids[commit] = job["id"]
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(d.store.get_job(i).is_final for i in ids.values()):
            time.sleep(0.05)
        assert "DEPLOY" not in scripted.get(fork, {}), "a fork's commit pushed as main got the secret"
        refused = d.store.get_job(ids[fork])
        assert refused.status.value == "error" and "not on branch main" in (refused.reason or "")
        assert scripted[on_main] == {"DEPLOY": "deploy-token-0123456789"}
    finally:
        d.stop()


def test_the_changed_files_are_kept_for_jobs_whose_steps_filter_on_paths(tmp_path, git):
    from narwhal.job import Origin

    commit = git.add("org/app.git", tmp_path / "work", {"README.md": "hi\n"})
    docs = CI.replace('  - {name: build, run: "true"}\n',
                      '  - {name: build, run: "true"}\n  - {name: docs, run: "true", when: {paths: ["docs/**"]}}\n')
    d = make_dispatcher(tmp_path, git, {"ci": CI, "docs": docs})
    try:
        created = d.submit(git.url_for("org/app.git"), commit, "main", Origin(event="push", key="push"),
                           ["docs/a.md", "src/b.py"])
        by_pipeline = {job.pipeline: job.id for job, _ in created}
        assert d.store.changed_files(by_pipeline["docs"]) == ("docs/a.md", "src/b.py")
        assert d.store.changed_files(by_pipeline["ci"]) is None  # nothing of it needs them
    finally:
        d.stop()
