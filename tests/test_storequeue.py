"""The store queue: the scheduler's store calls in order, log batches grouped, the backlog bounded.

The store thread here is the real one; what it writes is recorded in memory, and a gate holds
it up where a test needs the store to be behind."""

from __future__ import annotations

import asyncio
import threading

from narwhal.dispatch.backend import is_own_work
from narwhal.dispatch.store import LogBatch
from narwhal.dispatch.storequeue import StoreQueue, batch_size


class Recorder:
    """The write side: every group and call, in the order the store thread ran them."""

    def __init__(self) -> None:
        self.done: list[object] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def write_logs(self, group: list[LogBatch]) -> None:
        self.entered.set()
        self.gate.wait(10)
        self.done.append([(b.job_id, b.lines) for b in group])

    def call(self, what: str) -> str:
        self.entered.set()
        self.gate.wait(10)
        self.done.append(what)
        return what


def test_consecutive_batches_are_one_group_and_any_other_call_closes_it():
    rec = Recorder()
    q = StoreQueue(rec.write_logs)
    rec.gate.clear()
    q.submit(rec.call, "first")  # holds the store thread: what follows waits in line
    assert rec.entered.wait(5)
    q.append(LogBatch(1, 1, ["a"]))
    q.append(LogBatch(2, 1, ["x"]))
    q.append(LogBatch(1, 1, ["b"]))
    q.submit(rec.call, "step finished")
    q.append(LogBatch(1, 1, ["c"]))
    answer = q.submit(rec.call, "read")
    rec.gate.set()
    assert answer.result(5) == "read"
    q.shutdown()
    assert rec.done == ["first", [(1, ["a"]), (2, ["x"]), (1, ["b"])], "step finished", [(1, ["c"])], "read"]
    assert q.backlog == 0


def test_a_batch_queued_while_its_group_is_being_written_goes_into_the_next_group():
    rec = Recorder()
    q = StoreQueue(rec.write_logs)
    rec.gate.clear()
    q.append(LogBatch(1, 1, ["a"]))
    assert rec.entered.wait(5)  # the group [a] is being written: it takes nothing more
    q.append(LogBatch(1, 1, ["b"]))
    q.append(LogBatch(1, 1, ["c"]))
    rec.gate.set()
    q.shutdown()
    assert rec.done == [[(1, ["a"])], [(1, ["b"]), (1, ["c"])]]


def test_a_failing_write_still_frees_its_share_of_the_backlog():
    def broken(group: list[LogBatch]) -> None:
        raise RuntimeError("the disk is gone")

    q = StoreQueue(broken, limit=10)
    q.append(LogBatch(1, 1, ["x" * 100]))
    q.shutdown()
    assert q.backlog == 0


def test_readers_wait_while_the_backlog_is_over_the_limit_and_go_on_when_it_drains():
    rec = Recorder()
    line = "y" * 99
    q = StoreQueue(rec.write_logs, limit=10 * batch_size([line]))
    log: list[str] = []

    async def reader(name: str) -> None:
        for _ in range(30):
            await q.room()
            assert q.backlog <= q.limit  # room() only returns below the limit
            q.append(LogBatch(1 if name == "one" else 2, 1, [line]))
            await asyncio.sleep(0)
        log.append(name)

    async def main() -> int:
        rec.gate.clear()
        readers = [asyncio.ensure_future(reader("one")), asyncio.ensure_future(reader("two"))]
        for _ in range(50):
            await asyncio.sleep(0.01)
        stalled = q.backlog
        assert not any(r.done() for r in readers)  # both wait for the store
        rec.gate.set()
        await asyncio.wait_for(asyncio.gather(*readers), 10)
        return stalled

    stalled = asyncio.run(main())
    q.shutdown()
    # held up, the backlog stopped at the limit plus what one read of each reader adds after its wait
    assert q.limit < stalled <= q.limit + 2 * batch_size([line])
    assert sorted(log) == ["one", "two"]
    written = [lines for group in rec.done for _, lines in group]  # type: ignore[union-attr]
    assert len(written) == 60 and q.backlog == 0


def test_the_store_thread_is_the_dispatchers_own_work():
    """The store thread keeps the node's leases: on PostgreSQL it draws on the connections kept
    for that (backend.own_work), not on those API requests share; the caller's thread does not."""
    queue = StoreQueue(lambda group: None)
    try:
        assert queue.submit(is_own_work).result(10) is True
        assert is_own_work() is False
    finally:
        queue.shutdown()
