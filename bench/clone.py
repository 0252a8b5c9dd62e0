"""``python -m bench --only checkout`` (or ``python -m bench.clone [ROUNDS]``): the plain
``git archive`` workspace against ``clone: {git: true}``, side by side.

On a repository with some history (made with ``git fast-import``: COMMITS commits over
FILES files, a tag every 50 commits), each round, the ways interleaved:

* ``archive``: ``Mirror.archive`` streamed into ``docker run -i ... tar -x`` on a fresh volume
  (what a job without ``clone:`` does);
* ``clone, cold``: ``Workspaces.prepare`` on an empty cache (a ``.git`` made from the mirror,
  the checkout, the tar), then the same stream and unpack;
* ``clone, cached``: the same once the tar is made (a later job of the same commit: a
  matrix, a retry, another pipeline).

The figure is the time from asking for the source to the end of the unpacking container,
and the bytes the runner is sent. The dispatcher's own code runs in this process, on the
local Docker engine with the busybox test image.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from narwhal.cli.gitrepo import GIT_ENV
from narwhal.config.pipeline import Clone
from narwhal.config.settings import Settings
from narwhal.execution.clone import Workspaces
from narwhal.execution.source import Mirror

IMAGE = "narwhal-test/busybox:latest"
COMMITS = 500
FILES = 200
FILE_BYTES = 2048


def make_history(path: Path, commits: int = COMMITS, files: int = FILES) -> str:
    """A repository at PATH with COMMITS commits (each rewrites 5 of FILES text files) and a tag
    every 50; its head's id."""
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True, env={**os.environ, **GIT_ENV})
    chunks: list[bytes] = []
    when = 1_700_000_000
    for n in range(1, commits + 1):
        touched = range(files) if n == 1 else [(n * 7 + k * 31) % files for k in range(5)]
        lines = [f"commit refs/heads/main\nmark :{n}\ncommitter Bench <b@narwhal.invalid> {when + n} +0000\n"]
        message = f"change {n}\n".encode()
        lines.append(f"data {len(message)}\n")
        chunks.append("".join(lines).encode() + message)
        if n > 1:
            chunks.append(f"from :{n - 1}\n".encode())
        for f in touched:
            body = (f"file {f} version {n}\n" * (FILE_BYTES // 24)).encode()
            chunks.append(f"M 100644 inline src/f{f:03d}.txt\ndata {len(body)}\n".encode() + body + b"\n")
        chunks.append(b"\n")
        if n % 50 == 0:
            tag = f"release {n}\n".encode()
            chunks.append(f"tag v{n // 50}.0\nfrom :{n}\ntagger Bench <b@narwhal.invalid> {when + n} +0000\n"
                          f"data {len(tag)}\n".encode() + tag + b"\n")
    subprocess.run(["git", "-C", str(path), "fast-import", "--quiet"], input=b"".join(chunks), check=True,
                   env={**os.environ, **GIT_ENV})
    subprocess.run(["git", "-C", str(path), "gc", "-q"], check=True, env={**os.environ, **GIT_ENV})
    return subprocess.run(["git", "-C", str(path), "rev-parse", "main"], capture_output=True, text=True,
                          check=True).stdout.strip()


async def unpack(stream: AsyncIterator[bytes]) -> int:
    """Stream into a fresh volume through `docker run -i ... tar -x`; bytes sent."""
    volume = f"narwhal-bench-{uuid.uuid4().hex[:12]}"
    proc = await asyncio.create_subprocess_exec(
        "docker", "run", "--rm", "-i", "--network", "none", "--log-driver", "none",
        "--mount", f"type=volume,source={volume},target=/workspace", IMAGE, "tar", "-x", "-C", "/workspace",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
    assert proc.stdin is not None
    sent = 0
    async for chunk in stream:
        sent += len(chunk)
        proc.stdin.write(chunk)
        await proc.stdin.drain()
    proc.stdin.close()
    code = await proc.wait()
    rm = await asyncio.create_subprocess_exec("docker", "volume", "rm", "--force", volume,
                                              stdout=asyncio.subprocess.DEVNULL)
    await rm.wait()
    assert code == 0, code
    return sent


async def measure(rounds: int, log: Callable[[str], None] = print) -> dict:
    work = Path(tempfile.mkdtemp(prefix="narwhal-bench-clone-"))
    try:
        repo = work / "repo"
        began = time.perf_counter()
        head = make_history(repo)
        log(f"checkout: a repository of {COMMITS} commits, {FILES} files, {COMMITS // 50} tags "
            f"({time.perf_counter() - began:.1f}s to make)")
        mirror = Mirror(work / "mirrors")
        mirror.resolve(str(repo), head)
        settings = Settings()
        cached = Workspaces(mirror, work / "cached", lambda: settings)
        clone = Clone(git=True)

        async def archive() -> int:
            return await unpack(mirror.archive(str(repo), head))

        async def cold() -> int:
            fresh = Workspaces(mirror, work / f"cold-{uuid.uuid4().hex[:8]}", lambda: settings)
            prepared = await asyncio.to_thread(fresh.prepare, str(repo), head, clone, [])
            try:
                return await unpack(prepared.stream())
            finally:
                shutil.rmtree(fresh.dir, ignore_errors=True)

        async def warm() -> int:
            prepared = await asyncio.to_thread(cached.prepare, str(repo), head, clone, [])
            return await unpack(prepared.stream())

        ways = {"archive": archive, "clone, cold": cold, "clone, cached": warm}
        samples: dict[str, list[float]] = {name: [] for name in ways}
        sizes: dict[str, int] = {}
        names = list(ways)
        for i in range(rounds + 1):  # round 0 warms up (and fills the cache) and is not counted
            for name in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter()
                sizes[name] = await ways[name]()
                if i:
                    samples[name].append(time.perf_counter() - t0)
        result = {"commits": COMMITS, "files": FILES, "rounds": rounds, "ways": {}}
        for name, values in samples.items():
            values.sort()
            result["ways"][name] = {"median_seconds": statistics.median(values),
                                    "p95_seconds": values[min(len(values) - 1, int(0.95 * len(values)))],
                                    "bytes": sizes[name]}
        base = result["ways"]["archive"]
        for way in result["ways"].values():
            way["time_vs_archive"] = way["median_seconds"] / base["median_seconds"]
            way["bytes_vs_archive"] = way["bytes"] / base["bytes"]
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(result: dict) -> str:
    out = [f"source into a fresh workspace, {result['commits']} commits x {result['files']} files, "
           f"{result['rounds']} rounds each (ask -> unpacking container done):"]
    for name, way in result["ways"].items():
        out.append(f"  {name:14} median {way['median_seconds'] * 1000:6.0f} ms  p95 {way['p95_seconds'] * 1000:6.0f} ms"
                   f"  {way['bytes'] / 1024 / 1024:6.2f} MiB  ({way['time_vs_archive']:.2f}x time, "
                   f"{way['bytes_vs_archive']:.2f}x bytes)")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 10))))
