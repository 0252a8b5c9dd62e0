"""``GET /events`` over real HTTP from the real dispatcher (front server), a job on a real sshd runner."""

from __future__ import annotations

import json

import pytest
import requests

from tests.e2e.conftest import simple_pipeline, sse_events

pytestmark = pytest.mark.slow


def read_until(d, headers: dict, done, limit: int = 200) -> list[dict]:
    events = []
    with requests.get(d.url + "/events", headers=headers, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        for event in sse_events(r):
            events.append(event)
            if done(event) or len(events) >= limit:
                break
    return events


def test_one_stream_carries_a_job_from_queued_to_finished_and_resumes(dispatcher, ssh_host, git_repo):
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline([
        {"name": "one", "run": "echo one"}, {"name": "two", "run": "echo two"}])})
    first = read_until(d, {}, lambda e: e.get("event") == "ready")
    start = int(first[-1]["id"])
    job = d.submit(git_repo.path, git_repo.commit, "main")[0]["id"]

    def finished(e: dict) -> bool:
        return e.get("event") == "job.finished" and json.loads(e["data"])["id"] == job

    events = read_until(d, {"Last-Event-ID": str(start)}, finished)
    mine = [(e["event"], json.loads(e["data"])) for e in events if e.get("event", "").startswith("job.")
            and json.loads(e["data"])["id"] == job]
    assert [(k, v["status"]) + ((v["name"],) if k == "job.step" else ()) for k, v in mine] == [
        ("job.queued", "queued"), ("job.started", "running"),
        ("job.step", "running", "one"), ("job.step", "passed", "one"),
        ("job.step", "running", "two"), ("job.step", "passed", "two"), ("job.finished", "passed")]
    assert mine[2][1]["line"] == 1 and mine[-1][1]["runner"] == ssh_host.name
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids) and ids[0] > start
    # The runner's health became an event too (it was unknown at start).
    health = read_until(d, {"Last-Event-ID": "0"}, lambda e: e.get("event") == "runner.health")
    assert json.loads(health[-1]["data"])["name"] == ssh_host.name

    # Resuming in the middle sends exactly what followed.
    middle = ids[len(ids) // 2]
    rest = read_until(d, {"Last-Event-ID": str(middle)}, finished)
    assert [int(e["id"]) for e in rest] == [i for i in ids if i > middle]
    # A point the log does not hold (another store's) is a reset.
    reset = read_until(d, {"Last-Event-ID": str(ids[-1] + 1000)}, lambda e: e.get("event") == "reset", limit=1)
    assert reset[0]["event"] == "reset"
    assert d.get("/events?after=x").status_code == 400
