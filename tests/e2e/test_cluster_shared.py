"""What the nodes of a cluster share besides the queue: browser sessions (in the database) and
artifacts (in one shared ``artifacts_dir``). Two real ``narwhal serve`` processes on one
PostgreSQL database, a real sshd runner host and dockerd.

A browser talks to both nodes as it would through a load balancer (one cookie jar for both
ports); a job's artifacts are downloaded through the node that did not run it."""

from __future__ import annotations

import hashlib
import re
import signal

import pytest
import requests

from narwhal.dispatch.store import Store
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow

TOKEN = "cluster-t0ken"
MAKE = "mkdir -p dist && head -c 3000017 /dev/urandom > dist/app.whl && sha256sum dist/app.whl"


@pytest.fixture
def two_nodes(dispatcher, ssh_host, postgres):
    """Factory: two nodes of a cluster on a fresh database, with the settings given."""
    database = postgres.cluster.create_database(postgres.template)
    url = postgres.cluster.url(database)
    started: list = []

    def start(settings: dict | None = None, token: str | None = None):
        pipeline = simple_pipeline([{"name": "build", "run": MAKE}], artifacts={"paths": ["dist/*"]})
        config = {"store": url, "store_password": "PGPASS", "cluster": True, **(settings or {})}
        inventory = {"secrets": {"PGPASS": {"env": "NARWHAL_TEST_PGPASS"}}}
        env = {"NARWHAL_TEST_PGPASS": postgres.cluster.password}
        nodes = [dispatcher([ssh_host.runner_config()], {"ci": pipeline}, settings=config, inventory=inventory,
                            env=env, token=token) for _ in range(2)]
        started.extend(nodes)
        return nodes, Store(url, password=postgres.cluster.password)

    try:
        yield start
    finally:
        for d in started:  # before their database goes: a node without it waits out its store's timeout
            d.stop(signal.SIGTERM, timeout=30)
        postgres.cluster.drop_database(database)


def node_id(d) -> str:
    return d.get("/health").json()["node"]["id"]


def run_job(nodes, store: Store, git_repo) -> tuple[int, str, object, object]:
    """A job with artifacts, submitted to the first node; (id, its file's sha256, the node that
    ran it, the other one)."""
    job_id = nodes[0].submit(git_repo.path, git_repo.commit, branch="main")[0]["id"]
    done = nodes[0].wait_job(job_id, timeout=180)
    log = nodes[0].get(f"/jobs/{job_id}/log").text
    assert done["status"] == "passed", (done, log)
    made = re.search(r"^([0-9a-f]{64})  dist/app.whl$", log, re.M)
    assert made, log
    ran = store.lease_of(job_id)[0]
    by = next(d for d in nodes if node_id(d) == ran)
    other = next(d for d in nodes if d is not by)
    return job_id, made.group(1), by, other


def test_a_job_run_by_one_node_is_downloaded_through_the_other(two_nodes, git_repo, tmp_path):
    shared = tmp_path / "shared-artifacts"
    nodes, store = two_nodes({"artifacts_dir": str(shared)})
    job_id, digest, by, other = run_job(nodes, store, git_repo)
    listing = other.get(f"/jobs/{job_id}/artifacts").json()["artifacts"]
    assert [(a["path"], a["sha256"], a["size"]) for a in listing] == [("dist/app.whl", digest, 3000017)]
    for node in (other, by):
        r = node.get(listing[0]["url"], timeout=60)
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == digest
        assert r.headers["X-Checksum-SHA256"] == digest
    part = other.get(listing[0]["url"], headers={"Range": "bytes=-17"})
    assert part.status_code == 206 and len(part.content) == 17
    # the one object is in the shared directory, none in a node's state directory, no temp file left
    assert [p.name for p in (shared / "objects").rglob("*") if p.is_file()] == [digest[2:]]
    assert list((shared / "tmp").iterdir()) == []
    assert not any((tmp_path / f"state{i}" / "artifacts").exists() for i in range(2))
    store.close()


def test_without_a_shared_artifacts_dir_the_other_node_says_why(two_nodes, git_repo, tmp_path):
    nodes, store = two_nodes()
    job_id, digest, by, other = run_job(nodes, store, git_repo)
    path = f"/jobs/{job_id}/artifacts/dist/app.whl"
    assert hashlib.sha256(by.get(path, timeout=60).content).hexdigest() == digest
    r = other.get(path)
    assert r.status_code == 503 and r.headers["Content-Type"].startswith("application/json"), r.text
    message = r.json()["error"]
    assert "not in this node's artifacts_dir" in message and "shared artifacts_dir" in message, message
    assert "docs/deploy.md" in message
    assert str(tmp_path) not in r.text and "Traceback" not in r.text
    assert other.get(path, headers={"Range": "bytes=0-9"}).status_code == 503
    assert "settings.artifacts_dir: not set, with cluster: true" in other.log()  # warned at start
    store.close()


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, page[:2000]
    return found.group(1)


def test_signed_in_at_one_node_signed_in_at_both_and_after_a_restart(two_nodes):
    (a, b), store = two_nodes({"read_token": True}, token=TOKEN)
    browser = requests.Session()  # one cookie jar for both nodes, as behind a load balancer
    assert browser.get(b.url + "/ui/", allow_redirects=False).status_code == 303  # not signed in
    # The sign-in form rendered by A is posted to B.
    form = browser.get(a.url + "/ui/signin")
    assert form.status_code == 200
    r = browser.post(b.url + "/ui/signin", data={"csrf": csrf_of(form.text), "token": TOKEN, "next": "/ui/"},
                     allow_redirects=False)
    assert r.status_code == 303, r.text
    cookie = browser.cookies.get("narwhal_session")
    assert cookie and TOKEN not in cookie
    for node in (a, b):
        page = browser.get(node.url + "/ui/", allow_redirects=False)
        assert page.status_code == 200 and "Sign out" in page.text
    # A restart of both nodes signs nobody out.
    for node in (a, b):
        node.stop(signal.SIGTERM, timeout=30)
        node.start()
    page = browser.get(a.url + "/ui/", allow_redirects=False)
    assert page.status_code == 200
    # A form rendered by A (sign out) is accepted by B; a wrong token is refused first.
    token = csrf_of(page.text)
    wrong = browser.post(b.url + "/ui/signout", data={"csrf": "0" * 64}, allow_redirects=False)
    assert wrong.status_code == 403
    assert browser.post(b.url + "/ui/signout", data={"csrf": token}, allow_redirects=False).status_code == 303
    # Signed out at B: signed out at A too, even with the old cookie.
    stale = {"Cookie": f"narwhal_session={cookie}"}
    for node in (a, b):
        assert requests.get(node.url + "/ui/", headers=stale, allow_redirects=False, timeout=30).status_code == 303
    store.close()
