"""Three cluster nodes behind Debian's HAProxy running the shipped example (deploy/haproxy.cfg,
rendered by testbed/haproxy.py), every request through HAProxy's address.

A node is killed with SIGKILL while jobs run and clients keep submitting, reading and following
logs: what each request got is recorded on the client side, and HAProxy's own log says which
node served it and whether it was retried or redispatched. Docker is the witness that every job
ran once (tests/e2e/cluster.py).
"""

from __future__ import annotations

import datetime
import json
import re
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest
import requests

from tests.e2e.cluster import LEASE_BOUND, running_on
from tests.e2e.conftest import sse_events

pytestmark = pytest.mark.slow

TALK_LINES = 16
# Which work a commit asks for is in its mode.txt: one step for all, so that every job is alike.
STEP = {"name": "work", "run": (
    'case "$(cat mode.txt)" in '
    f'talk) i=0; while [ $i -lt {TALK_LINES} ]; do i=$((i+1)); echo line $i; sleep 0.5; done;; '
    "slow) sleep 8; echo built;; "
    "*) sleep 1; echo built;; esac")}
SLOW_JOBS = 5  # with the talking job: the runners' 6 slots, all busy when the node is killed
QUICK_JOBS = 12  # submitted through HAProxy from the kill on
NO_JOB = 987654321  # cancelling it: narwhal would answer 404, so a 404 means the request was sent again
AFTER_DOWN = 5.0  # seconds the clients go on once HAProxy marked the node down
# HAProxy's request log line (option httplog): server, status, termination state, retries
# ("+" when redispatched), method and path.
LOG_LINE = re.compile(r'\[(?P<accepted>[^\]]+)\] narwhal narwhal/(?P<server>\S+) \S+ (?P<status>-?\d+) \S+ \S+ \S+ '
                      r'(?P<term>\S{4}) \d+/\d+/\d+/\d+/(?P<redispatched>\+?)(?P<retries>\d+) \S+ '
                      r'"(?P<method>\S+) (?P<path>\S+)')


@dataclass
class Outcome:
    """One request a client made through HAProxy, as the client saw it."""

    at: float  # monotonic, when it was sent
    what: str
    status: int | None  # None: no HTTP answer at all
    body: dict | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 400


def call(method: str, url: str, what: str, **kw) -> Outcome:
    """A request without cookies (so HAProxy balances it), as a plain client would make it."""
    at = time.monotonic()
    try:
        r = requests.request(method, url, timeout=30, **kw)
    except requests.RequestException as exc:
        return Outcome(at, what, None, None, f"{type(exc).__name__}: {exc}")
    try:
        body = r.json()
    except ValueError:
        body = None
    return Outcome(at, what, r.status_code, body, "" if body is not None else r.text[:200])


@dataclass
class Follower:
    """A log follower through HAProxy, pinned to one node by HAProxy's persistence cookie, that
    reconnects with Last-Event-ID when its stream is cut (as a browser's EventSource does)."""

    url: str
    job_id: int
    server: str  # the node the cookie names
    events: list[tuple[int, str, float]] = field(default_factory=list)  # (line number, text, time.time())
    connections: int = 0
    problems: list[str] = field(default_factory=list)
    end: dict | None = None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread

    def talk(self) -> list[str]:
        return [text for _, text, _ in self.events if text.startswith("line ")]

    def run(self) -> None:
        last = 0
        deadline = time.monotonic() + 120
        while self.end is None and time.monotonic() < deadline:
            self.connections += 1
            headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last),
                       "Cookie": f"narwhal_node={self.server}"}
            try:
                with requests.get(f"{self.url}/jobs/{self.job_id}/log?follow=1", headers=headers,
                                  stream=True, timeout=30) as r:
                    if r.status_code != 200:
                        self.problems.append(f"{r.status_code} {r.text[:200]}")
                        time.sleep(1)
                        continue
                    for event in sse_events(r):
                        if event.get("event") == "end":
                            self.end = json.loads(event["data"])
                            break
                        if "id" in event and "data" in event:
                            last = int(event["id"])
                            self.events.append((last, event["data"], time.time()))
            except requests.RequestException as exc:  # the stream was cut: reconnect
                self.problems.append(type(exc).__name__)


