"""Scheduled builds end to end, on the real Docker engine (``local`` runner) and real git.

No test waits for the wall clock to reach a tick:

- the real ``narwhal serve`` process finds a schedule whose last recorded tick is three
  days old (the dispatcher was down): its first pass builds the branch head once, for the
  latest tick only, and a restart builds nothing more;
- a Dispatcher started in this process with a fake clock (``schedule_clock``), moved a
  minute at a time, builds the head once per tick (an unchanged head too), and after ten
  missed minutes of downtime, exactly one catch-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from narwhal.config.loader import load_config
from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.dispatch.store import Store
from tests.e2e.conftest import simple_pipeline, write_config

LOCAL = {"name": "local", "transport": "local", "capacity": 2}
STEPS = [{"name": "hello", "run": "echo scheduled build of $NARWHAL_COMMIT; cat version.txt"}]
FINAL = ("passed", "failed", "error", "cancelled", "skipped")


def wait_for(condition: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached after {timeout}s")


def test_the_serve_process_catches_up_once_after_downtime(dispatcher, git_repo, tmp_path):
    head = git_repo.add_commit({"version.txt": "v1\n"})
    now = datetime.now(UTC)
    ticked = now - timedelta(minutes=2)  # a daily schedule whose tick was two minutes ago
    cron = f"{ticked.minute} {ticked.hour} * * *"
    state = tmp_path / "state0"  # where the fixture's first dispatcher keeps its state
    state.mkdir()
    with Store(str(state / "narwhal.db")) as store:
        store.record_tick("nightly", (now - timedelta(days=3)).timestamp())  # down for three days
    d = dispatcher([LOCAL], {"nightly": simple_pipeline(STEPS, repo=git_repo.path,
                                                        schedule={"cron": cron, "branch": "main"})})
    assert d.state_dir == state

    jobs = wait_for(lambda: d.get("/jobs").json()["jobs"], what="the catch-up job")
    job = d.wait_job(jobs[0]["id"])
    assert (job["pipeline"], job["commit"], job["branch"], job["event"], job["status"]) == (
        "nightly", head, "main", "cron", "passed"), d.log()
    assert f"scheduled build of {head}" in d.get(f"/jobs/{job['id']}/log").text
    with Store(str(state / "narwhal.db")) as store:
        recorded = datetime.fromtimestamp(store.last_tick("nightly"), UTC)
    assert recorded == ticked.replace(second=0, microsecond=0)  # the latest tick, not the three missed ones
    assert "schedule of pipeline nightly, tick" in d.log()

    d.stop()
    d.start()  # the same state: the tick is recorded, nothing is due
    time.sleep(1.0)
    assert [j["id"] for j in d.get("/jobs").json()["jobs"]] == [job["id"]]


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_each_tick_builds_the_head_and_downtime_catches_up_once(tmp_path, docker_engine, test_image, git_repo):
    first = git_repo.add_commit({"version.txt": "v1\n"})
    config_dir = tmp_path / "config"
    write_config(config_dir, [LOCAL], {"nightly": simple_pipeline(
        STEPS, repo=git_repo.path, schedule={"cron": "* * * * *", "branch": "main"})})
    clock = Clock(datetime(2031, 5, 6, 12, 0, 30, tzinfo=UTC))
    started: list[Dispatcher] = []

    def start() -> Dispatcher:
        d = Dispatcher(load_config(config_dir), tmp_path / "state", schedule_clock=clock)
        started.append(d)
        d.start()
        return d

    def cron_jobs(d: Dispatcher) -> list[dict]:
        return sorted(d.jobs(None, None, 100), key=lambda j: j["id"])

    def tick(d: Dispatcher, at: str, count: int) -> dict:
        """Move the clock to AT, wake the loop, and wait for job number COUNT to end."""
        clock.now = datetime.fromisoformat(at).replace(tzinfo=UTC)
        d.schedules.wake()
        jobs = wait_for(lambda: len(cron_jobs(d)) >= count and cron_jobs(d), what=f"job {count}")
        assert len(jobs) == count, jobs
        job = wait_for(lambda: (j := d.job(jobs[-1]["id"]))["status"] in FINAL and j, what="the job's end")
        assert job["status"] == "passed" and job["event"] == "cron", job
        return job

    try:
        d = start()
        wait_for(lambda: d.store.last_tick("nightly") is not None, what="the schedule first seen")
        assert d.store.last_tick("nightly") == clock.now.timestamp() and cron_jobs(d) == []

        assert tick(d, "2031-05-06 12:01:05", 1)["commit"] == first
        assert tick(d, "2031-05-06 12:02:05", 2)["commit"] == first  # an unchanged head: a job each tick
        second = git_repo.add_commit({"version.txt": "v2\n"})
        assert tick(d, "2031-05-06 12:03:05", 3)["commit"] == second
        d.schedules.wake()  # the same tick again: nothing new
        time.sleep(0.5)
        assert len(cron_jobs(d)) == 3
        d.stop(5)

        clock.now = datetime(2031, 5, 6, 12, 13, 5, tzinfo=UTC)  # ten ticks missed while down
        d = start()
        job = wait_for(lambda: len(cron_jobs(d)) == 4 and cron_jobs(d)[-1], what="the catch-up job")
        job = wait_for(lambda: (j := d.job(job["id"]))["status"] in FINAL and j, what="the catch-up's end")
        assert (job["status"], job["commit"]) == ("passed", second)
        assert "v2" in "".join(line for _, lines, _ in d.log(job["id"]) for line in lines)
        for _ in range(3):
            d.schedules.wake()
            time.sleep(0.2)
        assert len(cron_jobs(d)) == 4
        assert d.store.last_tick("nightly") == datetime(2031, 5, 6, 12, 13, tzinfo=UTC).timestamp()
    finally:
        owners = set()
        for d in started:
            owners.add(d.store.owner_id)
            d.stop(5)
        for owner in owners:
            label = {"label": [f"narwhal.owner={owner}"]}
            for c in docker_engine.api.containers(all=True, filters=label):
                docker_engine.api.remove_container(c["Id"], force=True)
            for v in docker_engine.api.volumes(filters=label).get("Volumes") or []:
                docker_engine.api.remove_volume(v["Name"], force=True)
