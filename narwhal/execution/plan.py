"""Which of a job's steps may start now, and which are skipped and why (pure, no I/O).

The runner asks ``advance(free)`` whenever a step ended (or at the start): every step
whose dependencies have all ended is decided in pipeline order, by its ``when``
(``narwhal.config.conditions.decide_step``) and the job's first failure so far. A step
that may not run is skipped at once with the reason (which may let more steps become
ready); the others start, at most ``free`` of them. A pipeline without ``depends_on`` is
a chain, so it runs one step at a time in order, exactly as before steps had a graph.

A dependency that was skipped or failed still counts as ended: what a step does after a
failure is its ``when.status``'s business (``[failure]`` to collect reports), not its
dependencies'. A failure is a step's ``failed`` (not ``failed_allowed``), or one the
runner reports itself (a service that died).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from narwhal.config.conditions import StepWhen, decide_step
from narwhal.config.pipeline import Pipeline
from narwhal.job import StepStatus

ENDED = frozenset({StepStatus.PASSED, StepStatus.FAILED, StepStatus.FAILED_ALLOWED, StepStatus.ERROR,
                   StepStatus.CANCELLED, StepStatus.SKIPPED})


@dataclass(frozen=True)
class PlanStep:
    idx: int
    name: str
    deps: tuple[int, ...]
    when: StepWhen | None = None


@dataclass(frozen=True)
class Facts:
    """What a step's ``when`` is decided on: the job's event, branch and changed files."""

    event: str = "api"
    branch: str | None = None
    changed: tuple[str, ...] | None = None


def plan_steps(pipeline: Pipeline) -> list[PlanStep]:
    """The pipeline's steps with their dependencies as indexes (a chain without ``depends_on``)."""
    index = {step.name: i for i, step in enumerate(pipeline.steps)}
    graph = pipeline.graph()
    return [PlanStep(i, step.name, tuple(index[d] for d in graph[step.name]), step.when)
            for i, step in enumerate(pipeline.steps)]


class Plan:
    def __init__(self, steps: Sequence[PlanStep], facts: Facts):
        self.steps = list(steps)
        self.facts = facts
        self.status: dict[int, StepStatus] = {s.idx: StepStatus.PENDING for s in self.steps}
        self.failure: str | None = None  # the job's first failure, in narwhal's words

    def advance(self, free: int) -> tuple[list[PlanStep], list[tuple[PlanStep, str]]]:
        """(steps to start now, at most ``free``; steps skipped now, with why), in pipeline order.

        Steps returned to start are marked running; skipped ones are ended.
        """
        start: list[PlanStep] = []
        skipped: list[tuple[PlanStep, str]] = []
        progress = True
        while progress:
            progress = False
            for step in self.steps:
                if self.status[step.idx] is not StepStatus.PENDING or not self._ready(step):
                    continue
                why = decide_step(step.when, event=self.facts.event, branch=self.facts.branch,
                                  changed=self.facts.changed, failed=self.failure)
                if why is not None:
                    self.status[step.idx] = StepStatus.SKIPPED
                    skipped.append((step, why))
                    progress = True  # its dependents may be ready now
                elif len(start) < free:
                    self.status[step.idx] = StepStatus.RUNNING
                    start.append(step)
        return start, skipped

    def _ready(self, step: PlanStep) -> bool:
        return all(self.status[d] in ENDED for d in step.deps)

    def finish(self, idx: int, status: StepStatus, failure: str | None = None) -> None:
        """A step ended; ``failure`` is how, when it counts as the job's failure (``failed``)."""
        self.status[idx] = status
        if status is StepStatus.FAILED:
            self.fail(failure or f"step {self.steps[idx].name} failed")

    def fail(self, reason: str) -> None:
        """Something failed; the first failure is the one steps' conditions and reasons name."""
        if self.failure is None:
            self.failure = reason

    def end(self) -> list[PlanStep]:
        """The job is over: every step not yet ended is skipped; returns them."""
        left = [s for s in self.steps if self.status[s.idx] in (StepStatus.PENDING, StepStatus.RUNNING)]
        for step in left:
            self.status[step.idx] = StepStatus.SKIPPED
        return left

    @property
    def running(self) -> list[PlanStep]:
        return [s for s in self.steps if self.status[s.idx] is StepStatus.RUNNING]

    @property
    def pending(self) -> list[PlanStep]:
        return [s for s in self.steps if self.status[s.idx] is StepStatus.PENDING]
