"""``python -m bench.checkout [ROUNDS] [ARCHIVE_MB]``: how to check the source out before parallel steps.

A job whose first two steps may run side by side must have the source in its workspace
before either runs. Two ways, measured side by side on the local Docker engine with the
busybox test image (``narwhal demo`` or the test suite builds it), interleaved:

* ``separate``: a checkout container (``tar -x`` from stdin into the volume), then both steps;
* ``first step``: the first step's container unpacks, prints a token, then runs its
  command; the second step starts when the token arrives (what narwhal does).

Each round makes a fresh volume, runs both steps (``true``) and removes the volume. The
figure is the time from the first ``docker run`` to the end of the last step.
"""

from __future__ import annotations

import asyncio
import io
import os
import statistics
import sys
import tarfile
import time
import uuid

IMAGE = "narwhal-test/busybox:latest"
TOKEN = uuid.uuid4().hex


def archive(megabytes: float) -> bytes:
    """A tar of a few small files and one of ``megabytes`` (random, so it does not shrink)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in [("README.md", b"# demo\n"), ("build.sh", b"echo hi\n"),
                           ("blob.bin", os.urandom(int(megabytes * 1024 * 1024)))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def run_argv(volume: str, script: str, interactive: bool = False) -> list[str]:
    return ["docker", "run", "--rm", *(["-i"] if interactive else []), "--network", "none", "--log-driver", "none",
            "--mount", f"type=volume,source={volume},target=/workspace", "--workdir", "/workspace",
            IMAGE, "sh", "-c", script]


async def run(argv: list[str], stdin: bytes | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE if stdin is not None else None,
                                                stdout=asyncio.subprocess.DEVNULL)
    await proc.communicate(stdin)
    assert proc.returncode == 0, argv


async def separate(volume: str, tar: bytes) -> None:
    await run(run_argv(volume, "tar -x -C /workspace", interactive=True), tar)
    await asyncio.gather(run(run_argv(volume, "test -f README.md")), run(run_argv(volume, "test -f README.md")))


async def first_step(volume: str, tar: bytes) -> None:
    proc = await asyncio.create_subprocess_exec(
        *run_argv(volume, f'tar -x -C /workspace && echo {TOKEN} && test -f README.md', interactive=True),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(tar)
    await proc.stdin.drain()
    proc.stdin.close()
    while (await proc.stdout.readline()).strip() != TOKEN.encode():
        pass
    second = asyncio.ensure_future(run(run_argv(volume, "test -f README.md")))
    await proc.wait()
    assert proc.returncode == 0
    await second


async def main(rounds: int, megabytes: float) -> None:
    tar = archive(megabytes)
    ways = {"separate": separate, "first step": first_step}
    samples: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for i in range(rounds + 1):  # round 0 warms the engine up and is not counted
        for name in names[i % 2:] + names[:i % 2]:
            volume = f"narwhal-bench-{uuid.uuid4().hex[:12]}"
            began = time.perf_counter()
            await ways[name](volume, tar)
            took = time.perf_counter() - began
            await run(["docker", "volume", "rm", "--force", volume])
            if i:
                samples[name].append(took)
    print(f"two parallel steps after a checkout of {len(tar) / 1024 / 1024:.1f} MiB, {rounds} rounds each "
          f"(first docker run -> last step done):")
    for name, values in samples.items():
        values.sort()
        p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
        print(f"  {name:10}  median {statistics.median(values) * 1000:6.0f} ms   p95 {p95 * 1000:6.0f} ms")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10, float(sys.argv[2]) if len(sys.argv) > 2 else 1))
