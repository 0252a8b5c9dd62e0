"""The store: commits, jobs, steps, logs, api runners, the outbox, the event log, the stats,
artifacts' rows, browser sessions, and the nodes of a cluster.

Every rule of narwhal's state is here once, in portable SQL over a ``Backend``
(narwhal.dispatch.backend): SQLite by default (narwhal.dispatch.sqlite), PostgreSQL when
the ``store`` setting names one (narwhal.dispatch.postgres). Every public method is one
transaction.

Status changes are guarded in SQL (``WHERE status = ... AND attempt = ...``) so a
job never gets two results, and every change updates the aggregate tables
(``repo_stats``, ``repo_hist``, ``runner_stats``) in the same transaction, so
``stats()`` reads a few hundred rows whatever the number of jobs. Those updates are
gathered while the transaction runs and written at its end in one order (by table, then
key), so two writers that touch the same counters (PostgreSQL runs writers at once) lock
them in the same order and never deadlock. A read that a transaction goes on to change
takes ``backend.for_update``.

The event log (``GET /events``) is written here too, in the transaction of each change:
an event exists exactly when its change was committed, whichever process made it.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from narwhal.dispatch.backend import Backend, StoreInUse, StoreUnavailable, Tx
from narwhal.dispatch.buckets import BUCKETS_PER_DOUBLING, bucket_of, bucket_upper, percentile
from narwhal.dispatch.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteBackend
from narwhal.errors import BadRequest, Conflict, NotFound
from narwhal.job import FINAL_STATUSES, Job, JobStatus, LogKind, Origin, Step, StepStatus

__all__ = ["BUCKETS_PER_DOUBLING", "MIGRATIONS", "SCHEMA_VERSION", "LeaseLost", "LogBatch", "OutboxRow", "Store", "StoreInUse", "StoreUnavailable", "bucket_of",
           "bucket_upper", "open_backend", "percentile"]

# --- artifacts: every statement about them, together (both backends take them; the table is migration
# 11 on SQLite, 4 on PostgreSQL) ---
# One row per file a job kept: its path in the workspace, the object holding its bytes in the
# artifact store (ARTIFACTS_DIR/objects/, named by sha256: narwhal.dispatch.artifacts)
# and when it expires. A job keeps the files of its latest attempt that collected. Rows
# outlive their expiry for ARTIFACT_ROWS_KEPT seconds, so a download can say 410 (gone),
# not 404; the objects go at the first sweep after no unexpired row names them.
ARTIFACT_ROWS_KEPT = 90 * 86400.0
ARTIFACT_SQL = {
    "forget_job": "DELETE FROM artifacts WHERE job_id = ?",
    "insert": ("INSERT INTO artifacts (job_id, path, attempt, sha256, size, created_at, expires_at) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)"),
    "list": ("SELECT path, size, sha256, created_at, expires_at FROM artifacts WHERE job_id = ? "
             "ORDER BY path LIMIT ?"),
    "one": "SELECT path, size, sha256, created_at, expires_at FROM artifacts WHERE job_id = ? AND path = ?",
    "live_objects": "SELECT DISTINCT sha256 FROM artifacts WHERE expires_at > ?",
    "prune": "DELETE FROM artifacts WHERE expires_at <= ?",
}

# --- browser sessions (narwhal.api.session): every statement about them, together (the table is
# migration 12 on SQLite, 5 on PostgreSQL) ---
# One row per signed-in browser: the sha256 of its session id (hex; never the id), when it was
# made and when it ends. A check is one indexed read; only signing in and out write. The secret
# the CSRF tokens are derived from is one row of ``meta``, made by the first node that needs it.
SESSION_SECRET = "session_secret"  # the meta key
SESSION_SQL = {
    "secret": "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",  # the first wins
    "insert": "INSERT INTO sessions (key, created_at, expires_at) VALUES (?, ?, ?) ON CONFLICT (key) DO NOTHING",
    "sweep": "DELETE FROM sessions WHERE expires_at <= ?",
    "count": "SELECT count(*) FROM sessions",
    # the newest ``keep`` stay; on a tie in age, the greater key
    "cap": ("DELETE FROM sessions WHERE key NOT IN "
            "(SELECT key FROM sessions ORDER BY created_at DESC, key DESC LIMIT ?)"),
    "alive": "SELECT 1 FROM sessions WHERE key = ? AND expires_at > ?",
    "end": "DELETE FROM sessions WHERE key = ?",
}


_JOB_COLUMNS = (
    'id, pipeline, repo, "commit", branch, status, runner, attempt, reason, '
    "cancel_requested, created_at, queued_at, started_at, finished_at, event, "
    "ref, pr, source_repo, author, subject, forge"
)

# Columns bulk_insert_jobs accepts, with their defaults.
_BULK_DEFAULTS: dict[str, Any] = {
    "pipeline": None,
    "repo": None,
    "commit": None,
    "branch": None,
    "status": JobStatus.QUEUED.value,
    "runner": None,
    "attempt": 1,
    "reason": None,
    "cancel_requested": 0,
    "created_at": None,
    "queued_at": None,
    "started_at": None,
    "finished_at": None,
    "event": "api",
    "origin_key": "",
}

_STATUSES = [s.value for s in JobStatus]

_OUTBOX_COLUMNS = 'id, job_id, forge, repo, "commit", context, state, description, created_at, attempts, next_at'
# A row still to send: neither delivered nor given up (the outbox_pending index holds these).
_PENDING = "delivered_at IS NULL AND failed_at IS NULL"

# The event log (narwhal.dispatch.events reads it).
EVENTS_KEPT = 100_000  # events kept; older ones are deleted (a client resuming before them gets a reset)
PRUNE_EVERY = 1024  # pruning runs on every this-many-th event
_JOB_EVENT = {JobStatus.QUEUED: "job.queued", JobStatus.RUNNING: "job.started"}  # else job.finished


@dataclass(frozen=True)
class OutboxRow:
    """One commit status waiting in the outbox: a job's state at one change, for one forge."""

    id: int
    job_id: int
    forge: str  # the forge's name in inventory.yaml
    repo: str
    commit: str
    context: str  # narwhal/<pipeline>
    state: str  # narwhal's job status at the change (the forge's word is chosen when sending)
    description: str
    created_at: float
    attempts: int  # sends tried so far
    next_at: float  # not to be sent before this

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Rows of one key go out one at a time, oldest first: the forge keeps the last one."""
        return (self.forge, self.repo, self.commit, self.context)


@dataclass(frozen=True)
class LogBatch:
    """Lines one job printed, of one kind, to be stored as one row (``Store.append_logs``)."""

    job_id: int
    attempt: int
    lines: list[str]
    kind: str = LogKind.STEP.value


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 1) if whole else None


def open_backend(where: str, password: str | None = None) -> Backend:
    """The backend a ``store`` setting names: a ``postgresql://`` URL, else a SQLite file path."""
    if where.startswith(("postgresql://", "postgres://")):
        try:
            from narwhal.dispatch.postgres import PostgresBackend  # psycopg: the postgresql extra
        except ImportError as exc:
            raise StoreUnavailable(f"a PostgreSQL store needs psycopg and psycopg_pool ({exc}): "
                                   "pip install 'narwhal[postgresql]'") from None
        return PostgresBackend(where, password=password)
    return SQLiteBackend(where)


class Unit:
    """A transaction as the store's methods see it: statements, plus the aggregate changes
    gathered for the end (``Store._tx`` writes them, in one order, before committing)."""

    __slots__ = ("tx", "backend", "execute", "executemany", "counts", "hists", "results", "first_starts")

    def __init__(self, tx: Tx, backend: Backend):
        self.tx = tx  # the backend's own transaction object
        self.backend = backend
        self.execute = tx.execute
        self.executemany = tx.executemany
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.hists: dict[tuple[str, str, int], int] = defaultdict(int)
        self.results: dict[str, list[float]] = {}  # runner -> [jobs, passed, failed, busy seconds]
        self.first_starts: dict[str, float] = {}

    def flush(self) -> None:
        if self.counts or self.hists or self.results or self.first_starts:
            with self.backend.batch(self.tx):
                self._write_aggregates()

    def _write_aggregates(self) -> None:
        for (repo, status), delta in sorted(self.counts.items()):
            if delta:
                self.execute(
                    "INSERT INTO repo_stats (repo, status, count) VALUES (?, ?, ?) "
                    "ON CONFLICT (repo, status) DO UPDATE SET count = repo_stats.count + excluded.count",
                    (repo, status, delta))
        for (repo, kind, bucket), delta in sorted(self.hists.items()):
            if delta:
                self.execute(
                    "INSERT INTO repo_hist (repo, kind, bucket, count) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (repo, kind, bucket) DO UPDATE SET count = repo_hist.count + excluded.count",
                    (repo, kind, bucket, delta))
        for runner in sorted(set(self.results) | set(self.first_starts)):
            jobs, passed, failed, busy = self.results.get(runner, [0, 0, 0, 0.0])
            self.execute(
                "INSERT INTO runner_stats (runner, jobs, passed, failed, busy_seconds, first_started_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (runner) DO UPDATE SET "
                "jobs = runner_stats.jobs + excluded.jobs, passed = runner_stats.passed + excluded.passed, "
                "failed = runner_stats.failed + excluded.failed, "
                "busy_seconds = runner_stats.busy_seconds + excluded.busy_seconds, "
                "first_started_at = CASE WHEN runner_stats.first_started_at IS NULL "
                "OR excluded.first_started_at < runner_stats.first_started_at "
                "THEN excluded.first_started_at ELSE runner_stats.first_started_at END",
                (runner, int(jobs), int(passed), int(failed), busy, self.first_starts.get(runner)))


