"""The dispatcher end to end: real `narwhal serve` process, real sshd runner hosts, real dockerd."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import pytest
import requests

from tests.e2e.conftest import json_end, simple_pipeline, sse_events

pytestmark = pytest.mark.slow


def _containers(docker_engine, d, job_id: int | None = None, all_: bool = True) -> list[dict]:
    """Containers this dispatcher made (low-level list: no inspect that can race a removal)."""
    owner = d.get("/health").json()["owner"]
    filters = {"label": [f"narwhal.owner={owner}"] + ([f"narwhal.job={job_id}"] if job_id else [])}
    return docker_engine.api.containers(all=all_, filters=filters)


def test_submit_over_http_runs_on_ssh_runner(dispatcher, ssh_host, git_repo, docker_engine):
    steps = [
        {"name": "build", "run": "for i in 1 2 3 4 5; do echo line $i; done; echo built > out.txt"},
        {"name": "test", "run": "cat out.txt; echo branch=$NARWHAL_BRANCH"},
    ]
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(steps)})
    jobs = d.submit(git_repo.path, git_repo.commit, branch="main")
    assert [j["pipeline"] for j in jobs] == ["ci"]
    job = d.wait_job(jobs[0]["id"])
    assert job["status"] == "passed", (job, d.get(f"/jobs/{job['id']}/log").text, d.log())
    assert job["runner"] == ssh_host.name
    assert (job["event"], job["author"], job["subject"]) == ("api", "Narwhal Test", "initial commit")  # the mirror
    assert [s["name"] for s in job["steps"]] == ["build", "test"]
    assert all(s["status"] == "passed" for s in job["steps"])

    text = d.get(f"/jobs/{job['id']}/log").text
    assert text.index("line 1") < text.index("line 5") < text.index("built") < text.index("branch=main")

    # SSE: every line, in order, numbered; then an end event with the status.
    with requests.get(d.url + f"/jobs/{job['id']}/log", headers={"Accept": "text/event-stream"},
                      stream=True, timeout=30) as r:
        events = list(sse_events(r))
    lines = [e for e in events if "id" in e]  # step lines, and narwhal's as `event: narwhal`
    assert [int(e["id"]) for e in lines] == list(range(1, len(lines) + 1))
    assert {e.get("event") for e in lines} == {None, "narwhal"}
    assert [("[narwhal] " if e.get("event") == "narwhal" else "") + e["data"] for e in lines] == text.splitlines()
    assert events[-1]["event"] == "end" and json_end(events[-1])["status"] == "passed"

    # Resume from Last-Event-ID: only the lines after it.
    with requests.get(d.url + f"/jobs/{job['id']}/log", headers={"Accept": "text/event-stream",
                                                                "Last-Event-ID": "3"},
                      stream=True, timeout=30) as r:
        resumed = [e for e in sse_events(r) if "id" in e]
    assert [int(e["id"]) for e in resumed] == list(range(4, len(lines) + 1))

    stats = d.get("/stats").json()
    repo = next(r for r in stats["repos"] if r["repo"] == git_repo.path)
    assert repo["passed"] == 1 and repo["total"] == 1 and repo["pct_passed"] == 100.0
    runner = next(r for r in stats["runners"] if r["name"] == ssh_host.name)
    assert runner["jobs"] == 1 and runner["passed"] == 1
    assert _containers(docker_engine, d, job["id"]) == []


def test_sse_follows_a_running_job_live(dispatcher, ssh_host, git_repo):
    steps = [{"name": "slow", "run": "for i in 1 2 3 4 5 6; do echo tick $i; sleep 0.3; done"}]
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(steps)})
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    seen: list[tuple[float, str]] = []
    with requests.get(d.url + f"/jobs/{job_id}/log?follow=1", stream=True, timeout=60) as r:
        for e in sse_events(r):
            seen.append((time.monotonic(), e.get("event") or e["data"]))
    ticks = [t for t, text in seen if text.startswith("tick")]
    assert len(ticks) == 6
    # Lines arrived while the job ran, not all at the end.
    assert ticks[-1] - ticks[0] > 0.5
    assert seen[-1][1] == "end"


def test_capacity_is_respected_across_three_runners(dispatcher, ssh_hosts, git_repo, docker_engine):
    hosts = ssh_hosts(3)
    d = dispatcher([h.runner_config(capacity=2) for h in hosts],
                   {"ci": simple_pipeline([{"name": "work", "run": "sleep 1.5"}])})
    commits = [git_repo.commit] + [git_repo.add_commit({f"f{i}.txt": str(i)}) for i in range(11)]
    ids = [d.submit(git_repo.path, c)[0]["id"] for c in commits]
    assert len(set(ids)) == 12

    runner_of: dict[int, str] = {}
    peak: Counter = Counter()
    done = False
    deadline = time.monotonic() + 180
    while not done and time.monotonic() < deadline:
        per_runner: Counter = Counter()
        running = _containers(docker_engine, d, all_=False)
        for c in running:
            job_id = int(c["Labels"].get("narwhal.job", 0))
            if job_id not in ids:
                continue  # another test session's container on the shared engine
            if job_id not in runner_of:
                runner_of[job_id] = d.get(f"/jobs/{job_id}").json()["runner"]
            per_runner[runner_of[job_id]] += 1
        for name, n in per_runner.items():
            peak[name] = max(peak[name], n)
        jobs = d.get("/jobs?limit=100").json()["jobs"]
        done = all(j["status"] in ("passed", "failed", "error", "cancelled") for j in jobs if j["id"] in ids)
        time.sleep(0.05)
    jobs = {j["id"]: j for j in d.get("/jobs?limit=100").json()["jobs"]}
    assert all(jobs[i]["status"] == "passed" for i in ids), [(i, jobs[i]["status"], jobs[i]["reason"]) for i in ids]
    assert peak and max(peak.values()) <= 2, peak
    assert set(j["runner"] for j in jobs.values()) == {h.name for h in hosts}


@pytest.mark.parametrize("fault", ["freeze", "kill"])
def test_runner_cut_off_mid_job_is_retried_elsewhere(fault, dispatcher, ssh_hosts, git_repo, docker_engine):
    """freeze: the host hangs (sshd and its children stopped; only keepalives notice).
    kill: sshd and its sessions die (the connection drops at once)."""
    a, b = ssh_hosts(2)
    d = dispatcher([a.runner_config(), b.runner_config()],
                   {"ci": simple_pipeline([{"name": "long", "run": "echo start; sleep 4; echo finished"}])})
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    job = d.wait_for(lambda: (j := d.get(f"/jobs/{job_id}").json())["status"] == "running"
                     and any(s["status"] == "running" for s in j["steps"]) and j, what="step running")
    first = {h.name: h for h in (a, b)}[job["runner"]]
    first.freeze() if fault == "freeze" else first.kill()
    try:
        final = d.wait_job(job_id, timeout=120)
        assert final["status"] == "passed", (final, d.log())
        assert final["attempt"] == 2
        assert final["runner"] != first.name
        runners = {r["name"]: r for r in d.get("/runner").json()["runners"]}
        assert runners[first.name]["health"]["state"] == "unhealthy"
        log = d.get(f"/jobs/{job_id}/log").text
        assert "attempt 1 lost" in log and "finished" in log
    finally:
        first.thaw() if fault == "freeze" else first.start()
    # The lost attempt's container is removed once a runner can reach the engine again.
    d.wait_for(lambda: not [c for c in _containers(docker_engine, d, job_id)
                            if c["Labels"].get("narwhal.attempt") == "1"],
               timeout=60, what="attempt 1 reaped")
    d.wait_for(lambda: {r["name"]: r for r in d.get("/runner").json()["runners"]}[first.name]
               ["health"]["state"] == "healthy", timeout=60, what="runner healthy again")


def test_kill_9_and_restart_loses_nothing(dispatcher, ssh_host, git_repo, docker_engine):
    d = dispatcher([ssh_host.runner_config(capacity=1)],
                   {"ci": simple_pipeline([{"name": "work", "run": "echo run; sleep 1"}])})
    commits = [git_repo.commit] + [git_repo.add_commit({f"k{i}.txt": str(i)}) for i in range(3)]
    ids = [d.submit(git_repo.path, c)[0]["id"] for c in commits]
    d.wait_for(lambda: d.get(f"/jobs/{ids[0]}").json()["status"] == "running", what="first job running")
    d.stop(signal.SIGKILL)
    d.start()
    finals = [d.wait_job(i, timeout=120) for i in ids]
    assert [f["status"] for f in finals] == ["passed"] * 4, finals
    # One result each: a single job row per commit, and the stats count each once.
    repo = next(r for r in d.get("/stats").json()["repos"] if r["repo"] == git_repo.path)
    assert repo["total"] == 4 and repo["passed"] == 4
    d.wait_for(lambda: not _containers(docker_engine, d), timeout=60, what="no leftover containers")


def test_cancel_running_job_removes_container(dispatcher, ssh_host, git_repo, docker_engine):
    d = dispatcher([ssh_host.runner_config()],
                   {"ci": simple_pipeline([{"name": "sleepy", "run": "sleep 300"}])})
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    d.wait_for(lambda: _containers(docker_engine, d, job_id, all_=False), what="container running")
    r = d.post(f"/jobs/{job_id}/cancel")
    assert r.status_code == 200
    assert d.post(f"/jobs/{job_id}/cancel").status_code == 200  # idempotent
    final = d.wait_job(job_id, timeout=60)
    assert final["status"] == "cancelled"
    assert _containers(docker_engine, d, job_id) == []


def test_idempotent_under_concurrent_identical_posts(dispatcher, ssh_host, git_repo):
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline()})
    results: list[requests.Response] = []
    lock = threading.Lock()

    errors: list[Exception] = []

    def post() -> None:
        try:
            r = requests.post(d.url + "/commit", json={"repo": git_repo.path, "commit": git_repo.commit},
                              timeout=60)
        except requests.RequestException as exc:
            errors.append(exc)
            return
        with lock:
            results.append(r)

    threads = [threading.Thread(target=post) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    codes = Counter(r.status_code for r in results)
    assert codes[202] == 1 and codes[200] == 49, codes
    assert len({r.json()["jobs"][0]["id"] for r in results}) == 1
    assert len(d.get(f"/jobs?repo={git_repo.path}").json()["jobs"]) == 1


def test_why_a_job_waits(dispatcher, ssh_host, git_repo):
    d = dispatcher([ssh_host.runner_config(capacity=1)],
                   {"ci": simple_pipeline([{"name": "hold", "run": "sleep 3"}])})
    first = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    second = d.submit(git_repo.path, git_repo.add_commit({"w.txt": "1"}))[0]["id"]
    d.wait_for(lambda: d.get(f"/jobs/{first}").json()["status"] == "running", what="first running")
    job = d.get(f"/jobs/{second}").json()
    assert job["status"] == "queued"
    assert job["waiting"] == [{"runner": ssh_host.name, "reason": "capacity full (1/1)"}]
    r = d.post(f"/runner/{ssh_host.name}/drain")
    assert r.status_code == 200 and r.json()["draining"] is True
    assert d.get(f"/jobs/{second}").json()["waiting"][0]["reason"] == "draining"
    d.post(f"/runner/{ssh_host.name}/resume")
    assert d.wait_job(second)["status"] == "passed"


def test_runner_registered_over_the_api_takes_jobs_and_persists(dispatcher, ssh_host, git_repo):
    # An API runner cannot name files unless the admin allows a directory: the host's
    # key and known_hosts live in its workdir, which the admin allows here.
    d = dispatcher([{"name": "local", "transport": "local", "labels": ["linux"]}],
                   {"ci": simple_pipeline(labels=["linux"]), "remote": simple_pipeline(labels=["remote"])},
                   settings={"runner_files_dir": ssh_host.workdir, "api_runner_labels": ["remote"]})
    # Nothing carries "remote" yet: refused at submit time, saying which labels.
    r = d.post("/commit", {"repo": git_repo.path, "commit": git_repo.commit})
    assert r.status_code == 422 and "remote" in r.json()["error"]

    r = d.post("/runner", ssh_host.runner_config(labels=["remote"]))
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "api"
    assert d.post("/runner", ssh_host.runner_config(labels=["remote"])).status_code == 409
    jobs = {j["pipeline"]: j for j in d.submit(git_repo.path, git_repo.commit)}
    assert d.wait_job(jobs["remote"]["id"])["runner"] == ssh_host.name
    assert d.wait_job(jobs["ci"]["id"])["runner"] == "local"

    # Kept in the store: still there after a restart.
    d.stop()
    d.start()
    names = {r["name"]: r for r in d.get("/runner").json()["runners"]}
    assert names[ssh_host.name]["source"] == "api"
    r = requests.delete(d.url + f"/runner/{ssh_host.name}", timeout=10)
    assert r.status_code == 200
    assert ssh_host.name not in {r["name"] for r in d.get("/runner").json()["runners"]}


def test_reload_keeps_running_jobs_and_refuses_a_bad_config(dispatcher, ssh_host, git_repo):
    from tests.e2e.conftest import write_config

    runner = ssh_host.runner_config()
    d = dispatcher([runner], {"ci": simple_pipeline([{"name": "s", "run": "sleep 2; echo done"}])})
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    d.wait_for(lambda: d.get(f"/jobs/{job_id}").json()["status"] == "running", what="running")

    # A new pipeline over SIGHUP, while the job runs.
    write_config(d.config_dir, [runner], {"ci": simple_pipeline([{"name": "s", "run": "sleep 2; echo done"}]),
                                          "extra": simple_pipeline()})
    d.send_signal(signal.SIGHUP)
    commit = git_repo.add_commit({"r.txt": "1"})
    d.wait_for(lambda: len(d.post("/commit", {"repo": git_repo.path, "commit": commit}).json().get("jobs", []))
               == 2, what="reloaded pipelines")
    assert d.wait_job(job_id)["status"] == "passed"

    # A broken inventory is refused with the problem; the old config stays.
    (d.config_dir / "inventory.yaml").write_text("runners:\n  - name: x\n    port: ssh\n")
    r = d.post("/reload")
    assert r.status_code == 422
    assert any("port" in p["path"] for p in r.json()["problems"])
    assert [x["name"] for x in d.get("/runner").json()["runners"]] == [ssh_host.name]


def test_sigterm_lets_the_running_step_finish(dispatcher, ssh_host, git_repo):
    d = dispatcher([ssh_host.runner_config()],
                   {"ci": simple_pipeline([{"name": "s", "run": "sleep 1; echo finished"}])},
                   settings={"stop_grace": 30})
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    d.wait_for(lambda: d.get(f"/jobs/{job_id}").json()["status"] == "running", what="running")
    assert d.stop(signal.SIGTERM) == 0
    d.start()
    job = d.get(f"/jobs/{job_id}").json()
    assert (job["status"], job["attempt"]) == ("passed", 1)


def test_commits_are_listed(dispatcher, ssh_host, git_repo):
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline()})
    job_id = d.submit(git_repo.path, git_repo.commit, branch="main")[0]["id"]
    d.wait_job(job_id)
    commits = d.get(f"/commit?repo={git_repo.path}&limit=5").json()["commits"]
    assert commits[0]["commit"] == git_repo.commit and commits[0]["branch"] == "main"
    assert commits[0]["jobs"] == [{"id": job_id, "pipeline": "ci", "status": "passed"}]


def test_a_public_address_needs_a_token(tmp_path):
    import subprocess
    import sys

    from tests.e2e.conftest import write_config

    write_config(tmp_path, [{"name": "local", "transport": "local"}], {"ci": simple_pipeline()})
    env = {k: v for k, v in __import__("os").environ.items() if k != "NARWHAL_TOKEN"}
    p = subprocess.run([sys.executable, "-m", "narwhal", "serve", "--config", str(tmp_path),
                        "--listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2
    assert "token" in p.stderr and "Traceback" not in p.stderr


def test_runner_whose_network_link_is_cut_mid_job(dispatcher, netns_ssh_host, ssh_host, git_repo, docker_engine):
    """A real partition: the runner's cable goes down while sshd and the step keep running."""
    cut_host, link = netns_ssh_host
    d = dispatcher([cut_host.runner_config()],
                   {"ci": simple_pipeline([{"name": "long", "run": "echo start; sleep 4; echo finished"}])},
                   settings={"runner_files_dir": ssh_host.workdir})  # its key and known_hosts are there
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    d.wait_for(lambda: any(s["status"] == "running" for s in d.get(f"/jobs/{job_id}").json()["steps"]),
               what="step running on the namespaced runner")
    assert d.post("/runner", ssh_host.runner_config()).status_code == 201  # somewhere to go
    link.cut()
    try:
        final = d.wait_job(job_id, timeout=120)
        assert (final["status"], final["attempt"], final["runner"]) == ("passed", 2, ssh_host.name), final
        runners = {r["name"]: r for r in d.get("/runner").json()["runners"]}
        assert runners[cut_host.name]["health"]["state"] == "unhealthy"
    finally:
        link.restore()
    d.wait_for(lambda: {r["name"]: r for r in d.get("/runner").json()["runners"]}[cut_host.name]
               ["health"]["state"] == "healthy", timeout=60, what="runner healthy after the link is back")
    owner = d.get("/health").json()["owner"]
    label = {"label": [f"narwhal.owner={owner}", f"narwhal.job={job_id}", "narwhal.attempt=1"]}
    d.wait_for(lambda: not docker_engine.api.containers(all=True, filters=label)
               and not docker_engine.api.volumes(filters=label).get("Volumes"),
               timeout=60, what="attempt 1's container and volume reaped")


def test_the_runner_chooses_the_step_network(dispatcher, git_repo):
    """`network` is the runner admin's choice (default none); a pipeline cannot ask for one."""
    steps = [{"name": "net", "run": "echo interfaces: $(ls /sys/class/net | tr '\\n' ' ')"}]
    d = dispatcher([{"name": "sealed", "transport": "local", "labels": ["sealed"]},
                    {"name": "open", "transport": "local", "labels": ["open"], "network": "host"}],
                   {"sealed": simple_pipeline(steps, labels=["sealed"]),
                    "open": simple_pipeline(steps, labels=["open"])})
    jobs = {j["pipeline"]: j["id"] for j in d.submit(git_repo.path, git_repo.commit)}
    interfaces = {}
    for name, job_id in jobs.items():
        assert d.wait_job(job_id)["status"] == "passed"
        line = next(x for x in d.get(f"/jobs/{job_id}/log").text.splitlines() if x.startswith("interfaces:"))
        interfaces[name] = set(line.split()[1:])
    assert interfaces["sealed"] == {"lo"}
    assert interfaces["open"] - {"lo"}, interfaces  # the host's own interfaces are there
