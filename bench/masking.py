"""``python -m bench.masking [MB]``: the cost of masking 20 secrets, side by side, in one run.

In-process and without Docker: realistic build output (80-byte lines of words, paths and
numbers) fed in 64 KiB reads, as the transports read it, through ``LineSplitter`` with no
masker and with a masker of 20 secrets (40-character tokens, each masked in 9 spellings).
The splitter is the only place output is masked, and it is a part of the log path (SSH,
decoding, the store are the rest), so the ratio here bounds the end-to-end cost from above.
A second row feeds the same text one 7-byte read at a time: a step that trickles output.
"""

from __future__ import annotations

import random
import string
import sys
import time

from narwhal.execution.transport import LineSplitter
from narwhal.masking import Masker

CHUNK = 64 * 1024
MiB = 1024 * 1024
SECRETS = 20


def build_output(megabytes: int, rng: random.Random) -> bytes:
    words = ["compiling", "src/narwhal/module.py", "ok", "PASSED", "tests/test_x.py::test_y", "warning:",
             "[100%]", "gcc", "-O2", "-Wall", "linking", "done", "in", "0.31s", "error:", "=>", "FROM"]
    lines = []
    size = 0
    while size < megabytes * MiB:
        line = " ".join(rng.choice(words) for _ in range(10))[:79]
        lines.append(line)
        size += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def secrets(rng: random.Random) -> dict[str, str]:
    alphabet = string.ascii_letters + string.digits
    return {f"SECRET_{i}": "".join(rng.choice(alphabet) for _ in range(40)) for i in range(SECRETS)}


def run(data: bytes, masker: Masker | None, read: int) -> float:
    """Seconds of CPU to split (and mask) ``data`` in reads of ``read`` bytes."""
    splitter = LineSplitter(on_lines=lambda lines: None, masker=masker)
    start = time.process_time()
    for i in range(0, len(data), read):
        splitter.feed(data[i:i + read])
    splitter.flush()
    return time.process_time() - start


def main(argv: list[str]) -> int:
    megabytes = int(argv[0]) if argv else 64
    rng = random.Random(1)
    data = build_output(megabytes, rng)
    values = secrets(rng)
    trickle = data[: 2 * MiB]
    print(f"{'reads':<14} {'MiB':>5} {'plain MB/s':>11} {'masked MB/s':>12} {'cost':>7}   (20 secrets)")
    for label, sample, read in (("64 KiB", data, CHUNK), ("7 B", trickle, 7)):
        plain = min(run(sample, None, read) for _ in range(3))
        masked = min(run(sample, Masker(values), read) for _ in range(3))
        mb = len(sample) / MiB
        print(f"{label:<14} {mb:>5.0f} {len(sample) / plain / 1e6:>11.1f} {len(sample) / masked / 1e6:>12.1f} "
              f"{(masked / plain - 1) * 100:>6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