class Store:
    """Narwhal's state; safe from many threads and processes (and, on PostgreSQL, dispatchers).

    ``where`` is a SQLite file path or a ``postgresql://`` URL (``password`` apart, never in
    the URL), or a ready ``Backend``.
    """

    def __init__(self, where: str | Backend, *, clock: Callable[[], float] | None = None,
                 password: str | None = None):
        self.backend: Backend = open_backend(where, password) if isinstance(where, str) else where
        self.path = self.backend.where
        # The dispatcher's clock; times that several hosts compare (heartbeats, leases) come from
        # the database's (``_shared_now``), unless a clock is given (tests move theirs by hand).
        self.clock: Callable[[], float] = clock or time.time
        self._given_clock = clock is not None
        try:
            self.backend.migrate()
            self._owner_id = self._ensure_owner_id()
        except BaseException:
            self.backend.close()
            raise

    @property
    def kind(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.backend.kind

    # --- transactions ------------------------------------------------------------------

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Unit]:
        """One transaction; a writer's aggregate changes are written at its end."""
        with self.backend.transaction(write) as tx:
            unit = Unit(tx, self.backend)
            yield unit
            if write:
                unit.flush()

    def _conn(self) -> Any:
        """The SQLite backend's connection of this thread (tests look at its settings)."""
        assert isinstance(self.backend, SQLiteBackend), "only the SQLite backend has a per-thread connection"
        return self.backend.connection()

    def close(self) -> None:
        """Close every connection this store opened in this process (a fork's inherited ones are the parent's)."""
        self.backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- schema ------------------------------------------------------------------------

    def _ensure_owner_id(self) -> str:
        with self._tx() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('owner_id', ?) ON CONFLICT (key) DO NOTHING",
                       (uuid.uuid4().hex,))
            owner = _meta(db, "owner_id")
        assert owner is not None  # inserted just above if it was missing
        return owner

    @property
    def owner_id(self) -> str:
        """Random id of this store's dispatcher; labels its containers so reapers keep apart."""
        return self._owner_id

    @property
    def schema_version(self) -> int:
        with self._tx(write=False) as db:
            return int(_meta(db, "schema_version") or 0)

    # --- commits and jobs ----------------------------------------------------------------

    def create_jobs(
        self, repo: str, commit: str, branch: str | None, pipelines: list[str],
        origin: Origin | None = None, refused: Mapping[str, str] | None = None,
        skipped: Mapping[str, str] | None = None, changed: Mapping[str, Sequence[str] | None] | None = None,
    ) -> list[tuple[Job, bool]]:
        """One job per pipeline for a commit and origin key; submitting it again creates nothing.

        A pipeline in ``refused`` (name -> reason) gets its job at once in status error
        with that reason: it asked for something the submission may not have (a secret).
        One in ``skipped`` is recorded as passed at once, with the reason (its ``when``
        did not match), so the commit shows why it did not run. ``changed`` (name -> the
        files the commit changed, None when unknown) is kept for the pipelines it names
        (``changed_files``).
        Returns ``(job, created_now)`` per pipeline, in the order given.
        """
        now = self.clock()
        origin = origin or Origin()
        refused = refused or {}
        skipped = skipped or {}
        changed = changed or {}
        out: list[tuple[Job, bool]] = []
        with self._tx() as db:
            db.execute(
                'INSERT INTO commits (repo, "commit", branch, created_at) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING',
                (repo, commit, branch, now),
            )
            for pipeline in pipelines:
                status, reason = JobStatus.QUEUED, None
                if pipeline in refused:
                    status, reason = JobStatus.ERROR, refused[pipeline]
                elif pipeline in skipped:
                    status, reason = JobStatus.SKIPPED, skipped[pipeline]
                cur = db.execute(
                    'INSERT INTO jobs (pipeline, repo, "commit", branch, status, reason, '
                    "created_at, queued_at, started_at, finished_at, event, origin_key, ref, pr, source_repo, "
                    "author, subject, forge, changed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (pipeline, repo, commit, branch, status.value, reason, now, now,
                     None, None if reason is None else now, origin.event,
                     origin.key, origin.ref, origin.pr, origin.source_repo, origin.author, origin.subject,
                     origin.forge, _changed_json(changed.get(pipeline))),
                )
                created = cur.rowcount == 1
                row = db.execute(
                    f'SELECT {_JOB_COLUMNS} FROM jobs WHERE repo = ? AND "commit" = ? AND pipeline = ? '
                    "AND origin_key = ?", (repo, commit, pipeline, origin.key),
                ).fetchone()
                job = _job(row)
                if created:
                    _count(db, repo, status, +1)
                    _status_changed(db, job, now)
                out.append((job, created))
        return out

    # --- webhook deliveries --------------------------------------------------------------

    DELIVERIES_KEPT = 30 * 86400.0  # seconds a delivery id is remembered (forges redeliver within days)

    def delivery_answer(self, forge: str, delivery: str) -> dict | None:
        """What narwhal answered a delivery it has seen already, or None."""
        with self._tx(write=False) as db:
            row = db.execute("SELECT answer FROM deliveries WHERE forge = ? AND delivery = ?",
                             (forge, delivery)).fetchone()
        return json.loads(row[0]) if row else None

    def record_delivery(self, forge: str, delivery: str, answer: dict) -> None:
        """Remember a delivery and its answer (the first one stays); forget very old ones."""
        now = self.clock()
        with self._tx() as db:
            db.execute("INSERT INTO deliveries (forge, delivery, received_at, answer) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT DO NOTHING",
                       (forge, delivery, now, json.dumps(answer)))
            db.execute("DELETE FROM deliveries WHERE received_at < ?", (now - self.DELIVERIES_KEPT,))

    def set_commit_info(self, id: int, author: str | None, subject: str | None) -> None:
        """The commit's author and subject, for a job that came without them (API submissions)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET author = coalesce(author, ?), subject = coalesce(subject, ?) WHERE id = ?",
                       (author, subject, id))

    def get_job(self, id: int) -> Job | None:
        """The job with the steps of its current attempt."""
        with self._tx(write=False) as db:
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (id,)).fetchone()
            if row is None:
                return None
            job = _job(row)
            job.steps = [
                Step(
                    job_id=job.id,
                    idx=r[0],
                    name=r[1],
                    status=StepStatus(r[2]),
                    exit_code=r[3],
                    started_at=r[4],
                    finished_at=r[5],
                    reason=r[6],
                )
                for r in db.execute(
                    "SELECT idx, name, status, exit_code, started_at, finished_at, reason FROM steps "
                    "WHERE job_id = ? AND attempt = ? ORDER BY idx",
                    (job.id, job.attempt),
                )
            ]
            return job

    LATEST_WINDOW = 5000  # latest_jobs looks at this many newest jobs (one repository's, with repo)

    def latest_jobs(self, repo: str | None = None, limit: int = 100) -> list[Job]:
        """The newest job of each (repository, branch, pipeline), newest first: what is green
        and red now. Only the ``LATEST_WINDOW`` newest jobs are looked at, so the cost stays
        flat however long the history is; a combination not built within them is left out."""
        where, args = ("WHERE repo = ?", [repo]) if repo is not None else ("", [])
        sql = (f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id IN ("
               f"SELECT max(id) FROM (SELECT id, repo, branch, pipeline FROM jobs {where} "
               "ORDER BY id DESC LIMIT ?) AS recent GROUP BY repo, coalesce(branch, ''), pipeline"
               ") ORDER BY id DESC LIMIT ?")
        with self._tx(write=False) as db:
            return [_job(r) for r in db.execute(sql, [*args, self.LATEST_WINDOW, max(0, int(limit))])]

    def list_jobs(
        self,
        status: str | JobStatus | None = None,
        repo: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> list[Job]:
        """Newest first; ``before`` (a job id) pages further back."""
        where: list[str] = []
        args: list[str | int] = []
        if status is not None:
            where.append("status = ?")
            args.append(_status(status).value)
        if repo is not None:
            where.append("repo = ?")
            args.append(repo)
        if before is not None:
            where.append("id < ?")
            args.append(int(before))
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(max(0, int(limit)))
        with self._tx(write=False) as db:
            return [_job(r) for r in db.execute(sql, args)]

    def list_commits(self, repo: str | None = None, limit: int = 20) -> list[dict]:
        """Newest commits first, each with its jobs ({id, pipeline, status})."""
        with self._tx(write=False) as db:
            if repo is None:
                rows = db.execute(
                    'SELECT repo, "commit", branch, created_at FROM commits ORDER BY id DESC LIMIT ?',
                    (max(0, int(limit)),),
                ).fetchall()
            else:
                rows = db.execute(
                    'SELECT repo, "commit", branch, created_at FROM commits WHERE repo = ? '
                    "ORDER BY id DESC LIMIT ?",
                    (repo, max(0, int(limit))),
                ).fetchall()
            out = []
            for r, c, b, created in rows:
                # sorted here: "ORDER BY id" would tempt SQLite into walking the repo's index
                found = db.execute(
                    'SELECT id, pipeline, status FROM jobs WHERE repo = ? AND "commit" = ?', (r, c)
                ).fetchall()
                jobs = [{"id": i, "pipeline": p, "status": s} for i, p, s in sorted(found)]
                out.append({"repo": r, "commit": c, "branch": b, "created_at": created, "jobs": jobs})
            return out

    def queued_jobs(self) -> list[Job]:
        """The queue, oldest queueing first (a retried job goes to the back)."""
        with self._tx(write=False) as db:
            return [
                _job(r)
                for r in db.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs {self.backend.indexed_by('jobs_queue')} "
                    "WHERE status = 'queued' ORDER BY queued_at, id"
                )
            ]

    def running_jobs(self) -> list[Job]:
        with self._tx(write=False) as db:
            return [
                _job(r)
                for r in db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'running' ORDER BY id")
            ]

    def queue_length(self) -> int:
        with self._tx(write=False) as db:
            return _queue_length(db)

    # --- status transitions --------------------------------------------------------------

    def start_job(self, id: int, runner: str, attempt: int) -> bool:
        """queued -> running on ``runner``; False if the job is not queued at that attempt."""
        with self._tx() as db:
            return self._start(db, id, runner, attempt, self.clock())

    def _start(self, db: Unit, id: int, runner: str, attempt: int, now: float,
               node: str | None = None, lease_until: float | None = None) -> bool:
        row = db.execute(
            "UPDATE jobs SET status = 'running', runner = ?, started_at = ?, node = ?, lease_until = ? "
            "WHERE id = ? AND status = 'queued' AND attempt = ? RETURNING repo, queued_at",
            (runner, now, node, lease_until, id, attempt),
        ).fetchone()
        if row is None:
            return False
        repo, queued_at = row
        _count(db, repo, JobStatus.QUEUED, -1)
        _count(db, repo, JobStatus.RUNNING, +1)
        _hist(db, repo, "wait", now - queued_at, +1)
        _status_changed(db, id, now)
        db.first_starts[runner] = now
        return True

    def finish_job(self, id: int, attempt: int, status: str | JobStatus, reason: str | None = None, *,
                   node: str | None = None) -> bool:
        """running -> a final status; False (ignored) unless running at that attempt.

        The guard is what makes late results of an older attempt, and second results,
        harmless. With ``node`` (an attempt claimed with ``claim_jobs``) the attempt must
        still be that node's, else ``LeaseLost``.
        """
        final = _status(status)
        if not final.is_final:
            raise ValueError(f"finish_job needs a final status, got {final.value!r}")
        with self._tx() as db:
            if node is not None:
                _hold(db, id, attempt, node)
            return self._finish(db, id, attempt, final, reason)

    def _finish(self, db: Unit, id: int, attempt: int, final: JobStatus, reason: str | None) -> bool:
        now = self.clock()
        row = db.execute(
            "UPDATE jobs SET status = ?, reason = ?, finished_at = ?, lease_until = NULL "
            "WHERE id = ? AND status = 'running' AND attempt = ? RETURNING repo, runner, started_at",
            (final.value, reason, now, id, attempt),
        ).fetchone()
        if row is None:
            return False
        repo, runner, started_at = row
        _count(db, repo, JobStatus.RUNNING, -1)
        _count(db, repo, final, +1)
        duration = now - started_at if started_at is not None else None
        if duration is not None:
            _hist(db, repo, "duration", duration, +1)
        if runner is not None:
            _runner_result(db, runner, final, duration or 0.0, +1)
        _status_changed(db, id, now)
        return True

    def requeue_job(self, id: int, reason: str | None = None, *, attempt: int | None = None,
                    node: str | None = None) -> Job | None:
        """running -> queued as a new attempt (its runner was lost); None if not running.

        A job whose cancellation was requested is cancelled instead of run again. With
        ``attempt`` only that attempt; with ``node`` only while the attempt is that node's
        (``LeaseLost``): a node re-queues nothing another node took over meanwhile.
        """
        with self._tx() as db:
            if node is not None:
                if attempt is None:
                    raise ValueError("requeue_job with a node needs the attempt")
                _hold(db, id, attempt, node)
            row = db.execute(
                "SELECT repo, attempt, queued_at, started_at, cancel_requested FROM jobs "
                "WHERE id = ? AND status = 'running' AND attempt = coalesce(?, attempt)" + self.backend.for_update,
                (id, attempt),
            ).fetchone()
            return None if row is None else self._requeue(db, id, row, reason)

    def _requeue(self, db: Unit, id: int, row: tuple, reason: str | None) -> Job:
        now = self.clock()
        repo, attempt, queued_at, started_at, cancel_requested = row
        if cancel_requested:
            self._finish(db, id, attempt, JobStatus.CANCELLED, "cancelled")
        else:
            db.execute(
                "UPDATE jobs SET status = 'queued', attempt = attempt + 1, reason = ?, runner = NULL, "
                "started_at = NULL, finished_at = NULL, queued_at = ?, node = NULL, lease_until = NULL "
                "WHERE id = ?",
                (reason, now, id),
            )
            _count(db, repo, JobStatus.RUNNING, -1)
            _count(db, repo, JobStatus.QUEUED, +1)
            if started_at is not None:
                _hist(db, repo, "wait", started_at - queued_at, -1)
            _status_changed(db, id, now)
        return _job(db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (id,)).fetchone())

    def cancel_job(self, id: int) -> Job:
        """queued -> cancelled now; running -> flagged for the scheduler; final -> unchanged."""
        now = self.clock()
        with self._tx() as db:
            row = db.execute("SELECT repo, status FROM jobs WHERE id = ?" + self.backend.for_update, (id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {id}")
            repo, status = row
            if status == JobStatus.QUEUED.value:
                db.execute(
                    "UPDATE jobs SET status = 'cancelled', reason = 'cancelled', finished_at = ? WHERE id = ?",
                    (now, id),
                )
                _count(db, repo, JobStatus.QUEUED, -1)
                _count(db, repo, JobStatus.CANCELLED, +1)
                _status_changed(db, id, now)
            elif status == JobStatus.RUNNING.value:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (id,))
            return _job(db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (id,)).fetchone())

    def retry_job(self, id: int) -> Job:
        """A finished job runs again as a new attempt; its old result leaves the stats."""
        now = self.clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT repo, status, runner, queued_at, started_at, finished_at FROM jobs WHERE id = ?"
                + self.backend.for_update,
                (id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no job {id}")
            repo, status, runner, queued_at, started_at, finished_at = row
            old = JobStatus(status)
            if not old.is_final:
                raise Conflict(f"job {id} is {old.value}; only a finished job can be retried")
            db.execute(
                "UPDATE jobs SET status = 'queued', attempt = attempt + 1, reason = NULL, runner = NULL, "
                "node = NULL, lease_until = NULL, "
                "cancel_requested = 0, started_at = NULL, finished_at = NULL, queued_at = ? WHERE id = ?",
                (now, id),
            )
            _count(db, repo, old, -1)
            _count(db, repo, JobStatus.QUEUED, +1)
            if started_at is not None:
                _hist(db, repo, "wait", started_at - queued_at, -1)
                duration = (finished_at - started_at) if finished_at is not None else None
                if duration is not None:
                    _hist(db, repo, "duration", duration, -1)
                if runner is not None:
                    _runner_result(db, runner, old, duration or 0.0, -1)
            _status_changed(db, id, now)
            return _job(db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (id,)).fetchone())

    def jobs_to_cancel(self) -> list[tuple[int, int]]:
        """(id, attempt) of running jobs whose cancellation was asked for."""
        with self._tx(write=False) as db:
            return [
                (i, a)
                for i, a in db.execute(
                    "SELECT id, attempt FROM jobs WHERE status = 'running' AND cancel_requested = 1 ORDER BY id"
                )
            ]

    # --- steps ---------------------------------------------------------------------------

    def plan_steps(self, job_id: int, attempt: int, names: list[str], *, node: str | None = None) -> None:
        """Record an attempt's steps as pending, so a job shows its whole plan up front; with
        ``node``, only while the attempt is that node's (``LeaseLost``)."""
        with self._tx() as db:
            if node is not None:
                _hold(db, job_id, attempt, node)
            db.executemany(
                "INSERT INTO steps (job_id, attempt, idx, name, status) VALUES (?, ?, ?, ?, 'pending') "
                "ON CONFLICT DO NOTHING",
                [(job_id, attempt, i, n) for i, n in enumerate(names)],
            )

    def start_step(self, job_id: int, attempt: int, idx: int, name: str, *, node: str | None = None) -> None:
        """A step starts (again); with ``node``, only while the attempt is that node's (``LeaseLost``)."""
        now = self.clock()
        with self._tx() as db:
            if node is not None:
                _hold(db, job_id, attempt, node)
            old = _step_status(db, job_id, attempt, idx)
            db.execute(
                "INSERT INTO steps (job_id, attempt, idx, name, status, started_at) "
                "VALUES (?, ?, ?, ?, 'running', ?) ON CONFLICT (job_id, attempt, idx) DO UPDATE SET "
                "name = excluded.name, status = 'running', started_at = excluded.started_at, "
                "exit_code = NULL, finished_at = NULL, reason = NULL",
                (job_id, attempt, idx, name, now),
            )
            if old != StepStatus.RUNNING.value:
                _step_changed(db, job_id, attempt, idx, name, StepStatus.RUNNING.value, None, now)

    def finish_step(
        self,
        job_id: int,
        attempt: int,
        idx: int,
        status: str | StepStatus,
        exit_code: int | None = None,
        name: str | None = None,
        reason: str | None = None,
        *,
        node: str | None = None,
    ) -> None:
        """Record a step's end (``reason``: why it was skipped, how it failed); with ``name`` it
        also records steps that were never planned; with ``node``, only while the attempt is
        that node's (``LeaseLost``)."""
        now = self.clock()
        value = StepStatus(status).value
        with self._tx() as db:
            if node is not None:
                _hold(db, job_id, attempt, node)
            row = db.execute("SELECT status, name FROM steps WHERE job_id = ? AND attempt = ? AND idx = ?"
                             + self.backend.for_update, (job_id, attempt, idx)).fetchone()
            if row is not None:
                old, name = row
                db.execute(
                    "UPDATE steps SET status = ?, exit_code = ?, finished_at = ?, reason = ? "
                    "WHERE job_id = ? AND attempt = ? AND idx = ?",
                    (value, exit_code, now, reason, job_id, attempt, idx),
                )
            elif name is not None:
                old = None
                db.execute(
                    "INSERT INTO steps (job_id, attempt, idx, name, status, exit_code, finished_at, reason) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, attempt, idx, name, value, exit_code, now, reason),
                )
            else:
                return
            if old != value and value != StepStatus.PENDING.value:
                _step_changed(db, job_id, attempt, idx, name, value, exit_code, now)

    def changed_files(self, job_id: int) -> tuple[str, ...] | None:
        """The files the job's commit changed, as kept at submission; None when not known or not kept."""
        with self._tx(write=False) as db:
            row = db.execute("SELECT changed FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        return tuple(json.loads(row[0]))

    # --- logs ----------------------------------------------------------------------------

    def append_log(self, job_id: int, attempt: int, lines: list[str],
                   kind: str | LogKind = LogKind.STEP, *, node: str | None = None) -> int:
        """Store lines of one ``kind`` as one row; returns the first one's number (1-based, per job).

        Numbers run on across attempts and kinds, so a follower's ``Last-Event-ID`` stays
        valid. A line holding newlines counts as several lines. With ``node``, only while the
        attempt is that node's (``LeaseLost``): a node that was cut off writes nothing into a
        job another node took over.
        """
        kind = LogKind(kind).value
        with self._tx(write=bool(lines) or node is not None) as db:
            if node is not None:
                _hold(db, job_id, attempt, node)  # takes the job's row too
            first = self._append(db, job_id, attempt, lines, kind, self.clock(), locked=node is not None)
            if lines:
                self.backend.announce(db.tx, log_only=True)
            return first

    def append_logs(self, batches: Sequence[LogBatch], *, node: str | None = None) -> list[LeaseLost]:
        """Several ``append_log`` calls in one transaction (one commit, one announcement): how the
        dispatcher writes what its running jobs printed meanwhile. Each job's batches keep their
        order. With ``node``, a batch whose attempt is no longer that node's is left out, and its
        ``LeaseLost`` is in the answer; the others are stored all the same."""
        lost: dict[tuple[int, int], LeaseLost] = {}
        held: set[tuple[int, int]] = set()
        now = self.clock()
        # job by job (a stable sort keeps each job's order): rows locked in one order by every writer
        ordered = sorted((b for b in batches if b.lines), key=lambda b: b.job_id)
        if not ordered:
            return []
        with self._tx() as db:
            for batch in ordered:
                key = (batch.job_id, batch.attempt)
                if key in lost:
                    continue
                if node is not None and key not in held:
                    try:
                        _hold(db, batch.job_id, batch.attempt, node)
                    except LeaseLost as exc:
                        lost[key] = exc
                        continue
                    held.add(key)
                self._append(db, batch.job_id, batch.attempt, batch.lines, LogKind(batch.kind).value, now,
                             locked=node is not None)
            if len(lost) < len({(b.job_id, b.attempt) for b in ordered}):
                self.backend.announce(db.tx, log_only=True)
        return list(lost.values())

    def _append(self, db: Unit, job_id: int, attempt: int, lines: list[str], kind: str, at: float,
                locked: bool) -> int:
        """One row of log lines, numbered on from the job's last; the first one's number."""
        text = "\n".join(lines)
        n_lines = text.count("\n") + 1  # counted once: a pass over every byte of the batch
        if n_lines != len(lines) or text.endswith("\n"):  # rare: newlines inside
            text = "\n".join(line[:-1] if line.endswith("\n") else line for line in lines)
            n_lines = text.count("\n") + 1
        if lines and not locked and self.backend.for_update:  # appenders to one job take turns
            db.execute("SELECT id FROM jobs WHERE id = ?" + self.backend.for_update, (job_id,))
        first = _next_line(db, job_id)
        if lines:
            db.execute(
                "INSERT INTO log (job_id, attempt, first_line, n_lines, data, kind, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, attempt, first, n_lines, self.backend.log_value(text), kind, at),
            )
        return first

    def log_times(self, job_id: int, after: int = 0, limit: int = 10000) -> list[tuple[int, int, float | None]]:
        """When the log's lines numbered above ``after`` were written: (first line, lines, epoch
        seconds) per run of lines written together, up to ``limit`` runs. Runs written before
        narwhal kept times have None."""
        with self._tx(write=False) as db:
            rows = db.execute(
                "SELECT first_line, n_lines, at FROM log WHERE job_id = ? AND first_line + n_lines - 1 > ? "
                "ORDER BY first_line LIMIT ?", (job_id, int(after), max(0, int(limit))))
            return [(int(first), int(n), None if at is None else float(at)) for first, n, at in rows]

    def read_log(self, job_id: int, after: int = 0, limit: int = 10000) -> list[tuple[int, str]]:
        """Up to ``limit`` (number, text) lines numbered above ``after``, of either kind."""
        return [(n, text) for first, lines, _ in self.read_log_blocks(job_id, after, limit)
                for n, text in enumerate(lines, start=first)]

    def read_log_blocks(self, job_id: int, after: int = 0,
                        limit: int = 10000) -> list[tuple[int, list[str], LogKind]]:
        """The same lines as ``read_log``, as (first number, lines, kind) runs: no tuple per line."""
        out: list[tuple[int, list[str], LogKind]] = []
        limit = max(0, int(limit))
        if limit == 0:
            return out
        with self._tx(write=False) as db:
            rows = db.execute(
                "SELECT first_line, data, kind FROM log WHERE job_id = ? AND first_line >= "
                "(SELECT coalesce(max(first_line), 0) FROM log WHERE job_id = ? AND first_line <= ?) "
                "ORDER BY first_line",
                (job_id, job_id, int(after) + 1),
            )
            for first, data, kind in rows:
                lines = self.backend.log_text(data).split("\n")
                if first <= after:  # the row holding line `after`: start just past it
                    lines, first = lines[after + 1 - first:], after + 1
                if not lines:
                    continue
                lines = lines[:limit]
                out.append((first, lines, LogKind(kind)))
                limit -= len(lines)
                if limit == 0:
                    break
        return out

    def log_line_count(self, job_id: int) -> int:
        with self._tx(write=False) as db:
            return _next_line(db, job_id) - 1

    # --- runners added over the API, and runner state ------------------------------------

    # --- artifacts (SQL in ARTIFACT_SQL) -----------------------------------------------

    def add_artifacts(self, job_id: int, attempt: int, files: Sequence[tuple[str, str, int]],
                      expires_at: float, *, node: str | None = None) -> None:
        """The files (path, sha256, size) an attempt collected become the job's artifacts,
        replacing an earlier attempt's; with ``node``, only while the attempt is that node's
        (``LeaseLost``): a node cut off meanwhile replaces nothing of the attempt that took over."""
        now = self.clock()
        with self._tx() as db:
            if node is not None:
                _hold(db, job_id, attempt, node)
            db.execute(ARTIFACT_SQL["forget_job"], (job_id,))
            db.executemany(ARTIFACT_SQL["insert"], [(job_id, path, attempt, sha, size, now, expires_at)
                                                    for path, sha, size in files])

    def artifacts(self, job_id: int, limit: int = 100_000) -> list[dict]:
        """A job's artifacts by path: ``path size sha256 created_at expires_at``."""
        with self._tx(write=False) as db:
            rows = db.execute(ARTIFACT_SQL["list"], (job_id, limit)).fetchall()
        return [_artifact(row) for row in rows]

    def artifact(self, job_id: int, path: str) -> dict | None:
        with self._tx(write=False) as db:
            row = db.execute(ARTIFACT_SQL["one"], (job_id, path)).fetchone()
        return _artifact(row) if row else None

    def live_artifact_objects(self, now: float) -> set[str]:
        """The objects (sha256) an artifact that has not expired by ``now`` names."""
        with self._tx(write=False) as db:
            return {sha for (sha,) in db.execute(ARTIFACT_SQL["live_objects"], (now,))}

    def prune_artifacts(self, before: float) -> int:
        """Forget artifacts that expired before ``before``; how many."""
        with self._tx() as db:
            return db.execute(ARTIFACT_SQL["prune"], (before,)).rowcount

    # --- browser sessions (SQL in SESSION_SQL; narwhal.api.session hashes and derives) ----

    def session_secret(self) -> str:
        """The key every node derives CSRF tokens with (hex): made by the first node that asks,
        then the same for every node and across restarts."""
        with self._tx() as db:
            return _session_secret(db)

    def add_session(self, key: str, created: float, expires: float, keep: int) -> None:
        """A signed-in browser (``key``: the sha256 of its id, hex). Expired sessions go, and past
        ``keep`` the oldest: under the secret's row lock, so nodes signing people in at once
        never leave more than ``keep``."""
        with self._tx() as db:
            _add_session(db, key, created, expires, keep)

    def session_alive(self, key: str, now: float) -> bool:
        """Whether the session ``key`` exists and has not expired by ``now`` (a read, never a write)."""
        with self._tx(write=False) as db:
            return db.execute(SESSION_SQL["alive"], (key, now)).fetchone() is not None

    def end_session(self, key: str) -> None:
        with self._tx() as db:
            db.execute(SESSION_SQL["end"], (key,))

    def add_runner(self, config: dict) -> dict:
        """Remember a runner registered over the API (its inventory fields as JSON)."""
        name = config.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("runner needs a name")
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO runners (name, config, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (name, json.dumps(config, sort_keys=True), self.clock()),
            )
            if cur.rowcount == 0:
                raise Conflict(f"runner {name!r} already exists")
        return dict(config)

    def remove_runner(self, name: str) -> bool:
        """Forget an api runner and its state; False if there was none."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM runners WHERE name = ?", (name,))
            db.execute("DELETE FROM runner_state WHERE name = ?", (name,))
            return cur.rowcount > 0

    def api_runners(self) -> list[dict]:
        with self._tx(write=False) as db:
            return [json.loads(c) for (c,) in db.execute("SELECT config FROM runners ORDER BY created_at, name")]

    def set_runner_state(self, name: str, draining: bool) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO runner_state (name, draining) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET draining = excluded.draining",
                (name, int(bool(draining))),
            )

    def runner_states(self) -> dict[str, dict]:
        with self._tx(write=False) as db:
            return {n: {"draining": bool(d)} for n, d in db.execute("SELECT name, draining FROM runner_state")}

    # --- the commit-status outbox (rows are added by _status_changed) --------------------

    def outbox_heads(self, limit: int = 200) -> list[OutboxRow]:
        """The oldest undelivered row of each (forge, repo, commit, context), soonest due
        first: only a key's head may be sent, so a newer state never goes before an older one."""
        with self._tx(write=False) as db:
            rows = db.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id IN (SELECT min(id) FROM outbox "
                f"{self.backend.indexed_by('outbox_pending')} "
                f'WHERE {_PENDING} GROUP BY forge, repo, "commit", context) '
                "ORDER BY next_at, id LIMIT ?",
                (max(0, int(limit)),),
            ).fetchall()
        return [OutboxRow(*row) for row in rows]

    def outbox_claim(self, id: int, now: float, until: float) -> bool:
        """Take pending row ``id`` for one send: due at ``now``, it is not due again before ``until``
        (a send's end sets its fate sooner). False when it is not due: another dispatcher of the
        cluster took it, or it was settled meanwhile. One conditional update: two takers, one wins."""
        with self._tx() as db:
            return db.execute(f"UPDATE outbox SET next_at = ? WHERE id = ? AND next_at <= ? AND {_PENDING}",
                              (until, id, now)).rowcount == 1

    def outbox_delivered(self, id: int) -> bool:
        """The forge took row ``id``; False if it was no longer pending."""
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE outbox SET delivered_at = ?, attempts = attempts + 1 WHERE id = ? AND {_PENDING}",
                (self.clock(), id),
            )
            return cur.rowcount == 1

    def outbox_retry(self, id: int, error: str, next_at: float) -> bool:
        """A send of row ``id`` failed in a way that may pass: try again at ``next_at``."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, error_at = ?, next_at = ? "
                f"WHERE id = ? AND {_PENDING}",
                (error, self.clock(), next_at, id),
            )
            return cur.rowcount == 1

    def outbox_failed(self, id: int, error: str, attempted: bool = True) -> bool:
        """Row ``id`` is given up with ``error`` (``attempted``: after a send, which counts);
        the next row of its key may go."""
        now = self.clock()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE outbox SET failed_at = ?, last_error = ?, error_at = ?, attempts = attempts + ? "
                f"WHERE id = ? AND {_PENDING}",
                (now, error, now, int(bool(attempted)), id),
            )
            return cur.rowcount == 1

    def outbox_summary(self) -> dict[str, dict]:
        """Per forge name in the outbox: ``pending``, ``delivered`` and ``failed`` counts,
        ``last_delivered_at``, and the ``last_error`` with its time ``last_error_at``."""
        out: dict[str, dict] = {}
        with self._tx(write=False) as db:
            for forge, pending, delivered, failed, last in db.execute(
                f"SELECT forge, count(*) FILTER (WHERE {_PENDING}), count(*) FILTER (WHERE delivered_at IS NOT NULL), "
                "count(*) FILTER (WHERE failed_at IS NOT NULL), max(delivered_at) FROM outbox "
                f"{self.backend.indexed_by('outbox_forge')} GROUP BY forge ORDER BY forge"
            ):
                error = db.execute(
                    f"SELECT last_error, error_at FROM outbox {self.backend.indexed_by('outbox_errors')} "
                    "WHERE forge = ? AND error_at IS NOT NULL ORDER BY error_at DESC, id DESC LIMIT 1",
                    (forge,),
                ).fetchone()
                out[forge] = {"pending": pending, "delivered": delivered, "failed": failed,
                              "last_delivered_at": last, "last_error": error[0] if error else None,
                              "last_error_at": error[1] if error else None}
        return out
    # --- schedules -----------------------------------------------------------------------

    def last_tick(self, pipeline: str) -> float | None:
        """Up to when ``pipeline``'s schedule is done (epoch seconds); None if never seen."""
        with self._tx(write=False) as db:
            row = db.execute("SELECT last_tick FROM schedules WHERE pipeline = ?", (pipeline,)).fetchone()
            return None if row is None else float(row[0])

    def record_tick(self, pipeline: str, at: float) -> float:
        """Remember that ``pipeline``'s schedule is done up to ``at``; never moves back (a clock
        that jumps back must not build a tick twice). Returns the stored value."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO schedules (pipeline, last_tick) VALUES (?, ?) "
                "ON CONFLICT (pipeline) DO UPDATE SET last_tick = CASE WHEN excluded.last_tick > schedules.last_tick "
                "THEN excluded.last_tick ELSE schedules.last_tick END",
                (pipeline, float(at)),
            )
            return float(db.execute("SELECT last_tick FROM schedules WHERE pipeline = ?", (pipeline,)).fetchone()[0])

    # --- stats ---------------------------------------------------------------------------

    def stats(self) -> dict:
        """The ``GET /stats`` body, read from the aggregate tables only.

        Medians and p95s come from log-spaced histograms and report the upper bound of
        the bucket holding the percentile: approximate, at most ~9% high. Percentages
        are over finished jobs (``None`` while a repo or runner has none).
        ``utilisation`` is ``busy_seconds / (now - first start on that runner)``,
        ignoring capacity: a rough "how much of its life was it working".
        """
        now = self.clock()
        with self._tx(write=False) as db:
            counts: dict[str, dict[str, int]] = {}
            for repo, status, count in db.execute("SELECT repo, status, count FROM repo_stats ORDER BY repo"):
                counts.setdefault(repo, dict.fromkeys(_STATUSES, 0))[status] = count
            hists: dict[tuple[str, str], list[tuple[int, int]]] = {}
            for repo, kind, bucket, count in db.execute(
                "SELECT repo, kind, bucket, count FROM repo_hist ORDER BY repo, kind, bucket"
            ):
                hists.setdefault((repo, kind), []).append((bucket, count))
            runners = db.execute(
                "SELECT runner, jobs, passed, failed, busy_seconds, first_started_at FROM runner_stats ORDER BY runner"
            ).fetchall()
            running = dict(
                db.execute("SELECT runner, count(*) FROM jobs WHERE status = 'running' GROUP BY runner").fetchall()
            )
        repos = []
        for repo, c in counts.items():
            total = sum(c.values())
            if total == 0:
                continue
            finished = sum(c[s.value] for s in FINAL_STATUSES)
            entry: dict[str, Any] = {"repo": repo, "total": total, **c}
            entry["pct_passed"] = _pct(c["passed"], finished)
            entry["pct_failed"] = _pct(c["failed"], finished)
            for kind in ("duration", "wait"):
                h = hists.get((repo, kind), [])
                entry[kind] = {"median": percentile(h, 0.5), "p95": percentile(h, 0.95)}
            repos.append(entry)
        out_runners = []
        for name, jobs, passed, failed, busy, first in runners:
            window = now - first if first is not None else 0.0
            out_runners.append(
                {
                    "name": name,
                    "jobs": jobs,
                    "passed": passed,
                    "failed": failed,
                    "pct_passed": _pct(passed, jobs),
                    "busy_seconds": round(busy, 3),
                    "utilisation": round(min(1.0, busy / window), 3) if window > 0 else None,
                    "running": running.get(name, 0),
                }
            )
        queue_length = sum(c["queued"] for c in counts.values())
        return {"repos": repos, "runners": out_runners, "queue": {"length": queue_length}}

    def rebuild_stats(self) -> None:
        """Recompute every aggregate from the jobs table (after bulk loads or repairs)."""
        with self._tx() as db:
            _rebuild(db)

    def bulk_insert_jobs(self, rows: Iterable[dict]) -> int:
        """Insert many jobs in one transaction (benchmark pre-fill), then rebuild the stats.

        Each row is a dict with ``pipeline``, ``repo``, ``commit`` and optionally
        ``branch``, ``status``, ``runner``, ``attempt``, ``reason``, ``created_at``,
        ``queued_at``, ``started_at``, ``finished_at`` (epoch seconds; missing times
        default to now). Their commits are recorded too. Returns the number inserted.
        """
        now = self.clock()
        columns = list(_BULK_DEFAULTS)

        def normalised() -> Iterator[dict]:
            for row in rows:
                unknown = set(row) - set(columns)
                if unknown:
                    raise ValueError(f"bulk_insert_jobs: unknown columns {sorted(unknown)}")
                r = {**_BULK_DEFAULTS, **row}
                r["status"] = _status(r["status"]).value
                if r["created_at"] is None:
                    r["created_at"] = now
                if r["queued_at"] is None:
                    r["queued_at"] = r["created_at"]
                yield r

        with self._tx() as db:
            inserted = self.backend.bulk_insert_jobs(db.tx, columns, normalised())
            db.execute(
                'INSERT INTO commits (repo, "commit", branch, created_at) '
                'SELECT repo, "commit", min(branch), min(created_at) FROM jobs WHERE true GROUP BY repo, "commit" '
                "ORDER BY min(id) ON CONFLICT DO NOTHING"
            )
            _rebuild(db)
        return inserted


    # --- nodes, claims and leases: several dispatchers on one database (narwhal.dispatch.nodes) ---

    NODES_KEPT = 86400.0  # seconds a node that stopped beating stays listed

    def _shared_now(self, db: Unit) -> float:
        """Now, for a time another dispatcher will compare with its own now: the database's clock
        (PostgreSQL), so a node whose host clock is off neither hands out leases the others see as
        run out nor takes over theirs early; the store's clock on SQLite, or when one was given."""
        if not self._given_clock:
            now = self.backend.now(db.tx)
            if now is not None:
                return now
        return self.clock()

    def database_time(self) -> float:
        """``_shared_now`` on its own (``Node`` compares it with its host's clock and warns)."""
        with self._tx(write=False) as db:
            return self._shared_now(db)

    def register_node(self, id: str, host: str, pid: int, config: str | None = None) -> None:
        """A dispatcher joins (or rejoins) under ``id``; ``config``: its ``Config.fingerprint``."""
        with self._tx() as db:
            now = self._shared_now(db)
            # every start is a node of its own: those silent for a day are forgotten
            db.execute("DELETE FROM nodes WHERE heartbeat_at < ?", (now - self.NODES_KEPT,))
            db.execute("INSERT INTO nodes (id, host, pid, started_at, heartbeat_at, config) VALUES (?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
                       "heartbeat_at = excluded.heartbeat_at, stopped_at = NULL, config = excluded.config",
                       (id, host, pid, now, now, config))

    def set_node_config(self, id: str, config: str | None) -> None:
        """Node ``id`` reloaded its config (``Config.fingerprint``)."""
        with self._tx() as db:
            db.execute("UPDATE nodes SET config = ? WHERE id = ?", (config, id))

    def heartbeat(self, id: str, lease: float, held: Iterable[tuple[int, int]] = ()) -> bool:
        """Node ``id`` is alive: its beat moves on, and so do the leases of ``held``, the (job,
        attempt) it still works on, and of their runner slots (to now + ``lease``). False if the
        node is unknown or was stopped.

        Only those: an attempt the node claimed and no longer works on (its run ended without
        its outcome stored: the database was away just then) is not kept alive by the node's
        beat, so its lease runs out and a node takes it over, as if its node were gone. A
        beat renews nothing the node lost either: the rows must still name it."""
        attempts = sorted({(int(job), int(attempt)) for job, attempt in held})  # rows locked in one order
        with self._tx() as db:
            now = self._shared_now(db)
            if db.execute("UPDATE nodes SET heartbeat_at = ? WHERE id = ? AND stopped_at IS NULL",
                          (now, id)).rowcount != 1:
                return False
            if attempts:
                db.executemany("UPDATE jobs SET lease_until = ? WHERE id = ? AND attempt = ? AND node = ? "
                               "AND status = 'running'", [(now + lease, job, attempt, id) for job, attempt in attempts])
                db.executemany("UPDATE slots SET lease_until = ? WHERE node = ? AND job_id = ?",
                               [(now + lease, id, job) for job in sorted({job for job, _ in attempts})])
            return True

    def node_stopped(self, id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE nodes SET stopped_at = ? WHERE id = ?", (self._shared_now(db), id))

    def nodes(self, stale_after: float) -> list[dict]:
        """Every node known, newest first; ``alive``: beating within ``stale_after`` seconds and not stopped."""
        with self._tx(write=False) as db:
            now = self._shared_now(db)
            rows = db.execute("SELECT id, host, pid, started_at, heartbeat_at, stopped_at, config FROM nodes "
                              "ORDER BY started_at DESC, id").fetchall()
            running = dict(db.execute("SELECT node, count(*) FROM jobs WHERE status = 'running' "
                                      "AND node IS NOT NULL GROUP BY node").fetchall())
        return [{"id": i, "host": h, "pid": p, "started_at": s, "heartbeat_at": b, "stopped_at": x,
                 "alive": x is None and now - b <= stale_after, "running": running.get(i, 0), "config": c}
                for i, h, p, s, b, x, c in rows]

    def claim_jobs(self, node: str, choose: Callable[[Job], str | None], lease: float, limit: int = 10) -> list[Job]:
        """Node ``node`` takes jobs: of ``limit`` queued ones, each that ``choose`` gives a runner
        starts on it (queued -> running) as that node's attempt, leased for ``lease`` seconds
        (``heartbeat`` renews it); the others stay queued. The candidates are fair across
        repositories, as a lone dispatcher's pickup is: each repository's oldest job first,
        then each one's second, and so on, oldest first within a round, so a repository with a
        thousand jobs queued does not hold up another's one. On PostgreSQL the candidates are
        then locked ``FOR NO KEY UPDATE SKIP LOCKED``: nodes claiming at once take different
        jobs and never wait on each other; ``choose`` runs inside the transaction, so keep it quick."""
        claimed: list[Job] = []
        with self._tx() as db:
            now = self._shared_now(db)
            limit = max(0, int(limit))
            order = self._claim_order(db, limit * _CLAIM_WINDOW)
            ranked = {job_id: rank for rank, job_id in enumerate(order)}
            held: dict[int, tuple] = {}
            while order and len(held) < limit:  # lock no more than it considers: the rest are others' to take
                batch, order = order[:limit - len(held)], order[limit - len(held):]
                marks = ", ".join("?" for _ in batch)
                held.update((row[0], row) for row in db.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'queued' AND id IN ({marks})"
                    + self.backend.skip_locked, batch).fetchall())
            for job in sorted(map(_job, held.values()), key=lambda j: ranked[j.id]):
                runner = choose(job)
                if runner is not None and self._start(db, job.id, runner, job.attempt, now, node, now + lease):
                    claimed.append(_job(db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?",
                                                   (job.id,)).fetchone()))
        return claimed

    def _claim_order(self, db: Unit, window: int) -> list[int]:
        """The first ``window`` queued job ids in claim order: by round (each repository's oldest,
        then each one's second, ...), then by age. Read per repository from its queue index
        (jobs_queued_repo): each one's first ``window`` jobs, or its first alone when there are
        ``window`` repositories or more (round one fills the window then); so a claim costs the
        repositories with queued jobs, not the queue: 100,000 jobs queued in 50 repositories,
        4 ms instead of 170-300 ms on PostgreSQL (docs/benchmarks.md). With more than
        ``_CLAIM_REPOS`` of them, the whole queue is ranked at once, which is cheaper there."""
        hint = self.backend.indexed_by("jobs_queued_repo")
        repos = ("WITH RECURSIVE repos (repo, n) AS ("
                 f"SELECT min(repo), 1 FROM jobs {hint} WHERE status = 'queued' "
                 f"UNION ALL SELECT (SELECT min(k.repo) FROM jobs k {hint} WHERE k.status = 'queued' "
                 "AND k.repo > repos.repo), n + 1 FROM repos WHERE repos.repo IS NOT NULL AND n <= ?) ")
        count = int(db.execute(repos + "SELECT count(repo) FROM repos", (_CLAIM_REPOS,)).fetchone()[0])
        if count > _CLAIM_REPOS:
            return [int(i) for (i,) in db.execute(
                "SELECT id FROM (SELECT id, queued_at, ROW_NUMBER() OVER (PARTITION BY repo ORDER BY queued_at, id) "
                f"AS round FROM jobs {hint} WHERE status = 'queued') AS queue "  # in partition order: no sort
                "ORDER BY round, queued_at, id LIMIT ?", (window,))]
        return [int(i) for (i,) in db.execute(
            repos + "SELECT id FROM (SELECT j.id, j.queued_at, ROW_NUMBER() OVER (PARTITION BY repos.repo "
            f"ORDER BY j.queued_at, j.id) AS round FROM repos {self.backend.repo_queue} "
            "WHERE repos.repo IS NOT NULL) AS queue ORDER BY round, queued_at, id LIMIT ?",
            (_CLAIM_REPOS, 1 if count >= window else window, window))]

    def acquire_slot(self, runner: str, capacity: int, node: str, job_id: int, lease: float) -> int | None:
        """One of ``runner``'s ``capacity`` slots for ``node``'s job, leased for ``lease`` seconds
        (``heartbeat`` renews it); None when every one is held. A runner's capacity holds across
        every dispatcher on the database: a slot is a row, taken by one atomic upsert that only
        succeeds on a free or expired row, so two nodes racing for the last slot get it once."""
        with self._tx() as db:
            now = self._shared_now(db)
            held = {slot for (slot,) in db.execute("SELECT slot FROM slots WHERE runner = ? AND lease_until >= ?",
                                                   (runner, now))}
            if len(held) >= capacity:  # also after the capacity shrank below what is held
                return None
            for slot in (s for s in range(capacity) if s not in held):
                row = db.execute(
                    "INSERT INTO slots (runner, slot, node, job_id, lease_until) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (runner, slot) DO UPDATE SET node = excluded.node, job_id = excluded.job_id, "
                    "lease_until = excluded.lease_until WHERE slots.lease_until < ? RETURNING slot",
                    (runner, slot, node, job_id, now + lease, now)).fetchone()
                if row is not None:
                    return int(row[0])
        return None

    def release_slot(self, runner: str, slot: int, node: str, job_id: int) -> bool:
        """Give a slot back; False if it was no longer this node's for this job (it expired and was taken)."""
        with self._tx() as db:
            return db.execute("DELETE FROM slots WHERE runner = ? AND slot = ? AND node = ? AND job_id = ?",
                              (runner, slot, node, job_id)).rowcount == 1

    def slots_held(self, runner: str) -> list[tuple[int, str, int]]:
        """(slot, node, job id) of ``runner``'s slots whose lease holds."""
        with self._tx(write=False) as db:
            return [(int(s), n, int(j)) for s, n, j in db.execute(
                "SELECT slot, node, job_id FROM slots WHERE runner = ? AND lease_until >= ? ORDER BY slot",
                (runner, self._shared_now(db)))]

    def lease_of(self, id: int) -> tuple[str | None, int, float | None] | None:
        """(node, attempt, lease_until) of a job; None if there is no such job."""
        with self._tx(write=False) as db:
            row = db.execute("SELECT node, attempt, lease_until FROM jobs WHERE id = ?", (id,)).fetchone()
        return None if row is None else (row[0], int(row[1]), row[2])

    def expired_attempts(self) -> list[tuple[int, int, str]]:
        """(id, attempt, node) of running attempts whose lease ran out: their node stopped beating."""
        with self._tx(write=False) as db:
            return [(int(i), int(a), n) for i, a, n in db.execute(
                "SELECT id, attempt, node FROM jobs WHERE status = 'running' AND lease_until < ? ORDER BY id",
                (self._shared_now(db),))]

    def orphaned_attempts(self) -> list[tuple[int, int]]:
        """(id, attempt) of running attempts no node claimed: a dispatcher without ``settings.cluster``
        ran them, and it is gone (the cluster's nodes share the hold it needs)."""
        with self._tx(write=False) as db:
            return [(int(i), int(a)) for i, a in db.execute(
                "SELECT id, attempt FROM jobs WHERE status = 'running' AND node IS NULL ORDER BY id")]

    def take_orphan(self, id: int, attempt: int, reason: str, *, max_attempts: int | None = None) -> Job | None:
        """Re-queue an orphaned attempt (``orphaned_attempts``), or end it as an error when it was
        attempt ``max_attempts``; None if it is no longer one."""
        with self._tx() as db:
            row = db.execute(
                "SELECT repo, attempt, queued_at, started_at, cancel_requested FROM jobs "
                "WHERE id = ? AND status = 'running' AND attempt = ? AND node IS NULL" + self.backend.for_update,
                (id, attempt)).fetchone()
            return None if row is None else self._requeue_or_end(db, id, row, reason, max_attempts)

    def running_attempts(self, ids: Iterable[int]) -> set[tuple[int, int]]:
        """Of jobs ``ids``, (id, attempt) of those running now (whichever node runs them)."""
        wanted = sorted({int(i) for i in ids})
        found: set[tuple[int, int]] = set()
        with self._tx(write=False) as db:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                marks = ", ".join("?" for _ in chunk)
                found.update((int(i), int(a)) for i, a in db.execute(
                    f"SELECT id, attempt FROM jobs WHERE status = 'running' AND id IN ({marks})", chunk))
        return found

    def take_over(self, id: int, attempt: int, reason: str, *, max_attempts: int | None = None) -> Job | None:
        """Re-queue attempt ``attempt`` of job ``id`` as a new attempt, if its lease ran out (its node
        died or was cut off), or end it as an error when it was attempt ``max_attempts`` (a job
        that keeps taking its dispatcher down does not go round the cluster for ever); None if
        the job is no longer running at that attempt or its node renewed the lease meanwhile.
        The old node's later writes at that attempt are refused."""
        with self._tx() as db:
            row = db.execute(
                "SELECT repo, attempt, queued_at, started_at, cancel_requested FROM jobs "
                "WHERE id = ? AND status = 'running' AND attempt = ? AND lease_until < ?" + self.backend.for_update,
                (id, attempt, self._shared_now(db))).fetchone()
            return None if row is None else self._requeue_or_end(db, id, row, reason, max_attempts)

    def _requeue_or_end(self, db: Unit, id: int, row: tuple, reason: str, max_attempts: int | None) -> Job:
        _repo, attempt, _queued_at, _started_at, cancel_requested = row
        if max_attempts is None or attempt < max_attempts or cancel_requested:
            return self._requeue(db, id, row, reason)
        self._finish(db, id, attempt, JobStatus.ERROR, reason)
        return _job(db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (id,)).fetchone())

    # --- the event log (narwhal.dispatch.events reads it) --------------------------------

    def add_event(self, kind: str, data: dict, *, runner: str | None = None, job_id: int | None = None) -> int:
        """Append one event (runner health: the store writes job events itself); its id."""
        with self._tx() as db:
            return _add_event(db, self.clock(), kind, data, job_id=job_id, runner=runner)


