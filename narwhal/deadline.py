"""Deadlines: a point in time by which something must be done, passed down a call chain so
that the parts of one stop share one budget instead of each adding its own timeout.

``Stop`` is the dispatcher's stop within its grace (``settings.stop_grace``): running jobs
may finish until ``jobs``; then their steps are stopped, until ``halt``; everything is
closed by ``end``, the grace itself. The part of the grace kept for stopping and closing
(``reserve``) is a quarter of it, 1 to 5 seconds, and all of a grace under a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

RESERVE_SHARE = 0.25  # of the grace, kept for stopping steps and closing connections
RESERVE_MIN = 1.0  # seconds
RESERVE_MAX = 5.0  # seconds

Clock = Callable[[], float]


@dataclass(frozen=True)
class Deadline:
    at: float  # on ``clock``'s scale (time.monotonic)
    clock: Clock = field(default=time.monotonic, compare=False, repr=False)

    @classmethod
    def after(cls, seconds: float, clock: Clock = time.monotonic) -> Deadline:
        return cls(clock() + max(0.0, seconds), clock)

    def left(self) -> float:
        """Seconds until the deadline (0 once it has passed)."""
        return max(0.0, self.at - self.clock())

    def before(self, seconds: float) -> Deadline:
        """The deadline ``seconds`` earlier."""
        return Deadline(self.at - seconds, self.clock)


def reserve(grace: float) -> float:
    """Seconds of a stop's grace kept for stopping steps and closing up."""
    grace = max(0.0, grace)
    return min(grace, max(RESERVE_MIN, min(RESERVE_MAX, grace * RESERVE_SHARE)))


@dataclass(frozen=True)
class Stop:
    """One stop of the dispatcher, within ``grace`` seconds of when it was asked for."""

    grace: float
    began: float  # on the deadlines' clock: when the stop was asked for
    jobs: Deadline  # running jobs may finish until then
    halt: Deadline  # then their steps are stopped and the jobs re-queued, until then
    end: Deadline  # connections, threads and the store are closed by then

    @classmethod
    def within(cls, grace: float, clock: Clock = time.monotonic) -> Stop:
        """The whole stop within ``grace`` (the process is gone by then)."""
        began = clock()
        end = Deadline(began + max(0.0, grace), clock)
        kept = reserve(grace)
        return cls(grace, began, end.before(kept), end.before(kept / 2), end)

    def elapsed(self) -> float:
        """Seconds since the stop was asked for."""
        return self.end.clock() - self.began

    @classmethod
    def after_grace(cls, grace: float, patience: float, clock: Clock = time.monotonic) -> Stop:
        """Jobs get all of ``grace``; stopping them and closing up ``patience`` seconds more
        (a dispatcher embedded in tests and tools, where no one waits on a signal)."""
        began = clock()
        jobs = Deadline(began + max(0.0, grace), clock)
        end = Deadline(jobs.at + patience, clock)
        return cls(grace, began, jobs, end, end)
