"""Several dispatchers on one store, the groundwork: nodes and heartbeats, claiming jobs (SKIP
LOCKED on PostgreSQL), attempt leases, taking over a dead node's attempts, and the fence that
keeps a node that was cut off out of a job another node took over. On both backends, each
"dispatcher" being a Store of its own on the same database."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time

import pytest

from narwhal.dispatch.nodes import HELD_FOR, LEASE, Node
from narwhal.dispatch.postgres import IDLE_IN_TRANSACTION, PostgresBackend
from narwhal.dispatch.store import LeaseLost, LogBatch, Store
from narwhal.job import Job, JobStatus, LogKind, StepStatus
from tests.conftest import Clock, StoreSpec


@pytest.fixture
def clock() -> Clock:
    return Clock(1_000_000.0)


@pytest.fixture
def pair(store_spec: StoreSpec, clock):
    """Two dispatchers' stores on one database, sharing a clock."""
    a, b = store_spec.open(clock), store_spec.open(clock)
    yield a, b
    a.close()
    b.close()


def queue(store: Store, n: int, repo: str = "acme/app") -> list[Job]:
    return [store.create_jobs(repo, f"{i:040x}", "main", ["ci"])[0][0] for i in range(n)]


def anywhere(_job: Job) -> str:
    return "runner-1"


def test_nodes_beat_and_age(pair, clock):
    a, _ = pair
    a.register_node("node-a", "host-a", 11)
    a.register_node("node-b", "host-b", 12)
    assert a.heartbeat("node-a", 15) and a.heartbeat("node-b", 15)
    clock.advance(20)
    assert a.heartbeat("node-a", 15)
    alive = {n["id"]: n["alive"] for n in a.nodes(stale_after=15)}
    assert alive == {"node-a": True, "node-b": False}
    a.node_stopped("node-a")
    assert not a.heartbeat("node-a", 15)  # a stopped node beats no more
    assert not a.heartbeat("never-registered", 15)
    a.register_node("node-a", "host-a", 13)  # a restart under the same id rejoins
    assert a.heartbeat("node-a", 15)
    [row] = [n for n in a.nodes(15) if n["id"] == "node-a"]
    assert (row["pid"], row["alive"], row["stopped_at"]) == (13, True, None)


def test_a_node_holds_the_database_while_its_beats_go_through(pair):
    a, _ = pair
    ticks = Clock(0.0)
    node = Node(a, interval=5, clock=ticks)
    assert node.health()["holds_database"] is False  # not registered yet
    node.hold()
    node.register()
    assert node.health() | {"store": a.kind, "holds_database": True} == node.health()
    ticks.advance(5 * HELD_FOR + 1)
    assert node.holds_database() is False  # no beat for three intervals
    assert node.beat() and node.holds_database()
    a.node_stopped(node.id)  # declared gone (by itself at stop, or an operator)
    ticks.advance(5 * HELD_FOR + 1)
    assert not node.beat() and not node.holds_database()


def test_claims_start_jobs_under_a_lease_and_leave_what_no_runner_takes(pair, clock):
    a, b = pair
    jobs = queue(a, 4)
    claimed = a.claim_jobs("node-a", lambda job: None if job.id == jobs[1].id else "runner-1", lease=15, limit=3)
    assert [j.id for j in claimed] == [jobs[0].id, jobs[2].id]
    assert all(j.status is JobStatus.RUNNING and j.runner == "runner-1" for j in claimed)
    assert a.lease_of(jobs[0].id) == ("node-a", 1, clock.now + 15)
    assert [j.id for j in b.queued_jobs()] == [jobs[1].id, jobs[3].id]
    assert [j.id for j in b.claim_jobs("node-b", anywhere, lease=15)] == [jobs[1].id, jobs[3].id]
    assert b.claim_jobs("node-b", anywhere, lease=15) == []
    assert a.stats()["queue"]["length"] == 0 and a.stats()["runners"][0]["running"] == 4
    assert a.start_job(jobs[0].id, "runner-2", 1) is False  # claimed is started: once


def test_nodes_claiming_at_once_take_each_job_once(store_spec):
    jobs = queue(store_spec.open(), 60)
    stores = [store_spec.open() for _ in range(4)]
    barrier = threading.Barrier(4)
    taken: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def claimer(i: int) -> None:
        try:
            barrier.wait()
            mine = taken.setdefault(f"node-{i}", [])
            while batch := stores[i].claim_jobs(f"node-{i}", anywhere, lease=30, limit=5):
                mine.extend(j.id for j in batch)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for s in stores:
        s.close()
    assert not errors
    every = sorted(i for ids in taken.values() for i in ids)
    assert every == sorted(j.id for j in jobs)  # each exactly once


