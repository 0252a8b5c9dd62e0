"""Run one job on one runner: workspace volume, source, services, each step in a fresh container.

``run_job`` never raises because a step failed, an image is missing or Docker is
down on the runner: those become an ``Outcome``. It raises ``RunnerUnreachable``
only when the connection is gone and the job's result is unknown; the
scheduler re-queues, and ``reap`` later removes what the lost attempt left.
Everything narwhal creates for a job carries labels (see docker.py), and is
removed when the job ends, whatever the outcome.

A job with services first makes its own network and starts each service on it
(attached, so a service's end is seen at once), waits until each is ready, then runs
the steps on that network. Steps start as ``narwhal.execution.plan`` allows, at most
``JobSpec.parallel`` at once; the first to start unpacks the source into the workspace
and the others wait until it has (``docker.CHECKOUT``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets as secrets_mod
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from narwhal.config.inventory import Limits
from narwhal.config.pipeline import Pipeline, PipelineStep, Ready
from narwhal.config.settings import DEFAULT_SETTINGS
from narwhal.errors import (
    CommandFailed,
    DiskFull,
    DockerUnavailable,
    ImageNotFound,
    RunnerError,
    RunnerUnreachable,
    SourceError,
)
from narwhal.execution import artifacts, clone, docker, variables
from narwhal.execution.cache import CacheKey, JobCaches
from narwhal.execution.plan import Facts, Plan, plan_steps
from narwhal.execution.source import validate_commit
from narwhal.execution.transport import Result, Transport
from narwhal.job import JobStatus, Origin, StepStatus
from narwhal.masking import Masker
from narwhal.text import printable

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = 60.0  # seconds for narwhal's own docker commands (create, stop, rm, ps)
HALT_ROUNDS = 3  # attempts to make a stopped step's `docker run` return
TAIL_LINES = 20  # output lines kept to explain a docker-level failure
REASON_LIMIT = 500  # characters of a job's reason; it may quote step output, made inert first
READY_INTERVAL = 0.5  # seconds between two readiness checks of a service
READY_CHECK_TIMEOUT = 10.0  # a readiness check still running after this counts as "not ready"


@dataclass
class JobSpec:
    """Everything needed to run one attempt of one job.

    No defaults here: ``log_cap`` and ``grace`` come from ``config.settings.Settings``
    (``log_cap``, ``stop_grace``), limits and network from the runner's inventory entry.
    """

    job_id: int
    attempt: int
    pipeline: Pipeline
    repo: str
    commit: str
    branch: str | None
    limits: Limits
    log_cap: int  # bytes of step output kept per job
    grace: float  # seconds between `docker stop`'s SIGTERM and SIGKILL
    network: str
    # The secrets this job was granted (name -> value, read when it started); each step
    # gets those its pipeline and step ask for. Never stored, never in argv.
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    # What is masked in its output and messages: at least ``secrets`` (the scheduler adds
    # every secret the dispatcher knows).
    masker: Masker | None = field(default=None, repr=False)
    origin: Origin = field(default_factory=Origin)  # what started the job (NARWHAL_EVENT, ...)
    # Steps at once, at most: the runner slots the scheduler reserved for this job.
    parallel: int = 1
    job_url: str | None = None  # NARWHAL_JOB_URL (from settings.public_url)
    # The files the commit changed, when known (steps' when.paths); None: unknown.
    changed: tuple[str, ...] | None = None
    # The job's caches, keys rendered by the dispatcher (narwhal.execution.cache), and their
    # bounds (settings cache_timeout, cache_max_size).
    caches: tuple[CacheKey, ...] = ()
    cache_timeout: float = DEFAULT_SETTINGS.cache_timeout
    cache_max_size: int = DEFAULT_SETTINGS.cache_max_size
    # Where the pipeline's artifacts go (the dispatcher's store, for this attempt); None: kept nowhere.
    artifacts: artifacts.Receiver | None = field(default=None, repr=False)
    artifacts_cap: int = 0  # bytes of artifacts this job may keep (settings.artifacts_job_cap)
    artifacts_timeout: float = 600.0  # seconds the collection may take (settings.artifacts_timeout)


@dataclass
class Outcome:
    status: JobStatus
    reason: str | None = None
    # An infrastructure failure on this runner (Docker down, disk full): the job is not to
    # blame, and the scheduler may run it again elsewhere.
    retryable: bool = False


class Sink(Protocol):
    """How run_job reports progress; the scheduler's implementation writes to the store."""

    def step_started(self, idx: int, name: str) -> None: ...

    def step_finished(self, idx: int, name: str, status: StepStatus, exit_code: int | None,
                      reason: str | None = None) -> None:
        """A step ended, or will never run (``skipped``); ``reason`` says why when not obvious."""

    def note(self, text: str) -> None:
        """One line of narwhal's own (kind "narwhal"): the text alone, no "[narwhal] " prefix."""

    def log_lines(self, lines: list[str]) -> None:
        """A batch of step output (kind "step"), in order."""

    async def room(self) -> None:
        """Return when the sink takes more output; a step's reader awaits it between reads, so
        a sink that falls behind slows the step down (back-pressure) instead of filling up."""

    def job_finished(self, outcome: Outcome) -> None:
        """The outcome is known; called before the cleanup (which run_job still awaits)."""


ArchiveFactory = Callable[[], AsyncIterator[bytes]]


