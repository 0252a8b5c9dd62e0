"""SQLite store: commits, jobs, steps, logs, api runners and the stats aggregates.

One file, WAL mode, one connection per thread (and per process), every public
method one transaction. Writers take the lock up front (``BEGIN IMMEDIATE``) so
that concurrent writers queue on the busy timeout instead of failing with
"database is locked" when a read transaction tries to upgrade.

Status changes are guarded in SQL (``WHERE status = ... AND attempt = ...``) so a
job never gets two results, and every change updates the aggregate tables
(``repo_stats``, ``repo_hist``, ``runner_stats``) in the same transaction, so
``stats()`` reads a few hundred rows whatever the number of jobs.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from narwhal.errors import BadRequest, Conflict, NotFound
from narwhal.job import FINAL_STATUSES, Job, JobStatus, LogKind, Origin, Step, StepStatus

BUSY_TIMEOUT_MS = 30_000

# Each entry is one schema version: version N is reached by running MIGRATIONS[N-1].
# Append new entries; never edit a released one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE commits (
        id INTEGER PRIMARY KEY,
        repo TEXT NOT NULL,
        "commit" TEXT NOT NULL,
        branch TEXT,
        created_at REAL NOT NULL,
        UNIQUE (repo, "commit")
    );
    CREATE INDEX commits_repo ON commits (repo, id);

    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        pipeline TEXT NOT NULL,
        repo TEXT NOT NULL,
        "commit" TEXT NOT NULL,
        branch TEXT,
        status TEXT NOT NULL,
        runner TEXT,
        attempt INTEGER NOT NULL DEFAULT 1,
        reason TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        queued_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        UNIQUE (repo, "commit", pipeline)
    );
    CREATE INDEX jobs_status ON jobs (status);
    CREATE INDEX jobs_repo ON jobs (repo, id);
    CREATE INDEX jobs_repo_status ON jobs (repo, status);
    CREATE INDEX jobs_runner ON jobs (runner);
    CREATE INDEX jobs_queue ON jobs (queued_at, id) WHERE status = 'queued';

    CREATE TABLE steps (
        job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        attempt INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        exit_code INTEGER,
        started_at REAL,
        finished_at REAL,
        PRIMARY KEY (job_id, attempt, idx)
    ) WITHOUT ROWID;

    CREATE TABLE log (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        attempt INTEGER NOT NULL,
        first_line INTEGER NOT NULL,
        n_lines INTEGER NOT NULL,
        data TEXT NOT NULL
    );
    CREATE UNIQUE INDEX log_job_line ON log (job_id, first_line);

    CREATE TABLE runners (
        name TEXT PRIMARY KEY,
        config TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE runner_state (
        name TEXT PRIMARY KEY,
        draining INTEGER NOT NULL DEFAULT 0
    );

    CREATE TABLE repo_stats (
        repo TEXT NOT NULL,
        status TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (repo, status)
    ) WITHOUT ROWID;
    CREATE TABLE repo_hist (
        repo TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('duration', 'wait')),
        bucket INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (repo, kind, bucket)
    ) WITHOUT ROWID;
    CREATE TABLE runner_stats (
        runner TEXT PRIMARY KEY,
        jobs INTEGER NOT NULL DEFAULT 0,
        passed INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        busy_seconds REAL NOT NULL DEFAULT 0,
        first_started_at REAL
    );
    """,
    # 2: who wrote each log row: a step ('step') or narwhal itself ('narwhal'). Rows
    # written before this hold narwhal's lines as step text ("[narwhal] ..." in 'step').
    """
    ALTER TABLE log ADD COLUMN kind TEXT NOT NULL DEFAULT 'step' CHECK (kind IN ('step', 'narwhal'));
    """,
    # 3: what started each job (narwhal.job.EVENTS); earlier jobs all came from the API.
    """
    ALTER TABLE jobs ADD COLUMN event TEXT NOT NULL DEFAULT 'api';
    """,
    # 4: forges. A job knows where it came from (ref, pull request, author, the forge to
    # tell) and a commit may have several jobs of one pipeline, one per origin key (the
    # push, a pull request, each schedule tick): the jobs table is rebuilt for the new
    # UNIQUE (SQLite cannot change a constraint in place; _migrate turns foreign keys
    # off around it, so steps and logs stay). Webhook deliveries seen, the commit-status
    # outbox and schedule ticks get tables of their own.
    """
    CREATE TABLE jobs_new (
        id INTEGER PRIMARY KEY,
        pipeline TEXT NOT NULL,
        repo TEXT NOT NULL,
        "commit" TEXT NOT NULL,
        branch TEXT,
        status TEXT NOT NULL,
        runner TEXT,
        attempt INTEGER NOT NULL DEFAULT 1,
        reason TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        queued_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        event TEXT NOT NULL DEFAULT 'api',
        origin_key TEXT NOT NULL DEFAULT '',
        ref TEXT,
        pr INTEGER,
        source_repo TEXT,
        author TEXT,
        subject TEXT,
        forge TEXT,
        UNIQUE (repo, "commit", pipeline, origin_key)
    );
    INSERT INTO jobs_new (id, pipeline, repo, "commit", branch, status, runner, attempt, reason,
        cancel_requested, created_at, queued_at, started_at, finished_at, event)
        SELECT id, pipeline, repo, "commit", branch, status, runner, attempt, reason,
        cancel_requested, created_at, queued_at, started_at, finished_at, event FROM jobs;
    DROP TABLE jobs;
    ALTER TABLE jobs_new RENAME TO jobs;
    CREATE INDEX jobs_status ON jobs (status);
    CREATE INDEX jobs_repo ON jobs (repo, id);
    CREATE INDEX jobs_repo_status ON jobs (repo, status);
    CREATE INDEX jobs_runner ON jobs (runner);
    CREATE INDEX jobs_queue ON jobs (queued_at, id) WHERE status = 'queued';
    CREATE INDEX jobs_commit ON jobs (repo, "commit");

    CREATE TABLE deliveries (
        forge TEXT NOT NULL,
        delivery TEXT NOT NULL,
        received_at REAL NOT NULL,
        answer TEXT NOT NULL,
        PRIMARY KEY (forge, delivery)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_age ON deliveries (received_at);

    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL,
        forge TEXT NOT NULL,
        repo TEXT NOT NULL,
        "commit" TEXT NOT NULL,
        context TEXT NOT NULL,
        state TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        delivered_at REAL,
        failed_at REAL,
        last_error TEXT
    );
    CREATE INDEX outbox_pending ON outbox (forge, repo, "commit", context, id)
        WHERE delivered_at IS NULL AND failed_at IS NULL;

    CREATE TABLE schedules (
        pipeline TEXT PRIMARY KEY,
        last_tick REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 5: delivering the outbox: when each row's last error happened (GET /forges shows the
    # last one per forge), and an index that counts a forge's rows without reading them.
    """
    ALTER TABLE outbox ADD COLUMN error_at REAL;
    CREATE INDEX outbox_forge ON outbox (forge, delivered_at, failed_at);
    CREATE INDEX outbox_errors ON outbox (forge, error_at) WHERE error_at IS NOT NULL;
    """,
    # 6: pipelines as graphs (issue 13). A step says why it was skipped or how it failed;
    # a job keeps the files its commit changed (JSON, only for pipelines whose steps
    # have when.paths), which its steps' conditions read when it runs.
    """
    ALTER TABLE steps ADD COLUMN reason TEXT;
    ALTER TABLE jobs ADD COLUMN changed TEXT;
    """,
    # 7: when each run of log lines was written (`narwhal logs --timestamps`); older rows have none.
    """
    ALTER TABLE log ADD COLUMN at REAL;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

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


