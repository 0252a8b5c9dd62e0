"""Scheduler decisions with a scripted run_job and health check, on a real SQLite store.

The real path (sshd + dockerd) is covered in tests/e2e/test_dispatcher.py; here the
choices themselves are pinned down: fairness, least loaded, labels, health, drain,
retries and recovery.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from narwhal.config.inventory import Inventory, Runner
from narwhal.config.loader import Config
from narwhal.config.pipeline import Pipeline
from narwhal.config.settings import DEFAULT_SETTINGS
from narwhal.deadline import Stop
from narwhal.dispatch import scheduler as scheduler_mod
from narwhal.dispatch.store import Store
from narwhal.errors import RunnerUnreachable
from narwhal.execution.health import Health
from narwhal.execution.runner import JobSpec, Outcome
from narwhal.job import JobStatus, LogKind, StepStatus
from tests.conftest import StoreSpec

COMMITS = [f"{i:040x}" for i in range(1, 200)]


class Script:
    """Stands in for runner.run_job and health.check; records what ran where and when."""

    def __init__(self) -> None:
        self.started: list[tuple[int, str, int]] = []  # (job, runner, attempt)
        self.release = threading.Event()
        self.release.set()
        # commit -> Outcome or exception to raise (or {attempt: either}); keyed by commit so a
        # test sets it before the job exists, and the scheduler can never run it too early.
        self.outcome: dict[str, object] = {}
        self.specs: dict[int, JobSpec] = {}  # job id -> the spec of its last attempt
        self.health: dict[str, Health] = {}
        self.running: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.stubborn = False  # a step that will not stop: cancel is not heard

    async def run_job(self, transport, spec, archive, sink, cancel, owner):
        name = transport.runner_name
        self.started.append((spec.job_id, name, spec.attempt))
        self.specs[spec.job_id] = spec
        self.running[name] = self.running.get(name, 0) + 1
        self.peak[name] = max(self.peak.get(name, 0), self.running[name])
        try:
            sink.step_started(0, spec.pipeline.steps[0].name)
            sink.note(f"job {spec.job_id} on {name}")
            while not self.release.is_set():
                if cancel.is_set() and not self.stubborn:
                    return Outcome(JobStatus.CANCELLED, "cancelled")
                await asyncio.sleep(0.01)
            result = self.outcome.get(spec.commit, Outcome(JobStatus.PASSED))
            if isinstance(result, dict):
                result = result.get(spec.attempt, Outcome(JobStatus.PASSED))
            if isinstance(result, Exception):
                raise result
            sink.step_finished(0, spec.pipeline.steps[0].name, StepStatus.PASSED, 0)
            sink.job_finished(result)
            return result
        finally:
            self.running[name] -= 1

    async def check(self, transport, timeout=10):
        return self.health.get(transport.runner_name, Health("healthy", checked_at=time.time(),
                                                             free_disk=50 * 2**30))


class FakeTransport:
    def __init__(self, runner, settings=None):
        self.runner_name = runner.name
        self.closed = False

    async def close(self):
        self.closed = True


async def _no_reap(transport, owner, keep, running=None):
    return []


async def _no_sweep(transport, owner, uses, **limits):
    return []


@pytest.fixture
def script(monkeypatch) -> Script:
    s = Script()
    monkeypatch.setattr(scheduler_mod.runner_mod, "run_job", s.run_job)
    monkeypatch.setattr(scheduler_mod.runner_mod, "reap", _no_reap)
    monkeypatch.setattr(scheduler_mod.caches_mod, "sweep", _no_sweep)
    monkeypatch.setattr(scheduler_mod.health_mod, "check", s.check)
    monkeypatch.setattr(scheduler_mod, "make_transport", FakeTransport)
    return s


class Mirror:
    async def archive(self, repo, commit):
        yield b""

    def describe(self, repo, commit):
        return "Ada", "the subject"


# Every test here runs the real scheduler on each store backend in turn (the store's chief caller).
_BACKEND: dict[str, StoreSpec | None] = {"spec": None}


@pytest.fixture(autouse=True)
def _on_each_backend(store_spec: StoreSpec) -> Iterator[None]:
    _BACKEND["spec"] = store_spec
    yield
    _BACKEND["spec"] = None


def open_store(tmp_path, store_class=Store) -> Store:
    """The test's store: a file in tmp_path, or the test's PostgreSQL database."""
    spec = _BACKEND["spec"]
    if spec is None or spec.kind == "sqlite":
        return store_class(str(tmp_path / "narwhal.db"))
    return store_class(spec.where, password=spec.password)


def make(tmp_path, runners: list[dict], pipelines: list[dict] | None = None, store_class=Store, **settings):
    pipes = [Pipeline(**p) for p in (pipelines or [{"name": "ci", "repo": ["*"], "image": "img",
                                                    "steps": [{"name": "s", "run": "true"}]}])]
    config = Config(Inventory(runners=[Runner(**r) for r in runners]), pipes,
                    replace(DEFAULT_SETTINGS, health_interval=0.05, **settings))
    store = open_store(tmp_path, store_class)
    sched = scheduler_mod.Scheduler(config, store, Mirror())
    return sched, store


def wait(condition, timeout=20.0, state=None):
    """Poll ``condition`` until true; on a timeout say what ``state()`` was then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached" + (f": {state()}" if state else ""))


