"""The API's HTTP boundary against the real ``narwhal serve`` process.

Named after the findings from real dispatchers: cross-site changes and DNS rebinding (1),
a blank token accepted at start (3), two dispatchers on one state directory (4), and
slow clients holding the server's threads (slowloris).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from narwhal.api.server import SERVER_THREADS, free_port
from tests.e2e.conftest import simple_pipeline, write_config

pytestmark = pytest.mark.slow

EVIL = "http://evil.example"
RUNNER = {"name": "local", "transport": "local", "capacity": 1}


@pytest.fixture
def served(dispatcher):
    # A short socket timeout so the slowloris test does not wait the default 10 s.
    return dispatcher([RUNNER], {"ci": simple_pipeline()}, settings={"http_timeout": 2})


def _json_error(r: requests.Response | http.client.HTTPResponse, status: int) -> str:
    """A 4xx with a JSON ``{"error": "..."}`` body; the message."""
    if isinstance(r, requests.Response):
        code, body = r.status_code, r.text
    else:
        code, body = r.status, r.read().decode()
    assert code == status, body
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    error = json.loads(body)["error"]
    assert isinstance(error, str) and error
    return error


def _serve(config_dir: Path, state_dir: Path, env: dict | None = None,
           listen: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "narwhal", "serve", "--config", str(config_dir), "--state", str(state_dir),
         "--listen", listen or f"127.0.0.1:{free_port()}"],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60)


def test_finding3_cross_site_post_refused(served, git_repo):
    d = served
    commit = f'{{"repo": "{git_repo.path}", "commit": "{git_repo.commit}"}}'
    text_plain = {"Content-Type": "text/plain", "Origin": EVIL}
    assert "cross-site" in _json_error(requests.post(d.url + "/commit", data=commit, headers=text_plain,
                                                     timeout=10), 403)
    assert "cross-site" in _json_error(requests.post(d.url + "/runner", data='{"name": "r9", "transport": "local"}',
                                                     headers=text_plain, timeout=10), 403)
    _json_error(requests.post(d.url + "/runner/local/drain", headers={"Origin": EVIL}, timeout=10), 403)
    _json_error(requests.post(d.url + "/commit", json={"repo": git_repo.path, "commit": git_repo.commit},
                              headers={"Origin": EVIL}, timeout=10), 403)
    _json_error(requests.post(d.url + "/runner/local/drain", headers={"Sec-Fetch-Site": "cross-site"},
                              timeout=10), 403)
    # No Origin, but a body a page can send without a preflight.
    _json_error(requests.post(d.url + "/commit", data=commit, headers={"Content-Type": "text/plain"}, timeout=10), 415)
    assert d.get("/jobs").json()["jobs"] == []
    runners = d.get("/runner").json()["runners"]
    assert [r["name"] for r in runners] == ["local"] and runners[0]["draining"] is False
    # The same change from the dispatcher's own origin goes through.
    r = requests.post(d.url + "/runner/local/drain", headers={"Origin": d.url}, timeout=10)
    assert r.status_code == 200 and r.json()["draining"] is True


def test_finding3_rebinding_host_refused(served):
    d = served
    for host in ("evil.example", f"evil.example:{d.port}", f"127.0.0.1.nip.io:{d.port}"):
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
        conn.request("GET", "/jobs", headers={"Host": host})
        assert "public_names" in _json_error(conn.getresponse(), 421)
        conn.close()
    for host in (f"localhost:{d.port}", f"127.0.0.1:{d.port}"):
        assert requests.get(d.url + "/jobs", headers={"Host": host}, timeout=10).status_code == 200


def test_finding10_second_serve_on_one_state_dir_exits_2_naming_the_pid(served):
    d = served
    before = d.get("/health").json()
    result = _serve(d.config_dir, d.state_dir)
    assert result.returncode == 2, result.stderr
    assert f"pid {d.pid}" in result.stderr and str(d.state_dir) in result.stderr, result.stderr
    after = d.get("/health").json()
    assert after["owner"] == before["owner"] and d.proc is not None and d.proc.poll() is None


@pytest.mark.parametrize("blank", ["   ", "\t"])
def test_finding10_whitespace_token_refused_at_start(tmp_path, blank):
    config = tmp_path / "config"
    write_config(config, [RUNNER], {"ci": simple_pipeline()})
    for listen in ("0.0.0.0:0", "127.0.0.1:0"):
        result = _serve(config, tmp_path / "state", {"NARWHAL_TOKEN": blank}, listen)
        assert result.returncode == 2, result.stderr
        assert "NARWHAL_TOKEN: the API token is empty or only whitespace" in result.stderr
    (tmp_path / "token").write_text(blank + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "narwhal", "serve", "--config", str(config), "--state", str(tmp_path / "state"),
         "--listen", "0.0.0.0:0", "--token-file", str(tmp_path / "token")],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "empty or only whitespace" in result.stderr, result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was opened


def test_finding5_slowloris_connections_are_dropped_and_health_answers(served):
    """More stalled half-sent requests than server threads: /health still answers, and every
    stalled socket is closed by the server (settings.http_timeout) rather than held for ever."""
    d = served
    stalled = []
    try:
        for _ in range(SERVER_THREADS + 6):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=30)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            stalled.append(s)
        r = requests.get(d.url + "/health", timeout=10)  # generous: the server drops the stalled ones
        assert r.status_code == 200 and r.json()["status"] == "ok"
        for s in stalled:  # each one ends with EOF (perhaps after a 408) within the socket's 30 s
            while s.recv(4096):
                pass
    finally:
        for s in stalled:
            s.close()
    assert requests.get(d.url + "/health", timeout=10).status_code == 200


def test_health_is_token_free_but_says_only_the_status_where_reads_need_the_token(dispatcher):
    """A load balancer's probe of the real server, with settings.read_token: 200 and the status,
    nothing about the node (host, pid, version, owner); the token shows the rest; /nodes needs it."""
    d = dispatcher([RUNNER], {"ci": simple_pipeline()}, settings={"read_token": True}, token="probe-token-1234")
    probe = requests.get(d.url + "/health", timeout=10)
    assert probe.status_code == 200 and probe.json() == {"status": "ok"}
    full = requests.get(d.url + "/health", headers=d.headers(), timeout=10).json()
    assert full["status"] == "ok" and full["node"]["pid"] == d.pid and "owner" in full
    assert "token" in _json_error(requests.get(d.url + "/nodes", timeout=10), 401)
    assert requests.get(d.url + "/nodes", headers=d.headers(), timeout=10).json()["self"] == full["node"]["id"]