async def run_job(transport: Transport, spec: JobSpec, archive: ArchiveFactory, sink: Sink,
                  cancel: asyncio.Event, owner: str) -> Outcome:
    """Run every step of ``spec`` on ``transport``; report through ``sink``; clean up."""
    return await _JobRun(transport, spec, archive, sink, cancel, owner).run()


async def reap(transport: Transport, owner: str, keep: set[tuple[int, int]],
               running: Callable[[set[tuple[int, int]]], Awaitable[set[tuple[int, int]]]] | None = None) -> list[str]:
    """Remove containers, networks and volumes made by ``owner`` whose (job, attempt) is not in ``keep``.

    ``running``: asked, after each listing, which of the (job, attempt) found are running
    anywhere (another dispatcher of a cluster shares the owner): those are kept too.
    Returns the names removed (containers first, then networks, then volumes).
    """
    mine = {docker.LABEL_OWNER: owner}

    async def stale(listing: Result) -> list[str]:
        found = _listed(listing)
        gone = [(name, key) for name, key in found if key not in keep]
        if running is not None and gone:
            alive = await running({key for _, key in gone if key is not None})
            gone = [(name, key) for name, key in gone if key not in alive]
        return [name for name, _ in gone]

    containers = await stale(await _control(transport, docker.ps_by_label(mine)))
    if containers:
        await _control(transport, docker.remove_containers(containers))
    networks = await stale(await _control(transport, docker.networks_by_label(mine)))
    if networks:
        await _control(transport, docker.remove_networks(networks))
    # Cache volumes carry the owner too, and no job: they outlive jobs (the cache sweep evicts them).
    listed = await _control(transport, docker.volumes_by_label(mine, docker.REAP_VOLUME_FORMAT))
    volumes = await stale(_without_caches(listed))
    if volumes:
        await _control(transport, docker.remove_volumes(volumes))
    return containers + networks + volumes


# --- one job ---------------------------------------------------------------------------


class _Stopped(Exception):
    """A container was stopped from outside; ``why`` says why: ``cancelled``, ``deadline`` (the
    job's timeout), ``timeout`` (the step's own), ``service`` (a service died) or ``error``
    (another step's infrastructure error ended the job)."""

    def __init__(self, why: str):
        self.why = why


class _Log:
    """Step output into the sink, capped per job with one visible marker."""

    def __init__(self, sink: Sink, cap: int):
        self.sink = sink
        self.cap = cap
        self.used = 0
        self.truncated = False

    def line(self, text: str) -> None:
        self.lines([text])

    def lines(self, lines: list[str]) -> None:
        if self.truncated:
            return  # keep draining the step's output, just drop it
        text = "\n".join(lines)
        # str.isascii() is O(1) in CPython: the usual log needs no encode to be measured
        size = (len(text) if text.isascii() else len(text.encode("utf-8", errors="replace"))) + 1
        if self.used + size <= self.cap:
            self.used += size
            self._emit(lines)
            return
        keep = []
        for text in lines:  # the batch crosses the cap: find the last line that fits
            size = len(text.encode("utf-8", errors="replace")) + 1
            if self.used + size > self.cap:
                break
            self.used += size
            keep.append(text)
        self.truncated = True
        if keep:
            self._emit(keep)
        self.note(f"log truncated: more than {self.cap} bytes")

    def _emit(self, lines: list[str]) -> None:
        self.sink.log_lines(lines)

    def note(self, text: str) -> None:
        """narwhal's own short lines; few per step, so not counted against the cap."""
        self.sink.note(text)


@dataclass
class _Step:
    idx: int
    name: str
    image: str
    run: str
    env: dict[str, str]
    timeout: float | None
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    retry: int = 0
    allow_failure: bool = False


@dataclass
class _Service:
    name: str
    container: str
    argv: list[str]
    ready: Ready | None
    image: str
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    task: asyncio.Task[int] | None = None


@dataclass
class _Result:
    """How one step ended: its status, exit code, and for a failure the job's reason."""

    status: StepStatus
    code: int | None = None
    reason: str | None = None  # shown on the step (skipped, stopped) and, when it failed, the job's
    stop: str | None = None  # _Stopped.why, when narwhal stopped it


