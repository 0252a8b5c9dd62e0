"""The dispatcher's event log: what ``GET /events`` streams and the dashboard follows.

Job events are written by the store (narwhal.dispatch.store) in the transaction of each
change, on every backend alike: an event exists exactly when its change was committed,
whichever thread, process or dispatcher made it, and its id keeps rising in commit order
across restarts, so a client resumes with ``Last-Event-ID`` after a restart too. Runner
health lives in the scheduler, not the store: ``RunnerWatch`` compares the runners with
what it saw last, whenever the scheduler says something changed, and writes an event per
difference.

Kinds and their data (JSON objects):

* ``job.queued``, ``job.started``, ``job.finished`` (one per status change, retries and
  re-queues included): ``id pipeline repo branch commit event status reason runner attempt
  created_at started_at finished_at``;
* ``job.step``: ``id attempt idx name status exit_code line`` (``line``: the job's next log
  line number when the step changed, so a page knows where a step's lines begin and end);
* ``runner.health``: ``name state reason load draining drain_reason running capacity``.

``step_lines`` keeps, per step, the log lines it wrote (never pruned: one small row per
step); ``events`` keeps the last ``KEEP`` events.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from narwhal.dispatch.store import EVENTS_KEPT, Store

log = logging.getLogger(__name__)

KEEP = EVENTS_KEPT  # events kept; older ones are deleted (a client resuming before them gets a reset)
READ_LIMIT = 1000  # events read at a time
KINDS = ("job.queued", "job.started", "job.finished", "job.step", "runner.health")


@dataclass(frozen=True)
class Event:
    id: int
    at: float
    kind: str
    data: dict

    def to_dict(self) -> dict:
        return {"id": self.id, "at": self.at, "kind": self.kind, "data": self.data}


@dataclass(frozen=True)
class Batch:
    """Events after a point. ``reset``: the point is no longer (or not yet) in the log, so a
    client must reload its picture; ``last``: the id to resume after."""

    events: list[Event]
    last: int
    reset: bool = False


class EventLog:
    """The ``events`` table over a ``Store``: read, and append runner events."""

    def __init__(self, store: Store):
        self.store = store

    def latest(self) -> int:
        with self.store._tx(write=False) as db:  # noqa: SLF001
            return db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]

    def since(self, after: int | None, limit: int = READ_LIMIT) -> Batch:
        """Events numbered above ``after`` (None: from now on), oldest first, at most ``limit``."""
        with self.store._tx(write=False) as db:  # noqa: SLF001
            first, last = db.execute("SELECT coalesce(min(id), 0), coalesce(max(id), 0) FROM events").fetchone()
            if after is None:
                return Batch([], last)
            if after > last or (first and after < first - 1):
                return Batch([], last, reset=True)  # a log from another store, or pruned past the point
            rows = db.execute("SELECT id, at, kind, data FROM events WHERE id > ? ORDER BY id LIMIT ?",
                              (after, max(1, limit))).fetchall()
        events = [Event(i, at, kind, json.loads(data)) for i, at, kind, data in rows]
        return Batch(events, events[-1].id if events else after)

    def for_job(self, job_id: int, limit: int = 200) -> list[Event]:
        with self.store._tx(write=False) as db:  # noqa: SLF001
            rows = db.execute("SELECT id, at, kind, data FROM events WHERE job_id = ? ORDER BY id DESC LIMIT ?",
                              (job_id, limit)).fetchall()
        return [Event(i, at, kind, json.loads(data)) for i, at, kind, data in reversed(rows)]

    def for_runner(self, name: str, limit: int = 50) -> list[Event]:
        """The runner's most recent health events, newest first."""
        with self.store._tx(write=False) as db:  # noqa: SLF001
            rows = db.execute("SELECT id, at, kind, data FROM events WHERE runner = ? ORDER BY id DESC LIMIT ?",
                              (name, limit)).fetchall()
        return [Event(i, at, kind, json.loads(data)) for i, at, kind, data in rows]

    def step_lines(self, job_id: int, attempt: int) -> dict[int, tuple[int | None, int | None]]:
        """idx -> (first line, last line) of an attempt's steps, as far as known."""
        with self.store._tx(write=False) as db:  # noqa: SLF001
            rows = db.execute("SELECT idx, first_line, last_line FROM step_lines WHERE job_id = ? AND attempt = ?",
                              (job_id, attempt)).fetchall()
        return {idx: (first, last) for idx, first, last in rows}

    def add_runner_event(self, name: str, data: dict) -> int:
        return self.store.add_event("runner.health", data, runner=name)


def runner_view(runner: dict) -> dict:
    """What a runner event says about a runner (``Scheduler.runners()`` entry)."""
    health = runner.get("health") or {}
    return {"name": runner["name"], "state": health.get("state"), "reason": health.get("reason"),
            "load": health.get("load"), "draining": runner.get("draining"),
            "drain_reason": runner.get("drain_reason"), "running": runner.get("running"),
            "capacity": runner.get("capacity")}


def _differs(old: dict | None, new: dict) -> bool:
    """A change worth an event: state, reason, drain, running jobs (not every load wobble)."""
    if old is None:
        return True
    keys = ("state", "reason", "draining", "drain_reason", "running", "capacity")
    return any(old.get(k) != new.get(k) for k in keys)


class RunnerWatch:
    """A thread that writes a ``runner.health`` event whenever a runner's state changes."""

    def __init__(self, events: EventLog, runners: Callable[[], list[dict]],
                 wait_change: Callable[[int, float], bool], version: Callable[[], int]):
        self.events = events
        self.runners = runners
        self.wait_change = wait_change
        self.version = version
        self.seen: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._latest_by_runner()

    def _latest_by_runner(self) -> None:
        """Start from what the log says last, so a restart does not repeat unchanged states."""
        with self.events.store._tx(write=False) as db:  # noqa: SLF001
            rows = db.execute("SELECT runner, data FROM events WHERE id IN "
                              "(SELECT max(id) FROM events WHERE runner IS NOT NULL GROUP BY runner)").fetchall()
        self.seen = {name: json.loads(data) for name, data in rows}

    def check(self) -> list[int]:
        """Compare once; returns the ids of the events written."""
        written = []
        for runner in self.runners():
            view = runner_view(runner)
            if _differs(self.seen.get(view["name"]), view):
                written.append(self.events.add_runner_event(view["name"], view))
                self.seen[view["name"]] = view
        return written

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="narwhal-runnerwatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen = self.version()
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a stopping scheduler or a busy disk: try again later
                log.debug("runner watch", exc_info=True)
            self.wait_change(seen, 1.0)
            seen = self.version()
            self._stop.wait(0.05)  # a burst of changes costs one comparison

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def event_json(event: Event) -> str:
    return json.dumps(event.data, separators=(",", ":"))
