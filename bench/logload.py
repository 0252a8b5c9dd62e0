"""Log throughput with many chatty jobs at once, side by side in one run (the fleet's ``logs`` part).

J jobs, each one step printing M MiB of 100-byte lines, no follower, through:

* **the floor**: the same J containers (``docker run ... | wc -c``, started together), each
  read from a local pipe; measured before every round and once after the last, and each
  round is compared with the mean of the two floors around it;
* **one dispatcher on SQLite** (its state directory), on the bench's 3 runners;
* **1, 2, 3 ... dispatchers of a cluster** (``cluster: true``) on one fresh database of a
  throwaway PostgreSQL (``testbed.postgres``, fsync off), on the same 3 runners; the jobs are
  submitted round-robin over the nodes, and whichever node claims a job runs it.

Rate = all bytes / (last step's ``finished_at`` - first step's ``started_at``). For each run:
each dispatcher's CPU seconds and peak RSS, how many jobs each ran, and where the machine's
CPU went meanwhile (``bench.cpu``): on a 2-core machine the dispatchers, sshd, dockerd and
the 20 containers all share the same two CPUs, and the accounting says whether they were full.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import cpu
from bench.env import BENCH_LABEL, FINAL, BenchDispatcher, Environment, make_repo, pipeline
from bench.scenarios import LINE, log_command
from testbed import TEST_IMAGE
from testbed.postgres import PostgresCluster, start_cluster

NODE_COUNTS = (1, 2, 3)
TARGET_FLOOR = 0.8  # one dispatcher's throughput / the floor
TARGET_SCALE = 2.0  # three dispatchers' throughput / one's
PASSWORD_VAR = "NARWHAL_BENCH_PGPASS"


def pipe_floor(env: Environment, jobs: int, lines: int) -> dict:
    """JOBS ``docker run ... yes | head`` at once, each read from a local pipe: bytes, seconds, MB/s, CPU."""
    got = [0] * jobs

    def one(i: int) -> None:
        proc = subprocess.Popen(["docker", "run", "--rm", "--network", "none", "--log-driver", "none",
                                 "--label", f"{BENCH_LABEL}={env.run_id}", TEST_IMAGE, "sh", "-c",
                                 log_command(lines)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        while chunk := proc.stdout.read(65536):
            got[i] += len(chunk)
        proc.wait()

    r0 = cpu.read()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    used = cpu.account(r0, cpu.read(), {os.getpid(): "bench (reading the pipes; the docker CLIs)"})
    return {"bytes": sum(got), "seconds": seconds, "mb_per_s": sum(got) / seconds / 1e6, "cpu": used}


def _wait_final(d: BenchDispatcher, repo: str, ids: set[int], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        done = [j for j in d.get(f"/jobs?limit=1000&repo={repo}")["jobs"] if j["id"] in ids]
        if len(done) == len(ids) and all(j["status"] in FINAL for j in done):
            return done
        if time.monotonic() > deadline:
            raise RuntimeError(f"logs: {len(ids)} chatty jobs did not finish within {timeout:g}s")
        time.sleep(0.2)


def _claimed_by(pg: PostgresCluster, database: str, ids: list[int]) -> dict[int, str]:
    """job id -> the node that ran it, read straight from the database (a Store would migrate it)."""
    import psycopg

    with psycopg.connect(pg.url(database), password=pg.password) as conn:
        return {int(i): n for i, n in conn.execute("SELECT id, node FROM jobs WHERE id = ANY(%s)", (ids,))}


Spy = Callable[[int, str], Any]  # (pid, name) -> a profiler recording that process, with stop()


def _postmaster(pg: PostgresCluster | None) -> dict[int, str]:
    """The cluster's server process (its backends are its children), for the CPU accounting."""
    if pg is None:
        return {}
    try:
        return {int(Path(pg.data, "postmaster.pid").read_text().split()[0]): "postgres (this cluster)"}
    except (OSError, ValueError, IndexError):
        return {}