# --- helpers shared by the transactions ------------------------------------------------

# claim_jobs reads this many times its limit of candidates, so that a claimer whose first
# candidates another node holds (SKIP LOCKED) still finds the next ones
_CLAIM_WINDOW = 4
# claim_jobs reads each repository's queue apart up to this many repositories with queued jobs
# (an index seek or two each); past it, ranking the whole queue in one sort is cheaper
_CLAIM_REPOS = 1000



def _meta(db: Unit, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def _session_secret(db: Unit, lock: bool = False) -> str:
    """The CSRF key, made here if the store has none (the first of nodes racing wins); ``lock``:
    its row stays locked until the transaction ends (what serialises sign-ins across nodes)."""
    db.execute(SESSION_SQL["secret"], (SESSION_SECRET, secrets.token_hex(32)))
    row = db.execute("SELECT value FROM meta WHERE key = ?" + (db.backend.for_update if lock else ""),
                     (SESSION_SECRET,)).fetchone()
    return str(row[0])


def _add_session(db: Unit, key: str, created: float, expires: float, keep: int) -> None:
    _session_secret(db, lock=True)
    db.execute(SESSION_SQL["insert"], (key, created, expires))
    db.execute(SESSION_SQL["sweep"], (created,))
    if int(db.execute(SESSION_SQL["count"]).fetchone()[0]) > keep:
        db.execute(SESSION_SQL["cap"], (keep,))


def _changed_json(files: Sequence[str] | None) -> str | None:
    return None if files is None else json.dumps(list(files))


def _artifact(row: tuple) -> dict:
    path, size, sha, created, expires = row
    return {"path": path, "size": size, "sha256": sha, "created_at": created, "expires_at": expires}


def _status(value: str | JobStatus) -> JobStatus:
    try:
        return JobStatus(value)
    except ValueError:
        raise BadRequest(f"unknown job status {value!r}; expected one of {', '.join(_STATUSES)}") from None


def _job(row: tuple) -> Job:
    (id, pipeline, repo, commit, branch, status, runner, attempt, reason,
     _cancel_requested, created_at, _queued_at, started_at, finished_at, event,
     ref, pr, source_repo, author, subject, forge) = row
    return Job(
        id=id,
        pipeline=pipeline,
        repo=repo,
        commit=commit,
        branch=branch,
        status=JobStatus(status),
        event=event,
        ref=ref,
        pr=pr,
        source_repo=source_repo,
        author=author,
        subject=subject,
        forge=forge,
        runner=runner,
        attempt=attempt,
        reason=reason,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
    )


def _add_event(db: Unit, at: float, kind: str, data: dict, *, job_id: int | None = None,
               runner: str | None = None) -> int:
    """One event, its id rising in commit order; every ``PRUNE_EVERY``-th drops those past ``EVENTS_KEPT``."""
    db.backend.lock_events(db.tx)
    db.backend.announce(db.tx)
    [id] = db.execute("INSERT INTO events (at, kind, job_id, runner, data) VALUES (?, ?, ?, ?, ?) RETURNING id",
                      (at, kind, job_id, runner, json.dumps(data, separators=(",", ":")))).fetchone()
    if id % PRUNE_EVERY == 0:
        db.execute("DELETE FROM events WHERE id <= ?", (id - EVENTS_KEPT,))
    return int(id)


def _status_changed(db: Unit, job: Job | int, now: float) -> None:
    """In the transaction of a job's state change: its event, and its commit status joins the
    outbox if a forge hears about this job. Skipped jobs send nothing (peers do not report them)."""
    if isinstance(job, int):
        job = _job(db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job,)).fetchone())
    data = {"id": job.id, "pipeline": job.pipeline, "repo": job.repo, "branch": job.branch, "commit": job.commit,
            "event": job.event, "status": job.status.value, "reason": job.reason, "runner": job.runner,
            "attempt": job.attempt, "created_at": job.created_at, "started_at": job.started_at,
            "finished_at": job.finished_at}
    _add_event(db, now, _JOB_EVENT.get(job.status, "job.finished"), data, job_id=job.id)
    if job.forge is None or job.status is JobStatus.SKIPPED:
        return
    db.execute(
        'INSERT INTO outbox (job_id, forge, repo, "commit", context, state, description, created_at, next_at) '
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (job.id, job.forge, job.repo, job.commit, f"narwhal/{job.pipeline}", job.status.value,
         job.summary(), now, now),
    )


