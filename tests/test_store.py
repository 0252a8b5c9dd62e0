"""The store contract, on both backends (a real SQLite file, a real PostgreSQL database):
transitions, logs, stats, events, concurrency. A few tests look at one backend's own settings."""

from __future__ import annotations

import multiprocessing
import re
import sqlite3
import threading

import pytest

from narwhal.dispatch import postgres
from narwhal.dispatch.backend import StoreUnavailable
from narwhal.dispatch.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    LogBatch,
    Store,
    bucket_of,
    bucket_upper,
    percentile,
)
from narwhal.errors import BadRequest, Conflict, NotFound
from narwhal.job import JobStatus, LogKind, StepStatus
from tests.conftest import StoreSpec, need


class Clock:
    """A hand-driven clock so durations in stats are exact."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "narwhal.db")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(store_spec: StoreSpec, clock):
    s = store_spec.open(clock)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(db_path, clock):
    s = Store(db_path, clock=clock)
    yield s
    s.close()


def one_job(store: Store, repo: str = "acme/app", commit: str = "c1", pipeline: str = "build"):
    [(job, created)] = store.create_jobs(repo, commit, "main", [pipeline])
    assert created
    return job


# --- schema ---------------------------------------------------------------------------


def test_schema_version_and_owner_id_survive_reopening(empty_store_spec):
    s = empty_store_spec.open()
    owner = s.owner_id
    job = one_job(s)
    version = s.schema_version
    assert version == (SCHEMA_VERSION if s.kind == "sqlite" else postgres.SCHEMA_VERSION)
    s.close()

    again = empty_store_spec.open()
    assert again.owner_id == owner and len(owner) == 32
    assert again.schema_version == version
    assert again.get_job(job.id).pipeline == "build"
    again.close()


def test_connection_settings(sqlite_store):
    conn = sqlite_store._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_newer_schema_is_refused(store_spec):
    with store_spec.open() as s, s._tx() as db:
        db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(StoreUnavailable, match="schema version 999 is newer than this narwhal understands"):
        store_spec.open()  # a NarwhalError: `narwhal serve` says it and exits 1, no traceback


def test_memory_database_is_refused():
    with pytest.raises(ValueError):
        Store(":memory:")


def test_queries_use_indexes(sqlite_store):
    """Every per-request query must avoid scanning the jobs table."""
    conn = sqlite_store._conn()
    queries = [
        ("SELECT id FROM jobs WHERE status = 'running' ORDER BY id DESC LIMIT 50", ()),
        ("SELECT id FROM jobs WHERE repo = ? ORDER BY id DESC LIMIT 50", ("r",)),
        ("SELECT id FROM jobs WHERE status = 'queued' AND repo = ? ORDER BY id DESC LIMIT 50", ("r",)),
        ("SELECT id FROM jobs INDEXED BY jobs_queue WHERE status = 'queued' ORDER BY queued_at, id", ()),
        ("SELECT runner, count(*) FROM jobs WHERE status = 'running' GROUP BY runner", ()),
        ('SELECT id, pipeline, status FROM jobs WHERE repo = ? AND "commit" = ?', ("r", "c")),
        ("SELECT id FROM commits WHERE repo = ? ORDER BY id DESC LIMIT 20", ("r",)),
        ("SELECT first_line FROM log WHERE job_id = ? ORDER BY first_line DESC LIMIT 1", (1,)),
    ]
    for sql, args in queries:
        plan = [r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
        assert not {"SCAN jobs", "SCAN log", "SCAN commits"} & set(plan), (sql, plan)
        assert "USE TEMP B-TREE FOR ORDER BY" not in plan, (sql, plan)  # LIMIT reads few rows
    [commit_lookup] = conn.execute(
        'EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE repo = ? AND "commit" = ?', ("r", "c")
    ).fetchall()
    assert "commit=?" in commit_lookup[-1]  # not a walk over the whole repo


# --- commits and jobs -----------------------------------------------------------------


def test_create_jobs_is_idempotent(store):
    first = store.create_jobs("acme/app", "c1", "main", ["build", "lint"])
    assert [c for _, c in first] == [True, True]
    assert [j.status for j, _ in first] == [JobStatus.QUEUED, JobStatus.QUEUED]
    again = store.create_jobs("acme/app", "c1", "main", ["build", "lint", "docs"])
    assert [c for _, c in again] == [False, False, True]
    assert [j.id for j, _ in again][:2] == [j.id for j, _ in first]
    assert store.stats()["repos"][0]["queued"] == 3


def test_create_jobs_under_fifty_threads(store):
    barrier = threading.Barrier(50)
    results, errors = [], []

    def post():
        try:
            barrier.wait()
            results.append(store.create_jobs("acme/app", "c1", "main", ["build", "lint"]))
        except Exception as e:  # noqa: BLE001 - reported below, from the main thread
            errors.append(e)

    threads = [threading.Thread(target=post) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert len(results) == 50
    created = [c for r in results for _, c in r]
    assert created.count(True) == 2
    assert {j.id for r in results for j, _ in r} == {j.id for j in store.list_jobs()}
    assert len(store.list_jobs()) == 2
    assert store.stats()["queue"]["length"] == 2


def test_get_and_list(store, clock):
    a = one_job(store, commit="c1")
    clock.advance(1)
    b = one_job(store, repo="acme/other", commit="c2")
    clock.advance(1)
    c = one_job(store, commit="c3")
    assert store.get_job(999) is None
    assert store.get_job(a.id).commit == "c1"
    assert [j.id for j in store.list_jobs()] == [c.id, b.id, a.id]
    assert [j.id for j in store.list_jobs(repo="acme/app")] == [c.id, a.id]
    assert [j.id for j in store.list_jobs(limit=1)] == [c.id]
    assert [j.id for j in store.list_jobs(before=c.id)] == [b.id, a.id]
    store.start_job(b.id, "w1", 1)
    assert [j.id for j in store.list_jobs(status="running")] == [b.id]
    assert [j.id for j in store.list_jobs(status=JobStatus.QUEUED, repo="acme/app")] == [c.id, a.id]
    assert [j.id for j in store.queued_jobs()] == [a.id, c.id]
    assert [j.id for j in store.running_jobs()] == [b.id]
    with pytest.raises(BadRequest, match="unknown job status"):
        store.list_jobs(status="bogus")

    commits = store.list_commits()
    assert [(x["repo"], x["commit"]) for x in commits] == [
        ("acme/app", "c3"), ("acme/other", "c2"), ("acme/app", "c1")
    ]
    assert commits[1]["jobs"] == [{"id": b.id, "pipeline": "build", "status": "running"}]
    assert commits[1]["branch"] == "main" and commits[1]["created_at"] == 1_000_001.0
    assert [x["commit"] for x in store.list_commits(repo="acme/app", limit=1)] == ["c3"]


# --- transitions ----------------------------------------------------------------------


def test_start_only_from_queued_at_that_attempt(store):
    job = one_job(store)
    assert not store.start_job(job.id, "w1", 2)
    assert store.start_job(job.id, "w1", 1)
    assert not store.start_job(job.id, "w2", 1)
    got = store.get_job(job.id)
    assert got.status is JobStatus.RUNNING and got.runner == "w1" and got.started_at is not None


def test_finish_is_guarded(store):
    job = one_job(store)
    assert not store.finish_job(job.id, 1, JobStatus.PASSED, None)  # still queued
    store.start_job(job.id, "w1", 1)
    assert store.finish_job(job.id, 1, JobStatus.FAILED, "exit 1 in step build")
    assert not store.finish_job(job.id, 1, JobStatus.PASSED, None)  # second result ignored
    got = store.get_job(job.id)
    assert got.status is JobStatus.FAILED and got.reason == "exit 1 in step build"
    with pytest.raises(ValueError):
        store.finish_job(job.id, 1, JobStatus.RUNNING, None)


def test_late_result_of_old_attempt_is_ignored(store):
    job = one_job(store)
    store.start_job(job.id, "w1", 1)
    requeued = store.requeue_job(job.id, "runner lost")
    assert requeued.status is JobStatus.QUEUED and requeued.attempt == 2
    assert requeued.runner is None and requeued.started_at is None and requeued.reason == "runner lost"
    assert store.start_job(job.id, "w2", 2)
    assert not store.finish_job(job.id, 1, JobStatus.PASSED, None)  # the lost runner reports late
    assert store.finish_job(job.id, 2, JobStatus.ERROR, "docker unavailable")
    got = store.get_job(job.id)
    assert (got.status, got.attempt, got.runner) == (JobStatus.ERROR, 2, "w2")


def test_requeue_needs_running(store):
    job = one_job(store)
    assert store.requeue_job(job.id, "x") is None


def test_requeue_after_cancel_request_cancels(store):
    job = one_job(store)
    store.start_job(job.id, "w1", 1)
    store.cancel_job(job.id)
    got = store.requeue_job(job.id, "runner lost")
    assert got.status is JobStatus.CANCELLED and got.attempt == 1


def test_cancel_semantics(store):
    queued = one_job(store, commit="c1")
    running = one_job(store, commit="c2")
    store.start_job(running.id, "w1", 1)

    got = store.cancel_job(queued.id)
    assert got.status is JobStatus.CANCELLED and got.reason == "cancelled" and got.finished_at is not None
    assert not store.start_job(queued.id, "w1", 1)

    got = store.cancel_job(running.id)
    assert got.status is JobStatus.RUNNING
    assert store.jobs_to_cancel() == [(running.id, 1)]
    assert store.finish_job(running.id, 1, JobStatus.CANCELLED, "cancelled")
    assert store.jobs_to_cancel() == []

    again = store.cancel_job(running.id)  # final: unchanged, no error
    assert again.status is JobStatus.CANCELLED
    with pytest.raises(NotFound):
        store.cancel_job(12345)


def test_retry(store):
    job = one_job(store)
    with pytest.raises(Conflict):
        store.retry_job(job.id)
    store.start_job(job.id, "w1", 1)
    with pytest.raises(Conflict):
        store.retry_job(job.id)
    store.cancel_job(job.id)
    store.finish_job(job.id, 1, JobStatus.CANCELLED, "cancelled")
    got = store.retry_job(job.id)
    assert (got.status, got.attempt, got.reason, got.runner, got.finished_at) == (JobStatus.QUEUED, 2, None, None, None)
    assert store.jobs_to_cancel() == []
    assert store.start_job(job.id, "w1", 2)
    assert store.jobs_to_cancel() == []  # the old cancel request does not carry over
    with pytest.raises(NotFound):
        store.retry_job(12345)


# --- steps ----------------------------------------------------------------------------


def test_steps_of_current_attempt(store):
    job = one_job(store)
    store.start_job(job.id, "w1", 1)
    store.plan_steps(job.id, 1, ["build", "test"])
    store.start_step(job.id, 1, 0, "build")
    store.finish_step(job.id, 1, 0, StepStatus.FAILED, 2)
    store.finish_step(job.id, 1, 1, StepStatus.SKIPPED, None)
    steps = store.get_job(job.id).steps
    assert [(s.name, s.status, s.exit_code) for s in steps] == [
        ("build", StepStatus.FAILED, 2), ("test", StepStatus.SKIPPED, None)
    ]
    store.finish_job(job.id, 1, JobStatus.FAILED, "exit 2 in step build")
    store.retry_job(job.id)
    assert store.get_job(job.id).steps == []
    store.start_job(job.id, "w1", 2)
    store.start_step(job.id, 2, 0, "build")
    store.finish_step(job.id, 2, 1, "skipped", name="test")  # never started, recorded by name
    steps = store.get_job(job.id).steps
    assert [(s.idx, s.status) for s in steps] == [(0, StepStatus.RUNNING), (1, StepStatus.SKIPPED)]


# --- logs -----------------------------------------------------------------------------


def test_log_numbering_across_appends_and_attempts(store):
    job = one_job(store)
    other = one_job(store, commit="c2")
    assert store.log_line_count(job.id) == 0
    assert store.read_log(job.id) == []
    assert store.append_log(job.id, 1, ["a", "b", "c"]) == 1
    assert store.append_log(job.id, 1, []) == 4
    assert store.append_log(other.id, 1, ["x"]) == 1
    assert store.append_log(job.id, 1, ["d\n"]) == 4
    assert store.append_log(job.id, 2, ["e", "f\ng"]) == 5  # new attempt continues the numbers
    assert store.log_line_count(job.id) == 7
    everything = store.read_log(job.id)
    assert everything == [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e"), (6, "f"), (7, "g")]
    assert store.read_log(job.id, after=2) == everything[2:]
    assert store.read_log(job.id, after=4) == everything[4:]
    assert store.read_log(job.id, after=1, limit=2) == [(2, "b"), (3, "c")]
    assert store.read_log(job.id, after=7) == []
    assert store.read_log(other.id) == [(1, "x")]


def test_append_logs_writes_several_jobs_batches_at_once_numbered_as_one_by_one(store):
    job = one_job(store)
    other = one_job(store, commit="c2")
    store.append_log(job.id, 1, ["before"])
    assert store.append_logs([
        LogBatch(job.id, 1, ["a", "b"]),
        LogBatch(other.id, 1, ["x"]),
        LogBatch(job.id, 1, []),  # nothing to store: no row
        LogBatch(job.id, 1, ["step s: exit 0"], LogKind.NARWHAL.value),
        LogBatch(other.id, 1, ["y\nz"]),  # a newline inside counts as two lines, as in append_log
        LogBatch(job.id, 1, ["c"]),
    ]) == []
    assert store.append_logs([]) == []
    assert store.read_log_blocks(job.id) == [
        (1, ["before"], LogKind.STEP), (2, ["a", "b"], LogKind.STEP),
        (4, ["step s: exit 0"], LogKind.NARWHAL), (5, ["c"], LogKind.STEP)]
    assert store.read_log(other.id) == [(1, "x"), (2, "y"), (3, "z")]
    assert store.append_log(job.id, 1, ["after"]) == 6
    with pytest.raises(ValueError):  # a kind the column refuses: nothing of the group is stored
        store.append_logs([LogBatch(other.id, 1, ["lost with it"]), LogBatch(job.id, 1, ["x"], "forged")])
    assert store.log_line_count(other.id) == 3


def test_postgresql_compresses_log_text_with_lz4(postgres):
    """Schema 5: the server's cheaper compression for log rows (PostgreSQL 14 and newer, built
    with lz4, as Debian's are; older servers keep pglz and the migration changes nothing)."""
    spec = postgres.spec()
    with next(spec).open() as store:
        job = one_job(store)
        store.append_log(job.id, 1, ["the same line, over and over"] * 2000)
        with store._tx(write=False) as db:
            version = int(db.execute("SHOW server_version_num").fetchone()[0])
            method = db.execute("SELECT attcompression FROM pg_attribute WHERE attrelid = 'log'::regclass "
                                "AND attname = 'data'").fetchone()[0]
            stored = db.execute("SELECT pg_column_compression(data) FROM log WHERE job_id = ?",
                                (job.id,)).fetchone()[0]
        assert store.read_log(job.id, limit=1) == [(1, "the same line, over and over")]
    spec.close()
    need(version >= 140000, "PostgreSQL 14 or newer (one compression method before)")
    assert (method, stored) == ("l", "lz4")


