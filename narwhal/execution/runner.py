"""Run one job on one runner: workspace volume, source, each step in a fresh container.

``run_job`` never raises because a step failed, an image is missing or Docker is
down on the runner: those become an ``Outcome``. It raises ``RunnerUnreachable``
only when the connection is gone and the job's result is unknown; the
scheduler re-queues, and ``reap`` later removes what the lost attempt left.
Everything narwhal creates for a job carries labels (see docker.py), and is
removed when the job ends, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from narwhal.config.inventory import Limits
from narwhal.config.pipeline import Pipeline, PipelineStep
from narwhal.errors import (
    CommandFailed,
    DiskFull,
    DockerUnavailable,
    ImageNotFound,
    RunnerError,
    RunnerUnreachable,
    SourceError,
)
from narwhal.execution import docker
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

    def step_finished(self, idx: int, name: str, status: StepStatus, exit_code: int | None) -> None: ...

    def note(self, text: str) -> None:
        """One line of narwhal's own (kind "narwhal"): the text alone, no "[narwhal] " prefix."""

    def log_lines(self, lines: list[str]) -> None:
        """A batch of step output (kind "step"), in order."""

    def job_finished(self, outcome: Outcome) -> None:
        """The outcome is known; called before the cleanup (which run_job still awaits)."""


ArchiveFactory = Callable[[], AsyncIterator[bytes]]


async def run_job(transport: Transport, spec: JobSpec, archive: ArchiveFactory, sink: Sink,
                  cancel: asyncio.Event, owner: str) -> Outcome:
    """Run every step of ``spec`` on ``transport``; report through ``sink``; clean up."""
    return await _JobRun(transport, spec, archive, sink, cancel, owner).run()


async def reap(transport: Transport, owner: str, keep: set[tuple[int, int]]) -> list[str]:
    """Remove containers and volumes made by ``owner`` whose (job, attempt) is not in ``keep``.

    Returns the names removed (containers first, then volumes).
    """
    mine = {docker.LABEL_OWNER: owner}
    containers = _stale(await _control(transport, docker.ps_by_label(mine)), keep)
    if containers:
        await _control(transport, docker.remove_containers(containers))
    volumes = _stale(await _control(transport, docker.volumes_by_label(mine)), keep)
    if volumes:
        await _control(transport, docker.remove_volumes(volumes))
    return containers + volumes


# --- one job ---------------------------------------------------------------------------


