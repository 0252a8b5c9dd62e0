"""The API's HTTP boundary in process (WebTest): Host names, cross-site changes, body types,
JSON depth, the read token, blank tokens and the state directory lock.

Named after the findings of the "Trust boundaries" issue (docs/security.md maps them):
  3. a web page could drive the API cross-site (text/plain POST) and read it by DNS rebinding;
  10. deeply nested JSON was a 500; a whitespace-only token was accepted off loopback, then
      refused every change; a second ``narwhal serve`` on one state directory ran start-up
      recovery on the first one's jobs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import webtest

from narwhal.api import routes
from narwhal.api.app import Boundary, make_app
from narwhal.api.request import MAX_DEPTH, check_depth, split_host
from narwhal.api.server import Server, UsageError, read_token
from narwhal.config.loader import load_config
from narwhal.config.settings import HOOKS_PREFIX, Settings, parse_settings
from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.dispatch.statelock import LOCK_FILE, StateDirLocked, lock_holder, lock_state_dir
from narwhal.errors import BadRequest, ConfigError
from tests.test_api import COMMIT, INVENTORY, PIPELINE, TOKEN, assert_json_error, call

EVIL = "http://evil.example"
JSON = {"Content-Type": "application/json"}
MUTATIONS = [(m, p.replace("{job_id}", "1").replace("{name}", "local"))
             for m, p, _ in routes.ROUTES if m in ("POST", "PUT", "PATCH", "DELETE")]
READS = [p.replace("{job_id}", "1").replace("{name}", "local") for m, p, _ in routes.ROUTES if m == "GET"]


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    config = tmp_path / "config"
    (config / "pipelines").mkdir(parents=True)
    (config / "inventory.yaml").write_text(INVENTORY)
    (config / "pipelines" / "ci.yaml").write_text(PIPELINE)
    return config


@pytest.fixture
def dispatcher(config_dir: Path, tmp_path: Path) -> Iterator[Dispatcher]:
    """A real Dispatcher that is never started: requests are recorded, nothing runs."""
    d = Dispatcher(load_config(config_dir), tmp_path / "state")
    yield d
    d.stop()


def make(dispatcher: Dispatcher, **boundary: object) -> webtest.TestApp:
    token = boundary.pop("token", None)
    return webtest.TestApp(make_app(dispatcher, token=token, max_body=4096,  # type: ignore[arg-type]
                                    reload=lambda: None, boundary=Boundary(**boundary)))  # type: ignore[arg-type]


def assert_unchanged(dispatcher: Dispatcher) -> None:
    assert dispatcher.jobs(None, None, 50) == []
    runners = dispatcher.runners()
    assert [r["name"] for r in runners] == ["local"] and runners[0]["draining"] is False


# --- finding 3: cross-site changes --------------------------------------------------------


@pytest.mark.parametrize("method, path", MUTATIONS)
@pytest.mark.parametrize("headers", [
    {"Origin": EVIL},
    {"Origin": EVIL, **JSON},
    {"Origin": EVIL, "Content-Type": "text/plain"},
    {"Origin": "null"},  # a sandboxed frame or a file: page
    {"Origin": "http://localhost:3000"},  # another site on this machine: another origin
    {"Origin": "http://localhost.evil.example"},
    {"Origin": "garbage"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "cross-site", "Origin": "http://localhost"},
], ids=["evil", "evil-json", "evil-text", "null", "other-port", "lookalike", "garbage", "fetch-site",
        "fetch-site-lying-origin"])
def test_finding3_cross_site_change_refused(dispatcher, method, path, headers):
    """Every mutating route, with or without a body: a foreign Origin is a 403 before anything runs."""
    app = make(dispatcher)
    body = json.dumps(COMMIT).encode() if "Content-Type" in headers else b""
    r = call(app, method, path, body, headers)
    error = assert_json_error(r, 403)["error"]
    assert "cross-site" in error
    assert_unchanged(dispatcher)


def test_finding3_cross_site_post_refused_even_with_the_token(dispatcher):
    app = make(dispatcher, token=TOKEN)
    r = call(app, "POST", "/runner/local/drain", None, {"Origin": EVIL, "Authorization": f"Bearer {TOKEN}"})
    assert_json_error(r, 403)
    assert TOKEN not in r.text
    assert_unchanged(dispatcher)


@pytest.mark.parametrize("origin, host, public", [
    ("http://localhost", "localhost", ()),
    ("http://localhost", "localhost:80", ()),
    ("http://127.0.0.1:8080", "127.0.0.1:8080", ()),
    ("HTTP://LocalHost:8080", "localhost:8080", ()),
    ("http://[::1]:8080", "[::1]:8080", ()),
    ("https://ci.example.com", "127.0.0.1:8080", ("ci.example.com",)),  # behind a TLS proxy
    ("https://ci.example.com", "ci.example.com", ("ci.example.com:443",)),
])
def test_finding3_same_origin_change_allowed(dispatcher, origin, host, public):
    app = make(dispatcher, public_names=public)
    r = call(app, "POST", "/runner/local/drain", None, {"Origin": origin, "Host": host})
    assert r.status_int == 200, r.text
    assert r.json["draining"] is True
    assert call(app, "POST", "/runner/local/resume", None, {"Sec-Fetch-Site": "same-origin"}).status_int == 200


def test_finding3_public_name_port_must_match(dispatcher):
    app = make(dispatcher, public_names=("ci.example.com:8443",))
    r = call(app, "POST", "/runner/local/drain", None, {"Origin": "https://ci.example.com", "Host": "localhost"})
    assert_json_error(r, 403)
    r = call(app, "POST", "/runner/local/drain", None, {"Origin": "https://ci.example.com:8443", "Host": "localhost"})
    assert r.status_int == 200, r.text


@pytest.mark.parametrize("method, path", MUTATIONS)
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "text/json"])
def test_finding3_body_without_json_type_is_415(dispatcher, method, path, content_type):
    """What a page can send without a preflight: text/plain, forms, or no type at all.

    A webhook delivery says 401 first (no signature): its type is checked after that."""
    headers = {"Content-Type": content_type} if content_type else {}
    r = call(make(dispatcher), method, path, json.dumps(COMMIT).encode(), headers)
    if path.startswith(HOOKS_PREFIX):
        assert "signature" in assert_json_error(r, (401, 404))["error"] or r.status_int == 404
        return
    assert "Content-Type: application/json" in assert_json_error(r, 415)["error"]
    assert_unchanged(dispatcher)


def test_finding3_json_types_and_no_body_pass(dispatcher):
    app = make(dispatcher)
    assert call(app, "POST", "/runner/local/drain").status_int == 200
    assert call(app, "POST", "/runner/local/resume", b"{}", JSON).status_int == 200
    r = call(app, "POST", "/commit", json.dumps(COMMIT).encode(), {"Content-Type": "application/json; charset=utf-8"})
    assert_json_error(r, 400)  # past the boundary: a local path outside the allowed roots
    r = call(app, "POST", "/commit", json.dumps(COMMIT).encode(), {"Content-Type": "application/merge-patch+json"})
    assert_json_error(r, 400)


# --- finding 3: DNS rebinding (Host) -----------------------------------------------------


@pytest.mark.parametrize("path", READS)
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "localhost.evil.example",
                                  "127.0.0.1.nip.io", "EVIL.example.", "10.0.0.1"])
def test_finding3_rebinding_host_refused_on_reads(dispatcher, path, host):
    r = call(make(dispatcher, listen_host="127.0.0.1"), "GET", path, None, {"Host": host})
    error = assert_json_error(r, 421)["error"]
    assert "public_names" in error


@pytest.mark.parametrize("method, path", MUTATIONS)
def test_finding3_rebinding_host_refused_on_changes(dispatcher, method, path):
    r = call(make(dispatcher, listen_host="127.0.0.1"), method, path, None, {"Host": "evil.example"})
    assert_json_error(r, 421)
    assert_unchanged(dispatcher)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:8080", "localhost.", "127.0.0.1", "127.5.6.7:80",
                                  "[::1]", "[::1]:8080", "ci.example.com", "CI.Example.com:9999",
                                  "build:8443", "build", "192.168.1.5:8080"])
def test_finding3_our_names_are_answered(dispatcher, host):
    app = make(dispatcher, listen_host="192.168.1.5", public_names=("ci.example.com", "build:8443"))
    r = call(app, "GET", "/health", None, {"Host": host})
    assert r.status_int == 200, r.text


@pytest.mark.parametrize("host, status", [("build:8444", 421), ("192.168.1.6", 421),
                                          ("a b", 400), ("::1", 400), ("[::1", 400), ("x:port", 400),
                                          ("x:123456", 400), ("h\u00e9", 400)])
def test_finding3_other_names_are_refused(dispatcher, host, status):
    app = make(dispatcher, listen_host="192.168.1.5", public_names=("ci.example.com", "build:8443"))
    assert_json_error(call(app, "GET", "/health", None, {"Host": host}), status)


def test_finding3_wildcard_bind_answers_addresses_not_names(dispatcher):
    """Bound to 0.0.0.0, any address is ours; a name still has to be a public name."""
    app = make(dispatcher, listen_host="0.0.0.0")
    assert call(app, "GET", "/health", None, {"Host": "10.1.2.3:8080"}).status_int == 200
    assert_json_error(call(app, "GET", "/health", None, {"Host": "evil.example:8080"}), 421)


def test_split_host():
    assert split_host("LocalHost:8080") == ("localhost", 8080)
    assert split_host("[::1]:80") == ("[::1]", 80)
    assert split_host("example.com.") == ("example.com", None)
    for bad in ("", ":80", "a:b", "[::1]x", "::1", "a b", "x:" + "9" * 9):
        assert split_host(bad) is None, bad


# --- reads behind the token ----------------------------------------------------------------


@pytest.mark.parametrize("path", [p for p in READS if p != "/health"])
def test_read_token_setting_makes_reads_need_the_token(dispatcher, path):
    app = make(dispatcher, token=TOKEN, read_token=True)
    r = assert_json_error(call(app, "GET", path), 401)
    assert TOKEN not in json.dumps(r)
    r = call(app, "GET", path, None, {"Authorization": f"Bearer {TOKEN}"})
    # /jobs/1 does not exist, /events is the front server's (503 from the app): past the guard
    assert r.status_int in (200, 404, 503), r.text


def test_read_token_leaves_health_open_and_is_off_by_default(dispatcher):
    assert call(make(dispatcher, token=TOKEN, read_token=True), "GET", "/health").status_int == 200
    assert call(make(dispatcher, token=TOKEN), "GET", "/jobs").status_int == 200


DETAILS = ("version", "uptime", "queue", "runners", "owner", "node")


def test_health_without_the_read_token_is_the_status_alone(dispatcher):
    """A load balancer probes /health without a token; where reads need one, that probe learns
    whether the node is up and nothing else: not its host and pid, its version, its queue, the
    owner label of its containers, nor (when the store is away) the database's address."""
    app = make(dispatcher, token=TOKEN, read_token=True)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Cookie": "narwhal_session=x"}):
        r = call(app, "GET", "/health", None, headers)
        assert r.status_int == 200 and r.json == {"status": "ok"}, headers
        assert dispatcher.node.host not in r.text and dispatcher.store.owner_id not in r.text
    full = call(app, "GET", "/health", None, {"Authorization": f"Bearer {TOKEN}"}).json
    assert full["status"] == "ok" and all(key in full for key in DETAILS)
    assert full["node"]["host"] == dispatcher.node.host
    # reads open (no read_token, or no token at all): the details are as open as /nodes
    for open_app in (make(dispatcher, token=TOKEN), make(dispatcher)):
        assert all(key in call(open_app, "GET", "/health").json for key in DETAILS)
    # /nodes (hosts, pids) is a read like any: behind the token
    assert_json_error(call(app, "GET", "/nodes"), 401)