def test_a_claim_skips_rows_another_claimer_holds_instead_of_waiting(postgres):
    """PostgreSQL only (FOR ... SKIP LOCKED; SQLite runs one writer at a time, so a second claimer
    waits its turn there): while one node is inside its claim, holding the oldest queued job,
    another claims the next ones at once."""
    spec_of = contextlib.contextmanager(postgres.spec)
    with spec_of() as spec:
        claim_past_a_held_row(spec)


def claim_past_a_held_row(store_spec: StoreSpec) -> None:
    a, b = store_spec.open(), store_spec.open()
    try:
        jobs = queue(a, 3)
        inside, release = threading.Event(), threading.Event()

        def slow(job: Job) -> str:
            inside.set()
            release.wait(30)
            return "runner-1"

        holder = threading.Thread(target=lambda: a.claim_jobs("node-a", slow, lease=30, limit=1))
        holder.start()
        assert inside.wait(30)
        started = time.monotonic()
        others = b.claim_jobs("node-b", anywhere, lease=30, limit=3)
        waited = time.monotonic() - started
        release.set()
        holder.join(30)
        assert [j.id for j in others] == [jobs[1].id, jobs[2].id] and waited < 10
        assert a.lease_of(jobs[0].id)[0] == "node-a"
    finally:
        a.close()
        b.close()


def test_a_silent_nodes_attempt_is_taken_over_and_its_late_writes_are_fenced(pair, clock):
    a, b = pair
    a.register_node("node-a", "host-a", 1)
    b.register_node("node-b", "host-b", 2)
    [job] = queue(a, 1)
    [mine] = a.claim_jobs("node-a", anywhere, lease=15)
    a.start_step(job.id, 1, 0, "build", node="node-a")
    a.append_log(job.id, 1, ["from a"], node="node-a")
    clock.advance(10)
    assert a.heartbeat("node-a", 15, [(job.id, 1)])  # renewed: now + 15
    clock.advance(10)
    assert b.expired_attempts() == []
    assert b.take_over(job.id, 1, "node a lost") is None  # its lease still holds
    clock.advance(10)  # node a is paused (or cut off): no beat
    assert b.expired_attempts() == [(job.id, 1, "node-a")]
    requeued = b.take_over(job.id, 1, "node a lost")
    assert (requeued.status, requeued.attempt, requeued.reason) == (JobStatus.QUEUED, 2, "node a lost")
    assert b.take_over(job.id, 1, "again") is None  # once
    [again] = b.claim_jobs("node-b", anywhere, lease=15)
    assert (again.id, again.attempt) == (job.id, 2)

    # node a wakes up and goes on with attempt 1: every write is refused, nothing lands
    for write in (lambda: a.append_log(job.id, 1, ["late line"], node="node-a"),
                  lambda: a.append_log(job.id, 2, ["wrong attempt"], node="node-a"),
                  lambda: a.plan_steps(job.id, 1, ["build", "test"], node="node-a"),
                  lambda: a.start_step(job.id, 1, 1, "test", node="node-a"),
                  lambda: a.finish_step(job.id, 1, 0, StepStatus.PASSED, 0, node="node-a"),
                  lambda: a.add_artifacts(job.id, 1, [("out.txt", "0" * 64, 3)], clock.now + 60, node="node-a"),
                  lambda: a.finish_job(job.id, 1, JobStatus.PASSED, node="node-a")):
        with pytest.raises(LeaseLost, match=f"job {job.id}: attempt . is no longer held by node"):
            write()
    assert a.heartbeat("node-a", 15, [(job.id, 1)])  # its beat goes on, but renews nothing it lost
    assert a.lease_of(job.id)[0] == "node-b"
    assert a.artifacts(job.id) == []

    b.append_log(job.id, 2, ["from b"], node="node-b")
    b.start_step(job.id, 2, 0, "build", node="node-b")
    b.finish_step(job.id, 2, 0, StepStatus.PASSED, 0, node="node-b")
    assert b.finish_job(job.id, 2, JobStatus.PASSED, node="node-b")
    done = b.get_job(job.id)
    assert (done.status, done.attempt, [s.status for s in done.steps]) == (JobStatus.PASSED, 2, [StepStatus.PASSED])
    assert [t for _, t in b.read_log(job.id)] == ["from a", "from b"]
    assert b.lease_of(job.id) == ("node-b", 2, None)  # a finished job holds no lease
    stats = b.stats()
    assert stats["repos"][0]["passed"] == 1 and stats["queue"]["length"] == 0
    assert mine.attempt == 1
    with pytest.raises(LeaseLost):  # the winner too, once the job is over
        b.append_log(job.id, 2, ["after the end"], LogKind.NARWHAL, node="node-b")