# --- runners --------------------------------------------------------------------------


def test_api_runners_and_state(store):
    assert store.add_runner({"name": "r1", "host": "h", "port": 22}) == {"name": "r1", "host": "h", "port": 22}
    with pytest.raises(Conflict):
        store.add_runner({"name": "r1"})
    with pytest.raises(BadRequest):
        store.add_runner({"host": "h"})
    store.add_runner({"name": "r2"})
    assert [r["name"] for r in store.api_runners()] == ["r1", "r2"]
    store.set_runner_state("r1", True)
    store.set_runner_state("inv", True)
    store.set_runner_state("inv", False)
    assert store.runner_states() == {"r1": {"draining": True}, "inv": {"draining": False}}
    assert store.remove_runner("r1")
    assert not store.remove_runner("r1")
    assert [r["name"] for r in store.api_runners()] == ["r2"]
    assert "r1" not in store.runner_states()


# --- stats ----------------------------------------------------------------------------


def test_buckets_and_percentiles():
    for seconds in (0.0015, 0.2, 1, 7.5, 60, 3600):
        upper = bucket_upper(bucket_of(seconds))
        assert seconds <= upper <= seconds * 1.1
    assert bucket_of(0) == bucket_of(-5) == 0
    assert percentile([], 0.5) is None
    hist = [(bucket_of(s), 1) for s in range(1, 101)]
    assert 50 <= percentile(hist, 0.5) <= 55
    assert 95 <= percentile(hist, 0.95) <= 104


