"""The scheduler: owns the runner connections, picks a runner for each queued job,
runs it, polls runner health, and recovers jobs lost with a runner.

It lives on one asyncio loop in its own thread, and that thread alone touches the
runner registry (``slots``): API threads hand their changes and questions to it with
``Scheduler.call``. The API threads write new jobs to the store and then *wake* the
loop (``Scheduler.wake``); pickup is push-based, with no polling interval between a
submit and a start.

The loop itself never calls SQLite: a slow disk must not stall SSH keepalives or
health checks. Every store call of the loop goes to one store thread, in order
(``Scheduler.write`` queues one, ``Scheduler._db`` awaits one, ``Scheduler.write_log``
queues a job's lines, which join the other jobs' lines queued just before them in one
transaction: ``narwhal.dispatch.storequeue``), so a step's log lines are stored before its
end, an outcome before the next pickup reads the queue, and every read sees the writes
queued before it. The lines on their way are bounded: past ``LOG_BACKLOG`` the steps'
readers wait (``StoreSink.room``) and the runners' output waits in their SSH windows.

With ``settings.cluster`` (several dispatchers on one PostgreSQL database) the scheduler is
one node among several (``node``): it claims queued jobs with ``Store.claim_jobs`` (no two
nodes start one job), takes each runner's capacity through slot leases (``Store.acquire_slot``:
a runner of capacity 2 runs 2 jobs across every node), writes as its node (a write into an
attempt another node took over raises ``LeaseLost``: the local run of that attempt stops
quietly), looks at the shared queue every ``CLUSTER_POLL`` seconds (jobs submitted to other
nodes), and re-queues the attempts of nodes whose lease ran out (``Store.take_over``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from narwhal.config.inventory import Runner, validate_runner
from narwhal.config.loader import Config
from narwhal.config.pipeline import Pipeline
from narwhal.config.secrets import Grant
from narwhal.config.settings import Settings
from narwhal.deadline import Stop
from narwhal.dispatch import caches as caches_mod
from narwhal.dispatch.artifacts import SWEEP_INTERVAL, ArtifactStore
from narwhal.dispatch.outbox import target_url
from narwhal.dispatch.store import LeaseLost, LogBatch, Store
from narwhal.dispatch.storequeue import StoreQueue
from narwhal.errors import NarwhalError, RunnerError, SourceError
from narwhal.execution import cache as cache_exec
from narwhal.execution import health as health_mod
from narwhal.execution import runner as runner_mod
from narwhal.execution.clone import Workspaces
from narwhal.execution.health import Health
from narwhal.execution.runner import Outcome
from narwhal.execution.transport import Transport, make_transport
from narwhal.job import Job, JobStatus, LogKind, Origin, StepStatus
from narwhal.masking import Masker
from narwhal.text import printable, step_started

log = logging.getLogger(__name__)

LOG_FLUSH_INTERVAL = 0.05  # seconds between log flushes of a running job
LOG_FLUSH_LINES = 2000  # flush earlier when this many lines are buffered
CALL_TIMEOUT = 30.0  # seconds an API thread waits for the loop to answer
REAP_EVERY = 12  # healthy checks between two reaps of a runner that stayed healthy (1 min at 5 s)
STOP_PATIENCE = 120.0  # seconds stop(grace) waits, after the grace, for steps to stop (no signal waits)
CLOSE_TIMEOUT = 5.0  # seconds for runner connections to close when the loop ends without a stop
CLUSTER_POLL = 1.0  # seconds between a cluster node's looks at the shared queue and at cancellations
CLAIM_BATCH = 50  # queued jobs one claim looks at (the oldest)

T = TypeVar("T")


class Archives(Protocol):
    """Where a job's source comes from (``source.Mirror``)."""

    def archive(self, repo: str, commit: str) -> AsyncIterator[bytes]: ...

    def describe(self, repo: str, commit: str) -> tuple[str | None, str | None]: ...

    def contains(self, repo: str, name: str, commit: str) -> bool: ...

    def tree_entries(self, repo: str, commit: str, paths: list[str]) -> list[tuple[str, str]]: ...


# Events whose branch is someone's word about the commit: the caller's (POST /commit, the
# dashboard) or a push delivery's (signed with a forge's one webhook secret, which every
# repository admin who set up a hook there holds). A branch-limited secret needs the commit
# to be on that branch (``Archives.contains``). A pull request's branch is its target, which
# its head is not on: a secret that allows pull_request events is meant for strangers' code.
CLAIMED_BRANCH_EVENTS = ("api", "manual", "push")
LOST_ON_KEPT = 10_000  # jobs whose lost attempts' runners are remembered (the oldest are forgotten)


@dataclass
class Slot:
    """One runner as the scheduler sees it: config, connection, health, load.

    Only the scheduler's loop thread reads or changes a slot.
    """

    runner: Runner
    source: str  # "inventory" or "api"
    transport: Transport | None = None
    health: Health = field(default_factory=lambda: Health(state="unknown", reason="not checked yet",
                                                          checked_at=None))
    draining: bool = False
    auto_drained: str | None = None  # reason when narwhal drained it (low disk)
    running: dict[int, int] = field(default_factory=dict)  # job id -> attempt
    # job id -> the capacity it holds: 1, or up to the steps it may run at once (its
    # pipeline's graph, within ``parallel``), as many as were free when it started.
    held: dict[int, int] = field(default_factory=dict)
    removed: bool = False
    stale: list[Transport] = field(default_factory=list)  # old connections, closed when idle
    checks_to_reap: int = 0  # healthy checks until the next reap (see Scheduler._check)

    @property
    def name(self) -> str:
        return self.runner.name

    @property
    def used(self) -> int:
        """Capacity held by the jobs running here (a job running steps side by side holds more than 1)."""
        return sum(self.held.get(job, 1) for job in self.running)

    @property
    def load(self) -> float:
        return self.used / max(1, self.runner.capacity)

    def reserve(self, pipeline: Pipeline) -> int:
        """How much capacity a job of ``pipeline`` takes if it starts here now: at least 1, at most
        the steps it may run at once, and no more than is free (it never waits for more)."""
        return max(1, min(pipeline.width(), self.runner.capacity - self.used))

    @property
    def has_room(self) -> bool:
        """Could take some job now, labels aside."""
        return self._busy() is None

    def why_not(self, pipeline: Pipeline) -> str | None:
        """Why this runner cannot take a job of ``pipeline`` now; None if it can."""
        missing = sorted(set(pipeline.labels) - set(self.runner.labels))
        if missing:
            return "missing labels: " + ", ".join(missing)
        return self._busy()

    def _busy(self) -> str | None:
        """Why this runner takes no job at all now (labels aside); None if it could."""
        if self.removed:
            return "removed"
        if self.draining:
            return "draining" + (f" ({self.auto_drained})" if self.auto_drained else "")
        if not self.health.is_healthy:
            return f"{self.health.state}: {self.health.reason or 'no reason given'}"
        if self.used >= self.runner.capacity:
            return f"capacity full ({self.used}/{self.runner.capacity})"
        return None

    def to_dict(self) -> dict:
        r = self.runner
        return {
            "name": r.name,
            "source": self.source,
            "transport": r.transport,
            "host": r.host,
            "port": r.port,
            "user": r.user,
            "labels": list(r.labels),
            "capacity": r.capacity,
            "running": len(self.running),
            "used": self.used,
            "jobs": sorted(self.running),
            "draining": self.draining,
            "drain_reason": self.auto_drained,
            "health": self.health.to_dict(),
        }


