"""The schedule loop (narwhal.dispatch.schedules) on a fake clock, with a real Dispatcher (never
started: jobs are recorded and stay queued) and real git repositories.

Each test moves the clock and calls ``run_once``, as the loop's thread would after its
sleep: no test waits for a tick.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from narwhal.cli.gitrepo import GIT_ENV, add_commit, make_git_repo
from narwhal.config.loader import load_config
from narwhal.dispatch import schedules
from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.dispatch.schedules import ScheduleLoop
from narwhal.errors import SourceError
from narwhal.job import Job

START = datetime(2025, 3, 10, 12, 7, 30, tzinfo=UTC)
INVENTORY = "runners:\n  - name: local\n    transport: local\n"


class Clock:
    def __init__(self, now: datetime = START):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def to(self, text: str) -> datetime:
        self.now = datetime.fromisoformat(text).replace(tzinfo=UTC)
        return self.now


def pipeline(repo: object, cron: str = "0 3 * * *", branch: str = "main", **extra: object) -> dict:
    return {"repo": repo, "image": "narwhal-test/busybox:latest", "schedule": {"cron": cron, "branch": branch},
            "steps": [{"name": "build", "run": "sh build.sh"}], **extra}


class World:
    """A config directory, a Dispatcher on it with a fake clock, and its schedule loop."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.dispatchers: list[Dispatcher] = []

    def start(self, pipelines: dict[str, dict], settings: dict | None = None) -> Dispatcher:
        config = self.tmp_path / "config"
        (config / "pipelines").mkdir(parents=True, exist_ok=True)
        for old in (config / "pipelines").glob("*.yaml"):
            old.unlink()
        inventory = yaml.safe_load(INVENTORY)
        inventory["settings"] = {"local_roots": [str(self.tmp_path)], **(settings or {})}
        (config / "inventory.yaml").write_text(yaml.safe_dump(inventory))
        for name, data in pipelines.items():
            (config / "pipelines" / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        d = Dispatcher(load_config(config), self.tmp_path / "state", schedule_clock=self.clock)
        self.dispatchers.append(d)
        return d

    def close(self) -> None:
        for d in self.dispatchers:
            d.stop()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


@pytest.fixture
def repo(tmp_path: Path) -> tuple[str, str]:
    return make_git_repo(str(tmp_path / "app"))


def cron_jobs(d: Dispatcher, pipeline: str = "nightly") -> list[Job]:
    jobs = [d.store.get_job(j["id"]) for j in d.jobs(None, None, 1000) if j["pipeline"] == pipeline]
    return sorted((j for j in jobs if j is not None), key=lambda j: j.id)


def last_tick(d: Dispatcher, name: str = "nightly") -> datetime | None:
    value = d.store.last_tick(name)
    return None if value is None else datetime.fromtimestamp(value, UTC)


# --- ticks ----------------------------------------------------------------------------------


def test_first_sight_records_now_and_builds_nothing(world, repo):
    d = world.start({"nightly": pipeline(repo[0])})
    d.schedules.run_once()
    assert cron_jobs(d) == [] and last_tick(d) == START
    world.clock.to("2025-03-11 02:59:59")
    d.schedules.run_once()
    assert cron_jobs(d) == []


def test_each_tick_builds_the_branch_head_once(world, repo):
    path, first = repo
    d = world.start({"nightly": pipeline(path), "ci": {**pipeline("*"), "schedule": None}})
    loop = d.schedules
    loop.run_once()
    world.clock.to("2025-03-11 03:00:05")
    loop.run_once()
    [job] = cron_jobs(d)
    assert (job.repo, job.commit, job.branch, job.event, job.status.value) == (path, first, "main", "cron", "queued")
    assert cron_jobs(d, "ci") == []  # a tick builds its own pipeline, not every pipeline of the repository
    assert last_tick(d) == datetime(2025, 3, 11, 3, 0, tzinfo=UTC)
    world.clock.to("2025-03-11 03:30")
    loop.run_once()
    assert len(cron_jobs(d)) == 1  # the same tick again: nothing new
    world.clock.to("2025-03-12 03:00")
    loop.run_once()
    jobs = cron_jobs(d)
    assert [j.commit for j in jobs] == [first, first]  # an unchanged head still gets its job each tick
    newer = add_commit(path, {"src.txt": "new\n"})
    world.clock.to("2025-03-13 03:01")
    loop.run_once()
    assert [j.commit for j in cron_jobs(d)] == [first, first, newer]


def test_missed_ticks_run_once_after_downtime(world, repo):
    path, first = repo
    d = world.start({"nightly": pipeline(path)})
    d.schedules.run_once()
    d.stop()
    world.clock.to("2025-03-17 09:00")  # six ticks missed while down
    d = world.start({"nightly": pipeline(path)})
    d.schedules.run_once()
    d.schedules.run_once()
    assert [j.commit for j in cron_jobs(d)] == [first]
    assert last_tick(d) == datetime(2025, 3, 17, 3, 0, tzinfo=UTC)


def test_a_crash_between_the_jobs_and_the_record_builds_that_tick_once(world, repo, monkeypatch):
    path, _ = repo
    d = world.start({"nightly": pipeline(path)})
    d.schedules.run_once()
    world.clock.to("2025-03-11 03:00")
    record = d.store.record_tick

    def crash(name: str, at: float) -> float:
        raise RuntimeError("the power went out")

    monkeypatch.setattr(d.store, "record_tick", crash)
    d.schedules.run_once()
    assert len(cron_jobs(d)) == 1 and last_tick(d) == START  # jobs committed, tick not recorded
    monkeypatch.setattr(d.store, "record_tick", record)
    d.schedules.run_once()  # the same tick again: the same head is the same job
    assert len(cron_jobs(d)) == 1 and last_tick(d) == datetime(2025, 3, 11, 3, 0, tzinfo=UTC)


def test_a_failed_lookup_keeps_the_tick_and_retries_later(world, repo, tmp_path, caplog):
    path, first = repo
    d = world.start({"nightly": pipeline(path, branch="nightly-branch")})
    d.schedules.run_once()
    world.clock.to("2025-03-11 03:00")
    assert d.schedules.run_once() == schedules.RETRY_FIRST
    assert cron_jobs(d) == [] and last_tick(d) == START
    assert "no branch or tag 'nightly-branch'" in caplog.text and "trying again in 15s" in caplog.text
    subprocess.run(["git", "branch", "nightly-branch"], cwd=path, env=GIT_ENV, check=True)
    world.clock.to("2025-03-11 03:00:10")
    d.schedules.run_once()  # not yet: the pause is not over
    assert cron_jobs(d) == []
    world.clock.to("2025-03-11 03:00:16")
    d.schedules.run_once()
    assert [j.commit for j in cron_jobs(d)] == [first]
    assert last_tick(d) == datetime(2025, 3, 11, 3, 0, tzinfo=UTC)


def test_the_pause_doubles_while_the_failure_lasts(world, tmp_path):
    d = world.start({"nightly": pipeline(str(tmp_path / "gone"))})
    d.schedules.run_once()
    world.clock.to("2025-03-11 03:00")
    pauses = []
    for _ in range(8):
        pauses.append(d.schedules.run_once())
        world.clock.now += timedelta(seconds=pauses[-1])
    assert pauses == [15, 30, 60, 120, 240, 480, 600, 600]
    assert cron_jobs(d) == [] and last_tick(d) == START


def test_every_fetch_slot_taken_is_a_retry_not_a_skip(world, repo, monkeypatch):
    path, first = repo
    d = world.start({"nightly": pipeline(path), "ci": {**pipeline("*"), "schedule": None}},
                    settings={"max_fetches_per_host": 1, "fetch_wait": 0.05})
    d.schedules.run_once()
    release = threading.Event()
    head = d.mirror.head
    monkeypatch.setattr(d.mirror, "head", lambda r, n: release.wait(10) and head(r, n))
    other, _ = make_git_repo(str(world.tmp_path / "other"))
    from narwhal.dispatch.dispatcher import Resolving

    with pytest.raises(Resolving):  # an API submission's lookup holds the one local slot
        d.submit_head(other, "main")
    world.clock.to("2025-03-11 03:00")
    assert d.schedules.run_once() == schedules.RETRY_FIRST
    assert cron_jobs(d) == [] and last_tick(d) == START
    release.set()
    while d.fetches.running():
        time.sleep(0.01)
    world.clock.to("2025-03-11 03:00:20")
    d.schedules.run_once()
    assert [j.commit for j in cron_jobs(d)] == [first]


def test_only_named_repositories_are_scheduled(world, tmp_path):
    a, a_head = make_git_repo(str(tmp_path / "a"))
    b, b_head = make_git_repo(str(tmp_path / "b"))
    d = world.start({"nightly": pipeline([a, str(tmp_path / "*"), b, "https://git.example.com/**"])})
    d.schedules.run_once()
    world.clock.to("2025-03-11 03:00")
    d.schedules.run_once()
    assert sorted((j.repo, j.commit) for j in cron_jobs(d)) == sorted([(a, a_head), (b, b_head)])


def test_a_schedule_builds_its_branch_whatever_branches_says(world, repo):
    """``branches:`` filters submissions; the schedule names the branch it builds."""
    path, first = repo
    d = world.start({"nightly": pipeline(path, branches=["release/*"])})
    d.schedules.run_once()
    world.clock.to("2025-03-11 03:00")
    d.schedules.run_once()
    assert [j.commit for j in cron_jobs(d)] == [first]


def test_when_sees_the_cron_event(world, repo):
    path, _ = repo
    d = world.start({"nightly": pipeline(path, when={"event": ["push"]}),
                     "other": pipeline(path, when={"event": ["cron"]})})
    d.schedules.run_once()
    world.clock.to("2025-03-11 03:00")
    d.schedules.run_once()
    [skipped] = cron_jobs(d)
    assert skipped.status.value == "skipped" and "event cron is not in when.event" in (skipped.reason or "")
    assert [j.status.value for j in cron_jobs(d, "other")] == ["queued"]


def test_a_tag_can_be_scheduled(world, repo):
    path, first = repo
    subprocess.run(["git", "tag", "-a", "-m", "stable", "stable"], cwd=path, env=GIT_ENV, check=True)
    add_commit(path, {"later.txt": "later\n"})
    d = world.start({"nightly": pipeline(path, branch="stable")})
    d.schedules.run_once()
    world.clock.to("2025-03-11 03:00")
    d.schedules.run_once()
    assert [(j.commit, j.branch) for j in cron_jobs(d)] == [(first, "stable")]


def test_the_pause_runs_to_the_next_tick(world, repo):
    d = world.start({"nightly": pipeline(repo[0], cron="*/5 * * * *")})
    world.clock.to("2025-03-11 02:58:30")
    assert d.schedules.run_once() == 90  # first seen; next tick 03:00
    world.clock.to("2025-03-11 03:00:00.5")
    assert d.schedules.run_once() == 299.5  # tick built; the next one is 03:05
    assert schedules.MAX_SLEEP == 60  # and the thread sleeps at most this long


def test_a_clock_that_goes_back_builds_no_tick_twice(world, repo):
    d = world.start({"nightly": pipeline(repo[0], cron="* * * * *")})
    d.schedules.run_once()
    world.clock.to("2025-03-11 03:00")
    d.schedules.run_once()
    world.clock.to("2025-03-11 02:30")
    d.schedules.run_once()
    world.clock.to("2025-03-11 03:00:40")
    d.schedules.run_once()
    assert len(cron_jobs(d)) == 1
    assert d.store.record_tick("nightly", 0) == datetime(2025, 3, 11, 3, 0, tzinfo=UTC).timestamp()


def test_an_unsafe_branch_is_refused_before_git(world, repo, caplog):
    d = world.start({"nightly": pipeline(repo[0], branch="a..b")})
    assert any("schedule.branch" in str(w) for w in d.config.warnings)
    d.schedules.run_once()
    world.clock.to("2025-03-11 03:00")
    d.schedules.run_once()
    assert cron_jobs(d) == [] and "invalid branch 'a..b'" in caplog.text
    assert not any((world.tmp_path / "state" / "mirrors").iterdir())


def test_the_store_keeps_ticks_per_pipeline_and_never_moves_them_back(tmp_path):
    from narwhal.dispatch.store import Store

    with Store(str(tmp_path / "narwhal.db")) as store:
        assert store.last_tick("nightly") is None
        assert store.record_tick("nightly", 100.0) == 100.0
        assert store.record_tick("nightly", 50.0) == 100.0
        assert store.record_tick("weekly", 7.5) == 7.5
        assert store.record_tick("nightly", 160.0) == 160.0
    with Store(str(tmp_path / "narwhal.db")) as store:  # after a restart
        assert (store.last_tick("nightly"), store.last_tick("weekly")) == (160.0, 7.5)


# --- the thread -------------------------------------------------------------------------------


def test_the_thread_builds_when_woken_and_stops_promptly(world, repo, monkeypatch):
    path, first = repo
    d = world.start({"nightly": pipeline(path, cron="* * * * *")})
    d.schedules.start()
    deadline = time.monotonic() + 10
    while last_tick(d) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert last_tick(d) == START
    world.clock.to("2025-03-10 12:08:01")
    d.schedules.wake()
    while not cron_jobs(d) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [j.commit for j in cron_jobs(d)] == [first]
    # A lookup that hangs does not hold up the stop: the loop stops waiting for it.
    release = threading.Event()
    head = d.mirror.head
    monkeypatch.setattr(d.mirror, "head", lambda r, n: release.wait(30) and head(r, n))
    world.clock.to("2025-03-10 12:09:01")
    d.schedules.wake()
    while not d.fetches.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    d.schedules.stop()
    assert time.monotonic() - started < 2
    release.set()
    while d.fetches.running() and time.monotonic() < deadline + 30:
        time.sleep(0.01)
    assert len(cron_jobs(d)) == 1  # the stopped loop queued nothing for the late lookup


def test_a_pass_that_fails_does_not_end_the_loop(world, repo, monkeypatch, caplog):
    d = world.start({"nightly": pipeline(repo[0], cron="* * * * *")})
    calls = []

    def broken(name: str) -> float:
        calls.append(name)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(d.store, "last_tick", broken)
    monkeypatch.setattr(schedules, "MAX_SLEEP", 0.05)
    d.schedules.start()
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    d.schedules.stop()
    assert len(calls) >= 3 and "disk on fire" in caplog.text


def test_the_dispatcher_owns_the_loop(world, repo):
    d = world.start({"nightly": pipeline(repo[0])})
    assert isinstance(d.schedules, ScheduleLoop) and d.schedules.clock is world.clock
    d.schedules.start()
    d.stop()  # stops the loop first; a second stop is harmless
    d.schedules.stop()


def test_submit_tick_keys_the_job_by_its_tick(world, repo):
    path, first = repo
    d = world.start({"nightly": pipeline(path)})
    nightly = d.config.pipeline("nightly")
    tick = datetime(2025, 3, 11, 3, 0, tzinfo=UTC)
    commit, [(job, created)] = d.submit_tick(nightly, path, tick)
    assert (commit, created, job.event) == (first, True, "cron")
    assert d.submit_tick(nightly, path, tick)[1][0] == (job, False)
    assert d.submit_tick(nightly, path, tick + timedelta(days=1))[1][0][0].id != job.id
    with pytest.raises(SourceError):
        d.submit_tick(nightly, str(world.tmp_path / "missing"), tick)


# --- config warnings --------------------------------------------------------------------------


def test_globs_in_a_scheduled_pipeline_are_warnings_with_their_line(tmp_path):
    config = tmp_path / "config"
    (config / "pipelines").mkdir(parents=True)
    (config / "inventory.yaml").write_text(INVENTORY)
    (config / "pipelines" / "nightly.yaml").write_text(
        "repo:\n"
        "  - https://git.example.com/app.git\n"
        "  - https://git.example.com/*.git\n"
        "  - https://git.example.com/lib-?.git\n"
        "image: narwhal-test/busybox:latest\n"
        "schedule: {cron: '@daily', branch: main}\n"
        "steps: [{name: build, run: make}]\n")
    (config / "pipelines" / "ci.yaml").write_text(  # no schedule: globs are what it is for
        "repo: '*'\nimage: narwhal-test/busybox:latest\nsteps: [{name: build, run: make}]\n")
    (config / "pipelines" / "all.yaml").write_text(
        "repo: '**'\nimage: narwhal-test/busybox:latest\nschedule: {cron: '@daily', branch: main}\n"
        "steps: [{name: build, run: make}]\n")
    loaded = load_config(config)
    assert [str(w) for w in loaded.warnings] == [
        "pipelines/all.yaml:1: schedule: repo pattern '**' is a glob: a schedule builds only repositories "
        "named exactly, so it is not scheduled",
        "pipelines/nightly.yaml:3: schedule: repo pattern 'https://git.example.com/*.git' is a glob: a schedule "
        "builds only repositories named exactly, so it is not scheduled",
        "pipelines/nightly.yaml:4: schedule: repo pattern 'https://git.example.com/lib-?.git' is a glob: a "
        "schedule builds only repositories named exactly, so it is not scheduled",
    ]
    assert loaded.pipeline("nightly").scheduled_repos() == ["https://git.example.com/app.git"]
    assert loaded.pipeline("all").scheduled_repos() == []


def test_a_schedule_branch_git_would_misread_is_a_warning(tmp_path):
    config = tmp_path / "config"
    (config / "pipelines").mkdir(parents=True)
    (config / "inventory.yaml").write_text(INVENTORY)
    (config / "pipelines" / "nightly.yaml").write_text(
        "repo: /srv/app\nimage: narwhal-test/busybox:latest\n"
        "schedule:\n  cron: '@daily'\n  branch: release..1\n"
        "steps: [{name: build, run: make}]\n")
    assert [str(w) for w in load_config(config).warnings] == [
        "pipelines/nightly.yaml:5: schedule.branch: 'release..1' is not a branch or tag name narwhal builds "
        "(letters, digits, . _ / + -; no leading '-', no '..'): the schedule never runs"]