def test_a_beat_renews_only_the_attempts_its_node_still_works_on(pair, clock):
    """A node whose run of an attempt ended without its outcome stored (the database was away at
    that moment) no longer names it in its beats: the attempt's lease and its runner slot run
    out although the node itself beats on, and another node takes the attempt over."""
    a, b = pair
    a.register_node("node-a", "host-a", 1)
    kept, dropped = queue(a, 2)
    assert len(a.claim_jobs("node-a", anywhere, lease=15)) == 2
    for job in (kept, dropped):
        assert a.acquire_slot("runner-1", 2, "node-a", job.id, lease=15) is not None
    for _ in range(3):
        clock.advance(10)
        assert a.heartbeat("node-a", 15, [(kept.id, 1)])  # its run of the other one ended
    assert b.expired_attempts() == [(dropped.id, 1, "node-a")]
    assert [job for _, _, job in b.slots_held("runner-1")] == [kept.id]
    assert b.take_over(dropped.id, 1, "node a no longer works on it").attempt == 2
    assert a.heartbeat("node-a", 15, [(kept.id, 1), (dropped.id, 1)])  # renews nothing it lost
    assert a.lease_of(dropped.id) == (None, 2, None)
    assert a.lease_of(kept.id) == ("node-a", 1, clock.now + 15)
    assert a.heartbeat("node-a", 15)  # a node that works on nothing: its beat alone
    assert a.nodes(stale_after=15)[0]["alive"]


def test_a_group_of_log_batches_leaves_out_only_the_attempts_another_node_took_over(pair, clock):
    a, b = pair
    a.register_node("node-a", "host-a", 1)
    b.register_node("node-b", "host-b", 2)
    kept, lost = queue(a, 2)
    a.claim_jobs("node-a", anywhere, lease=15, limit=2)
    clock.advance(20)  # node a paused: both leases ran out; b takes one of the two over
    assert b.take_over(lost.id, 1, "node a lost") is not None
    a.heartbeat("node-a", 15, [(kept.id, 1)])
    answer = a.append_logs([LogBatch(kept.id, 1, ["one"]), LogBatch(lost.id, 1, ["late"]),
                            LogBatch(kept.id, 1, ["two"]), LogBatch(lost.id, 1, ["later"])], node="node-a")
    assert [(e.job_id, e.attempt) for e in answer] == [(lost.id, 1)]  # once, however many batches
    assert [t for _, t in a.read_log(kept.id)] == ["one", "two"]
    assert not {"late", "later"} & {t for _, t in a.read_log(lost.id)}


def test_unfenced_writes_are_unchanged(pair):
    """The single-node scheduler passes no node: its writes behave as before leases."""
    a, _ = pair
    [job] = queue(a, 1)
    assert a.start_job(job.id, "runner-1", 1)
    assert a.lease_of(job.id) == (None, 1, None)
    a.requeue_job(job.id, "runner lost")
    assert a.append_log(job.id, 1, ["attempt 1 lost; re-queued"], LogKind.NARWHAL) == 1
    assert a.expired_attempts() == []


def _claim_and_hang(spec: StoreSpec, ready) -> None:
    store = spec.open()
    store.register_node("doomed", "here", os.getpid())
    assert store.claim_jobs("doomed", anywhere, lease=1.0)
    store.append_log(store.running_jobs()[0].id, 1, ["doomed was here"], node="doomed")
    ready.set()
    time.sleep(600)  # until killed


def test_a_killed_node_is_taken_over_within_its_lease(store_spec):
    """kill -9 of the process holding an attempt: once its lease (1 s) has run out, another
    node takes the attempt over and runs it; the bound is the lease, not a timeout of its own."""
    survivor = store_spec.open()
    try:
        [job] = queue(survivor, 1)
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        proc = ctx.Process(target=_claim_and_hang, args=(store_spec, ready))
        proc.start()
        assert ready.wait(60)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        killed_at = time.monotonic()
        while not survivor.expired_attempts():
            assert time.monotonic() - killed_at < 10, "the lease did not run out"
            time.sleep(0.05)
        taken_after = time.monotonic() - killed_at
        assert survivor.take_over(job.id, 1, "node doomed lost").attempt == 2
        [again] = survivor.claim_jobs("survivor", anywhere, lease=15)
        assert again.id == job.id and survivor.finish_job(job.id, 2, JobStatus.PASSED, node="survivor")
        assert taken_after <= 1.5
        assert [t for _, t in survivor.read_log(job.id)] == ["doomed was here"]
    finally:
        survivor.close()


