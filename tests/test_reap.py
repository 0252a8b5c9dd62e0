"""The reaper removes only what this dispatcher made: it selects by owner, not by ``narwhal=1``.

Two dispatchers may share one Docker engine; everything both make carries ``narwhal=1``,
so a reaper that selected by that label would remove the other's running jobs. The
foreign objects here carry ``narwhal=1`` and another owner's label, with job and attempt
numbers this dispatcher does not keep: only the owner label protects them.
"""

from __future__ import annotations

import asyncio

from narwhal.execution import docker
from narwhal.execution.runner import reap
from tests.test_runner_unit import FakeDocker

ME, OTHER = "owner-me", "owner-other"


def made_by(owner: str, job: int, attempt: int) -> dict[str, str]:
    return docker.labels(owner, job, attempt)


def engine() -> FakeDocker:
    fake = FakeDocker()
    fake.containers = {
        docker.container_name(ME, 1, 1, 0): made_by(ME, 1, 1),  # mine, stale
        docker.container_name(ME, 2, 1, 0): made_by(ME, 2, 1),  # mine, kept
        docker.container_name(OTHER, 1, 1, 0): made_by(OTHER, 1, 1),  # theirs, same numbers
        docker.container_name(OTHER, 7, 3, 0): made_by(OTHER, 7, 3),  # theirs, running
    }
    fake.volumes = {
        docker.volume_name(ME, 1, 1): made_by(ME, 1, 1),
        docker.volume_name(ME, 2, 1): made_by(ME, 2, 1),
        docker.volume_name(OTHER, 1, 1): made_by(OTHER, 1, 1),
        docker.volume_name(OTHER, 7, 3): made_by(OTHER, 7, 3),
    }
    return fake


def test_foreign_objects_carry_the_common_label():
    """The premise: narwhal=1 alone cannot tell the two dispatchers apart."""
    assert all(labels[docker.LABEL] == "1" for labels in engine().containers.values())
    assert all(labels[docker.LABEL] == "1" for labels in engine().volumes.values())


def test_reap_leaves_another_owners_containers_and_volumes():
    fake = engine()
    removed = asyncio.run(reap(fake, ME, {(2, 1)}))
    assert removed == [docker.container_name(ME, 1, 1, 0), docker.volume_name(ME, 1, 1)]
    assert set(fake.containers) == {docker.container_name(ME, 2, 1, 0), docker.container_name(OTHER, 1, 1, 0),
                                    docker.container_name(OTHER, 7, 3, 0)}
    assert set(fake.volumes) == {docker.volume_name(ME, 2, 1), docker.volume_name(OTHER, 1, 1),
                                 docker.volume_name(OTHER, 7, 3)}


def test_reap_keeping_nothing_still_leaves_the_other_owner_alone():
    fake = engine()
    asyncio.run(reap(fake, ME, set()))
    assert {labels[docker.LABEL_OWNER] for labels in fake.containers.values()} == {OTHER}
    assert {labels[docker.LABEL_OWNER] for labels in fake.volumes.values()} == {OTHER}
    assert len(fake.containers) == 2 and len(fake.volumes) == 2


def test_reap_asks_docker_by_owner():
    fake = engine()
    asyncio.run(reap(fake, ME, set()))
    listings = fake.ran("ps") + fake.ran("volume", "ls")
    assert len(listings) == 2
    for argv in listings:
        assert f"label={docker.LABEL_OWNER}={ME}" in argv
