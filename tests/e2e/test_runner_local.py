"""run_job on the local transport against the real dockerd: the same code path SSH uses.

Also holds the small helpers the SSH and injection tests share (job specs, leftovers).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import types
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import docker as docker_sdk
import pytest

from narwhal.config.inventory import Limits
from narwhal.execution import docker as narwhal_docker
from narwhal.execution import health
from narwhal.execution.runner import JobSpec, Outcome, reap, run_job
from narwhal.execution.source import Mirror
from narwhal.execution.transport import LocalTransport, Transport
from narwhal.job import JobStatus, StepStatus
from tests.test_runner_unit import RecordingSink

pytestmark = pytest.mark.slow

WAIT = 120.0  # generous bound for conditions on a shared, noisy machine


# --- shared helpers ---------------------------------------------------------------------


def make_runner(config: dict) -> Any:
    """An inventory Runner when inventory.py exists, else an object with the same fields."""
    try:
        from narwhal.config.inventory import Runner
    except ImportError:
        return types.SimpleNamespace(**config)
    return Runner(**config)


def make_pipeline(image: str, *runs: str | tuple[str, dict], timeout: float = 3600,
                  step_timeout: float | None = None, env: dict | None = None, model: bool = True) -> Any:
    """A pipeline with steps s0, s1, ...: a real pipeline.Pipeline when that module exists.

    ``model=False`` gives a plain object with the same fields, for input the model itself
    would refuse (the runner must refuse it too).
    """
    steps = []
    for i, run in enumerate(runs):
        run, extra = (run, {}) if isinstance(run, str) else run
        steps.append({"name": f"s{i}", "run": run, "image": None, "env": {}, "timeout": step_timeout, **extra})
    data = {"name": "p", "repo": ["*"], "image": image, "env": env or {}, "timeout": timeout, "steps": steps}
    if model:
        try:
            from narwhal.config.pipeline import Pipeline
        except ImportError:
            pass
        else:
            return Pipeline.model_validate(data)
    from narwhal.config.pipeline import Pipeline, PipelineStep  # unvalidated, as a bad file would be

    return Pipeline.model_construct(**{**data, "steps": [PipelineStep.model_construct(**step) for step in steps]})


def new_owner() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def new_job_id() -> int:
    # container names are global on the engine: other test sessions must not collide with us
    return random.randint(10**6, 10**9)


def leftovers(client, owner: str) -> tuple[list[str], list[str]]:
    """Containers (any state) and volumes still carrying this owner's label."""
    label = f"narwhal.owner={owner}"
    containers = [c.name for c in client.containers.list(all=True, filters={"label": label})]
    volumes = [v.name for v in client.volumes.list(filters={"label": label})]
    return containers, volumes


def execute(transport: Transport, spec: JobSpec, repo: str, mirror: Mirror, owner: str,
            during: Callable[[RecordingSink, asyncio.Event], Awaitable[None]] | None = None,
            ) -> tuple[Outcome, RecordingSink]:
    """Run one job to its end on a fresh event loop (closing the transport after)."""
    sink = RecordingSink()

    async def main():
        cancel = asyncio.Event()
        try:
            task = asyncio.ensure_future(run_job(transport, spec, lambda: mirror.archive(repo, spec.commit),
                                                 sink, cancel, owner))
            if during is not None:
                await during(sink, cancel)
            return await task
        finally:
            await transport.close()

    return asyncio.run(main()), sink


async def wait_for_line(sink: RecordingSink, text: str, timeout: float = WAIT) -> None:
    give_up = time.monotonic() + timeout
    while text not in sink.lines:
        assert time.monotonic() < give_up, f"no {text!r} in log: {sink.lines}"
        await asyncio.sleep(0.05)


def spec_for(pipeline, commit: str, **kw) -> JobSpec:
    from narwhal.config.inventory import DEFAULT_LIMITS
    from narwhal.config.settings import DEFAULT_SETTINGS

    return JobSpec(job_id=kw.pop("job_id", new_job_id()), attempt=kw.pop("attempt", 1), pipeline=pipeline,
                   repo=kw.pop("repo", "repo"), commit=commit, branch=kw.pop("branch", "main"),
                   limits=kw.pop("limits", DEFAULT_LIMITS), log_cap=kw.pop("log_cap", DEFAULT_SETTINGS.log_cap),
                   grace=kw.pop("grace", 2.0), network=kw.pop("network", "none"), **kw)


