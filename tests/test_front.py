"""The front server in process: a real Dispatcher (never started), cheroot on loopback
behind the front, and raw sockets as clients, so the bytes on the wire are checked."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cheroot import wsgi

from narwhal.api import logs
from narwhal.api.app import make_app
from narwhal.api.front import FrontServer, parse_head
from narwhal.cli.gitrepo import make_git_repo
from narwhal.config.loader import load_config
from narwhal.dispatch.dispatcher import Dispatcher
from tests.test_api import INVENTORY, PIPELINE


@pytest.fixture
def dispatcher(tmp_path: Path) -> Iterator[Dispatcher]:
    config = tmp_path / "config"
    (config / "pipelines").mkdir(parents=True)
    # The test's own folder holds its repositories; its git servers listen on 127.0.0.1.
    (config / "inventory.yaml").write_text(
        INVENTORY + f"settings:\n  local_roots: [{str(tmp_path)!r}]\n  fetch_hosts: ['127.0.0.1:*', 'localhost:*']\n")
    (config / "pipelines" / "ci.yaml").write_text(PIPELINE)
    d = Dispatcher(load_config(config), tmp_path / "state")
    yield d
    d.stop()


class Served:
    def __init__(self, dispatcher: Dispatcher):
        self.dispatcher = dispatcher
        self.httpd = wsgi.Server(("127.0.0.1", 0), make_app(dispatcher), numthreads=4)
        self.httpd.prepare()
        self.thread = threading.Thread(target=self.httpd.serve, daemon=True)
        self.thread.start()
        self.front = FrontServer(dispatcher, ("127.0.0.1", self.httpd.bind_addr[1]))
        self.limits = dispatcher.config.settings
        self.front.settings = lambda: self.limits  # type: ignore[method-assign]
        self.port = self.front.start("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.port}"

    def set(self, **values: object) -> None:
        self.limits = dataclasses.replace(self.limits, **values)

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10, source_address=(source, 0))
        return s

    def close(self) -> None:
        self.front.stop()
        self.httpd.stop()


@pytest.fixture
def served(dispatcher: Dispatcher) -> Iterator[Served]:
    s = Served(dispatcher)
    yield s
    s.close()


@pytest.fixture
def job(dispatcher: Dispatcher, tmp_path: Path) -> int:
    path, sha = make_git_repo(str(tmp_path / "repo"))
    created = dispatcher.submit(path, sha, "main")
    return created[0][0].id


def read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return out
        out, body = out + rest[:n], rest[n + 2:]


def get(s: socket.socket, path: str, headers: str = "") -> tuple[bytes, bytes]:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    head, _, body = read_all(s).partition(b"\r\n\r\n")
    return head, body


def test_fetch_slots_are_per_server():
    """Fetch slots count per host (with its port) of the canonical form; local paths share one."""
    from narwhal.config.repository import canonical_repo, host_of
    assert host_of(canonical_repo("https://git.example.com:8443/a.git")) == "git.example.com:8443"
    assert host_of(canonical_repo("git@github.com:acme/app.git")) == "github.com"
    assert host_of(canonical_repo("/srv/git/app")) is None


def test_parse_head_refuses_the_unusual():
    assert parse_head(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").path == b"/health"
    assert parse_head(b"GET /health\r\n\r\n") is None
    assert parse_head(b"GET /h HTTP/1.1\r\n folded\r\n\r\n") is None
    req = parse_head(b"GET /jobs/%31/log?follow=1&after=3 HTTP/1.1\r\nLast_Event_ID: 4\r\n\r\n")
    assert req.path == b"/jobs/1/log" and req.query_value("after") == "3" and req.header(b"last-event-id") == b"4"


def test_the_follow_stream_has_the_same_bytes_as_the_app(served, dispatcher, job):
    dispatcher.store.append_log(job, 1, ["one", "two\rtwo", "drei ü"])
    dispatcher.cancel(job)
    expected = b"".join(logs.events(dispatcher, job, 0))
    head, body = get(served.connect(), f"/jobs/{job}/log?follow=1")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/event-stream; charset=utf-8" in head and b"Cache-Control: no-cache" in head
    assert dechunk(body) == expected
    assert b"retry: 1000\n\nid: 1\ndata: one\n\nid: 2\ndata: twotwo\n\n" in expected
    _, resumed = get(served.connect(), f"/jobs/{job}/log", "Accept: text/event-stream\r\nLast-Event-ID: 2\r\n")
    assert dechunk(resumed) == b"".join(logs.events(dispatcher, job, 2))
    s = served.connect()  # HTTP/1.0: no chunks, the close ends the stream
    s.sendall(f"GET /jobs/{job}/log?follow=1 HTTP/1.0\r\n\r\n".encode())
    assert read_all(s).partition(b"\r\n\r\n")[2] == expected


def test_other_requests_reach_the_app(served, dispatcher, job):
    dispatcher.store.append_log(job, 1, ["one", "two"])
    r = requests.get(served.url + f"/jobs/{job}/log", timeout=10)
    assert r.status_code == 200 and r.text == "one\ntwo\n" and r.headers["Content-Type"].startswith("text/plain")
    assert requests.get(served.url + "/health", timeout=10).json()["status"] == "ok"
    for path in ("/jobs/999/log?follow=1", "/jobs/x/log?follow=1"):
        r = requests.get(served.url + path, timeout=10)
        assert r.status_code == 404 and "error" in r.json()
    r = requests.get(served.url + f"/jobs/{job}/log?follow=1&after=x", timeout=10)
    assert r.status_code == 400 and "error" in r.json()
    r = requests.post(served.url + "/commit", data=b'{"repo": 1', headers={"Content-Type": "application/json"},
                      timeout=10)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = requests.post(served.url + "/commit", json={"repo": "x"}, headers={"X-Narwhal-Peer": "1.2.3.4"},
                      timeout=10)
    assert r.status_code == 400 and "missing" in r.json()["error"]


def test_finding5_followers_hold_no_thread_and_are_capped(served, dispatcher, job):
    served.set(max_followers_per_client=30, max_followers=40)
    streams = []
    for i in range(40):  # ten times cheroot's threads
        s = served.connect(source="127.0.0.1" if i < 30 else "127.0.0.2")
        s.sendall(f"GET /jobs/{job}/log?follow=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200 OK")
        streams.append(s)
    assert requests.get(served.url + "/health", timeout=10).status_code == 200
    head, body = get(served.connect(), f"/jobs/{job}/log?follow=1")
    assert head.startswith(b"HTTP/1.1 503") and "127.0.0.1" in json.loads(body)["error"]
    head, body = get(served.connect("127.0.0.3"), f"/jobs/{job}/log?follow=1")
    assert head.startswith(b"HTTP/1.1 503") and "(40)" in json.loads(body)["error"]
    dispatcher.store.append_log(job, 1, ["late line"])
    dispatcher.cancel(job)  # every follower gets the line and the end
    for s in streams:
        assert b"data: late line" in read_all(s)
    deadline = time.monotonic() + 5
    while served.front.follower_count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.front.follower_count == 0


def test_finding5_slow_clients_hold_no_thread(served):
    idle = [served.connect() for _ in range(20)]
    for s in idle[:10]:
        s.sendall(b"GET /health HTTP/1.1\r\n")  # a head that never ends
    for s in idle[10:]:
        s.sendall(b"POST /commit HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    assert requests.get(served.url + "/health", timeout=10).status_code == 200
    for s in idle:
        s.close()


def test_a_follower_that_does_not_read_is_dropped(served, dispatcher, job):
    served.set(follower_write_timeout=0.5)
    s = served.connect()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(f"GET /jobs/{job}/log?follow=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    for n in range(1, 200):
        dispatcher.store.append_log(job, n * 100 - 99, [f"{n}-{i}-" + "x" * 200 for i in range(100)])
    dispatcher.scheduler.notify()
    deadline = time.monotonic() + 10
    while served.front.follower_count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.front.follower_count == 0
    s.close()


def test_a_stream_the_front_does_not_take_holds_no_thread(served, job):
    r = requests.head(served.url + f"/jobs/{job}/log?follow=1", timeout=10)
    assert r.status_code == 503


# --- submissions whose fetch is slow ------------------------------------------------------


@pytest.fixture
def tarpit() -> Iterator[str]:
    """A git server that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/repo"
    server.close()
    for s in held:
        s.close()