def run_job(store: Store, clock: Clock, commit: str, wait: float, duration: float, status: JobStatus,
            runner: str = "w1", repo: str = "acme/app"):
    job = one_job(store, repo=repo, commit=commit)
    clock.advance(wait)
    assert store.start_job(job.id, runner, 1)
    clock.advance(duration)
    assert store.finish_job(job.id, 1, status, None)
    return job


def test_stats_on_known_jobs(store, clock):
    for i in range(6):
        run_job(store, clock, f"p{i}", wait=1, duration=10 * (i + 1), status=JobStatus.PASSED)
    for i in range(3):
        run_job(store, clock, f"f{i}", wait=3, duration=100, status=JobStatus.FAILED, runner="w2")
    run_job(store, clock, "e0", wait=1, duration=5, status=JobStatus.ERROR, runner="w2")
    cancelled = one_job(store, commit="x0")
    store.cancel_job(cancelled.id)
    one_job(store, commit="q0")
    one_job(store, repo="acme/lib", commit="q1")
    running = one_job(store, commit="r0")
    store.start_job(running.id, "w1", 1)

    stats = store.stats()
    assert stats["queue"] == {"length": 2}
    app = next(r for r in stats["repos"] if r["repo"] == "acme/app")
    assert {k: app[k] for k in ("total", "queued", "running", "passed", "failed", "error", "cancelled")} == {
        "total": 13, "queued": 1, "running": 1, "passed": 6, "failed": 3, "error": 1, "cancelled": 1,
    }
    assert app["pct_passed"] == round(100 * 6 / 11, 1)
    assert app["pct_failed"] == round(100 * 3 / 11, 1)
    # durations: 5, 10..60, 100 x3 -> median (5th of 10) is 40 s, p95 is 100 s
    assert 40 <= app["duration"]["median"] <= 40 * 1.1
    assert 100 <= app["duration"]["p95"] <= 110
    # waits: 1 x7 (incl. the running job), 3 x3
    assert 1 <= app["wait"]["median"] <= 1.1
    assert 3 <= app["wait"]["p95"] <= 3.3
    lib = next(r for r in stats["repos"] if r["repo"] == "acme/lib")
    assert lib["pct_passed"] is None and lib["duration"] == {"median": None, "p95": None}

    runners = {r["name"]: r for r in stats["runners"]}
    assert (runners["w1"]["jobs"], runners["w1"]["passed"], runners["w1"]["running"]) == (6, 6, 1)
    assert runners["w1"]["busy_seconds"] == 210
    assert (runners["w2"]["jobs"], runners["w2"]["failed"], runners["w2"]["pct_passed"]) == (4, 3, 0.0)
    assert runners["w2"]["busy_seconds"] == 305
    assert 0 < runners["w1"]["utilisation"] <= 1

    # the incremental aggregates equal a rebuild from the jobs table
    store.rebuild_stats()
    assert store.stats() == stats