class _JobRun:
    def __init__(self, transport: Transport, spec: JobSpec, archive: ArchiveFactory, sink: Sink,
                 cancel: asyncio.Event, owner: str):
        self.t = transport
        self.spec = spec
        self.archive = archive
        self.masker = spec.masker if spec.masker is not None else Masker(spec.secrets)
        self.sink = _MaskedSink(sink, self.masker)
        self.cancel = cancel
        self.owner = owner
        self.log = _Log(self.sink, spec.log_cap)
        self.volume = docker.volume_name(owner, spec.job_id, spec.attempt)
        self.labels = docker.labels(owner, spec.job_id, spec.attempt)
        self.deadline: float | None = None
        pipeline = spec.pipeline
        # A job with services has a network of its own, which its steps join instead of the runner's.
        self.network = docker.network_name(owner, spec.job_id, spec.attempt) if pipeline.services else None
        self.steps_network = self.network or spec.network
        self.prefix = pipeline.is_graph  # steps may run side by side: each line says whose it is
        self.plan = Plan(plan_steps(pipeline), Facts(spec.origin.event, spec.branch, spec.changed))
        self.services: list[_Service] = []
        self.services_up = False  # while True, a service's end fails the job
        self.steps_started = False  # the services are ready and the steps run
        self.service_failure: str | None = None
        self.service_error: RunnerError | CommandFailed | None = None
        self.stops: dict[int, asyncio.Event] = {}  # running step -> set to stop it (a service died, an error)
        self.stop_why: dict[int, str] = {}
        # The source checkout: done by the first step to start; the others wait for it.
        self.token = secrets_mod.token_hex(16)
        self.checkout_by: int | None = None
        self.checked_out: asyncio.Future[bool] | None = None
        self.caches = self._job_caches()

    async def run(self) -> Outcome:
        try:
            steps = self._steps()
            self._validate_services()
        except (SourceError, ValueError) as exc:
            return Outcome(JobStatus.ERROR, printable(f"invalid job: {exc}", REASON_LIMIT))
        self.deadline = time.monotonic() + self.spec.pipeline.timeout
        outcome: Outcome | None = None
        lost = False
        try:
            outcome = await self._run(steps)
            lost = not await self._artifacts(outcome)
        except RunnerUnreachable:
            lost = True
            raise  # result unknown: the scheduler re-queues, reap() cleans up later
        except (RunnerError, SourceError, CommandFailed) as exc:
            outcome = Outcome(JobStatus.ERROR, printable(_reason(exc), REASON_LIMIT),
                              retryable=getattr(exc, "retryable", False))
        finally:
            self.services_up = False
            if outcome is not None:
                self._skip_rest(outcome)
                # The result is known: report it now; cleanup is housekeeping, not the result.
                self.sink.job_finished(outcome)
            if not lost:  # a lost runner would only make us wait for reconnects that fail
                await self._cleanup(quiet=True)
            else:
                self._forget_services()
        return outcome

    async def _artifacts(self, outcome: Outcome) -> bool:
        """Collect the pipeline's artifacts when the outcome asks for them; False if the runner was
        lost meanwhile. The outcome stands whatever happens here: a failed collection is a note in
        the log, never a red job (the steps did pass; the note says what is missing)."""
        wanted = self.spec.pipeline.artifacts
        receiver = self.spec.artifacts
        if wanted is None or receiver is None:
            return True
        if outcome.status not in (JobStatus.PASSED, JobStatus.FAILED) or self.cancel.is_set():
            return True  # a cancelled job, or one whose runner failed, keeps nothing
        if not wanted.wanted(outcome.status is JobStatus.PASSED):
            self.log.note(f"artifacts: not collected (when: {wanted.when}; the job {outcome.status.value})")
            return True
        name = docker.container_name(self.owner, self.spec.job_id, self.spec.attempt, "artifacts")
        image = self.spec.pipeline.image or self.spec.pipeline.image_for(self.spec.pipeline.steps[-1])
        try:
            argv = docker.collect_artifacts(name, image, wanted.paths, volume=self.volume,
                                            label_values=self.labels, limits=self.spec.limits)
        except ValueError as exc:
            self.log.note(f"artifacts: not collected: {printable(str(exc), 300)}")
            return True
        began = time.monotonic()
        task = asyncio.ensure_future(artifacts.collect(self.t, argv, receiver, cap=self.spec.artifacts_cap,
                                                       timeout=self.spec.artifacts_timeout))
        stop = asyncio.ensure_future(self.cancel.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():  # cancelled while collecting: keep nothing
            task.cancel()
            await asyncio.wait({task})
            await asyncio.to_thread(receiver.abort)
            self.log.note("artifacts: cancelled while collecting; none kept")
            return True
        try:
            got, code, errors = task.result()
        except RunnerUnreachable:
            await asyncio.to_thread(receiver.abort)
            self.log.note("artifacts: the runner was lost while collecting; none kept")
            return False
        except (RunnerError, CommandFailed, OSError) as exc:
            await asyncio.to_thread(receiver.abort)
            self.log.note(f"artifacts: not collected: {printable(str(exc), 300)}")
            return True
        for text in got.notes:
            self.log.note(text)
        if code not in (0, -1) and got.stopped is None:
            said = printable(errors.decode("utf-8", errors="replace").strip().splitlines()[-1:][0], 300) \
                if errors.strip() else "no message"
            got.stopped = f"the collector exited with {code} ({said})"
        await asyncio.to_thread(receiver.commit)
        took = time.monotonic() - began
        summary = f"artifacts: {got.files} file{'s' if got.files != 1 else ''}, {_size(got.bytes)} ({took:.1f}s)"
        if got.stopped is not None:
            summary += f"; stopped: {got.stopped} (what came before is kept)"
        self.log.note(summary)
        return True

    def _steps(self) -> list[_Step]:
        """Validate everything user-controlled before any command runs on the runner."""
        spec, pipe = self.spec, self.spec.pipeline
        validate_commit(spec.commit)
        docker.limits_of(spec.limits)
        job_env = variables.job_variables(repo=spec.repo, commit=spec.commit, branch=spec.branch,
                                          origin=spec.origin, job_id=spec.job_id, attempt=spec.attempt,
                                          pipeline=pipe.name, job_url=spec.job_url)
        steps = [_Step(idx, step.name, docker.validate_image(pipe.image_for(step)), step.run,
                       docker.validate_env({**clone.step_defaults(pipe.clone), **pipe.env_for(step), **job_env}),
                       pipe.timeout_for(step),
                       self._secrets_for(step), int(step.retry), bool(step.allow_failure))
                 for idx, step in enumerate(pipe.steps)]
        if not steps:
            raise ValueError("pipeline has no steps")
        if pipe.image is not None:
            docker.validate_image(pipe.image)
        return steps

    def _secrets_for(self, step: PipelineStep) -> dict[str, str]:
        """The granted secrets this step asks for; an optional one not granted is left out."""
        granted = self.spec.secrets
        return docker.validate_env({ref.name: granted[ref.name]
                                    for ref in self.spec.pipeline.secrets_for(step) if ref.name in granted})

    def _validate_services(self) -> None:
        spec = self.spec
        for service in spec.pipeline.services:
            name = docker.service_container_name(self.owner, spec.job_id, spec.attempt, service.name)
            labels = {**self.labels, docker.LABEL_SERVICE: service.name}
            assert self.network is not None
            argv = docker.run_service(name, service.image, service.command, alias=service.name,
                                      network=self.network, label_values=labels, limits=spec.limits,
                                      env=service.env)
            self.services.append(_Service(service.name, name, argv, service.ready, service.image))

    async def _run(self, steps: list[_Step]) -> Outcome:
        if self.cancel.is_set():
            return Outcome(JobStatus.CANCELLED, "cancelled")
        if self.services:
            stopped = await self._start_services()
            if stopped is not None:
                return stopped
        if self.caches is not None:
            stopped = await self._restore_caches()
            if stopped is not None:
                return stopped
        outcome = await self._run_steps(steps)
        if self.caches is not None and outcome.status is JobStatus.PASSED:
            outcome = await self._save_caches(outcome)
        return outcome

    # --- caches (narwhal.execution.cache) ----------------------------------------------

    def _job_caches(self) -> JobCaches | None:
        spec, pipe = self.spec, self.spec.pipeline
        if not spec.caches:
            return None
        return JobCaches(owner=self.owner, repo=spec.repo, job_id=spec.job_id, attempt=spec.attempt,
                         caches=spec.caches, image=pipe.image_for(pipe.steps[0]), volume=self.volume,
                         labels=self.labels, limits=spec.limits, timeout=spec.cache_timeout,
                         max_bytes=spec.cache_max_size, note=self.log.note, control=self._control,
                         supervise=self._cache_helper)

    async def _restore_caches(self) -> Outcome | None:
        """Before the first step; an Outcome when a cancel or the job's timeout ends the job here."""
        assert self.caches is not None
        try:
            await self.caches.restore()
        except _Stopped as stop:
            if stop.why == "cancelled":
                return Outcome(JobStatus.CANCELLED, "cancelled")
            return Outcome(JobStatus.FAILED, "timeout in cache restore")
        return None

    async def _save_caches(self, outcome: Outcome) -> Outcome:
        """After a passing job: a save that fails is a note, a cancel cancels the job."""
        assert self.caches is not None
        try:
            await self.caches.save()
        except _Stopped as stop:
            if stop.why == "cancelled":
                return Outcome(JobStatus.CANCELLED, "cancelled")
            self.log.note("caches not saved: the job's timeout")
        return outcome

    async def _cache_helper(self, argv: list[str], name: str, on_lines: Callable[[list[str]], None],
                            timeout: float) -> int:
        """A cache helper container to its end; -1 when its own timeout stopped it. Raises
        _Stopped for a cancel or the job's timeout, and Docker's own failures."""
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

        def lines(got: list[str]) -> None:
            tail.extend(got[-TAIL_LINES:])
            on_lines(got)

        what = "cache save" if name.endswith("save") else "cache restore"
        try:
            code = await self._supervise(argv, name, lines, None, timeout, step=what)
        except _Stopped as stop:
            if stop.why == "timeout":
                return -1
            raise
        if code == 125:
            error = _docker_error("\n".join(tail), argv[argv.index("--") + 1])
            if error is not None:
                raise error
        return code

    # --- steps -------------------------------------------------------------------------

    async def _run_steps(self, steps: list[_Step]) -> Outcome:
        """Start steps as the plan allows, at most ``spec.parallel`` at once, until none is left.

        No separate `volume create` or checkout container: the first step to start creates
        the labelled volume (--mount) and unpacks the source from its stdin (``_step``).
        """
        plan = self.plan
        running: dict[asyncio.Task[_Result], _Step] = {}
        stopped: tuple[str, str] | None = None  # (why, step) of a stop that ends the job
        error: BaseException | None = None
        limit = max(1, int(self.spec.parallel))
        while True:
            if stopped is None and error is None:
                if self.cancel.is_set():
                    stopped = ("cancelled", "")
                else:
                    start, skipped = plan.advance(limit - len(running))
                    for skip, why in skipped:
                        if skip.when is not None:  # its own condition: say so (the rest is obvious)
                            self.log.note(f"step {skip.name} skipped: {why}")
                        self.sink.step_finished(skip.idx, skip.name, StepStatus.SKIPPED, None, why)
                    for begin in start:
                        step = steps[begin.idx]
                        self.stops[step.idx] = asyncio.Event()
                        running[asyncio.ensure_future(self._step(step))] = step
            if not running:
                break
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: running[t].idx):
                step = running.pop(task)
                self.stops.pop(step.idx, None)
                try:
                    result = task.result()
                except RunnerUnreachable:
                    for other in running:
                        other.cancel()
                    await asyncio.gather(*running, return_exceptions=True)
                    raise
                except (ImageNotFound, DockerUnavailable, DiskFull, CommandFailed) as exc:
                    result = _Result(StepStatus.ERROR)
                    if error is None:
                        error = exc
                        self._stop_running("error")
                plan.finish(step.idx, result.status, result.reason)
                self.sink.step_finished(step.idx, step.name, result.status, result.code, result.reason)
                if result.stop in ("cancelled", "deadline") and stopped is None:
                    stopped = (result.stop, step.name)
        if error is not None:
            raise error
        if stopped is not None:
            why, where = stopped
            if why == "cancelled":
                return Outcome(JobStatus.CANCELLED, "cancelled")
            return Outcome(JobStatus.FAILED, f"timeout in step {where}")
        failure = self.service_failure or plan.failure
        if failure is not None:
            return Outcome(JobStatus.FAILED, failure)
        return Outcome(JobStatus.PASSED, None)

    def _stop_running(self, why: str) -> None:
        for idx, event in self.stops.items():
            self.stop_why.setdefault(idx, why)
            event.set()

    async def _step(self, step: _Step) -> _Result:
        """One step to its end, with its retries; the first step to start checks the source out."""
        checkout = self._claim_checkout(step)
        if checkout is None and self.checked_out is not None and not await self.checked_out:
            return _Result(StepStatus.SKIPPED, reason="not run: the source checkout did not finish")
        self.sink.step_started(step.idx, step.name)
        tries = step.retry + 1
        try:
            for run in range(1, tries + 1):
                try:
                    code = await self._container(step, run, checkout)
                except _Stopped as stop:
                    return self._stopped(step, stop.why)
                if checkout is not None and self.checked_out is not None and self.checked_out.done():
                    checkout = None  # the source is in: a retry only runs the step again
                if code == 0:
                    return _Result(StepStatus.PASSED, 0)
                if run < tries:
                    self.log.note(f"step {step.name}: retrying after exit {code} (run {run + 1} of {tries})")
                    continue
                why = f"exit {code} in step {step.name}"
                return self._failed(step, code, why)
            raise AssertionError("not reached")
        finally:
            if checkout is not None and self.checked_out is not None and not self.checked_out.done():
                self.checked_out.set_result(False)  # the steps waiting for it run no more

    def _failed(self, step: _Step, code: int | None, why: str) -> _Result:
        if self.checkout_by == step.idx and self.checked_out is not None and not self.checked_out.done():
            # It ended before the source was in: the steps waiting for it cannot run, so
            # this is the job's failure whatever allow_failure says.
            return _Result(StepStatus.FAILED, code, f"{why} (before the source checkout finished)")
        if step.allow_failure:
            self.log.note(f"step {step.name}: failure allowed ({why})")
            return _Result(StepStatus.FAILED_ALLOWED, code, why)
        return _Result(StepStatus.FAILED, code, why)

    def _stopped(self, step: _Step, why: str) -> _Result:
        if why == "cancelled":
            return _Result(StepStatus.CANCELLED, reason="cancelled", stop=why)
        if why == "deadline":
            return _Result(StepStatus.FAILED, reason=f"timeout in step {step.name}", stop=why)
        if why == "timeout":
            return self._failed(step, None, f"timeout in step {step.name}")
        if why == "service":
            return _Result(StepStatus.FAILED, reason=f"stopped: {self.service_failure}", stop=why)
        return _Result(StepStatus.CANCELLED, reason="stopped: another step's error ended the job", stop=why)

    def _claim_checkout(self, step: _Step) -> str | None:
        """The checkout token if this step is the first to start (it unpacks the source), else None."""
        if self.checkout_by is not None:
            return None
        self.checkout_by = step.idx
        self.checked_out = asyncio.get_running_loop().create_future()
        return self.token

    async def _container(self, step: _Step, run: int, checkout: str | None) -> int:
        """One run of a step's container; its exit code. Raises _Stopped and Docker's errors."""
        suffix = step.idx if run == 1 else f"{step.idx}-retry{run}"
        name = docker.container_name(self.owner, self.spec.job_id, self.spec.attempt, suffix)
        header = docker.secrets_header(step.secrets) if step.secrets else b""
        env = variables.step_variables(step.env, step.name, run)
        argv = docker.run_step(name, step.image, step.run, volume=self.volume,
                               label_values={**self.labels, docker.LABEL_STEP: step.name},
                               limits=self.spec.limits, env=env, network=self.steps_network,
                               checkout=checkout, secrets_size=len(header))
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        prefix = f"{step.name} | " if self.prefix else ""
        waiting = checkout is not None

        def on_lines(lines: list[str]) -> None:
            nonlocal waiting
            if waiting and checkout in lines:  # the source is in: the steps waiting for it may start
                waiting = False
                at = lines.index(checkout)
                lines = lines[:at] + lines[at + 1:]
                assert self.checked_out is not None
                if not self.checked_out.done():
                    self.checked_out.set_result(True)
            tail.extend(lines[-TAIL_LINES:])
            self.log.lines([prefix + line for line in lines] if prefix else lines)

        began = time.monotonic()
        stdin = _stdin(header, self.archive if checkout is not None else None)
        code = await self._supervise(argv, name, on_lines, stdin, step.timeout, self.stops.get(step.idx),
                                     step.idx, step.name)
        if code == 125:  # `docker run` itself failed, or the step chose 125: tell them apart
            error = _docker_error("\n".join(tail), step.image)
            if error is not None:
                raise error
            if header and tail and tail[-1].startswith(docker.SECRETS_FAILED):
                raise CommandFailed(["sh", "read secrets"], code, "\n".join(tail))
            if checkout is not None and tail and tail[-1].startswith(docker.CHECKOUT_FAILED):
                raise CommandFailed(["tar", "-x", "-C", docker.WORKSPACE], code, "\n".join(tail))
        self.log.note(f"step {step.name}: exit {code} ({time.monotonic() - began:.1f}s)")
        return code

    async def _supervise(self, argv: list[str], name: str, on_lines: Callable[[list[str]], None],
                         stdin: AsyncIterator[bytes] | None, timeout: float | None,
                         stop: asyncio.Event | None = None, idx: int | None = None, step: str = "") -> int:
        """Stream one container to its end, unless a timeout, a cancel or ``stop`` ends it first."""
        task = asyncio.ensure_future(self.t.stream(argv, stdin=stdin, on_lines=on_lines, masker=self.masker,
                                                   pace=self.sink.room))
        waiters = {asyncio.ensure_future(self.cancel.wait())}
        if stop is not None:
            waiters.add(asyncio.ensure_future(stop.wait()))
        try:
            left, why_late = self._time_left(timeout)
            done, _ = await asyncio.wait({task, *waiters}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if self.cancel.is_set():
                why = "cancelled"
            elif stop is not None and stop.is_set():
                why = self.stop_why.get(idx, "error") if idx is not None else "error"
            else:
                why = why_late
            if why in ("cancelled", "deadline", "timeout"):
                self.log.note(self._stop_note("cancelled" if why == "cancelled" else "timeout", step or name,
                                              timeout))
            else:
                said = {"service": "a service died"}.get(why, "the job ended")
                self.log.note(f"stopping {step or name}: {said}")
            await self._halt(name, task)
            raise _Stopped(why)
        finally:
            for waiter in waiters:
                waiter.cancel()
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def _stop_note(self, why: str, step: str, timeout: float | None) -> str:
        """Why a step is being stopped, in the pipeline's words: ``step hang timed out after 3s``."""
        if why == "cancelled":
            return f"step {step} cancelled; stopping it"
        job_limit = self.spec.pipeline.timeout
        if self.deadline is not None and (timeout is None or self.deadline - time.monotonic() < 1.0):
            return f"job timed out after {job_limit:g}s (the pipeline's timeout) in step {step}; stopping it"
        return f"step {step} timed out after {timeout:g}s; stopping it"

    def _time_left(self, timeout: float | None) -> tuple[float | None, str]:
        """Seconds until the step's own timeout or the job's, whichever is first, and which it is."""
        limits: list[tuple[float, str]] = []
        if self.deadline is not None:
            limits.append((self.deadline - time.monotonic(), "deadline"))
        if timeout is not None:
            limits.append((timeout, "timeout"))
        if not limits:
            return None, "timeout"
        left, why = min(limits, key=lambda item: item[0])
        return max(0.0, left), why

    def _skip_rest(self, outcome: Outcome) -> None:
        why = {JobStatus.CANCELLED: "not run: the job was cancelled"}.get(
            outcome.status, "not run: the job ended")
        for step in self.plan.end():
            self.sink.step_finished(step.idx, step.name, StepStatus.SKIPPED, None, why)

    # --- services ----------------------------------------------------------------------

    async def _start_services(self) -> Outcome | None:
        """The job's network and its services, each ready; an Outcome if the job ends here."""
        assert self.network is not None
        internal = self.spec.network == "none"  # the runner's admin allows no egress
        await self._control(docker.create_network(self.network, self.labels, internal=internal))
        self.services_up = True
        for service in self.services:
            service.task = asyncio.ensure_future(self._service(service))
        await asyncio.gather(*(self._ready(s) for s in self.services))
        if self.service_error is not None:
            raise self.service_error
        if self.cancel.is_set():
            return Outcome(JobStatus.CANCELLED, "cancelled")
        if self.service_failure is not None:
            return Outcome(JobStatus.FAILED, self.service_failure)
        self.steps_started = True
        return None

    async def _service(self, service: _Service) -> int:
        """Stream a service's container to its end; an end while the job needs it fails the job."""
        def on_lines(lines: list[str]) -> None:
            service.tail.extend(lines[-TAIL_LINES:])

        code = await self.t.stream(service.argv, on_lines=on_lines, masker=self.masker)
        if self.services_up:
            error = _docker_error("\n".join(service.tail), service.image) if code == 125 else None
            if isinstance(error, ImageNotFound):
                error = ImageNotFound(f"{error} (service {service.name})")
            when = "during the job" if self.steps_started else "before it was ready"
            self._service_failed(service, f"service {service.name} exited with {code} {when}", error)
        return code

    def _service_failed(self, service: _Service, reason: str, error: RunnerError | CommandFailed | None = None,
                        ) -> None:
        """A service died or never got ready: the job fails (errs, for Docker's own failures)."""
        if self.service_failure is not None or not self.services_up:
            return
        self.service_failure = reason
        self.service_error = error
        self.log.note(reason)
        if service.tail:  # the service's last words, as its own lines (they are not narwhal's)
            self.log.note(f"last lines of service {service.name}:")
            self.log.lines([f"{service.name} | {line}" for line in service.tail])
        self.plan.fail(reason)
        self._stop_running("service")

    async def _ready(self, service: _Service) -> None:
        """Wait until ``service`` is ready (or running, without ``ready:``), within its
        ``ready.timeout`` and the job's; a service that is not fails the job."""
        ready = service.ready
        began = time.monotonic()
        patience = ready.timeout if ready is not None else CONTROL_TIMEOUT
        if ready is None:
            check = docker.ps_running(service.container)
        elif ready.port is not None:
            check = docker.exec_port_check(service.container, ready.port)
        else:
            assert ready.command is not None
            check = docker.exec_command(service.container, ready.command)
        while not self.cancel.is_set() and self.service_failure is None:
            now = time.monotonic()
            if self.deadline is not None and now > self.deadline:
                self._service_failed(service, f"timeout waiting for service {service.name}")
                return
            if now > began + patience:
                what = "not running" if ready is None else "not ready"
                self._service_failed(service, f"service {service.name} {what} after {patience:g}s")
                return
            try:
                result = await self.t.run(check, timeout=READY_CHECK_TIMEOUT)
            except TimeoutError:
                result = None  # a check that hangs is a check that failed
            if result is not None:
                error = _docker_error(result.output)
                if isinstance(error, (DockerUnavailable, DiskFull)):
                    self._service_failed(service, f"service {service.name}: {error}", error)
                    return
                if result.ok and (ready is not None or service.container in _names(result)):
                    self.log.note(f"service {service.name}: ready ({time.monotonic() - began:.1f}s)")
                    return
            await asyncio.sleep(READY_INTERVAL)

    # --- containers --------------------------------------------------------------------
    async def _halt(self, name: str, task: asyncio.Future) -> None:
        """Stop a container through a separate channel and make sure it is gone."""
        grace = self.spec.grace
        await self._control(docker.stop(name, grace), timeout=grace + CONTROL_TIMEOUT, check=False)
        if await self._exists(name):
            await self._control(docker.kill(name), check=False)
        for _ in range(HALT_ROUNDS):
            done, _ = await asyncio.wait({task}, timeout=grace + 5)
            if done:
                break
            # The container may have started after our stop (cancel right at `docker run`).
            await self._control(docker.remove_containers([name]), check=False)
        await self._wait_gone(name)

    async def _exists(self, name: str) -> bool:
        result = await self._control(docker.ps_by_name(name))
        return name in result.stdout.decode("utf-8", "replace").split()

    async def _wait_gone(self, name: str) -> None:
        """`--rm` removes a stopped container asynchronously; wait for it, force if it lingers."""
        give_up = time.monotonic() + CONTROL_TIMEOUT
        while await self._exists(name):
            if time.monotonic() > give_up:
                raise DockerUnavailable(f"docker unavailable: container {name} could not be removed")
            await self._control(docker.remove_containers([name]), check=False)
            await asyncio.sleep(0.2)

    async def _cleanup(self, quiet: bool) -> None:
        """Remove this attempt's containers, network and volume; a lost runner is left to reap()."""
        # Fast path: every step container ran with --rm and is gone, so the volume alone
        # is left (and the services, which are removed by name). Anything else (a halted
        # step, a container still being removed) falls through to the thorough sweep by label.
        try:
            if self.services:
                await self._remove_services()
            if (await self._control(docker.remove_volumes([self.volume]), check=False)).ok and self.network is None:
                return
            names = _names(await self._control(docker.ps_by_label(self.labels, "{{.Names}}")))
            if names:
                await self._control(docker.remove_containers(names))
            await self._remove_all(docker.volumes_by_label, docker.remove_volumes)
            if self.network is not None:
                await self._remove_all(docker.networks_by_label, docker.remove_networks)
        except (RunnerError, CommandFailed) as exc:
            if not quiet:
                raise
            log.warning("cleanup of job %s attempt %s on %s left for reap: %s",
                        self.spec.job_id, self.spec.attempt, self.t.name, exc)

    async def _remove_all(self, listing: Callable[..., list[str]], removal: Callable[[list[str]], list[str]]) -> None:
        """Remove this attempt's volumes (or networks), waiting while a container still holds one."""
        give_up = time.monotonic() + CONTROL_TIMEOUT
        while names := _names(await self._control(listing(self.labels, "{{.Name}}"))):
            result = await self._control(removal(names), check=False)
            if result.ok:
                break
            if time.monotonic() > give_up:  # still in use by a container being removed
                raise _docker_error(result.output) or CommandFailed(result.argv, result.exit_status, result.output)
            await asyncio.sleep(0.2)

    async def _remove_services(self) -> None:
        """Remove the services' containers; their `docker run` streams end with them."""
        await self._control(docker.remove_containers([s.container for s in self.services]), check=False)
        tasks = [s.task for s in self.services if s.task is not None]
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=CONTROL_TIMEOUT)
            for task in pending:
                task.cancel()
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.debug("service stream of job %s ended with %r", self.spec.job_id, task.exception())

    def _forget_services(self) -> None:
        """The runner is lost: stop waiting for the services' streams (reap() removes them)."""
        for service in self.services:
            if service.task is None:
                continue
            if service.task.done():
                if not service.task.cancelled():
                    service.task.exception()  # seen: it is the lost connection again
            else:
                service.task.cancel()

    async def _control(self, argv: list[str], *, timeout: float = CONTROL_TIMEOUT,
                       check: bool = True) -> Result:
        return await _control(self.t, argv, timeout=timeout, check=check)