def test_finding5_a_stalled_fetch_answers_resolving_and_a_full_house_503(served, dispatcher, tarpit, tmp_path):
    served.set(max_fetches=3, max_fetches_per_host=2, fetch_wait=0.3)
    dispatcher.config = dataclasses.replace(dispatcher.config, settings=served.limits)
    sha = "a" * 40
    first = requests.post(served.url + "/commit", json={"repo": tarpit + "0", "commit": sha}, timeout=10)
    assert first.status_code == 202, first.text
    assert first.json()["status"] == "resolving" and first.json()["jobs"] == []
    again = requests.post(served.url + "/commit", json={"repo": tarpit + "0", "commit": sha}, timeout=10)
    assert again.status_code == 202 and again.json()["status"] == "resolving"
    assert requests.post(served.url + "/commit", json={"repo": tarpit + "1", "commit": sha},
                         timeout=10).status_code == 202
    full = requests.post(served.url + "/commit", json={"repo": tarpit + "2", "commit": sha}, timeout=10)
    assert full.status_code == 503 and "max_fetches_per_host" in full.json()["error"]
    other_host = tarpit.replace("127.0.0.1", "localhost")
    assert requests.post(served.url + "/commit", json={"repo": other_host + "3", "commit": sha},
                         timeout=10).status_code == 202
    full = requests.post(served.url + "/commit", json={"repo": other_host + "4", "commit": sha}, timeout=10)
    assert full.status_code == 503 and "(max_fetches)" in full.json()["error"]
    assert requests.get(served.url + "/health", timeout=10).status_code == 200
    path, commit = make_git_repo(str(tmp_path / "local"))  # in the mirror already? no: a local clone
    dispatcher.mirror.resolve(path, commit)
    ok = requests.post(served.url + "/commit", json={"repo": path, "commit": commit}, timeout=10)
    assert ok.status_code == 202 and ok.json()["jobs"][0]["status"] == "queued"


