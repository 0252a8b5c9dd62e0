"""The fleet scenario: one dispatcher and many runner hosts, all on this machine.

N sshd runner hosts listen on 127.0.78.x (one sshd per host, each with its own host key
and known_hosts, like N machines; an idle sshd costs about 1 MiB of RSS and no CPU, so
200 of them fit a 2-core machine easily). They all share the one local dockerd. A real
``narwhal serve`` (a child process) has the first K of them in its inventory, and this
measures, side by side:

* **health polling**: the dispatcher's CPU time (utime + stime from /proc) over a window
  with every runner idle, polled every ``health_interval``; per runner per interval, and
  as a share of one core; with its RSS and open file descriptors at each size;
* **pickup** under load: K runners each running 2 ``sleep`` jobs (2K in all), then probe
  jobs submitted one at a time; submit -> the probe's step container started (Docker's
  own event clock), p50 / p95, at K = the fleet size against K = 3;
* **log throughput**: J chatty jobs at once (each a step printing M MiB of lines) through
  one dispatcher, against the same J containers' output read from local pipes
  (``docker run ... | wc -c``, started together): aggregate MB/s and the ratio.

Every host, dispatcher, container and volume started here is stopped again, also on Ctrl-C.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import testbed
from bench.env import BENCH_LABEL, FINAL, BenchDispatcher, Environment, make_repo, pipeline
from bench.measure import percentile, summary
from bench.scenarios import LINE, log_command
from testbed import TEST_IMAGE, SshHost

FLEET_PREFIX = "127.0.78."  # the fleet's loopback addresses (the bench's 3 hosts are on 127.0.77.x)
TICKS = os.sysconf("SC_CLK_TCK")


# --- the hosts ---------------------------------------------------------------------


def start_fleet(n: int, workdir: Path, log: Callable[[str], None]) -> list[SshHost]:
    """N sshd runner hosts on 127.0.78.1.., started 16 at a time; all or none."""
    if not 1 <= n <= 254:
        raise ValueError(f"a fleet of {n} hosts does not fit 127.0.78.1-254")
    port = 22 if testbed.port_free("127.0.0.1", 22) else 10022
    client_key = str(workdir / "client_ed25519")
    workdir.mkdir(parents=True, exist_ok=True)
    # the one client key, made before the hosts start side by side (each would make it if missing)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "narwhal-bench fleet", "-f", client_key],
                   check=True, capture_output=True)
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(testbed.start_ssh_host, f"fleet-{i + 1}", FLEET_PREFIX + str(i + 1),
                               str(workdir / f"fleet-{i + 1}"), client_key=client_key, port=port)
                   for i in range(n)]
        hosts, errors = [], []
        for f in futures:
            try:
                hosts.append(f.result())
            except Exception as exc:  # noqa: BLE001 - reported below, after the others are stopped
                errors.append(exc)
    if errors:
        stop_fleet(hosts)
        raise RuntimeError(f"{len(errors)} of {n} fleet hosts did not start: {errors[0]}")
    log(f"  {n} sshd hosts up in {time.monotonic() - t0:.1f} s")
    return hosts


def stop_fleet(hosts: list[SshHost]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda h: h.stop(), hosts))


# --- the dispatcher process, from outside ----------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (every thread), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def submit_all(d: BenchDispatcher, repo: str, commits: list[str]) -> list[int]:
    """Submit every commit, 4 at a time; a 503 (fetches per host at their limit) is tried again."""
    def one(commit: str) -> int:
        for _ in range(600):
            r = d.session.post(d.url + "/commit", json={"repo": repo, "commit": commit}, timeout=60)
            if r.status_code != 503:
                break
            time.sleep(0.1)
        if r.status_code >= 400:
            raise RuntimeError(f"POST /commit -> {r.status_code}: {r.text}")
        return r.json()["jobs"][0]["id"]

    first = one(commits[0])  # the mirror's first fetch, alone
    with ThreadPoolExecutor(4) as pool:
        return [first, *pool.map(one, commits[1:])]


def _dispatcher(env: Environment, name: str, hosts: list[SshHost], pipelines: dict[str, dict], settings: dict,
                capacity: int, narwhal_src: str | None) -> BenchDispatcher:
    runners = [h.runner_config(capacity=capacity) for h in hosts]
    d = BenchDispatcher(env.workdir, name, runners, pipelines, settings, narwhal_src)
    env.stack.callback(d.stop)
    d.start(timeout=120)
    d.wait_runners_healthy(timeout=120 + len(hosts))
    return d


# --- health polling ------------------------------------------------------------------


def health_cost(env: Environment, hosts: list[SshHost], sizes: list[int], interval: float, window: float,
                repo: str, narwhal_src: str | None, log: Callable[[str], None]) -> list[dict]:
    """Idle dispatchers of each size: CPU over WINDOW seconds of health polling, RSS, fds."""
    out = []
    settings = {"health_interval": f"{interval:g}s"}
    for k in sizes:
        d = _dispatcher(env, f"health-{k}", hosts[:k], {"idle": pipeline(repo, "true")}, settings, 2, narwhal_src)
        try:
            time.sleep(2 * interval)  # past the first round of checks and reaps
            c0, t0 = cpu_seconds(d.pid), time.monotonic()
            time.sleep(window)
            c1, t1 = cpu_seconds(d.pid), time.monotonic()
            cpu, wall = c1 - c0, t1 - t0
            checks = k * wall / interval
            row = {"runners": k, "interval_seconds": interval, "window_seconds": wall, "cpu_seconds": cpu,
                   "core_share": cpu / wall, "ms_per_runner_check": cpu / checks * 1000,
                   "rss_kib": d.vm_rss_kib(), "open_fds": open_fds(d.pid),
                   "healthy": sum(r["health"]["state"] == "healthy" for r in d.get("/runner")["runners"])}
        finally:
            d.stop()
        log(f"  {k} runners: {row['core_share'] * 100:.1f}% of a core, {row['ms_per_runner_check']:.2f} ms "
            f"per runner check, RSS {row['rss_kib'] / 1024:.0f} MiB, {row['open_fds']} fds, "
            f"{row['healthy']}/{k} healthy")
        out.append(row)
    return out


# --- pickup under load -------------------------------------------------------------------


def _wait(what: str, condition: Callable[[], bool], timeout: float) -> None:
    if not testbed.wait_until(condition, timeout, 0.5):
        raise RuntimeError(f"fleet: {what} not reached within {timeout:g}s")


def pickup_under_load(env: Environment, tag: str, hosts: list[SshHost], busy_per_runner: int, probes: int,
                      narwhal_src: str | None, log: Callable[[str], None], interval: float = 5.0) -> dict:
    """Each of the hosts runs BUSY_PER_RUNNER sleep jobs; then PROBES jobs one at a time: submit ->
    the probe's step container started (Docker's clock)."""
    k = len(hosts)
    busy = k * busy_per_runner
    sleep_repo, probe_repo = str(env.workdir / f"repo-sleep-{tag}"), str(env.workdir / f"repo-probe-{tag}")
    sleep_commits, probe_commits = make_repo(sleep_repo, busy), make_repo(probe_repo, probes + 1)
    d = _dispatcher(env, f"pickup-{tag}", hosts, {"sleep": pipeline(sleep_repo, "sleep 3600"),
                                                "probe": pipeline(probe_repo, "true")},
                    {"health_interval": f"{interval:g}s"}, busy_per_runner + 1, narwhal_src)
    try:
        t0 = time.monotonic()
        ids = submit_all(d, sleep_repo, sleep_commits)
        steps = [d.container(i, 0) for i in ids]

        def started() -> int:
            with env.events.changed:
                names = {n for _, _, a, n in env.events.events if a == "start"}
            return sum(s in names for s in steps)

        _wait(f"{busy} sleep steps started", lambda: started() == busy, 600 + 2 * busy)
        fill = time.monotonic() - t0
        log(f"  {k} runners: {busy} sleep jobs running after {fill:.0f} s")
        d.follow_to_end(d.submit(probe_repo, probe_commits[0]))  # warm-up: the probe repository's mirror
        latencies: list[float] = []
        taken: list[float] = []
        samples: list[dict] = []
        for c in probe_commits[1:]:
            before = time.time()
            job_id = d.submit(probe_repo, c)
            latencies.append(env.events.wait(d.container(job_id, 0), timeout=60) / 1e9 - before)
            end = d.follow_to_end(job_id)
            job = d.get(f"/jobs/{job_id}")
            # the dispatcher's own part: POST -> the job's started_at (its clock), the rest is SSH and Docker
            taken.append(job["started_at"] - before)
            samples.append({"job": job_id, "runner": job["runner"], "seconds": latencies[-1],
                            "started_seconds": taken[-1]})
            if end.get("status") != "passed":
                raise RuntimeError(f"probe job {job_id} ended {end}")
        rss, fds = d.vm_rss_kib(), open_fds(d.pid)
        still = started()
    finally:
        d.stop()
    row = {"runners": k, "busy_jobs": busy, "fill_seconds": fill, "probe_seconds": summary(latencies),
           "started_seconds": summary(taken),
           "probes": samples, "health_interval_seconds": interval,
           "rss_kib": rss, "open_fds": fds, "busy_still_started": still}
    log(f"  {k} runners, {busy} busy: pickup p50 {row['probe_seconds']['median'] * 1000:.0f} ms, "
        f"p95 {row['probe_seconds']['p95'] * 1000:.0f} ms; RSS {rss / 1024:.0f} MiB, {fds} fds")
    return row


# --- log throughput ----------------------------------------------------------------------


def _pipe_floor(env: Environment, jobs: int, lines: int) -> tuple[int, float]:
    """(bytes, seconds) of JOBS ``docker run ... yes | head`` at once, each read from a local pipe."""
    got = [0] * jobs

    def one(i: int) -> None:
        proc = subprocess.Popen(["docker", "run", "--rm", "--network", "none", "--log-driver", "none",
                                 "--label", f"{BENCH_LABEL}={env.run_id}", TEST_IMAGE, "sh", "-c",
                                 log_command(lines)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        while chunk := proc.stdout.read(65536):
            got[i] += len(chunk)
        proc.wait()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(got), time.perf_counter() - t0


def log_throughput(env: Environment, jobs: int, mib: int, narwhal_src: str | None,
                   log: Callable[[str], None]) -> dict:
    """JOBS steps each printing MIB MiB at once through one dispatcher (3 runners), vs local pipes."""
    lines = mib * 1024 * 1024 // (len(LINE) + 1)
    size = lines * (len(LINE) + 1)
    repo = str(env.workdir / "repo-chatty")
    commits = make_repo(repo, jobs + 1)
    floor_bytes, floor_seconds = _pipe_floor(env, jobs, lines)
    capacity = -(-jobs // len(env.hosts))
    runners = [h.runner_config(capacity=capacity) for h in env.hosts]
    d = BenchDispatcher(env.workdir, "chatty", runners, {"chatty": pipeline(repo, log_command(lines))},
                        {"log_cap": f"{max(4, 2 * mib)}m"}, narwhal_src)
    env.stack.callback(d.stop)
    d.start()
    try:
        d.wait_runners_healthy()
        d.follow_to_end(d.submit(repo, commits[0]))  # warm-up: the mirror, the connections
        d.reset_peak_rss()
        c0 = cpu_seconds(d.pid)
        ids = set(submit_all(d, repo, commits[1:]))
        deadline = time.monotonic() + 600 + jobs * mib
        while True:
            done = [j for j in d.get(f"/jobs?limit=1000&repo={repo}")["jobs"] if j["id"] in ids]
            if len(done) == jobs and all(j["status"] in FINAL for j in done):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("fleet: chatty jobs did not finish")
            time.sleep(0.2)
        cpu = cpu_seconds(d.pid) - c0
        steps = [d.get(f"/jobs/{i}")["steps"][0] for i in ids]
        statuses = sorted({j["status"] for j in done})
        peak = d.vm_hwm_kib()
    finally:
        d.stop()
    seconds = max(s["finished_at"] for s in steps) - min(s["started_at"] for s in steps)
    rate, floor = jobs * size / seconds / 1e6, floor_bytes / floor_seconds / 1e6
    row = {"jobs": jobs, "mib_each": mib, "bytes": jobs * size, "seconds": seconds, "mb_per_s": rate,
           "floor_bytes": floor_bytes, "floor_seconds": floor_seconds, "floor_mb_per_s": floor,
           "ratio_to_floor": rate / floor, "statuses": statuses, "dispatcher_cpu_seconds": cpu,
           "peak_rss_kib": peak}
    log(f"  {jobs} x {mib} MiB: {rate:.1f} MB/s through the dispatcher, {floor:.1f} MB/s into local pipes "
        f"({row['ratio_to_floor']:.2f}x); dispatcher CPU {cpu:.1f} s, peak RSS {peak / 1024:.0f} MiB ({statuses})")
    return row


# --- the scenario ----------------------------------------------------------------------


PARTS = ("health", "pickup", "logs")


def scenario(env: Environment, fleet: int, sizes: list[int], interval: float, window: float, busy_per_runner: int,
             probes: int, log_jobs: int, log_mib: int, narwhal_src: str | None,
             log: Callable[[str], None], parts: tuple[str, ...] = PARTS, pickup_interval: float = 5.0) -> dict:
    out: dict = {"fleet": fleet}
    if "health" in parts or "pickup" in parts:
        hosts = start_fleet(fleet, env.workdir / "fleet", log)
        try:
            if "health" in parts:
                idle_repo = str(env.workdir / "repo-idle")
                make_repo(idle_repo, 1)
                log(f"fleet: health polling every {interval:g} s, {window:g} s windows, at {sizes} runners")
                out["health"] = health_cost(env, hosts, sizes, interval, window, idle_repo, narwhal_src, log)
            if "pickup" in parts:
                log(f"fleet: pickup with {busy_per_runner} sleep jobs per runner, {probes} probes, at 3 and {fleet}")
                small = pickup_under_load(env, "small", hosts[:3], busy_per_runner, probes, narwhal_src, log,
                                          pickup_interval)
                large = pickup_under_load(env, "large", hosts, busy_per_runner, probes, narwhal_src, log,
                                          pickup_interval)
                p_small, p_large = small["probe_seconds"]["p95"], large["probe_seconds"]["p95"]
                out["pickup"] = {"small": small, "large": large,
                                 "p95_ratio": p_large / p_small if p_small else None}
        finally:
            stop_fleet(hosts)
    if "logs" in parts:
        log(f"fleet: log throughput, {log_jobs} jobs x {log_mib} MiB at once")
        out["logs"] = log_throughput(env, log_jobs, log_mib, narwhal_src, log)
    return out


def table(f: dict, row: Callable[..., None]) -> None:
    """The fleet's rows of the bench table."""
    for h in f.get("health", []):
        met = h["core_share"] <= 0.20 if h["runners"] >= 200 else None
        row(f"fleet: health polling, {h['runners']} runners every {h['interval_seconds']:g} s: CPU (share of a core)"
            f" / per runner check", f"{h['core_share'] * 100:.1f}% / {h['ms_per_runner_check']:.2f} ms",
            "<= 20% at 200" if h["runners"] >= 200 else "", met, h["core_share"])
        row(f"fleet: idle dispatcher with {h['runners']} runners: RSS / open fds",
            f"{h['rss_kib'] / 1024:.0f} MiB / {h['open_fds']}", "", None, h["rss_kib"])
    if "pickup" in f:
        _pickup_rows(f["pickup"], row)
    if "logs" in f:
        _log_rows(f["logs"], row)


