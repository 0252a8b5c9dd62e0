"""The benchmark command still works end to end, at a tiny size (not a timed test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = {"pickup", "overhead", "throughput", "api", "hooks", "logs", "masking", "checkout", "fleet", "store"}


def test_bench_quick_writes_every_scenario(tmp_path, docker_engine, test_image, runner_user):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())
    assert SCENARIOS <= set(results["scenarios"])
    assert results["machine"]["nproc"] >= 1
    s = results["scenarios"]
    assert s["overhead"]["job_seconds"]["narwhal"]["n"] == 2
    assert set(s["overhead"]["ratios"]) == {"narwhal/local", "narwhal/fresh_ssh", "narwhal/held_ssh"}
    assert s["throughput"]["jobs"] == 6 and s["throughput"]["statuses"] == ["passed"]
    assert s["api"]["prefilled_jobs"] == 2000 and s["api"]["post_commit"]["status_codes"] == {"202": 100}
    assert s["logs"]["status"] == "passed" and s["logs"]["sse_lines"] >= s["logs"]["lines"]
    assert len(s["masking"]["runs"]["masked"]) == 1 and s["masking"]["secrets"] == 20
    assert s["hooks"]["concurrent"]["status_codes"] == {"200": 25} and s["hooks"]["jobs_queued"] == 51
    assert set(s["checkout"]["ways"]) == {"archive", "clone, cold", "clone, cached"}
    assert s["checkout"]["ways"]["clone, cold"]["bytes"] > s["checkout"]["ways"]["archive"]["bytes"]  # the .git
    fleet = s["fleet"]
    assert [h["runners"] for h in fleet["health"]] == [1, 3]
    assert all(h["healthy"] == h["runners"] and h["cpu_seconds"] > 0 and h["open_fds"] > 0 for h in fleet["health"])
    for size in ("small", "large"):
        pickup = fleet["pickup"][size]
        assert pickup["runners"] == 3 and pickup["busy_jobs"] == 3 and pickup["busy_still_started"] == 3
        assert pickup["probe_seconds"]["n"] == 3 and pickup["started_seconds"]["n"] == 3
    logs = fleet["logs"]
    assert logs["jobs"] == 4 and logs["node_counts"] == [1, 2] and len(logs["rounds"]) == 1
    assert all(f["bytes"] == logs["bytes"] for f in logs["floors"])  # the floors read every byte too
    [one] = logs["rounds"]
    for run in (one["sqlite"], one["cluster"]["1"], one["cluster"]["2"]):
        assert run["statuses"] == ["passed"] and run["bytes"] == logs["bytes"]
        assert sum(n["ran"] for n in run["per_node"]) == 4 and all(n["cpu_seconds"] > 0 for n in run["per_node"])
        assert run["cpu"]["busy_seconds"] > 0 and "containers (the steps' processes)" in run["cpu"]["roles"]
    assert len(one["cluster"]["2"]["per_node"]) == 2
    assert "| fleet: log throughput / floor, 1 dispatcher on SQLite |" in proc.stdout
    assert "| fleet: log throughput, 2 dispatchers / 1 (PostgreSQL) |" in proc.stdout
    assert "| measure | value | target | met |" in proc.stdout
    # the bench cleans up after itself: no container, volume or work directory of this run is left
    label = f"label=narwhal-bench={results['run_id']}"
    for argv in (["docker", "ps", "-aq", "--filter", label], ["docker", "volume", "ls", "-q", "--filter", label]):
        assert subprocess.run(argv, capture_output=True, text=True).stdout.split() == []
    assert not Path(results["workdir"]).exists()
