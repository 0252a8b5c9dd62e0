"""The seam under the store: what a database must offer ``Store``, and nothing more.

``Store`` (store.py) holds every rule of narwhal's state once: the job transitions and
their guards, the aggregates, the outbox rows, the event log. It writes them in one
portable SQL (``?`` placeholders, ``INSERT ... ON CONFLICT``, ``RETURNING``, standard
aggregates) against a ``Backend``, which owns only what differs between databases:

* connections and transactions (``transaction(write)``: one unit of work, committed on a
  clean exit, rolled back on an exception);
* its schema and the numbered migrations that build it (``migrate``), with a version row;
* a few dialect words: ``for_update`` (the row lock a read-then-write needs where writers
  run at once), ``indexed_by`` (a planner hint, SQLite only), how log text is kept
  (``log_value``/``log_text``), how events get ids in commit order (``lock_events``), and
  the bulk load of jobs.

Two backends implement it: ``narwhal.dispatch.sqlite`` (the default, one file) and
``narwhal.dispatch.postgres`` (psycopg 3 with a pool; several dispatchers may share it).
A new table is one migration step per backend; its queries live in the store, once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from narwhal.errors import NarwhalError

_work = threading.local()


def own_work() -> None:
    """Mark this thread as the dispatcher's own lease-keeping work (the scheduler's store thread,
    the node's beat): where the backend pools connections, it draws from some that API clients
    cannot take, so a flood of requests cannot hold the beat up until its leases run out."""
    _work.own = True


def is_own_work() -> bool:
    return getattr(_work, "own", False)


class StoreInUse(NarwhalError):
    """Another dispatcher holds the store (one ``narwhal serve`` per database, for now)."""

    http_status = 409


class StoreUnavailable(NarwhalError):
    """The store cannot be opened: its database is unreachable, refuses us, or its driver is not
    installed. Said at start, without the password."""

    http_status = 503


class Cursor(Protocol):
    """What a statement returns: rows to fetch or iterate, and the rows it changed."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Tx(Protocol):
    """One open transaction: statements with ``?`` placeholders."""

    def execute(self, sql: str, params: Any = (), /) -> Cursor: ...

    def executemany(self, sql: str, params: Iterable[Any], /) -> Any: ...


class Backend(Protocol):
    """A database narwhal's store can live in."""

    kind: str  # "sqlite" or "postgresql"
    where: str  # for messages: the file, or the URL without its password
    for_update: str  # appended to a SELECT whose rows the transaction goes on to change
    skip_locked: str  # the same, skipping rows another transaction holds (claiming queued jobs)
    # A join from ``repos`` (a column ``repo``) to each one's first ``?`` queued jobs in queue order,
    # as ``j`` (``j.id``, ``j.queued_at``), through the index jobs_queued_repo (PostgreSQL: LATERAL).
    repo_queue: str

    def transaction(self, write: bool = True) -> AbstractContextManager[Tx]:
        """One transaction; a writer's is serialised with other writers as far as the database needs."""
        ...

    def migrate(self) -> int:
        """Bring the schema to this narwhal's version (creating it in an empty database); the version."""
        ...

    def close(self) -> None: ...

    def set_password(self, password: str | None) -> None:
        """The password for connections opened from now on (a rotated secret, at a reload)."""
        ...

    def hold(self, label: str, shared: bool = False) -> None:
        """Become the one dispatcher on this store, until ``release`` or the process ends (however it
        ends); ``StoreInUse`` naming the holder when another one is. ``shared``: one of the nodes of
        a cluster (``settings.cluster``), which hold it together and keep a lone dispatcher out."""
        ...

    def holding(self) -> bool:
        """Whether the hold still stands (its connection to the database answers)."""
        ...

    def release(self) -> None: ...

    def try_exclusive(self, key: int) -> bool:
        """Take a lock of the whole cluster named by ``key`` (its dispatchers on this store), on
        the hold's session: False when another dispatcher has it. It goes with ``end_exclusive``,
        or with the session, however the process ends."""
        ...

    def end_exclusive(self, key: int) -> None: ...

    def indexed_by(self, index: str) -> str:
        """A hint naming the index a query must use (``INDEXED BY``), or nothing."""
        ...

    def batch(self, tx: Tx) -> AbstractContextManager[object]:
        """Statements whose results nobody reads, sent together where the database can (PostgreSQL's
        pipeline mode: one round trip instead of one each)."""
        ...

    announcing: bool  # announce() tells the others (a node of a cluster)

    def announce(self, tx: Tx, log_only: bool = False) -> None:
        """Tell the other dispatchers of a cluster, at commit, that something changed (a log line,
        an event): their followers look again at once (``listen``). ``log_only``: log lines and
        nothing else (their schedulers need not look at the queue). Nothing unless ``announcing``."""
        ...

    def listen(self, changed: Callable[[bool], None], stop: threading.Event) -> None:
        """Call ``changed`` for every announcement of the other dispatchers, until ``stop``
        (blocking: run it on a thread of its own), with False when only log lines changed.
        Returns at once where nobody announces."""
        ...

    def lock_events(self, tx: Tx) -> None:
        """Before inserting into ``events``: make ids rise in commit order (readers resume by id)."""
        ...

    def now(self, tx: Tx) -> float | None:
        """The database server's clock (epoch seconds), for the times that dispatchers on several
        hosts compare (heartbeats, attempt and slot leases): their own clocks may disagree. None
        where one host writes (SQLite): its own clock is everyone's."""
        ...

    def log_value(self, text: str) -> Any:
        """A log row's text as the ``data`` column takes it (every character kept, NUL included)."""
        ...

    def log_text(self, value: Any) -> str:
        """``log_value``'s inverse."""
        ...

    def bulk_insert_jobs(self, tx: Tx, columns: Sequence[str], rows: Iterable[dict]) -> int:
        """Insert many job rows (those already there are left alone); how many were new."""
        ...
