"""Several schedulers as nodes of one PostgreSQL store (settings.cluster), with the scripted
run_job of test_scheduler: each job runs once, a runner's capacity holds across nodes, a node
whose lease ran out is taken over and its late writes refused.

The real path (three ``narwhal serve`` processes, sshd, dockerd, kill -9) is tests/e2e/test_cluster.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace

import pytest

from narwhal.config.inventory import Inventory, Runner
from narwhal.config.loader import Config
from narwhal.config.pipeline import Pipeline
from narwhal.config.settings import DEFAULT_SETTINGS, parse_settings
from narwhal.dispatch import scheduler as scheduler_mod
from narwhal.dispatch.nodes import Node
from narwhal.dispatch.outbox import Outbox
from narwhal.dispatch.postgres import LOG_ONLY
from narwhal.dispatch.schedules import BUSY_SLEEP, SCHEDULES_LOCK, ScheduleLoop
from narwhal.dispatch.store import LogBatch, Store, StoreInUse, StoreUnavailable
from narwhal.errors import ConfigError
from narwhal.job import JobStatus
from tests.conftest import StoreSpec
from tests.test_outbox import Clock
from tests.test_outbox import config as config  # noqa: F401 - fixtures, used by name
from tests.test_outbox import forge as forge  # noqa: F401
from tests.test_outbox import run_job as run_outbox_job
from tests.test_scheduler import COMMITS, Mirror, wait
from tests.test_scheduler import script as script  # noqa: F401

RUNNERS = [{"name": "r1", "transport": "local", "capacity": 2}, {"name": "r2", "transport": "local", "capacity": 1}]


@pytest.fixture
def pg(postgres) -> Iterator[StoreSpec]:
    yield from postgres.spec()


@pytest.fixture(autouse=True)
def _quick(monkeypatch):
    monkeypatch.setattr(scheduler_mod, "CLUSTER_POLL", 0.05)


def node(spec: StoreSpec, name: str, lease: float = 15.0, runners=RUNNERS) -> tuple[scheduler_mod.Scheduler, Store]:
    pipes = [Pipeline(name="ci", repo=["*"], image="img", steps=[{"name": "s", "run": "true"}])]
    config = Config(Inventory(runners=[Runner(**r) for r in runners]), pipes,
                    replace(DEFAULT_SETTINGS, health_interval=0.05, store=spec.where, cluster=True))
    store = spec.open()
    store.register_node(name, "test", 1)
    return scheduler_mod.Scheduler(config, store, Mirror(), node=name, lease=lease, takeover_interval=0.1), store


def submit(store: Store, n: int, start: int = 0) -> list[int]:
    return [store.create_jobs("repo", COMMITS[start + i], None, ["ci"])[0][0].id for i in range(n)]


def test_two_nodes_run_every_job_once_within_each_runners_capacity(pg, script):
    (a, sa), (b, sb) = node(pg, "node-a"), node(pg, "node-b")
    script.release.clear()
    a.start()
    b.start()
    try:
        ids = submit(sa, 12)
        a.wake()
        wait(lambda: len(script.started) == 3)  # r1: 2, r2: 1, across both nodes
        time.sleep(0.3)  # both nodes keep polling the queue: nobody starts a fourth
        assert len(script.started) == 3 and sb.stats() is not None
        script.release.set()
        wait(lambda: all(sa.get_job(i).is_final for i in ids), timeout=30)
    finally:
        a.stop()
        b.stop()
    assert sorted(job for job, _, _ in script.started) == ids  # each once
    assert script.peak["r1"] <= 2 and script.peak["r2"] <= 1, script.peak
    assert {sa.get_job(i).status for i in ids} == {JobStatus.PASSED}
    assert sa.slots_held("r1") == sa.slots_held("r2") == []  # every slot given back
    assert {sa.lease_of(i)[2] for i in ids} == {None}  # finished: no lease left


def test_an_expired_lease_is_taken_over_and_the_old_nodes_writes_are_refused(pg, script):
    one = [{"name": "r1", "transport": "local", "capacity": 1}]
    a, sa = node(pg, "node-a", lease=0.3, runners=one)  # never beats: its lease runs out
    script.release.clear()
    a.start()
    try:
        [job] = submit(sa, 1)
        a.wake()
        wait(lambda: len(script.started) == 1)
        b, sb = node(pg, "node-b", runners=one)
        b.start()
        try:
            # b takes the attempt over once a's lease ran out, and runs attempt 2 when the slot's
            # lease ran out too; a's own outcome (it finishes later) is refused.
            wait(lambda: sb.get_job(job).attempt == 2 and sb.get_job(job).status is JobStatus.RUNNING, timeout=30)
            assert sb.lease_of(job)[0] == "node-b"
            script.release.set()
            wait(lambda: sb.get_job(job).is_final, timeout=30)
        finally:
            b.stop()
    finally:
        a.stop()
    final = sb.get_job(job)
    assert (final.status, final.attempt) == (JobStatus.PASSED, 2)
    assert [(j, attempt) for j, _, attempt in script.started] == [(job, 1), (job, 2)]
    lines = "\n".join(text for _, text in sb.read_log(job))
    assert "stopped beating" in lines


def test_an_attempt_whose_outcome_could_not_be_stored_is_not_kept_alive_by_its_nodes_beat(pg, script):
    """The database is away at the moment a job's outcome is written (a partition, a restart):
    the node beats on once it is back, but no longer for that attempt, so its lease runs out and
    it is taken over and run again, rather than left running for ever under a live lease."""
    a, sa = node(pg, "node-a", lease=0.3)
    beat = Node(sa, interval=0.1, node_id="node-a", cluster=True)  # lease: 3 intervals, as a's claims
    real, calls = sa.finish_job, []

    def away_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise StoreUnavailable("the PostgreSQL store is unreachable (the test)")
        return real(*args, **kwargs)

    sa.finish_job = away_once  # type: ignore[method-assign]
    beat.start(held=a.leased)
    a.start()
    try:
        [job] = submit(sa, 1)
        a.wake()
        wait(lambda: sa.get_job(job).is_final, timeout=30,
             state=lambda: (sa.get_job(job), sa.lease_of(job), calls))
    finally:
        a.stop()
        beat.stop()
    final = sa.get_job(job)
    assert (final.status, final.attempt) == (JobStatus.PASSED, 2)
    assert [(j, attempt) for j, _, attempt in script.started] == [(job, 1), (job, 2)]
    assert a.leased() == []
    assert "stopped beating" in "\n".join(text for _, text in sa.read_log(job))


def test_a_cancel_on_one_node_stops_the_job_another_runs(pg, script):
    (a, sa), sb = node(pg, "node-a"), pg.open()
    script.release.clear()
    a.start()
    try:
        [job] = submit(sa, 1)
        a.wake()
        wait(lambda: sa.get_job(job).status is JobStatus.RUNNING)
        sb.cancel_job(job)  # as node b's API does: the flag in the store
        wait(lambda: sa.get_job(job).is_final)
    finally:
        a.stop()
        sb.close()
    assert sa.get_job(job).status is JobStatus.CANCELLED


def test_cluster_needs_a_postgresql_store():
    with pytest.raises(ConfigError, match=r"settings.cluster: needs a PostgreSQL store"):
        parse_settings({"cluster": True})
    assert parse_settings({"cluster": True, "store": "postgresql://n@db/narwhal"}).cluster is True


def test_cluster_nodes_share_the_hold_that_keeps_a_lone_dispatcher_out(pg):
    one, two, lone = pg.open(), pg.open(), pg.open()
    try:
        one.backend.hold("one", shared=True)
        two.backend.hold("two", shared=True)
        with pytest.raises(StoreInUse, match="cluster"):
            lone.backend.hold("lone")
        one.backend.release()
        two.backend.release()
        lone.backend.hold("lone")
        with pytest.raises(StoreInUse, match="without settings.cluster"):
            one.backend.hold("one", shared=True)
    finally:
        for store in (one, two, lone):
            store.close()


# --- once-only work: the outbox and the schedules ------------------------------------------


def test_two_nodes_send_each_commit_status_once(pg, config, forge):  # noqa: F811 - fixtures by name
    clock = Clock()
    a, b = pg.open(clock), pg.open(clock)
    try:
        run_outbox_job(a)
        first, second = (Outbox(s, lambda: config, send=forge, clock=clock, jitter=lambda: 0.0, shared=True)
                         for s in (a, b))
        head = a.outbox_heads()[0]
        assert (first.deliver(head), second.deliver(head)) == ("delivered", "taken")  # both read it due
        while first.run_once() + second.run_once():
            pass
        assert a.outbox_heads() == []
    finally:
        a.close()
        b.close()
    assert [r.json["description"] for r in forge.sent] == ["queued", "running on local", "passed in 0s"]


def test_one_node_at_a_time_runs_a_schedule_pass(pg):
    one, two = pg.open(), pg.open()
    try:
        one.backend.hold("one", shared=True)
        two.backend.hold("two", shared=True)
        assert one.backend.try_exclusive(SCHEDULES_LOCK)
        busy = ScheduleLoop(SimpleNamespace(store=two, config=None))  # type: ignore[arg-type]
        assert busy.run_once() == BUSY_SLEEP  # it does not even look at the config
        one.backend.end_exclusive(SCHEDULES_LOCK)
        assert two.backend.try_exclusive(SCHEDULES_LOCK)
        two.backend.release()  # the lock goes with its session, however the process ends
        assert one.backend.try_exclusive(SCHEDULES_LOCK)
    finally:
        one.close()
        two.close()


def test_a_log_line_written_by_one_node_wakes_the_followers_of_another(pg):
    import threading

    writer, reader = pg.open(), pg.open()
    woken = threading.Event()
    stop = threading.Event()
    calls: list[bool] = []

    def changed(jobs: bool) -> None:
        calls.append(jobs)
        woken.set()

    listener = threading.Thread(target=reader.backend.listen, args=(changed, stop), daemon=True)
    listener.start()
    try:
        assert woken.wait(10)  # the first call: whatever happened before it listened
        woken.clear()
        writer.backend.announcing = True
        [(job, _)] = writer.create_jobs("repo", COMMITS[0], None, ["ci"])  # an event: announced
        assert woken.wait(10)
        woken.clear()
        writer.append_log(job.id, 1, ["hello"])
        assert woken.wait(10)
        woken.clear()
        writer.append_logs([LogBatch(job.id, 1, ["again"])])
        assert woken.wait(10)
        # a job queued says so (the schedulers look at the queue); log lines alone do not
        assert calls == [True, True, False, False]
    finally:
        stop.set()
        listener.join(10)
        writer.close()
        reader.close()


def test_hostile_step_output_cannot_break_or_steer_the_announcements(pg):
    """A step prints what it likes: NUL, lone surrogates (invalid UTF-8 as read), a line past
    NOTIFY's 8000-byte payload, something that looks like SQL or another channel. The
    announcement never carries any of it (a fixed payload, empty or LOG_ONLY, on one fixed
    channel), so none can fail the log's transaction or reach another channel; the lines are
    stored as written."""
    import psycopg

    writer = pg.open()
    writer.backend.announcing = True
    spy = psycopg.connect(pg.where, password=pg.password, autocommit=True)
    try:
        spy.execute("LISTEN narwhal_changes")
        spy.execute('LISTEN "other\'); NOTIFY x; --"')
        [(job, _)] = writer.create_jobs("repo", COMMITS[0], None, ["ci"])
        hostile = ["nul \x00 byte", "lone \udcff surrogate", "x" * 20000,
                   "'); SELECT pg_notify('other', 'owned'); --", "$$ LISTEN narwhal_changes $$"]
        writer.append_log(job.id, 1, hostile)
        got = list(spy.notifies(timeout=2, stop_after=10))
        # the job's creation ('') and the log lines alone (LOG_ONLY): fixed payloads, never the output
        assert got and {(n.channel, n.payload) for n in got} == {("narwhal_changes", ""), ("narwhal_changes", LOG_ONLY)}
        assert [text for _, text in writer.read_log(job.id)] == hostile
    finally:
        spy.close()
        writer.close()