def log_entries(proxy) -> list[dict]:
    """HAProxy's request log lines, with ``accepted`` as epoch seconds (HAProxy logs local time)."""
    found = []
    for line in proxy.request_lines():
        if m := LOG_LINE.search(line):
            entry = m.groupdict()
            when = datetime.datetime.strptime(entry["accepted"], "%d/%b/%Y:%H:%M:%S.%f")
            entry["accepted"] = time.mktime(when.timetuple()) + when.microsecond / 1e6
            found.append(entry)
    return found


def test_a_node_killed_behind_haproxy_loses_no_request_and_no_job(cluster, haproxy, git_repo):
    nodes, store, witness = cluster([STEP])
    proxy = haproxy([f"127.0.0.1:{d.port}" for d in nodes])
    server_of = {d.get("/health").json()["node"]["id"]: name for d, name in zip(nodes, proxy.servers, strict=True)}
    # HAProxy balances plain clients over all three nodes
    seen = {call("GET", proxy.url + "/health", "health").body["node"]["id"] for _ in range(6)}
    assert seen == set(server_of), (seen, proxy.log()[-2000:])

    talk = git_repo.add_commit({"mode.txt": "talk"}, "talk")
    slow = [git_repo.add_commit({"mode.txt": "slow", "n.txt": str(i)}, f"slow {i}") for i in range(SLOW_JOBS)]
    quick = [git_repo.add_commit({"mode.txt": "quick", "n.txt": str(i)}, f"quick {i}") for i in range(QUICK_JOBS)]
    late = git_repo.add_commit({"mode.txt": "quick", "n.txt": "late"}, "submitted as the node dies")
    outcomes: list[Outcome] = []
    ids: dict[str, int] = {}  # commit -> job

    def submit(commit: str) -> Outcome:
        got = call("POST", proxy.url + "/commit", "POST /commit",
                   json={"repo": git_repo.path, "commit": commit, "branch": "main"})
        if got.ok:
            [job] = got.body["jobs"]
            ids[commit] = job["id"]
        outcomes.append(got)
        return got

    try:
        for commit in [talk, *slow]:
            assert submit(commit).ok, outcomes[-1]
        running = nodes[0].wait_for(lambda: running_on(nodes, witness, 1 + SLOW_JOBS), timeout=60,
                                    what="the talking job and the slow ones running")
        talker = store.lease_of(ids[talk])[0]
        victim_id = max((n for n in running if n != talker), key=lambda n: running[n])
        victim = next(d for d in nodes if d.get("/health").json()["node"]["id"] == victim_id)
        survivor_id = next(n for n in server_of if n not in (victim_id, talker))
        theirs = {i for i in ids.values() if store.lease_of(i)[0] == victim_id}
        # two followers of the talking job: one on the node to be killed, one on a survivor
        cut = Follower(proxy.url, ids[talk], server_of[victim_id])
        kept = Follower(proxy.url, ids[talk], server_of[survivor_id])
        threads = [cut.start(), kept.start()]
        nodes[0].wait_for(lambda: len(cut.talk()) >= 2 and len(kept.talk()) >= 2, timeout=30,
                          what="both followers live")

        # two clients read (GET /jobs/ID, GET /stats) from now on, so some reads are under way
        # when the node dies, and submit new commits (POST /commit) once it is dead (a job the
        # doomed node claimed after ``theirs`` was taken would blur which jobs must run twice)
        stop, dead = threading.Event(), threading.Event()
        queue = list(quick)
        lock = threading.Lock()

        def client() -> None:
            n = 0
            while not stop.is_set():
                with lock:
                    commit = queue.pop(0) if queue and dead.is_set() else None
                if commit:
                    submit(commit)
                known = list(ids.values())
                outcomes.append(call("GET", f"{proxy.url}/jobs/{known[n % len(known)]}", "GET /jobs/ID"))
                outcomes.append(call("GET", proxy.url + "/stats", "GET /stats"))
                n += 1
                time.sleep(0.02)

        clients = [threading.Thread(target=client, daemon=True) for _ in range(2)]
        for t in clients:
            t.start()
        time.sleep(1)
        # three requests HAProxy sends to the node just before it dies, so that it never answers
        # them: the node is frozen (SIGSTOP: the kernel still takes the connections), then killed
        victim.send_signal(signal.SIGSTOP)
        pinned = {"Cookie": f"narwhal_node={server_of[victim_id]}"}
        caught: dict[str, Outcome] = {}
        asked = [("read", "GET", f"/jobs/{ids[talk]}", {}),
                 ("submit", "POST", "/commit", {"json": {"repo": git_repo.path, "commit": late, "branch": "main"}}),
                 ("cancel", "POST", f"/jobs/{NO_JOB}/cancel", {})]
        under_way = [threading.Thread(target=lambda k, m, u, kw: caught.__setitem__(k, call(
            m, proxy.url + u, k, headers=pinned, **kw)), args=a, daemon=True) for a in asked]
        for t in under_way:
            t.start()
        time.sleep(0.5)
        killed, killed_at = time.monotonic(), time.time()
        victim.stop(signal.SIGKILL)
        dead.set()
        for t in under_way:
            t.join(timeout=30)
        if caught["submit"].ok:
            ids[late] = caught["submit"].body["jobs"][0]["id"]
        down: list[float] = []
        while not down and time.monotonic() - killed < 30:
            if proxy.state_changes(server_of[victim_id], "DOWN"):
                down.append(time.monotonic())
            time.sleep(0.05)
        assert down, f"HAProxy never marked the killed node down:\n{proxy.log()[-3000:]}"
        while (queue or time.monotonic() < down[0] + AFTER_DOWN) and time.monotonic() - killed < 60:
            time.sleep(0.1)
        stop.set()
        for t in clients:
            t.join(timeout=60)

        # every job finishes, read through HAProxy
        for job_id in ids.values():
            deadline = time.monotonic() + LEASE_BOUND + 60
            while (job := call("GET", f"{proxy.url}/jobs/{job_id}", "wait").body or {}).get("status") not in (
                    "passed", "failed", "error", "cancelled") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert job["status"] == "passed", (job, call("GET", f"{proxy.url}/jobs/{job_id}/log", "log").error)
        finished = time.monotonic() - killed
        for t in threads:
            t.join(timeout=30)
        time.sleep(1)  # the last containers' die events
    finally:
        witness.close()

    # how late the lines written while the survivor's follower was connected reached it
    written = sorted((first, at) for first, _, at in store.log_times(ids[talk]))
    wrote = [(seen, max(at for first, at in written if first <= n)) for n, _, seen in kept.events]
    lag = sorted(seen - at for seen, at in wrote if at > kept.events[0][2])
    print(f"\nfollower through HAProxy: {len(lag)} live lines, lag from the store's write "
          f"{lag[0] * 1000:.0f}-{lag[-1] * 1000:.0f} ms, median {lag[len(lag) // 2] * 1000:.0f} ms")
    entries = log_entries(proxy)
    before = [o for o in outcomes if o.at < killed]  # some were under way when the node died
    window = [o for o in outcomes if killed <= o.at < down[0]]
    after = [o for o in outcomes if o.at >= down[0]]
    moved = [e for e in entries if e["redispatched"]]
    failed = [(o.what, o.status, o.error or o.body) for o in outcomes if not o.ok]
    print(f"\nkill -9 behind HAProxy: marked down {down[0] - killed:.1f}s after the kill; requests: "
          f"{len(before)} sent before the kill, {len(window)} in that window, {len(after)} after; "
          f"{len(moved)} sent again to another node after a failed try "
          f"({sorted({(e['method'], e['path'].split('/')[1], e['term']) for e in moved})}), "
          f"{sum(e['accepted'] < killed_at for e in moved)} of them sent before the kill; failed: {failed}; "
          f"follower on the killed node reconnected {cut.connections - 1}x; all jobs done {finished:.1f}s after")
    # No request sent once the node was dead failed, before HAProxy marked it down or after: a
    # refused connection went to another node. One under way when it died was sent again (a
    # read, a submission) or, at worst, failed in a way a client retries (no answer, or
    # HAProxy's JSON 502/503/504).
    assert [o for o in window + after if not o.ok] == []
    assert all(o.status in (None, 502, 503, 504) and (o.status is None or "error" in (o.body or {}))
               for o in before if not o.ok), failed
    assert len(window) > 0 and len(after) > 0
    # the requests the node took and never answered: the read and the submission were sent again
    # to another node; the cancel (which cannot be known to be harmless twice) was not: it got
    # HAProxy's JSON 502, not narwhal's 404 for a job that does not exist
    print(f"requests the dying node never answered: { {k: o.status for k, o in caught.items()} }")
    assert caught["read"].status == 200 and caught["read"].body["id"] == ids[talk]
    assert caught["submit"].status == 202 and caught["submit"].body["jobs"][0]["created"]
    assert caught["cancel"].status == 502 and "try again" in caught["cancel"].body["error"]
    again = [e for e in moved if e["accepted"] < killed_at]
    assert {(e["method"], e["path"]) for e in again} >= {("GET", f"/jobs/{ids[talk]}"), ("POST", "/commit")}
    assert moved and all(e["server"] != server_of[victim_id] and e["status"] != "-1" for e in moved)
    # every submitted commit is one job (a retried POST /commit made none twice), passed once
    assert len(ids) == 1 + SLOW_JOBS + QUICK_JOBS + 1
    stats = call("GET", proxy.url + "/stats", "stats").body
    assert [r["passed"] for r in stats["repos"]] == [len(ids)]
    for job_id in ids.values():
        assert store.get_job(job_id).attempt == (2 if job_id in theirs else 1)
    assert witness.attempts() == {i: ({1, 2} if i in theirs else {1}) for i in ids.values()}
    # the followers saw every line once, in order: the cut one on another node after reconnecting
    lines = [f"line {i}" for i in range(1, TALK_LINES + 1)]
    assert kept.talk() == lines and kept.connections == 1, (kept.problems, kept.talk())
    assert cut.talk() == lines and cut.connections >= 2, (cut.problems, cut.talk())
    assert [n for n, _, _ in cut.events] == sorted({n for n, _, _ in cut.events})
    assert cut.end == kept.end and cut.end["status"] == "passed"
    store.close()