# --- runner slots: a runner's capacity across nodes ------------------------------------------------


def test_slots_hold_a_runners_capacity_and_expire_with_their_node(pair, clock):
    a, b = pair
    a.register_node("node-a", "a", 1)
    b.register_node("node-b", "b", 2)
    assert a.acquire_slot("runner-1", 2, "node-a", 1, lease=15) == 0
    assert b.acquire_slot("runner-1", 2, "node-b", 2, lease=15) == 1
    assert b.acquire_slot("runner-1", 2, "node-b", 3, lease=15) is None  # 2 in total, not 2 per node
    assert a.slots_held("runner-1") == [(0, "node-a", 1), (1, "node-b", 2)]
    clock.advance(10)
    assert b.heartbeat("node-b", 15, [(2, 1)])  # node a stays silent
    clock.advance(10)
    assert a.slots_held("runner-1") == [(1, "node-b", 2)]
    assert b.acquire_slot("runner-1", 2, "node-b", 3, lease=15) == 0  # node a's expired slot
    assert not a.release_slot("runner-1", 0, "node-a", 1)  # it is no longer a's to give back
    assert b.release_slot("runner-1", 0, "node-b", 3)
    assert b.acquire_slot("runner-1", 1, "node-b", 4, lease=15) is None  # capacity shrank below what is held


def test_nodes_racing_for_slots_never_exceed_capacity(store_spec):
    stores = [store_spec.open() for _ in range(3)]
    lock = threading.Lock()
    holding = {"now": 0, "most": 0, "taken": 0}
    errors: list[BaseException] = []

    def node(i: int) -> None:
        try:
            for job in range(40):
                slot = stores[i].acquire_slot("runner-1", 2, f"node-{i}", i * 1000 + job, lease=30)
                if slot is None:
                    continue
                with lock:
                    holding["now"] += 1
                    holding["taken"] += 1
                    holding["most"] = max(holding["most"], holding["now"])
                time.sleep(0.001)
                with lock:
                    holding["now"] -= 1
                assert stores[i].release_slot("runner-1", slot, f"node-{i}", i * 1000 + job)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    held = stores[0].slots_held("runner-1")
    for s in stores:
        s.close()
    assert not errors
    assert holding["most"] <= 2 and holding["taken"] >= 40 and held == []


def test_a_node_requeues_only_its_own_attempt_and_orphans_are_those_no_node_claimed(pair, clock):
    a, b = pair
    jobs = queue(a, 3)
    assert a.start_job(jobs[0].id, "runner-1", 1)  # a lone dispatcher's attempt: no node, no lease
    [mine] = a.claim_jobs("node-a", lambda job: "runner-1" if job.id == jobs[1].id else None, lease=15)
    assert a.orphaned_attempts() == [(jobs[0].id, 1)]
    with pytest.raises(LeaseLost):
        b.requeue_job(mine.id, "not mine", attempt=1, node="node-b")
    clock.advance(20)
    assert b.take_over(mine.id, 1, "node-a stopped beating") is not None
    with pytest.raises(LeaseLost):  # a's late re-queue of the attempt b took over
        a.requeue_job(mine.id, "runner lost", attempt=1, node="node-a")
    assert a.get_job(mine.id).attempt == 2 and a.get_job(mine.id).status is JobStatus.QUEUED
    assert a.running_attempts([jobs[0].id, mine.id, jobs[2].id]) == {(jobs[0].id, 1)}
    assert b.take_orphan(jobs[0].id, 1, "its dispatcher is gone") is not None
    assert b.take_orphan(jobs[0].id, 1, "again") is None  # once
    assert a.orphaned_attempts() == [] and a.get_job(jobs[0].id).attempt == 2


def test_taking_over_the_last_allowed_attempt_ends_the_job_as_an_error(pair, clock):
    """max_attempts holds across nodes as it does across a lone dispatcher's restarts: a job whose
    node died at its last allowed attempt is an error, not a third try on another node."""
    a, b = pair
    a.register_node("node-a", "host-a", 1)
    [job] = queue(a, 1)
    a.claim_jobs("node-a", anywhere, lease=15)
    clock.advance(20)
    again = b.take_over(job.id, 1, "node-a stopped beating", max_attempts=2)
    assert (again.status, again.attempt) == (JobStatus.QUEUED, 2)
    [mine] = a.claim_jobs("node-a", anywhere, lease=15)
    assert (mine.id, mine.attempt) == (job.id, 2)
    clock.advance(20)
    ended = b.take_over(job.id, 2, "node-a stopped beating", max_attempts=2)
    assert (ended.status, ended.attempt, ended.reason) == (JobStatus.ERROR, 2, "node-a stopped beating")
    assert b.take_over(job.id, 2, "again", max_attempts=2) is None
    assert b.stats()["repos"][0]["error"] == 1 and b.stats()["repos"][0]["running"] == 0
    with pytest.raises(LeaseLost):  # the old node's late finish lands nowhere
        a.finish_job(job.id, 2, JobStatus.PASSED, None, node="node-a")
    assert b.get_job(job.id).status is JobStatus.ERROR