def _forget(tasks: dict[int, asyncio.Task[None]], key: int, _: object) -> None:
    tasks.pop(key, None)


class StoreSink:
    """runner.Sink that hands steps and batched log lines to the store thread, in order.

    Its methods run on the loop and never wait for the disk.
    """

    def __init__(self, scheduler: Scheduler, job_id: int, attempt: int):
        self.scheduler = scheduler
        self.store = scheduler.store
        self.job_id = job_id
        self.attempt = attempt
        self.buffer: list[str] = []
        self.on_outcome: Callable[[Outcome], None] | None = None
        self.recorded = False

    def job_finished(self, outcome: Outcome) -> None:
        """runner.run_job knows the outcome: record it before the cleanup runs."""
        self.flush()
        if not self.recorded and self.on_outcome is not None:
            self.recorded = True
            self.on_outcome(outcome)

    def step_started(self, idx: int, name: str) -> None:
        self.flush()
        self.scheduler.write_attempt(self.store.start_step, self.job_id, self.attempt, idx, name)
        self.note(step_started(name))  # the step's header in `narwhal logs`

    def step_finished(self, idx: int, name: str, status: StepStatus, exit_code: int | None,
                      reason: str | None = None) -> None:
        self.flush()
        self.scheduler.write_attempt(self.store.finish_step, self.job_id, self.attempt, idx, status, exit_code,
                                     None, reason)

    def note(self, text: str) -> None:
        """narwhal's own line: a row of its own, of kind "narwhal", after the step lines before it."""
        self.flush()
        self.scheduler.write_log(LogBatch(self.job_id, self.attempt, [printable(text)], LogKind.NARWHAL.value))

    def log_lines(self, lines: list[str]) -> None:
        self.buffer.extend(lines)
        if len(self.buffer) >= LOG_FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            lines, self.buffer = self.buffer, []
            self.scheduler.write_log(LogBatch(self.job_id, self.attempt, lines))

    async def room(self) -> None:
        """Wait while the store is too far behind the jobs' output (the store queue's backlog)."""
        await self.scheduler.store_queue.room()