def test_stats_follow_requeue_and_retry(store, clock):
    job = run_job(store, clock, "c1", wait=2, duration=30, status=JobStatus.FAILED)
    store.retry_job(job.id)
    clock.advance(5)
    store.start_job(job.id, "w1", 2)
    store.requeue_job(job.id, "runner lost")
    clock.advance(1)
    store.start_job(job.id, "w2", 3)
    clock.advance(20)
    store.finish_job(job.id, 3, JobStatus.PASSED, None)
    stats = store.stats()
    [app] = stats["repos"]
    assert (app["total"], app["passed"], app["failed"], app["queued"], app["running"]) == (1, 1, 0, 0, 0)
    assert 20 <= app["duration"]["median"] <= 22
    assert 1 <= app["wait"]["median"] <= 1.1
    store.rebuild_stats()
    rebuilt = store.stats()
    assert rebuilt["repos"] == stats["repos"]
    # a rebuild forgets runners with no job left in the table, and the start of their window
    def comparable(runners):
        return [{k: v for k, v in r.items() if k != "utilisation"} for r in runners if r["jobs"] or r["running"]]

    assert comparable(rebuilt["runners"]) == comparable(stats["runners"])


def test_bulk_insert_then_stats(store, clock):
    t = clock.now
    rows = [
        {"pipeline": "build", "repo": f"r{i % 3}", "commit": f"c{i}", "status": "passed" if i % 4 else "failed",
         "runner": "w1", "created_at": t, "queued_at": t, "started_at": t + 2, "finished_at": t + 2 + i % 10}
        for i in range(1, 101)
    ] + [{"pipeline": "build", "repo": "r0", "commit": "q"}]
    assert store.bulk_insert_jobs(rows) == 101
    stats = store.stats()
    assert sum(r["total"] for r in stats["repos"]) == 101
    assert stats["queue"]["length"] == 1
    assert stats["runners"][0]["jobs"] == 100 and stats["runners"][0]["failed"] == 25
    assert len(store.list_commits(limit=1000)) == 101
    with pytest.raises(ValueError, match="unknown columns"):
        store.bulk_insert_jobs([{"pipeline": "b", "repo": "r", "commit": "z", "colour": "red"}])


