"""Several ``narwhal serve`` processes active/active on one PostgreSQL database (settings.cluster),
on real sshd runner hosts and a real dockerd, with Docker as the witness (tests/e2e/cluster.py)."""

from __future__ import annotations

import random
import signal
import time

import pytest
import requests

from tests.e2e.cluster import CAPACITY, LEASE_BOUND, NODES, commits, runner_of, running_on
from tests.e2e.conftest import sse_events

pytestmark = pytest.mark.slow

JOBS = 300


def test_three_nodes_run_every_job_once_within_capacity_and_agree(cluster, git_repo):
    nodes, store, witness = cluster([{"name": "build", "run": "sleep 0.5; echo built"}])
    try:
        made = commits(git_repo, JOBS)
        pick = random.Random(16)
        began = time.monotonic()
        ids = [pick.choice(nodes).submit(git_repo.path, c, branch="main")[0]["id"] for c in made]
        for job_id in ids:
            done = nodes[0].wait_job(job_id, timeout=300)
            assert done["status"] == "passed", (done, nodes[0].get(f"/jobs/{job_id}/log").text)
        took = time.monotonic() - began
        time.sleep(1)  # the last containers' die events
    finally:
        witness.close()
    print(f"\n{JOBS} jobs across {NODES} nodes: {took:.1f}s, {JOBS / took:.2f} jobs/s")
    jobs = [store.get_job(i) for i in ids]
    assert {j.attempt for j in jobs} == {1}
    ran = {store.lease_of(i)[0] for i in ids}
    print(f"nodes that ran jobs: {len(ran)}; per node: "
          f"{ {n[-8:]: sum(1 for i in ids if store.lease_of(i)[0] == n) for n in ran} }")
    # Docker saw each job's containers once, at attempt 1, and never more than CAPACITY jobs per runner
    assert witness.attempts() == {i: {1} for i in ids}
    peak = witness.peak_per_runner(runner_of(store, ids))
    assert peak and max(peak.values()) <= CAPACITY, peak
    # every node says the same
    stats = [d.get("/stats").json() for d in nodes]
    assert all(s["repos"] == stats[0]["repos"] for s in stats), [s["repos"] for s in stats]
    assert stats[0]["repos"][0]["passed"] == JOBS
    assert all(sorted((r["name"], r["jobs"]) for r in s["runners"])
               == sorted((r["name"], r["jobs"]) for r in stats[0]["runners"]) for s in stats)
    listed = nodes[1].get("/nodes").json()["nodes"]
    assert sum(1 for n in listed if n["alive"]) == NODES
    store.close()


def test_kill_9_of_a_node_running_jobs_the_others_finish_them(cluster, git_repo, docker_engine):
    nodes, store, witness = cluster([{"name": "build", "run": "sleep 8; echo built"}])
    try:
        ids = [nodes[0].submit(git_repo.path, c, branch="main")[0]["id"] for c in commits(git_repo, 6)]

        def busiest():
            running = running_on(nodes, witness, 6)  # claimed, and their containers up
            return running and max(running.items(), key=lambda kv: kv[1])

        victim_id, count = nodes[0].wait_for(busiest, timeout=60, what="six jobs running")
        assert count >= 1
        victim = next(d for d in nodes if d.get("/health").json()["node"]["id"] == victim_id)
        theirs = [i for i in ids if store.lease_of(i)[0] == victim_id]
        victim.stop(signal.SIGKILL)
        killed = time.monotonic()
        alive = [d for d in nodes if d is not victim]
        retaken: dict[int, float] = {}
        while len(retaken) < len(theirs) and time.monotonic() - killed < LEASE_BOUND + 30:
            for job_id in theirs:
                if job_id not in retaken and store.get_job(job_id).attempt == 2:
                    retaken[job_id] = time.monotonic() - killed
            time.sleep(0.2)
        for job_id in ids:
            done = alive[0].wait_job(job_id, timeout=LEASE_BOUND + 60)
            assert done["status"] == "passed", (done, alive[0].get(f"/jobs/{job_id}/log").text)
        finished = time.monotonic() - killed
        # the dead attempts' containers are reaped by a surviving node once it took them over
        alive[0].wait_for(lambda: not any(
            int(c["Labels"].get("narwhal.attempt", 0)) == 1 and int(c["Labels"]["narwhal.job"]) in theirs
            for c in docker_engine.api.containers(all=True, filters={"label": ["narwhal.job"]})),
            timeout=60, what="the killed node's containers reaped")
        time.sleep(1)
    finally:
        witness.close()
    print(f"\nkill -9 of a node running {len(theirs)} jobs: re-queued after "
          f"{min(retaken.values()):.1f}-{max(retaken.values()):.1f}s (bound {LEASE_BOUND}s), "
          f"all {len(ids)} finished {finished:.1f}s after the kill")
    assert len(retaken) == len(theirs) and max(retaken.values()) <= LEASE_BOUND
    for job_id in ids:
        job = store.get_job(job_id)
        assert job.attempt == (2 if job_id in theirs else 1)
    assert witness.attempts() == {i: ({1, 2} if i in theirs else {1}) for i in ids}
    store.close()


def test_a_follower_on_one_node_sees_live_a_job_another_node_runs(cluster, git_repo):
    steps = [{"name": "talk", "run": "for i in 1 2 3 4 5 6; do echo line $i; sleep 1; done"}]
    nodes, store, witness = cluster(steps)
    witness.close()
    [job] = nodes[0].submit(git_repo.path, git_repo.commit, branch="main")
    job_id = job["id"]
    runner_node = nodes[0].wait_for(lambda: store.lease_of(job_id)[0], timeout=60, what="the job claimed")
    follower = next(d for d in nodes if d.get("/health").json()["node"]["id"] != runner_node)
    got: list[tuple[str, float]] = []
    with requests.get(follower.url + f"/jobs/{job_id}/log?follow=1", headers={"Accept": "text/event-stream"},
                      stream=True, timeout=60) as r:
        for event in sse_events(r):
            if event.get("event") == "end":
                break
            if "data" in event and event["data"].startswith("line "):
                got.append((event["data"], time.time()))
    assert [text for text, _ in got] == [f"line {i}" for i in range(1, 7)]
    written = {first: at for first, _, at in store.log_times(job_id)}
    lines = store.read_log(job_id)
    lag = []
    for text, seen in got:
        number = next(n for n, t in lines if t == text)
        at = max(a for first, a in written.items() if first <= number)
        lag.append(seen - at)
    print(f"\nfollower on another node: lag from the store's write {min(lag) * 1000:.0f}-{max(lag) * 1000:.0f} ms")
    # live: the first line reached the follower before the job ended (it talks for 6 s)
    assert got[0][1] < got[-1][1] - 3
    store.close()
