"""The scenarios: each runs narwhal and its baselines and returns plain data (seconds, bytes).

Narwhal is always driven over HTTP as a user would; the baselines are the raw commands
narwhal wraps: ``git archive | docker run --rm -i IMAGE sh -c 'tar -x && STEP'`` locally
(a), through a fresh ``ssh`` per job (b), and over an SSH connection held open (c).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import math
import queue
import random
import string
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.env import BENCH_LABEL, FINAL, BenchDispatcher, Environment, archive, git
from bench.measure import median, ratio, summary
from narwhal.dispatch.store import Store
from narwhal.execution.docker import volume_name
from testbed import TEST_IMAGE, SshHost

STEP = "true"
BASELINE_SCRIPT = f"mkdir -p /workspace && cd /workspace && tar -x && {STEP}"
LINE = "narwhal-bench-log-line-" + "0123456789abcdef" * 4 + "xxxxxxxxxxxx"  # 99 chars + newline = 100 B
assert len(LINE) == 99


def baseline_argv(env: Environment, name: str) -> list[str]:
    """The physical floor: one container unpacks the archive from stdin and runs the step."""
    return ["docker", "run", "--rm", "-i", "--network", "none", "--name", name,
            "--label", f"{BENCH_LABEL}={env.run_id}", TEST_IMAGE, "sh", "-c", BASELINE_SCRIPT]


def _piped(repo: str, commit: str, argv: list[str]) -> None:
    """``git archive COMMIT | ARGV`` without a shell; raises when either side fails."""
    producer = subprocess.Popen(["git", "-C", repo, "archive", "--format=tar", commit], stdout=subprocess.PIPE)
    try:
        done = subprocess.run(argv, stdin=producer.stdout, capture_output=True, check=False)
    finally:
        assert producer.stdout is not None
        producer.stdout.close()
        producer.wait()
    if producer.returncode or done.returncode:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr.decode(errors='replace')[-500:]}")


def run_local(env: Environment, repo: str, commit: str, name: str) -> tuple[float, float]:
    """(a) locally: the wall time (start, end) of the pipe."""
    t0 = time.time()
    _piped(repo, commit, baseline_argv(env, name))
    return t0, time.time()


def run_fresh_ssh(env: Environment, host: SshHost, repo: str, commit: str, name: str) -> tuple[float, float]:
    """(b) a shell-script CI: a new ``ssh runner docker run ...`` per job."""
    t0 = time.time()
    _piped(repo, commit, host.ssh_argv(baseline_argv(env, name)))
    return t0, time.time()


def run_held_ssh(env: Environment, host: SshHost, repo: str, commit: str, name: str) -> tuple[float, float]:
    """(c) the same over an already open SSH connection (asyncssh)."""
    t0 = time.time()
    code = env.held.run(host, baseline_argv(env, name), input=archive(repo, commit))
    if code != 0:
        raise RuntimeError(f"held-ssh baseline exited {code}")
    return t0, time.time()


def run_narwhal(d: BenchDispatcher, repo: str, commit: str) -> tuple[int, float, float]:
    """POST the commit, follow the log until the job's end event: (job id, start, end)."""
    t0 = time.time()
    job_id = d.submit(repo, commit)
    end = d.follow_to_end(job_id)
    t1 = time.time()
    if end.get("status") != "passed":
        raise RuntimeError(f"job {job_id} ended {end}; log:\n{d.log_tail()}")
    return job_id, t0, t1


def rtt(env: Environment, host: SshHost, n: int) -> list[float]:
    """One SSH round trip: ``true`` over the held connection."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        env.held.run(host, ["true"])
        out.append(time.perf_counter() - t0)
    return out


def _phases(events: list[tuple[int, str, str, str]], marks: list[tuple[str, str, str]],
            t0: float, t1: float) -> dict[str, float]:
    """Seconds between consecutive marks (label, name, action), from POST (t0) to the client's end (t1)."""
    seen: dict[tuple[str, str], float] = {}
    for t, _, action, name in events:  # first occurrence: `docker run -v` re-announces a volume's create
        seen.setdefault((name, action), t / 1e9)
    out, last, last_label = {}, t0, "submit"
    for label, name, action in marks:
        t = seen.get((name, action))
        if t is None:
            continue
        out[f"{last_label} -> {label}"] = t - last
        last, last_label = t, label
    out[f"{last_label} -> client sees end"] = t1 - last
    return out