class Scheduler:
    """Runs queued jobs on runners. Start with ``start()``; every public method is thread-safe."""

    def __init__(self, config: Config, store: Store, mirror: Archives, artifacts: ArtifactStore | None = None,
                 workspaces: Workspaces | None = None, *, node: str | None = None, lease: float = 15.0,
                 takeover_interval: float = 5.0):
        self.config = config
        self.artifacts = artifacts  # where jobs' artifacts go (None: pipelines' artifacts are not kept)
        # settings.cluster: this dispatcher's node id (narwhal.dispatch.nodes), the lease of its
        # claims and slots, and how often it looks for attempts of nodes whose lease ran out.
        self.node = node
        self.lease = lease
        self.takeover_interval = takeover_interval
        self._slot_leases: dict[int, tuple[int, str, list[int]]] = {}  # job -> (attempt, runner, slots)
        self._lost: set[tuple[int, int]] = set()  # attempts another node took over (LeaseLost)
        # (job, attempt) this node claimed and still works on, from its claim until its last write
        # is done (store thread; the node's heartbeat thread reads it: ``leased``)
        self._leased: set[tuple[int, int]] = set()
        self._leased_lock = threading.Lock()
        self.settings: Settings = config.settings
        self.store = store
        self.mirror = mirror
        self.workspaces = workspaces  # pipelines' clone: (a .git, submodules); None: not offered
        self.owner = store.owner_id
        self.slots: dict[str, Slot] = {}  # the runner registry: the loop thread's alone once started
        self.changed = threading.Condition()  # notified on every log flush / state change
        self.version = 0  # bumped with every notify: lets waiters not miss a change
        self.listeners: list[Callable[[], None]] = []  # called on every notify (cheap, non-blocking)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake: asyncio.Event | None = None
        self._calls_open = False  # True while the loop answers call()
        self._calls_lock = threading.Lock()
        # The one thread that runs the loop's store calls, first in first out; log lines wait there, bounded.
        self.store_queue = StoreQueue(self._write_logs)
        self._active: set[tuple[int, int]] = set()  # (job, attempt) this dispatcher is running
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._cancels: dict[int, asyncio.Event] = {}
        self._served: dict[str, float] = defaultdict(float)  # repo -> last pickup (fairness)
        self._evicted: set[int] = set()  # jobs stopped by shutdown, to re-queue
        self._specs: dict[int, runner_mod.JobSpec] = {}  # running attempts (shutdown stops them at once)
        self._accepting = True  # False once shutting down: no new pickups
        self._closing = False  # True when shutdown is done: the loop ends
        self._stop: Stop | None = None  # the stop under way: its deadlines bound every wait of it
        # job id -> runners an attempt of it was lost on (Docker down, disk full): its next
        # attempt goes elsewhere when another runner can take it (loop thread; bounded).
        self._lost_on: dict[int, set[str]] = {}
        self._stopped = threading.Event()
        self.cache_uses = caches_mod.CacheUses(store)
        self._cache_swept: dict[str, float] = {}  # runner -> monotonic time of its last cache sweep
        states = store.runner_states()
        self._set_slots(config, store.api_runners(), states)
        for name, state in states.items():
            if name in self.slots and state.get("draining"):
                self.slots[name].draining = True

    # --- lifecycle (called from other threads) --------------------------------------

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="narwhal-scheduler",
                                        daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self, stop: Stop | float = 0.0) -> None:
        """Stop taking jobs; running jobs may finish until ``stop.jobs``, then their steps are
        stopped and the jobs re-queued, and connections closed, by ``stop.end``.

        A number is a grace for the jobs alone, with up to a minute more to stop them (no
        signal is waiting on it). When it returns by the end, every store write of the
        scheduler is done; a step that would not stop is left for the next start to recover.
        """
        if not isinstance(stop, Stop):
            stop = Stop.after_grace(stop, patience=STOP_PATIENCE)
        if not self.loop or self._stopped.is_set():
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(stop), self.loop)
        try:
            fut.result(timeout=stop.end.left())
        except Exception:  # noqa: BLE001 - shutting down anyway
            log.exception("scheduler shutdown")
        self._stopped.wait(timeout=stop.end.left())

    def wake(self) -> None:
        """Tell the loop that something changed (new job, runner, resume)."""
        loop, event = self.loop, self._wake
        if loop is None or event is None:
            return
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the loop is closed: nothing left to wake
            pass

    def notify(self) -> None:
        with self.changed:
            self.version += 1
            self.changed.notify_all()
        for listener in self.listeners:
            listener()

    def changed_elsewhere(self, jobs: bool = True) -> None:
        """Another node of the cluster wrote (a job queued or ended, a log line): followers look
        again, and unless it wrote log lines alone (``jobs`` False), the loop looks at the shared
        queue now rather than at its next poll (a chatty job elsewhere is no reason to)."""
        self.notify()
        if jobs:
            self.wake()

    def wait_change(self, seen: int, timeout: float) -> bool:
        """Block until ``version`` moves past ``seen`` (True) or ``timeout`` passes (False)."""
        with self.changed:
            return self.changed.wait_for(lambda: self.version != seen, timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop thread and return its result (or raise its exception).

        Before ``start()`` and after the loop has ended, no other thread owns the
        registry, and ``fn`` runs right here.
        """
        answer: concurrent.futures.Future[T] | None = None
        with self._calls_lock:
            if self._calls_open and threading.current_thread() is not self._thread:
                assert self.loop is not None
                future: concurrent.futures.Future[T] = concurrent.futures.Future()
                answer = future

                def run() -> None:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn(*args))
                        except BaseException as exc:  # noqa: BLE001 - handed to the caller
                            future.set_exception(exc)

                self.loop.call_soon_threadsafe(run)
        if answer is None:
            return fn(*args)
        return answer.result(timeout=CALL_TIMEOUT)

    def write(self, fn: Callable[..., object], *args: Any) -> None:
        """Queue a store call for the store thread; waiters are notified once it is done."""
        self.store_queue.submit(self._written, fn, *args)

    def write_log(self, batch: LogBatch) -> None:
        """Queue a running attempt's lines for the store thread (in a cluster, as this node)."""
        self.store_queue.append(batch)

    def _write_logs(self, batches: list[LogBatch]) -> None:
        """(store thread) One group of log batches, in one transaction; should that fail, each
        batch on its own, so that one bad batch loses only its own lines."""
        try:
            lost = self.store.append_logs(batches, node=self.node)
        except Exception:  # noqa: BLE001 - told below, batch by batch
            for b in batches:
                self._written(functools.partial(self.store.append_log, node=self.node), b.job_id, b.attempt,
                              b.lines, b.kind)
            return
        for exc in lost:
            self._lose(exc)
        self.notify()

    def write_attempt(self, fn: Callable[..., object], *args: Any) -> None:
        """``write`` of a store call into a running attempt: in a cluster, as this node (fenced)."""
        if self.node is None:
            self.write(fn, *args)
        else:
            self.write(functools.partial(fn, node=self.node), *args)

    def _written(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except LeaseLost as exc:
            self._lose(exc)
        except Exception:  # noqa: BLE001 - nobody waits for this call: say it failed
            log.exception("store call %s failed", getattr(fn, "__name__", getattr(fn, "func", fn)))
        finally:
            self.notify()

    def leased(self) -> list[tuple[int, int]]:
        """(any thread) The attempts whose leases this node's heartbeat renews: those it claimed and
        still works on. An attempt leaves once its last write is done (``_unlease``): if that
        write failed (the database was away), nothing renews the lease any more, and the
        attempt is taken over when it runs out, rather than left running for ever."""
        with self._leased_lock:
            return sorted(self._leased)

    def _unlease(self, job_id: int, attempt: int) -> None:
        """(store thread, queued after the attempt's last write)"""
        with self._leased_lock:
            self._leased.discard((job_id, attempt))

    def _lose(self, exc: LeaseLost) -> None:
        """(any thread) Another node took this attempt over: stop running it here, quietly (its
        steps are stopped and its containers removed as for a cancel), and store nothing more of it."""
        loop = self.loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._lost_attempt, exc.job_id, exc.attempt, str(exc))
        except RuntimeError:  # the loop is closed: nothing runs any more
            pass

    def _lost_attempt(self, job_id: int, attempt: int, why: str) -> None:
        if (job_id, attempt) in self._lost or (job_id, attempt) not in self._active:
            return
        self._lost.add((job_id, attempt))
        log.warning("%s: another node took it over; stopping it here", why)
        event = self._cancels.get(job_id)
        if event is not None:
            event.set()

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """A store call on the store thread, after every write queued before it."""
        return await asyncio.wrap_future(self.store_queue.submit(fn, *args))

    # --- runner administration (thread-safe) -----------------------------------------

    def runners(self) -> list[dict]:
        return self.call(lambda: [s.to_dict() for s in self.slots.values() if not s.removed])

    def runner(self, name: str) -> dict | None:
        """One runner as ``runners()`` lists it; None if there is none of that name."""
        def get() -> dict | None:
            slot = self.slots.get(name)
            return None if slot is None or slot.removed else slot.to_dict()
        return self.call(get)

    def add_runner(self, runner: Runner) -> dict:
        data = self.call(self._add_runner, runner)
        self.wake()
        return data

    def remove_runner(self, name: str) -> None:
        self.call(self._remove_runner, name)

    def set_draining(self, name: str, draining: bool) -> dict:
        data = self.call(self._set_draining, name, draining)
        self.store.set_runner_state(name, draining)
        self.wake()
        return data

    def reload(self, config: Config) -> None:
        """Swap in a new config; running jobs keep running where they are."""
        api_runners, states = self.store.api_runners(), self.store.runner_states()
        self.call(self._reload, config, api_runners, states)
        self.wake()

    def cancel(self, job_id: int) -> None:
        def go() -> None:
            event = self._cancels.get(job_id)
            if event:
                event.set()
        self.call(go)

    def waiting_reasons(self, job: Job) -> list[dict]:
        """Per runner, why a queued job is not running there yet."""
        return self.call(self._waiting_reasons, job)

    def pipeline(self, name: str) -> Pipeline | None:
        return self.config.pipeline(name)

    def runners_for(self, pipeline: Pipeline) -> list[str]:
        return self.call(lambda: [s.name for s in self.slots.values()
                                  if not s.removed and s.runner.carries(pipeline.labels)])

    # --- the same, on the loop thread ------------------------------------------------

    def _add_runner(self, runner: Runner) -> dict:
        slot = self.slots[runner.name] = Slot(runner=runner, source="api")
        if self._on_loop():
            asyncio.create_task(self._check(slot))
        return slot.to_dict()

    def _remove_runner(self, name: str) -> None:
        slot = self.slots[name]
        slot.removed = True
        slot.draining = True
        self._retire(slot)

    def _set_draining(self, name: str, draining: bool) -> dict:
        slot = self.slots[name]
        slot.draining = draining
        if not draining:
            slot.auto_drained = None
        return slot.to_dict()

    def _waiting_reasons(self, job: Job) -> list[dict]:
        pipeline = self.pipeline(job.pipeline)
        if pipeline is None:
            return [{"runner": None, "reason": f"pipeline {job.pipeline!r} no longer exists"}]
        reasons = [{"runner": s.name, "reason": s.why_not(pipeline) or "free: next pickup takes it"}
                   for s in self.slots.values() if not s.removed]
        return reasons or [{"runner": None, "reason": "no runners"}]

    def _on_loop(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    # --- the loop --------------------------------------------------------------------

    def _main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        self._wake = asyncio.Event()
        with self._calls_lock:
            self._calls_open = True
        ready.set()
        try:
            loop.run_until_complete(self._run())
        finally:
            loop.run_until_complete(self._abandon_jobs())
            loop.run_until_complete(self._close_transports())
            with self._calls_lock:
                self._calls_open = False
            loop.call_soon(loop.stop)
            loop.run_forever()  # answer the calls that came in before the door closed
            loop.close()
            self.store_queue.shutdown()  # every queued write is done
            self._stopped.set()

    async def _run(self) -> None:
        assert self._wake is not None
        self._health_task = asyncio.create_task(self._health_loop())
        cluster_task = asyncio.create_task(self._cluster_loop()) if self.node is not None else None
        sweeper = asyncio.create_task(self._sweep_loop())
        await self._recover()
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            if self._accepting:
                try:
                    await self._pickup()
                except Exception:  # noqa: BLE001 - the loop must survive anything
                    log.exception("pickup failed")
        self._health_task.cancel()
        sweeper.cancel()
        if cluster_task is not None:
            cluster_task.cancel()
        await asyncio.gather(self._health_task, sweeper, *([cluster_task] if cluster_task else []),
                             return_exceptions=True)

    async def _recover(self) -> None:
        """On start, no job the store says is running may stay so: re-queue each."""
        await self._db(self._recover_jobs)
        self.wake()

    def _recover_jobs(self) -> None:
        """(store thread) In a cluster, only attempts no node claimed (a lone dispatcher ran them): every
        node's own are its to finish, and those of a node that is gone are taken over when its
        lease runs out (``_take_over``), this node's previous life's among them."""
        if self.node is not None:
            for job_id, attempt in self.store.orphaned_attempts():
                job = self.store.take_orphan(job_id, attempt, "dispatcher restarted while it ran",
                                             max_attempts=self.settings.max_attempts)
                if job is not None:
                    log.info("job %s: attempt %s of a dispatcher without cluster: %s", job_id, attempt,
                             job.status.value)
            return
        cancelled = set(self.store.jobs_to_cancel())
        for job in self.store.running_jobs():
            if (job.id, job.attempt) in cancelled:
                self.store.finish_job(job.id, job.attempt, JobStatus.CANCELLED, "cancelled")
            else:
                self._requeue_or_fail(job.id, job.attempt, "dispatcher restarted while it ran")

    async def _pickup(self) -> None:
        """Give as many queued jobs as possible a runner: fair across repositories.

        Only one pickup runs at a time (``_run`` awaits it), and the store starts a job
        only if it is still queued at that attempt: no job starts twice.
        """
        if not any(s.has_room for s in self.slots.values()):
            return  # nobody could take a job: do not even read the queue
        if self.node is not None:
            while await self._claim() and self._accepting and any(s.has_room for s in self.slots.values()):
                pass
            return
        queued = await self._db(self.store.queued_jobs)
        if not queued:
            return
        per_repo: dict[str, list[Job]] = defaultdict(list)
        for job in queued:
            per_repo[job.repo].append(job)
        repos = sorted(per_repo, key=lambda r: (self._served[r], per_repo[r][0].id))
        progress = True
        while progress and any(per_repo.values()):
            progress = False
            for repo in repos:
                jobs = per_repo[repo]
                while jobs:
                    job = jobs[0]
                    outcome = await self._try_start(job)
                    if outcome == "wait":
                        # This job cannot start now; later jobs of the repo may (other labels).
                        jobs.pop(0)
                        continue
                    jobs.pop(0)
                    if outcome == "started":
                        self._served[repo] = time.monotonic()
                    # A job that ended without starting (its pipeline gone, cancelled or taken
                    # meanwhile) is progress too: the jobs behind it must still be tried, as
                    # nothing else would wake the loop for them.
                    progress = True
                    break  # one job per repository per round: fairness

    async def _try_start(self, job: Job) -> str:
        pipeline = self.pipeline(job.pipeline)
        if pipeline is None:
            await self._db(self._refuse, job, f"pipeline {job.pipeline!r} no longer exists")
            self.notify()
            return "done"
        # Decided again now: a reload since the submission may have narrowed a secret's scope.
        grant = self.config.grant(pipeline, job.repo, job.branch, job.event)
        if grant.refused is not None:
            await self._db(self._refuse, job, grant.refused)
            self.notify()
            return "done"
        candidates = [s for s in self.slots.values() if s.why_not(pipeline) is None]
        if not candidates:
            return "wait"
        lost_on = self._lost_on.get(job.id, set())
        elsewhere = [s for s in candidates if s.name not in lost_on]
        slot = min(elsewhere or candidates, key=lambda s: (s.load, len(s.running), s.name))
        # Hold the place while the store decides: no other job takes it, a removed runner
        # is not retired under it, and a cancel that comes meanwhile finds its event.
        slot.held[job.id] = slot.reserve(pipeline)
        slot.running[job.id] = job.attempt
        self._active.add((job.id, job.attempt))
        cancel = self._cancels[job.id] = asyncio.Event()
        try:
            started = await self._db(self.store.start_job, job.id, slot.name, job.attempt)
        except BaseException:
            self._release(job.id, job.attempt, slot, cancel)
            raise
        if not started:  # cancelled or taken meanwhile
            self._release(job.id, job.attempt, slot, cancel)
            return "done"
        self._tasks[job.id] = asyncio.create_task(self._execute(job, pipeline, slot, cancel, grant))
        log.info("job %s started on %s%s", job.id, slot.name, f" (attempt {job.attempt})" if job.attempt > 1 else "")
        self.notify()
        return "started"

    async def _claim(self) -> bool:
        """(cluster) Claim queued jobs from the shared queue, oldest first, each with a runner slot
        leased across the cluster; start them. True if the batch was full (claim again)."""
        rooms = [s for s in self.slots.values() if s.has_room]
        free = {s.name: s.runner.capacity - s.used for s in rooms}
        taken: dict[int, tuple[Slot, list[int]]] = {}
        refused: dict[int, str] = {}
        grants: dict[int, Grant] = {}
        node = self.node
        assert node is not None

        def choose(job: Job) -> str | None:  # (store thread, inside the claim's transaction)
            pipeline = self.pipeline(job.pipeline)
            if pipeline is None:
                refused[job.id] = f"pipeline {job.pipeline!r} no longer exists"
                return "-"
            grant = self.config.grant(pipeline, job.repo, job.branch, job.event)
            if grant.refused is not None:
                refused[job.id] = grant.refused
                return "-"
            fits = [s for s in rooms if free[s.name] > 0 and s.runner.carries(pipeline.labels)]
            for slot in sorted(fits, key=lambda s: (1 - free[s.name] / max(1, s.runner.capacity), s.name)):
                want = max(1, min(pipeline.width(), free[slot.name]))
                got: list[int] = []
                while len(got) < want:
                    index = self.store.acquire_slot(slot.name, slot.runner.capacity, node, job.id, self.lease)
                    if index is None:
                        break
                    got.append(index)
                if not got:
                    free[slot.name] = 0  # other nodes hold the rest
                    continue
                free[slot.name] -= len(got)
                taken[job.id] = (slot, got)
                grants[job.id] = grant
                return slot.name
            return None

        def claim() -> list[Job]:  # (store thread)
            try:
                jobs = self.store.claim_jobs(node, choose, self.lease, CLAIM_BATCH)
            except BaseException:
                for job_id, (slot, got) in taken.items():
                    self._give_back(job_id, slot.name, got)
                raise
            claimed = {job.id for job in jobs}
            for job_id, (slot, got) in list(taken.items()):
                if job_id not in claimed:  # taken meanwhile (cannot happen under the row lock; kept honest)
                    self._give_back(job_id, slot.name, got)
                    del taken[job_id]
            with self._leased_lock:  # from now on this node's beat renews them
                self._leased.update((job.id, job.attempt) for job in jobs if job.id in taken)
            for job in jobs:
                if job.id in refused:
                    try:
                        self.store.finish_job(job.id, job.attempt, JobStatus.ERROR, refused[job.id], node=node)
                    except LeaseLost:
                        pass
            return jobs

        jobs = await self._db(claim)
        for job in jobs:
            if job.id not in taken:
                continue
            slot, got = taken[job.id]
            pipeline = self.pipeline(job.pipeline)
            if pipeline is None:  # a reload took it away just now: the attempt is given back
                self._give_back_later(job.id, slot.name, got)
                self.write(self._requeue_or_fail, job.id, job.attempt, f"pipeline {job.pipeline!r} no longer exists")
                self.write(self._unlease, job.id, job.attempt)
                continue
            slot.held[job.id] = len(got)
            slot.running[job.id] = job.attempt
            self._active.add((job.id, job.attempt))
            self._slot_leases[job.id] = (job.attempt, slot.name, got)
            cancel = self._cancels[job.id] = asyncio.Event()
            self._tasks[job.id] = asyncio.create_task(self._execute(job, pipeline, slot, cancel, grants[job.id]))
            self._served[job.repo] = time.monotonic()
            log.info("job %s started on %s%s", job.id, slot.name,
                     f" (attempt {job.attempt})" if job.attempt > 1 else "")
        if jobs:
            self.notify()
        return len(jobs) >= CLAIM_BATCH

    def _give_back(self, job_id: int, runner: str, slots: list[int]) -> None:
        """(store thread) Release a job's runner slots in the cluster."""
        assert self.node is not None
        for index in slots:
            self.store.release_slot(runner, index, self.node, job_id)

    def _give_back_later(self, job_id: int, runner: str, slots: list[int]) -> None:
        self.write(self._give_back, job_id, runner, slots)

    async def _cluster_loop(self) -> None:
        """(cluster) Every ``CLUSTER_POLL``: pick up jobs submitted to other nodes, hear cancellations
        made there; every ``takeover_interval``: take over attempts whose node's lease ran out."""
        last_takeover = -1e18
        while True:
            await asyncio.sleep(CLUSTER_POLL)
            self.wake()
            try:
                if self._cancels:
                    for job_id, attempt in await self._db(self.store.jobs_to_cancel):
                        event = self._cancels.get(job_id)
                        if event is not None and (job_id, attempt) in self._active:
                            event.set()
                if time.monotonic() - last_takeover >= self.takeover_interval:
                    last_takeover = time.monotonic()
                    if await self._db(self._take_over):
                        self.notify()
                        self.wake()
            except Exception:  # noqa: BLE001 - the database may be away for a while: try again
                log.warning("cluster housekeeping failed", exc_info=True)

    def _take_over(self) -> int:
        """(store thread) Re-queue the attempts whose node stopped beating; how many."""
        taken = 0
        for job_id, attempt, node in self.store.expired_attempts():
            reason = f"node {str(node)[-8:]} stopped beating while it ran"
            job = self.store.take_over(job_id, attempt, reason, max_attempts=self.settings.max_attempts)
            if job is None:
                continue  # renewed, or taken by another node meanwhile
            taken += 1
            then = "re-queued" if job.status is JobStatus.QUEUED else job.status.value
            log.warning("job %s: attempt %s taken over: %s; %s", job_id, attempt, reason, then)
            self.store.append_log(job_id, attempt, [printable(f"attempt {attempt} lost: {reason}; {then}")],
                                  LogKind.NARWHAL)
        return taken

    async def _running_anywhere(self, keys: set[tuple[int, int]]) -> set[tuple[int, int]]:
        """(cluster) Of these attempts, those running on any node: the reap keeps them."""
        return await self._db(self.store.running_attempts, {job for job, _ in keys})

    def _refuse(self, job: Job, reason: str) -> None:
        """(store thread) A queued job that may not run after all: error, with the reason."""
        self.store.start_job(job.id, "-", job.attempt)
        self.store.finish_job(job.id, job.attempt, JobStatus.ERROR, reason)

    def _release(self, job_id: int, attempt: int, slot: Slot, cancel: asyncio.Event) -> None:
        """Forget what _try_start set up for this attempt; a newer attempt's entries stay."""
        if slot.running.get(job_id) == attempt:
            del slot.running[job_id]
            slot.held.pop(job_id, None)
        self._active.discard((job_id, attempt))
        self._lost.discard((job_id, attempt))
        leased = self._slot_leases.get(job_id)
        if leased is not None and leased[0] == attempt:
            del self._slot_leases[job_id]
            self._give_back_later(job_id, leased[1], leased[2])
        if self._cancels.get(job_id) is cancel:
            del self._cancels[job_id]
        if slot.removed and not slot.running:
            self._retire(slot)
        self._close_stale(slot)

    async def _execute(self, job: Job, pipeline: Pipeline, slot: Slot, cancel: asyncio.Event,
                       grant: Grant) -> None:
        attempt = job.attempt
        sink = StoreSink(self, job.id, attempt)
        flusher = asyncio.create_task(self._flush_loop(sink))
        try:
            if job.attempt > 1:
                sink.note(f"attempt {attempt} on runner {slot.name}")
            current = await self._db(self.store.get_job, job.id)
            if current is None or current.status is not JobStatus.RUNNING:
                return
            if job.event in CLAIMED_BRANCH_EVENTS and job.branch is not None and self.config.branch_limited(pipeline):
                # The branch was named by whoever submitted or signed the push: a secret limited
                # to it goes only to a commit on it (not a fork's pull request head sent as "main").
                if not await asyncio.to_thread(self.mirror.contains, job.repo, job.branch, job.commit):
                    grant = self.config.grant(pipeline, job.repo, job.branch, job.event, off_branch=job.commit)
                    if grant.refused is not None:
                        await self._db(functools.partial(self.store.finish_job, node=self.node), job.id, attempt,
                                       JobStatus.ERROR, grant.refused)
                        return
            archive = await self._source(job, pipeline, sink, cancel)
            if archive is None:
                return
            await self._db(functools.partial(self.store.plan_steps, node=self.node), job.id, attempt,
                           [s.name for s in pipeline.steps])  # in a cluster: the attempt is still ours
            if job.author is None and job.subject is None:  # an API job: the mirror knows the commit
                author, subject = await asyncio.to_thread(self.mirror.describe, job.repo, job.commit)
                if author is not None or subject is not None:
                    await self._db(self.store.set_commit_info, job.id, author, subject)
            changed = await self._db(self.store.changed_files, job.id)
            caches = await self._cache_keys(job, pipeline, sink) if pipeline.cache else ()
            parallel = slot.held.get(job.id, 1)
            if pipeline.width() > 1:
                sink.note(f"steps at once: up to {parallel} (pipeline allows {pipeline.width()}; "
                          f"runner {slot.name} capacity {slot.runner.capacity})")
            spec = runner_mod.JobSpec(
                job_id=job.id, attempt=attempt, pipeline=pipeline, repo=job.repo,
                commit=job.commit, branch=job.branch, limits=slot.runner.limits,
                log_cap=self.settings.log_cap, grace=self.settings.stop_grace,
                network=slot.runner.network, secrets=grant.values,
                origin=Origin(event=job.event, ref=job.ref, pr=job.pr, source_repo=job.source_repo),
                # Every secret the dispatcher knows is masked, not only this job's: a value
                # can reach a log by other ways (a file in the repository, a cache). Parts of
                # a value (its lines) only for its own: else its output is a guessing oracle.
                masker=Masker({**self.config.secret_values(), **grant.values}, partial=grant.values),
                parallel=parallel, job_url=target_url(self.settings.public_url, job.id), changed=changed,
                caches=caches, cache_timeout=self.settings.cache_timeout, cache_max_size=self.settings.cache_max_size,
            )
            if pipeline.artifacts is not None and self.artifacts is not None:
                spec.artifacts = self.artifacts.collection(job.id, attempt, pipeline.artifacts.expire, self.node)
                spec.artifacts_cap = self.settings.artifacts_job_cap
                spec.artifacts_timeout = self.settings.artifacts_timeout
            self._specs[job.id] = spec
            if grant.withheld:
                sink.note(f"optional secrets withheld from this {job.event} job: {', '.join(grant.withheld)}")
            transport = self._transport(slot)
            sink.on_outcome = lambda outcome: self._record(job, attempt, slot, outcome)
            outcome = await runner_mod.run_job(transport, spec, archive, sink, cancel, self.owner)
            if caches:
                self.write(self.cache_uses.touch, cache_exec.volumes_of(self.owner, job.repo, caches), time.time())
            sink.job_finished(outcome)
        except LeaseLost as exc:  # another node took the attempt over: nothing more of it is ours
            self._lost_attempt(job.id, attempt, str(exc))
        except RunnerError as exc:
            sink.flush()
            self._mark_sick(slot, str(exc))
            try:
                await self._db(self._requeue_or_fail, job.id, attempt, f"runner lost: {slot.name}: {exc}")
            except NarwhalError as failed:  # the database is away too (a partition), or the attempt was taken
                log.warning("job %s: attempt %s not re-queued here: %s", job.id, attempt, failed)
        except asyncio.CancelledError:
            sink.flush()
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not leave a job running forever
            log.exception("job %s crashed", job.id)
            sink.flush()
            try:
                await self._db(functools.partial(self.store.finish_job, node=self.node), job.id, attempt,
                               JobStatus.ERROR, f"internal error: {exc}")
            except LeaseLost:
                pass
            except NarwhalError as failed:  # the database is away: the attempt's lease lapses
                log.warning("job %s: attempt %s not finished here: %s", job.id, attempt, failed)
        finally:
            flusher.cancel()
            self._release(job.id, attempt, slot, cancel)
            if self.node is not None:  # after every write of the attempt (one store thread, in order)
                self.write(self._unlease, job.id, attempt)
            if self._tasks.get(job.id) is asyncio.current_task():
                del self._tasks[job.id]
                self._specs.pop(job.id, None)
            self._evicted.discard(job.id)
            self.notify()
            self.wake()

    async def _source(self, job: Job, pipeline: Pipeline, sink: StoreSink,
                      cancel: asyncio.Event) -> runner_mod.ArchiveFactory | None:
        """What the job's first step unpacks: ``git archive`` of the commit, or with ``clone:`` the
        workspace prepared on the dispatcher (narwhal.execution.clone). None: the job ended here
        (the workspace could not be made: the job errs with the reason; or it was cancelled
        meanwhile: the build goes on for the cache, the job ends at once)."""
        clone = pipeline.clone
        if clone is None or not (clone.git or clone.submodules):
            return lambda: self.mirror.archive(job.repo, job.commit)
        began = time.monotonic()
        try:
            if self.workspaces is None:
                raise SourceError("clone: is not available on this dispatcher")
            building = asyncio.ensure_future(
                self.workspaces.prepare_async(job.repo, job.commit, clone, self.config.fetch_hosts))
            cancelled = asyncio.ensure_future(cancel.wait())
            try:
                await asyncio.wait({building, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                cancelled.cancel()
            if not building.done():
                building.add_done_callback(lambda task: task.cancelled() or task.exception())
                await self._db(functools.partial(self.store.finish_job, node=self.node), job.id, job.attempt,
                               JobStatus.CANCELLED, "cancelled")
                return None
            prepared = building.result()
        except SourceError as exc:
            await self._db(functools.partial(self.store.finish_job, node=self.node), job.id, job.attempt,
                           JobStatus.ERROR, printable(f"source: {exc}", 500))
            return None
        for note in prepared.notes:
            sink.note(note)
        sink.note(f"workspace with clone: ready, {prepared.size} bytes ({time.monotonic() - began:.1f}s)")
        return prepared.stream

    async def _cache_keys(self, job: Job, pipeline: Pipeline, sink: StoreSink) -> tuple[cache_exec.CacheKey, ...]:
        """The job's cache keys, hashed from the mirror; none (with a note) when it cannot say."""
        def entries(paths: list[str]) -> list[tuple[str, str]]:
            return self.mirror.tree_entries(job.repo, job.commit, paths)

        try:
            return await asyncio.to_thread(cache_exec.keys_for, pipeline, branch=job.branch, event=job.event,
                                           entries=entries)
        except NarwhalError as exc:
            sink.note(f"caches not used: {exc}")
            return ()

    async def _flush_loop(self, sink: StoreSink) -> None:
        while True:
            await asyncio.sleep(LOG_FLUSH_INTERVAL)
            sink.flush()

    def _record(self, job: Job, attempt: int, slot: Slot, outcome: Outcome) -> None:
        """The outcome is known (loop thread): decide here, store on the store thread."""
        if (job.id, attempt) in self._lost:
            return  # another node took the attempt over: its outcome is not ours to store
        if job.id in self._evicted:
            # Stopped by our own shutdown, not by the user: the next start runs it again.
            self.write(self._requeue_or_fail, job.id, attempt, "dispatcher stopped while it ran")
        elif outcome.retryable:
            # The runner failed, not the job (Docker down, disk full): elsewhere, if allowed.
            # The connection itself is fine, so it stays.
            self._mark_sick(slot, outcome.reason or "runner failed", disconnect=False)
            self._lost_on.setdefault(job.id, set()).add(slot.name)
            while len(self._lost_on) > LOST_ON_KEPT:
                del self._lost_on[next(iter(self._lost_on))]
            self.write(self._requeue_or_fail, job.id, attempt, outcome.reason or "runner failed")
        else:
            self._lost_on.pop(job.id, None)
            self.write(self._finish_job, job.id, attempt, slot.name, outcome)

    def _finish_job(self, job_id: int, attempt: int, runner: str, outcome: Outcome) -> None:
        """(store thread)"""
        if self.store.finish_job(job_id, attempt, outcome.status, outcome.reason, node=self.node):
            log.info("job %s finished on %s: %s %s", job_id, runner, outcome.status, outcome.reason or "")

    def _requeue_or_fail(self, job_id: int, attempt: int, reason: str) -> None:
        """(store thread) Another attempt if allowed, else an error; wakes the loop."""
        try:
            self._requeue_or_fail_now(job_id, attempt, reason)
        except LeaseLost:  # another node took the attempt over first
            return

    def _requeue_or_fail_now(self, job_id: int, attempt: int, reason: str) -> None:
        job = self.store.get_job(job_id)
        if job is None or job.status is not JobStatus.RUNNING or job.attempt != attempt:
            return
        if job.attempt < self.settings.max_attempts:
            if self.node is None:
                self.store.requeue_job(job_id, reason)
            elif self.store.requeue_job(job_id, reason, attempt=attempt, node=self.node) is None:
                return
            self.store.append_log(job_id, attempt, [printable(f"attempt {attempt} lost: {reason}; re-queued")],
                                  LogKind.NARWHAL)
        else:
            self.store.finish_job(job_id, attempt, JobStatus.ERROR, reason, node=self.node)
        self.notify()
        self.wake()

    def _mark_sick(self, slot: Slot, reason: str, disconnect: bool = True) -> None:
        if slot.health.state != "unhealthy":
            log.warning("runner %s unhealthy: %s", slot.name, reason)
        slot.health = Health(state="unhealthy", reason=reason, checked_at=time.time())
        if disconnect and slot.transport is not None:
            transport, slot.transport = slot.transport, None
            asyncio.create_task(transport.close())

    def _transport(self, slot: Slot) -> Transport:
        if slot.transport is None:
            slot.transport = make_transport(slot.runner, self.settings)
        return slot.transport

    # --- artifacts -------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        """Expired artifacts go: their objects, and rows long expired (a worker thread: disk and SQLite)."""
        while self.artifacts is not None:
            try:
                await asyncio.to_thread(self.artifacts.sweep)
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("artifact sweep failed")
            await asyncio.sleep(SWEEP_INTERVAL)

    # --- health ----------------------------------------------------------------------

    async def _health_loop(self) -> None:
        """Check each runner every ``health_interval``, each at a phase of its own.

        The first round checks every runner at once (they come up fast); each runner's next
        check then falls at a random point of the following interval and keeps that phase, so
        200 runners polled every 5 s are about 40 checks a second, not a burst of 200. A slow
        or hung runner delays only its own next check.
        """
        loop = asyncio.get_running_loop()
        due: dict[int, float] = {}  # id(slot) -> loop time of its next check
        checking: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                now = loop.time()
                interval = self.settings.health_interval
                live = [s for s in self.slots.values() if not s.removed]
                for slot in live:
                    key = id(slot)
                    first = key not in due
                    if key in checking or due.get(key, now) > now:
                        continue
                    due[key] = now + (interval * random.uniform(0.5, 1.5) if first else interval)
                    checking[key] = asyncio.create_task(self._check(slot))
                    checking[key].add_done_callback(functools.partial(_forget, checking, key))
                keys = {id(s) for s in live}
                for key in [k for k in due if k not in keys]:
                    del due[key]
                waiting = [due[id(s)] for s in live if id(s) not in checking]
                await asyncio.sleep(max(0.005, min(waiting, default=now + interval) - now))
        finally:
            for task in list(checking.values()):
                task.cancel()
            await asyncio.gather(*checking.values(), return_exceptions=True)

    async def _check(self, slot: Slot) -> None:
        """One health check; never waits on another runner, never raises."""
        was_healthy = slot.health.is_healthy
        began = time.time()
        try:
            transport = self._transport(slot)
            result = await asyncio.wait_for(
                health_mod.check(transport, timeout=self.settings.health_timeout),
                timeout=self.settings.health_timeout + 5,
            )
        except TimeoutError:
            result = Health(state="unhealthy", reason="health check timed out", checked_at=time.time())
        except NarwhalError as exc:
            result = Health(state="unhealthy", reason=str(exc), checked_at=time.time())
        except Exception as exc:  # noqa: BLE001 - the type only: a library's text may quote a file
            result = Health(state="unhealthy", reason=f"health check failed: unexpected {type(exc).__name__}",
                            checked_at=time.time())
        if slot.removed:
            return
        if not slot.health.is_healthy and (slot.health.checked_at or 0) > began:
            return  # marked sick while this check ran (a job found Docker down): the next check decides
        seen = (slot.health.state, slot.health.reason, slot.draining, slot.auto_drained)
        if result.state != slot.health.state:  # the log tells the runners' story, not every check
            if result.is_healthy:
                log.info("runner %s healthy (docker %s)", slot.name, result.docker_version or "?")
            else:
                log.warning("runner %s %s: %s", slot.name, result.state, result.reason or "no reason given")
        slot.health = result
        if not result.is_healthy and slot.transport is not None and not slot.running:
            # Start the next check on a fresh connection.
            stale, slot.transport = slot.transport, None
            await stale.close()
        free = result.free_disk
        if result.is_healthy and free is not None and free < self.settings.min_free_disk:
            if not slot.draining:
                slot.draining = True
                slot.auto_drained = f"low disk: {free // (1024 * 1024)} MiB free"
        if result.is_healthy:
            # Leftovers appear when a runner or the dispatcher was lost: reap on the first healthy
            # check after that (a restart is one), and every REAP_EVERY checks besides.
            slot.checks_to_reap -= 1
            if not was_healthy or slot.checks_to_reap <= 0:
                slot.checks_to_reap = REAP_EVERY
                await self._reap(slot)
            await self._sweep_caches(slot)
        if result.is_healthy and not was_healthy:
            self.wake()
        if (result.state, result.reason, slot.draining, slot.auto_drained) != seen:
            self.notify()  # followers and watchers wake for what they can see, not for every check

    async def _reap(self, slot: Slot) -> None:
        # ``_active`` is the live set: a job that starts while the listing is under way is kept.
        try:
            # In a cluster the other nodes' containers carry the same owner: those of attempts
            # running anywhere stay; a dead node's are reaped once another node took them over.
            if self.node is None:
                removed = await runner_mod.reap(self._transport(slot), self.owner, self._active)
            else:
                removed = await runner_mod.reap(self._transport(slot), self.owner, self._active,
                                                self._running_anywhere)
        except NarwhalError as exc:
            log.warning("reaping on %s failed: %s", slot.name, exc)
            return
        if removed:
            log.info("reaped on %s: %s", slot.name, ", ".join(removed))

    async def _sweep_caches(self, slot: Slot) -> None:
        """Evict old and surplus caches on the runner, every ``cache_sweep_interval``."""
        now = time.monotonic()
        if now - self._cache_swept.get(slot.name, -1e18) < self.settings.cache_sweep_interval:
            return
        self._cache_swept[slot.name] = now
        try:
            removed = await caches_mod.sweep(self._transport(slot), self.owner, self.cache_uses, now=time.time(),
                                             max_age=self.settings.cache_max_age,
                                             max_total=self.settings.cache_max_total)
        except NarwhalError as exc:
            log.warning("cache sweep on %s failed: %s", slot.name, exc)
            return
        except Exception:  # noqa: BLE001 - housekeeping must never stop the health checks
            log.exception("cache sweep on %s crashed", slot.name)
            return
        for volume, why in removed:
            log.info("cache %s evicted on %s: %s", volume, slot.name, why)

    # --- config and shutdown ---------------------------------------------------------

    def _set_slots(self, config: Config, api_runners: list[dict], states: dict[str, dict]) -> None:
        """Make ``slots`` match the config plus the API's runners (loop thread once started)."""
        wanted: dict[str, tuple[Runner, str]] = {r.name: (r, "inventory") for r in config.inventory.runners}
        for data in api_runners:
            if data.get("name") not in wanted:
                try:
                    wanted[data["name"]] = (validate_runner(data, "api", config.inventory.defaults,
                                                            config.settings), "api")
                except NarwhalError as exc:
                    log.warning("ignoring stored runner %s: %s", data.get("name"), exc)
        for name, slot in self.slots.items():
            if name not in wanted:
                slot.removed = True
                slot.draining = True
        for name, (runner, source) in wanted.items():
            existing = self.slots.get(name)
            if existing is None or existing.removed and not existing.running:
                self.slots[name] = Slot(runner=runner, source=source)
                continue
            if existing.removed:  # back in the config before its last job ended
                existing.removed = False
                existing.draining = bool(states.get(name, {}).get("draining"))
            if existing.runner != runner:
                if _connection_changed(existing.runner, runner) and existing.transport is not None:
                    # New jobs get a new connection; running ones finish on the old one.
                    existing.stale.append(existing.transport)
                    existing.transport = None
                existing.runner, existing.source = runner, source
                self._close_stale(existing)

    def _reload(self, config: Config, api_runners: list[dict], states: dict[str, dict]) -> None:
        self.config = config
        self.settings = config.settings
        self._set_slots(config, api_runners, states)
        for slot in list(self.slots.values()):
            if slot.removed and not slot.running:
                self._retire(slot)
            elif slot.health.state == "unknown" and self._on_loop():
                asyncio.ensure_future(self._check(slot))

    def _close_stale(self, slot: Slot) -> None:
        if slot.running or not slot.stale or not self._on_loop():
            return
        stale, slot.stale = slot.stale, []
        for transport in stale:
            asyncio.ensure_future(transport.close())

    def _retire(self, slot: Slot) -> None:
        """Forget a removed runner once its last job is done; close its connection."""
        if slot.running:
            return  # the last job to finish retires it
        if self.slots.get(slot.name) is slot:
            del self.slots[slot.name]
        stale, slot.stale = [slot.transport, *slot.stale], []
        slot.transport = None
        for transport in stale:
            if transport is not None and self._on_loop():
                asyncio.ensure_future(transport.close())

    async def _shutdown(self, stop: Stop) -> None:
        assert self._wake is not None
        self._stop = stop
        self._accepting = False
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=stop.jobs.left())
        for job_id, event in list(self._cancels.items()):
            # Out of grace: stop the step at once (the grace is spent; no second one between
            # TERM and KILL), then put the job back for the next start.
            self._evicted.add(job_id)
            spec = self._specs.get(job_id)
            if spec is not None:
                spec.grace = 0.0
                self.write_attempt(self.store.append_log, job_id, spec.attempt,
                                   [f"the dispatcher is stopping: step stopped within its {stop.grace:g}s grace; "
                                    "the job runs again at the next start"], LogKind.NARWHAL)
            event.set()
        still = list(self._tasks.values())
        if still:
            await asyncio.wait(still, timeout=stop.halt.left())
        for job_id, task in list(self._tasks.items()):
            if not task.done():
                log.warning("job %s: its step did not stop within the %gs grace; the next start re-queues it",
                            job_id, stop.grace)
        self._closing = True
        self._wake.set()

    async def _abandon_jobs(self) -> None:
        """Cancel the jobs whose steps would not stop (their store rows stay running: the next
        start re-queues them), so that none is left pending when the loop closes."""
        left = [task for task in self._tasks.values() if not task.done()]
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=self._stop.end.left() if self._stop is not None else CLOSE_TIMEOUT)

    async def _close_transports(self) -> None:
        """Close every runner connection at once, within what is left of the stop."""
        closes = [asyncio.ensure_future(slot.transport.close()) for slot in self.slots.values()
                  if slot.transport is not None]
        if not closes:
            return
        timeout = self._stop.end.left() if self._stop is not None else CLOSE_TIMEOUT
        done, pending = await asyncio.wait(closes, timeout=timeout)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: a connection that failed to close is closed enough


def _connection_changed(a: Runner, b: Runner) -> bool:
    fields = ("host", "port", "user", "key", "known_hosts", "transport")
    return any(getattr(a, f) != getattr(b, f) for f in fields)