# --- helpers ---------------------------------------------------------------------------


class _MaskedSink:
    """A Sink whose lines and notes pass through the job's masker (reasons too, at the end).

    Step output is masked in the stream already (across reads and lines); this is the
    second net, for narwhal's own lines and reasons that may quote output."""

    def __init__(self, sink: Sink, masker: Masker):
        self._sink = sink
        self._masker = masker

    def step_started(self, idx: int, name: str) -> None:
        self._sink.step_started(idx, name)

    def step_finished(self, idx: int, name: str, status: StepStatus, exit_code: int | None,
                      reason: str | None = None) -> None:
        self._sink.step_finished(idx, name, status, exit_code,
                                 None if reason is None else printable(self._masker.mask_text(reason), REASON_LIMIT))

    def note(self, text: str) -> None:
        self._sink.note(self._masker.mask_text(text))

    def log_lines(self, lines: list[str]) -> None:
        self._sink.log_lines(lines)

    async def room(self) -> None:
        await self._sink.room()

    def job_finished(self, outcome: Outcome) -> None:
        if outcome.reason:
            outcome.reason = self._masker.mask_text(outcome.reason)
        self._sink.job_finished(outcome)


def _stdin(header: bytes, archive: ArchiveFactory | None) -> AsyncIterator[bytes] | None:
    """What a step container reads: the secrets header, then the source tar (either may be absent)."""
    if not header:
        return archive() if archive is not None else None

    async def chunks() -> AsyncIterator[bytes]:
        yield header
        if archive is None:
            return
        source = archive()
        try:
            async for chunk in source:
                yield chunk
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

    return chunks()