def _median_phases(samples: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in samples[0]] if samples else []
    return {k: median([s[k] for s in samples if k in s]) for k in keys}


# --- job overhead and pickup ---------------------------------------------------------


def overhead(env: Environment, d: BenchDispatcher, repo: str, commits: list[str], repeats: int,
             log: Callable[[str], None]) -> dict:
    """Narwhal job vs (a), (b), (c), interleaved; pickup from Docker's start events of the same jobs."""
    host = env.hosts[0]
    kinds = ["narwhal", "local", "fresh_ssh", "held_ssh"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    starts: dict[str, list[float]] = {k: [] for k in kinds}  # submit/issue -> container start
    checkout_pickup: list[float] = []
    phases: dict[str, list[dict]] = {"narwhal": [], "held_ssh": []}
    rtts: list[float] = []
    # warm-up: mirror clone, page cache, connections; not counted
    run_narwhal(d, repo, commits[0])
    run_local(env, repo, commits[0], f"bench-{env.run_id}-warm-a")
    run_fresh_ssh(env, host, repo, commits[0], f"bench-{env.run_id}-warm-b")
    run_held_ssh(env, host, repo, commits[0], f"bench-{env.run_id}-warm-c")
    for i in range(repeats):
        commit = commits[1 + i]
        order = kinds[i % 4:] + kinds[:i % 4]  # rotate so no kind always runs first (ABAB...)
        for kind in order:
            name = f"bench-{env.run_id}-{kind}-{i}"
            if kind == "narwhal":
                job_id, t0, t1 = run_narwhal(d, repo, commit)
                src, step, vol = d.container(job_id, "src"), d.container(job_id, 0), volume_name(d.owner, job_id, 1)
                step_start = env.events.wait(step) / 1e9
                starts[kind].append(step_start - t0)
                # the checkout's own container, when narwhal runs one before the first step
                src_start = next((t / 1e9 for t, _, a, _ in env.events.of({src}) if a == "start"), step_start)
                checkout_pickup.append(src_start - t0)
                env.events.wait(vol, "destroy")
                marks = [("volume create", vol, "create"), ("checkout create", src, "create"),
                         ("checkout start", src, "start"), ("checkout exit", src, "die"),
                         ("step create", step, "create"), ("step start", step, "start"),
                         ("step exit", step, "die"), ("step removed", step, "destroy"),
                         ("volume removed", vol, "destroy")]
                phases[kind].append(_phases(env.events.of({src, step, vol}), marks, t0, t1))
            else:
                runner = {"local": run_local, "fresh_ssh": run_fresh_ssh, "held_ssh": run_held_ssh}[kind]
                args = (env, repo, commit, name) if kind == "local" else (env, host, repo, commit, name)
                t0, t1 = runner(*args)
                starts[kind].append(env.events.wait(name) / 1e9 - t0)
                if kind == "held_ssh":
                    env.events.wait(name, "destroy")
                    marks = [("create", name, "create"), ("start", name, "start"), ("exit", name, "die"),
                             ("removed", name, "destroy")]
                    phases[kind].append(_phases(env.events.of({name}), marks, t0, t1))
            times[kind].append(t1 - t0)
        rtts += rtt(env, host, 5)
        log(f"  round {i + 1}/{repeats}: " + ", ".join(f"{k} {times[k][-1] * 1000:.0f} ms" for k in kinds))
    n = median(times["narwhal"])
    return {
        "job_seconds": {k: summary(v) for k, v in times.items()},
        "ratios": {f"narwhal/{k}": ratio(n, median(v)) for k, v in times.items() if k != "narwhal"},
        "container_start_seconds": {k: summary(v) for k, v in starts.items()},
        "checkout_start_seconds": summary(checkout_pickup),
        "ssh_rtt_seconds": summary(rtts),
        "phases_median_seconds": {k: _median_phases(v) for k, v in phases.items()},
    }


def pickup(over: dict) -> dict:
    """Pickup latency from the overhead jobs: POST -> the step's container started (Docker's clock)."""
    step = over["container_start_seconds"]["narwhal"]
    rtt_median = over["ssh_rtt_seconds"]["median"]
    floor = over["container_start_seconds"]["held_ssh"]["median"]
    return {
        "step_container_start_seconds": step,
        "checkout_container_start_seconds": over["checkout_start_seconds"],
        "ssh_rtt_seconds": over["ssh_rtt_seconds"],
        "held_ssh_docker_run_to_start_seconds": over["container_start_seconds"]["held_ssh"],
        "above_rtt_seconds": step["median"] - rtt_median if step["median"] is not None else None,
        "above_floor_seconds": step["median"] - floor if floor is not None and step["median"] is not None else None,
        "checkout_above_floor_seconds": (over["checkout_start_seconds"]["median"] - floor
                                         if floor is not None and over["checkout_start_seconds"]["median"]
                                         is not None else None),
    }


# --- throughput ------------------------------------------------------------------------


def _wait_final(d: BenchDispatcher, repo: str, ids: set[int], timeout: float = 1800) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [j for j in d.get(f"/jobs?limit=1000&repo={repo}")["jobs"] if j["id"] in ids]
        if len(jobs) == len(ids) and all(j["status"] in FINAL for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise RuntimeError(f"throughput jobs not finished after {timeout:g}s")
        time.sleep(0.2)


def throughput(env: Environment, d: BenchDispatcher, repo: str, commits: list[str], one_job: float,
               slots: int, log: Callable[[str], None]) -> dict:
    """N trivial jobs at once on every runner slot; makespan vs ceil(N/slots) x one job,
    and vs the same work done with held SSH connections at the same concurrency."""
    n = len(commits)
    t0 = time.time()
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda c: d.submit(repo, c), commits))
    posted = time.time() - t0
    jobs = _wait_final(d, repo, ids)
    makespan = max(j["finished_at"] for j in jobs) - t0
    statuses = sorted({j["status"] for j in jobs})
    per_runner: dict[str, int] = {}
    for j in jobs:
        per_runner[j["runner"]] = per_runner.get(j["runner"], 0) + 1
    log(f"  narwhal: {n} jobs in {makespan:.2f} s ({statuses}, {per_runner})")

    # the same N jobs by hand: one worker per slot, each over its host's held connection
    work: queue.Queue[str] = queue.Queue()
    for c in commits:
        work.put(c)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        host = env.hosts[k % len(env.hosts)]
        while True:
            try:
                c = work.get_nowait()
            except queue.Empty:
                return
            try:
                run_held_ssh(env, host, repo, c, f"bench-{env.run_id}-tp-{c[:12]}")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    b0 = time.time()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(slots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    baseline = time.time() - b0
    if errors:
        raise RuntimeError(f"held-ssh throughput baseline failed: {errors[0]}")
    log(f"  held ssh x{slots}: {n} jobs in {baseline:.2f} s")
    ideal = math.ceil(n / slots) * one_job
    return {"jobs": n, "slots": slots, "makespan_seconds": makespan, "submit_seconds": posted,
            "statuses": statuses, "per_runner": per_runner, "one_job_seconds": one_job,
            "ideal_seconds": ideal, "ratio_to_ideal": makespan / ideal,
            "held_ssh_makespan_seconds": baseline, "ratio_to_held_ssh": makespan / baseline}


# --- API -------------------------------------------------------------------------------


def prefill(db_path: Path, n: int, seed: int = 42) -> float:
    """N finished jobs over 50 repositories and 3 runners, in one bulk transaction; seconds taken."""
    t0 = time.perf_counter()
    store = Store(str(db_path))
    try:
        prefill_store(store, n, seed)
    finally:
        store.close()
    return time.perf_counter() - t0


def prefill_store(store: Store, n: int, seed: int = 42) -> None:
    """``prefill`` into an open store (either backend)."""
    rng = random.Random(seed)
    base = time.time() - n * 0.5 - 3600
    statuses = ["passed"] * 80 + ["failed"] * 12 + ["error"] * 3 + ["cancelled"] * 5

    def rows():
        for i in range(n):
            created = base + i * 0.5
            started = created + rng.uniform(0.05, 30)
            status = statuses[i % 100]
            yield {"pipeline": "ci", "repo": f"https://git.example.com/team/repo-{i % 50}.git",
                   "commit": f"{i:040x}", "branch": "main", "status": status,
                   "runner": f"runner-{i % 3 + 1}", "created_at": created, "queued_at": created,
                   "started_at": started, "finished_at": started + rng.uniform(2, 600)}

    store.bulk_insert_jobs(rows())


def _post_rate(d: BenchDispatcher, repo: str, commits: list[str], clients: int) -> dict:
    """POST /commit of distinct commits from CLIENTS threads, each on one keep-alive connection."""
    return _request_rate(d, "/commit", [(json.dumps({"repo": repo, "commit": c}).encode(),
                                         {"Content-Type": "application/json"}) for c in commits], clients)


def _request_rate(d: BenchDispatcher, path: str, requests: list[tuple[bytes, dict[str, str]]],
                  clients: int) -> dict:
    """POST each (body, headers) to PATH from CLIENTS threads, each on one keep-alive connection."""
    work: queue.Queue[tuple[bytes, dict[str, str]]] = queue.Queue()
    for item in requests:
        work.put(item)
    latencies: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
        mine, my_codes = [], {}
        try:
            while True:
                try:
                    body, headers = work.get_nowait()
                except queue.Empty:
                    break
                t = time.perf_counter()
                conn.request("POST", path, body, headers)
                r = conn.getresponse()
                r.read()
                mine.append(time.perf_counter() - t)
                my_codes[r.status] = my_codes.get(r.status, 0) + 1
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)
                for k, v in my_codes.items():
                    codes[k] = codes.get(k, 0) + v

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"requests": len(requests), "clients": clients, "seconds": elapsed,
            "per_second": len(requests) / elapsed, "status_codes": codes, "latency_seconds": summary(latencies)}


