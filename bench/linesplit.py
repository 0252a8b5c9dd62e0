"""``python -m bench.linesplit [MB ...]``: one long line without a newline through the splitter.

In-process and without Docker: the stream a step writes is fed in 64 KiB reads, as the
transports read it, to the bounded ``LineSplitter`` and to the splitter it replaced
(which re-joined the whole unfinished line on every read). Prints CPU seconds and the
peak of traced Python memory for each. The end-to-end twin, through ``narwhal serve``
and dockerd, is ``tests/e2e/test_output.py`` (dispatcher VmHWM against idle VmRSS).
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from collections.abc import Callable

from narwhal.execution.transport import LineSplitter

CHUNK = 64 * 1024
MiB = 1024 * 1024


class UnboundedSplitter:
    """The splitter before the cap (kept here as the baseline)."""

    def __init__(self, on_lines: Callable[[list[str]], None]):
        self._on_lines = on_lines
        self._partial = b""

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        cut = data.rfind(b"\n")
        if cut < 0:
            self._partial = data
            return
        self._partial = data[cut + 1:]
        self._on_lines(data[:cut].decode("utf-8", errors="replace").split("\n"))

    def flush(self) -> None:
        if self._partial:
            line, self._partial = self._partial, b""
            self._on_lines([line.decode("utf-8", errors="replace")])


def measure(make: Callable[[Callable[[list[str]], None]], object], megabytes: int) -> dict:
    chunk = b"a" * CHUNK
    lines: list[str] = []
    tracemalloc.start()
    splitter = make(lines.extend)
    start = time.process_time()
    for _ in range(megabytes * MiB // CHUNK):
        splitter.feed(chunk)  # type: ignore[attr-defined]
    splitter.feed(b"\n")  # type: ignore[attr-defined]
    splitter.flush()  # type: ignore[attr-defined]
    cpu = time.process_time() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"mb": megabytes, "cpu_s": cpu, "peak_mib": peak / MiB, "longest_line": max(map(len, lines))}


def main(argv: list[str]) -> int:
    sizes = [int(a) for a in argv] or [10, 20, 40]
    print(f"{'splitter':<10} {'MiB':>5} {'cpu s':>8} {'peak MiB':>9} {'longest line':>13}")
    for mb in sizes:
        for name, make in (("bounded", lambda cb: LineSplitter(on_lines=cb)), ("unbounded", UnboundedSplitter)):
            if name == "unbounded" and mb > 100:
                continue  # quadratic: 200 MiB would copy ~330 GB
            r = measure(make, mb)
            print(f"{name:<10} {mb:>5} {r['cpu_s']:>8.2f} {r['peak_mib']:>9.1f} {r['longest_line']:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