async def _control(transport: Transport, argv: list[str], *, timeout: float = CONTROL_TIMEOUT,
                   check: bool = True) -> Result:
    """Run one of narwhal's own docker commands; failures become domain errors."""
    try:
        result = await transport.run(argv, timeout=timeout)
    except TimeoutError:
        raise DockerUnavailable(f"docker unavailable: `{' '.join(argv[:3])}` did not answer "
                                f"within {timeout:g}s on {transport.name}") from None
    if check and not result.ok:
        error = _docker_error(result.output)
        if error is None and result.exit_status == 127:
            error = DockerUnavailable(f"docker unavailable: docker CLI not found on {transport.name}")
        raise error or CommandFailed(result.argv, result.exit_status, result.output)
    return result


def _docker_error(output: str, image: str | None = None) -> RunnerError | CommandFailed | None:
    """Recognise Docker's own failure messages (as opposed to a step failing on its own)."""
    low = output.lower()
    if "cannot connect to the docker daemon" in low or "is the docker daemon running" in low:
        line = next((ln for ln in output.splitlines() if "docker daemon" in ln.lower()), output).strip()
        line = line[len("docker: "):] if line.startswith("docker: ") else line  # `docker run` says so
        return DockerUnavailable(f"docker unavailable: {line}")
    if "no space left on device" in low:
        return DiskFull("disk full")
    if image is not None and any(s in low for s in (
            "unable to find image", "no such image", "pull access denied",
            "manifest unknown", "repository does not exist")):
        return ImageNotFound(f"image not found: {image}")
    if image is not None:  # some other `docker run` failure: show docker's own words
        said = next((ln for ln in output.splitlines() if ln.startswith("docker: ")), None)
        if said is not None:
            return CommandFailed(["docker", "run"], 125, said)
    return None