def test_a_late_fetch_queues_the_jobs_or_tells_the_next_submission(dispatcher, tmp_path, monkeypatch):
    import narwhal.dispatch.dispatcher as dispatch

    dispatcher.config = dataclasses.replace(
        dispatcher.config, settings=dataclasses.replace(dispatcher.config.settings, fetch_wait=0.05))
    path, commit = make_git_repo(str(tmp_path / "slow"))
    release = threading.Event()
    resolve = dispatcher.mirror.resolve
    monkeypatch.setattr(dispatcher.mirror, "resolve", lambda r, c: release.wait(10) and resolve(r, c))
    with pytest.raises(dispatch.Resolving):
        dispatcher.submit(path, commit, "main")
    release.set()
    deadline = time.monotonic() + 10
    while not dispatcher.jobs(None, path, 10) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [j["status"] for j in dispatcher.jobs(None, path, 10)] == ["queued"]

    release.clear()
    with pytest.raises(dispatch.Resolving):
        dispatcher.submit(path, "b" * 40, "main")
    release.set()
    while dispatcher.fetches.running():
        time.sleep(0.02)
    with pytest.raises(dispatch.SourceError, match="not found"):
        dispatcher.submit(path, "b" * 40, "main")


def test_a_body_over_max_body_gets_413_not_a_reset(served):
    served.set(max_body=1000)
    r = requests.post(served.url + "/commit", data=b"{" + b" " * 3_000_000 + b"}", timeout=30)
    assert r.status_code == 413 and r.json() == {"error": "request body is 3000002 bytes; the limit is 1000"}


