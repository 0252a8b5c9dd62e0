"""Commit statuses end to end: a commit of a repository served over HTTP from the stand-in
forge's host is submitted over POST /commit to the real dispatcher process, the forge is down
for about 30 s, the dispatcher is killed (SIGKILL) in that window and started again on the
same state directory, and every status still reaches the forge, in order, the final one last."""

from __future__ import annotations

import functools
import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from testbed import StandInForge
from tests.e2e.conftest import simple_pipeline
from tests.e2e.test_cli import cli_env, run

pytestmark = pytest.mark.slow

TOKEN = "glpat-E2eStatusT0kenValue"
OUTAGE = 30.0  # seconds the forge is down
LOCAL = {"name": "local", "transport": "local", "capacity": 1}


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def served_repo(git_repo, tmp_path) -> Iterator[tuple[str, str]]:
    """The test's git repository as a bare one on a tiny static HTTP server (git's dumb
    protocol) on 127.0.0.1: (clone URL, commit)."""
    root = tmp_path / "www"
    bare = root / "group" / "app.git"
    bare.parent.mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", "--bare", git_repo.path, str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/group/app.git", git_repo.commit
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def stand_in() -> Iterator[StandInForge]:
    with StandInForge(TOKEN, kinds="gitlab") as server:
        yield server


def test_statuses_survive_a_forge_outage_and_a_killed_dispatcher(dispatcher, served_repo, stand_in):
    began = time.monotonic()
    repo, commit = served_repo
    inventory = {
        "secrets": {"FORGE_TOKEN": {"env": "E2E_FORGE_TOKEN"}, "HOOK_SECRET": {"env": "E2E_HOOK_SECRET"}},
        "forges": [{"name": "lab", "kind": "gitlab", "url": stand_in.url, "token": "FORGE_TOKEN",
                    "webhook_secret": "HOOK_SECRET"}],
    }
    settings = {"fetch_hosts": ["127.0.0.1:*"], "public_url": "https://ci.example.com/",
                "status_retry": "500ms", "status_retry_max": "2s", "status_deadline": "5m"}
    pipeline = simple_pipeline([{"name": "work", "run": "echo working; sleep 4"}])
    d = dispatcher([LOCAL], {"ci": pipeline}, settings=settings, inventory=inventory,
                   env={"E2E_FORGE_TOKEN": TOKEN, "E2E_HOOK_SECRET": "hook-secret-value"})

    stand_in.down()
    down_at = time.monotonic()
    [job] = d.submit(repo, commit, branch="main")
    job_id = job["id"]
    d.wait_for(lambda: d.get(f"/jobs/{job_id}").json()["status"] == "running", what="the job running")
    d.wait_for(lambda: d.get("/forges").json()["forges"][0]["last_error"] == "could not connect",
               what="a failed try")
    d.stop(signal.SIGKILL)  # in the outage: nothing of the outbox was delivered, some were tried
    d.start()
    assert d.wait_job(job_id, timeout=120)["status"] == "passed"
    (lab,) = d.get("/forges").json()["forges"]
    assert lab["delivered"] == 0 and lab["pending"] == 5 and stand_in.statuses == []
    time.sleep(max(0.0, down_at + OUTAGE - time.monotonic()))
    stand_in.up()
    up_at = time.time()
    recorded = stand_in.wait_for(5, timeout=30)
    time.sleep(1)  # nothing more comes: each state once
    recorded = stand_in.statuses

    assert [(s.state, s.description) for s in recorded] == [
        ("pending", "queued"), ("running", "running on local"),
        ("pending", "queued"),  # the restart put the job back in the queue: attempt 2
        ("running", "running on local"), ("success", recorded[-1].description)]
    assert recorded[-1].description.startswith("passed in ")
    assert all(s.time >= up_at - 0.5 for s in recorded)
    assert [s.time for s in recorded] == sorted(s.time for s in recorded)
    assert {s.path for s in recorded} == {f"/api/v4/projects/group%2Fapp/statuses/{commit}"}
    assert {s.context for s in recorded} == {"narwhal/ci"}
    assert {s.sha for s in recorded} == {commit}
    assert {s.target_url for s in recorded} == {f"https://ci.example.com/jobs/{job_id}"}
    assert all(seen.status == 201 for seen in stand_in.seen)

    forges = d.wait_for(lambda: (f := d.get("/forges").json()["forges"]) and f[0]["pending"] == 0 and f,
                        what="the outbox empty")
    assert [(f["name"], f["kind"], f["url"], f["delivered"], f["failed"], f["last_error"]) for f in forges] == [
        ("lab", "gitlab", stand_in.url, 5, 0, "could not connect")]
    assert forges[0]["last_delivered_at"] >= forges[0]["last_error_at"]
    assert TOKEN not in json.dumps(forges)

    env = cli_env(NARWHAL_URL=d.url)
    shown = json.loads(run("forges", "--json", env=env).stdout)
    # The CLI adds an ISO 8601 twin beside each epoch time; the rest is the API's answer.
    assert [{k: v for k, v in f.items() if not k.endswith("_iso")} for f in shown["forges"]] == forges
    assert shown["forges"][0]["last_delivered_at_iso"].endswith("Z")
    table = run("forges", env=env).stdout
    assert "lab" in table and "gitlab" in table and "could not connect" in table
    report = run("report", env=env).stdout
    assert "Forges" in report and "lab" in report
    log = Path(d.log_path).read_text()
    assert TOKEN not in log
    print(f"\ncommit statuses through a {OUTAGE:g}s outage and a SIGKILL: {time.monotonic() - began:.1f}s")