class LeaseLost(Conflict):
    """A node wrote into an attempt it no longer holds: another node took the job over, or it ended."""

    def __init__(self, message: str, job_id: int = 0, attempt: int = 0):
        super().__init__(message)
        self.job_id = job_id
        self.attempt = attempt


def _hold(db: Unit, job_id: int, attempt: int, node: str) -> None:
    """The attempt is still ``node``'s (running, that attempt, that node), its row locked for the
    transaction; else ``LeaseLost``. The fence that keeps a paused or cut-off node out of a job
    another node took over: take_over moved the attempt on, so the old one no longer matches."""
    row = db.execute("SELECT id FROM jobs WHERE id = ? AND attempt = ? AND status = 'running' AND node = ?"
                     + db.backend.for_update, (job_id, attempt, node)).fetchone()
    if row is None:
        raise LeaseLost(f"job {job_id}: attempt {attempt} is no longer held by node {node[-8:]}", job_id, attempt)


def _step_status(db: Unit, job_id: int, attempt: int, idx: int) -> str | None:
    row = db.execute("SELECT status FROM steps WHERE job_id = ? AND attempt = ? AND idx = ?" + db.backend.for_update,
                     (job_id, attempt, idx)).fetchone()
    return row[0] if row else None


def _step_changed(db: Unit, job_id: int, attempt: int, idx: int, name: str, status: str,
                  exit_code: int | None, now: float) -> None:
    """A step's status changed (not to pending: the plan is on the job page, not an event): its
    event, and where its log lines begin (it started) or end (it finished)."""
    line = _next_line(db, job_id)
    _add_event(db, now, "job.step", {"id": job_id, "attempt": attempt, "idx": idx, "name": name, "status": status,
                                     "exit_code": exit_code, "line": line}, job_id=job_id)
    running = status == StepStatus.RUNNING.value
    db.execute(
        "INSERT INTO step_lines (job_id, attempt, idx, first_line, last_line) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (job_id, attempt, idx) DO UPDATE SET "
        "first_line = CASE WHEN excluded.first_line IS NULL THEN step_lines.first_line ELSE excluded.first_line END, "
        "last_line = excluded.last_line",
        (job_id, attempt, idx, line if running else None, None if running else line - 1),
    )