# --- several processes ----------------------------------------------------------------


def _process_writer(spec: StoreSpec, tag: str, n: int, start: multiprocessing.synchronize.Event) -> None:
    store = spec.open()
    start.wait(60)
    shared = store.create_jobs("acme/shared", "same", "main", ["build"])[0][0]
    for i in range(n):
        [(job, _)] = store.create_jobs("acme/app", f"{tag}-{i}", "main", ["build"])
        store.append_log(job.id, 1, [f"{tag} line {i}"])
        store.append_log(shared.id, 1, [f"{tag} {i} a", f"{tag} {i} b"])
    store.close()


def test_two_processes_write_at_once(store_spec):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    n = 150
    procs = [ctx.Process(target=_process_writer, args=(store_spec, tag, n, start)) for tag in ("p1", "p2")]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]

    store = store_spec.open()
    jobs = store.list_jobs(repo="acme/app", limit=10_000)
    assert len(jobs) == 2 * n
    [shared] = store.list_jobs(repo="acme/shared")
    lines = store.read_log(shared.id)
    assert [no for no, _ in lines] == list(range(1, 4 * n + 1))
    for tag in ("p1", "p2"):
        texts = [t for _, t in lines if t.startswith(tag + " ")]
        assert texts == [f"{tag} {i} {x}" for i in range(n) for x in "ab"]  # pairs stay together, in order
    for job in jobs:
        assert store.read_log(job.id) == [(1, f"{job.commit.split('-')[0]} line {job.commit.split('-')[1]}")]
    assert store.stats()["queue"]["length"] == 2 * n + 1
    store.close()


def _forked_child(store: Store, queue) -> None:
    [(job, _)] = store.create_jobs("acme/app", "from-child", "main", ["build"])
    store.close()
    queue.put(job.id)


def test_forked_child_opens_its_own_connection(store):
    one_job(store)  # the parent has a connection open before forking
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_forked_child, args=(store, queue))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    child_job = store.get_job(queue.get(timeout=10))
    assert child_job.commit == "from-child"
    assert len(store.list_jobs()) == 2  # the parent's connection still works


def test_log_blocks_cut_at_after_and_limit(store):
    job = store.create_jobs("r", "a" * 40, None, ["p"])[0][0]
    store.append_log(job.id, 1, ["l1", "l2", "l3"])
    store.append_log(job.id, 1, ["l4", "", "l6"])
    assert store.read_log_blocks(job.id) == [(1, ["l1", "l2", "l3"], "step"), (4, ["l4", "", "l6"], "step")]
    assert store.read_log_blocks(job.id, after=2, limit=3) == [(3, ["l3"], "step"), (4, ["l4", ""], "step")]
    assert store.read_log_blocks(job.id, after=3) == [(4, ["l4", "", "l6"], "step")]
    assert store.read_log_blocks(job.id, after=6) == []
    assert store.read_log(job.id, after=4) == [(5, ""), (6, "l6")]
    # Elements holding newlines still count as several lines (the slow path).
    assert store.append_log(job.id, 1, ["x\ny", "z\n"]) == 7
    assert store.read_log(job.id, after=6) == [(7, "x"), (8, "y"), (9, "z")]


# --- finding 7: narwhal's own log lines are a kind of their own ------------------------------


def test_finding7_log_kinds_share_one_numbering(store):
    job = one_job(store)
    assert store.append_log(job.id, 1, ["a", "[narwhal] step build: exit 0"]) == 1  # a step's text
    assert store.append_log(job.id, 1, ["step build: exit 1 (0.1s)"], LogKind.NARWHAL) == 3
    assert store.append_log(job.id, 2, ["b"], "step") == 4
    assert store.append_log(job.id, 2, ["attempt 2 on runner r"], "narwhal") == 5
    assert store.read_log_blocks(job.id) == [
        (1, ["a", "[narwhal] step build: exit 0"], LogKind.STEP),
        (3, ["step build: exit 1 (0.1s)"], LogKind.NARWHAL),
        (4, ["b"], LogKind.STEP),
        (5, ["attempt 2 on runner r"], LogKind.NARWHAL),
    ]
    assert store.read_log_blocks(job.id, after=2, limit=2) == [
        (3, ["step build: exit 1 (0.1s)"], LogKind.NARWHAL), (4, ["b"], LogKind.STEP)]
    assert [n for n, _ in store.read_log(job.id)] == [1, 2, 3, 4, 5]
    assert store.log_line_count(job.id) == 5
    with pytest.raises(ValueError):
        store.append_log(job.id, 1, ["x"], "forged")
    with pytest.raises(integrity_error(store)), store._tx() as db:  # the column refuses other kinds by itself too
        db.execute("INSERT INTO log (job_id, attempt, first_line, n_lines, data, kind) "
                   "VALUES (?, 1, 99, 1, ?, 'other')", (job.id, store.backend.log_value("x")))