def test_a_browser_sticks_to_a_node_and_is_signed_in_at_every_node(cluster, haproxy):
    nodes, store, witness = cluster([STEP])
    witness.close()
    store.close()
    proxy = haproxy([f"127.0.0.1:{d.port}" for d in nodes])
    browser = requests.Session()
    page = browser.get(proxy.url + "/ui/signin", timeout=30)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    # a client's own X-Forwarded-Proto is replaced by HAProxy's (plain HTTP here)
    signed = browser.post(proxy.url + "/ui/signin", data={"token": "", "csrf": csrf, "next": "/ui/"},
                          headers={"X-Forwarded-Proto": "https"}, timeout=30, allow_redirects=False)
    assert signed.status_code == 303, signed.text
    session = signed.cookies.get("narwhal_session")
    assert session and "Secure" not in signed.headers["Set-Cookie"]
    node = browser.cookies.get("narwhal_node")
    assert node in proxy.servers
    for _ in range(6):  # every page from the node that holds the session
        assert "Sign out" in browser.get(proxy.url + "/ui/", timeout=30).text
        assert browser.get(proxy.url + "/health", timeout=30).json()["node"]["id"] == \
            nodes[proxy.servers.index(node)].get("/health").json()["node"]["id"]
    # the affinity is not needed for the session: it is in the database, and another node knows it
    other = nodes[(proxy.servers.index(node) + 1) % len(nodes)]
    assert "Sign out" in requests.get(other.url + "/ui/", cookies={"narwhal_session": session}, timeout=30).text
    # a webhook goes through the same front door to whichever node, and narwhal answers it
    hook = requests.post(proxy.url + "/hooks/nosuchforge", data=b"{}", timeout=30,
                         headers={"Content-Type": "application/json"})
    assert hook.status_code == 404 and "error" in hook.json()


def test_haproxy_holds_each_client_to_fifty_log_streams(cluster, haproxy):
    nodes, store, witness = cluster([STEP])
    witness.close()
    store.close()
    proxy = haproxy([f"127.0.0.1:{d.port}" for d in nodes])
    streams = []
    try:
        for _ in range(50):  # spread over the nodes, each far below its own per-client cap
            r = requests.get(proxy.url + "/events", stream=True, timeout=30)
            streams.append(r)
            assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        refused = requests.get(proxy.url + "/jobs/1/%6cog?follow=1", timeout=30)  # spelled another way
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert "too many log streams" in refused.json()["error"]
        assert requests.get(proxy.url + "/health", timeout=30).status_code == 200  # other requests go on
    finally:
        for r in streams:
            r.close()