def all_final(store, ids):
    return all(store.get_job(i).is_final for i in ids)


def run_one_job(sched, store) -> int:
    """Start the scheduler, run one job of "repo" to its end, stop; the job's id."""
    sched.start()
    try:
        job_id = submit(store, sched, "repo", 1)[0]
        wait(lambda: all_final(store, [job_id]))
    finally:
        sched.stop()
    return job_id


def submit(store, sched, repo, n, start=0, pipeline="ci"):
    ids = [store.create_jobs(repo, COMMITS[start + i], None, [pipeline])[0][0].id for i in range(n)]
    sched.wake()
    return ids


def test_busy_repository_does_not_starve_another(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "r1", "transport": "local", "capacity": 1}])
    script.release.clear()
    busy = submit(store, sched, "busy", 10)
    other = submit(store, sched, "other", 1, start=50)
    sched.start()
    try:
        wait(lambda: len(script.started) >= 1)
        script.release.set()
        wait(lambda: all_final(store, busy + other))
    finally:
        sched.stop()
    order = [job for job, _, _ in script.started]
    # "other" arrived after all of "busy" yet runs within the first two jobs.
    assert order.index(other[0]) <= 1, order


def test_least_loaded_runner_and_capacity(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "a", "transport": "local", "capacity": 2},
                                   {"name": "b", "transport": "local", "capacity": 2}])
    script.release.clear()
    sched.start()
    try:
        ids = submit(store, sched, "repo", 4)
        wait(lambda: len(script.started) == 4)
        assert sorted(r for _, r, _ in script.started) == ["a", "a", "b", "b"]
        more = submit(store, sched, "repo", 2, start=10)
        time.sleep(0.2)
        assert len(script.started) == 4  # both full
        assert [w["reason"] for w in sched.waiting_reasons(store.get_job(more[0]))] == \
            ["capacity full (2/2)", "capacity full (2/2)"]
        script.release.set()
        wait(lambda: all_final(store, ids + more))
    finally:
        sched.stop()
    assert max(script.peak.values()) == 2


def test_labels_pick_the_runner(tmp_path, script):
    sched, store = make(
        tmp_path,
        [{"name": "cpu", "transport": "local", "capacity": 4},
         {"name": "gpu", "transport": "local", "labels": ["gpu"], "capacity": 4}],
        [{"name": "ml", "repo": ["*"], "image": "img", "labels": ["gpu"], "steps": [{"name": "s", "run": "x"}]}],
    )
    sched.start()
    try:
        ids = submit(store, sched, "repo", 3, pipeline="ml")
        wait(lambda: all_final(store, ids))
    finally:
        sched.stop()
    assert {r for _, r, _ in script.started} == {"gpu"}


