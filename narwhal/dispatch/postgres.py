"""The PostgreSQL backend: narwhal's state in a database several dispatchers can share.

psycopg 3 with a connection pool (psycopg_pool), both from the ``postgresql`` extra
(``pip install 'narwhal[postgresql]'``). Chosen by the ``store`` setting
(``store: postgresql://narwhal@db.example.com/narwhal``); the password comes from the
secret that ``store_password`` names, handed to libpq as a keyword, never in a URL, an
argv or a log line.

What differs from SQLite, each on purpose:

* **Writers run at once.** READ COMMITTED, so a read that a transaction goes on to change
  locks its row (``for_update``: ``FOR NO KEY UPDATE``, which leaves foreign-key checks of
  other writers alone); guarded updates (``WHERE status = 'queued' AND attempt = ?``) are
  re-checked by PostgreSQL on the row a concurrent writer left, so one of two wins.
  Readers get one snapshot per transaction (REPEATABLE READ, READ ONLY), as on SQLite.
* **Event ids in commit order.** An identity column hands ids out at insert, not at commit;
  a reader resuming after id N would miss an id below N committed later. Every transaction
  that writes events first takes one transaction-scoped advisory lock (``lock_events``), so
  they commit in id order. Only status changes write events; log lines do not wait on it.
* **Types.** Times stay epoch seconds (``double precision``), set by the dispatcher's clock
  like on SQLite; ids are ``bigint`` identity columns; text columns collate ``"C"``, so
  sorting and comparing are bytewise as on SQLite, whatever the database's locale. Log text
  is ``bytea`` (UTF-8): ``text`` cannot hold NUL, and a step may print one. Any other text
  with NUL (a forge's commit subject, say) has it replaced by U+FFFD instead of failing.
* **Placeholders.** The store writes ``?``; they become ``%s`` here (and a literal ``%``
  becomes ``%%``), once per statement text.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg_pool

from narwhal.dispatch.backend import StoreInUse, StoreUnavailable, is_own_work

POOL_MIN = 1
POOL_MAX = 16  # connections one dispatcher holds at most (API threads, scheduler, outbox, schedules)
OWN_POOL = 3  # of those, kept for its lease-keeping work alone (backend.own_work: the scheduler's store thread, the beat)
CONNECT_TIMEOUT = 10  # seconds to reach the database at start
POOL_TIMEOUT = 30.0  # seconds a transaction waits for a connection (all busy, or the database unreachable)
# pg_advisory_xact_lock keys ("narwhal" + a byte): one per purpose.
MIGRATE_LOCK = 0x6E61727768616C01
EVENTS_LOCK = 0x6E61727768616C02
log = logging.getLogger(__name__)

CHANNEL = "narwhal_changes"  # NOTIFY channel of a cluster's dispatchers (announce, listen)
LOG_ONLY = "log"  # an announcement's payload when only log lines changed (no job, step or runner)
LISTEN_WAKE = 0.5  # seconds: how often a listener looks at its stop flag
LISTEN_RETRY = 2.0  # seconds before a lost listening connection is opened again
DISPATCHER_LOCK = 0x6E61727768616C03  # a session lock: the one dispatcher on the database
# Every connection: each side notices a peer that died or was cut off within about 10 + 5 x 3 = 25 s
# of silence (TCP keepalives both ways; the hold's lock is freed then); a clean exit or kill -9 frees it at once.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
# A call into a cut cable fails instead of waiting for TCP to give up (about 15 minutes of
# retransmits, and after the cable is back, up to two more until the next one goes out): data
# sent and not acknowledged for this long ends the connection (libpq's tcp_user_timeout).
TCP_USER_TIMEOUT = 10.0  # seconds
# A session left inside a transaction (its dispatcher cut off between two statements) is ended
# by the server after this long, and its row locks and the events lock with it: else every
# writer of events in the cluster, and the takeover of that node's attempts, would wait for it
# for as long as the server's TCP takes to notice. Below the cluster's lease (15 s,
# narwhal.dispatch.nodes.LEASE): a cut-off node's locks are gone before its attempts may be
# taken over. No transaction of the store waits on its client that long.
IDLE_IN_TRANSACTION = 10.0  # seconds

T = 'text COLLATE "C"'  # every text column: bytewise order and equality, as on SQLite
TIME = "double precision"  # epoch seconds
ID = "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY"

# Each entry is one schema version: version N is reached by running MIGRATIONS[N-1].
# Append new entries; never edit a released one. (SQLite's list has its own numbers.)
MIGRATIONS: list[str] = [
    # 1: everything SQLite's schema 8 holds (and 2, its 9: the numbers are each backend's own).
    f"""
    CREATE FUNCTION narwhal_bucket(seconds double precision) RETURNS integer
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
        AS $$ SELECT round(8 * ln(greatest(seconds * 1000.0, 1.0)) / ln(2.0))::integer $$;

    CREATE TABLE commits (
        id {ID},
        repo {T} NOT NULL,
        "commit" {T} NOT NULL,
        branch {T},
        created_at {TIME} NOT NULL,
        UNIQUE (repo, "commit")
    );
    CREATE INDEX commits_repo ON commits (repo, id);

    CREATE TABLE jobs (
        id {ID},
        pipeline {T} NOT NULL,
        repo {T} NOT NULL,
        "commit" {T} NOT NULL,
        branch {T},
        status {T} NOT NULL,
        runner {T},
        attempt integer NOT NULL DEFAULT 1,
        reason {T},
        cancel_requested integer NOT NULL DEFAULT 0,
        created_at {TIME} NOT NULL,
        queued_at {TIME} NOT NULL,
        started_at {TIME},
        finished_at {TIME},
        event {T} NOT NULL DEFAULT 'api',
        origin_key {T} NOT NULL DEFAULT '',
        ref {T},
        pr integer,
        source_repo {T},
        author {T},
        subject {T},
        forge {T},
        changed {T},
        UNIQUE (repo, "commit", pipeline, origin_key)
    );
    CREATE INDEX jobs_status ON jobs (status);
    CREATE INDEX jobs_repo ON jobs (repo, id);
    CREATE INDEX jobs_repo_status ON jobs (repo, status);
    CREATE INDEX jobs_runner ON jobs (runner);
    CREATE INDEX jobs_queue ON jobs (queued_at, id) WHERE status = 'queued';
    CREATE INDEX jobs_commit ON jobs (repo, "commit");

    CREATE TABLE steps (
        job_id bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        attempt integer NOT NULL,
        idx integer NOT NULL,
        name {T} NOT NULL,
        status {T} NOT NULL,
        exit_code integer,
        started_at {TIME},
        finished_at {TIME},
        reason {T},
        PRIMARY KEY (job_id, attempt, idx)
    );

    CREATE TABLE log (
        id {ID},
        job_id bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        attempt integer NOT NULL,
        first_line integer NOT NULL,
        n_lines integer NOT NULL,
        data bytea NOT NULL,
        kind {T} NOT NULL DEFAULT 'step' CHECK (kind IN ('step', 'narwhal')),
        at {TIME}
    );
    CREATE UNIQUE INDEX log_job_line ON log (job_id, first_line);

    CREATE TABLE runners (
        name {T} PRIMARY KEY,
        config {T} NOT NULL,
        created_at {TIME} NOT NULL
    );
    CREATE TABLE runner_state (
        name {T} PRIMARY KEY,
        draining integer NOT NULL DEFAULT 0
    );

    CREATE TABLE repo_stats (
        repo {T} NOT NULL,
        status {T} NOT NULL,
        count integer NOT NULL,
        PRIMARY KEY (repo, status)
    );
    CREATE TABLE repo_hist (
        repo {T} NOT NULL,
        kind {T} NOT NULL CHECK (kind IN ('duration', 'wait')),
        bucket integer NOT NULL,
        count integer NOT NULL,
        PRIMARY KEY (repo, kind, bucket)
    );
    CREATE TABLE runner_stats (
        runner {T} PRIMARY KEY,
        jobs integer NOT NULL DEFAULT 0,
        passed integer NOT NULL DEFAULT 0,
        failed integer NOT NULL DEFAULT 0,
        busy_seconds double precision NOT NULL DEFAULT 0,
        first_started_at {TIME}
    );

    CREATE TABLE deliveries (
        forge {T} NOT NULL,
        delivery {T} NOT NULL,
        received_at {TIME} NOT NULL,
        answer {T} NOT NULL,
        PRIMARY KEY (forge, delivery)
    );
    CREATE INDEX deliveries_age ON deliveries (received_at);

    CREATE TABLE outbox (
        id {ID},
        job_id bigint NOT NULL,
        forge {T} NOT NULL,
        repo {T} NOT NULL,
        "commit" {T} NOT NULL,
        context {T} NOT NULL,
        state {T} NOT NULL,
        description {T} NOT NULL,
        created_at {TIME} NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_at {TIME} NOT NULL,
        delivered_at {TIME},
        failed_at {TIME},
        last_error {T},
        error_at {TIME}
    );
    CREATE INDEX outbox_pending ON outbox (forge, repo, "commit", context, id)
        WHERE delivered_at IS NULL AND failed_at IS NULL;
    CREATE INDEX outbox_forge ON outbox (forge, delivered_at, failed_at);
    CREATE INDEX outbox_errors ON outbox (forge, error_at) WHERE error_at IS NOT NULL;

    CREATE TABLE schedules (
        pipeline {T} PRIMARY KEY,
        last_tick {TIME} NOT NULL
    );

    CREATE TABLE events (
        id {ID},
        at {TIME} NOT NULL,
        kind {T} NOT NULL,
        job_id bigint,
        runner {T},
        data {T} NOT NULL
    );
    CREATE INDEX events_job ON events (job_id, id) WHERE job_id IS NOT NULL;
    CREATE INDEX events_runner ON events (runner, id) WHERE runner IS NOT NULL;
    CREATE TABLE step_lines (
        job_id bigint NOT NULL,
        attempt integer NOT NULL,
        idx integer NOT NULL,
        first_line integer,
        last_line integer,
        PRIMARY KEY (job_id, attempt, idx)
    );
    """,
    # 2: nodes (each dispatcher on the store, with its heartbeat), attempt leases and runner slots
    # (SQLite's 9).
    f"""
    CREATE TABLE nodes (
        id {T} PRIMARY KEY,
        host {T} NOT NULL,
        pid integer NOT NULL,
        started_at {TIME} NOT NULL,
        heartbeat_at {TIME} NOT NULL,
        stopped_at {TIME}
    );
    ALTER TABLE jobs ADD COLUMN node {T}, ADD COLUMN lease_until {TIME};
    CREATE INDEX jobs_node ON jobs (node) WHERE status = 'running';
    CREATE TABLE slots (
        runner {T} NOT NULL,
        slot integer NOT NULL,
        node {T} NOT NULL,
        job_id bigint NOT NULL,
        lease_until {TIME} NOT NULL,
        PRIMARY KEY (runner, slot)
    );
    CREATE INDEX slots_node ON slots (node);
    """,
    # 3: the last use of each pipeline cache volume (SQLite's 10).
    f"""
    CREATE TABLE cache_uses (
        volume {T} PRIMARY KEY,
        repo {T} NOT NULL,
        key {T} NOT NULL,
        used_at {TIME} NOT NULL
    );
    """,
    # 4: artifacts (SQLite's 11).
    f"""
    CREATE TABLE artifacts (
        job_id bigint NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        path {T} NOT NULL,
        attempt integer NOT NULL,
        sha256 {T} NOT NULL,
        size bigint NOT NULL,
        created_at {TIME} NOT NULL,
        expires_at {TIME} NOT NULL,
        PRIMARY KEY (job_id, path)
    );
    CREATE INDEX artifacts_expiry ON artifacts (expires_at);
    CREATE INDEX artifacts_object ON artifacts (sha256, expires_at);
    """,
    # 5: browser sessions (SQLite's 12).
    f"""
    CREATE TABLE sessions (
        key {T} PRIMARY KEY,
        created_at {TIME} NOT NULL,
        expires_at {TIME} NOT NULL
    );
    CREATE INDEX sessions_age ON sessions (created_at);
    CREATE INDEX sessions_expiry ON sessions (expires_at);
    """,
    # 6: log text compressed with lz4 rather than pglz (PostgreSQL 14 and newer, built with lz4; else
    # nothing changes): the server's CPU per byte of log, measured in bench/logload.py, is what a
    # chatty job costs it. Rows written before keep pglz; both read back the same.
    """
    DO $$
    BEGIN
        EXECUTE 'ALTER TABLE log ALTER COLUMN data SET COMPRESSION lz4';
    EXCEPTION WHEN syntax_error OR feature_not_supported OR invalid_parameter_value THEN
        NULL;
    END $$;
    """,
    # 7: each repository's queue in order, so a claim reads each one's first jobs, not the whole
    # queue sorted; the fingerprint of each node's pipelines and runners (SQLite's 13).
    f"""
    CREATE INDEX jobs_queued_repo ON jobs (repo, queued_at, id) WHERE status = 'queued';
    ALTER TABLE nodes ADD COLUMN config {T};
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def redact(url: str) -> str:
    """The URL without a password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host))


_BEGIN_WRITE = b"BEGIN"
_BEGIN_READ = b"BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"


def _client_bounds() -> dict[str, int]:
    """libpq's side of the bounds (tcp_user_timeout needs libpq 12 or newer)."""
    bounds = dict(KEEPALIVES)
    if psycopg.pq.version() >= 120000:
        bounds["tcp_user_timeout"] = int(TCP_USER_TIMEOUT * 1000)
    return bounds