def _reason(exc: Exception) -> str:
    if isinstance(exc, CommandFailed):
        last = exc.output.strip().splitlines()[-1:] if exc.output else []
        return f"runner command failed (exit {exc.exit_status})" + (f": {last[0]}" if last else "")
    if isinstance(exc, SourceError):
        return f"source: {exc}"
    return str(exc)


def _size(n: int) -> str:
    """Bytes for people: ``12.3 MB`` (powers of 1000, as the log's readers expect)."""
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def _names(result: Result) -> list[str]:
    return [ln.strip() for ln in result.stdout.decode("utf-8", "replace").splitlines() if ln.strip()]


def _without_caches(result: Result) -> Result:
    """`NAME<TAB>JOB<TAB>ATTEMPT<TAB>CACHE` lines as `NAME<TAB>JOB<TAB>ATTEMPT`, cache volumes left out."""
    kept = []
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        fields = line.strip("\r\n").split("\t")
        if len(fields) >= 4 and fields[3].strip():
            continue  # narwhal.cache is set: a cache, not a job's leftover
        kept.append("\t".join(fields[:3]))
    return Result(result.argv, result.exit_status, "\n".join(kept).encode(), result.stderr)


def _listed(result: Result) -> list[tuple[str, tuple[int, int] | None]]:
    """(name, (job, attempt)) from `NAME<TAB>JOB<TAB>ATTEMPT` lines; None when unreadable."""
    found: list[tuple[str, tuple[int, int] | None]] = []
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        name, _, rest = line.strip().partition("\t")
        job, _, attempt = rest.partition("\t")
        if not name:
            continue
        try:
            key: tuple[int, int] | None = (int(job), int(attempt))
        except ValueError:
            key = None  # labelled by us but unreadable: not kept by anyone
        found.append((name, key))
    return found