def test_unhealthy_runner_gets_no_jobs_and_low_disk_drains(tmp_path, script):
    script.health["sick"] = Health("unhealthy", "docker unavailable: daemon down", time.time())
    script.health["full"] = Health("healthy", None, time.time(), free_disk=10 * 2**20)
    sched, store = make(tmp_path, [{"name": "sick", "transport": "local", "capacity": 4},
                                   {"name": "full", "transport": "local", "capacity": 4},
                                   {"name": "ok", "transport": "local", "capacity": 1}])
    script.release.clear()
    sched.start()
    try:
        wait(lambda: all(r["health"]["state"] != "unknown" for r in sched.runners()))
        ids = submit(store, sched, "repo", 2)
        wait(lambda: len(script.started) == 1)
        reasons = {w["runner"]: w["reason"] for w in sched.waiting_reasons(store.get_job(ids[1]))}
        assert reasons["sick"] == "unhealthy: docker unavailable: daemon down"
        assert reasons["full"].startswith("draining (low disk: 10 MiB free")
        assert reasons["ok"] == "capacity full (1/1)"
        runners = {r["name"]: r for r in sched.runners()}
        assert runners["full"]["draining"] and runners["full"]["drain_reason"].startswith("low disk")
        script.release.set()
        wait(lambda: all_final(store, ids))
    finally:
        sched.stop()
    assert {r for _, r, _ in script.started} == {"ok"}


def test_lost_runner_retries_elsewhere_then_gives_up(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "a", "transport": "local"}, {"name": "b", "transport": "local"}])
    lost = RunnerUnreachable("connection lost")
    sched.start()
    try:
        script.outcome[COMMITS[0]] = {1: lost}
        first = submit(store, sched, "repo", 1)[0]
        wait(lambda: all_final(store, [first]))
        job = store.get_job(first)
        assert job.status is JobStatus.PASSED and job.attempt == 2
        runs = [(r, a) for j, r, a in script.started if j == first]
        assert runs[0][0] != runs[1][0], "attempt 2 went to the other runner"
        # Both attempts lost: error with the reason, after max_attempts (2).
        script.outcome[COMMITS[5]] = {1: lost, 2: lost}
        second = submit(store, sched, "repo", 1, start=5)[0]
        wait(lambda: all_final(store, [second]))
        job = store.get_job(second)
        assert job.status is JobStatus.ERROR and "runner lost" in job.reason and job.attempt == 2
    finally:
        sched.stop()


def test_a_failed_step_is_never_retried(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "a", "transport": "local"}])
    sched.start()
    try:
        script.outcome[COMMITS[0]] = Outcome(JobStatus.FAILED, "exit 1 in step s")
        job_id = submit(store, sched, "repo", 1)[0]
        wait(lambda: all_final(store, [job_id]))
    finally:
        sched.stop()
    job = store.get_job(job_id)
    assert (job.status, job.reason, job.attempt) == (JobStatus.FAILED, "exit 1 in step s", 1)


def test_restart_requeues_what_was_running(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "a", "transport": "local"}])
    ids = submit(store, sched, "repo", 2)
    assert store.start_job(ids[0], "a", 1)  # a dispatcher died while this ran
    assert store.start_job(ids[1], "a", 1)
    store.cancel_job(ids[1])  # ... and this one had been asked to stop
    sched.start()
    try:
        wait(lambda: all_final(store, ids))
    finally:
        sched.stop()
    first, second = store.get_job(ids[0]), store.get_job(ids[1])
    assert (first.status, first.attempt) == (JobStatus.PASSED, 2)
    assert second.status is JobStatus.CANCELLED


def test_cancel_reaches_the_running_job(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "a", "transport": "local"}])
    script.release.clear()
    sched.start()
    try:
        job_id = submit(store, sched, "repo", 1)[0]
        wait(lambda: script.started)
        store.cancel_job(job_id)
        sched.cancel(job_id)
        wait(lambda: all_final(store, [job_id]))
    finally:
        sched.stop()
    assert store.get_job(job_id).status is JobStatus.CANCELLED


def test_shutdown_requeues_jobs_past_the_grace(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "a", "transport": "local"}])
    script.release.clear()
    sched.start()
    job_id = submit(store, sched, "repo", 1)[0]
    wait(lambda: script.started)
    sched.stop(0.1)
    job = store.get_job(job_id)
    assert (job.status, job.attempt) == (JobStatus.QUEUED, 2)


def test_a_stop_is_over_by_its_end_when_a_step_will_not_stop(tmp_path, script, caplog):
    """The grace is a promise: a step that ignores its stop is left to the next start's recovery."""
    sched, store = make(tmp_path, [{"name": "a", "transport": "local"}])
    script.release.clear()
    script.stubborn = True
    sched.start()
    job_id = submit(store, sched, "repo", 1)[0]
    wait(lambda: script.started)
    stop = Stop.within(0.4)
    with caplog.at_level(logging.WARNING):
        sched.stop(stop)
    assert sched._stop is stop  # the one stop bounded the waits
    assert f"job {job_id}: its step did not stop within the 0.4s grace" in caplog.text
    job = store.get_job(job_id)
    assert (job.status, job.attempt) == (JobStatus.RUNNING, 1)  # the next start re-queues it
    script.release.set()


