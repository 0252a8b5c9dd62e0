"""Scheduled builds: the loop that turns each pipeline's ``schedule:`` into cron jobs.

One thread, owned by the dispatcher (``Dispatcher.start``/``stop``). A pass
(``ScheduleLoop.run_once``) looks at every pipeline with a schedule:

- never seen (no row in the store's ``schedules`` table): record the time now and
  build nothing, so a new schedule or a restored database never fires at once for a
  tick from before narwhal knew of it (``narwhal.config.schedule.due_ticks``);
- a tick due since the recorded one (only the latest, however many were missed while
  the dispatcher was down): for each repository the pipeline names exactly, look up the
  head of the schedule's branch (a fetch, in a fetch slot like any other) and queue a
  job of that pipeline with ``Origin(event="cron", key="cron:TICK")``, so an unchanged
  head still gets a new job every tick and the same tick never gets two; then record the
  tick. A crash between the jobs and the record builds that tick again at worst (the
  same head is the same job), never skips it;
- a failure (the git server down, every fetch slot taken) leaves the tick unrecorded
  and is tried again after a pause that doubles up to ``RETRY_MAX``.

Between passes the thread sleeps until the next tick of any schedule, at most
``MAX_SLEEP`` (a reload or a jump of the clock is seen within it), and wakes at once for
``wake()`` (a reload) or ``stop()``. ``clock`` gives the time (UTC, timezone-aware):
tests pass their own and call ``run_once`` themselves, with no thread and no sleeping.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from narwhal.config.loader import Config
from narwhal.config.pipeline import Pipeline
from narwhal.config.schedule import due_ticks, next_tick
from narwhal.dispatch.store import Store
from narwhal.errors import NarwhalError
from narwhal.job import Job

log = logging.getLogger(__name__)

MAX_SLEEP = 60.0  # seconds between passes at most
MIN_SLEEP = 0.05  # seconds: a tick a hair away is waited for, not spun on
RETRY_FIRST = 15.0  # seconds before a failed tick is tried again; doubles each failure
RETRY_MAX = 600.0
STOP_TIMEOUT = 15.0  # seconds stop() waits for the thread
BUSY_SLEEP = 1.0  # seconds before a pass again when another node of the cluster runs one
SCHEDULES_LOCK = 0x6E61727768616C04  # the cluster's lock of a schedule pass (Backend.try_exclusive)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Ticks(Protocol):
    """What the loop needs of the dispatcher (``narwhal.dispatch.dispatcher.Dispatcher``)."""

    config: Config
    store: Store

    def submit_tick(self, pipeline: Pipeline, repo: str, tick: datetime,
                    stop: threading.Event | None = None) -> tuple[str, list[tuple[Job, bool]]]: ...


@dataclass
class _Retry:
    at: datetime  # not before
    delay: float  # seconds of the last pause
    tick: datetime  # the tick that failed


class ScheduleLoop:
    """Builds every pipeline's scheduled ticks; ``start()`` runs it on a thread of its own."""

    def __init__(self, dispatcher: Ticks, clock: Callable[[], datetime] = utcnow):
        self.dispatcher = dispatcher
        self.clock = clock
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None
        self._retry: dict[str, _Retry] = {}  # pipeline -> when its failed tick is tried again

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._main, name="narwhal-schedules", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the loop; a head lookup it waits on is left to finish on its own thread."""
        self._stop.set()
        self._kick.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the schedule loop did not stop within %gs", timeout)

    def wake(self) -> None:
        """Run a pass now (the config changed, or a test moved its clock)."""
        self._kick.set()

    def _main(self) -> None:
        while not self._stop.is_set():
            self._kick.clear()
            try:
                pause = self.run_once()
            except Exception:  # noqa: BLE001 - the loop must outlive any one pass
                log.exception("schedule pass failed")
                pause = MAX_SLEEP
            self._kick.wait(min(max(pause, MIN_SLEEP), MAX_SLEEP))

    # --- one pass --------------------------------------------------------------------

    def run_once(self) -> float:
        """Build every due tick and record it; the seconds until a pass is needed again
        (infinite with no schedule; the thread wakes every ``MAX_SLEEP`` anyway).

        Several dispatchers on one store (``settings.cluster``) take turns: a pass runs under
        a lock of the whole cluster and reads the recorded ticks under it, so a tick is built
        by one node once; a node that finds the lock taken looks again soon after."""
        backend = self.dispatcher.store.backend
        if not backend.try_exclusive(SCHEDULES_LOCK):
            return BUSY_SLEEP
        try:
            return self._run_once()
        finally:
            backend.end_exclusive(SCHEDULES_LOCK)

    def _run_once(self) -> float:
        now = self.clock()
        pause = math.inf
        for pipeline in self.dispatcher.config.pipelines:
            if pipeline.schedule is None or self._stop.is_set():
                continue
            repos = pipeline.scheduled_repos()
            if not repos:
                continue  # a warning at config load says why
            try:
                pause = min(pause, self._pipeline(pipeline, repos, now))
            except Exception:  # noqa: BLE001 - one pipeline's trouble must not stop the others
                log.exception("schedule of pipeline %s failed", pipeline.name)
        return pause

    def _pipeline(self, pipeline: Pipeline, repos: list[str], now: datetime) -> float:
        schedule = pipeline.schedule
        assert schedule is not None
        store = self.dispatcher.store
        last = store.last_tick(pipeline.name)
        if last is None:
            store.record_tick(pipeline.name, now.timestamp())
            log.info("schedule of pipeline %s (%s): first seen; its ticks count from now",
                     pipeline.name, schedule.cron)
            return _until(next_tick(schedule, now), now)
        last_at = datetime.fromtimestamp(last, UTC)
        tick = due_ticks(schedule, last_at, now)
        if tick is None:
            self._retry.pop(pipeline.name, None)
            return _until(next_tick(schedule, max(last_at, now)), now)
        retry = self._retry.get(pipeline.name)
        if retry is not None and retry.tick == tick and retry.at > now:
            return _until(retry.at, now)
        try:
            for repo in repos:
                commit, jobs = self.dispatcher.submit_tick(pipeline, repo, tick, self._stop)
                new = [job.id for job, created in jobs if created]
                log.info("schedule of pipeline %s, tick %s: %s %s at %s: %s", pipeline.name,
                         tick.isoformat(), repo, schedule.branch, commit,
                         f"job {new[0]}" if new else "its job existed already")
        except NarwhalError as exc:
            delay = RETRY_FIRST if retry is None else min(retry.delay * 2, RETRY_MAX)
            self._retry[pipeline.name] = _Retry(now + timedelta(seconds=delay), delay, tick)
            log.warning("schedule of pipeline %s, tick %s: %s; trying again in %gs",
                        pipeline.name, tick.isoformat(), exc, delay)
            return delay
        store.record_tick(pipeline.name, tick.timestamp())  # after the jobs are committed
        self._retry.pop(pipeline.name, None)
        return _until(next_tick(schedule, max(tick, now)), now)


def _until(moment: datetime, now: datetime) -> float:
    return max((moment - now).total_seconds(), 0.0)