def _get_latencies(d: BenchDispatcher, path: str, n: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    out = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"GET {path} -> {r.status}")
            out.append(time.perf_counter() - t)
    finally:
        conn.close()
    return summary(out)


def api(env: Environment, jobs: int, posts: int, clients: int, stats_requests: int, settings: dict,
        narwhal_src: str | None, log: Callable[[str], None], profiler: Callable[[int], Any] | None = None) -> dict:
    """POST /commit rate and GET /stats latency on a store pre-filled with JOBS jobs."""
    from bench.env import make_repo, pipeline

    repo = str(env.workdir / "repo-api")
    commits = make_repo(repo, posts + 1)
    d = env.dispatcher("api", {"api": pipeline(repo, STEP)}, settings, narwhal_src=narwhal_src, start=False)
    d.state_dir.mkdir(parents=True, exist_ok=True)
    fill = prefill(d.state_dir / "narwhal.db", jobs)
    log(f"  pre-filled {jobs} jobs in {fill:.1f} s")
    d.start()
    try:
        d.wait_runners_healthy()
        for r in d.get("/runner")["runners"]:  # the posted jobs stay queued: this measures the API alone
            d.post(f"/runner/{r['name']}/drain")
        d.submit(repo, commits[0])  # warm-up: the mirror clone
        stats_idle = _get_latencies(d, "/stats", stats_requests)
        log(f"  GET /stats: median {stats_idle['median'] * 1000:.1f} ms, p95 {stats_idle['p95'] * 1000:.1f} ms")
        spy = profiler(d.pid) if profiler else None
        try:
            post = _post_rate(d, repo, commits[1:], clients)
        finally:
            if spy:
                spy.stop()
        log(f"  POST /commit: {post['per_second']:.0f}/s ({post['status_codes']})")
        stats_after = _get_latencies(d, "/stats", stats_requests)
        health = _get_latencies(d, "/health", stats_requests)
        rss = d.vm_hwm_kib()
    finally:
        d.stop()
    return {"prefilled_jobs": jobs, "prefill_seconds": fill, "post_commit": post,
            "stats_seconds": stats_idle, "stats_after_posts_seconds": stats_after,
            "health_seconds": health, "dispatcher_peak_rss_kib": rss}


