"""The job page's timeline: each step's bar from its start to its end, relative to the job's
start, so that steps a graph pipeline runs side by side are seen to overlap.

Server-rendered (SVG lengths in percent of the job's time so far: no inline style, which the
Content-Security-Policy forbids); the steps table says the same in text (each step's offset
and duration), and the page's script stretches the bars of a running job between refreshes
from the same numbers (``data-start``, ``data-end``, ``data-total``).
"""

from __future__ import annotations

from dataclasses import dataclass

from narwhal.job import Job

MIN_WIDTH = 0.6  # percent: a step of no time still shows as a sliver


@dataclass(frozen=True)
class Span:
    start: float  # seconds after the job started
    end: float | None  # seconds after the job started; None while the step runs
    x: float  # percent of the job's time so far
    width: float  # percent


@dataclass(frozen=True)
class Timeline:
    total: float  # seconds from the job's start to its end, or to now while it runs
    spans: dict[int, Span]  # by step idx; a step not started has none

    @property
    def overlapping(self) -> bool:
        """Whether some steps ran (or run) side by side."""
        spans = sorted(self.spans.values(), key=lambda s: s.start)
        ends = [s.end if s.end is not None else self.total for s in spans]
        return any(spans[i + 1].start < ends[i] for i in range(len(spans) - 1))


def timeline(job: Job, now: float) -> Timeline | None:
    """The bars of ``job``'s current attempt (None before any step started)."""
    started = [s.started_at for s in job.steps if s.started_at is not None]
    if not started:
        return None
    origin = min([*started, *([job.started_at] if job.started_at is not None else [])])
    finished = [s.finished_at for s in job.steps if s.finished_at is not None]
    end = job.finished_at if job.finished_at is not None else now
    total = max([end, *finished]) - origin
    total = total if total > 0 else 1e-3
    spans = {}
    for step in job.steps:
        if step.started_at is None:
            continue
        start = step.started_at - origin
        stop = step.finished_at - origin if step.finished_at is not None else None
        x = min(100 * start / total, 100 - MIN_WIDTH)
        width = min(max(MIN_WIDTH, 100 * ((stop if stop is not None else total) - start) / total), 100 - x)
        spans[step.idx] = Span(round(start, 3), None if stop is None else round(stop, 3), round(x, 3), round(width, 3))
    return Timeline(round(total, 3), spans)
