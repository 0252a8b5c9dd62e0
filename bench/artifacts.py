"""The ``artifacts`` scenario: a 200 MB artifact back over the runner's SSH connection, against ``scp``.

One runner host (an sshd of the test bed), one pipeline: a step writes ``big.bin`` (random
bytes, so nothing compresses) and prints its sha256; ``artifacts: {paths: [big.bin]}``
brings it back when the job passes. narwhal's figure is the collection as its job log
states it (``artifacts: 1 file, 209.7 MB (X.Xs)``): the collector's ``docker run``, the
tar stream over the held asyncssh connection, the parse, the sha256 and the write (with
fsync) into the store. The baseline copies the very same bytes (the stored object, put in a
file the runner user can read) from the same sshd host with OpenSSH's ``scp``, same user
and key, a new connection each time, to a file on the same disk. Rounds are interleaved;
the file is checked byte for byte (sha256) each time.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.env import BenchDispatcher, Environment, make_repo, pipeline

SIZE_MB = 200
LOG_RE = re.compile(r"artifacts: 1 file, [0-9.]+ [kMG]?B \(([0-9.]+)s\)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _scp(host: Any, source: str, dest: Path) -> float:
    # -O: the classic scp protocol (scp -f on the host, through its shell); the test bed's sshd
    # offers no sftp subsystem, which newer scp uses by default.
    argv = ["scp", "-O", "-q", "-F", "/dev/null", "-i", host.key_path, "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={host.known_hosts_path}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-P", str(host.port),
            f"{host.user}@{host.address}:{source}", str(dest)]
    began = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"scp exited {done.returncode}: {done.stderr.decode(errors='replace')[-500:]}")
    return time.perf_counter() - began


def scenario(env: Environment, rounds: int, megabytes: int, narwhal_src: str | None, log: Any) -> dict:
    host = env.hosts[0]
    repo = str(env.workdir / "repo-artifacts")
    commits = make_repo(repo, rounds)
    size = megabytes * 1024 * 1024
    make = f"dd if=/dev/urandom of=big.bin bs=1048576 count={megabytes} 2>/dev/null && sha256sum big.bin"
    spec = {**pipeline(repo, make), "artifacts": {"paths": ["big.bin"]}}
    d = BenchDispatcher(env.workdir, "artifacts", [host.runner_config(capacity=1)], {"artifacts": spec},
                        {"artifacts_job_cap": "1g", "artifacts_quota": "8g"}, narwhal_src)
    env.stack.callback(d.stop)
    d.start()
    d.wait_runners_healthy()
    shared = Path("/tmp") / f"narwhal-bench-artifacts-{env.run_id}"
    shared.mkdir(mode=0o755, exist_ok=True)
    env.stack.callback(shutil.rmtree, shared, True)
    narwhal_s, scp_s, identical = [], [], []
    try:
        for n, commit in enumerate(commits, 1):
            job_id = d.submit(repo, commit)
            end = d.follow_to_end(job_id)
            text = d.session.get(f"{d.url}/jobs/{job_id}/log", timeout=60).text
            if end.get("status") != "passed":
                raise RuntimeError(f"artifacts job {job_id}: {end}\n{text[-2000:]}")
            made = re.search(r"^([0-9a-f]{64})  big.bin$", text, re.M)
            took = LOG_RE.search(text)
            if made is None or took is None:
                raise RuntimeError(f"artifacts job {job_id}: no sha256 or no collection note:\n{text[-2000:]}")
            listed = d.get(f"/jobs/{job_id}/artifacts")["artifacts"][0]
            obj = d.state_dir / "artifacts" / "objects" / listed["sha256"][:2] / listed["sha256"][2:]
            stored = _sha256(obj)
            # The baseline: the same bytes from the same host over scp.
            source = shared / "big.bin"
            shutil.copyfile(obj, source)
            os.chmod(source, 0o644)
            dest = env.workdir / "scp-big.bin"
            scp_s.append(_scp(host, str(source), dest))
            copied = _sha256(dest)
            dest.unlink()
            source.unlink()
            narwhal_s.append(float(took.group(1)))
            identical.append(made.group(1) == listed["sha256"] == stored == copied and listed["size"] == size)
            log(f"artifacts: round {n}/{rounds}: narwhal {narwhal_s[-1]:.2f} s, scp {scp_s[-1]:.2f} s, "
                f"sha256 {'identical' if identical[-1] else 'DIFFERENT'}")
    finally:
        d.stop()
    n_med, s_med = statistics.median(narwhal_s), statistics.median(scp_s)
    return {"megabytes": megabytes, "rounds": rounds, "narwhal_seconds": narwhal_s, "scp_seconds": scp_s,
            "narwhal_mb_per_s": size / 1e6 / n_med, "scp_mb_per_s": size / 1e6 / s_med,
            "ratio_to_scp": s_med / n_med, "byte_identical": all(identical)}