# --- finding 10: nesting ------------------------------------------------------------------


def test_finding10_deep_json_is_a_400_at_an_explicit_depth(dispatcher):
    app = make(dispatcher)
    ok = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert "expected a JSON object" in assert_json_error(call(app, "POST", "/commit", ok, JSON), 400)["error"]
    for deep in (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), b'{"a":' * 800, b"[" * 4000):
        error = assert_json_error(call(app, "POST", "/commit", deep, JSON), 400)["error"]
        assert f"deeper than {MAX_DEPTH}" in error


def test_finding10_depth_check_skips_strings():
    check_depth(b'{"repo": "' + b"[{" * 1000 + b'", "x": "\\"[[[["}')
    check_depth(b'"\\"' + b"[" * 1000)  # an unclosed string: the parser reports it
    with pytest.raises(BadRequest):
        check_depth(b'["]", ' + b"[" * 32 + b"]" * 32 + b"]")
    check_depth(b'"\\\\' * 200_000)  # escapes galore: one linear pass


# --- settings ----------------------------------------------------------------------------


def test_boundary_settings_parse():
    s = parse_settings({"public_names": ["CI.example.com", "ci.example.com:8443", "[::1]:80"],
                        "read_token": True, "http_timeout": "5s"})
    assert s.public_names == ("ci.example.com", "ci.example.com:8443", "[::1]:80")
    assert s.read_token is True and s.http_timeout == 5
    assert Settings().public_names == () and Settings().read_token is False and Settings().http_timeout == 10
    for bad in ({"public_names": "ci.example.com"}, {"public_names": ["a b"]}, {"public_names": ["x:0"]},
                {"read_token": "yes"}, {"http_timeout": "soon"}):
        with pytest.raises(ConfigError):
            parse_settings(bad)


