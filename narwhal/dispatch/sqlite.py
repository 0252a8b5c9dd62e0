"""The SQLite backend: narwhal's state in one file (the default, and the demo's).

WAL mode, one connection per thread (and per process), a busy timeout. Writers take the
lock up front (``BEGIN IMMEDIATE``) so that concurrent writers queue on the busy timeout
instead of failing with "database is locked" when a read transaction tries to upgrade: so
on SQLite every write transaction runs alone, and ``for_update`` is needed nowhere.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from narwhal.dispatch.backend import StoreUnavailable
from narwhal.dispatch.buckets import sql_bucket

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
    # 8: the event log (GET /events) and each step's log lines, written by the store itself in the
    # transaction of each change (they were SQLite triggers, created at each start; the store
    # writes them now, on every backend alike, so the triggers go).
    """
    DROP TRIGGER IF EXISTS events_prune;
    DROP TRIGGER IF EXISTS events_job_insert;
    DROP TRIGGER IF EXISTS events_job_update;
    DROP TRIGGER IF EXISTS events_step_insert;
    DROP TRIGGER IF EXISTS events_step_update;
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        job_id INTEGER,
        runner TEXT,
        data TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id) WHERE job_id IS NOT NULL;
    CREATE INDEX IF NOT EXISTS events_runner ON events (runner, id) WHERE runner IS NOT NULL;
    CREATE TABLE IF NOT EXISTS step_lines (
        job_id INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        first_line INTEGER,
        last_line INTEGER,
        PRIMARY KEY (job_id, attempt, idx)
    ) WITHOUT ROWID;
    """,
    # 9: nodes (each dispatcher on the store, with its heartbeat), attempt leases (the node that
    # claimed a running job's attempt, and until when its lease holds) and runner slots leased by
    # nodes, so a runner's capacity holds across dispatchers (narwhal.dispatch.nodes).
    """
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        stopped_at REAL
    );
    ALTER TABLE jobs ADD COLUMN node TEXT;
    ALTER TABLE jobs ADD COLUMN lease_until REAL;
    CREATE INDEX jobs_node ON jobs (node) WHERE status = 'running';
    CREATE TABLE slots (
        runner TEXT NOT NULL,
        slot INTEGER NOT NULL,
        node TEXT NOT NULL,
        job_id INTEGER NOT NULL,
        lease_until REAL NOT NULL,
        PRIMARY KEY (runner, slot)
    ) WITHOUT ROWID;
    CREATE INDEX slots_node ON slots (node);
    """,
    # 10: the last use of each pipeline cache volume on the runners (narwhal.dispatch.caches:
    # eviction by age and least recent use). IF NOT EXISTS: a development state dir made it at start.
    """
    CREATE TABLE IF NOT EXISTS cache_uses (
        volume TEXT PRIMARY KEY,
        repo TEXT NOT NULL,
        key TEXT NOT NULL,
        used_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 11: artifacts, one row per file a job kept (narwhal.dispatch.artifacts; its queries are
    # store.ARTIFACT_SQL).
    """
    CREATE TABLE artifacts (
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        path TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (job_id, path)
    ) WITHOUT ROWID;
    CREATE INDEX artifacts_expiry ON artifacts (expires_at);
    CREATE INDEX artifacts_object ON artifacts (sha256, expires_at);
    """,
    # 12: browser sessions (narwhal.api.session; its queries are store.SESSION_SQL): the sha256 of
    # each id, never the id, so every node of a cluster knows who signed in, and a restart keeps them.
    """
    CREATE TABLE sessions (
        key TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX sessions_age ON sessions (created_at);
    CREATE INDEX sessions_expiry ON sessions (expires_at);
    """,
    # 13: each repository's queue in order, so a cluster's claim reads each one's first jobs, not
    # the whole queue sorted; the fingerprint of each node's pipelines and runners (PostgreSQL's 7).
    """
    CREATE INDEX jobs_queued_repo ON jobs (repo, queued_at, id) WHERE status = 'queued';
    ALTER TABLE nodes ADD COLUMN config TEXT;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


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


def _split_sql(script: str) -> list[str]:
    """Statements of a migration script (ours contain no ';' inside literals or triggers)."""
    return [s.strip() for s in script.split(";") if s.strip()]


class SQLiteBackend:
    """One SQLite file; safe from many threads and processes."""

    kind = "sqlite"
    for_update = ""  # BEGIN IMMEDIATE: a writer runs alone
    skip_locked = ""  # and so does a claimer
    # No LATERAL in SQLite: each repository's first jobs by id, looked up in its queue index.
    repo_queue = ("JOIN jobs j ON j.id IN (SELECT k.id FROM jobs k INDEXED BY jobs_queued_repo WHERE "
                  "k.status = 'queued' AND k.repo = repos.repo ORDER BY k.queued_at, k.id LIMIT ?)")

    def __init__(self, path: str):
        if path == ":memory:":
            raise ValueError("Store needs a file path: ':memory:' is private to one connection")
        self.path = self.where = str(path)
        self._local = threading.local()
        self._all: list[tuple[int, sqlite3.Connection]] = []  # (opening pid, connection)
        self._all_lock = threading.Lock()
        self._closed = False

    def connection(self) -> sqlite3.Connection:
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
        conn.create_function("narwhal_bucket", 1, sql_bucket, deterministic=True)
        self._local.conn = conn
        self._local.pid = os.getpid()
        with self._all_lock:
            self._all.append((os.getpid(), conn))
        return conn

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` for writers, a consistent snapshot for readers."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close every connection opened in this process (a fork's inherited ones are the parent's)."""
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

    def set_password(self, password: str | None) -> None:
        """A file has no password."""

    def hold(self, label: str, shared: bool = False) -> None:
        """The state directory's flock (narwhal.dispatch.statelock) already keeps a second
        dispatcher out of the file, before the store is opened."""

    def holding(self) -> bool:
        return not self._closed

    def release(self) -> None:
        pass

    def try_exclusive(self, key: int) -> bool:
        """One dispatcher per file: always its own."""
        return True

    def end_exclusive(self, key: int) -> None:
        pass

    # --- schema ------------------------------------------------------------------------

    def migrate(self) -> int:
        # A migration may rebuild a table: with foreign keys on, DROP TABLE jobs would
        # delete every step and log row with it (ON DELETE CASCADE). The pragma cannot
        # change inside a transaction, so it is off around the migrating one.
        conn = self.connection()
        conn.execute("PRAGMA foreign_keys = OFF")
        try:
            with self.transaction() as db:
                db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                current = int(row[0]) if row else 0
                if current > SCHEMA_VERSION:
                    raise StoreUnavailable(f"{self.path}: schema version {current} is newer than this narwhal "
                                           f"understands ({SCHEMA_VERSION}); upgrade narwhal")
                for script in MIGRATIONS[current:]:
                    for statement in _split_sql(script):
                        db.execute(statement)
                if current != SCHEMA_VERSION:
                    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                               (str(SCHEMA_VERSION),))
            problems = conn.execute("PRAGMA foreign_key_check").fetchall()
            if problems:
                raise RuntimeError(f"{self.path}: migration left {len(problems)} broken references")
        finally:
            conn.execute("PRAGMA foreign_keys = ON")
        return SCHEMA_VERSION

    # --- dialect -------------------------------------------------------------------------

    def indexed_by(self, index: str) -> str:
        return f"INDEXED BY {index}"

    def batch(self, tx: Any) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()  # function calls: nothing to save

    announcing = False

    def announce(self, tx: Any, log_only: bool = False) -> None:
        """One dispatcher per file: nobody else to tell."""

    def listen(self, changed: Callable[[bool], None], stop: threading.Event) -> None:
        return

    def lock_events(self, tx: Any) -> None:
        """Nothing to do: a writer runs alone, so ids are handed out in commit order."""

    def now(self, tx: Any) -> float | None:
        return None  # one host: the dispatcher's clock is the only one

    def log_value(self, text: str) -> str:
        return text

    def log_text(self, value: Any) -> str:
        return str(value)

    def bulk_insert_jobs(self, tx: Any, columns: Sequence[str], rows: Iterable[dict]) -> int:
        conn: sqlite3.Connection = tx
        sql = "INSERT OR IGNORE INTO jobs ({}) VALUES ({})".format(
            ", ".join(f'"{c}"' for c in columns), ", ".join(f":{c}" for c in columns))
        before = conn.total_changes
        conn.executemany(sql, rows)
        return conn.total_changes - before