def _pickup_rows(p: dict, row: Callable[..., None]) -> None:
    for key in ("small", "large"):
        q = p[key]
        row(f"fleet: pickup with {q['runners']} runners and {q['busy_jobs']} running jobs: p50 / p95",
            f"{q['probe_seconds']['median'] * 1000:.0f} / {q['probe_seconds']['p95'] * 1000:.0f} ms", "", None,
            q["probe_seconds"]["p95"])
        row("fleet: ... of which POST -> the job's started_at (the dispatcher's part): p50 / p95",
            f"{q['started_seconds']['median'] * 1000:.0f} / {q['started_seconds']['p95'] * 1000:.0f} ms", "", None,
            q["started_seconds"]["p95"])
        row(f"fleet: dispatcher with {q['runners']} runners and {q['busy_jobs']} running jobs: RSS / open fds",
            f"{q['rss_kib'] / 1024:.0f} MiB / {q['open_fds']}", "", None, q["rss_kib"])
    ratio = p["p95_ratio"]
    row(f"fleet: pickup p95 at {p['large']['runners']} runners / at {p['small']['runners']}",
        "-" if ratio is None else f"{ratio:.2f}x", "<= 2x", None if ratio is None else ratio <= 2.0, ratio)


def _log_rows(lg: dict, row: Callable[..., None]) -> None:
    row(f"fleet: log throughput, {lg['jobs']} jobs x {lg['mib_each']} MiB at once, one dispatcher",
        f"{lg['mb_per_s']:.1f} MB/s", "", None, lg["mb_per_s"])
    row(f"fleet: the same {lg['jobs']} containers into local pipes (floor)", f"{lg['floor_mb_per_s']:.1f} MB/s",
        "", None, lg["floor_mb_per_s"])
    row("fleet: log throughput / floor", f"{lg['ratio_to_floor']:.2f}x", ">= 0.80x", lg["ratio_to_floor"] >= 0.8,
        lg["ratio_to_floor"])


__all__ = ["scenario", "table", "start_fleet", "stop_fleet", "cpu_seconds", "open_fds", "percentile"]