# --- finding 10: blank tokens ---------------------------------------------------------------


@pytest.mark.parametrize("blank", ["", " ", "   \t", "\n"])
def test_finding10_blank_token_refused_at_start(tmp_path, monkeypatch, blank):
    monkeypatch.setenv("NARWHAL_TOKEN", blank)
    with pytest.raises(UsageError, match="NARWHAL_TOKEN: the API token is empty or only whitespace"):
        read_token(None)
    token_file = tmp_path / "token"
    token_file.write_text(blank)
    with pytest.raises(UsageError, match="empty or only whitespace"):
        read_token(str(token_file))


def test_finding10_tokens_that_are_read(tmp_path, monkeypatch):
    monkeypatch.delenv("NARWHAL_TOKEN", raising=False)
    assert read_token(None) is None
    monkeypatch.setenv("NARWHAL_TOKEN", " s3cret\n")
    assert read_token(None) == "s3cret"
    (tmp_path / "token").write_text("from-file\n")
    assert read_token(str(tmp_path / "token")) == "from-file"
    (tmp_path / "bad").write_text("caf\u00e9")
    with pytest.raises(UsageError, match="printable ASCII") as info:
        read_token(str(tmp_path / "bad"))
    assert "caf" not in str(info.value)


def test_finding10_server_refuses_blank_token_off_loopback(config_dir, tmp_path):
    with pytest.raises(UsageError, match="empty or only whitespace"):
        Server(str(config_dir), str(tmp_path / "state"), "0.0.0.0:0", token="   ")
    with pytest.raises(UsageError, match="needs an API token"):
        Server(str(config_dir), str(tmp_path / "state"), "0.0.0.0:0", token=None)
    assert not (tmp_path / "state").exists()  # refused before the state directory is touched