def _drive(nodes: list[BenchDispatcher], repo: str, warm: list[str], chatty: list[str], size: int,
           timeout: float, claimed_by: Callable[[list[int]], dict[int, str]] | None, spy: Spy | None = None,
           pg: PostgresCluster | None = None) -> dict:
    """Warm every node up (its mirror: one job submitted to each), then submit the chatty jobs
    round-robin over the nodes and wait for all of them."""
    first = nodes[0]
    for d in nodes:
        d.wait_runners_healthy()
    _wait_final(first, repo, {d.submit_patiently(repo, c) for d, c in zip(nodes, warm, strict=True)}, timeout)
    for d in nodes:
        d.reset_peak_rss()
    named = {d.pid: f"dispatcher {k + 1}" for k, d in enumerate(nodes)}
    named[os.getpid()] = "bench (submitting, polling)"
    c0 = [cpu.cpu_seconds(d.pid) for d in nodes]
    spies = [spy(d.pid, d.name) for d in nodes] if spy is not None else []
    r0 = cpu.read()
    try:
        with ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(lambda ic: nodes[ic[0] % len(nodes)].submit_patiently(repo, ic[1]),
                                enumerate(chatty)))
        done = _wait_final(first, repo, set(ids), timeout)
        used = cpu.account(r0, cpu.read(), named, _postmaster(pg))
    finally:
        for one in spies:
            one.stop()
    c1 = [cpu.cpu_seconds(d.pid) for d in nodes]
    steps = [first.get(f"/jobs/{i}")["steps"][0] for i in ids]
    seconds = max(s["finished_at"] for s in steps) - min(s["started_at"] for s in steps)
    ran: dict[str, int] = {}
    if claimed_by is not None:  # which node claimed each job
        for node in claimed_by(ids).values():
            ran[node] = ran.get(node, 0) + 1
    per_node = []
    for k, d in enumerate(nodes):
        node_id = d.get("/health")["node"]["id"]
        per_node.append({"cpu_seconds": c1[k] - c0[k], "peak_rss_kib": d.vm_hwm_kib(),
                         "submitted": len(chatty[k::len(nodes)]), "ran": ran.get(node_id, 0) if ran else len(ids)})
    total = len(ids) * size
    return {"nodes": len(nodes), "bytes": total, "seconds": seconds, "mb_per_s": total / seconds / 1e6,
            "statuses": sorted({j["status"] for j in done}), "per_node": per_node,
            "dispatchers_cpu_seconds": sum(n["cpu_seconds"] for n in per_node), "cpu": used}


def _say(what: str, run: dict, log: Callable[[str], None]) -> None:
    nodes = ", ".join(f"{n['cpu_seconds']:.1f} s / {n['peak_rss_kib'] / 1024:.0f} MiB / {n['ran']} jobs"
                      for n in run["per_node"])
    log(f"  {what}: {run['mb_per_s']:.1f} MB/s ({run['statuses']}); per dispatcher CPU / peak RSS / jobs run: "
        f"{nodes}; machine busy {run['cpu']['busy_share'] * 100:.0f}%")


def _sqlite(env: Environment, name: str, repo: str, warm: list[str], chatty: list[str], size: int,
            pipelines: dict, settings: dict, capacity: int, timeout: float, narwhal_src: str | None,
            spy: Spy | None) -> dict:
    d = BenchDispatcher(env.workdir, name, [h.runner_config(capacity=capacity) for h in env.hosts], pipelines,
                        settings, narwhal_src)
    env.stack.callback(d.stop)
    try:
        d.start()
        return _drive([d], repo, warm[:1], chatty, size, timeout, None, spy)
    finally:
        d.stop()