def test_finding3_streams_the_front_serves_keep_the_apps_host_and_token_rules(dispatcher, job):
    """Log streams bypass cheroot, not the boundary: a rebinding Host gets 421, and with
    read_token a stream without the token gets 401, exactly as the app answers."""
    from narwhal.api.app import Boundary, admission

    app = make_app(dispatcher, token="s3cret", boundary=Boundary(listen_host="127.0.0.1", read_token=True))
    httpd = wsgi.Server(("127.0.0.1", 0), app, numthreads=2)
    httpd.prepare()
    threading.Thread(target=httpd.serve, daemon=True).start()
    front = FrontServer(dispatcher, ("127.0.0.1", httpd.bind_addr[1]), admission(app))
    port = front.start("127.0.0.1", 0)

    def head_of(host: str, extra: str = "") -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"GET /jobs/{job}/log?follow=1 HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data and (chunk := s.recv(4096)):
                data += chunk
            return data

    try:
        rebinding = head_of("evil.example", "Authorization: Bearer s3cret\r\n")
        assert rebinding.startswith(b"HTTP/1.1 421 ") and b"DNS rebinding" in rebinding
        assert head_of("127.0.0.1").startswith(b"HTTP/1.1 401 ")
        assert head_of("127.0.0.1", "Authorization: Bearer wrong\r\n").startswith(b"HTTP/1.1 401 ")
        allowed = head_of(f"127.0.0.1:{port}", "Authorization: Bearer s3cret\r\n")
        assert allowed.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in allowed
    finally:
        front.stop()
        httpd.stop()


@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: b\r\n c\r\n\r\n",  # an obs-fold line
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A : b\r\n\r\n",  # a space before the colon
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n:x\r\n\r\n",  # an empty header name
    b"\r\nGET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # a CRLF before the request line
])
def test_finding5_a_head_the_front_cannot_parse_is_a_400_never_passed_through(served, head):
    """Passed on as sent, such a head reached cheroot without the front's limits: 64 of them
    (slow bodies or log follows) held every worker thread and took /health down."""
    with served.connect() as s:
        s.sendall(head)
        answer = read_all(s)
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in status
    assert b"malformed request head" in body


def test_finding5_the_app_never_streams_a_log_on_a_worker_thread(dispatcher, job):
    """Behind the front every follow is the front's; should one reach the app, it is a 503."""
    import webtest

    app = webtest.TestApp(make_app(dispatcher))
    r = app.get(f"/jobs/{job}/log?follow=1", expect_errors=True)
    assert r.status_int == 503 and r.json["error"]
    assert app.get(f"/jobs/{job}/log").status_int == 200  # the plain log is the app's to serve


def test_finding7_the_front_sends_narwhal_events_like_the_app(served, dispatcher, job):
    dispatcher.store.append_log(job, 1, ["[narwhal] step build: exit 0"])
    dispatcher.store.append_log(job, 1, ["step build: exit 1 (0.1s)"], "narwhal")
    dispatcher.cancel(job)
    expected = b"".join(logs.events(dispatcher, job, 0))
    _, body = get(served.connect(), f"/jobs/{job}/log?follow=1")
    assert dechunk(body) == expected
    assert (b"retry: 1000\n\nid: 1\ndata: [narwhal] step build: exit 0\n\n"
            b"event: narwhal\nid: 2\ndata: step build: exit 1 (0.1s)\n\nevent: end\n") in expected


@pytest.mark.parametrize("head, status", [
    (b"POST /commit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n", b"411"),
    (b"POST /commit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n{}", b"400"),
    (b"POST /commit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Content-Length: -1\r\n\r\n", b"400"),
])
def test_finding5_a_body_without_one_plain_length_never_reaches_a_worker_thread(served, head, status):
    """A chunked body was streamed on to cheroot: a sender trickling it held a worker thread
    for as long as it liked. Only a body of one stated length is read (within a deadline)."""
    with served.connect() as s:
        s.sendall(head)  # and send nothing more: the answer must not wait for the rest
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 " + status + b" ") and b'"error"' in answer


def test_attack_only_a_configured_forge_takes_a_webhook_sized_body(served):
    """max_hook_body (8 MiB by default) is for forges: anyone could send it, unauthenticated,
    to /hooks/ANYTHING and have it read whole into memory before the 404 said no such forge."""
    served.set(max_body=1000, max_hook_body=1_000_000)
    r = requests.post(served.url + "/hooks/nobody", data=b"{" + b" " * 500_000 + b"}",
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json() == {"error": "request body is 500002 bytes; the limit is 1000"}
    from narwhal.config.forges import Forge

    forge = Forge(name="gh", kind="github", url="https://api.github.com", webhook_secret="HOOK")
    served.dispatcher.config = dataclasses.replace(served.dispatcher.config, forges=[forge])
    r = requests.post(served.url + "/hooks/gh", data=b"{" + b" " * 500_000 + b"}",
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 401  # read whole, then refused for its signature