def test_finding7_schema_1_logs_read_as_step_lines(db_path):
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.executescript(MIGRATIONS[0])
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO jobs (id, pipeline, repo, \"commit\", status, created_at, queued_at) "
                 "VALUES (1, 'p', 'r', 'c', 'passed', 0, 0)")
    conn.execute("INSERT INTO log (job_id, attempt, first_line, n_lines, data) VALUES (1, 1, 1, 2, 'x\ny')")
    conn.commit()
    conn.close()
    s = Store(db_path)
    assert s.schema_version == SCHEMA_VERSION == 13
    assert s.read_log_blocks(1) == [(1, ["x", "y"], LogKind.STEP)]
    assert s.append_log(1, 1, ["note"], LogKind.NARWHAL) == 3
    assert [(first, n) for first, n, _ in s.log_times(1)] == [(1, 2), (3, 1)]
    assert s.log_times(1)[0][2] is None and s.log_times(1)[1][2] is not None  # older rows have no time
    s.close()


def test_log_times_say_when_each_run_of_lines_was_written(store, clock):
    job = store.create_jobs("/r", "a" * 40, "main", ["ci"])[0][0]
    store.append_log(job.id, 1, ["a", "b"])
    clock.advance(2.5)
    store.append_log(job.id, 1, ["step s started"], LogKind.NARWHAL)
    clock.advance(1)
    store.append_log(job.id, 1, ["c"])
    start = clock.now - 3.5
    assert store.log_times(job.id) == [(1, 2, start), (3, 1, start + 2.5), (4, 1, start + 3.5)]
    assert store.log_times(job.id, after=1) == [(1, 2, start), (3, 1, start + 2.5), (4, 1, start + 3.5)]
    assert store.log_times(job.id, after=2) == [(3, 1, start + 2.5), (4, 1, start + 3.5)]
    assert store.log_times(job.id, after=3, limit=1) == [(4, 1, start + 3.5)]
    assert store.log_times(job.id, after=4) == []


def _open_store(spec: StoreSpec, barrier, results) -> None:
    barrier.wait()
    try:
        spec.open().close()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(repr(exc))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_processes_opening_one_new_database_together_all_get_it(tmp_path, kind, request):
    """SQLite answers a switch to WAL "database is locked" at once, without waiting, while
    another process opens the same new file: seen as a flaky start of two writers. On
    PostgreSQL, the first one migrates while the others wait on its advisory lock."""
    import contextlib

    for round_ in range(10 if kind == "sqlite" else 3):
        with contextlib.ExitStack() as stack:
            if kind == "sqlite":
                spec = StoreSpec("sqlite", str(tmp_path / f"n{round_}.db"))
            else:
                spec = stack.enter_context(contextlib.contextmanager(request.getfixturevalue("postgres").spec)(
                    migrated=False))
            opened_together(spec)


