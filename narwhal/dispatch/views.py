"""Read-only questions the web dashboard asks the store, each one query in one snapshot.

Kept apart from ``store.py`` (whose methods change state or serve the REST API): the
dashboard's views are wider (latest job per branch and pipeline, filtered history, the
durations of the last N jobs) and may change shape without touching the store's contract.
"""

from __future__ import annotations

from dataclasses import dataclass

from narwhal.dispatch.store import _JOB_COLUMNS, Store, _job
from narwhal.job import FINAL_STATUSES, Job, JobStatus

_FINAL = ", ".join(f"'{s.value}'" for s in sorted(FINAL_STATUSES))
_JOB_COLS_J = ", ".join(f"j.{c.strip()}" for c in _JOB_COLUMNS.split(","))


@dataclass
class RunningStep:
    name: str
    started_at: float | None


def latest_per_branch(store: Store) -> list[Job]:
    """The newest job of every (repository, branch, pipeline), by repository, branch, pipeline."""
    sql = (f"SELECT {_JOB_COLS_J} FROM jobs j JOIN "
           "(SELECT max(id) AS id FROM jobs GROUP BY repo, coalesce(branch, ''), pipeline) latest "
           "ON j.id = latest.id ORDER BY j.repo, coalesce(j.branch, ''), j.pipeline")
    with store._tx(write=False) as db:  # noqa: SLF001 - the store's transaction helper, same layer
        return [_job(r) for r in db.execute(sql)]


def running_steps(store: Store) -> dict[int, RunningStep]:
    """job id -> its step running now (current attempt)."""
    sql = ("SELECT s.job_id, s.name, s.started_at FROM steps s JOIN jobs j ON j.id = s.job_id "
           "AND s.attempt = j.attempt WHERE j.status = 'running' AND s.status = 'running'")
    with store._tx(write=False) as db:  # noqa: SLF001
        return {job_id: RunningStep(name, started) for job_id, name, started in db.execute(sql)}


def history(store: Store, repo: str, *, branch: str | None = None, pipeline: str | None = None,
            status: str | None = None, limit: int = 50, before: int | None = None) -> list[Job]:
    """A repository's jobs, newest first, filtered."""
    where: list[str] = ["repo = ?"]
    args: list[str | int] = [repo]
    for column, value in (("branch", branch), ("pipeline", pipeline), ("status", status)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if before is not None:
        where.append("id < ?")
        args.append(int(before))
    sql = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"
    with store._tx(write=False) as db:  # noqa: SLF001
        return [_job(r) for r in db.execute(sql, (*args, max(1, limit)))]


def finished(store: Store, repo: str, *, branch: str | None = None, pipeline: str | None = None,
             limit: int = 50) -> list[Job]:
    """The last ``limit`` finished jobs that ran (the chart), oldest first."""
    where, args = ["repo = ?", f"status IN ({_FINAL})", "started_at IS NOT NULL", "finished_at IS NOT NULL"], [repo]
    for column, value in (("branch", branch), ("pipeline", pipeline)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    sql = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"
    with store._tx(write=False) as db:  # noqa: SLF001
        return [_job(r) for r in reversed(db.execute(sql, (*args, max(1, limit))).fetchall())]


def choices(store: Store, repo: str) -> tuple[list[str], list[str]]:
    """The branches and pipelines a repository's jobs have (the filters' options)."""
    with store._tx(write=False) as db:  # noqa: SLF001
        branches = [b for (b,) in db.execute(
            "SELECT DISTINCT branch FROM jobs WHERE repo = ? AND branch IS NOT NULL ORDER BY branch", (repo,))]
        pipelines = [p for (p,) in db.execute(
            "SELECT DISTINCT pipeline FROM jobs WHERE repo = ? ORDER BY pipeline", (repo,))]
    return branches, pipelines


def repos(store: Store) -> list[str]:
    with store._tx(write=False) as db:  # noqa: SLF001
        return [r for (r,) in db.execute("SELECT DISTINCT repo FROM repo_stats WHERE count > 0 ORDER BY repo")]


def runner_jobs(store: Store, runner: str, limit: int = 20) -> list[Job]:
    with store._tx(write=False) as db:  # noqa: SLF001
        return [_job(r) for r in db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE runner = ? ORDER BY id DESC LIMIT ?", (runner, limit))]


def latest_for_badge(store: Store, pipeline: str, branch: str | None) -> Job | None:
    """The newest job of ``pipeline`` (on ``branch``) that is not waiting, running or skipped."""
    where, args = ["pipeline = ?", f"status IN ({_FINAL})", "status != ?"], [pipeline, JobStatus.SKIPPED.value]
    if branch is not None:
        where.append("branch = ?")
        args.append(branch)
    with store._tx(write=False) as db:  # noqa: SLF001
        row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT 1",
                         args).fetchone()
    return _job(row) if row else None