# --- webhooks --------------------------------------------------------------------------

HOOK_SECRET = "bench-webhook-secret-0123456789"


def signed_push(url: str, commit: str, delivery: str) -> tuple[bytes, dict[str, str]]:
    """A GitHub push delivery of COMMIT to main of URL, signed as GitHub signs it."""
    body = json.dumps({"ref": "refs/heads/main", "after": commit, "repository": {"clone_url": url},
                       "pusher": {"name": "bench"}, "head_commit": {"id": commit, "message": "bench"},
                       "commits": []}).encode()
    signature = hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return body, {"Content-Type": "application/json", "X-GitHub-Event": "push", "X-GitHub-Delivery": delivery,
                  "X-Hub-Signature-256": f"sha256={signature}"}


def hooks(env: Environment, deliveries: int, clients: int, settings: dict, narwhal_src: str | None,
          log: Callable[[str], None]) -> dict:
    """Signed push webhooks: delivery -> job committed (the answer comes after the commit),
    one at a time for latency, then CLIENTS at once for the rate; runners drained."""
    from bench.env import make_repo, pipeline
    from testbed import GitHttpServer

    work = str(env.workdir / "repo-hooks")
    commits = make_repo(work, 2 * deliveries + 1)
    with GitHttpServer(env.workdir / "served") as server:
        url = server.publish(work, "org/app.git")
        secret = env.workdir / "hook-secret"
        secret.write_text(HOOK_SECRET)
        secret.chmod(0o600)
        inventory = {"secrets": {"HOOK": {"file": str(secret)}},
                     "forges": [{"name": "gh", "kind": "github", "url": "http://127.0.0.1:9",  # a GitHub Enterprise here: it serves 127.0.0.1
                                 "webhook_secret": "HOOK"}]}
        d = env.dispatcher("hooks", {"hooks": pipeline(url, STEP)}, {**settings, "fetch_hosts": ["127.0.0.1:*"]},
                           narwhal_src=narwhal_src, inventory=inventory)
        try:
            d.wait_runners_healthy()
            for r in d.get("/runner")["runners"]:  # the jobs stay queued: this measures the hook path alone
                d.post(f"/runner/{r['name']}/drain")
            _request_rate(d, "/hooks/gh", [signed_push(url, commits[0], "warm-up")], 1)  # the mirror clone
            one = _request_rate(d, "/hooks/gh", [signed_push(url, c, f"one-{i}")
                                                 for i, c in enumerate(commits[1:deliveries + 1])], 1)
            many = _request_rate(d, "/hooks/gh", [signed_push(url, c, f"many-{i}")
                                                  for i, c in enumerate(commits[deliveries + 1:])], clients)
            queued = sum(1 for j in d.get("/jobs?limit=1000")["jobs"] if j["status"] == "queued")
        finally:
            d.stop()
    lat = one["latency_seconds"]
    log(f"  webhook -> job queued: p50 {lat['median'] * 1000:.1f} ms, p95 {lat['p95'] * 1000:.1f} ms; "
        f"{many['per_second']:.0f} webhooks/s from {clients} clients ({many['status_codes']})")
    return {"one_at_a_time": one, "concurrent": many, "jobs_queued": queued}


