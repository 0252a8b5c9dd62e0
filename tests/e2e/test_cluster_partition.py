"""A cluster node cut off by a real network partition, and back: it writes nothing into the jobs
another node took over meanwhile, and rejoins.

One ``narwhal serve`` runs in a network namespace (``NetnsLink``) and reaches PostgreSQL and
the runners' sshd only through its veth cable; two more run on this machine's own network. The
namespaced node claims jobs whose first attempt sleeps, its cable is cut, the others take its
attempts over once its leases ran out and finish them, then the cable comes back. Witnesses:
the database's own rows (read with psycopg, not through narwhal) before and after its return,
and Docker's event stream (which attempt's containers started, and when).
"""

from __future__ import annotations

import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from narwhal.api.server import free_port
from narwhal.dispatch.store import Store
from tests.conftest import need_module
from tests.e2e.conftest import simple_pipeline
from tests.e2e.witness import DockerWitness

pytestmark = pytest.mark.slow

JOBS = 3
TOKEN = "partition-test-token"  # the namespaced node listens off loopback, which needs one
LEASE_BOUND = 15 + 5 + 1  # nodes.LEASE + the takeover interval (nodes.INTERVAL) + scheduler.CLUSTER_POLL
# Attempt 1 of a commit holding SLOW sleeps past the whole test; attempt 2 (and any other commit) is quick.
SLOW = "slow.txt"
STEPS = [
    {"name": "work", "run": f'echo "attempt $NARWHAL_ATTEMPT begins"; '
                            f'if [ -f {SLOW} ] && [ "$NARWHAL_ATTEMPT" = 1 ]; then sleep 300; fi; '
                            'echo "attempt $NARWHAL_ATTEMPT done"'},
    {"name": "after", "run": 'echo "after, attempt $NARWHAL_ATTEMPT"'},
]
# What a job is in the database: every row that names it, as the database holds it.
SNAPSHOT = {
    "jobs": "SELECT id, status, attempt, runner, reason, started_at, finished_at, node, lease_until, "
            "cancel_requested FROM jobs WHERE id = ANY(%s) ORDER BY id",
    "steps": "SELECT job_id, attempt, idx, name, status, exit_code, started_at, finished_at, reason FROM steps "
             "WHERE job_id = ANY(%s) ORDER BY job_id, attempt, idx",
    "log": "SELECT job_id, attempt, first_line, n_lines, kind, at, data FROM log WHERE job_id = ANY(%s) "
           "ORDER BY job_id, first_line",
    "events": "SELECT id, at, kind, data FROM events WHERE job_id = ANY(%s) ORDER BY id",
    "step_lines": "SELECT job_id, attempt, idx, first_line, last_line FROM step_lines WHERE job_id = ANY(%s) "
                  "ORDER BY job_id, attempt, idx",
    "artifacts": "SELECT job_id, path, attempt, sha256 FROM artifacts WHERE job_id = ANY(%s) ORDER BY job_id, path",
}
TOTALS = {  # the aggregates a status change moves
    "repo_stats": "SELECT repo, status, count FROM repo_stats ORDER BY repo, status",
    "runner_stats": "SELECT runner, jobs, passed, failed, busy_seconds FROM runner_stats ORDER BY runner",
}


@pytest.fixture
def partition(dispatcher, ssh_hosts, postgres, docker_engine, netns_link):
    """Runner hosts and the database reachable from the namespace too; a fresh database."""
    psycopg = need_module("psycopg")
    link = netns_link
    cluster = postgres.cluster
    cluster.listen_also(link.gateway, link.network)
    hosts = ssh_hosts(2)
    for host in hosts:
        host.listen_also(link.gateway, free_port(link.gateway))
    database = cluster.create_database(postgres.template)
    url = cluster.url(database)
    conn = psycopg.connect(url, password=cluster.password, autocommit=True)
    try:
        yield link, hosts, cluster, database, conn
    finally:
        link.restore()
        conn.close()
        cluster.drop_database(database)
        cluster.stop_listening(link.gateway, link.network)


