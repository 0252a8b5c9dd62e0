"""A log follower on one dispatcher of a cluster, reading a job another dispatcher writes:
how late each line reaches it, woken by PostgreSQL's LISTEN/NOTIFY against reading the store
with its cursor once a second (what ``narwhal.api.logs.follow`` does when nothing wakes it).

Two stores on one database of a throwaway cluster (``testbed.postgres``) stand for the two
dispatchers: the writer appends one line every ``interval`` seconds, the follower reads every
line past its cursor when woken (or when its wait of ``POLL`` seconds ends).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

from narwhal.dispatch.store import Store
from testbed.postgres import start_cluster

POLL = 1.0  # seconds: the follow loop's wait when nothing wakes it


def _lags(writer: Store, reader: Store, lines: int, interval: float, listen: bool) -> list[float]:
    [(job, _)] = writer.create_jobs("bench", f"{int(time.time() * 1e6) % 16**40:040x}", None, ["ci"])
    written: dict[int, float] = {}
    seen: dict[int, float] = {}
    woken = threading.Event()
    stop = threading.Event()
    listener = None
    if listen:
        listener = threading.Thread(target=reader.backend.listen, args=(lambda _jobs: woken.set(), stop), daemon=True)
        listener.start()
        woken.wait(10)  # listening

    def follow() -> None:
        after = 0
        while len(seen) < lines:
            woken.clear()
            for number, _ in reader.read_log(job.id, after=after):
                seen[number] = time.time()
                after = number
            woken.wait(POLL)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    for i in range(lines):
        first = writer.append_log(job.id, 1, [f"line {i}"])
        written[first] = time.time()
        time.sleep(interval)
    follower.join(30)
    stop.set()
    if listener is not None:
        listener.join(10)
    return [seen[n] - written[n] for n in written if n in seen]


def _summary(lags: list[float]) -> dict:
    ordered = sorted(lags)
    return {"lines": len(ordered), "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], "max": ordered[-1]}


def scenario(log: Callable[[str], None], lines: int = 60, interval: float = 0.1) -> dict:
    cluster = start_cluster()
    try:
        name = cluster.create_database()
        with Store(cluster.url(name), password=cluster.password) as writer, \
                Store(cluster.url(name), password=cluster.password) as reader:
            polled = _summary(_lags(writer, reader, lines, interval, listen=False))
            writer.backend.announcing = True
            notified = _summary(_lags(writer, reader, lines, interval, listen=True))
    finally:
        cluster.stop()
    log(f"follow: lag p50/p95 polling {polled['median'] * 1000:.0f}/{polled['p95'] * 1000:.0f} ms, "
        f"LISTEN/NOTIFY {notified['median'] * 1000:.1f}/{notified['p95'] * 1000:.1f} ms")
    return {"lines": lines, "interval": interval, "poll": polled, "notify": notified}
