"""Hostile commit ids, branches, repos, env values and images: rejected or inert, end to end.

A canary file must never appear, neither on this machine (the dispatcher, which is also
where the runner user's shell runs) nor inside the job's workspace.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from narwhal.errors import SourceError
from narwhal.execution.runner import Outcome
from narwhal.execution.source import Mirror
from narwhal.execution.ssh import SSHTransport
from narwhal.execution.transport import make_transport
from narwhal.job import JobStatus
from tests.e2e.test_runner_local import (
    execute,
    leftovers,
    make_pipeline,
    make_runner,
    new_owner,
    spec_for,
)
from tests.test_runner_unit import FakeDocker

pytestmark = pytest.mark.slow

INSIDE = "/workspace/pwned"
BRANCHES = [
    "$(touch {host}; touch {inside})",
    "`touch {host}; touch {inside}`",
    "main; touch {host}; touch {inside}",
    "main\ntouch {host}\ntouch {inside}",
    "x' ; touch {host}; touch {inside}; echo '",
    "--privileged -v /:/host $(touch {host})",
    "-e FOO=1",
]


@pytest.fixture
def canary() -> str:
    path = f"/tmp/narwhal-canary-{uuid.uuid4().hex}"
    yield path
    if os.path.exists(path):
        os.unlink(path)


@pytest.fixture
def mirror(tmp_path) -> Mirror:
    return Mirror(tmp_path / "mirrors")


def ssh_transport(host) -> SSHTransport:
    return make_transport(make_runner(host.runner_config()))


@pytest.mark.parametrize("template", BRANCHES)
def test_hostile_branch_is_inert(docker_engine, test_image, ssh_host, git_repo, mirror, canary, template):
    branch = template.format(host=canary, inside=INSIDE)
    owner = new_owner()
    pipeline = make_pipeline(test_image, 'printf "%s\\n" "$NARWHAL_BRANCH"', f"test ! -e {INSIDE}")
    outcome, sink = execute(ssh_transport(ssh_host), spec_for(pipeline, git_repo.commit, branch=branch),
                            git_repo.path, mirror, owner)
    assert outcome == Outcome(JobStatus.PASSED, None), sink.lines
    assert sink.user_lines() == branch.split("\n")  # arrived byte for byte, as data
    assert not os.path.exists(canary)
    assert leftovers(docker_engine, owner) == ([], [])


def test_hostile_env_values_are_inert(docker_engine, test_image, ssh_host, git_repo, mirror, canary):
    value = f"$(touch {canary}; touch {INSIDE}); `touch {INSIDE}`"
    pipeline = make_pipeline(test_image, ('printf "%s\\n" "$HOSTILE"', {"env": {"HOSTILE": value}}),
                             f"test ! -e {INSIDE}", env={"PIPE": value})
    owner = new_owner()
    outcome, sink = execute(ssh_transport(ssh_host), spec_for(pipeline, git_repo.commit), git_repo.path, mirror, owner)
    assert outcome == Outcome(JobStatus.PASSED, None), sink.lines
    assert sink.user_lines() == [value]
    assert not os.path.exists(canary)


def test_step_commands_stay_inside_the_container(docker_engine, test_image, ssh_host, git_repo, mirror, canary):
    # `run` is shell code by design, but it runs in the container, never on the runner host
    pipeline = make_pipeline(test_image, f"touch {canary} && test -e {canary} && echo touched-inside")
    outcome, sink = execute(ssh_transport(ssh_host), spec_for(pipeline, git_repo.commit), git_repo.path,
                            mirror, new_owner())
    assert outcome.status is JobStatus.PASSED and "touched-inside" in sink.lines
    assert not os.path.exists(canary)


@pytest.mark.parametrize("template", ["$(touch {host})", "; touch {host}", "a" * 40 + "\ntouch {host}",
                                      "-" + "a" * 39, "a" * 40 + " $(touch {host})"])
def test_hostile_commit_is_rejected_before_anything_runs(test_image, git_repo, mirror, canary, template):
    commit = template.format(host=canary)
    with pytest.raises(SourceError, match="expected a 40-hex commit id"):
        mirror.resolve(git_repo.path, commit)
    fake = FakeDocker()  # records every command: there must be none
    outcome, _ = execute(fake, spec_for(make_pipeline(test_image, "true"), commit), git_repo.path, mirror, new_owner())
    assert outcome.status is JobStatus.ERROR and "expected a 40-hex commit id" in outcome.reason
    assert fake.commands == []
    assert not os.path.exists(canary)


@pytest.mark.parametrize("template", ["$(touch {host})", "/tmp/x; touch {host}", "-u touch {host}",
                                      "--upload-pack=touch {host}", "/tmp/x\ntouch {host}",
                                      "ext::sh -c touch% {host}", "`touch {host}`"])
def test_hostile_repo_is_rejected_or_inert(git_repo, mirror, canary, template):
    with pytest.raises(SourceError):
        mirror.resolve(template.format(host=canary), git_repo.commit)
    with pytest.raises(SourceError):
        asyncio.run(_drain(mirror.archive(template.format(host=canary), git_repo.commit)))
    assert not os.path.exists(canary)


async def _drain(stream) -> None:
    async for _ in stream:
        pass


@pytest.mark.parametrize("image", ["--privileged", "-v/:/host", "img; touch /tmp/x", "img\nx"])
def test_hostile_image_is_rejected_before_anything_runs(git_repo, mirror, image):
    fake = FakeDocker()
    outcome, _ = execute(fake, spec_for(make_pipeline(image, "true", model=False), git_repo.commit), git_repo.path,
                         mirror, new_owner())
    assert outcome.status is JobStatus.ERROR and "invalid image name" in outcome.reason
    assert fake.commands == []