TWO_STEPS = ("echo first; cat README.md; echo from-step-one > made.txt",
             "echo second; cat made.txt; test -f build.sh")
TWO_STEP_LINES = ["first", "# demo", "second", "from-step-one"]


# --- tests ------------------------------------------------------------------------------


@pytest.fixture
def mirror(tmp_path) -> Mirror:
    return Mirror(tmp_path / "mirrors")


def test_two_steps_share_the_workspace(docker_engine, test_image, git_repo, mirror):
    owner = new_owner()
    spec = spec_for(make_pipeline(test_image, *TWO_STEPS), git_repo.commit)
    outcome, sink = execute(LocalTransport(), spec, git_repo.path, mirror, owner)
    assert outcome == Outcome(JobStatus.PASSED, None), sink.lines
    assert sink.user_lines() == TWO_STEP_LINES
    assert [e[3] for e in sink.events if e[0] == "finished"] == [StepStatus.PASSED, StepStatus.PASSED]
    assert leftovers(docker_engine, owner) == ([], [])


def test_failing_step(docker_engine, test_image, git_repo, mirror):
    owner = new_owner()
    spec = spec_for(make_pipeline(test_image, "echo before; exit 3", "echo never"), git_repo.commit)
    outcome, sink = execute(LocalTransport(), spec, git_repo.path, mirror, owner)
    assert outcome == Outcome(JobStatus.FAILED, "exit 3 in step s0")
    assert sink.events[-1] == ("finished", 1, "s1", StepStatus.SKIPPED, None)
    assert "never" not in sink.lines
    assert leftovers(docker_engine, owner) == ([], [])


def test_step_timeout_stops_the_step(docker_engine, test_image, git_repo, mirror):
    owner = new_owner()
    spec = spec_for(make_pipeline(test_image, "echo going; sleep 1000", "echo never", step_timeout=1),
                    git_repo.commit, grace=1)
    outcome, sink = execute(LocalTransport(), spec, git_repo.path, mirror, owner)
    assert outcome == Outcome(JobStatus.FAILED, "timeout in step s0")
    assert "going" in sink.lines and "never" not in sink.lines
    assert leftovers(docker_engine, owner) == ([], [])


def test_cancel_mid_step_removes_the_container(docker_engine, test_image, git_repo, mirror):
    owner = new_owner()
    grace = 2.0
    spec = spec_for(make_pipeline(test_image, "echo ready; sleep 1000"), git_repo.commit, grace=grace)
    name = narwhal_docker.container_name(owner, spec.job_id, spec.attempt, 0)

    async def cancel_when_ready(sink, cancel):
        await wait_for_line(sink, "ready")
        assert docker_engine.containers.list(filters={"name": name})  # running now
        cancel.set()
        cancel.set()  # idempotent

    outcome, sink = execute(LocalTransport(), spec, git_repo.path, mirror, owner, cancel_when_ready)
    assert outcome == Outcome(JobStatus.CANCELLED, "cancelled")
    assert not docker_engine.containers.list(all=True, filters={"name": name})
    assert sink.events[-1] == ("finished", 0, "s0", StepStatus.CANCELLED, None)
    assert leftovers(docker_engine, owner) == ([], [])


def test_running_step_has_the_hardened_baseline(docker_engine, test_image, git_repo, mirror):
    owner = new_owner()
    limits = Limits(memory="256m", cpus=0.5, pids=100)
    spec = spec_for(make_pipeline(test_image, "echo ready; sleep 1000"), git_repo.commit, limits=limits, grace=1)
    name = narwhal_docker.container_name(owner, spec.job_id, spec.attempt, 0)
    seen: dict = {}

    async def inspect_then_cancel(sink, cancel):
        await wait_for_line(sink, "ready")
        seen.update(docker_engine.api.inspect_container(name))
        cancel.set()

    outcome, _ = execute(LocalTransport(), spec, git_repo.path, mirror, owner, inspect_then_cancel)
    assert outcome.status is JobStatus.CANCELLED
    host = seen["HostConfig"]
    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"]
    assert sorted(c.removeprefix("CAP_") for c in host["CapAdd"]) == sorted(narwhal_docker.CAPABILITIES)
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["Memory"] == 256 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 100
    assert host["NetworkMode"] == "none"
    labels = seen["Config"]["Labels"]
    assert labels["narwhal"] == "1" and labels["narwhal.owner"] == owner
    assert labels["narwhal.job"] == str(spec.job_id) and labels["narwhal.step"] == "s0"
    assert seen["Config"]["WorkingDir"] == "/workspace"


