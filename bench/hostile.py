"""The hostile-clients scenario: does ``/health`` still answer while clients misbehave?

N log followers on a running job (spread over loopback source addresses, as many
clients would be), M slow connections that never finish their request (reopened when
the server drops them), K submissions naming a git server that accepts and never
answers (a tarpit on 127.0.0.1 started here). Measured meanwhile: ``/health`` latency
(p50/p99/max, a fresh connection each) and one normal submission, end to end.
``siege`` needs only a URL, so the end-to-end tests run it too.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.measure import percentile, summary

CLIENTS_PER_ADDRESS = 40  # below the server's max_followers_per_client (50)
CLIENT_NET = "127.0.99."  # source addresses of the followers (all of 127/8 is loopback)
TICKER = "i=0; while [ $i -lt 100000 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done"


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def tarpit() -> Iterator[str]:
    """A 'git server' on 127.0.0.1 that accepts every connection and never answers."""
    server = socket.create_server(("127.0.0.1", 0), backlog=1024)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, name="tarpit", daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        server.close()
        for s in held:
            s.close()


class Followers:
    """N open log streams, read (and thrown away) by one selector thread."""

    def __init__(self, port: int, job_id: int, n: int):
        self.selector = selectors.DefaultSelector()
        self.sockets: list[socket.socket] = []
        self.refused = 0
        self.bytes = 0
        self._stop = threading.Event()
        request = f"GET /jobs/{job_id}/log?follow=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        for i in range(n):
            source = CLIENT_NET + str(1 + i // CLIENTS_PER_ADDRESS)
            s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
            s.sendall(request)
            if not s.recv(64).startswith(b"HTTP/1.1 200"):
                self.refused += 1
                s.close()
                continue
            s.setblocking(False)
            self.selector.register(s, selectors.EVENT_READ)
            self.sockets.append(s)
        self.thread = threading.Thread(target=self._read, name="followers", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.selector.select(0.2):
                try:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(key.fileobj)
                self.bytes += len(data)

    @property
    def open(self) -> int:
        return len(self.selector.get_map())

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        for s in self.sockets:
            s.close()


class SlowClients:
    """M connections that send part of a request and then nothing; reopened when dropped."""

    HEADS = (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # a head that never ends
             b"POST /commit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000\r\n\r\n{\"repo\": ")  # a body that never ends

    def __init__(self, port: int, m: int):
        self.port, self.m = port, m
        self.sockets: list[socket.socket | None] = [None] * m
        self.opened = 0
        self._stop = threading.Event()
        self._fill()
        self.thread = threading.Thread(target=self._keep, name="slow-clients", daemon=True)
        self.thread.start()

    def _fill(self) -> None:
        for i, s in enumerate(self.sockets):
            if s is not None:
                try:
                    if s.recv(4096, socket.MSG_DONTWAIT) == b"":
                        s.close()
                        s = None
                except BlockingIOError:
                    continue
                except OSError:
                    s.close()
                    s = None
                if s is not None:  # it answered (408): open a fresh one
                    s.close()
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            sock.sendall(self.HEADS[i % 2])
            self.sockets[i] = sock
            self.opened += 1

    def _keep(self) -> None:
        while not self._stop.wait(0.5):
            with contextlib.suppress(OSError):
                self._fill()

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        for s in self.sockets:
            if s is not None:
                s.close()


def _post(port: int, body: dict, timeout: float = 60) -> tuple[int, dict, float]:
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/commit", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = json.loads(r.read() or b"{}")
        return r.status, data, time.perf_counter() - t
    finally:
        conn.close()


def health_latencies(port: int, n: int, timeout: float = 30) -> dict:
    """GET /health N times, a new connection each (as a load balancer's probe would)."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"GET /health -> {r.status}")
        finally:
            conn.close()
        out.append(time.perf_counter() - t)
        time.sleep(0.02)
    return {**summary(out), "p99": percentile(out, 0.99)}


def siege(port: int, job_id: int, followers: int, slow: int, submissions: int, health_requests: int,
          normal: Callable[[], str], log: Callable[[str], None] = lambda _: None) -> dict:
    """Attack the dispatcher on PORT while JOB_ID runs; ``normal()`` runs one ordinary job and
    returns its final status. Returns what was measured, as plain data."""
    raise_fd_limit(followers + slow + submissions)
    before = health_latencies(port, min(health_requests, 20))
    with tarpit() as pit, ThreadPoolExecutor(max(submissions, 1)) as pool:
        t = time.perf_counter()
        streams = Followers(port, job_id, followers)
        log(f"  {streams.open} followers attached in {time.perf_counter() - t:.1f} s "
            f"({streams.refused} refused)")
        slowpokes = SlowClients(port, slow)
        try:
            posts = [pool.submit(_post, port, {"repo": f"{pit}/repo{i}.git", "commit": f"{i:040x}"})
                     for i in range(submissions)]
            health = health_latencies(port, health_requests)
            log(f"  /health under siege: p50 {health['median'] * 1000:.1f} ms, "
                f"p99 {health['p99'] * 1000:.1f} ms, max {health['max'] * 1000:.1f} ms")
            t = time.perf_counter()
            status = normal()
            normal_seconds = time.perf_counter() - t
            log(f"  a normal submission: {status} in {normal_seconds:.1f} s")
            results = [p.result() for p in posts]
            codes: dict[str, int] = {}
            for code, data, _ in results:
                key = f"{code} {data.get('status', '')}".strip()
                codes[key] = codes.get(key, 0) + 1
            out = {
                "followers": followers, "followers_open": streams.open, "followers_refused": streams.refused,
                "follower_bytes": streams.bytes, "slow_connections": slow, "slow_opened": slowpokes.opened,
                "tarpit_submissions": submissions, "tarpit_status_codes": codes,
                "tarpit_seconds": summary([s for _, _, s in results]) if results else None,
                "health_before_seconds": before, "health_seconds": health,
                "normal_status": status, "normal_seconds": normal_seconds,
            }
        finally:
            slowpokes.close()
            streams.close()
    return out


def percentile_row(h: dict) -> str:
    return f"{h['median'] * 1000:.1f} / {h['p99'] * 1000:.1f} / {h['max'] * 1000:.1f} ms"


__all__ = ["siege", "tarpit", "TICKER", "health_latencies", "percentile_row"]


def scenario(env: Any, followers: int, slow: int, submissions: int, settings: dict, narwhal_src: str | None,
             log: Callable[[str], None]) -> dict:
    """The scenario in the benchmark's environment: a ticking job, then ``siege``."""
    from bench.env import FINAL, make_repo, pipeline

    ticker_repo, normal_repo = str(env.workdir / "repo-ticker"), str(env.workdir / "repo-normal")
    ticker_commit, normal_commit = make_repo(ticker_repo, 1)[0], make_repo(normal_repo, 1)[0]
    tarpit_pipeline = pipeline("http://127.0.0.1:*/*", "true")  # "*" stays in one path segment
    d = env.dispatcher("hostile", {"ticker": pipeline(ticker_repo, TICKER), "normal": pipeline(normal_repo, "true"),
                                   "tarpit": tarpit_pipeline},
                       {**settings, "fetch_hosts": ["127.0.0.1:*"]},  # a host glob counts only when listed
                       narwhal_src=narwhal_src)
    try:
        d.wait_runners_healthy()
        running = d.submit(ticker_repo, ticker_commit)
        deadline = time.monotonic() + 120
        while d.get(f"/jobs/{running}")["status"] != "running":
            if time.monotonic() > deadline:
                raise RuntimeError("the ticking job did not start")
            time.sleep(0.1)

        def normal() -> str:
            job_id = d.submit(normal_repo, normal_commit)
            while (status := d.get(f"/jobs/{job_id}")["status"]) not in FINAL:
                time.sleep(0.1)
            return status

        out = siege(d.port, running, followers, slow, submissions, 200, normal, log)
        d.post(f"/jobs/{running}/cancel")
        out["dispatcher_peak_rss_kib"] = d.vm_hwm_kib()
    finally:
        d.stop()
    return out