def test_an_orphan_at_its_last_attempt_is_an_error(pair):
    a, b = pair
    [job] = queue(a, 1)
    assert a.start_job(job.id, "runner-1", 1)
    ended = b.take_orphan(job.id, 1, "its dispatcher is gone", max_attempts=1)
    assert (ended.status, ended.attempt) == (JobStatus.ERROR, 1)
    assert b.orphaned_attempts() == []


def test_claims_are_fair_across_repositories(pair):
    """A repository with many jobs queued does not hold up another's: each one's oldest first."""
    a, _ = pair
    a.register_node("node-a", "host-a", 1)
    busy = queue(a, 6, repo="acme/busy")
    [quiet] = queue(a, 1, repo="acme/quiet")
    [other] = queue(a, 1, repo="acme/other")
    first = a.claim_jobs("node-a", anywhere, lease=15, limit=3)
    assert [j.id for j in first] == [busy[0].id, quiet.id, other.id]
    assert [j.id for j in a.claim_jobs("node-a", anywhere, lease=15, limit=10)] == [j.id for j in busy[1:]]


def test_a_claim_passes_over_candidates_no_runner_takes(pair):
    a, _ = pair
    a.register_node("node-a", "host-a", 1)
    jobs = queue(a, 8)
    only_even = {j.id for j in jobs[::2]}
    taken = a.claim_jobs("node-a", lambda job: "runner-1" if job.id in only_even else None, lease=15, limit=4)
    assert [j.id for j in taken] == [jobs[0].id, jobs[2].id]  # of the 4 oldest it considered


# --- attack: clocks that disagree between nodes ---------------------------------------------------


@pytest.fixture
def pg_spec(postgres):
    """A fresh PostgreSQL database: what several hosts share (SQLite is one host's)."""
    yield from postgres.spec()


@pytest.mark.parametrize("skew", [-60.0, 60.0])
def test_a_node_whose_clock_is_off_neither_loses_nor_steals_leases(pg_spec, skew):
    """Nodes on different hosts: one clock a minute behind or ahead of the others (no NTP). Leases
    are written and compared by the database's clock, so a node behind does not hand out leases
    the others see as run out at once (its jobs taken over seconds after each claim), and a node
    ahead does not take over the others' attempts, nor their runner slots, before they expire."""
    off, right = pg_spec.open(), pg_spec.open()  # no clock given: the store's own
    off.clock = lambda: time.time() + skew  # noqa: E731 - this host's wrong clock
    try:
        off.register_node("node-off", "host-off", 1)
        right.register_node("node-right", "host-right", 2)
        queue(right, 2)
        [mine] = off.claim_jobs("node-off", anywhere, lease=15, limit=1)
        [theirs] = right.claim_jobs("node-right", anywhere, lease=15, limit=1)
        assert off.heartbeat("node-off", 15) and right.heartbeat("node-right", 15)
        for store in (off, right):
            assert store.expired_attempts() == []
            assert store.take_over(mine.id, 1, "stolen") is None and store.take_over(theirs.id, 1, "stolen") is None
        assert right.acquire_slot("runner-1", 1, "node-right", theirs.id, lease=15) == 0
        assert off.acquire_slot("runner-1", 1, "node-off", mine.id, lease=15) is None  # capacity 1 holds
        assert [n["alive"] for n in off.nodes(stale_after=15)] == [True, True]
        assert [n["alive"] for n in right.nodes(stale_after=15)] == [True, True]
    finally:
        off.close()
        right.close()


def test_a_node_says_when_its_hosts_clock_is_off_the_databases(pg_spec, caplog):
    store = pg_spec.open()
    node = Node(store, node_id="node-skewed")
    node.wall_clock = lambda: time.time() - 30  # noqa: E731 - this host's clock, half a minute behind
    try:
        with caplog.at_level("WARNING", logger="narwhal.dispatch.nodes"):
            node.register()
            assert node.beat() and node.beat()
        warnings = [r.getMessage() for r in caplog.records if "clock" in r.getMessage()]
        assert len(warnings) == 1 and "-30." in warnings[0] and "NTP" in warnings[0]  # once, not every beat
        assert -31 < node.health()["clock_skew"] < -29
        node.wall_clock = time.time
        assert node.beat() and abs(node.health()["clock_skew"]) < 1
    finally:
        store.close()