def test_read_token_setting_needs_a_token(config_dir, tmp_path):
    (config_dir / "inventory.yaml").write_text(INVENTORY + "settings:\n  read_token: true\n")
    with pytest.raises(UsageError, match="read_token"):
        Server(str(config_dir), str(tmp_path / "state"), "127.0.0.1:0")


# --- finding 10: one dispatcher per state directory -----------------------------------------


def test_finding10_state_lock_is_exclusive_and_names_the_holder(tmp_path):
    state = tmp_path / "state"
    lock = lock_state_dir(state)
    assert lock_holder(state) == os.getpid()
    with pytest.raises(StateDirLocked, match=f"pid {os.getpid()}"):
        lock_state_dir(state)
    lock.release()
    lock_state_dir(state).release()  # free again


def test_finding10_second_server_on_one_state_dir_refused_before_the_store(config_dir, tmp_path, monkeypatch):
    state = tmp_path / "state"
    first = Server(str(config_dir), str(state), "127.0.0.1:0")
    try:
        opened: list[Path] = []
        monkeypatch.setattr("narwhal.api.server.Dispatcher", lambda config, path: opened.append(path))
        with pytest.raises(UsageError, match=f"in use by another narwhal serve \\(pid {os.getpid()}\\)"):
            Server(str(config_dir), str(state), "127.0.0.1:0")
        assert opened == []  # the store was never opened
        assert (state / LOCK_FILE).read_text().strip() == str(os.getpid())
    finally:
        first.dispatcher.stop()
        first.state_lock.release()


def test_cheroot_timeout_comes_from_the_setting(config_dir, tmp_path):
    (config_dir / "inventory.yaml").write_text(INVENTORY + "settings:\n  http_timeout: 3\n")
    server = Server(str(config_dir), str(tmp_path / "state"), "127.0.0.1:0")
    try:
        assert server.httpd.timeout == 3
    finally:
        server.dispatcher.stop()
        server.state_lock.release()
