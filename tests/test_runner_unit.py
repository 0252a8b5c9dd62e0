"""runner.py logic against a scripted fake transport (fast; the real path is in tests/e2e)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import pytest

from narwhal.config.inventory import DEFAULT_LIMITS
from narwhal.config.pipeline import Pipeline
from narwhal.config.settings import DEFAULT_SETTINGS
from narwhal.errors import RunnerUnreachable
from narwhal.execution import docker
from narwhal.execution.runner import JobSpec, Outcome, reap, run_job
from narwhal.execution.transport import Result, Transport
from narwhal.job import JobStatus, StepStatus

COMMIT = "0123456789abcdef0123456789abcdef01234567"
IMAGE = "narwhal-test/busybox:latest"


class FakeDocker(Transport):
    """Just enough of a Docker CLI: containers, volumes, labels, stop; steps follow a script.

    ``script`` maps a container name suffix (step index, ``retry2``, a service's name) to a
    list of output lines and an exit code (and optionally seconds it runs), or to "hang"
    (runs until stopped), "lost" (the connection drops) or "no-checkout" (ends with 137
    before the source is in). Services hang unless scripted.
    """

    name = "fake"
    address = "fake:22"

    def __init__(self, script: dict | None = None, fail: dict[str, Result] | None = None):
        self.script = script or {}
        self.fail = fail or {}
        self.commands: list[list[str]] = []  # every argv, run() and stream(), in order
        self.containers: dict[str, dict[str, str]] = {}  # name -> labels
        self.volumes: dict[str, dict[str, str]] = {}
        self.networks: dict[str, dict[str, str]] = {}
        self.ready: dict[str, int] = {}  # service container -> readiness checks to fail before one passes
        self.stopped: dict[str, asyncio.Event] = {}
        self.times: dict[str, list] = {}  # container -> [started, ended] on the loop's clock
        self.stdin = b""

    async def run(self, argv, *, input=None, timeout=None) -> Result:
        self.commands.append(argv)
        sub = " ".join(argv[1:3])
        for prefix, result in self.fail.items():
            if sub.startswith(prefix):
                return Result(argv, result.exit_status, result.stdout, result.stderr)
        out = b""
        if sub == "volume create":
            self.volumes[argv[-1]] = _labels(argv)
        elif sub.startswith("volume rm"):
            for name in argv[argv.index("--") + 1:]:
                self.volumes.pop(name, None)
        elif sub == "network create":
            self.networks[argv[-1]] = _labels(argv)
        elif sub == "network rm":
            for name in argv[argv.index("--") + 1:]:
                self.networks.pop(name, None)
        elif sub == "network ls":
            out = _listing(self.networks, _filters(argv), argv[-1])
        elif argv[1] == "exec":
            name = argv[3]
            if name not in self.containers:
                return Result(argv, 1, b"", f"Error response from daemon: No such container: {name}\n".encode())
            if self.ready.get(name, 0) > 0:
                self.ready[name] -= 1
                return Result(argv, 1, b"", b"")
        elif sub == "ps --filter":  # ps_running
            wanted = argv[3][len("name=^"):-1].replace("\\", "")
            out = (wanted + "\n").encode() if wanted in self.containers else b""
        elif sub.startswith("rm --force") or argv[1] in ("stop", "kill"):
            for name in argv[argv.index("--") + 1:]:
                self.containers.pop(name, None)
                if name in self.stopped:
                    self.stopped[name].set()
        elif sub == "ps --all" and argv[4].startswith("name="):
            wanted = argv[4][len("name=^"):-1].replace("\\", "")
            out = (wanted + "\n").encode() if wanted in self.containers else b""
        elif sub == "ps --all":
            out = _listing(self.containers, _filters(argv), argv[-1])
        elif sub == "volume ls":
            out = _listing(self.volumes, _filters(argv), argv[-1])
        return Result(argv, 0, out, b"")

    async def stream(self, argv, *, stdin=None, on_line=None, on_lines=None, timeout=None, masker=None,
                     pace=None) -> int:
        if on_line is None:
            def on_line(text, _batch=on_lines):
                _batch([text])
        self.commands.append(argv)
        for prefix, result in self.fail.items():
            if " ".join(argv[1:3]).startswith(prefix):
                for line in (result.stdout + result.stderr).decode().splitlines():
                    on_line(line)
                return result.exit_status
        name = argv[argv.index("--name") + 1]
        self.containers[name] = _labels(argv)
        if "--mount" in argv:  # the first container creates the labelled workspace volume
            spec = dict(p.split("=", 1) for p in argv[argv.index("--mount") + 1].split(",")
                        if not p.startswith("volume-label="))
            labels = dict(p[len("volume-label="):].split("=", 1)
                          for p in argv[argv.index("--mount") + 1].split(",") if p.startswith("volume-label="))
            self.volumes.setdefault(spec["source"], labels)
        if stdin is not None:
            async for chunk in stdin:
                self.stdin += chunk
        service = "--network-alias" in argv
        what = self.script.get(name.split("-", 4)[-1], "hang" if service else ([], 0))
        if not service and any(docker.CHECKOUT in a for a in argv) and what != "lost" and what != "no-checkout":
            on_line(argv[-1])  # the checkout token: the source is in the workspace
        if what == "no-checkout":
            what = ([], 137)
        try:
            if what == "lost":
                raise RunnerUnreachable("connection to runner fake (fake:22) lost")
            if what == "hang":
                self.stopped[name] = asyncio.Event()
                on_line("started")
                await self.stopped[name].wait()
                return 137
            lines, code, *delay = what
            self.times[name] = [asyncio.get_running_loop().time(), None]
            for line in lines:
                on_line(line)
            if delay:
                self.stopped[name] = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopped[name].wait(), delay[0])
                if self.stopped[name].is_set():
                    code = 137
            self.times[name][1] = asyncio.get_running_loop().time()
            return code
        finally:
            if what != "lost":
                self.containers.pop(name, None)  # --rm

    def ran(self, *words: str) -> list[list[str]]:
        return [argv for argv in self.commands if argv[1:1 + len(words)] == list(words)]


def _labels(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--label")


def _filters(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1][len("label="):].split("=", 1) for i, a in enumerate(argv) if a == "--filter")


def _listing(objects: dict[str, dict[str, str]], filters: dict[str, str], fmt: str) -> bytes:
    """Names only for a `{{.Name}}`-style format, else NAME<TAB>JOB<TAB>ATTEMPT."""
    wide = "\t" in fmt
    lines = [f"{name}\t{labels.get('narwhal.job', '')}\t{labels.get('narwhal.attempt', '')}" if wide else name
             for name, labels in objects.items() if filters.items() <= labels.items()]
    return "".join(line + "\n" for line in lines).encode()


class RecordingSink:
    """A runner.Sink that keeps everything in memory (the e2e tests use it too).

    ``entries`` holds (kind, text) in order; ``lines`` the same as text, narwhal's notes
    shown "[narwhal] TEXT" (for assertions and messages only: the kind is what counts)."""

    def __init__(self):
        self.events: list[tuple] = []
        self.reasons: dict[int, str | None] = {}  # step -> the reason its last step_finished gave
        self.entries: list[tuple[str, str]] = []
        self.lines: list[str] = []
        self.outcome: Outcome | None = None

    def step_started(self, idx, name):
        self.events.append(("started", idx, name))

    def step_finished(self, idx, name, status, exit_code, reason=None):
        self.events.append(("finished", idx, name, status, exit_code))
        self.reasons[idx] = reason

    def note(self, text):
        self.entries.append(("narwhal", text))
        self.lines.append("[narwhal] " + text)

    def log_lines(self, lines):
        self.entries.extend(("step", line) for line in lines)
        self.lines.extend(lines)

    async def room(self):
        pass

    def job_finished(self, outcome):
        assert self.outcome is None, "job_finished twice"
        self.outcome = outcome

    def user_lines(self) -> list[str]:
        """The steps' lines (kind "step"), whatever their text."""
        return [text for kind, text in self.entries if kind == "step"]

    def notes(self) -> list[str]:
        """narwhal's own lines (kind "narwhal"), without any prefix."""
        return [text for kind, text in self.entries if kind == "narwhal"]


def pipeline(*runs: str, timeout: float = 3600, step_timeout: float | None = None, **kw) -> Pipeline:
    steps = [{"name": f"s{i}", "run": run, "timeout": step_timeout} for i, run in enumerate(runs)]
    return Pipeline(name="p", repo=["*"], image=IMAGE, env=kw.get("env", {}), timeout=timeout, steps=steps)


async def archive():
    yield b"tar-bytes-1"
    yield b"tar-bytes-2"


def run(fake: FakeDocker, pipe, *, cancel: asyncio.Event | None = None, during=None, **spec_kw) -> tuple[Outcome, RecordingSink]:
    sink = RecordingSink()
    spec = JobSpec(job_id=7, attempt=2, pipeline=pipe, repo="/r", commit=COMMIT, branch="main",
                   limits=DEFAULT_LIMITS, log_cap=DEFAULT_SETTINGS.log_cap, grace=1, network="none")
    spec = replace(spec, **spec_kw)

    async def main():
        event = cancel or asyncio.Event()
        task = asyncio.create_task(run_job(fake, spec, archive, sink, event, "owner-a"))
        if during is not None:
            await during(fake, event)
        return await task

    return asyncio.run(main()), sink


def assert_clean(fake: FakeDocker):
    assert fake.containers == {}
    assert fake.volumes == {}
    assert fake.networks == {}


# --- outcomes --------------------------------------------------------------------------


def test_two_steps_pass_in_order_and_clean_up():
    fake = FakeDocker({"0": (["one", "two"], 0), "1": (["three"], 0)})
    outcome, sink = run(fake, pipeline("echo one", "echo two"))
    assert outcome == Outcome(JobStatus.PASSED, None)
    assert sink.user_lines() == ["one", "two", "three"]
    assert sink.events == [("started", 0, "s0"), ("finished", 0, "s0", StepStatus.PASSED, 0),
                           ("started", 1, "s1"), ("finished", 1, "s1", StepStatus.PASSED, 0)]
    assert fake.stdin == b"tar-bytes-1tar-bytes-2"
    assert sink.outcome == outcome  # reported before the cleanup
    assert_clean(fake)
    assert fake.ran("volume", "rm")


def test_a_step_image_and_env_override_the_pipeline_ones():
    fake = FakeDocker()
    pipe = Pipeline(name="p", repo=["*"], image=IMAGE, env={"A": "pipe", "B": "pipe"},
                    steps=[{"name": "s0", "run": "true", "image": "other/image:2", "env": {"B": "step"}}])
    run(fake, pipe)
    step = next(argv for argv in fake.commands if "--name" in argv)
    assert "other/image:2" in step and IMAGE not in step
    assert {"A=pipe", "B=step"} <= {step[i + 1] for i, a in enumerate(step) if a == "--env"}


def test_step_env_and_labels():
    fake = FakeDocker()
    run(fake, pipeline("true", env={"A": "pipe", "B": "pipe"}), branch="$(touch /tmp/x)")
    step = [argv for argv in fake.commands if "--name" in argv and argv[argv.index("--name") + 1] == "narwhal-ownera-7-2-0"][0]
    env = [step[i + 1] for i, a in enumerate(step) if a == "--env"]
    assert {"A=pipe", "B=pipe", "CI=true", f"NARWHAL_COMMIT={COMMIT}", "NARWHAL_BRANCH=$(touch /tmp/x)",
            "NARWHAL_JOB=7"} <= set(env)
    assert _labels(step) == {"narwhal": "1", "narwhal.owner": "owner-a", "narwhal.job": "7",
                             "narwhal.attempt": "2", "narwhal.step": "s0"}


def test_failing_step_stops_the_job_and_skips_the_rest():
    fake = FakeDocker({"0": (["ok"], 0), "1": (["boom"], 3)})
    outcome, sink = run(fake, pipeline("true", "exit 3", "true"))
    assert outcome == Outcome(JobStatus.FAILED, "exit 3 in step s1")
    assert sink.events[-2:] == [("finished", 1, "s1", StepStatus.FAILED, 3),
                                ("finished", 2, "s2", StepStatus.SKIPPED, None)]
    assert not [argv for argv in fake.commands if "narwhal-ownera-7-2-2" in argv]
    assert_clean(fake)


def test_image_not_found_is_an_error_not_a_failure():
    fake = FakeDocker({"0": (["Unable to find image 'nope:1' locally",
                              "docker: Error response from daemon: pull access denied"], 125)})
    outcome, sink = run(fake, pipeline("true", "true"))
    assert outcome == Outcome(JobStatus.ERROR, f"image not found: {IMAGE}")
    assert sink.events[1] == ("finished", 0, "s0", StepStatus.ERROR, None)
    assert sink.events[2] == ("finished", 1, "s1", StepStatus.SKIPPED, None)
    assert_clean(fake)


def test_finding7_a_reason_quoting_step_output_is_inert():
    """A step that prints `docker: ...` with escapes and exits 125 cannot put ESC into the reason."""
    line = "docker: Error response from daemon: \x1b]0;owned\x07\x1b[2Jbad\u202e thing\r\x9b2J"
    fake = FakeDocker({"0": ([line], 125)})
    outcome, _ = run(fake, pipeline("true"))
    assert outcome.status is JobStatus.ERROR and outcome.reason is not None
    assert outcome.reason.startswith("runner command failed (exit 125): docker: Error response from daemon:")
    assert not any(ch in outcome.reason for ch in ("\x1b", "\x07", "\r", "\u202e", "\x9b"))


def test_a_step_may_exit_125_on_its_own():
    fake = FakeDocker({"0": (["my tool says no"], 125)})
    outcome, _ = run(fake, pipeline("exit 125"))
    assert outcome == Outcome(JobStatus.FAILED, "exit 125 in step s0")


def test_docker_unavailable():
    down = Result([], 125, b"", b"Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
                                 b"Is the docker daemon running?\n")
    outcome, sink = run(FakeDocker(fail={"run --rm": down}), pipeline("true", "true"))
    assert outcome.status is JobStatus.ERROR
    assert outcome.reason.startswith("docker unavailable: Cannot connect to the Docker daemon")
    assert outcome.retryable
    assert sink.events == [("started", 0, "s0"), ("finished", 0, "s0", StepStatus.ERROR, None),
                           ("finished", 1, "s1", StepStatus.SKIPPED, None)]


def test_disk_full():
    full = Result([], 125, b"", b"docker: Error response from daemon: create v: mkdir /var/lib/docker/volumes/v: "
                                 b"no space left on device\n")
    outcome, _ = run(FakeDocker(fail={"run --rm": full}), pipeline("true"))
    assert outcome == Outcome(JobStatus.ERROR, "disk full", retryable=True)  # the runner's fault


def test_checkout_failure_is_an_error_not_a_failed_step():
    broken = Result([], 125, b"tar: invalid tar magic\n[narwhal] checkout failed: tar exit 1\n", b"")
    outcome, _ = run(FakeDocker(fail={"run --rm": broken}), pipeline("true"))
    assert outcome.status is JobStatus.ERROR and "tar" in outcome.reason


def test_lost_connection_raises_and_leaves_cleanup_to_reap():
    fake = FakeDocker({"0": "lost"})
    with pytest.raises(RunnerUnreachable):
        run(fake, pipeline("true"))
    assert fake.commands[-1][1] == "run"  # nothing tried on the dead link after the loss
    assert fake.volumes  # still there: reap() removes it once the runner is back


@pytest.mark.parametrize("commit", ["$(touch /tmp/pwned)", "-" + "a" * 39, "A" * 40, "a" * 39 + "\n", ""])
def test_invalid_commit_runs_nothing(commit):
    fake = FakeDocker()
    outcome, _ = run(fake, pipeline("true"), commit=commit)
    assert outcome.status is JobStatus.ERROR
    assert "expected a 40-hex commit id" in outcome.reason
    assert fake.commands == []


def test_invalid_image_runs_nothing():
    fake = FakeDocker()
    pipe = pipeline("true")
    pipe.steps[0].image = "--privileged"
    outcome, _ = run(fake, pipe)
    assert outcome.status is JobStatus.ERROR and "must not start with '-'" in outcome.reason
    assert fake.commands == []


# --- logs ------------------------------------------------------------------------------


def test_log_cap_truncates_with_one_marker_and_keeps_draining():
    fake = FakeDocker({"0": ([f"line {i:04d}" for i in range(1000)], 0), "1": (["after"], 0)})
    outcome, sink = run(fake, pipeline("spam", "more"), log_cap=100)
    assert outcome.status is JobStatus.PASSED  # the step ran to its end
    markers = [line for line in sink.lines if "log truncated" in line]
    assert markers == ["[narwhal] log truncated: more than 100 bytes"]
    kept = sink.user_lines()
    assert kept == [f"line {i:04d}" for i in range(len(kept))]
    assert sum(len(line) + 1 for line in kept) <= 100


# --- timeouts and cancel ---------------------------------------------------------------


def test_step_timeout_stops_the_container_through_another_channel():
    fake = FakeDocker({"0": "hang"})
    outcome, sink = run(fake, pipeline("sleep 1000", "true", step_timeout=0.01))
    assert outcome == Outcome(JobStatus.FAILED, "timeout in step s0")
    assert fake.ran("stop", "--time", "1", "--", "narwhal-ownera-7-2-0")
    assert sink.events[1] == ("finished", 0, "s0", StepStatus.FAILED, None)
    assert sink.events[2] == ("finished", 1, "s1", StepStatus.SKIPPED, None)
    assert_clean(fake)
    # said in the pipeline's words, never by the container's name
    assert "step s0 timed out after 0.01s; stopping it" in sink.notes()
    assert not [note for note in sink.notes() if "narwhal-" in note]


def test_job_timeout_counts_too():
    fake = FakeDocker({"0": "hang"})
    outcome, sink = run(fake, pipeline("sleep 1000", timeout=0.01))
    assert outcome == Outcome(JobStatus.FAILED, "timeout in step s0")
    assert "job timed out after 0.01s (the pipeline's timeout) in step s0; stopping it" in sink.notes()


def test_cancel_mid_step():
    async def cancel_when_running(fake, event):
        while "narwhal-ownera-7-2-0" not in fake.stopped:
            await asyncio.sleep(0)
        event.set()
        event.set()  # idempotent

    fake = FakeDocker({"0": "hang"})
    outcome, sink = run(fake, pipeline("sleep 1000", "true"), during=cancel_when_running)
    assert outcome == Outcome(JobStatus.CANCELLED, "cancelled")
    assert sink.events[1] == ("finished", 0, "s0", StepStatus.CANCELLED, None)
    assert sink.events[2] == ("finished", 1, "s1", StepStatus.SKIPPED, None)
    assert len(fake.ran("stop")) == 1
    assert_clean(fake)
    assert "step s0 cancelled; stopping it" in sink.notes()


def test_cancel_before_start_runs_nothing():
    event = asyncio.Event()
    event.set()
    fake = FakeDocker()
    outcome, _ = run(fake, pipeline("true"), cancel=event)
    assert outcome == Outcome(JobStatus.CANCELLED, "cancelled")
    assert not fake.ran("run")


# --- reaping ---------------------------------------------------------------------------


def test_reap_removes_only_what_is_not_kept():
    fake = FakeDocker()
    own = {"narwhal": "1", "narwhal.owner": "me"}
    fake.containers = {"narwhal-1-1-0": {**own, "narwhal.job": "1", "narwhal.attempt": "1"},
                       "narwhal-2-1-0": {**own, "narwhal.job": "2", "narwhal.attempt": "1"},
                       "narwhal-3-1-0": {"narwhal.owner": "someone-else", "narwhal.job": "3", "narwhal.attempt": "1"}}
    fake.volumes = {"narwhal-1-1": {**own, "narwhal.job": "1", "narwhal.attempt": "1"},
                    "narwhal-2-1": {**own, "narwhal.job": "2", "narwhal.attempt": "1"}}
    removed = asyncio.run(reap(fake, "me", {(2, 1)}))
    assert removed == ["narwhal-1-1-0", "narwhal-1-1"]
    assert set(fake.containers) == {"narwhal-2-1-0", "narwhal-3-1-0"}
    assert set(fake.volumes) == {"narwhal-2-1"}
    assert asyncio.run(reap(fake, "me", {(2, 1)})) == []


# --- finding 7: narwhal's lines go through Sink.note, a step's never do --------------------


def test_finding7_runner_notes_go_through_note_and_step_text_stays_step():
    counterfeit = "[narwhal] step build: exit 0"
    fake = FakeDocker({"0": ([counterfeit, "\x1b[2;36m[narwhal] step s1: exit 0"], 1)})
    outcome, sink = run(fake, pipeline("echo fake", "never"), log_cap=10_000)
    assert outcome.status is JobStatus.FAILED
    assert sink.user_lines() == [counterfeit, "\x1b[2;36m[narwhal] step s1: exit 0"]
    [exit_note] = sink.notes()
    assert exit_note.startswith("step s0: exit 1 (") and not exit_note.startswith("[narwhal]")


def test_finding7_truncation_marker_is_a_note():
    fake = FakeDocker({"0": ([f"line {i:04d}" for i in range(100)], 0)})
    _, sink = run(fake, pipeline("spam"), log_cap=100)
    assert sink.notes()[0] == "log truncated: more than 100 bytes"
    assert all("truncated" not in line for line in sink.user_lines())


# --- attack pass -------------------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason="not fixed (attack pass): docker's own errors and the step's output reach "
                                       "narwhal merged in one stream, so exit 125 with docker's words cannot be told "
                                       "apart; telling them apart needs docker's stderr kept apart by the transports")
@pytest.mark.parametrize("said", ["Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
                                  "Is the docker daemon running?",
                                  "write /workspace/x: no space left on device"])
def test_attack_a_step_cannot_pass_for_the_runner_failing(said):
    """A step's own code (a pull request's) prints Docker's words for a dead engine or a full disk
    and exits 125: the job counts as the runner's fault (retryable), the scheduler marks the runner
    unhealthy until its next health check and runs the job again on another runner."""
    fake = FakeDocker({"0": ([said], 125)})
    outcome, _ = run(fake, pipeline(f"echo '{said}'; exit 125"))
    assert not outcome.retryable and outcome == Outcome(JobStatus.FAILED, "exit 125 in step s0")
