"""The REST API in process (WebTest against make_app) with a real Dispatcher that is never started.

The dispatcher's scheduler does not run, so nothing needs Docker: jobs are recorded and stay
queued. Every endpoint's errors are checked for their shape: a 4xx status and a JSON body
``{"error": "..."}``, never a traceback or an HTML page.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import webtest

from narwhal.api import routes
from narwhal.api.app import Boundary, bottle_path, make_app
from narwhal.api.openapi import PATHS
from narwhal.cli.gitrepo import add_commit, make_git_repo
from narwhal.config.loader import load_config
from narwhal.config.settings import HOOKS_PREFIX
from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.errors import BadRequest
from narwhal.job import Origin

MAX_BODY = 4096
TOKEN = "s3cret"
INVENTORY = "runners:\n  - name: local\n    transport: local\n    labels: [linux]\n"
PIPELINE = """\
repo: "*"
image: narwhal-test/busybox:latest
labels: [linux]
steps:
  - name: hello
    run: echo hello
"""


@pytest.fixture
def dispatcher(tmp_path: Path) -> Iterator[Dispatcher]:
    config = tmp_path / "config"
    (config / "pipelines").mkdir(parents=True)
    (config / "inventory.yaml").write_text(INVENTORY + f"settings:\n  local_roots: [{str(tmp_path)!r}, /nowhere]\n")
    (config / "pipelines" / "ci.yaml").write_text(PIPELINE)
    d = Dispatcher(load_config(config), tmp_path / "state")
    yield d
    d.stop()


@pytest.fixture
def repo(tmp_path: Path) -> tuple[str, str]:
    return make_git_repo(str(tmp_path / "repo"))


@pytest.fixture
def api(dispatcher: Dispatcher) -> webtest.TestApp:
    return webtest.TestApp(make_app(dispatcher, max_body=MAX_BODY, streams=True))


@pytest.fixture
def guarded(dispatcher: Dispatcher) -> webtest.TestApp:
    return webtest.TestApp(make_app(dispatcher, token=TOKEN, max_body=MAX_BODY))


def call(app: webtest.TestApp, method: str, path: str, body: bytes | dict | list | None = None,
         headers: dict | None = None) -> webtest.TestResponse:
    headers = dict(headers or {})
    raw = body
    if isinstance(body, (dict, list)):
        raw = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    return app.request(path, method=method, body=raw or b"", headers=headers, expect_errors=True)


def assert_json_error(response: webtest.TestResponse, status: int | tuple[int, ...]) -> dict:
    """A 4xx with ``{"error": "<non-empty text>"}``, no traceback, no HTML."""
    assert response.status_int in (status if isinstance(status, tuple) else (status,)), \
        (response.status, response.text)
    assert response.content_type == "application/json", response.headers
    text = response.body.decode()
    assert "Traceback" not in text and "<html" not in text.lower() and "<!DOCTYPE" not in text
    body = json.loads(text)
    assert isinstance(body.get("error"), str) and body["error"], body
    return body


# --- the route table --------------------------------------------------------------------


def test_route_table_is_the_openapi_document():
    table = {(method.lower(), path) for method, path, _ in routes.ROUTES}
    assert table == {(method, path) for path, ops in PATHS.items() for method in ops}
    assert len(table) == len(routes.ROUTES)


def test_make_app_mounts_every_route_once():
    app = make_app(object())
    mounted = sorted((r.method, r.rule) for r in app.routes)
    assert mounted == sorted((m, bottle_path(p)) for m, p, _ in routes.ROUTES)


def test_handlers_are_module_level_functions():
    for _, _, handler in routes.ROUTES:
        assert handler.__closure__ is None, handler
        assert getattr(routes, handler.__name__) is handler


# --- what works ----------------------------------------------------------------------------


def test_submit_list_cancel_retry_and_log(api, dispatcher, repo):
    path, sha = repo
    r = call(api, "POST", "/commit", {"repo": path, "commit": sha, "branch": "main"})
    assert r.status_int == 202, r.text
    job = r.json["jobs"][0]
    assert job["url"] == f"/jobs/{job['id']}" and job["status"] == "queued"
    again = call(api, "POST", "/commit", {"repo": path, "commit": sha, "branch": "main"})
    assert again.status_int == 200 and [j["created"] for j in again.json["jobs"]] == [False]
    assert job["created"] is True
    assert [j["id"] for j in call(api, "GET", "/jobs?latest=1").json["jobs"]] == [job["id"]]
    assert [c["commit"] for c in call(api, "GET", "/commit").json["commits"]] == [sha]
    assert [j["id"] for j in call(api, "GET", "/jobs?status=queued").json["jobs"]] == [job["id"]]
    detail = call(api, "GET", f"/jobs/{job['id']}").json
    assert detail["waiting"] and detail["url"] == job["url"]

    assert call(api, "POST", f"/jobs/{job['id']}/cancel").json["status"] == "cancelled"
    dispatcher.store.append_log(job["id"], 1, ["one", "two\rtwo"])
    plain = call(api, "GET", f"/jobs/{job['id']}/log")
    assert plain.content_type == "text/plain" and plain.text == "one\ntwo\rtwo\n"
    [times] = call(api, "GET", f"/jobs/{job['id']}/log/times").json["times"]
    assert (times["first"], times["lines"]) == (1, 2) and times["at"] > 0
    assert call(api, "GET", f"/jobs/{job['id']}/log/times?after=2").json == {"times": []}
    events = call(api, "GET", f"/jobs/{job['id']}/log?follow=1")
    assert events.content_type == "text/event-stream"
    assert "id: 1\ndata: one\n\n" in events.text and "id: 2\ndata: twotwo\n\n" in events.text
    assert 'event: end\ndata: {"status": "cancelled"' in events.text
    resumed = call(api, "GET", f"/jobs/{job['id']}/log", headers={"Accept": "text/event-stream",
                                                                   "Last-Event-ID": "1"})
    assert "data: one" not in resumed.text and "id: 2" in resumed.text

    retried = call(api, "POST", f"/jobs/{job['id']}/retry")
    assert retried.status_int == 202 and retried.json["status"] == "queued"


def test_a_branch_without_a_commit_builds_its_head(api, tmp_path):
    path, first = make_git_repo(str(tmp_path / "heads"))
    r = call(api, "POST", "/commit", {"repo": path, "branch": "main"})
    assert r.status_int == 202, r.text
    assert r.json["commit"] == {"repo": path, "commit": first, "branch": "main"}
    job = r.json["jobs"][0]
    assert call(api, "GET", f"/jobs/{job['id']}").json["commit"] == first
    again = call(api, "POST", "/commit", {"repo": path, "branch": "main"})  # the same head: the same job
    assert again.status_int == 200 and again.json["jobs"] == r.json["jobs"]
    newer = add_commit(path, {"new.txt": "new\n"})
    moved = call(api, "POST", "/commit", {"repo": path, "branch": "main"})
    assert moved.status_int == 202 and moved.json["commit"]["commit"] == newer
    assert moved.json["jobs"][0]["id"] != job["id"]
    assert call(api, "GET", f"/jobs/{moved.json['jobs'][0]['id']}").json["commit"] == newer
    missing = assert_json_error(call(api, "POST", "/commit", {"repo": path, "branch": "nope"}), 422)
    assert missing["error"] == f"no branch or tag 'nope' in {path}"


def test_read_endpoints(api):
    assert [r["name"] for r in call(api, "GET", "/runner").json["runners"]] == ["local"]
    assert call(api, "GET", "/stats").json["queue"] == {"length": 0}
    assert call(api, "GET", "/health").json["status"] == "ok"
    assert call(api, "GET", "/forges").json == {"forges": []}
    assert call(api, "GET", "/openapi.json").json["paths"] == PATHS
    assert call(api, "POST", "/runner/local/drain").json["draining"] is True
    assert call(api, "POST", "/runner/local/resume").json["draining"] is False


def test_forges_show_their_statuses_and_never_a_token(tmp_path, monkeypatch):
    token = "glpat-ApiT3stT0kenValue"
    monkeypatch.setenv("API_TEST_FORGE_TOKEN", token)
    monkeypatch.setenv("API_TEST_HOOK", "hook-secret-value")
    config = tmp_path / "config"
    (config / "pipelines").mkdir(parents=True)
    (config / "inventory.yaml").write_text(
        INVENTORY + "secrets:\n  FORGE_TOKEN: {env: API_TEST_FORGE_TOKEN}\n  HOOK: {env: API_TEST_HOOK}\n"
        "forges:\n  - {name: lab, kind: gitlab, url: 'https://gitlab.example', token: FORGE_TOKEN, webhook_secret: HOOK}\n"
        "  - {name: hub, kind: github, url: 'https://api.github.com', webhook_secret: HOOK}\n")
    (config / "pipelines" / "ci.yaml").write_text(PIPELINE)
    d = Dispatcher(load_config(config), tmp_path / "state")
    try:
        api = webtest.TestApp(make_app(d))
        assert call(api, "GET", "/forges").json == {"forges": [
            {"name": "lab", "kind": "gitlab", "url": "https://gitlab.example", "sends_statuses": True,
             "pending": 0, "delivered": 0, "failed": 0, "last_delivered_at": None, "last_error": None,
             "last_error_at": None},
            {"name": "hub", "kind": "github", "url": "https://api.github.com", "sends_statuses": False,
             "pending": 0, "delivered": 0, "failed": 0, "last_delivered_at": None, "last_error": None,
             "last_error_at": None}]}
        origin = Origin(forge="lab")
        d.store.create_jobs("https://gitlab.example/g/app.git", "a" * 40, "main", ["ci"], origin)
        d.store.create_jobs("https://gitlab.example/g/app.git", "b" * 40, "main", ["ci"], Origin(forge="old"))
        head = d.store.outbox_heads()[0]
        d.store.outbox_failed(head.id, "HTTP 404: 404 Project Not Found")
        forges = call(api, "GET", "/forges").json["forges"]
        assert [(f["name"], f["kind"], f["pending"], f["failed"], f["last_error"]) for f in forges] == [
            ("lab", "gitlab", 0, 1, "HTTP 404: 404 Project Not Found"), ("hub", "github", 0, 0, None),
            ("old", None, 1, 0, None)]
        assert forges[0]["last_error_at"] is not None
        text = call(api, "GET", "/forges").text
        assert token not in text and "FORGE_TOKEN" not in text and "HOOK" not in text
    finally:
        d.stop()


def test_reload_calls_the_hook(dispatcher):
    calls = []
    app = webtest.TestApp(make_app(dispatcher, reload=lambda: calls.append(1)))
    assert call(app, "POST", "/reload").json == {"reloaded": True} and calls == [1]


# --- every endpoint's errors -----------------------------------------------------------------

COMMIT = {"repo": "/nowhere", "commit": "0" * 40}
JSON = {"Content-Type": "application/json"}
ERRORS: list[tuple[str, str, Any, dict | None, int | tuple[int, ...]]] = [
    # POST /commit: body problems
    ("POST", "/commit", b"{not json", JSON, 400),
    ("POST", "/commit", b"{not json", {}, 415),  # a body without a type: a browser sends that unasked
    ("POST", "/commit", b"", {}, 400),
    ("POST", "/commit", b"   ", JSON, 400),
    ("POST", "/commit", [1, 2], None, 400),
    ("POST", "/commit", b'"text"', JSON, 400),
    ("POST", "/commit", b"null", JSON, 400),
    ("POST", "/commit", {**COMMIT, "extra": 1}, None, 400),
    ("POST", "/commit", {"repo": "/nowhere"}, None, 400),
    ("POST", "/commit", {"commit": "0" * 40}, None, 400),
    ("POST", "/commit", {"repo": 5, "commit": "0" * 40}, None, 400),
    ("POST", "/commit", {"repo": "/nowhere", "commit": 12}, None, 400),
    ("POST", "/commit", {"repo": "/nowhere", "commit": "abc"}, None, 400),
    ("POST", "/commit", {**COMMIT, "branch": 7}, None, 400),
    ("POST", "/commit", {**COMMIT, "branch": "-x"}, None, 400),
    ("POST", "/commit", {**COMMIT, "branch": "main\n"}, None, 400),
    ("POST", "/commit", {"repo": "/nowhere", "commit": None, "branch": "main"}, None, 400),  # given: checked
    ("POST", "/commit", {"repo": "/nowhere", "commit": "", "branch": "main"}, None, 400),
    # POST /commit with a branch (or tag) and no commit: its head is built
    ("POST", "/commit", {"repo": "/nowhere", "branch": None}, None, 400),
    ("POST", "/commit", {"repo": "/nowhere", "branch": 7}, None, 400),
    ("POST", "/commit", {"repo": "/nowhere", "branch": "--upload-pack=touch /tmp/x"}, None, 400),
    ("POST", "/commit", {"repo": "/nowhere", "branch": "main^"}, None, 400),
    ("POST", "/commit", {"repo": "/nowhere", "branch": "HEAD@{1}"}, None, 400),
    ("POST", "/commit", {"repo": "/nowhere", "branch": "a..b"}, None, 400),
    ("POST", "/commit", {"repo": "/nowhere", "branch": "main\n"}, None, 400),
    ("POST", "/commit", {"repo": 5, "branch": "main"}, None, 400),
    ("POST", "/commit", {"repo": "/elsewhere", "branch": "main"}, None, 400),  # outside settings.local_roots
    ("POST", "/commit", {"repo": "http://u:p@h/x.git", "branch": "main"}, None, 400),
    ("POST", "/commit", {"repo": "https://not-a-fetch-host.example/x.git", "branch": "main"}, None, 400),
    ("POST", "/commit", {"repo": "/nowhere", "branch": "main"}, None, 422),  # no such repository
    ("POST", "/commit", {"repo": "/nowhere", "branch": "main", "tag": "v1"}, None, 400),
    ("POST", "/commit", {"repo": ["a"], "commit": {"b": 1}}, None, 400),
    ("POST", "/commit", {"repo": "x" * 3000, "commit": "0" * 40}, None, 400),
    ("POST", "/commit", COMMIT, None, 422),  # no such repository
    ("POST", "/commit", {**COMMIT, "repo": "/elsewhere"}, None, 400),  # outside settings.local_roots
    ("POST", "/commit", {**COMMIT, "repo": "/nowhere/../etc"}, None, 400),  # dot segments
    ("POST", "/commit", {**COMMIT, "repo": "http://u:p@h/x.git"}, None, 400),  # credentials
    ("POST", "/commit", json.dumps(COMMIT).encode(), {"Content-Type": "text/plain"}, 415),
    ("POST", "/commit", b"repo=a&commit=b", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("POST", "/commit", b"{" + b" " * MAX_BODY + b"}", {"Content-Type": "application/json"}, 413),
    ("POST", "/commit", b"\xff\xfe\xfd", JSON, 400),  # not UTF-8
    ("POST", "/commit", b'{"repo": "\xff"}', JSON, 400),
    ("POST", "/commit", b"[" * 2000 + b"]" * 2000, JSON, 400),  # nested past the parser's depth
    ("POST", "/commit", b"[" * 33 + b"]" * 33, JSON, 400),  # past MAX_DEPTH (32)
    ("DELETE", "/commit", None, None, 405),
    # GET /commit
    ("GET", "/commit?limit=0", None, None, 400),
    ("GET", "/commit?limit=-5", None, None, 400),
    ("GET", "/commit?limit=abc", None, None, 400),
    ("GET", "/commit?limit=1001", None, None, 400),
    ("GET", "/commit?limit=" + "9" * 5000, None, None, 400),
    ("GET", "/commit?repo=%ff", None, None, 400),
    ("GET", "/commit?repo=" + "r" * 3000, None, None, 400),
    # /jobs
    ("GET", "/jobs?status=weird", None, None, 400),
    ("GET", "/jobs?limit=x", None, None, 400),
    ("GET", "/jobs?limit=%C2%B2", None, None, 400),
    ("GET", "/jobs?limit=1.5", None, None, 400),
    ("GET", "/jobs?status=%ff", None, None, 400),
    ("PUT", "/jobs", None, None, 405),
    # /jobs/{job_id} and below
    ("GET", "/jobs/999999", None, None, 404),
    ("GET", "/jobs/abc", None, None, 404),
    ("GET", "/jobs/0", None, None, 404),
    ("GET", "/jobs/-1", None, None, 404),
    ("GET", "/jobs/99999999999999999999", None, None, 404),
    ("GET", "/jobs/" + "9" * 5000, None, None, 404),
    ("GET", "/jobs/%C2%B2", None, None, 404),  # '²' is a digit to str.isdigit
    ("GET", "/jobs/%D9%A3", None, None, 404),  # so is Arabic-Indic three, which int() reads as 3
    ("GET", "/jobs/1", None, None, 404),
    ("DELETE", "/jobs/1", None, None, 405),
    ("POST", "/jobs/1/cancel", None, None, 404),
    ("POST", "/jobs/abc/cancel", None, None, 404),
    ("GET", "/jobs/1/cancel", None, None, 405),
    ("POST", "/jobs/1/retry", None, None, 404),
    ("POST", "/jobs/99999999999999999999/retry", None, None, 404),
    ("GET", "/jobs/1/retry", None, None, 405),
    ("GET", "/jobs/1/log", None, None, 404),
    ("GET", "/jobs/x/log?follow=1", None, None, 404),
    ("POST", "/jobs/1/log", None, None, 405),
    # /runner
    ("POST", "/runner", {"name": "x", "port": "ssh"}, None, 422),
    ("POST", "/runner", {"name": "x", "colour": "red"}, None, 422),
    ("POST", "/runner", {"host": "h"}, None, 422),
    ("POST", "/runner", {"name": "local"}, None, 409),
    ("POST", "/runner", [1], None, 400),
    ("POST", "/runner", b"{bad", JSON, 400),
    ("POST", "/runner", b"", {}, 400),
    ("POST", "/runner", b"name=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("POST", "/runner", b"[" * (MAX_BODY + 1), {"Content-Type": "application/json"}, 413),
    ("PATCH", "/runner", None, None, 405),
    ("DELETE", "/runner/nobody", None, None, 404),
    ("DELETE", "/runner/local", None, None, 409),  # an inventory runner
    ("GET", "/runner/local", None, None, 405),
    ("POST", "/runner/nobody/drain", None, None, 404),
    ("GET", "/runner/local/drain", None, None, 405),
    ("POST", "/runner/nobody/resume", None, None, 404),
    ("DELETE", "/runner/local/resume", None, None, 405),
    # the event stream
    ("GET", "/events?after=x", None, None, 400),
    ("GET", "/events", None, {"Last-Event-ID": "-1"}, 400),
    ("POST", "/events", None, None, 405),
    # the rest
    ("GET", "/jobs?latest=1&status=failed", None, None, 400),
    ("GET", "/jobs/999/log/times", None, None, 404),
    ("GET", "/jobs/1/log/times?after=-1", None, None, (400, 404)),
    ("POST", "/jobs/1/log/times", None, None, 405),
    ("GET", "/jobs/999/artifacts", None, None, 404),
    ("GET", "/jobs/x/artifacts", None, None, 404),
    ("POST", "/jobs/1/artifacts", None, None, 405),
    ("GET", "/jobs/999/artifacts/report.xml", None, None, 404),
    ("GET", "/jobs/99999999999999999999/artifacts/a", None, None, 404),
    ("DELETE", "/jobs/1/artifacts/a", None, None, 405),
    ("GET", "/jobs?latest=yes", None, None, 400),
    ("POST", "/stats", None, None, 405),
    ("POST", "/secrets", None, None, 405),
    ("POST", "/hooks/nobody", b"{}", JSON, 404),
    ("GET", "/hooks/nobody", None, None, 405),
    ("DELETE", "/secrets", None, None, 405),
    ("POST", "/forges", None, None, 405),
    ("DELETE", "/forges", None, None, 405),
    ("POST", "/nodes", None, None, 405),
    ("DELETE", "/nodes", None, None, 405),
    ("DELETE", "/health", None, None, 405),
    ("POST", "/reload", None, None, 404),  # reloading not enabled
    ("GET", "/reload", None, None, 405),
    ("POST", "/openapi.json", None, None, 405),
    # nothing there
    ("GET", "/nope", None, None, 404),
    ("GET", "/", None, None, 404),
    ("GET", "/jobs/1/log/extra", None, None, 404),
    ("POST", "/%ff", None, None, (400, 404)),  # a path that is not UTF-8
    ("GET", "/jobs/%ff", None, None, (400, 404)),
]


@pytest.mark.parametrize("method, path, body, headers, status", ERRORS,
                         ids=[f"{m} {p[:40]} {s}" for m, p, _, _, s in ERRORS])
def test_errors_are_json(api, method, path, body, headers, status):
    assert_json_error(call(api, method, path, body, headers), status)


def _template(path: str) -> str:
    """``/jobs/1/log?follow=1`` -> ``/jobs/{job_id}/log``: the route a case exercises."""
    path = path.split("?")[0]
    for _, template, _ in routes.ROUTES:
        parts, given = template.split("/"), path.split("/")
        if len(parts) == len(given) and all(p.startswith("{") or p == g for p, g in zip(parts, given, strict=True)):
            return template
    return path


def test_every_route_has_error_cases():
    tried = {_template(path) for _, path, _, _, _ in ERRORS}
    assert {path for _, path, _ in routes.ROUTES} <= tried


def test_log_stream_rejects_bad_resume_points(api, dispatcher, repo):
    path, sha = repo
    job = call(api, "POST", "/commit", {"repo": path, "commit": sha}).json["jobs"][0]["id"]
    for bad in ("abc", "-1", "1.5", "9" * 40, "\u00b2"):
        r = call(api, "GET", f"/jobs/{job}/log", headers={"Accept": "text/event-stream", "Last-Event-ID": bad})
        assert_json_error(r, 400)
    assert_json_error(call(api, "GET", f"/jobs/{job}/log?follow=1&after=x"), 400)
    assert_json_error(call(api, "GET", f"/jobs/{job}/log", headers={"Accept": "text/\xff"}), 400)


def test_conflicts_on_real_jobs(api, repo):
    path, sha = repo
    job = call(api, "POST", "/commit", {"repo": path, "commit": sha}).json["jobs"][0]["id"]
    assert_json_error(call(api, "POST", f"/jobs/{job}/retry"), 409)  # still queued
    assert_json_error(call(api, "POST", "/commit", {"repo": path, "commit": "1" * 40}), 422)
    assert_json_error(call(api, "POST", "/commit", {"repo": path, "commit": sha, "branch": "a..b"}), 400)


def test_a_bug_is_a_json_500_without_details(dispatcher, monkeypatch):
    def boom() -> dict:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(dispatcher, "stats", boom)
    r = call(webtest.TestApp(make_app(dispatcher)), "GET", "/stats")
    assert r.status_int == 500 and r.content_type == "application/json"
    assert "secret" not in r.text and r.json["error"].startswith("internal error")


# --- the token ---------------------------------------------------------------------------


def _example_path(template: str) -> str:
    return template.replace("{job_id}", "1").replace("{name}", "local")


# Webhook deliveries carry the forge's signature instead of the token (tests/test_hooks.py).
MUTATIONS = [(m, p) for m, p, _ in routes.ROUTES if m in ("POST", "DELETE") and not p.startswith(HOOKS_PREFIX)]


@pytest.mark.parametrize("method, template", MUTATIONS)
@pytest.mark.parametrize("authorization", [None, "Bearer nope", "Basic czNjcmV0", "Bearer", f"bearer  {TOKEN}x",
                                           "Bearer \u00e9"])
def test_mutations_need_the_token(guarded, method, template, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    body = assert_json_error(call(guarded, method, _example_path(template), COMMIT, headers), 401)
    assert "token" in body["error"]


def test_the_token_lets_mutations_through_and_reads_need_none(guarded, dispatcher):
    assert call(guarded, "GET", "/jobs").json == {"jobs": []}
    assert call(guarded, "GET", "/runner").status_int == 200
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert call(guarded, "POST", "/runner/local/drain", headers=auth).json["draining"] is True
    assert_json_error(call(guarded, "POST", "/commit", COMMIT, auth), 422)  # past the guard
    assert_json_error(call(guarded, "POST", "/jobs/1/cancel", headers=auth), 404)
    assert dispatcher.runners()[0]["draining"] is True


# --- finding 7: narwhal's own log lines cannot be counterfeited -------------------------------


def test_finding7_log_marks_narwhal_lines_and_counterfeits(api, dispatcher, repo):
    path, sha = repo
    job = call(api, "POST", "/commit", {"repo": path, "commit": sha}).json["jobs"][0]["id"]
    call(api, "POST", f"/jobs/{job}/cancel")
    store = dispatcher.store
    store.append_log(job, 1, ["building", "[narwhal] step build: exit 0"])  # the step's own print
    store.append_log(job, 1, ["step build: exit 1 (0.5s)"], "narwhal")
    store.append_log(job, 1, ["done"])

    plain = call(api, "GET", f"/jobs/{job}/log").text
    assert plain == ("building\n[step] [narwhal] step build: exit 0\n"
                     "[narwhal] step build: exit 1 (0.5s)\ndone\n")
    assert [line for line in plain.splitlines() if line.startswith("[narwhal]")] == \
        ["[narwhal] step build: exit 1 (0.5s)"]

    events = call(api, "GET", f"/jobs/{job}/log?follow=1").text
    assert events.count("event: narwhal\n") == 1
    assert "event: narwhal\nid: 3\ndata: step build: exit 1 (0.5s)\n\n" in events
    # step lines keep their shape byte for byte: no event type, their text unchanged
    assert "\n\nid: 1\ndata: building\n\nid: 2\ndata: [narwhal] step build: exit 0\n\nevent: narwhal" in events
    assert "\n\nid: 4\ndata: done\n\n" in events
    resumed = call(api, "GET", f"/jobs/{job}/log", headers={"Accept": "text/event-stream", "Last-Event-ID": "2"})
    assert resumed.text.startswith("retry: 1000\n\nevent: narwhal\nid: 3\n")


def test_finding8_a_gitfile_under_the_root_naming_another_repository_is_a_400(dispatcher, tmp_path):
    from narwhal.cli.gitrepo import make_git_repo

    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    _, sha = make_git_repo(str(outside))
    inside = tmp_path / "gitfile"
    inside.mkdir()
    (inside / ".git").write_text(f"gitdir: {outside / '.git'}\n")
    with pytest.raises(BadRequest, match="git directory is outside the allowed local roots"):
        dispatcher.submit(str(inside), sha, "main")


def test_health_and_nodes_say_which_dispatcher_answers(api, dispatcher):
    health = call(api, "GET", "/health").json
    assert health["node"]["id"] == dispatcher.node.id and health["node"]["holds_database"] is False  # not started
    dispatcher.node.register()
    node = call(api, "GET", "/health").json["node"]
    assert (node["store"], node["holds_database"], node["pid"]) == ("sqlite", True, os.getpid())
    nodes = call(api, "GET", "/nodes").json
    assert nodes["self"] == dispatcher.node.id
    assert [(n["id"], n["alive"], n["running"]) for n in nodes["nodes"]] == [(dispatcher.node.id, True, 0)]
# --- artifacts: served by manifest, never by path ------------------------------------------


def _kept(dispatcher: Dispatcher, repo: tuple[str, str], files: dict[str, bytes], expire: float | None = None) -> int:
    import io

    path, sha = repo
    (job, _), = dispatcher.store.create_jobs(path, sha, "main", ["ci"])
    col = dispatcher.artifact_store.collection(job.id, 1, expire)
    for name, data in files.items():
        col.put(name, len(data), io.BytesIO(data).read)
    col.commit()
    return job.id


def test_artifacts_list_download_range_and_attacks(api, dispatcher, repo):
    job = _kept(dispatcher, repo, {"dist/app.whl": bytes(range(256)) * 4, "report.xml": b"<r/>"})
    listed = call(api, "GET", f"/jobs/{job}/artifacts").json["artifacts"]
    assert [a["path"] for a in listed] == ["dist/app.whl", "report.xml"]
    assert listed[0]["size"] == 1024 and listed[0]["url"] == f"/jobs/{job}/artifacts/dist/app.whl"
    whole = call(api, "GET", f"/jobs/{job}/artifacts/dist/app.whl")
    assert whole.body == bytes(range(256)) * 4 and whole.headers["X-Content-Type-Options"] == "nosniff"
    part = call(api, "GET", f"/jobs/{job}/artifacts/dist/app.whl", headers={"Range": "bytes=10-19"})
    assert part.status_int == 206 and part.body == bytes(range(10, 20))
    assert_json_error(call(api, "GET", f"/jobs/{job}/artifacts/dist/app.whl", headers={"Range": "bytes=5000-"}), 416)
    assert call(api, "GET", f"/jobs/{job}/artifacts/dist%2Fapp.whl").body == whole.body  # the same path, encoded
    for hostile in ("../narwhal.db", "..%2F..%2Fnarwhal.db", "%2e%2e/%2e%2e/narwhal.db", "/etc/passwd",
                    "%2Fetc%2Fpasswd", "report.xml%00.png", "dist", "dist/", "objects", "x" * 5000,
                    "%ff%fe", "report.xml/.."):
        assert_json_error(call(api, "GET", f"/jobs/{job}/artifacts/{hostile}"), (400, 404))
    assert_json_error(call(api, "GET", f"/jobs/{job + 1}/artifacts/report.xml"), 404)
    assert_json_error(call(api, "GET", f"/jobs/{'9' * 30}/artifacts/report.xml"), 404)


def test_an_expired_artifact_is_gone(api, dispatcher, repo):
    import time

    job = _kept(dispatcher, repo, {"old.txt": b"old"}, expire=0.001)
    time.sleep(0.01)
    body = assert_json_error(call(api, "GET", f"/jobs/{job}/artifacts/old.txt"), 410)
    assert "expired" in body["error"]
    (listed,) = call(api, "GET", f"/jobs/{job}/artifacts").json["artifacts"]
    assert listed["expired"] is True and listed["url"] is None


def test_artifacts_follow_the_read_token(dispatcher, repo):
    job = _kept(dispatcher, repo, {"a.txt": b"a"})
    reads = webtest.TestApp(make_app(dispatcher, token=TOKEN, boundary=Boundary(read_token=True)))
    assert_json_error(call(reads, "GET", f"/jobs/{job}/artifacts"), 401)
    assert_json_error(call(reads, "GET", f"/jobs/{job}/artifacts/a.txt"), 401)
    ok = call(reads, "GET", f"/jobs/{job}/artifacts/a.txt", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_int == 200 and ok.body == b"a"
