"""``python -m bench``: bring everything up, run every scenario, print the table, write JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import artifacts, cache, hostile, scenarios, web
from bench import clone as clone_bench
from bench import fleet as fleet_bench
from bench import follow as follow_bench
from bench import store as store_bench
from bench.env import Environment, make_repo, pipeline

SLOTS_PER_RUNNER = 2
TARGETS = {
    "pickup_above_rtt_ms": 20.0,
    "narwhal/local": 1.10,
    "narwhal/fresh_ssh": 0.8,
    "throughput_ratio": 1.2,
    "post_per_s": 500.0,
    "stats_p95_ms": 50.0,
    "logs_mb_per_s": 50.0,
    "rss_mib": 150.0,
    "artifacts_to_scp": 0.5,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test: 2 repeats, 6 throughput jobs, 2,000 jobs, 1 MB of logs")
    p.add_argument("--repeats", type=int, help="rounds of narwhal + each baseline (default 15)")
    p.add_argument("--throughput-jobs", type=int, help="jobs in the throughput scenario (default 100)")
    p.add_argument("--jobs", type=int, help="jobs pre-filled into the store for the API scenario, and into each "
                                            "backend for the store scenario (default 1,000,000)")
    p.add_argument("--posts", type=int, help="POST /commit requests in the rate test (default 2,000)")
    p.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients for POST /commit (default 16)")
    p.add_argument("--stats-requests", type=int, help="GET /stats requests timed (default 200)")
    p.add_argument("--log-mb", type=int, help="MiB a step prints in the logs scenario (default 100)")
    p.add_argument("--followers", type=int, help="log followers in the hostile scenario (default 1,000)")
    p.add_argument("--slow", type=int, help="slow half-open connections in the hostile scenario (default 100)")
    p.add_argument("--tarpit", type=int, help="submissions naming a git server that never answers (default 100)")
    p.add_argument("--masking-rounds", type=int, help="log jobs per dispatcher, with and without 20 secrets "
                                                      "(default 6)")
    p.add_argument("--web-jobs", type=int, help="jobs pre-filled for the dashboard scenario (default 10,000)")
    p.add_argument("--web-runners", type=int, help="runners on the dashboard's overview (default 50)")
    p.add_argument("--web-log-mib", type=int, help="MiB of log on the dashboard's job page (default 4)")
    p.add_argument("--artifact-mb", type=int, help="MiB of the artifact in the artifacts scenario (default 200)")
    p.add_argument("--artifact-rounds", type=int, help="rounds of narwhal + scp in the artifacts scenario (default 5)")
    p.add_argument("--cache-rounds", type=int, help="cold and warm jobs of the cache scenario, per index (default 5)")
    p.add_argument("--fleet", type=int, help="sshd runner hosts in the fleet scenario (default 200, at most 254)")
    p.add_argument("--fleet-sizes", help="comma-separated runner counts for the health-polling cost "
                                         "(default 3,50,200; each at most --fleet)")
    p.add_argument("--health-interval", type=float, help="the fleet's health_interval in seconds (default 5)")
    p.add_argument("--pickup-health-interval", type=float, default=5.0,
                   help="the health_interval of the fleet's pickup dispatchers (default %(default)s s)")
    p.add_argument("--health-window", type=float, help="seconds of idle polling measured at each size (default 30)")
    p.add_argument("--busy-per-runner", type=int, help="sleep jobs running on each runner while pickup is "
                                                       "measured (default 2: 400 at 200 runners)")
    p.add_argument("--probes", type=int, help="probe jobs timed for pickup at each size (default 20)")
    p.add_argument("--fleet-parts", default=",".join(fleet_bench.PARTS),
                   help="which parts of the fleet scenario to run (default %(default)s)")
    p.add_argument("--chatty-jobs", type=int, help="log jobs at once in the fleet's log throughput (default 20)")
    p.add_argument("--chatty-mib", type=int, help="MiB each chatty job prints (default 20)")
    p.add_argument("--chatty-nodes", help="comma-separated cluster sizes (dispatchers on one PostgreSQL database) "
                                          "for the fleet's log throughput, beside one on SQLite (default 1,2,3; "
                                          "empty: SQLite alone)")
    p.add_argument("--chatty-rounds", type=int, help="rounds of the fleet's log throughput, each with its own "
                                                     "floor, one after the other (default 1)")
    p.add_argument("--chatty-before", metavar="DIR", help="A/B in one run: the fleet's log throughput runs each "
                   "dispatcher set twice, from DIR (a source tree: before a change) and as usual (after it)")
    p.add_argument("--screenshots", metavar="DIR", help="save PNGs of the dashboard's overview and job page in DIR")
    p.add_argument("--only", action="append",
                   choices=["overhead", "throughput", "api", "hooks", "logs", "masking", "hostile", "web", "checkout",
                            "cache", "store", "artifacts", "fleet", "follow"],
                   help="run only these scenarios (repeatable); pickup comes with overhead")
    p.add_argument("--json", default="bench-results.json", help="where to write the results (default %(default)s)")
    p.add_argument("--narwhal-src", help="run the dispatcher from this source tree (PYTHONPATH), "
                                         "to compare a change against the installed narwhal")
    p.add_argument("--py-spy", metavar="FILE", help="record the dispatcher with py-spy (collapsed stacks, "
                   "--idle) during the overhead jobs into FILE.overhead, the POST burst into FILE.api, and each "
                   "dispatcher of the fleet's log throughput into FILE.NAME")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs, state)")
    args = p.parse_args(argv)
    quick = {"repeats": 2, "throughput_jobs": 6, "jobs": 2000, "posts": 100, "stats_requests": 20, "log_mb": 1,
             "followers": 200, "slow": 30, "tarpit": 20, "masking_rounds": 1,
             "web_jobs": 1000, "web_runners": 10, "web_log_mib": 1, "cache_rounds": 1, "artifact_mb": 10, "artifact_rounds": 1,
             "fleet": 3, "fleet_sizes": "1,3", "health_interval": 1.0, "health_window": 3.0, "busy_per_runner": 1,
             "probes": 3, "chatty_jobs": 4, "chatty_mib": 1, "chatty_nodes": "1,2", "chatty_rounds": 1}
    full = {"repeats": 15, "throughput_jobs": 100, "jobs": 1_000_000, "posts": 2000, "stats_requests": 200,
            "log_mb": 100, "followers": 1000, "slow": 100, "tarpit": 100, "masking_rounds": 6,
            "web_jobs": 10_000, "web_runners": 50, "web_log_mib": 4, "cache_rounds": 5, "artifact_mb": 200, "artifact_rounds": 5,
            "fleet": 200, "fleet_sizes": "3,50,200", "health_interval": 5.0, "health_window": 30.0,
            "busy_per_runner": 2, "probes": 20, "chatty_jobs": 20, "chatty_mib": 20, "chatty_nodes": "1,2,3",
            "chatty_rounds": 1}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("repeats", "throughput_jobs", "jobs", "posts", "clients", "stats_requests", "log_mb",
                "masking_rounds", "fleet", "busy_per_runner", "probes", "chatty_jobs", "chatty_mib", "chatty_rounds"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.fleet > 254:
        p.error("--fleet must be at most 254 (one loopback address each)")
    try:
        args.fleet_sizes = sorted({int(x) for x in str(args.fleet_sizes).split(",") if x.strip()})
    except ValueError:
        p.error("--fleet-sizes must be comma-separated whole numbers")
    if not args.fleet_sizes or not all(1 <= k <= args.fleet for k in args.fleet_sizes):
        p.error(f"--fleet-sizes must be between 1 and --fleet ({args.fleet})")
    if args.fleet < 3:
        p.error("--fleet must be at least 3: pickup is compared against 3 runners")
    try:
        args.chatty_nodes = tuple(sorted({int(x) for x in str(args.chatty_nodes).split(",") if x.strip()}))
    except ValueError:
        p.error("--chatty-nodes must be comma-separated whole numbers")
    if not all(1 <= n <= 8 for n in args.chatty_nodes):
        p.error("--chatty-nodes must be between 1 and 8 dispatchers")
    args.fleet_parts = tuple(x.strip() for x in args.fleet_parts.split(",") if x.strip())
    if not args.fleet_parts or not set(args.fleet_parts) <= set(fleet_bench.PARTS):
        p.error(f"--fleet-parts must name some of {', '.join(fleet_bench.PARTS)}")
    if not (args.health_interval > 0 and args.health_window > 0):
        p.error("--health-interval and --health-window must be positive")
    return args


def machine() -> dict:
    def out(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (done.stdout.strip() or done.stderr.strip()).splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return "?"

    return {"nproc": os.cpu_count(), "docker": out(["docker", "version", "--format", "{{.Server.Version}}"]),
            "kernel": platform.release(), "python": platform.python_version(),
            "openssh": out(["ssh", "-V"]),
            "narwhal_commit": out(["git", "rev-parse", "--short", "HEAD"]),
            "loadavg_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def settings(log_mb: int) -> dict:
    """Default dispatcher settings except the per-job log cap, raised for the logs scenario."""
    return {"log_cap": f"{max(4, 2 * log_mb)}m"}


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class PySpy:
    """py-spy recording a process while a scenario runs (when a path was given)."""

    def __init__(self, path: str | None, pid: int):
        self.proc = None
        if path:
            self.proc = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--idle", "--threads",
                                          "--rate", "250", "--format", "raw", "--output", path, "--nonblocking"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run(args: argparse.Namespace) -> dict:
    # cache only when asked: its image needs Debian's python3 and python3-pip on this host
    only = set(args.only or ["overhead", "throughput", "api", "hooks", "logs", "masking", "hostile", "web",
                             "checkout", "store", "follow", "artifacts", "fleet"])
    results: dict[str, Any] = {"machine": machine(), "parameters": {
        k: getattr(args, k) for k in ("quick", "repeats", "throughput_jobs", "jobs", "posts", "clients",
                                      "stats_requests", "log_mb", "narwhal_src", "followers", "slow",
                                      "tarpit", "web_jobs", "web_runners", "web_log_mib", "cache_rounds", "artifact_mb",
                                      "artifact_rounds", "fleet", "fleet_sizes",
                                      "health_interval", "health_window", "busy_per_runner", "probes", "fleet_parts", "pickup_health_interval",
                                      "chatty_jobs", "chatty_mib", "chatty_nodes", "chatty_rounds", "chatty_before")}, "scenarios": {}}
    lines = args.log_mb * 1024 * 1024 // (len(scenarios.LINE) + 1)
    if "store" in only:  # no runners needed: the store alone, on each backend
        _log(f"store: {args.jobs:,} jobs into SQLite and into PostgreSQL, stats() x {args.stats_requests}")
        results["scenarios"]["store"] = store_bench.scenario(args.jobs, args.stats_requests, _log)
    if "follow" in only:  # no runners needed: two stores on one PostgreSQL database
        _log("follow: a follower on one node of a cluster, lines written by another")
        results["scenarios"]["follow"] = follow_bench.scenario(_log)
    if not only - {"store", "follow"}:
        results["table"] = table_rows(results)
        return results
    with Environment(keep=args.keep) as env:
        results["run_id"], results["workdir"] = env.run_id, str(env.workdir)
        _log(f"bench: work directory {env.workdir}; runners "
             + ", ".join(f"{h.name}={h.address}:{h.port}" for h in env.hosts))
        if only & {"overhead", "throughput", "logs", "masking"}:
            small = str(env.workdir / "repo-small")
            commits = make_repo(small, 1 + args.repeats + args.throughput_jobs)
            logs_repo = str(env.workdir / "repo-logs")
            logs_commits = make_repo(logs_repo, 1 + args.masking_rounds)
            d = env.dispatcher("main", {"trivial": pipeline(small, scenarios.STEP),
                                        "logs": pipeline(logs_repo, scenarios.log_command(lines))},
                               settings(args.log_mb), capacity=SLOTS_PER_RUNNER, narwhal_src=args.narwhal_src)
            d.wait_runners_healthy()
            one_job = None
            if "overhead" in only or "throughput" in only:
                _log("overhead: narwhal job vs (a) local, (b) fresh ssh, (c) held ssh, interleaved")
                spy = PySpy(args.py_spy and args.py_spy + ".overhead", d.pid)
                try:
                    over = scenarios.overhead(env, d, small, commits[:1 + args.repeats], args.repeats, _log)
                finally:
                    spy.stop()
                results["scenarios"]["overhead"] = over
                results["scenarios"]["pickup"] = scenarios.pickup(over)
                one_job = over["job_seconds"]["narwhal"]["median"]
            if "throughput" in only:
                _log(f"throughput: {args.throughput_jobs} jobs on {len(env.hosts)} runners x {SLOTS_PER_RUNNER}")
                results["scenarios"]["throughput"] = scenarios.throughput(
                    env, d, small, commits[1 + args.repeats:], one_job, len(env.hosts) * SLOTS_PER_RUNNER, _log)
            if "logs" in only:
                _log(f"logs: one step printing {args.log_mb} MiB")
                results["scenarios"]["logs"] = scenarios.logs(env, d, logs_repo, logs_commits[0], lines, _log)
            if "masking" in only:
                _log(f"masking: {args.masking_rounds * 2} log jobs of {args.log_mb} MiB, with and without 20 secrets")
                masked = env.dispatcher("masked", {"logs": pipeline(logs_repo, scenarios.log_command(lines))},
                                        settings(args.log_mb), capacity=SLOTS_PER_RUNNER,
                                        narwhal_src=args.narwhal_src,
                                        inventory=scenarios.secrets_inventory(env.workdir))
                masked.wait_runners_healthy()
                results["scenarios"]["masking"] = scenarios.masking(
                    env, d, masked, logs_repo, logs_commits[1:], lines, _log)
                masked.stop()
            d.stop()
        if "api" in only:
            _log(f"api: {args.jobs} jobs pre-filled, {args.posts} POST /commit from {args.clients} clients")
            results["scenarios"]["api"] = scenarios.api(env, args.jobs, args.posts, args.clients,
                                                        args.stats_requests, settings(args.log_mb),
                                                        args.narwhal_src, _log,
                                                        lambda pid: PySpy(args.py_spy and args.py_spy + ".api", pid))
        if "hooks" in only:
            hooks_n = max(20, args.posts // 4)
            _log(f"hooks: {hooks_n} signed push webhooks one at a time, {hooks_n} from {args.clients} clients")
            results["scenarios"]["hooks"] = scenarios.hooks(env, hooks_n, args.clients, settings(args.log_mb),
                                                            args.narwhal_src, _log)
        if "hostile" in only:
            _log(f"hostile: {args.followers} log followers, {args.slow} slow connections, "
                 f"{args.tarpit} submissions to a tarpit git server")
            results["scenarios"]["hostile"] = hostile.scenario(env, args.followers, args.slow, args.tarpit,
                                                               settings(args.log_mb), args.narwhal_src, _log)
        if "web" in only:
            _log(f"web: the dashboard with {args.web_runners} runners, {args.web_jobs} jobs and a "
                 f"{args.web_log_mib} MiB job log, in headless Chromium")
            results["scenarios"]["web"] = web.scenario(env, args.web_jobs, args.web_runners, args.web_log_mib,
                                                       args.narwhal_src, _log, args.screenshots)
        if "checkout" in only:
            _log(f"checkout: git archive vs clone: {{git: true}}, {args.repeats} rounds each")
            results["scenarios"]["checkout"] = asyncio.run(clone_bench.measure(args.repeats, _log))
        if "cache" in only:
            _log(f"cache: pip install of a {cache.WHEEL_MB} MiB wheel from a local index, cold and warm")
            results["scenarios"]["cache"] = cache.scenario(env, args.cache_rounds, args.narwhal_src, _log)
        if "artifacts" in only:
            _log(f"artifacts: a {args.artifact_mb} MiB artifact back, against scp from the same host, "
                 f"{args.artifact_rounds} rounds")
            results["scenarios"]["artifacts"] = artifacts.scenario(env, args.artifact_rounds, args.artifact_mb,
                                                                   args.narwhal_src, _log)
        if "fleet" in only:
            _log(f"fleet: {', '.join(args.fleet_parts)}" + (f"; {args.fleet} sshd runner hosts" if
                 {"health", "pickup"} & set(args.fleet_parts) else ""))
            results["scenarios"]["fleet"] = fleet_bench.scenario(
                env, args.fleet, args.fleet_sizes, args.health_interval, args.health_window, args.busy_per_runner,
                args.probes, args.chatty_jobs, args.chatty_mib, args.narwhal_src, _log, args.fleet_parts,
                args.pickup_health_interval, args.chatty_nodes, args.chatty_rounds, args.chatty_before,
                (lambda pid, name: PySpy(f"{args.py_spy}.{name}", pid)) if args.py_spy else None)
    results["table"] = table_rows(results)
    return results


# --- the table ---------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table_rows(results: dict) -> list[dict]:
    """One row per measured figure: what, value, target, met (None when there is no target)."""
    s = results["scenarios"]
    rows: list[dict] = []

    def row(what: str, value: str, target: str = "", met: bool | None = None, raw: Any = None) -> None:
        rows.append({"what": what, "value": value, "target": target, "met": met, "raw": raw})

    if "pickup" in s:
        p = s["pickup"]
        step, rtt = p["step_container_start_seconds"], p["ssh_rtt_seconds"]
        limit = rtt["median"] + TARGETS["pickup_above_rtt_ms"] / 1000
        row("pickup: POST -> step container started, median", _ms(step["median"]),
            f"<= SSH RTT + 20 ms = {_ms(limit)}", step["median"] <= limit, step["median"])
        row("pickup: POST -> step container started, p95", _ms(step["p95"]), "", None, step["p95"])
        above = p["above_floor_seconds"]
        row("pickup: narwhal's share, median above the held-SSH `docker run` floor", _ms(above),
            "(same 20 ms, read as narwhal's own part)", above is not None and above <= 0.020, above)
        row("pickup: POST -> checkout container started, median", _ms(p["checkout_container_start_seconds"]["median"]),
            "", None, p["checkout_container_start_seconds"]["median"])
        row("floor: held-SSH `docker run` -> container started, median",
            _ms(p["held_ssh_docker_run_to_start_seconds"]["median"]), "", None,
            p["held_ssh_docker_run_to_start_seconds"]["median"])
        row("one SSH round trip (held connection), median", f"{rtt['median'] * 1000:.1f} ms", "", None, rtt["median"])
    if "overhead" in s:
        o = s["overhead"]
        js = o["job_seconds"]
        for kind, label in (("narwhal", "narwhal job, end to end"), ("local", "(a) git archive | docker run, local"),
                            ("fresh_ssh", "(b) the same through a fresh ssh"),
                            ("held_ssh", "(c) the same over a held SSH connection")):
            row(f"{label}: median / p95", f"{_ms(js[kind]['median'])} / {_ms(js[kind]['p95'])}", "", None,
                js[kind]["median"])
        r = o["ratios"]
        row("narwhal / (a)", _x(r["narwhal/local"]), "<= 1.10x", r["narwhal/local"] <= TARGETS["narwhal/local"],
            r["narwhal/local"])
        row("narwhal / (b)", _x(r["narwhal/fresh_ssh"]), "<= 0.80x",
            r["narwhal/fresh_ssh"] <= TARGETS["narwhal/fresh_ssh"], r["narwhal/fresh_ssh"])
        row("narwhal / (c)", _x(r["narwhal/held_ssh"]), "", None, r["narwhal/held_ssh"])
    if "artifacts" in s:
        a = s["artifacts"]
        row(f"artifacts: {a['megabytes']} MiB back, narwhal (collector + SSH + sha256 + store), median",
            f"{statistics.median(a['narwhal_seconds']):.2f} s = {a['narwhal_mb_per_s']:.0f} MB/s", "", None,
            a["narwhal_mb_per_s"])
        row("artifacts: the same bytes by scp from the same host, median",
            f"{statistics.median(a['scp_seconds']):.2f} s = {a['scp_mb_per_s']:.0f} MB/s", "", None, a["scp_mb_per_s"])
        row("artifacts: narwhal / scp throughput", _x(a["ratio_to_scp"]), ">= 0.50x",
            a["ratio_to_scp"] >= TARGETS["artifacts_to_scp"], a["ratio_to_scp"])
        row("artifacts: byte-identical by sha256 (step, store, scp)", "yes" if a["byte_identical"] else "NO",
            "yes", a["byte_identical"], a["byte_identical"])
    if "throughput" in s:
        t = s["throughput"]
        row(f"throughput: {t['jobs']} jobs on {t['slots']} slots, makespan", f"{t['makespan_seconds']:.2f} s",
            "", None, t["makespan_seconds"])
        row("throughput: makespan / ideal (ceil(N/slots) x one job)", _x(t["ratio_to_ideal"]), "<= 1.20x",
            t["ratio_to_ideal"] <= TARGETS["throughput_ratio"], t["ratio_to_ideal"])
        row("throughput: makespan / same work over held SSH, same slots", _x(t["ratio_to_held_ssh"]), "", None,
            t["ratio_to_held_ssh"])
    if "store" in s:
        st = s["store"]
        sq, pg = st["sqlite"], st["postgresql"]
        row(f"store: pre-fill {st['jobs']:,} jobs, SQLite / PostgreSQL",
            f"{sq['prefill_seconds']:.1f} / {pg['prefill_seconds']:.1f} s", "", None, pg["prefill_seconds"])
        row(f"store: stats() at {st['jobs']:,} jobs, p50 / p95, SQLite vs PostgreSQL",
            f"{sq['stats_seconds']['median'] * 1000:.1f} / {sq['stats_seconds']['p95'] * 1000:.1f} ms vs "
            f"{pg['stats_seconds']['median'] * 1000:.1f} / {pg['stats_seconds']['p95'] * 1000:.1f} ms", "", None,
            pg["stats_seconds"]["p95"])
        row("store: rebuild_stats() over every job, SQLite / PostgreSQL",
            f"{sq['rebuild_seconds']:.1f} / {pg['rebuild_seconds']:.1f} s", "", None, pg["rebuild_seconds"])
        row("store: jobs created+started+finished per second (one thread), SQLite / PostgreSQL",
            f"{sq['jobs_per_second']:.0f} / {pg['jobs_per_second']:.0f}", "", None, pg["jobs_per_second"])
        row("store: log appends (1,000-line batches), SQLite / PostgreSQL",
            f"{sq['log_mb_per_s']:.0f} / {pg['log_mb_per_s']:.0f} MB/s", "", None, pg["log_mb_per_s"])
    if "follow" in s:
        f = s["follow"]
        for how, name in (("poll", "cursor every second"), ("notify", "LISTEN/NOTIFY")):
            row(f"follow across nodes: lag of a line, p50 / p95, {name}",
                f"{f[how]['median'] * 1000:.1f} / {f[how]['p95'] * 1000:.1f} ms", "", None, f[how]["p95"])
    if "api" in s:
        a = s["api"]
        post = a["post_commit"]
        row(f"POST /commit, {post['clients']} clients, distinct commits", f"{post['per_second']:.0f}/s", ">= 500/s",
            post["per_second"] >= TARGETS["post_per_s"], post["per_second"])
        st = a["stats_seconds"]
        row(f"GET /stats at {a['prefilled_jobs']:,} jobs: p50 / p95",
            f"{st['median'] * 1000:.1f} / {st['p95'] * 1000:.1f} ms", "p95 <= 50 ms",
            st["p95"] * 1000 <= TARGETS["stats_p95_ms"], st["p95"])
    if "hooks" in s:
        hk = s["hooks"]
        lat = hk["one_at_a_time"]["latency_seconds"]
        row("hooks: signed push -> job committed, one at a time (p50 / p95)",
            f"{_ms(lat['median'])} / {_ms(lat['p95'])}")
        row(f"hooks: webhooks per second, {hk['concurrent']['clients']} clients",
            f"{hk['concurrent']['per_second']:.0f}/s ({hk['concurrent']['status_codes']})")
    if "masking" in s:
        mk = s["masking"]
        row("masking: log throughput with 20 secrets vs none", f"{mk['masked_mb_per_s']:.1f} vs "
            f"{mk['plain_mb_per_s']:.1f} MB/s ({mk['cost_pct']:+.1f}%)", "<= 10% slower",
            mk["cost_pct"] <= 10.0, mk["cost_pct"])
    if "logs" in s:
        lg = s["logs"]
        mb = lg["bytes"] / 1e6
        row(f"logs: {mb:.0f} MB into the store", f"{lg['store_mb_per_s']:.1f} MB/s", ">= 50 MB/s",
            lg["store_mb_per_s"] >= TARGETS["logs_mb_per_s"], lg["store_mb_per_s"])
        row(f"logs: {mb:.0f} MB to an SSE client", f"{lg['sse_mb_per_s']:.1f} MB/s", ">= 50 MB/s",
            lg["sse_mb_per_s"] >= TARGETS["logs_mb_per_s"], lg["sse_mb_per_s"])
        row("logs: floor, the container into a local pipe (--log-driver none)", f"{lg['floor_mb_per_s']:.1f} MB/s",
            "", None, lg["floor_mb_per_s"])
        row("logs: the same with Docker's default json-file log driver",
            f"{lg['floor_json_file_mb_per_s']:.1f} MB/s", "", None, lg["floor_json_file_mb_per_s"])
        peak = lg["peak_rss_kib"] / 1024
        row("logs: dispatcher peak RSS (VmHWM)", f"{peak:.0f} MiB", "<= 150 MB", peak <= TARGETS["rss_mib"], peak)
    if "hostile" in s:
        h = s["hostile"]
        what = f"{h['followers_open']} followers + {h['slow_connections']} slow + {h['tarpit_submissions']} tarpit"
        row(f"hostile: GET /health p50 / p99 / max ({what})", hostile.percentile_row(h["health_seconds"]),
            "p99 < 1 s", h["health_seconds"]["p99"] < 1.0, h["health_seconds"]["p99"])
        row("hostile: a normal submission meanwhile, POST -> final", f"{h['normal_status']} in "
            f"{h['normal_seconds']:.1f} s", "passed", h["normal_status"] == "passed", h["normal_seconds"])
        row("hostile: tarpit submissions answered", ", ".join(f"{k}: {v}" for k, v in h["tarpit_status_codes"].items())
            + f" (max {_ms(h['tarpit_seconds']['max'])})", "", None, h["tarpit_status_codes"])
        row("hostile: dispatcher peak RSS (VmHWM)", f"{h['dispatcher_peak_rss_kib'] / 1024:.0f} MiB", "", None,
            h["dispatcher_peak_rss_kib"])
    if "web" in s:
        w = s["web"]
        for name, what in (("overview", f"overview ({w['runners']} runners, {w['jobs']:,} jobs)"),
                           ("job", f"job page ({w['log_mib']} MiB log)"), ("repository", "repository page")):
            srv, cold, warm = w["server"][name], w["browser"][name]["cold"], w["browser"][name]["warm"]
            row(f"web: {what}, server GET median / p95", f"{_ms(srv['median'])} / {_ms(srv['p95'])}", "", None,
                srv["median"])
            row(f"web: {what}, Chromium first paint / load (cold)",
                f"{cold['first_contentful_paint']:.0f} / {cold['load']:.0f} ms", "", None, cold["load"])
            row(f"web: {what}, bytes transferred cold / warm",
                f"{cold['transferred_bytes'] / 1024:.0f} / {warm['transferred_bytes'] / 1024:.0f} KiB", "", None,
                cold["transferred_bytes"])
        every = w["browser"]["job_all_lines"]
        row(f"web: job page, every one of {w['log_lines']:,} lines loaded (older lines on demand)",
            f"{every['seconds']:.1f} s in {every['clicks']} clicks", "", None, every["seconds"])
    if "checkout" in s:
        c = s["checkout"]
        for name, way in c["ways"].items():
            row(f"checkout ({c['commits']} commits, {c['files']} files): {name}, median / bytes",
                f"{_ms(way['median_seconds'])} / {way['bytes'] / 1024 / 1024:.2f} MiB "
                f"({way['time_vs_archive']:.2f}x, {way['bytes_vs_archive']:.2f}x)", "", None, way["median_seconds"])
    if "cache" in s:
        for what, value in cache.rows(s["cache"]):
            row(what, value)
    if "fleet" in s:
        fleet_bench.table(s["fleet"], row)
    return rows


def render(results: dict) -> str:
    m = results["machine"]
    out = [f"machine: nproc {m['nproc']}, docker {m['docker']}, kernel {m['kernel']}, python {m['python']}, "
           f"narwhal {m['narwhal_commit']}, load at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
           "", "| measure | value | target | met |", "|---|---|---|---|"]
    for r in results["table"]:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        out.append(f"| {r['what']} | {r['value']} | {r['target']} | {met} |")
    phases = results["scenarios"].get("overhead", {}).get("phases_median_seconds", {})
    for kind, ph in phases.items():
        if ph:
            out += ["", f"where a {kind} job's time goes (medians, Docker event clock):"]
            out += [f"  {k:<40} {v * 1000:7.1f} ms" for k, v in ph.items() if v is not None]
    return "\n".join(out)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (and SIGINT, even when started in the background) clean up like Ctrl-C:
    # every `with` and finally below runs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = run(args)
    except KeyboardInterrupt:
        _log("bench: interrupted; everything it started has been stopped")
        return 130
    print(render(results), flush=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    _log(f"bench: results written to {args.json}")
    return 0