def test_reload_gives_a_changed_runner_a_new_connection_and_keeps_running_jobs(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "a", "transport": "local", "capacity": 2},
                                   {"name": "gone", "transport": "local"}])
    script.release.clear()
    sched.start()
    try:
        first = submit(store, sched, "repo", 1)[0]
        wait(lambda: script.started)
        old = sched.call(lambda: sched.slots["a"].transport) if script.started[0][1] == "a" else None
        changed = Config(Inventory(runners=[Runner(name="a", transport="ssh", host="10.0.0.1", capacity=2)]),
                         sched.config.pipelines, sched.settings)
        sched.reload(changed)
        assert "gone" not in {r["name"] for r in sched.runners()}
        assert sched.runner("a")["host"] == "10.0.0.1"
        if old is not None:
            assert sched.call(lambda: sched.slots["a"].transport) is not old  # new jobs: new connection
        script.release.set()
        wait(lambda: all_final(store, [first]))
    finally:
        sched.stop()
    assert store.get_job(first).status is JobStatus.PASSED


def test_docker_failing_on_a_runner_sends_the_job_elsewhere(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "a", "transport": "local"}, {"name": "b", "transport": "local"}])
    down = Outcome(JobStatus.ERROR, "docker unavailable: Cannot connect to the Docker daemon", retryable=True)
    missing = Outcome(JobStatus.ERROR, "image not found: nope")
    sched.start()
    try:
        script.outcome[COMMITS[0]] = {1: down}
        moved = submit(store, sched, "repo", 1)[0]
        script.outcome[COMMITS[5]] = missing  # the job's own fault: no second attempt
        stays = submit(store, sched, "repo", 1, start=5)[0]
        wait(lambda: all_final(store, [moved, stays]))
        script.outcome[COMMITS[9]] = {1: down, 2: down}
        exhausted = submit(store, sched, "repo", 1, start=9)[0]
        wait(lambda: all_final(store, [exhausted]))
    finally:
        sched.stop()
    job = store.get_job(moved)
    assert (job.status, job.attempt) == (JobStatus.PASSED, 2)
    first_runner = next(r for j, r, a in script.started if j == moved and a == 1)
    assert next(r for j, r, a in script.started if j == moved and a == 2) != first_runner
    job = store.get_job(stays)
    assert (job.status, job.reason, job.attempt) == (JobStatus.ERROR, "image not found: nope", 1)
    job = store.get_job(exhausted)
    assert (job.status, job.attempt) == (JobStatus.ERROR, 2)
    assert job.reason.startswith("docker unavailable")


def test_a_removed_runner_is_forgotten_and_its_connection_closed(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "a", "transport": "local"}])
    sched.start()
    try:
        sched.add_runner(Runner(name="extra", transport="local"))
        def extra():
            slot = sched.slots["extra"]
            return slot.transport if slot.health.is_healthy else None

        wait(lambda: sched.call(extra) is not None)
        transport = sched.call(extra)
        sched.remove_runner("extra")
        wait(lambda: transport.closed)
        assert "extra" not in sched.call(lambda: dict(sched.slots))
        assert [r["name"] for r in sched.runners()] == ["a"]
    finally:
        sched.stop()


def test_the_settings_reach_the_job_spec(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "a", "transport": "local", "network": "bridge",
                                    "limits": {"memory": "300m", "cpus": 0.5, "pids": 64}}],
                        log_cap=1234, stop_grace=3.5)
    job_id = run_one_job(sched, store)
    spec = script.specs[job_id]
    assert (spec.log_cap, spec.grace) == (1234, 3.5)
    assert (spec.network, spec.limits.memory, spec.limits.pids) == ("bridge", "300m", 64)
    assert spec.pipeline is sched.config.pipeline("ci")


