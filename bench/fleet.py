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
* **log throughput** (``bench.logload``): J chatty jobs at once (each a step printing M MiB of
  lines) through one dispatcher on SQLite and through 1, 2, 3 dispatchers of a cluster on
  PostgreSQL, against the same J containers' output read from local pipes
  (``docker run ... | wc -c``, started together): aggregate MB/s and the ratios.

Every host, dispatcher, container and volume started here is stopped again, also on Ctrl-C.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import testbed
from bench import logload
from bench.cpu import cpu_seconds, open_fds
from bench.env import BenchDispatcher, Environment, make_repo, pipeline
from bench.measure import percentile, summary
from testbed import SshHost

FLEET_PREFIX = "127.0.78."  # the fleet's loopback addresses (the bench's 3 hosts are on 127.0.77.x)


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


def submit_all(d: BenchDispatcher, repo: str, commits: list[str]) -> list[int]:
    """Submit every commit, 4 at a time (the first alone: the mirror's first fetch)."""
    first = d.submit_patiently(repo, commits[0])
    with ThreadPoolExecutor(4) as pool:
        return [first, *pool.map(lambda c: d.submit_patiently(repo, c), commits[1:])]


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


# --- the scenario ----------------------------------------------------------------------


PARTS = ("health", "pickup", "logs")


def scenario(env: Environment, fleet: int, sizes: list[int], interval: float, window: float, busy_per_runner: int,
             probes: int, log_jobs: int, log_mib: int, narwhal_src: str | None,
             log: Callable[[str], None], parts: tuple[str, ...] = PARTS, pickup_interval: float = 5.0,
             log_nodes: tuple[int, ...] = logload.NODE_COUNTS, log_rounds: int = 1,
             log_before_src: str | None = None, log_spy: logload.Spy | None = None) -> dict:
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
        log(f"fleet: log throughput, {log_jobs} jobs x {log_mib} MiB at once: local pipes, 1 dispatcher on SQLite, "
            f"{', '.join(map(str, log_nodes)) or 'no'} dispatchers on PostgreSQL; {log_rounds} round(s)")
        out["logs"] = logload.scenario(env, log_jobs, log_mib, log_nodes, log_rounds, narwhal_src, log,
                                       log_before_src, log_spy)
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
        logload.rows(f["logs"], row)


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


__all__ = ["scenario", "table", "start_fleet", "stop_fleet", "cpu_seconds", "open_fds", "percentile"]