# --- attack: API clients taking every connection of the pool ---------------------------------------


def test_clients_holding_every_shared_connection_do_not_stop_the_beat(pg_spec):
    """Slow or many API requests hold every connection they may: the node's beat (and the
    scheduler's store thread) still get theirs at once, from connections kept for the
    dispatcher's own work, so a flood of requests cannot make a node lose its leases; the
    clients past the share wait, then get the 503 of an unavailable store."""
    from narwhal.dispatch.backend import StoreUnavailable, own_work
    from narwhal.dispatch.postgres import OWN_POOL, PostgresBackend

    store = Store(PostgresBackend(pg_spec.where, password=pg_spec.password, max_size=OWN_POOL + 2, pool_timeout=1))
    store.register_node("node-a", "host-a", 1)
    release = threading.Event()
    holding = threading.Barrier(3)

    def client() -> None:  # an API request whose query takes long
        with store._tx(write=False):  # noqa: SLF001
            holding.wait()
            release.wait(30)

    clients = [threading.Thread(target=client) for _ in range(2)]
    try:
        for t in clients:
            t.start()
        holding.wait(10)
        with pytest.raises(StoreUnavailable, match="no connection within 1s"):
            store.queue_length()  # a third client: the shared connections are all taken
        beat: list[object] = []

        def node_beat() -> None:
            own_work()
            try:
                beat.append(store.heartbeat("node-a", 15))
            except BaseException as exc:  # noqa: BLE001 - reported below
                beat.append(exc)

        thread = threading.Thread(target=node_beat)
        thread.start()
        thread.join(10)
        assert beat == [True]
    finally:
        release.set()
        for t in clients:
            t.join()
        store.close()


# --- attack: a big or lopsided queue: the claim's order, read per repository -------------------------


def fair_order(jobs: list[tuple[int, str, float]]) -> list[int]:
    """The claim order by definition: each repository's jobs by (queued_at, id) numbered from 1,
    then all by (that number, queued_at, id)."""
    by_repo: dict[str, list[tuple[float, int]]] = {}
    for job_id, repo, queued_at in jobs:
        by_repo.setdefault(repo, []).append((queued_at, job_id))
    ranked = [(n, queued_at, job_id) for rows in by_repo.values()
              for n, (queued_at, job_id) in enumerate(sorted(rows), start=1)]
    return [job_id for _, _, job_id in sorted(ranked)]


@pytest.mark.parametrize("repos", [1, 3, 39, 40, 41, 70])
@pytest.mark.parametrize("few_repos_apart", [True, False])
def test_a_claim_takes_jobs_in_fair_order_whatever_the_queues_shape(store_spec, repos, few_repos_apart, monkeypatch):
    """Claims read each repository's queue apart (up to _CLAIM_REPOS of them, else the whole queue
    at once); either way the order is the fair one: round by round across repositories, oldest
    first, with queued_at out of step with ids (re-queued jobs) and ties on queued_at."""
    import random

    from narwhal.dispatch import store as store_mod

    if not few_repos_apart:
        monkeypatch.setattr(store_mod, "_CLAIM_REPOS", 2)  # the whole-queue ranking
    rng = random.Random(repos)
    rows = [{"pipeline": "ci", "repo": f"repo-{rng.randrange(repos):03d}", "commit": f"{i:040x}", "status": "queued",
             "created_at": 1000.0 + i, "queued_at": 1000.0 + rng.randrange(60)} for i in range(150)]
    store = store_spec.open()
    try:
        store.bulk_insert_jobs(rows)
        with store._tx(write=False) as db:  # noqa: SLF001 - the queue as the database has it
            queued = [(int(i), r, q) for i, r, q in db.execute("SELECT id, repo, queued_at FROM jobs "
                                                               "WHERE status = 'queued'")]
            for window in (5, 40, 200):  # every candidate a claim of limit window / 4 may lock, in order
                assert store._claim_order(db, window) == fair_order(queued)[:window]  # noqa: SLF001
        seen: list[int] = []
        store.claim_jobs("node-a", lambda job: seen.append(job.id) and None, lease=15, limit=10)
        assert seen == fair_order(queued)[:10]
        claimed = store.claim_jobs("node-a", anywhere, lease=15, limit=10)
        assert [j.id for j in claimed] == fair_order(queued)[:10]
    finally:
        store.close()


# --- attack: a node started with another config ---------------------------------------------------