class WatchedStore(Store):
    """The real store, noting which thread opens each transaction (every statement runs in one)."""

    def __init__(self, where: str, **kw):
        self.threads: set[threading.Thread] = set()
        super().__init__(where, **kw)

    def _tx(self, write: bool = True):
        self.threads.add(threading.current_thread())
        return super()._tx(write)


def test_no_sqlite_call_runs_on_the_event_loop_thread(tmp_path, script):
    """A slow disk must never stall the loop (SSH keepalives, health checks): every path that
    stores something runs here, and none may do it on the loop's thread."""
    sched, store = make(tmp_path, [{"name": "a", "transport": "local", "capacity": 4},
                                   {"name": "b", "transport": "local", "capacity": 4}],
                        store_class=WatchedStore)
    recovered, gone = submit(store, sched, "repo", 1, start=100)[0], submit(store, sched, "repo", 1,
                                                                           start=101, pipeline="gone")[0]
    assert store.start_job(recovered, "a", 1)  # a dispatcher died while this ran
    script.outcome[COMMITS[0]] = Outcome(JobStatus.FAILED, "exit 1 in step s")
    script.outcome[COMMITS[1]] = {1: RunnerUnreachable("connection lost")}
    script.outcome[COMMITS[2]] = {1: Outcome(JobStatus.ERROR, "docker unavailable", retryable=True)}
    script.outcome[COMMITS[3]] = RuntimeError("a bug")
    sched.start()
    try:
        ids = submit(store, sched, "repo", 5)
        wait(lambda: all_final(store, ids + [recovered, gone]),
             state=lambda: [(j.id, j.status.value, j.attempt, j.runner, j.reason)
                            for j in map(store.get_job, ids + [recovered, gone])] + sched.runners())
        sched.set_draining("a", True)
        sched.set_draining("a", False)
        sched.reload(sched.config)
        sched.add_runner(Runner(name="extra", transport="local"))
        sched.remove_runner("extra")
        script.release.clear()
        cancelled, evicted = submit(store, sched, "repo", 2, start=10)
        wait(lambda: len(script.started) >= 9)  # 5 + 2 retries + these two
        store.cancel_job(cancelled)
        sched.cancel(cancelled)
        wait(lambda: all_final(store, [cancelled]))
    finally:
        sched.stop(0)  # ``evicted`` is stopped and re-queued
    assert store.get_job(evicted).status is JobStatus.QUEUED
    statuses = [store.get_job(i).status for i in ids]
    assert statuses == [JobStatus.FAILED, JobStatus.PASSED, JobStatus.PASSED, JobStatus.ERROR, JobStatus.PASSED]
    assert store.get_job(gone).status is JobStatus.ERROR
    assert store.get_job(recovered).attempt == 2
    assert sched._thread not in store.threads
    assert len(store.threads) >= 2, store.threads  # this thread and the scheduler's store thread


@pytest.fixture
def frequent_switches():
    """Switch threads very often, so that races show up within a short test."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def test_runner_registry_changes_from_many_threads(tmp_path, script, caplog, frequent_switches):
    """API threads add, drain and remove runners while the loop picks up jobs and checks health."""
    sched, store = make(tmp_path, [{"name": "base", "transport": "local", "capacity": 2}])
    loop_errors: list[dict] = []
    thread_errors: list[BaseException] = []
    added: set[str] = set()
    removed: set[str] = set()
    sched.start()
    sched.call(lambda: sched.loop.set_exception_handler(lambda _loop, context: loop_errors.append(context)))
    try:
        ids = submit(store, sched, "repo", 60)
        go = threading.Barrier(8)

        def churn(t: int) -> None:
            try:
                go.wait()
                for i in range(12):
                    name = f"t{t}-{i}"
                    sched.add_runner(Runner(name=name, transport="local", capacity=1))
                    added.add(name)
                    sched.set_draining(name, i % 2 == 0)
                    sched.runners()
                    sched.waiting_reasons(store.get_job(ids[-1]))
                    if i % 3 == 0:
                        sched.remove_runner(name)
                        removed.add(name)
            except BaseException as exc:  # noqa: BLE001 - reported below
                thread_errors.append(exc)

        threads = [threading.Thread(target=churn, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait(lambda: all_final(store, ids))
        listed = {r["name"] for r in sched.runners()}
    finally:
        sched.stop()
    assert thread_errors == []
    assert loop_errors == []
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    assert listed == {"base"} | (added - removed)
    assert all(store.get_job(i).status is JobStatus.PASSED for i in ids)


class OrderStore(Store):
    """The real store, noting the order of a job's writes."""

    def __init__(self, where: str, **kw):
        super().__init__(where, **kw)
        self.writes: list[str] = []

    def start_step(self, *args, **kw):
        self.writes.append("start_step")
        return super().start_step(*args, **kw)

    def append_log(self, job_id, attempt, lines, kind="step", **kw):
        self.writes.extend(f"log {kind} {line}" for line in lines)
        return super().append_log(job_id, attempt, lines, kind, **kw)

    def append_logs(self, batches, **kw):
        self.writes.extend(f"log {b.kind} {line}" for b in batches for line in b.lines)
        return super().append_logs(batches, **kw)

    def finish_step(self, *args, **kw):
        self.writes.append("finish_step")
        return super().finish_step(*args, **kw)

    def finish_job(self, *args, **kw):
        self.writes.append("finish_job")
        return super().finish_job(*args, **kw)


