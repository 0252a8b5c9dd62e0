"""Jobs and steps: their states and the records the store hands out."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import TypeGuard

# A job names one exact commit: 40 lowercase hex digits. Declared once, here: the API
# schema and the CLI should take the pattern too. Use COMMIT_RE.fullmatch ("$" would allow "\n").
COMMIT_PATTERN = "[0-9a-f]{40}"
COMMIT_RE = re.compile(COMMIT_PATTERN)

# A branch or tag name narwhal builds or passes to git: git check-ref-format, conservatively
# (ASCII letters, digits and . _ / + -; no leading '-', no '..', '//' or '@{'; not ending in
# '.', '/' or '.lock'), so no name can read as an option or a revision expression. Use
# is_ref_name, which matches the whole string ("$" alone would let a trailing "\n" through).
BRANCH_RE = re.compile(r"(?!-)(?!.*\.\.)(?!.*//)(?!.*@\{)[A-Za-z0-9._/+-]{1,255}(?<![./])")


def is_ref_name(name: object) -> TypeGuard[str]:
    """Whether ``name`` is a branch or tag name narwhal accepts (``BRANCH_RE``, whole string)."""
    return isinstance(name, str) and BRANCH_RE.fullmatch(name) is not None and not name.endswith(".lock")

# What started a job. POST /commit and `narwhal submit` give "api"; webhooks give push,
# tag and pull_request; a pipeline's schedule gives cron; the dashboard's button, manual.
EVENTS = ("push", "pull_request", "tag", "cron", "manual", "api")


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # its pipeline's `when` did not match this commit: never ran

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES

    def __str__(self) -> str:  # so f-strings and JSON show "passed", not "JobStatus.PASSED"
        return self.value


# Final: everything a job can end in, i.e. every status but waiting and running.
FINAL_STATUSES = frozenset(JobStatus) - {JobStatus.QUEUED, JobStatus.RUNNING}


class StepStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    FAILED_ALLOWED = "failed_allowed"  # failed, with `allow_failure: true`: the job can still pass
    ERROR = "error"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # never ran: its `when` did not hold, or the job ended first (see Step.reason)

    def __str__(self) -> str:
        return self.value


class LogKind(str, Enum):
    """Who wrote a log line: a step's output, or narwhal itself (never mixed in one row).

    A step controls every byte of its output, so only the kind, not the text, says
    that a line is narwhal's: a step printing "[narwhal] ..." is still a step line."""

    STEP = "step"
    NARWHAL = "narwhal"

    def __str__(self) -> str:
        return self.value


@dataclass
class Step:
    job_id: int
    idx: int
    name: str
    status: StepStatus = StepStatus.PENDING
    exit_code: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    reason: str | None = None  # why it was skipped, or how it failed (narwhal's words)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value
        d["duration"] = _duration(self.started_at, self.finished_at)
        return d


@dataclass(frozen=True)
class Origin:
    """What started a job: the event and what the forge said about it.

    ``key`` tells submissions of one commit apart: the same key for the same pipeline is
    the same job (a second POST, a redelivered webhook), another key another job (a pull
    request after the push, each tick of a schedule). ``forge`` is the forge that hears
    about the job's states (commit statuses), if any.
    """

    event: str = "api"
    key: str = ""
    ref: str | None = None
    pr: int | None = None
    source_repo: str | None = None
    author: str | None = None
    subject: str | None = None
    forge: str | None = None


@dataclass
class Job:
    id: int
    pipeline: str
    repo: str
    commit: str
    branch: str | None
    status: JobStatus
    event: str = "api"
    ref: str | None = None
    pr: int | None = None
    source_repo: str | None = None
    author: str | None = None
    subject: str | None = None
    forge: str | None = None
    runner: str | None = None
    attempt: int = 1
    reason: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    steps: list[Step] = field(default_factory=list)

    @property
    def is_final(self) -> bool:
        return self.status.is_final

    @property
    def is_queued(self) -> bool:
        return self.status is JobStatus.QUEUED

    @property
    def is_running(self) -> bool:
        return self.status is JobStatus.RUNNING

    @property
    def duration(self) -> float | None:
        return _duration(self.started_at, self.finished_at)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value
        d["duration"] = self.duration
        d["steps"] = [s.to_dict() for s in self.steps]
        return d

    def summary(self) -> str:
        """One line for a commit status: the state, how long, and why it failed."""
        if self.status is JobStatus.QUEUED:
            return "queued"
        if self.status is JobStatus.RUNNING:
            return f"running on {self.runner}" if self.runner and self.runner != "-" else "running"
        took = f" in {self.duration:.0f}s" if self.duration is not None else ""
        why = f": {self.reason}" if self.reason and self.status is not JobStatus.PASSED else ""
        return f"{self.status.value}{took}{why}"


def _duration(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round(end - start, 3)