# --- logs ------------------------------------------------------------------------------


def log_command(lines: int) -> str:
    return f"yes {LINE} | head -n {lines}"


def _pipe_floor(env: Environment, lines: int, log_driver: str) -> tuple[int, float]:
    """(bytes, seconds) of `docker run IMAGE sh -c 'yes | head'` read from a local pipe."""
    f0 = time.perf_counter()
    proc = subprocess.Popen(["docker", "run", "--rm", "--network", "none", "--log-driver", log_driver,
                             "--label", f"{BENCH_LABEL}={env.run_id}", TEST_IMAGE, "sh", "-c", log_command(lines)],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    got = 0
    while chunk := proc.stdout.read(65536):
        got += len(chunk)
    proc.wait()
    return got, time.perf_counter() - f0


def logs(env: Environment, d: BenchDispatcher, repo: str, commit: str, lines: int,
         log: Callable[[str], None]) -> dict:
    """One step printing LINES x 100 bytes: rate into the store, to an SSE client, peak RSS."""
    size = lines * (len(LINE) + 1)
    # the floor: the same container writing to a local pipe we read as fast as we can, with
    # Docker's default json-file log driver and without it (attach still streams the output)
    floors = {driver: _pipe_floor(env, lines, driver) for driver in ("json-file", "none")}
    got, floor = floors["none"]

    reset = d.reset_peak_rss()
    rss_before = d.vm_rss_kib()
    seen = {"bytes": 0, "lines": 0, "first": None, "carry": b""}

    def on_chunk(chunk: bytes) -> None:
        if seen["first"] is None:
            seen["first"] = time.time()
        seen["bytes"] += len(chunk)
        both = seen["carry"] + chunk
        seen["lines"] += both.count(b"\ndata: ")
        seen["carry"] = both[-6:]

    t0 = time.time()
    job_id = d.submit(repo, commit)
    end = d.follow_to_end(job_id, on_chunk)
    t1 = time.time()
    job = d.get(f"/jobs/{job_id}")
    step = job["steps"][0]
    into_store = step["finished_at"] - step["started_at"]
    sse = t1 - (seen["first"] or t0)
    peak = d.vm_hwm_kib()
    log(f"  {size / 1e6:.0f} MB: store {size / into_store / 1e6:.1f} MB/s, SSE {size / sse / 1e6:.1f} MB/s, "
        f"peak RSS {peak / 1024:.0f} MiB ({end['status']})")
    return {"bytes": size, "lines": lines, "status": end["status"], "floor_bytes": got,
            "floor_seconds": floor, "floor_mb_per_s": got / floor / 1e6,
            "floor_json_file_mb_per_s": floors["json-file"][0] / floors["json-file"][1] / 1e6,
            "store_seconds": into_store, "store_mb_per_s": size / into_store / 1e6,
            "sse_seconds": sse, "sse_mb_per_s": size / sse / 1e6, "sse_wire_bytes": seen["bytes"],
            "sse_lines": seen["lines"], "end_to_end_seconds": t1 - t0,
            "rss_before_kib": rss_before, "peak_rss_kib": peak, "peak_reset": reset}


def secrets_inventory(workdir: Path, count: int = 20) -> dict:
    """``secrets:`` with COUNT random 40-character tokens in private files under WORKDIR."""
    rng = random.Random(20)
    alphabet = string.ascii_letters + string.digits
    declared = {}
    for i in range(count):
        path = workdir / f"secret-{i}"
        path.write_text("".join(rng.choice(alphabet) for _ in range(40)))
        path.chmod(0o600)
        declared[f"BENCH_SECRET_{i}"] = {"file": str(path)}
    return {"secrets": declared}


def masking(env: Environment, plain: BenchDispatcher, masked: BenchDispatcher, repo: str, commits: list[str],
            lines: int, log: Callable[[str], None]) -> dict:
    """The logs scenario on two dispatchers, one with 20 secrets (every line masked), interleaved."""
    runs: dict[str, list[float]] = {"plain": [], "masked": []}
    for i, commit in enumerate(commits):
        for name, d in (("plain", plain), ("masked", masked)) if i % 2 == 0 else (("masked", masked),
                                                                                   ("plain", plain)):
            job_id = d.submit(repo, commit)
            d.follow_to_end(job_id)
            step = d.get(f"/jobs/{job_id}")["steps"][0]
            runs[name].append(lines * (len(LINE) + 1) / (step["finished_at"] - step["started_at"]) / 1e6)
    plain_rate, masked_rate = median(runs["plain"]), median(runs["masked"])
    cost = (plain_rate / masked_rate - 1) * 100
    log(f"  into the store: {plain_rate:.1f} MB/s plain, {masked_rate:.1f} MB/s with 20 secrets ({cost:+.1f}%)")
    return {"runs": runs, "plain_mb_per_s": plain_rate, "masked_mb_per_s": masked_rate, "cost_pct": cost,
            "secrets": 20}


__all__ = ["overhead", "pickup", "throughput", "api", "hooks", "logs", "masking", "secrets_inventory", "prefill", "git"]