def opened_together(spec: StoreSpec) -> None:
    barrier, results = multiprocessing.Barrier(6), multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_open_store, args=(spec, barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [results.get(timeout=10) for _ in procs] == ["ok"] * 6


def test_a_step_keeps_why_it_was_skipped_or_failed(store):
    [(job, _)] = store.create_jobs("r", "c" * 40, None, ["p"])
    store.start_job(job.id, "runner", 1)
    store.plan_steps(job.id, 1, ["a", "b", "c"])
    store.start_step(job.id, 1, 0, "a")
    store.finish_step(job.id, 1, 0, StepStatus.FAILED_ALLOWED, 1, reason="exit 1 in step a")
    store.finish_step(job.id, 1, 1, StepStatus.SKIPPED, None, reason="branch dev is not in when.branch [main]")
    steps = store.get_job(job.id).steps
    assert [(s.status, s.reason) for s in steps] == [
        (StepStatus.FAILED_ALLOWED, "exit 1 in step a"),
        (StepStatus.SKIPPED, "branch dev is not in when.branch [main]"), (StepStatus.PENDING, None)]
    assert steps[0].to_dict()["reason"] == "exit 1 in step a" and steps[0].to_dict()["status"] == "failed_allowed"
    store.start_step(job.id, 1, 0, "a")  # a step that starts again says nothing old
    assert store.get_job(job.id).steps[0].reason is None


def test_changed_files_are_kept_per_job_when_asked(store):
    jobs = store.create_jobs("r", "d" * 40, None, ["p", "q", "s"], changed={"p": ["a/b.py", "c"], "q": None})
    ids = {job.pipeline: job.id for job, _ in jobs}
    assert store.changed_files(ids["p"]) == ("a/b.py", "c")
    assert store.changed_files(ids["q"]) is None and store.changed_files(ids["s"]) is None
    assert store.changed_files(10**6) is None


def test_latest_jobs_is_the_newest_of_each_repo_branch_and_pipeline(store, monkeypatch):
    sha = [f"{i:040x}" for i in range(1, 10)]
    old_main = store.create_jobs("/r", sha[0], "main", ["ci", "docs"])
    new_main = store.create_jobs("/r", sha[1], "main", ["ci"])
    feature = store.create_jobs("/r", sha[2], "feature", ["ci"])
    no_branch = store.create_jobs("/r", sha[3], None, ["ci"])
    other = store.create_jobs("/o", sha[4], "main", ["ci"])
    ids = [j.id for j, _ in (other + no_branch + feature + new_main)] + [old_main[1][0].id]
    assert [j.id for j in store.latest_jobs()] == ids  # newest first; docs' newest is the old commit's
    assert [j.id for j in store.latest_jobs(repo="/o")] == [other[0][0].id]
    assert len(store.latest_jobs(limit=2)) == 2
    monkeypatch.setattr(Store, "LATEST_WINDOW", 2)  # only the newest jobs are looked at
    assert [j.id for j in store.latest_jobs()] == [other[0][0].id, no_branch[0][0].id]


def integrity_error(store: Store) -> type[Exception]:
    """What the backend raises when a constraint refuses a row."""
    if store.kind == "sqlite":
        return sqlite3.IntegrityError
    import psycopg

    return psycopg.errors.IntegrityError


# --- upgrades, events, and writers at once (both backends) ----------------------------------------


OLD_TRIGGERS = ["events_prune", "events_job_insert", "events_job_update", "events_step_insert", "events_step_update"]


def test_a_schema_7_state_dir_upgrades_and_its_event_triggers_go(db_path):
    """Up to schema 7 the event log was filled by SQLite triggers that each start created; the
    store writes events itself now, so an upgraded file must lose them (else every change
    would be two events)."""
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for script in MIGRATIONS[:7]:
        conn.executescript(script)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '7')")
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL, "
                 "job_id INTEGER, runner TEXT, data TEXT NOT NULL)")
    conn.execute("CREATE TABLE step_lines (job_id INTEGER NOT NULL, attempt INTEGER NOT NULL, idx INTEGER NOT NULL, "
                 "first_line INTEGER, last_line INTEGER, PRIMARY KEY (job_id, attempt, idx)) WITHOUT ROWID")
    for name in OLD_TRIGGERS:
        table = "events" if name == "events_prune" else "steps" if "step" in name else "jobs"
        action = ("DELETE FROM events WHERE id < 0" if name == "events_prune"
                  else "INSERT INTO events (at, kind, data) VALUES (0, 'old.trigger', '{}')")
        conn.execute(f"CREATE TRIGGER {name} AFTER INSERT ON {table} BEGIN {action}; END")
    conn.execute('INSERT INTO jobs (id, pipeline, repo, "commit", status, created_at, queued_at) '
                 "VALUES (1, 'p', 'r', 'c', 'passed', 0, 0)")  # fires the old trigger once
    conn.commit()
    conn.close()
    s = Store(db_path)
    try:
        assert s.schema_version == SCHEMA_VERSION == 13
        triggers = s._conn().execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
        assert triggers == []
        job = one_job(s)
        with s._tx(write=False) as db:
            kinds = [k for (k,) in db.execute("SELECT kind FROM events ORDER BY id")]
        assert kinds == ["old.trigger"] * 2 + ["job.queued"]  # the old events stay, the new change is one event
        assert s.get_job(1).status is JobStatus.PASSED and job.id == 2
    finally:
        s.close()


def test_every_change_is_one_event_and_steps_know_their_lines(store):
    from narwhal.dispatch.events import EventLog

    events = EventLog(store)
    start = events.latest()
    job = one_job(store)
    store.start_job(job.id, "w1", 1)
    store.plan_steps(job.id, 1, ["build", "test"])  # the plan is no event
    store.start_step(job.id, 1, 0, "build")
    store.append_log(job.id, 1, ["a", "b"])
    store.start_step(job.id, 1, 0, "build")  # already running: no event
    store.finish_step(job.id, 1, 0, StepStatus.PASSED, 0)
    store.finish_step(job.id, 1, 0, StepStatus.PASSED, 0)  # unchanged: no event
    store.finish_step(job.id, 1, 1, StepStatus.SKIPPED, None, reason="not needed")
    store.finish_step(job.id, 1, 9, StepStatus.FAILED, 1)  # not planned, no name: nothing
    store.finish_job(job.id, 1, JobStatus.PASSED)
    batch = events.since(start)
    assert [(e.kind, e.data.get("status"), e.data.get("idx")) for e in batch.events] == [
        ("job.queued", "queued", None), ("job.started", "running", None), ("job.step", "running", 0),
        ("job.step", "passed", 0), ("job.step", "skipped", 1), ("job.finished", "passed", None)]
    assert batch.events[2].data["line"] == 1 and batch.events[3].data["line"] == 3
    assert events.step_lines(job.id, 1) == {0: (1, 2), 1: (None, 2)}
    assert [e.kind for e in events.for_job(job.id)] == [e.kind for e in batch.events]
    runner_event = events.add_runner_event("w1", {"name": "w1", "state": "healthy"})
    assert runner_event > batch.last and events.for_runner("w1")[0].data["state"] == "healthy"


def test_log_text_is_kept_exactly_nul_and_all(store):
    job = one_job(store)
    lines = ["nul:\x00:end", "tab\tand \x1b[31mred\x1b[0m", "ünïcödé ✓ 🐳", "back\\slash 'quote' \"dq\" ? %s %(x)s"]
    store.append_log(job.id, 1, lines)
    assert [text for _, text in store.read_log(job.id)] == lines