def test_a_jobs_writes_keep_their_order(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "a", "transport": "local"}], store_class=OrderStore)
    job_id = run_one_job(sched, store)
    assert store.writes == ["start_step", "log narwhal step s started", f"log narwhal job {job_id} on a",
                            "finish_step", "finish_job"]
    assert [text for _, text in store.read_log(job_id)] == ["step s started", f"job {job_id} on a"]


class SlowLogStore(Store):
    """The real store, slow to write log lines, noting the backlog of lines waiting for it."""

    def __init__(self, where: str, **kw):
        super().__init__(where, **kw)
        self.queue = None
        self.peak = 0
        self.groups = 0

    def append_logs(self, batches, **kw):
        self.peak = max(self.peak, self.queue.backlog if self.queue else 0)
        self.groups += 1
        time.sleep(0.02)
        return super().append_logs(batches, **kw)


def test_chatty_jobs_wait_for_a_slow_store_and_every_line_arrives_once_in_order(tmp_path, script, monkeypatch):
    """Back-pressure: the log lines on their way to the store stay bounded (the jobs' readers
    wait in ``room``), grouped across jobs, and none is lost, repeated or reordered."""
    lines_each, chunk = 6000, 100

    async def chatty(transport, spec, archive, sink, cancel, owner):
        sink.step_started(0, "s")
        for start in range(0, lines_each, chunk):
            await sink.room()
            sink.log_lines([f"job {spec.job_id} line {i}" for i in range(start, start + chunk)])
            sink.flush()
            await asyncio.sleep(0)
        sink.step_finished(0, "s", StepStatus.PASSED, 0)
        outcome = Outcome(JobStatus.PASSED)
        sink.job_finished(outcome)
        return outcome

    monkeypatch.setattr(scheduler_mod.runner_mod, "run_job", chatty)
    sched, store = make(tmp_path, [{"name": "a", "transport": "local", "capacity": 4}], store_class=SlowLogStore)
    store.queue = sched.store_queue
    sched.store_queue.limit = 20 * chunk * 20  # a few batches of about 20 bytes a line
    sched.start()
    try:
        ids = submit(store, sched, "repo", 4)
        wait(lambda: all_final(store, ids), timeout=60)
    finally:
        sched.stop()
    for job_id in ids:
        step_lines = [text for _, text, kind in ((n, t, k) for first, block, k in store.read_log_blocks(job_id)
                                                 for n, t in enumerate(block, first)) if kind is LogKind.STEP]
        assert step_lines == [f"job {job_id} line {i}" for i in range(lines_each)]
        assert store.get_job(job_id).status is JobStatus.PASSED
    one_batch = max(len(f"job {i} line {lines_each}") + 1 for i in ids) * chunk
    assert store.peak <= sched.store_queue.limit + 4 * one_batch  # each reader adds at most one batch past it
    assert store.groups < 4 * lines_each // chunk  # batches of several jobs went in together


