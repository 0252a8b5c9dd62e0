"""The store on each backend, side by side: the same million jobs in SQLite and in PostgreSQL.

For each backend: the bulk pre-fill (``bulk_insert_jobs``, which ends in a rebuild of the
aggregates), ``stats()`` timed (what ``GET /stats`` reads: the aggregate tables only, so flat
in the number of jobs), one ``rebuild_stats()`` over every job, single-thread job transitions
(create, start, finish: three transactions) and log appends of 1,000-line batches. SQLite is
a file in the work directory; PostgreSQL a throwaway cluster of Debian's package
(``testbed.postgres``, fsync off: the figures are the store's own cost, not the disk's).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.measure import summary
from bench.scenarios import LINE, prefill_store
from narwhal.dispatch.store import Store
from narwhal.job import JobStatus
from testbed.postgres import start_cluster

TRANSITIONS = 300  # jobs created, started and finished one at a time
LOG_BATCHES = 200  # append_log calls of 1,000 lines (100 KB) each


def _one_backend(store: Store, jobs: int, requests: int, log: Callable[[str], None]) -> dict:
    t0 = time.perf_counter()
    prefill_store(store, jobs)
    filled = time.perf_counter() - t0
    log(f"  {store.kind}: {jobs:,} jobs pre-filled in {filled:.1f} s")
    times = []
    for _ in range(requests):
        t = time.perf_counter()
        store.stats()
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    store.rebuild_stats()
    rebuild = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(TRANSITIONS):
        [(job, _)] = store.create_jobs("https://git.example.com/bench/transitions.git", f"{i:040x}", "main", ["ci"])
        store.start_job(job.id, "runner-1", 1)
        store.finish_job(job.id, 1, JobStatus.PASSED)
    transitions = TRANSITIONS / (time.perf_counter() - t)
    lines = [LINE] * 1000
    t = time.perf_counter()
    for _ in range(LOG_BATCHES):
        store.append_log(job.id, 1, lines)
    appended = time.perf_counter() - t
    log_mb_s = LOG_BATCHES * len(lines) * (len(LINE) + 1) / appended / 1e6
    stats = summary(times)
    log(f"  {store.kind}: stats() p50 {stats['median'] * 1000:.2f} ms, p95 {stats['p95'] * 1000:.2f} ms; "
        f"rebuild {rebuild:.1f} s; {transitions:.0f} jobs/s through create+start+finish; logs {log_mb_s:.0f} MB/s")
    return {"prefill_seconds": filled, "stats_seconds": stats, "rebuild_seconds": rebuild,
            "jobs_per_second": transitions, "log_mb_per_s": log_mb_s}


def scenario(jobs: int, requests: int, log: Callable[[str], None], workdir: Path | None = None) -> dict:
    out: dict = {"jobs": jobs, "stats_requests": requests}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        with Store(str(Path(tmp) / "narwhal.db")) as store:
            out["sqlite"] = _one_backend(store, jobs, requests, log)
    cluster = start_cluster()
    try:
        name = cluster.create_database()
        with Store(cluster.url(name), password=cluster.password) as store:
            out["postgresql"] = _one_backend(store, jobs, requests, log)
    finally:
        cluster.stop()
    return out