def _logged_between(path: Path, text: str, start: float, end: float) -> list[str]:
    """The dispatcher's log lines holding ``text`` written between two epoch times."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if text in line and start <= at <= end:
            found.append(line)
    return found


def _snapshot(conn, ids: list[int], queries: dict[str, str]) -> dict[str, list[tuple]]:
    return {name: [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                   for row in conn.execute(sql, (ids,) if "%s" in sql else ()).fetchall()]
            for name, sql in queries.items()}


def test_a_node_cut_off_and_back_writes_nothing_into_jobs_taken_over(partition, dispatcher, git_repo,
                                                                       docker_engine):
    link, hosts, cluster, database, conn = partition
    began = time.monotonic()
    env = {"NARWHAL_TEST_PGPASS": cluster.password}
    inventory = {"secrets": {"PGPASS": {"env": "NARWHAL_TEST_PGPASS"}}}
    pipelines = {"ci": simple_pipeline(STEPS)}

    def settings(host: str) -> dict:
        return {"store": cluster.url(database, host=host), "store_password": "PGPASS", "cluster": True}

    # The same runners under the same names; the namespaced node reaches each at the gateway.
    inside = dispatcher([h.runner_config(capacity=2, host=h.also[0][0], port=h.also[0][1]) for h in hosts],
                        pipelines, settings=settings(link.gateway), inventory=inventory, env=env, token=TOKEN,
                        prefix=link.exec_prefix, host=link.address)
    inside_id = inside.get("/health").json()["node"]["id"]
    owner = inside.get("/health").json()["owner"]
    witness = DockerWitness(docker_engine, owner)
    store = Store(cluster.url(database), password=cluster.password)
    outside: list = []
    try:
        commits = [git_repo.add_commit({SLOW: str(i)}, f"slow {i}") for i in range(JOBS)]
        ids = [inside.submit(git_repo.path, c, branch="main")[0]["id"] for c in commits]

        def all_working() -> bool:
            steps = [store.get_job(i).steps for i in ids]
            return (all(s and s[0].status == "running" for s in steps)
                    and all(store.lease_of(i)[0] == inside_id for i in ids)
                    and set(witness.attempts()) >= set(ids))

        inside.wait_for(all_working, timeout=60, what="every job's first step running on the namespaced node")
        outside = [dispatcher([h.runner_config(capacity=2) for h in hosts], pipelines, settings=settings("127.0.0.1"),
                              inventory=inventory, env=env) for _ in range(2)]
        assert {d.get("/health").json()["owner"] for d in outside} == {owner}

        link.cut()
        cut_at, cut = time.time(), time.monotonic()
        retaken: dict[int, float] = {}
        while len(retaken) < JOBS and time.monotonic() - cut < LEASE_BOUND + 30:
            for job_id in ids:
                if job_id not in retaken and store.lease_of(job_id)[1] == 2:
                    retaken[job_id] = time.monotonic() - cut
            time.sleep(0.2)
        for job_id in ids:
            done = outside[0].wait_job(job_id, timeout=60)
            assert (done["status"], done["attempt"]) == ("passed", 2), (done, outside[0].get(f"/jobs/{job_id}/log").text)
        finished = time.monotonic() - cut
        time.sleep(1)  # the last containers' events
        before = _snapshot(conn, ids, SNAPSHOT)
        totals = _snapshot(conn, ids, TOTALS)
        seen = dict(witness.starts)

        link.restore()
        restored, restored_at = time.monotonic(), time.time()
        # it rejoins: the others see it beat again, it holds the database, reaches its runners,
        # and its local copies of the lost attempts are gone
        outside[0].wait_for(lambda: any(n["id"] == inside_id and n["alive"]
                                        for n in outside[0].get("/nodes").json()["nodes"]),
                            timeout=90, what="the cut-off node alive again")
        rejoined = time.monotonic() - restored

        def settled() -> bool:
            health = inside.get("/health", timeout=5).json()
            runners = inside.get("/runner", timeout=5).json()["runners"]
            return (health["node"]["holds_database"]
                    and all(r["health"]["state"] == "healthy" and not r["jobs"] for r in runners))

        inside.wait_for(settled, timeout=90, what="the cut-off node holding the database, runners healthy, "
                                                  "its lost attempts dropped")
        recovered = time.monotonic() - restored
        time.sleep(2)  # what a late write would need to land (beats, flushes, retries run every second or so)
        after = _snapshot(conn, ids, SNAPSHOT)
        totals_after = _snapshot(conn, ids, TOTALS)
        late_starts = {cid: s for cid, s in witness.starts.items() if cid not in seen}

        # a fresh job, on the node that was cut off alone
        for node in outside:
            node.stop(signal.SIGTERM, timeout=30)
        fresh_commit = git_repo.add_commit({SLOW: None}, "fast")
        [fresh] = inside.submit(git_repo.path, fresh_commit, branch="main")
        done = inside.wait_job(fresh["id"], timeout=60)
        assert (done["status"], done["attempt"]) == ("passed", 1), (done, inside.get(f"/jobs/{fresh['id']}/log").text)
        assert store.lease_of(fresh["id"])[0] == inside_id
        took = time.monotonic() - began
    finally:
        link.restore()
        for node in [inside, *outside]:  # before the fixtures take the cable and the database away
            node.stop(signal.SIGTERM, timeout=30)
        witness.close()
        store.close()

    print(f"\npartition of a node running {JOBS} jobs: re-queued {min(retaken.values()):.1f}-"
          f"{max(retaken.values()):.1f}s after the cut (bound {LEASE_BOUND}s), finished elsewhere {finished:.1f}s "
          f"after it; cable back: alive again in {rejoined:.1f}s, settled in {recovered:.1f}s; test {took:.0f}s")
    assert len(retaken) == JOBS and max(retaken.values()) <= LEASE_BOUND
    # While cut off, its calls to the database ended (bounded), rather than waiting on the cable
    assert _logged_between(inside.log_path, "the store's hold is lost", cut_at, restored_at), inside.log()

    # The database after the node came back is the database before it: not a row of these jobs
    # (job, steps, log lines, events, step marks, artifacts) nor a total changed.
    assert after == before
    assert totals_after == totals
    # ... and what is there of attempt 2 is the new owners': rows written after the takeover,
    # the final state theirs (no status flip back, attempt numbers kept).
    jobs = {row[0]: row for row in after["jobs"]}
    for job_id in ids:
        _, status, attempt, runner, _, started_at, finished_at, node, lease_until, _ = jobs[job_id]
        assert (status, attempt, lease_until) == ("passed", 2, None)
        assert node not in (None, inside_id) and runner in {h.name for h in hosts}
        assert started_at > cut_at and finished_at > started_at
    for job_id, attempt, _, _, status, exit_code, started_at, finished_at, _ in after["steps"]:
        if attempt == 2:
            assert (status, exit_code) == ("passed", 0) and started_at > cut_at, (job_id, attempt, status)
        else:  # attempt 1's first step ran when the cable went; nothing ended it or ran the next one
            assert (status, finished_at) in (("running", None), ("pending", None)), (job_id, attempt, status)
    second = [(job_id, first, at, bytes(data).decode()) for job_id, attempt, first, _, _, at, data
              in after["log"] if attempt == 2]
    assert second and all(at > cut_at for _, _, at, _ in second), second
    for job_id in ids:
        text = [line for j, _, _, line in second if j == job_id]
        assert any("attempt 2 done" in line for line in text) and not any("attempt 1" in line for line in text), text
    first_after_cut = [(job_id, first, text) for job_id, attempt, first, _, kind, at, text in after["log"]
                       if attempt == 1 and at > cut_at]
    assert all(b"lost" in bytes(text) for _, _, text in first_after_cut), first_after_cut  # the takeover's note
    # Docker: attempt 1's containers all started before the cut (by the node cut off), attempt 2's
    # after it; none at all for these jobs once the cable was back.
    assert {i: witness.attempts()[i] for i in ids} == {i: {1, 2} for i in ids}
    starts = [(job, attempt, at) for job, attempt, at in seen.values() if job in ids]
    assert all(at < cut_at for _, attempt, at in starts if attempt == 1), starts
    assert all(at > cut_at for _, attempt, at in starts if attempt == 2), starts
    assert not [s for s in late_starts.values() if s[0] in ids], late_starts