def test_a_job_that_ends_without_starting_does_not_stall_the_queue_behind_it(tmp_path, script):
    """A queued job whose pipeline is gone ends at pickup; the jobs behind it still start.
    (The pickup used to stop at such a job, and with nothing else to wake it, they waited.)"""
    sched, store = make(tmp_path, [{"name": "a", "transport": "local", "capacity": 4}])
    sched.start()
    try:
        wait(lambda: sched.runners()[0]["health"]["state"] == "healthy")
        gone = store.create_jobs("repo", COMMITS[0], None, ["gone"])[0][0].id
        behind = [store.create_jobs("repo", COMMITS[i], None, ["ci"])[0][0].id for i in (1, 2, 3)]
        sched.wake()  # one wake, as one POST /commit gives: the pickup must get past `gone`
        wait(lambda: all_final(store, [gone, *behind]),
             state=lambda: [(j.id, j.status.value) for j in map(store.get_job, [gone, *behind])])
    finally:
        sched.stop()
    assert store.get_job(gone).status is JobStatus.ERROR
    assert [store.get_job(i).status for i in behind] == [JobStatus.PASSED] * 3


class DirectScheduler:
    """Just enough of a Scheduler for a StoreSink: writes run at once, in order."""

    def __init__(self, store: Store):
        self.store = store

    def write(self, fn, *args) -> None:
        fn(*args)

    write_attempt = write

    def write_log(self, batch) -> None:
        assert self.store.append_logs([batch]) == []


def test_finding7_store_sink_writes_notes_as_narwhal_rows(tmp_path):
    store = open_store(tmp_path)
    [(job, _)] = store.create_jobs("repo", COMMITS[0], "main", ["ci"])
    sink = scheduler_mod.StoreSink(DirectScheduler(store), job.id, 1)  # type: ignore[arg-type]
    sink.log_lines(["a", "[narwhal] step build: exit 0"])
    sink.note("step build: exit 1 (0.2s)\n[narwhal] forged")  # a newline in a note stays on its line
    sink.log_lines(["b"])
    sink.flush()
    assert store.read_log_blocks(job.id) == [
        (1, ["a", "[narwhal] step build: exit 0"], LogKind.STEP),
        (3, ["step build: exit 1 (0.2s)\\x0a[narwhal] forged"], LogKind.NARWHAL),
        (4, ["b"], LogKind.STEP),
    ]
    store.close()


# --- issue 13: a job running steps side by side holds more of its runner ----------------------

WIDE = {"name": "wide", "repo": ["*"], "image": "img", "parallel": 3,
        "steps": [{"name": n, "run": "x", "depends_on": []} for n in ("a", "b", "c", "d")]}


def test_a_graph_job_holds_up_to_its_width_of_the_free_capacity(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "r", "transport": "local", "capacity": 4}],
                        [WIDE, {"name": "ci", "repo": ["*"], "image": "img", "steps": [{"name": "s", "run": "x"}]}])
    script.release.clear()
    sched.start()
    try:
        [wide] = submit(store, sched, "repo", 1, pipeline="wide")
        wait(lambda: len(script.started) == 1)
        assert script.specs[wide].parallel == 3  # parallel: 3 of 4 steps, all free
        assert sched.runner("r")["used"] == 3 and sched.runner("r")["running"] == 1
        [one] = submit(store, sched, "repo", 1, start=5)
        wait(lambda: len(script.started) == 2)
        assert script.specs[one].parallel == 1
        [late] = submit(store, sched, "repo", 1, start=9, pipeline="wide")
        time.sleep(0.2)
        assert len(script.started) == 2  # full: 3 + 1 of 4
        assert [w["reason"] for w in sched.waiting_reasons(store.get_job(late))] == ["capacity full (4/4)"]
        script.release.set()
        wait(lambda: all_final(store, [wide, one, late]))
    finally:
        sched.stop()
    assert 1 <= script.specs[late].parallel <= 3  # as much as was free when it started, at least 1
    assert any("steps at once: up to 3" in text for _, text in store.read_log(wide))


def test_a_graph_job_on_a_busy_runner_takes_what_is_free_and_never_waits_for_more(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "r", "transport": "local", "capacity": 2}],
                        [WIDE, {"name": "ci", "repo": ["*"], "image": "img", "steps": [{"name": "s", "run": "x"}]}])
    script.release.clear()
    sched.start()
    try:
        [one] = submit(store, sched, "repo", 1)
        wait(lambda: len(script.started) == 1)
        [wide] = submit(store, sched, "repo", 1, start=3, pipeline="wide")
        wait(lambda: len(script.started) == 2)
        assert script.specs[wide].parallel == 1
        script.release.set()
        wait(lambda: all_final(store, [one, wide]))
    finally:
        sched.stop()