def _server_bounds(idle_in_transaction: float) -> bytes:
    """The server's side, for one session: the same keepalives, and how long it may idle in a transaction."""
    return "; ".join([*(f"SET tcp_keepalives_{name} = {KEEPALIVES['keepalives_' + name]}"
                        for name in ("idle", "interval", "count")),
                      f"SET idle_in_transaction_session_timeout = {int(idle_in_transaction * 1000)}"]).encode()


@lru_cache(maxsize=1024)
def _pg_sql(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (our statements hold no ``?`` or ``%`` in literals)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _clean(params: Any) -> Any:
    """Text parameters as PostgreSQL's ``text`` takes them: NUL becomes U+FFFD."""
    if isinstance(params, dict):
        return {k: v.replace("\x00", "\ufffd") if isinstance(v, str) and "\x00" in v else v
                for k, v in params.items()}
    return [p.replace("\x00", "\ufffd") if isinstance(p, str) and "\x00" in p else p for p in params]


class PgTx:
    """One transaction on a pooled connection, taking the store's ``?`` statements."""

    __slots__ = ("conn", "events_locked")

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self.events_locked = False

    def execute(self, sql: str, params: Any = (), /) -> Any:
        if not params:
            return self.conn.execute(sql)
        return self.conn.execute(_pg_sql(sql), _clean(params))

    def executemany(self, sql: str, params: Iterable[Any], /) -> Any:
        with self.conn.cursor() as cur:
            cur.executemany(_pg_sql(sql), (_clean(p) for p in params))
            return cur.rowcount


class PostgresBackend:
    """A PostgreSQL database, through a pool of connections; safe from many threads and processes."""

    kind = "postgresql"
    for_update = " FOR NO KEY UPDATE"
    skip_locked = " FOR NO KEY UPDATE SKIP LOCKED"
    repo_queue = ("CROSS JOIN LATERAL (SELECT k.id, k.queued_at FROM jobs k WHERE k.status = 'queued' "
                  "AND k.repo = repos.repo ORDER BY k.queued_at, k.id LIMIT ?) AS j")

    def __init__(self, url: str, *, password: str | None = None, min_size: int = POOL_MIN,
                 max_size: int = POOL_MAX, pool_timeout: float = POOL_TIMEOUT,
                 idle_in_transaction: float = IDLE_IN_TRANSACTION):
        self.url = url
        self._pool_timeout = pool_timeout
        self._session = _server_bounds(idle_in_transaction)
        self.where = redact(url)
        self._kwargs: dict[str, Any] = {"application_name": "narwhal", "connect_timeout": CONNECT_TIMEOUT,
                                        **_client_bounds()}
        if password is not None:
            self._kwargs["password"] = password
        self._sizes = (min_size, max_size)
        # Two pools: the dispatcher's lease-keeping work (own_work) draws from one that API clients
        # cannot drain, so a flood of requests does not make the beat miss its leases.
        self._pools: dict[bool, psycopg_pool.ConnectionPool] = {}
        self._pid = os.getpid()
        self._inherited: list[psycopg_pool.ConnectionPool] = []  # a fork's parent's pools: never touched
        self._lock = threading.Lock()
        self._closed = False
        self._hold: psycopg.Connection | None = None
        self._hold_lock = threading.Lock()
        self.announcing = False  # settings.cluster: writes NOTIFY the other dispatchers (announce)

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.url, **self._kwargs)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot use the PostgreSQL store {self.where}: {_first_line(exc)}") from None

    def pool(self, own: bool | None = None) -> psycopg_pool.ConnectionPool:
        """This process's pool for this thread's work (a forked child opens its own): the
        dispatcher's own lease-keeping work (``own_work``) has ``OWN_POOL`` connections to itself;
        everything else (API requests, followers, the outbox) shares the rest."""
        if self._closed:
            raise RuntimeError(f"store {self.where} is closed")
        own = is_own_work() if own is None else own
        pool = self._pools.get(own)
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._pid != os.getpid():
                self._inherited.extend(self._pools.values())  # the parent's sockets: closing them would end its sessions
                self._pools = {}
                self._pid = os.getpid()
            if own not in self._pools:
                if not self._pools:
                    self._connect().close()  # a clear error now rather than a pool timeout later
                low, high = self._sizes
                shared = max(1, high - OWN_POOL)
                size = max(1, high - shared) if own else shared
                self._pools[own] = psycopg_pool.ConnectionPool(
                    self.url, kwargs=self._kwargs, min_size=min(low, size), max_size=size,
                    configure=self._configure, timeout=POOL_TIMEOUT, name="narwhal-own" if own else "narwhal", open=True)
            return self._pools[own]

    def _configure(self, conn: psycopg.Connection) -> None:
        """Each pooled connection: autocommit (transaction() sends its own BEGIN and COMMIT), and the
        server's bounds for its session."""
        conn.autocommit = True
        conn.execute(self._session)

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[PgTx]:
        """Committed on a clean exit, rolled back on an exception; a reader sees one snapshot.
        The BEGIN is ours (the pool's connections are in autocommit), so a reader's isolation
        costs no round trip of its own. A lost database is ``StoreUnavailable`` (503 at the API),
        never a driver's traceback; a pooled connection that broke meanwhile (the server
        restarted) is dropped and the BEGIN tried once more on another."""
        pool = self.pool()
        conn = self._begin(pool, _BEGIN_WRITE if write else _BEGIN_READ)
        try:
            try:
                yield PgTx(conn)
            except BaseException as exc:
                try:
                    conn.execute(b"ROLLBACK")
                except psycopg.Error:
                    pass  # a broken connection: the pool drops it
                if _lost(conn, exc):
                    raise StoreUnavailable(f"the PostgreSQL store {self.where} failed: {_first_line(exc)}") from None
                raise
            try:
                conn.execute(b"COMMIT")
            except psycopg.Error as exc:
                if not _lost(conn, exc):
                    raise
                raise StoreUnavailable(f"the PostgreSQL store {self.where} failed at commit (the change may or may "
                                       f"not be stored): {_first_line(exc)}") from None
        finally:
            pool.putconn(conn)

    def _begin(self, pool: psycopg_pool.ConnectionPool, begin: bytes) -> psycopg.Connection:
        problem = "no connection"
        for _ in range(2):
            try:
                conn = pool.getconn(timeout=self._pool_timeout)
            except psycopg_pool.PoolTimeout:
                raise StoreUnavailable(f"the PostgreSQL store {self.where} is unreachable: no connection within "
                                       f"{self._pool_timeout:g}s") from None
            try:
                conn.execute(begin)
                return conn
            except psycopg.OperationalError as exc:
                problem = _first_line(exc)
                pool.putconn(conn)  # broken: the pool discards it
        raise StoreUnavailable(f"the PostgreSQL store {self.where} is unreachable: {problem}")

    def hold(self, label: str, shared: bool = False) -> None:
        """A session advisory lock on a connection of its own, kept open while the dispatcher runs:
        PostgreSQL frees it when that connection ends, however the process ends. Taken again
        (after the database restarted, say), the old connection goes first. ``shared``: the lock
        the nodes of a cluster hold together; it keeps a lone dispatcher out, and them out of
        a database a lone dispatcher holds."""
        self.release()
        try:
            conn = psycopg.connect(self.url, autocommit=True, **{**self._kwargs,
                                                                 "application_name": f"narwhal {label}"[:63]})
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot use the PostgreSQL store {self.where}: {_first_line(exc)}") from None
        try:
            conn.execute(self._session)  # the server's side of the same keepalives
        except psycopg.Error as exc:
            conn.close()
            raise StoreUnavailable(f"cannot use the PostgreSQL store {self.where}: {_first_line(exc)}") from None
        take = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
        got = conn.execute(f"SELECT {take}(%s)", (DISPATCHER_LOCK,)).fetchone()
        if got is not None and got[0]:
            with self._hold_lock:
                self._hold = conn
            return
        holder = _holder(conn)
        conn.close()
        who = holder or "a dispatcher that is just stopping"
        if shared:
            raise StoreInUse(f"the PostgreSQL store {self.where} is in use by a narwhal serve without "
                             f"settings.cluster ({who}): stop it, or start it with cluster: true too")
        raise StoreInUse(f"the PostgreSQL store {self.where} is in use by another narwhal serve ({who}); "
                         "one dispatcher per database without settings.cluster: stop that one first, "
                         "or run every one with cluster: true")

    def holding(self) -> bool:
        with self._hold_lock:
            conn = self._hold
            if conn is None or conn.closed:
                return False
            try:
                conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                return False

    def try_exclusive(self, key: int) -> bool:
        """A session advisory lock on the hold's connection (True without a hold: nobody shares)."""
        with self._hold_lock:
            conn = self._hold
            if conn is None or conn.closed:
                return True
            try:
                got = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            except psycopg.Error as exc:
                raise StoreUnavailable(f"the PostgreSQL store {self.where} is unreachable: {_first_line(exc)}") from None
            return bool(got and got[0])

    def end_exclusive(self, key: int) -> None:
        with self._hold_lock:
            conn = self._hold
            if conn is not None and not conn.closed:
                try:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
                except psycopg.Error:
                    pass  # the session is gone, and the lock with it

    def release(self) -> None:
        with self._hold_lock:
            conn, self._hold = self._hold, None
        if conn is not None:
            conn.close()  # the lock goes with the session

    def close(self) -> None:
        self.release()
        self._closed = True
        with self._lock:
            pools, self._pools = self._pools, {}
        if self._pid == os.getpid():
            for pool in pools.values():
                pool.close()

    def set_password(self, password: str | None) -> None:
        """For connections opened from now on (the pool holds this very dict); open ones stay."""
        if password is None:
            self._kwargs.pop("password", None)
        else:
            self._kwargs["password"] = password

    # --- schema ------------------------------------------------------------------------

    def migrate(self) -> int:
        """Migrations run in one transaction under an advisory lock: dispatchers starting
        together wait for the first one, then find the schema current. A schema that needs
        moving while another dispatcher holds the database (an older narwhal, still running:
        a lone one, or nodes of a cluster) is left alone: ``StoreInUse``, naming it. A database
        that refuses (no right to create tables, say) is ``StoreUnavailable`` with its reason."""
        try:
            with self._connect() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
                conn.execute(f"CREATE TABLE IF NOT EXISTS meta (key {T} PRIMARY KEY, value {T} NOT NULL)")
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                current = int(row[0]) if row else 0
                if current > SCHEMA_VERSION:
                    raise StoreUnavailable(f"{self.where}: schema version {current} is newer than this narwhal "
                                           f"understands ({SCHEMA_VERSION}); upgrade narwhal")
                holder = _holder(conn) if current != SCHEMA_VERSION else None
                if holder is not None:
                    raise StoreInUse(f"the PostgreSQL store {self.where} (schema {current}) is in use by {holder}, "
                                     f"and this narwhal would move it to schema {SCHEMA_VERSION} under it: stop "
                                     "every narwhal serve on this database first, then start the new ones")
                for script in MIGRATIONS[current:]:
                    conn.execute(script.encode())  # several statements: no parameters, one round trip
                if current != SCHEMA_VERSION:
                    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
                                 "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),))
        except psycopg.Error as exc:
            hint = (" (narwhal creates its tables there: the role must own the database, or have CREATE on "
                    "its schema; see docs/deploy.md)" if isinstance(exc, psycopg.errors.InsufficientPrivilege) else "")
            raise StoreUnavailable(f"cannot set up narwhal's tables in the PostgreSQL store {self.where}: "
                                   f"{_first_line(exc)}{hint}") from None
        return SCHEMA_VERSION

    # --- dialect -------------------------------------------------------------------------

    def indexed_by(self, index: str) -> str:
        return ""  # the planner chooses; the indexes are the same

    def batch(self, tx: Any) -> AbstractContextManager[object]:
        return tx.conn.pipeline()

    def announce(self, tx: Any, log_only: bool = False) -> None:
        if self.announcing:  # delivered at commit; the same payload several times in one transaction arrives once
            tx.execute(f"SELECT pg_notify('{CHANNEL}', '{LOG_ONLY if log_only else ''}')")

    def listen(self, changed: Callable[[bool], None], stop: threading.Event) -> None:
        """LISTEN on a connection of its own; a lost connection is opened again after a pause."""
        while not stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, **self._kwargs) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    changed(True)  # whatever happened while it was not listening
                    while not stop.is_set():
                        for notice in conn.notifies(timeout=LISTEN_WAKE):
                            changed(notice.payload != LOG_ONLY)
                            break
            except psycopg.Error as exc:
                log.warning("listening to %s: %s; again in %gs", self.where, _first_line(exc), LISTEN_RETRY)
                stop.wait(LISTEN_RETRY)

    def now(self, tx: Any) -> float | None:
        """The server's clock: every node of a cluster reads the same one (clock_timestamp(), not the
        transaction's start, so a transaction that waited on a lock does not lease from the past)."""
        return float(tx.conn.execute(b"SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0])

    def lock_events(self, tx: Any) -> None:
        if not tx.events_locked:
            tx.conn.execute("SELECT pg_advisory_xact_lock(%s)", (EVENTS_LOCK,))
            tx.events_locked = True

    def log_value(self, text: str) -> bytes:
        return text.encode("utf-8", "surrogatepass")

    def log_text(self, value: Any) -> str:
        return bytes(value).decode("utf-8", "surrogatepass")

    def bulk_insert_jobs(self, tx: Any, columns: Sequence[str], rows: Iterable[dict]) -> int:
        """COPY into a temporary table, then one INSERT ... ON CONFLICT DO NOTHING, in order."""
        conn: psycopg.Connection = tx.conn
        names = ", ".join(f'"{c}"' for c in columns)
        conn.execute(f"CREATE TEMPORARY TABLE narwhal_bulk ON COMMIT DROP AS SELECT {names} FROM jobs WITH NO DATA")
        conn.execute("ALTER TABLE narwhal_bulk ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY")
        with conn.cursor() as cur:
            with cur.copy(f"COPY narwhal_bulk ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row([row[c] for c in columns])
            cur.execute(f"INSERT INTO jobs ({names}) SELECT {names} FROM narwhal_bulk ORDER BY seq "
                        "ON CONFLICT DO NOTHING")
            inserted = cur.rowcount
            cur.execute("ANALYZE jobs")  # the planner's statistics, now rather than at autovacuum's leisure
            return inserted


def _holder(conn: psycopg.Connection) -> str | None:
    """Who holds the dispatchers' lock on this database (``hold``): a session's name and address."""
    high, low = DISPATCHER_LOCK >> 32, DISPATCHER_LOCK & 0xFFFFFFFF
    row = conn.execute(
        "SELECT a.application_name, coalesce(host(a.client_addr), 'a local socket') FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
        "AND l.classid = %s AND l.objid = %s AND l.objsubid = 1 LIMIT 1", (high, low)).fetchone()
    return None if row is None else f"{row[0]} from {row[1]}"


def _lost(conn: psycopg.Connection, exc: BaseException) -> bool:
    """The connection failed, not the statement: the server is away, or it ended the session (a
    transaction idle past IDLE_IN_TRANSACTION: its client was cut off meanwhile)."""
    return isinstance(exc, (psycopg.OperationalError, psycopg.errors.IdleInTransactionSessionTimeout)) \
        or (isinstance(exc, psycopg.Error) and conn.broken)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
