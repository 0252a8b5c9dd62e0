"""One stop, one budget: the parts of the dispatcher's stop share deadlines within its grace."""

from __future__ import annotations

import threading

import pytest

from narwhal.api.server import Server
from narwhal.deadline import RESERVE_MAX, RESERVE_MIN, Deadline, Stop, reserve


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("grace, kept", [(0, 0), (0.4, 0.4), (2, RESERVE_MIN), (10, 2.5), (60, RESERVE_MAX)])
def test_the_reserve_is_a_quarter_of_the_grace_within_bounds_and_never_more_than_it(grace, kept):
    assert reserve(grace) == pytest.approx(kept)


def test_a_stop_within_its_grace_ends_with_it():
    clock = Clock()
    stop = Stop.within(10, clock)
    assert (stop.jobs.at, stop.halt.at, stop.end.at) == (107.5, 108.75, 110.0)
    clock.now = 104.0
    assert (stop.jobs.left(), stop.end.left(), stop.elapsed()) == (3.5, 6.0, 4.0)
    clock.now = 200.0
    assert stop.end.left() == 0.0  # never negative: a timeout of 0 is "now"


def test_a_stop_of_no_grace_is_now():
    stop = Stop.within(0, Clock())
    assert stop.jobs == stop.halt == stop.end == Deadline(100.0)


def test_a_grace_for_the_jobs_alone_gives_the_stop_more_patience():
    stop = Stop.after_grace(3, patience=120, clock=Clock())
    assert (stop.jobs.at, stop.end.at) == (103.0, 223.0)


class Recorder:
    """Stands in for the dispatcher, the front and cheroot: what each was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.shutdown_timeout = 99.0

    def stop_jobs(self, stop: object) -> None:
        self.calls.append(("stop_jobs", stop))

    def stop(self, arg: object = None) -> None:
        self.calls.append(("stop", arg))

    def release(self) -> None:
        self.calls.append(("release", None))


def test_serve_passes_one_stop_down_and_bounds_every_wait_by_its_end():
    server = Server.__new__(Server)  # the stop path alone: no config, no port
    server.grace, server._stop = 4.0, None
    server.stopping, server._done = threading.Event(), threading.Event()
    server.dispatcher, server.front, server.httpd, server.state_lock = (Recorder() for _ in range(4))
    http = threading.Thread(target=lambda: None)
    http.start()
    server.shutdown()
    stop = server._stop
    assert isinstance(stop, Stop) and stop.grace == 4.0
    server.stop(http)
    assert server.stopping.is_set()
    assert server.dispatcher.calls == [("stop_jobs", stop), ("stop", stop)]  # one stop, passed down
    (_, front_timeout), = server.front.calls
    assert 0 <= front_timeout <= 4.0  # what was left of the grace, not a timeout of its own
    assert server.httpd.shutdown_timeout <= 4.0