def _count(db: Unit, repo: str, status: JobStatus, delta: int) -> None:
    db.counts[(repo, status.value)] += delta


def _hist(db: Unit, repo: str, kind: str, seconds: float, delta: int) -> None:
    db.hists[(repo, kind, bucket_of(seconds))] += delta


def _runner_result(db: Unit, runner: str, status: JobStatus, duration: float, delta: int) -> None:
    totals = db.results.setdefault(runner, [0, 0, 0, 0.0])
    totals[0] += delta
    totals[1] += delta if status is JobStatus.PASSED else 0
    totals[2] += delta if status is JobStatus.FAILED else 0
    totals[3] += delta * duration


def _queue_length(db: Unit) -> int:
    return int(db.execute("SELECT coalesce(sum(count), 0) FROM repo_stats WHERE status = 'queued'").fetchone()[0])


def _next_line(db: Unit, job_id: int) -> int:
    row = db.execute(
        "SELECT first_line + n_lines FROM log WHERE job_id = ? ORDER BY first_line DESC LIMIT 1", (job_id,)
    ).fetchone()
    return row[0] if row else 1


def _rebuild(db: Unit) -> None:
    final = ", ".join(f"'{s.value}'" for s in sorted(FINAL_STATUSES))  # from the enum, not retyped
    db.execute("DELETE FROM repo_stats")
    db.execute("DELETE FROM repo_hist")
    db.execute("DELETE FROM runner_stats")
    db.execute("INSERT INTO repo_stats (repo, status, count) SELECT repo, status, count(*) FROM jobs GROUP BY repo, status")
    db.execute(
        "INSERT INTO repo_hist (repo, kind, bucket, count) "
        "SELECT repo, 'wait', narwhal_bucket(started_at - queued_at) AS b, count(*) FROM jobs "
        "WHERE started_at IS NOT NULL GROUP BY repo, b"
    )
    db.execute(
        "INSERT INTO repo_hist (repo, kind, bucket, count) "
        "SELECT repo, 'duration', narwhal_bucket(finished_at - started_at) AS b, count(*) FROM jobs "
        f"WHERE started_at IS NOT NULL AND finished_at IS NOT NULL AND status IN ({final}) GROUP BY repo, b"
    )
    db.execute(
        "INSERT INTO runner_stats (runner, jobs, passed, failed, busy_seconds, first_started_at) "
        f"SELECT runner, count(*) FILTER (WHERE status IN ({final})), count(*) FILTER (WHERE status = 'passed'), "
        f"count(*) FILTER (WHERE status = 'failed'), "
        f"coalesce(sum(CASE WHEN status IN ({final}) AND started_at IS NOT NULL AND finished_at IS NOT NULL "
        "THEN finished_at - started_at END), 0), min(started_at) "
        "FROM jobs WHERE runner IS NOT NULL GROUP BY runner"
    )