class _Stopped(Exception):
    """A step was stopped from outside (timeout or cancel); ``why`` says which."""

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
        size = len("\n".join(lines).encode("utf-8", errors="replace")) + 1
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

    async def run(self) -> Outcome:
        try:
            steps = self._plan()
        except (SourceError, ValueError) as exc:
            return Outcome(JobStatus.ERROR, printable(f"invalid job: {exc}", REASON_LIMIT))
        self._started = 0  # steps reported so far (the rest are skipped)
        self.deadline = time.monotonic() + self.spec.pipeline.timeout
        outcome: Outcome | None = None
        lost = False
        try:
            outcome = await self._run(steps)
        except RunnerUnreachable:
            lost = True
            raise  # result unknown: the scheduler re-queues, reap() cleans up later
        except (RunnerError, SourceError, CommandFailed) as exc:
            outcome = Outcome(JobStatus.ERROR, printable(_reason(exc), REASON_LIMIT),
                              retryable=getattr(exc, "retryable", False))
        finally:
            if outcome is not None:
                self._skip_rest(steps)
                # The result is known: report it now; cleanup is housekeeping, not the result.
                self.sink.job_finished(outcome)
            if not lost:  # a lost runner would only make us wait for reconnects that fail
                await self._cleanup(quiet=True)
        return outcome

    def _plan(self) -> list[_Step]:
        """Validate everything user-controlled before any command runs on the runner."""
        spec, pipe = self.spec, self.spec.pipeline
        validate_commit(spec.commit)
        docker.limits_of(spec.limits)
        origin = spec.origin
        narwhal_env = {"CI": "true", "NARWHAL_COMMIT": spec.commit,
                       "NARWHAL_BRANCH": spec.branch or "", "NARWHAL_JOB": str(spec.job_id),
                       "NARWHAL_EVENT": origin.event, "NARWHAL_REF": origin.ref or "",
                       "NARWHAL_PR": str(origin.pr) if origin.pr is not None else "",
                       "NARWHAL_SOURCE_REPO": origin.source_repo or ""}
        steps = [_Step(idx, step.name, docker.validate_image(pipe.image_for(step)), step.run,
                       docker.validate_env({**pipe.env_for(step), **narwhal_env}), pipe.timeout_for(step),
                       self._secrets_for(step))
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

    async def _run(self, steps: list[_Step]) -> Outcome:
        # No separate `volume create` or checkout container: the first step's container
        # creates the labelled volume (--mount) and unpacks the source from its stdin.
        if self.cancel.is_set():
            return Outcome(JobStatus.CANCELLED, "cancelled")
        for step in steps:
            self.sink.step_started(step.idx, step.name)
            self._started = step.idx + 1
            try:
                status, code = await self._step(step, checkout=step.idx == 0)
            except _Stopped as stop:
                status = StepStatus.CANCELLED if stop.why == "cancelled" else StepStatus.FAILED
                self.sink.step_finished(step.idx, step.name, status, None)
                return self._stopped_outcome(stop, step.name)
            except (ImageNotFound, DockerUnavailable, DiskFull, CommandFailed):
                self.sink.step_finished(step.idx, step.name, StepStatus.ERROR, None)
                raise
            self.sink.step_finished(step.idx, step.name, status, code)
            if status is not StepStatus.PASSED:
                return Outcome(JobStatus.FAILED, f"exit {code} in step {step.name}")
        return Outcome(JobStatus.PASSED, None)

    def _stopped_outcome(self, stop: _Stopped, where: str) -> Outcome:
        if stop.why == "cancelled":
            return Outcome(JobStatus.CANCELLED, "cancelled")
        return Outcome(JobStatus.FAILED, f"timeout in step {where}")

    def _skip_rest(self, steps: list[_Step]) -> None:
        for step in steps[self._started:]:
            self.sink.step_finished(step.idx, step.name, StepStatus.SKIPPED, None)
        self._started = len(steps)

    # --- containers --------------------------------------------------------------------

    async def _step(self, step: _Step, checkout: bool = False) -> tuple[StepStatus, int]:
        name = docker.container_name(self.owner, self.spec.job_id, self.spec.attempt, step.idx)
        header = docker.secrets_header(step.secrets) if step.secrets else b""
        argv = docker.run_step(name, step.image, step.run, volume=self.volume,
                               label_values={**self.labels, docker.LABEL_STEP: step.name},
                               limits=self.spec.limits, env=step.env, network=self.spec.network,
                               checkout=checkout, secrets_size=len(header))
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

        def on_lines(lines: list[str]) -> None:
            tail.extend(lines[-TAIL_LINES:])
            self.log.lines(lines)

        began = time.monotonic()
        stdin = _stdin(header, self.archive if checkout else None)
        code = await self._supervise(argv, name, on_lines, stdin, step.timeout, step.name)
        if code == 125:  # `docker run` itself failed, or the step chose 125: tell them apart
            error = _docker_error("\n".join(tail), step.image)
            if error is not None:
                raise error
            if header and tail and tail[-1].startswith(docker.SECRETS_FAILED):
                raise CommandFailed(["sh", "read secrets"], code, "\n".join(tail))
            if checkout and tail and tail[-1].startswith(docker.CHECKOUT_FAILED):
                raise CommandFailed(["tar", "-x", "-C", docker.WORKSPACE], code, "\n".join(tail))
        self.log.note(f"step {step.name}: exit {code} ({time.monotonic() - began:.1f}s)")
        return (StepStatus.PASSED if code == 0 else StepStatus.FAILED), code

    async def _supervise(self, argv: list[str], name: str, on_lines: Callable[[list[str]], None],
                         stdin: AsyncIterator[bytes] | None, timeout: float | None, step: str = "") -> int:
        """Stream one container to its end, unless a timeout or cancel stops it first."""
        task = asyncio.ensure_future(self.t.stream(argv, stdin=stdin, on_lines=on_lines, masker=self.masker))
        waiter = asyncio.ensure_future(self.cancel.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, timeout=self._time_left(timeout),
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            why = "cancelled" if self.cancel.is_set() else "timeout"
            self.log.note(self._stop_note(why, step or name, timeout))
            await self._halt(name, task)
            raise _Stopped(why)
        finally:
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

    def _time_left(self, timeout: float | None) -> float | None:
        limits = [t for t in (timeout,) if t is not None]
        if self.deadline is not None:
            limits.append(self.deadline - time.monotonic())
        return max(0.0, min(limits)) if limits else None

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
        """Remove this attempt's containers and volume; a lost runner is left to reap()."""
        # Fast path: every step container ran with --rm and is gone, so the volume alone
        # is left. Anything else (a halted step, a container still being removed) falls
        # through to the thorough sweep by label.
        try:
            if (await self._control(docker.remove_volumes([self.volume]), check=False)).ok:
                return
            names = _names(await self._control(docker.ps_by_label(self.labels, "{{.Names}}")))
            if names:
                await self._control(docker.remove_containers(names))
            give_up = time.monotonic() + CONTROL_TIMEOUT
            while volumes := _names(await self._control(docker.volumes_by_label(self.labels, "{{.Name}}"))):
                result = await self._control(docker.remove_volumes(volumes), check=False)
                if result.ok:
                    break
                if time.monotonic() > give_up:  # still in use by a container being removed
                    raise _docker_error(result.output) or CommandFailed(result.argv, result.exit_status,
                                                                        result.output)
                await asyncio.sleep(0.2)
        except (RunnerError, CommandFailed) as exc:
            if not quiet:
                raise
            log.warning("cleanup of job %s attempt %s on %s left for reap: %s",
                        self.spec.job_id, self.spec.attempt, self.t.name, exc)

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

    def step_finished(self, idx: int, name: str, status: StepStatus, exit_code: int | None) -> None:
        self._sink.step_finished(idx, name, status, exit_code)

    def note(self, text: str) -> None:
        self._sink.note(self._masker.mask_text(text))

    def log_lines(self, lines: list[str]) -> None:
        self._sink.log_lines(lines)

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


def _names(result: Result) -> list[str]:
    return [ln.strip() for ln in result.stdout.decode("utf-8", "replace").splitlines() if ln.strip()]


def _stale(result: Result, keep: set[tuple[int, int]]) -> list[str]:
    """Names from `NAME<TAB>JOB<TAB>ATTEMPT` lines whose (job, attempt) is not kept."""
    stale = []
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        name, _, rest = line.strip().partition("\t")
        job, _, attempt = rest.partition("\t")
        if not name:
            continue
        try:
            key = (int(job), int(attempt))
        except ValueError:
            key = None  # labelled by us but unreadable: not kept by anyone
        if key not in keep:
            stale.append(name)
    return stale

