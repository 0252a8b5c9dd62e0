"""The store thread: the one thread that runs the scheduler's store calls, first in first out,
and the queue that the running jobs' log lines wait in on their way to it.

Log batches queued one after another, with nothing else queued between them, are written as
one group (``Store.append_logs``: one transaction and one commit for what every running job
printed meanwhile, instead of one per job per flush). Anything else queued after a group
closes it, so the store still sees every call in the order it was queued: a step's lines
before its end, an outcome before the next read.

The log bytes waiting (queued, or being written) are counted. Above ``limit`` the jobs'
readers wait (``room``) before they read more of their steps' output: the SSH channel's
window fills and the runner's ``docker run`` blocks on its pipe, instead of the dispatcher's
memory growing with whatever the store has not written yet.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from narwhal.dispatch.backend import own_work
from narwhal.dispatch.store import LogBatch

T = TypeVar("T")

LOG_BACKLOG = 8 * 1024 * 1024  # bytes of log lines on their way to the store before readers wait


def batch_size(lines: list[str]) -> int:
    """What a batch counts against the backlog: its characters and newlines (bytes, for ASCII)."""
    return sum(map(len, lines)) + len(lines)


class StoreQueue:
    """One store thread; ``submit`` for any call, ``append`` for log batches, ``room`` to wait."""

    def __init__(self, write_logs: Callable[[list[LogBatch]], None], limit: int = LOG_BACKLOG):
        self._write_logs = write_logs
        self.limit = limit
        # own_work: the store thread keeps the node's leases, so it draws on the backend's own connections
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="narwhal-store",
                                                             initializer=own_work)
        self._lock = threading.Lock()
        self._open: list[LogBatch] | None = None  # the group the next batch joins: the last thing in line
        self.backlog = 0  # bytes of log queued or being written
        self._room: asyncio.Event | None = None  # set when the backlog falls to the limit
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` on the store thread after everything queued before it."""
        with self._lock:
            self._open = None  # log batches from now on go after this call
            return self._thread.submit(fn, *args)

    def append(self, batch: LogBatch) -> None:
        """Queue a job's lines; they join the last group if nothing was queued after it."""
        size = batch_size(batch.lines)
        with self._lock:
            self.backlog += size
            if self._open is not None:
                self._open.append(batch)
                return
            group = self._open = [batch]
            self._thread.submit(self._write, group)

    def _write(self, group: list[LogBatch]) -> None:
        with self._lock:
            if self._open is group:
                self._open = None  # closed: what comes now starts a group of its own
        try:
            self._write_logs(group)
        finally:
            size = sum(batch_size(b.lines) for b in group)
            with self._lock:
                self.backlog -= size
                room, loop = self._room, self._loop
                wake = room is not None and loop is not None and self.backlog <= self.limit
            if wake:
                assert room is not None and loop is not None
                try:
                    loop.call_soon_threadsafe(room.set)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass

    async def room(self) -> None:
        """Return when the backlog is at most ``limit`` (at once, usually)."""
        while self.backlog > self.limit:
            loop = asyncio.get_running_loop()
            with self._lock:
                if self._room is None or self._loop is not loop:
                    self._room, self._loop = asyncio.Event(), loop
                room = self._room
                if self.backlog <= self.limit:
                    return
                room.clear()
            await room.wait()

    def shutdown(self) -> None:
        """Wait until every queued call is done; nothing more may be queued."""
        self._thread.shutdown(wait=True)