def _cluster(env: Environment, pg: PostgresCluster, name: str, n: int, repo: str, warm: list[str],
             chatty: list[str], size: int, pipelines: dict, settings: dict, capacity: int, timeout: float,
             narwhal_src: str | None, spy: Spy | None) -> dict:
    """N nodes with ``cluster: true`` on a fresh database; the password reaches them as a secret."""
    database = pg.create_database()
    url = pg.url(database)
    settings = {**settings, "store": url, "store_password": "PGPASS", "cluster": True}
    nodes: list[BenchDispatcher] = []
    try:
        for k in range(n):
            d = BenchDispatcher(env.workdir, f"{name}-{k + 1}", [h.runner_config(capacity=capacity) for h in env.hosts],
                                pipelines, settings, narwhal_src, {"secrets": {"PGPASS": {"env": PASSWORD_VAR}}},
                                env={PASSWORD_VAR: pg.password})
            env.stack.callback(d.stop)
            nodes.append(d)
            d.start()
        return _drive(nodes, repo, warm[:n], chatty, size, timeout,
                      lambda ids: _claimed_by(pg, database, ids), spy, pg)
    finally:
        for d in nodes:
            d.stop()
        pg.drop_database(database)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def scenario(env: Environment, jobs: int, mib: int, node_counts: tuple[int, ...], rounds: int,
             narwhal_src: str | None, log: Callable[[str], None], before_src: str | None = None,
             spy: Spy | None = None) -> dict:
    """ROUNDS rounds of: the floor, one dispatcher on SQLite, then a cluster of each size in
    NODE_COUNTS on PostgreSQL; a last floor after them. With BEFORE_SRC, each of those runs twice,
    back to back (which goes first alternates): the dispatchers from BEFORE_SRC and from
    NARWHAL_SRC (None: the installed narwhal), an A/B in one run against the same floors."""
    lines = mib * 1024 * 1024 // (len(LINE) + 1)
    size = lines * (len(LINE) + 1)
    repo = str(env.workdir / "repo-chatty")
    most = max(node_counts, default=1)
    commits = make_repo(repo, most + jobs)
    warm, chatty = commits[:most], commits[most:]
    pipelines = {"chatty": pipeline(repo, log_command(lines))}
    settings = {"log_cap": f"{max(4, 2 * mib)}m"}
    capacity = -(-jobs // len(env.hosts))
    timeout = 600 + jobs * mib
    sources = [("now", narwhal_src)] + ([("before", before_src)] if before_src else [])
    pg = start_cluster() if node_counts else None
    floors: list[dict] = []
    out: list[dict] = []
    try:
        for r in range(rounds):
            floors.append(pipe_floor(env, jobs, lines))
            log(f"  round {r + 1}: floor {floors[-1]['mb_per_s']:.1f} MB/s into local pipes "
                f"(machine busy {floors[-1]['cpu']['busy_share'] * 100:.0f}%)")
            one: dict = {label: {"cluster": {}} for label, _ in sources}
            for k, n in enumerate((0, *node_counts)):  # 0: one dispatcher on SQLite
                order = sources if (r + k) % 2 == 0 else sources[::-1]
                for label, src in order:
                    tag = f"logs-{r + 1}-{label}-" + (f"pg{n}" if n else "sqlite")
                    if n == 0:
                        run = one[label]["sqlite"] = _sqlite(env, tag, repo, warm, chatty, size, pipelines, settings,
                                                             capacity, timeout, src, spy)
                    else:
                        assert pg is not None
                        run = one[label]["cluster"][str(n)] = _cluster(env, pg, tag, n, repo, warm, chatty, size,
                                                                       pipelines, settings, capacity, timeout, src,
                                                                       spy)
                    who = f"{n} dispatcher{'s' if n > 1 else ''}, PostgreSQL cluster" if n else "1 dispatcher, SQLite"
                    _say(who + (f" ({label})" if before_src else ""), run, log)
            out.append({**one.pop("now"), **({"before": one["before"]} if before_src else {})})
        floors.append(pipe_floor(env, jobs, lines))
        log(f"  floor after: {floors[-1]['mb_per_s']:.1f} MB/s")
    finally:
        if pg is not None:
            pg.stop()
    for r, one in enumerate(out):
        one["floor_mb_per_s"] = _mean([floors[r]["mb_per_s"], floors[r + 1]["mb_per_s"]])
        for runs in (one, one.get("before")):
            if runs is None:
                continue
            runs["sqlite"]["to_floor"] = runs["sqlite"]["mb_per_s"] / one["floor_mb_per_s"]
            base = runs["cluster"].get("1")
            for run in runs["cluster"].values():
                run["to_floor"] = run["mb_per_s"] / one["floor_mb_per_s"]
                run["to_one"] = run["mb_per_s"] / base["mb_per_s"] if base else None
    return {"jobs": jobs, "mib_each": mib, "bytes": jobs * size, "node_counts": list(node_counts),
            "capacity_per_runner": capacity, "runners": len(env.hosts), "before_src": before_src,
            "floors": floors, "rounds": out}


# --- the table -----------------------------------------------------------------------------


def _each(values: list[float], fmt: str) -> str:
    return " / ".join(fmt.format(v) for v in values)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def rows(lg: dict, row: Callable[..., None]) -> None:
    """The bench table's rows: each round's figure (" / " between rounds), the targets on the
    median; with an A/B (``before_src``), the same figures of the dispatchers before the change."""
    rounds, jobs, mib = lg["rounds"], lg["jobs"], lg["mib_each"]
    what = f"{jobs} jobs x {mib} MiB at once"
    ab = bool(lg.get("before_src"))

    def runs(key: str | None, label: str = "now") -> list[dict]:
        sides = [r if label == "now" else r["before"] for r in rounds]
        return [s["sqlite"] if key is None else s["cluster"][key] for s in sides]

    def show(key: str | None, field: str, fmt: str, unit: str) -> str:
        text = _each([x[field] for x in runs(key)], fmt) + unit
        if ab:
            text += " (before: " + _each([x[field] for x in runs(key, "before")], fmt) + unit + ")"
        return text

    floors = [f["mb_per_s"] for f in lg["floors"]]
    row(f"fleet: the same {jobs} containers into local pipes (floor), before each round and after the last",
        _each(floors, "{:.1f}") + " MB/s; machine busy "
        + _each([f["cpu"]["busy_share"] * 100 for f in lg["floors"]], "{:.0f}") + "%", "", None, floors)
    for key in (None, *map(str, lg["node_counts"])):
        n = 1 if key is None else int(key)
        who = "1 dispatcher on SQLite" if key is None else \
            f"{n} dispatcher{'s' if n > 1 else ''} on PostgreSQL (cluster)"
        row(f"fleet: log throughput, {what}, {who}", show(key, "mb_per_s", "{:.1f}", " MB/s"), "", None,
            [x["mb_per_s"] for x in runs(key)])
        if n == 1:
            ratio = _median([x["to_floor"] for x in runs(key)])
            row(f"fleet: log throughput / floor, {who}", show(key, "to_floor", "{:.2f}", "x"),
                f">= {TARGET_FLOOR:.2f}x", ratio >= TARGET_FLOOR, ratio)
        elif runs(key)[0]["to_one"] is not None:
            ratio = _median([x["to_one"] for x in runs(key)])
            target = n == 3
            row(f"fleet: log throughput, {n} dispatchers / 1 (PostgreSQL)", show(key, "to_one", "{:.2f}", "x"),
                f">= {TARGET_SCALE:.0f}x" if target else "", (ratio >= TARGET_SCALE) if target else None, ratio)
        _node_rows(who, runs(key), runs(key, "before") if ab else None, row)


def _node_rows(who: str, runs: list[dict], before: list[dict] | None, row: Callable[..., None]) -> None:
    def per(rs: list[dict]) -> str:
        return "; ".join(", ".join(f"{n['cpu_seconds']:.1f} s / {n['peak_rss_kib'] / 1024:.0f} MiB / {n['ran']}"
                                   for n in run["per_node"]) for run in rs)

    row(f"fleet: logs, {who}: each dispatcher's CPU / peak RSS / jobs run",
        per(runs) + (f" (before: {per(before)})" if before else ""), "", None, [run["per_node"] for run in runs])
    busy = [run["cpu"]["busy_share"] * 100 for run in runs]
    roles = runs[-1]["cpu"]["roles"]
    top = ", ".join(f"{k.split(' (')[0]} {v:.1f}" for k, v in list(roles.items())[:6])
    row(f"fleet: logs, {who}: machine busy (of {runs[-1]['cpu']['cpus']} CPUs); CPU s by role (last round)",
        _each(busy, "{:.0f}") + f"%; {top}", "", None, busy)