# --- histogram buckets -----------------------------------------------------------------

BUCKETS_PER_DOUBLING = 8


def bucket_of(seconds: float) -> int:
    """Log-spaced bucket of a duration: 8 buckets per doubling, so ~9% wide.

    Durations under a millisecond (and negative ones from clock skew) share bucket 0.
    """
    ms = max(float(seconds) * 1000.0, 1.0)
    return round(BUCKETS_PER_DOUBLING * math.log2(ms))


def bucket_upper(bucket: int) -> float:
    """Upper bound of a bucket, in seconds (what percentiles report)."""
    return 2 ** ((bucket + 0.5) / BUCKETS_PER_DOUBLING) / 1000.0


def _sql_bucket(seconds: float | None) -> int | None:
    return None if seconds is None else bucket_of(seconds)


def percentile(hist: list[tuple[int, int]], q: float) -> float | None:
    """q-quantile (0 < q <= 1) of a histogram given as sorted (bucket, count) pairs."""
    total = sum(c for _, c in hist)
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket, count in hist:
        seen += count
        if seen >= rank:
            return round(bucket_upper(bucket), 3)
    return round(bucket_upper(hist[-1][0]), 3)


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 1) if whole else None


# --- the store -------------------------------------------------------------------------



def _enter_wal(conn: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode = WAL``, waiting as the busy timeout would: SQLite answers a
    journal-mode change "database is locked" at once, without its busy handler, while another
    process opens the same new database (two dispatchers, or a CLI, starting together)."""
    give_up = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > give_up:
                raise
            time.sleep(0.01)

class Store:
    """Narwhal's state in one SQLite file; safe from many threads and processes."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time):
        if path == ":memory:":
            raise ValueError("Store needs a file path: ':memory:' is private to one connection")
        self.path = str(path)
        self.clock = clock
        self._local = threading.local()
        self._all: list[tuple[int, sqlite3.Connection]] = []  # (opening pid, connection)
        self._all_lock = threading.Lock()
        self._closed = False
        self._migrate()
        self._owner_id = self._ensure_owner_id()

    # --- connections and transactions --------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection; a forked child opens its own."""
        if self._closed:
            raise RuntimeError(f"store {self.path} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        conn = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,  # only so close() can close every thread's connection
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _enter_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.create_function("narwhal_bucket", 1, _sql_bucket, deterministic=True)
        self._local.conn = conn
        self._local.pid = os.getpid()
        with self._all_lock:
            self._all.append((os.getpid(), conn))
        return conn

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction: ``BEGIN IMMEDIATE`` for writers, a consistent snapshot for readers."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close every connection this store opened in this process.

        Connections inherited over fork() belong to the parent and are left alone.
        """
        self._closed = True
        with self._all_lock:
            conns, self._all = self._all, []
        for pid, conn in conns:
            if pid != os.getpid():
                continue
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- schema ------------------------------------------------------------------------

    def _migrate(self) -> None:
        # A migration may rebuild a table: with foreign keys on, DROP TABLE jobs would
        # delete every step and log row with it (ON DELETE CASCADE). The pragma cannot
        # change inside a transaction, so it is off around the migrating one.
        conn = self._conn()
        conn.execute("PRAGMA foreign_keys = OFF")
        try:
            self._migrate_locked()
            problems = conn.execute("PRAGMA foreign_key_check").fetchall()
            if problems:
                raise RuntimeError(f"{self.path}: migration left {len(problems)} broken references")
        finally:
            conn.execute("PRAGMA foreign_keys = ON")

    def _migrate_locked(self) -> None:
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            version = self._meta(db, "schema_version")
            current = int(version) if version is not None else 0
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: schema version {current} is newer than this narwhal "
                    f"understands ({SCHEMA_VERSION}); upgrade narwhal"
                )
            for script in MIGRATIONS[current:]:
                for statement in _split_sql(script):
                    db.execute(statement)
            if current != SCHEMA_VERSION:
                self._set_meta(db, "schema_version", str(SCHEMA_VERSION))

    def _ensure_owner_id(self) -> str:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('owner_id', ?)", (uuid.uuid4().hex,)
            )
            owner = self._meta(db, "owner_id")
        assert owner is not None  # inserted just above if it was missing
        return owner

    @staticmethod
    def _meta(db: sqlite3.Connection, key: str) -> str | None:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @staticmethod
    def _set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @property
    def owner_id(self) -> str:
        """Random id of this store's dispatcher; labels its containers so reapers keep apart."""
        return self._owner_id

    @property
    def schema_version(self) -> int:
        with self._tx(write=False) as db:
            return int(self._meta(db, "schema_version") or 0)

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
                'INSERT OR IGNORE INTO commits (repo, "commit", branch, created_at) VALUES (?, ?, ?, ?)',
                (repo, commit, branch, now),
            )
            for pipeline in pipelines:
                status, reason = JobStatus.QUEUED, None
                if pipeline in refused:
                    status, reason = JobStatus.ERROR, refused[pipeline]
                elif pipeline in skipped:
                    status, reason = JobStatus.SKIPPED, skipped[pipeline]
                cur = db.execute(
                    'INSERT OR IGNORE INTO jobs (pipeline, repo, "commit", branch, status, reason, '
                    "created_at, queued_at, started_at, finished_at, event, origin_key, ref, pr, source_repo, "
                    "author, subject, forge, changed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            db.execute("INSERT OR IGNORE INTO deliveries (forge, delivery, received_at, answer) VALUES (?, ?, ?, ?)",
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
               "ORDER BY id DESC LIMIT ?) GROUP BY repo, coalesce(branch, ''), pipeline"
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
                    f"SELECT {_JOB_COLUMNS} FROM jobs INDEXED BY jobs_queue "
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
        now = self.clock()
        with self._tx() as db:
            row = db.execute(
                "UPDATE jobs SET status = 'running', runner = ?, started_at = ? "
                "WHERE id = ? AND status = 'queued' AND attempt = ? RETURNING repo, queued_at",
                (runner, now, id, attempt),
            ).fetchone()
            if row is None:
                return False
            repo, queued_at = row
            _count(db, repo, JobStatus.QUEUED, -1)
            _count(db, repo, JobStatus.RUNNING, +1)
            _hist(db, repo, "wait", now - queued_at, +1)
            _status_changed(db, id, now)
            db.execute(
                "INSERT INTO runner_stats (runner, first_started_at) VALUES (?, ?) "
                "ON CONFLICT (runner) DO UPDATE SET first_started_at = "
                "min(coalesce(first_started_at, excluded.first_started_at), excluded.first_started_at)",
                (runner, now),
            )
            return True

    def finish_job(self, id: int, attempt: int, status: str | JobStatus, reason: str | None = None) -> bool:
        """running -> a final status; False (ignored) unless running at that attempt.

        The guard is what makes late results of an older attempt, and second results,
        harmless.
        """
        final = _status(status)
        if not final.is_final:
            raise ValueError(f"finish_job needs a final status, got {final.value!r}")
        with self._tx() as db:
            return self._finish(db, id, attempt, final, reason)

    def _finish(self, db: sqlite3.Connection, id: int, attempt: int, final: JobStatus, reason: str | None) -> bool:
        now = self.clock()
        row = db.execute(
            "UPDATE jobs SET status = ?, reason = ?, finished_at = ? "
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

    def requeue_job(self, id: int, reason: str | None = None) -> Job | None:
        """running -> queued as a new attempt (its runner was lost); None if not running.

        A job whose cancellation was requested is cancelled instead of run again.
        """
        now = self.clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT repo, attempt, queued_at, started_at, cancel_requested FROM jobs "
                "WHERE id = ? AND status = 'running'",
                (id,),
            ).fetchone()
            if row is None:
                return None
            repo, attempt, queued_at, started_at, cancel_requested = row
            if cancel_requested:
                self._finish(db, id, attempt, JobStatus.CANCELLED, "cancelled")
            else:
                db.execute(
                    "UPDATE jobs SET status = 'queued', attempt = attempt + 1, reason = ?, "
                    "runner = NULL, started_at = NULL, finished_at = NULL, queued_at = ? WHERE id = ?",
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
            row = db.execute("SELECT repo, status FROM jobs WHERE id = ?", (id,)).fetchone()
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
                "SELECT repo, status, runner, queued_at, started_at, finished_at FROM jobs WHERE id = ?",
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

    def plan_steps(self, job_id: int, attempt: int, names: list[str]) -> None:
        """Record an attempt's steps as pending, so a job shows its whole plan up front."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO steps (job_id, attempt, idx, name, status) VALUES (?, ?, ?, ?, 'pending')",
                [(job_id, attempt, i, n) for i, n in enumerate(names)],
            )

    def start_step(self, job_id: int, attempt: int, idx: int, name: str) -> None:
        now = self.clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO steps (job_id, attempt, idx, name, status, started_at) "
                "VALUES (?, ?, ?, ?, 'running', ?) ON CONFLICT (job_id, attempt, idx) DO UPDATE SET "
                "name = excluded.name, status = 'running', started_at = excluded.started_at, "
                "exit_code = NULL, finished_at = NULL, reason = NULL",
                (job_id, attempt, idx, name, now),
            )

    def finish_step(
        self,
        job_id: int,
        attempt: int,
        idx: int,
        status: str | StepStatus,
        exit_code: int | None = None,
        name: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Record a step's end (``reason``: why it was skipped, how it failed); with ``name`` it
        also records steps that were never planned."""
        now = self.clock()
        value = StepStatus(status).value
        with self._tx() as db:
            cur = db.execute(
                "UPDATE steps SET status = ?, exit_code = ?, finished_at = ?, reason = ? "
                "WHERE job_id = ? AND attempt = ? AND idx = ?",
                (value, exit_code, now, reason, job_id, attempt, idx),
            )
            if cur.rowcount == 0 and name is not None:
                db.execute(
                    "INSERT INTO steps (job_id, attempt, idx, name, status, exit_code, finished_at, reason) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, attempt, idx, name, value, exit_code, now, reason),
                )

    def changed_files(self, job_id: int) -> tuple[str, ...] | None:
        """The files the job's commit changed, as kept at submission; None when not known or not kept."""
        with self._tx(write=False) as db:
            row = db.execute("SELECT changed FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        return tuple(json.loads(row[0]))

    # --- logs ----------------------------------------------------------------------------

    def append_log(self, job_id: int, attempt: int, lines: list[str],
                   kind: str | LogKind = LogKind.STEP) -> int:
        """Store lines of one ``kind`` as one row; returns the first one's number (1-based, per job).

        Numbers run on across attempts and kinds, so a follower's ``Last-Event-ID`` stays
        valid. A line holding newlines counts as several lines.
        """
        kind = LogKind(kind).value
        text = "\n".join(lines)
        n_lines = text.count("\n") + 1  # counted once: a pass over every byte of the batch
        if n_lines != len(lines) or text.endswith("\n"):  # rare: newlines inside
            text = "\n".join(line[:-1] if line.endswith("\n") else line for line in lines)
            n_lines = text.count("\n") + 1
        with self._tx() as db:
            first = _next_line(db, job_id)
            if not lines:
                return first
            db.execute(
                "INSERT INTO log (job_id, attempt, first_line, n_lines, data, kind, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, attempt, first, n_lines, text, kind, self.clock()),
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
                lines = data.split("\n")
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

    def add_runner(self, config: dict) -> dict:
        """Remember a runner registered over the API (its inventory fields as JSON)."""
        name = config.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("runner needs a name")
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO runners (name, config, created_at) VALUES (?, ?, ?)",
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
                f'INDEXED BY outbox_pending WHERE {_PENDING} GROUP BY forge, repo, "commit", context) '
                "ORDER BY next_at, id LIMIT ?",
                (max(0, int(limit)),),
            ).fetchall()
        return [OutboxRow(*row) for row in rows]

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
                f"SELECT forge, sum({_PENDING}), sum(delivered_at IS NOT NULL), sum(failed_at IS NOT NULL), "
                "max(delivered_at) FROM outbox INDEXED BY outbox_forge GROUP BY forge ORDER BY forge"
            ):
                error = db.execute(
                    "SELECT last_error, error_at FROM outbox INDEXED BY outbox_errors "
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
                "ON CONFLICT (pipeline) DO UPDATE SET last_tick = max(last_tick, excluded.last_tick)",
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
        sql = "INSERT OR IGNORE INTO jobs ({}) VALUES ({})".format(
            ", ".join(f'"{c}"' for c in columns), ", ".join(f":{c}" for c in columns)
        )

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
            before = db.total_changes
            db.executemany(sql, normalised())
            inserted = db.total_changes - before
            db.execute(
                'INSERT OR IGNORE INTO commits (repo, "commit", branch, created_at) '
                'SELECT repo, "commit", branch, min(created_at) FROM jobs GROUP BY repo, "commit" ORDER BY min(id)'
            )
            _rebuild(db)
        return inserted


# --- helpers shared by the transactions ------------------------------------------------


def _changed_json(files: Sequence[str] | None) -> str | None:
    return None if files is None else json.dumps(list(files))


def _split_sql(script: str) -> list[str]:
    """Statements of a migration script (ours contain no ';' inside literals or triggers)."""
    return [s.strip() for s in script.split(";") if s.strip()]


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


def _status_changed(db: sqlite3.Connection, job: Job | int, now: float) -> None:
    """In the transaction of a job's state change: its commit status joins the outbox, if a
    forge hears about this job. Skipped jobs send nothing (peers do not report them)."""
    if isinstance(job, int):
        job = _job(db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job,)).fetchone())
    if job.forge is None or job.status is JobStatus.SKIPPED:
        return
    db.execute(
        'INSERT INTO outbox (job_id, forge, repo, "commit", context, state, description, created_at, next_at) '
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (job.id, job.forge, job.repo, job.commit, f"narwhal/{job.pipeline}", job.status.value,
         job.summary(), now, now),
    )


def _count(db: sqlite3.Connection, repo: str, status: JobStatus, delta: int) -> None:
    db.execute(
        "INSERT INTO repo_stats (repo, status, count) VALUES (?, ?, ?) "
        "ON CONFLICT (repo, status) DO UPDATE SET count = count + excluded.count",
        (repo, status.value, delta),
    )


def _hist(db: sqlite3.Connection, repo: str, kind: str, seconds: float, delta: int) -> None:
    db.execute(
        "INSERT INTO repo_hist (repo, kind, bucket, count) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (repo, kind, bucket) DO UPDATE SET count = count + excluded.count",
        (repo, kind, bucket_of(seconds), delta),
    )


def _runner_result(db: sqlite3.Connection, runner: str, status: JobStatus, duration: float, delta: int) -> None:
    db.execute(
        "INSERT INTO runner_stats (runner, jobs, passed, failed, busy_seconds) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (runner) DO UPDATE SET jobs = jobs + excluded.jobs, passed = passed + excluded.passed, "
        "failed = failed + excluded.failed, busy_seconds = busy_seconds + excluded.busy_seconds",
        (
            runner,
            delta,
            delta if status is JobStatus.PASSED else 0,
            delta if status is JobStatus.FAILED else 0,
            delta * duration,
        ),
    )


def _queue_length(db: sqlite3.Connection) -> int:
    return db.execute("SELECT coalesce(sum(count), 0) FROM repo_stats WHERE status = 'queued'").fetchone()[0]


def _next_line(db: sqlite3.Connection, job_id: int) -> int:
    row = db.execute(
        "SELECT first_line + n_lines FROM log WHERE job_id = ? ORDER BY first_line DESC LIMIT 1", (job_id,)
    ).fetchone()
    return row[0] if row else 1


def _rebuild(db: sqlite3.Connection) -> None:
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
        f"SELECT runner, sum(status IN ({final})), sum(status = 'passed'), sum(status = 'failed'), "
        f"coalesce(sum(CASE WHEN status IN ({final}) AND started_at IS NOT NULL AND finished_at IS NOT NULL "
        "THEN finished_at - started_at END), 0), min(started_at) "
        "FROM jobs WHERE runner IS NOT NULL GROUP BY runner"
    )