def test_the_job_url_and_changed_files_reach_the_job_spec(tmp_path, script):
    sched, store = make(tmp_path, [{"name": "a", "transport": "local"}], public_url="https://ci.example.com")
    sched.start()
    try:
        job_id = store.create_jobs("repo", COMMITS[0], "main", ["ci"], changed={"ci": ["src/a.py", "b"]})[0][0].id
        sched.wake()
        wait(lambda: all_final(store, [job_id]))
    finally:
        sched.stop()
    spec = script.specs[job_id]
    assert spec.job_url == f"https://ci.example.com/jobs/{job_id}"
    assert spec.changed == ("src/a.py", "b") and spec.parallel == 1


# --- health polling at fleet scale ---------------------------------------------------------


def test_health_checks_reap_on_recovery_and_every_reap_every_checks(tmp_path, script, monkeypatch):
    """A runner that stays healthy is reaped once per REAP_EVERY checks, not after each; one that
    comes back from unhealthy is reaped at its first healthy check (leftovers of a lost attempt)."""
    checks: list[str] = []
    reaps: list[int] = []

    name = "reaped-runner"  # counted by name: a scheduler another test left running may still poll

    async def check(transport, timeout=10):
        if transport.runner_name == name:
            checks.append(transport.runner_name)
        return script.health.get(transport.runner_name, Health("healthy", checked_at=time.time()))

    async def reap(transport, owner, keep):
        if transport.runner_name == name:
            reaps.append(len(checks))
        return []

    monkeypatch.setattr(scheduler_mod.health_mod, "check", check)
    monkeypatch.setattr(scheduler_mod.runner_mod, "reap", reap)
    sched, store = make(tmp_path, [{"name": name, "transport": "local"}])
    sched.start()
    try:
        wait(lambda: len(checks) >= 3 * scheduler_mod.REAP_EVERY + 1)
        script.health[name] = Health("unhealthy", "docker down", checked_at=time.time())
        mark = len(checks)
        wait(lambda: len(checks) >= mark + 2)
        del script.health[name]
        back = len(checks)
        wait(lambda: len(checks) >= back + 2)
    finally:
        sched.stop()
    assert reaps[:4] == [1, 1 + scheduler_mod.REAP_EVERY, 1 + 2 * scheduler_mod.REAP_EVERY,
                         1 + 3 * scheduler_mod.REAP_EVERY]
    recovered = [n for n in reaps if n > mark]
    assert recovered and recovered[0] <= back + 2  # the first healthy check after the outage reaps


def test_an_unchanged_health_check_wakes_no_follower(tmp_path, script):
    """Followers and the runner watch wait on ``version``: a check that changes nothing they can
    see must not wake them (at 200 runners that would be 40 wake-ups a second)."""
    sched, store = make(tmp_path, [{"name": "r1", "transport": "local"}, {"name": "r2", "transport": "local"}])
    sched.start()
    try:
        wait(lambda: all(r["health"]["state"] == "healthy" for r in sched.runners()))
        seen = sched.version
        first = {r["name"]: r["health"]["checked_at"] for r in sched.runners()}
        wait(lambda: all(r["health"]["checked_at"] != first[r["name"]] for r in sched.runners()))
        assert sched.version == seen
        script.health["r2"] = Health("unhealthy", "docker down", checked_at=time.time())
        wait(lambda: sched.version != seen)
    finally:
        sched.stop()


def test_one_hung_runner_does_not_hold_back_the_others_checks(tmp_path, script, monkeypatch):
    hang = asyncio.Event()
    counts: dict[str, int] = {}

    async def check(transport, timeout=10):
        counts[transport.runner_name] = counts.get(transport.runner_name, 0) + 1
        if transport.runner_name == "stuck":
            await hang.wait()  # never set: this check never ends
        return Health("healthy", checked_at=time.time())

    monkeypatch.setattr(scheduler_mod.health_mod, "check", check)
    sched, store = make(tmp_path, [{"name": "stuck", "transport": "local"}, {"name": "ok", "transport": "local"}],
                        health_timeout=3600)
    sched.start()
    try:
        wait(lambda: counts.get("ok", 0) >= 5)
    finally:
        sched.stop()
    assert counts["stuck"] == 1  # and no second check piled onto the hung one