def test_one_of_many_starters_wins(store):
    """Threads racing to start one job (PostgreSQL runs them truly at once): exactly one wins."""
    jobs = [one_job(store, commit=f"c{i}") for i in range(20)]
    barrier = threading.Barrier(8)
    wins: list[tuple[int, str]] = []
    errors: list[BaseException] = []

    def race(name: str) -> None:
        try:
            barrier.wait()
            for job in jobs:
                if store.start_job(job.id, name, 1):
                    wins.append((job.id, name))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert sorted(i for i, _ in wins) == [j.id for j in jobs]
    assert store.stats()["queue"]["length"] == 0
    assert sum(r["running"] for r in store.stats()["runners"]) == 20
    store.rebuild_stats()
    assert store.stats()["queue"]["length"] == 0


def test_writers_at_once_keep_the_counters_and_a_follower_sees_each_event_once(store):
    """Transitions from many threads: the aggregates equal a rebuild, no writer deadlocks, and a
    follower reading ``since(last)`` meanwhile sees every event exactly once, in id order."""
    from narwhal.dispatch.events import EventLog

    events = EventLog(store)
    start = events.latest()
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def follow() -> None:
        last = start
        while True:
            done = stop.is_set()
            batch = events.since(last)
            seen.extend(e.id for e in batch.events)
            last = batch.last
            if done and not batch.events:
                return

    def work(n: int) -> None:
        try:
            for i in range(15):
                job = one_job(store, repo=f"r{i % 2}", commit=f"{n}-{i}")
                store.start_job(job.id, f"w{i % 3}", 1)
                store.append_log(job.id, 1, [f"{n} {i}"])
                if i % 4 == 0:
                    store.requeue_job(job.id, "runner lost")
                    store.start_job(job.id, f"w{n % 3}", 2)
                    store.finish_job(job.id, 2, JobStatus.ERROR, "x")
                    store.retry_job(job.id)
                else:
                    store.finish_job(job.id, 1, JobStatus.PASSED if i % 2 else JobStatus.FAILED)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    follower = threading.Thread(target=follow)
    follower.start()
    workers = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(300)
    stop.set()
    follower.join(60)
    assert not errors
    every = [e.id for e in events.since(start, limit=100_000).events]
    assert seen == every and len(every) == len(set(every))
    assert len(every) == 6 * (11 * 3 + 4 * 6)  # queued, started, finished; the re-run ones also re-queued, restarted, retried
    stats = store.stats()
    store.rebuild_stats()
    rebuilt = store.stats()
    assert rebuilt["repos"] == stats["repos"] and rebuilt["queue"] == stats["queue"]
    assert [(r["name"], r["jobs"], r["passed"], r["failed"]) for r in rebuilt["runners"]] == \
        [(r["name"], r["jobs"], r["passed"], r["failed"]) for r in stats["runners"]]


def test_a_failed_transaction_leaves_nothing_and_the_store_goes_on(store):
    job = one_job(store)
    with pytest.raises(RuntimeError), store._tx() as db:
        db.execute("UPDATE jobs SET reason = 'half done' WHERE id = ?", (job.id,))
        raise RuntimeError("a bug between two statements")
    assert store.get_job(job.id).reason is None
    with pytest.raises(integrity_error(store)), store._tx() as db:
        db.execute("UPDATE jobs SET reason = 'half done' WHERE id = ?", (job.id,))
        db.execute("INSERT INTO log (job_id, attempt, first_line, n_lines, data, kind) VALUES (?, 1, 1, 1, ?, 'x')",
                   (job.id, store.backend.log_value("x")))
    assert store.get_job(job.id).reason is None and store.read_log(job.id) == []
    for _ in range(20):  # every pooled connection is clean again
        assert one_job(store, commit=f"after-{_}").status is JobStatus.QUEUED


def test_postgresql_plans_use_the_indexes_too(postgres):
    """The SQLite test above, on PostgreSQL, where the planner has no INDEXED BY hints: at 20,000
    jobs (analyzed, as bulk_insert_jobs leaves them) no per-request query scans jobs, log or commits."""
    import contextlib

    with contextlib.contextmanager(postgres.spec)() as spec, spec.open() as store:
        store.bulk_insert_jobs({"pipeline": "ci", "repo": f"r{i % 50}", "commit": f"{i:040x}", "status": "passed",
                                "runner": f"w{i % 3}"} for i in range(20_000))
        queries = [
            ("SELECT id FROM jobs WHERE status = 'running' ORDER BY id DESC LIMIT 50", ()),
            ("SELECT id FROM jobs WHERE repo = %s ORDER BY id DESC LIMIT 50", ("r1",)),
            ("SELECT id FROM jobs WHERE status = 'queued' AND repo = %s ORDER BY id DESC LIMIT 50", ("r1",)),
            ("SELECT id FROM jobs WHERE status = 'queued' ORDER BY queued_at, id", ()),
            ("SELECT runner, count(*) FROM jobs WHERE status = 'running' GROUP BY runner", ()),
            ('SELECT id, pipeline, status FROM jobs WHERE repo = %s AND "commit" = %s', ("r1", "c")),
            ("SELECT id FROM commits WHERE repo = %s ORDER BY id DESC LIMIT 20", ("r1",)),
            ("SELECT first_line FROM log WHERE job_id = %s ORDER BY first_line DESC LIMIT 1", (1,)),
            ("SELECT id FROM jobs WHERE status = 'running' AND node = %s", ("n",)),
        ]
        with store._tx(write=False) as db:
            for sql, args in queries:
                plan = "\n".join(r[0] for r in db.tx.conn.execute("EXPLAIN " + sql, args))
                assert not re.search(r"Seq Scan on (jobs|log|commits)\b", plan), (sql, plan)
