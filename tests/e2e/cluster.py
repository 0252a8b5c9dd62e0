"""Several ``narwhal serve`` nodes on one PostgreSQL database, and Docker as the witness of what
ran: shared by test_cluster.py and test_cluster_haproxy.py (the ``cluster`` fixture is in
conftest.py).

What Docker saw is the witness, not the dispatchers: every job's containers (labelled with its
job and attempt) are read from Docker's own event stream, and the attempts live at once on each
runner are counted from it.
"""

from __future__ import annotations

from narwhal.dispatch.store import Store
from tests.e2e.witness import DockerWitness

NODES = 3
CAPACITY = 2
LEASE_BOUND = 15 + 5 + 1  # nodes.LEASE + the takeover interval (nodes.INTERVAL) + scheduler.CLUSTER_POLL


def commits(git_repo, n: int) -> list[str]:
    return [git_repo.add_commit({f"f{i}.txt": str(i)}, f"commit {i}") for i in range(n)]


def runner_of(store: Store, ids: list[int]) -> dict[tuple[int, int], str]:
    """(job, attempt) -> runner, from the job's final attempt and runner."""
    found = {}
    for job_id in ids:
        job = store.get_job(job_id)
        found[(job_id, job.attempt)] = job.runner
    return found


def running_on(nodes: list, witness: DockerWitness, want: int) -> dict[str, int] | None:
    """Node id -> attempts it runs, once ``want`` attempts run in all and Docker started a
    container for each; None before."""
    running = {n["id"]: n["running"] for n in nodes[0].get("/nodes").json()["nodes"] if n["alive"]}
    if sum(running.values()) < want or len(witness.attempts()) < want:
        return None
    return running