def test_image_not_found(docker_engine, test_image, git_repo, mirror):
    owner = new_owner()
    missing = f"narwhal-test/missing-{uuid.uuid4().hex[:8]}:1"
    pipeline = make_pipeline(test_image, "echo ok", ("echo never", {"image": missing}))
    outcome, sink = execute(LocalTransport(), spec_for(pipeline, git_repo.commit), git_repo.path, mirror, owner)
    assert outcome == Outcome(JobStatus.ERROR, f"image not found: {missing}")
    assert ("finished", 1, "s1", StepStatus.ERROR, None) in sink.events
    assert leftovers(docker_engine, owner) == ([], [])


def test_docker_unavailable(docker_engine, test_image, git_repo, mirror, monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    spec = spec_for(make_pipeline(test_image, "true"), git_repo.commit)
    outcome, _ = execute(LocalTransport(), spec, git_repo.path, mirror, new_owner())
    assert outcome.status is JobStatus.ERROR
    assert outcome.reason.startswith("docker unavailable: Cannot connect to the Docker daemon")
    state = asyncio.run(health.check(LocalTransport()))
    assert state.state == "unhealthy" and "Cannot connect to the Docker daemon" in state.reason


def test_log_cap_on_a_chatty_step(docker_engine, test_image, git_repo, mirror):
    owner = new_owner()
    spec = spec_for(make_pipeline(test_image, "seq 1 20000; echo done-step-one", "echo step-two"),
                    git_repo.commit, log_cap=2000)
    outcome, sink = execute(LocalTransport(), spec, git_repo.path, mirror, owner)
    assert outcome.status is JobStatus.PASSED  # the step kept running to its end
    assert [ln for ln in sink.lines if "truncated" in ln] == ["[narwhal] log truncated: more than 2000 bytes"]
    kept = sink.user_lines()
    assert kept == [str(i) for i in range(1, len(kept) + 1)]
    assert "step-two" not in sink.lines


def test_reap_removes_only_stale_objects_of_its_owner(docker_engine, test_image):
    owner, other = new_owner(), new_owner()
    made = []

    def make(owner_: str, job: int, attempt: int) -> None:
        labels = narwhal_docker.labels(owner_, job, attempt)
        name = narwhal_docker.volume_name(owner_, job, attempt) + f"-{uuid.uuid4().hex[:6]}"
        docker_engine.volumes.create(name, labels=labels)
        docker_engine.containers.create(test_image, ["true"], name=name, labels=labels, network_mode="none")
        made.append(name)

    job = new_job_id()
    make(owner, job, 1)       # stale: an attempt nobody runs any more
    make(owner, job, 2)       # kept: still running
    make(other, job, 1)       # another dispatcher's: never touched
    try:
        removed = asyncio.run(reap(LocalTransport(), owner, {(job, 2)}))
        assert sorted(removed) == sorted([made[0], made[0]])
        assert leftovers(docker_engine, owner) == ([made[1]], [made[1]])
        assert leftovers(docker_engine, other) == ([made[2]], [made[2]])
    finally:
        for name in made:
            for collection in (docker_engine.containers, docker_engine.volumes):
                with contextlib.suppress(docker_sdk.errors.NotFound):
                    collection.get(name).remove(force=True)


def test_health_of_the_local_engine(docker_engine):
    state = asyncio.run(health.check(LocalTransport()))
    assert state.state == "healthy", state.reason
    assert state.docker_version and state.ncpu and state.ncpu >= 1
    assert state.free_disk and state.free_disk > 0
    assert state.load is not None
    assert set(state.to_dict()) == {"state", "reason", "checked_at", "docker_version", "load", "free_disk", "ncpu"}