def test_a_node_with_another_config_is_told_and_shown(pg_spec, caplog):
    """An operator updates pipelines/ on one host of a cluster and not the others: that node
    claims jobs of pipelines the others lack (they fail them) or leases a runner by another
    capacity. Nothing refuses it (a rolling reload passes through this), but every node says so
    in its log and /health (``config_differs``), /nodes shows each one's fingerprint, and it ends
    when they agree again."""
    a_store, b_store = pg_spec.open(), pg_spec.open()
    a = Node(a_store, node_id="a" * 32, cluster=True, config="1111111111111111")
    b = Node(b_store, node_id="b" * 32, cluster=True, config="1111111111111111")
    try:
        a.register()
        b.register()
        assert a.health()["config_differs"] == [] and b.health()["config_differs"] == []
        with caplog.at_level("WARNING", logger="narwhal.dispatch.nodes"):
            b.set_config("2222222222222222")  # b reloaded a changed pipelines/
            assert a.beat() and a.beat()
        warnings = [r.getMessage() for r in caplog.records if "another config" in r.getMessage()]
        assert len(warnings) == 2  # b about a (at its reload), a about b (once, not every beat)
        assert f"pid {b.pid} (node bbbbbbbb)" in a.health()["config_differs"][0]
        assert {n["id"][-1]: n["config"] for n in a_store.nodes(stale_after=15)} == {
            "a": "1111111111111111", "b": "2222222222222222"}
        b.set_config("1111111111111111")
        assert a.beat() and a.health()["config_differs"] == []
    finally:
        a_store.close()
        b_store.close()


def test_the_config_fingerprint_covers_pipelines_and_runners_not_settings_or_secrets(tmp_path, monkeypatch):
    from narwhal.config.loader import load_config

    def config(pipeline: str = "true", capacity: int = 2, settings: str = "", secret: str = "first-secret-value") -> str:
        root = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        (root / "pipelines").mkdir(parents=True)
        (root / "pipelines" / "ci.yaml").write_text(
            f'repo: "*"\nimage: narwhal-test/busybox:latest\nsteps:\n  - {{name: build, run: "{pipeline}"}}\n')
        (root / "inventory.yaml").write_text(
            f"runners:\n  - {{name: local, transport: local, capacity: {capacity}}}\n"
            "secrets:\n  TOKEN: {env: NODE_TEST_SECRET}\n" + (f"settings:\n{settings}" if settings else ""))
        monkeypatch.setenv("NODE_TEST_SECRET", secret)
        return load_config(root).fingerprint()

    same = config()
    assert config() == same and len(same) == 16
    assert config(settings="  public_names: [ci-2.example.com]\n") == same  # a node's own names
    assert config(secret="another value") == same
    assert config(pipeline="make") != same and config(capacity=4) != same


def test_hostile_repository_and_branch_names_do_not_steer_a_claim(store_spec):
    """Repository and branch names reach the claim's queries as parameters only: quotes, ``?``
    and ``%s`` (the placeholders the backends rewrite), NUL, SQL-looking text."""
    store = store_spec.open()
    names = ["it's", "a?b", "%s%%", "nul\x00repo", "x'); DELETE FROM jobs; --", "$$", "é" * 300]
    try:
        jobs = [store.create_jobs(name, f"{i:040x}", name, ["ci"])[0][0] for i, name in enumerate(names)]
        claimed = store.claim_jobs("node-a", anywhere, lease=15, limit=len(names))
        assert sorted(j.id for j in claimed) == sorted(j.id for j in jobs)
        assert store.stats()["queue"]["length"] == 0 and len(store.running_jobs()) == len(names)
    finally:
        store.close()


# --- attack: a node frozen in the middle of a transaction -------------------------------------------


def test_a_node_frozen_inside_a_transaction_does_not_stall_the_others_for_long(pg_spec):
    """A node's process stops (SIGSTOP, a paused VM, a cut cable) between two statements of a
    write: its session sits idle in a transaction, holding the events lock every status change
    takes (and its rows' locks). The database ends that session after the idle-in-transaction
    limit, so the other nodes wait that long at most, not until TCP gives up (two hours by
    default) or the node wakes up."""
    from narwhal.dispatch.postgres import PostgresBackend

    frozen = Store(PostgresBackend(pg_spec.where, password=pg_spec.password, idle_in_transaction=1.0))
    other = pg_spec.open()
    [job] = queue(other, 1)
    stuck = threading.Event()
    wake = threading.Event()

    def freeze() -> None:
        try:
            with frozen._tx() as db:  # noqa: SLF001 - a write that took the events lock, then froze
                frozen.backend.lock_events(db.tx)
                db.execute("SELECT id FROM jobs WHERE id = ? FOR UPDATE", (job.id,))
                stuck.set()
                wake.wait(60)
        except Exception:  # noqa: BLE001 - its session was ended under it: what the test wants
            pass

    with other._tx(write=False) as db:  # noqa: SLF001 - every session's limits, as the server has them
        assert db.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] == f"{IDLE_IN_TRANSACTION:.0f}s"
        assert db.execute("SHOW tcp_keepalives_idle").fetchone()[0] == "10"  # the server notices a cut client
    thread = threading.Thread(target=freeze, daemon=True)
    thread.start()
    try:
        assert stuck.wait(10)
        done = threading.Event()
        writer = threading.Thread(target=lambda: (other.cancel_job(job.id), done.set()), daemon=True)
        writer.start()  # a status change: needs the events lock and the job's row
        assert done.wait(20), "another node's write waited on the frozen node's transaction"
        assert other.get_job(job.id).status is JobStatus.CANCELLED
    finally:
        wake.set()
        thread.join(10)
        frozen.close()
        other.close()


# --- a node cut off from the database: its calls end, and so does what it held ----------------------


def test_every_postgresql_session_is_bounded_both_ways(postgres):
    """A call into a cut cable fails instead of waiting for TCP to give up (libpq's keepalives and
    tcp_user_timeout); the server ends a session left inside a transaction, and a silent peer's."""
    with contextlib.contextmanager(postgres.spec)() as spec, spec.open() as store:
        with store.backend.transaction(write=False) as tx:
            shown = {name: tx.execute(f"SHOW {name}").fetchone()[0] for name in (
                "idle_in_transaction_session_timeout", "tcp_keepalives_idle", "tcp_keepalives_interval",
                "tcp_keepalives_count")}
            client = tx.conn.info.get_parameters()
        assert shown == {"idle_in_transaction_session_timeout": "10s", "tcp_keepalives_idle": "10",
                         "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"}
        assert (client["keepalives"], client["keepalives_idle"], client["tcp_user_timeout"]) == ("1", "10", "10000")
        store.backend.hold("bounded", shared=True)
        assert store.backend._hold.info.get_parameters()["tcp_user_timeout"] == "10000"
    # a cut-off node's locks are gone before its attempts may be taken over
    assert IDLE_IN_TRANSACTION < LEASE


def test_a_node_cut_off_inside_a_transaction_holds_its_locks_no_longer_than_the_bound(postgres, clock):
    """PostgreSQL only (SQLite's writers are this machine's processes): a node cut off between two
    statements leaves its session idle inside the transaction, holding the job's row and the
    events lock. The server ends that session after IDLE_IN_TRANSACTION (0.5 s here), so the
    node taking the attempt over, and every writer of events, go on; the cut node's own
    transaction is rolled back, nothing of it lands."""
    with contextlib.contextmanager(postgres.spec)() as spec:
        cut = Store(PostgresBackend(spec.where, password=spec.password, idle_in_transaction=0.5), clock=clock)
        other = spec.open(clock)
        inside, back = threading.Event(), threading.Event()
        late: list[BaseException] = []
        threads: list[threading.Thread] = []
        try:
            [job] = queue(other, 1)
            assert cut.claim_jobs("node-a", anywhere, lease=15)
            clock.advance(20)  # node a's lease ran out: it is cut off

            def stalled() -> None:
                try:
                    with cut.backend.transaction() as tx:  # a fenced write, as append_log makes one
                        tx.execute("SELECT id FROM jobs WHERE id = ? FOR NO KEY UPDATE", (job.id,))
                        cut.backend.lock_events(tx)
                        tx.execute("INSERT INTO log (job_id, attempt, first_line, n_lines, data, kind) "
                                   "VALUES (?, 1, 1, 1, ?, 'step')", (job.id, b"written into the cut"))
                        inside.set()
                        back.wait(30)  # the cable is out: no COMMIT reaches the server
                except BaseException as exc:  # noqa: BLE001 - what the cut node gets when it is back
                    late.append(exc)

            threads.append(threading.Thread(target=stalled, daemon=True))
            threads[-1].start()
            assert inside.wait(30)
            taken: list = []
            taker = threading.Thread(target=lambda: taken.append(other.take_over(job.id, 1, "node a cut off")),
                                     daemon=True)
            threads.append(taker)
            taker.start()
            taker.join(20)
            assert not taker.is_alive(), "the takeover waited on the cut node's row lock"
            assert taken[0].attempt == 2
            other.create_jobs("acme/app", "f" * 40, "main", ["ci"])  # another event: not waiting either
        finally:
            back.set()
            for thread in threads:
                thread.join(30)
            cut.close()
            log = other.read_log(job.id)
            other.close()
        assert [type(exc).__name__ for exc in late] == ["StoreUnavailable"]
        assert log == []  # its transaction was rolled back
