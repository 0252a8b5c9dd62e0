"""The dashboard in process (WebTest against make_app with the pages mounted), no browser.

A real Dispatcher that is never started: jobs, steps and log lines are written to its store
directly, as the scheduler would. The browser tests (tests/e2e/test_web_browser.py) check
the same pages live in Chromium.
"""

from __future__ import annotations

import html.parser
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import webtest

from narwhal import web
from narwhal.api import events as api_events
from narwhal.api.app import Boundary, make_app
from narwhal.api.session import COOKIE, Sessions
from narwhal.cli.gitrepo import make_git_repo
from narwhal.config.loader import load_config
from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.dispatch.events import Batch, RunnerWatch
from narwhal.dispatch.store import Store
from narwhal.job import Job, JobStatus, Origin, StepStatus
from narwhal.web import ansi, pages, render
from tests.conftest import StoreSpec

TOKEN = "s3cret-token"
INVENTORY = "runners:\n  - name: local\n    transport: local\n"
PIPELINE = """\
repo: "*"
image: narwhal-test/busybox:latest
steps:
  - {name: build, run: "true"}
  - {name: test, run: "true"}
"""
HOSTILE = '<script>window.pwned=1</script><img src=x onerror="alert(1)">'
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def dispatcher(tmp_path: Path, store_spec: StoreSpec, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dispatcher]:
    """A dispatcher on each store backend in turn: the dashboard's views are the store's widest queries."""
    config = tmp_path / "config"
    (config / "pipelines").mkdir(parents=True)
    store = ""
    if store_spec.kind == "postgresql":
        monkeypatch.setenv("NARWHAL_TEST_PGPASS", store_spec.password or "")
        store = (f"  store: {store_spec.where}\n  store_password: PGPASS\n"
                 "secrets:\n  PGPASS: {env: NARWHAL_TEST_PGPASS}\n")
    (config / "inventory.yaml").write_text(INVENTORY + f"settings:\n  local_roots: [{str(tmp_path)!r}]\n" + store)
    (config / "pipelines" / "ci.yaml").write_text(PIPELINE)
    d = Dispatcher(load_config(config), tmp_path / "state")
    yield d
    d.stop()


@pytest.fixture
def repo(tmp_path: Path) -> tuple[str, str]:
    return make_git_repo(str(tmp_path / "repo"))


def app(dispatcher: Dispatcher, token: str | None = None, read_token: bool = False) -> webtest.TestApp:
    return webtest.TestApp(make_app(dispatcher, token=token, max_body=65536, pages=web.mount,
                                    boundary=Boundary(read_token=read_token)))


def failed_job(d: Dispatcher, repo: tuple[str, str], log: list[str] | None = None,
               subject: str = HOSTILE, reason: str = "exit 1 in step test " + HOSTILE) -> Job:
    """A job whose first step passed and second failed, as the scheduler writes one."""
    path, sha = repo
    origin = Origin(event="push", key="push", ref="refs/heads/main", author=HOSTILE, subject=subject)
    (job, _), = d.store.create_jobs(path, sha, "main", ["ci"], origin)
    s = d.store
    s.start_job(job.id, "local", 1)
    s.plan_steps(job.id, 1, ["build", "test"])
    s.start_step(job.id, 1, 0, "build")
    s.append_log(job.id, 1, ["building"])
    s.append_log(job.id, 1, ["step build: exit 0 (0.1s)"], "narwhal")
    s.finish_step(job.id, 1, 0, StepStatus.PASSED, 0)
    s.start_step(job.id, 1, 1, "test")
    s.append_log(job.id, 1, log if log is not None else ["\x1b[31mred\x1b[0m " + HOSTILE])
    s.append_log(job.id, 1, ["step test: exit 1 (0.1s)"], "narwhal")
    s.finish_step(job.id, 1, 1, StepStatus.FAILED, 1)
    s.finish_job(job.id, 1, JobStatus.FAILED, reason)
    got = s.get_job(job.id)
    assert got is not None
    return got


class Markup(html.parser.HTMLParser):
    """What a page contains that a strict CSP would refuse, and its elements."""

    def __init__(self) -> None:
        super().__init__()
        self.inline_scripts = 0
        self.styles: list[str] = []
        self.handlers: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.tags.append((tag, values))
        if tag == "script" and "src" not in values:
            self.inline_scripts += 1
        if tag == "style":
            self.styles.append(tag)
        for name in values:
            if name == "style":
                self.styles.append(name)
            if name.startswith("on"):
                self.handlers.append(name)


def markup(text: str) -> Markup:
    parser = Markup()
    parser.feed(text)
    return parser


def session(api: webtest.TestApp, token: str | None = TOKEN) -> str:
    """Sign in through the form; the session cookie's value."""
    form = api.get("/ui/signin").forms[0]
    if token is not None and "token" in form.fields:
        form["token"] = token
    response = form.submit()
    assert response.status_int == 303, response.text
    return api.cookies[COOKIE]


# --- every page --------------------------------------------------------------------------------


def test_every_page_renders_with_a_strict_policy_and_no_inline_code(dispatcher, repo):
    job = failed_job(dispatcher, repo)
    api = app(dispatcher)
    urls = ["/ui/", f"/ui/repo?repo={repo[0]}", f"/ui/jobs/{job.id}", "/ui/runners/local", "/ui/signin",
            f"/ui/repo?repo={repo[0]}&branch=main&pipeline=ci&status=failed&limit=20"]
    for url in urls:
        r = api.get(url)
        assert r.status_int == 200 and r.content_type == "text/html", url
        assert r.headers["Content-Security-Policy"] == pages.CSP
        assert "script-src 'self'" in pages.CSP and "unsafe" not in pages.CSP
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        found = markup(r.text)
        assert found.inline_scripts == 0 and not found.styles and not found.handlers, url
        assert [t for t, _ in found.tags].count("main") == 1 and found.tags[0][1].get("lang") == "en", url


def test_assets_are_served_by_narwhal_itself_and_cached_by_version(dispatcher):
    api = app(dispatcher)
    page = api.get("/ui/signin").text
    for src in re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', page):
        r = api.get(src)
        assert r.status_int == 200 and "immutable" in r.headers["Cache-Control"], src
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # no CDN
    assert api.get("/ui/static/nope.js", expect_errors=True).status_int == 404
    assert api.get("/ui/static/app.js").content_type == "text/javascript"


def test_root_leads_to_the_overview(dispatcher):
    r = app(dispatcher).get("/")
    assert r.status_int == 303 and r.headers["Location"].endswith("/ui/")


# --- hostile strings ----------------------------------------------------------------------------


def test_job_controlled_strings_are_escaped_everywhere(dispatcher, repo):
    job = failed_job(dispatcher, repo)
    api = app(dispatcher)
    for url in ["/ui/", f"/ui/repo?repo={repo[0]}", f"/ui/jobs/{job.id}", "/ui/runners/local"]:
        text = api.get(url).text
        assert "<script>window" not in text and "<img src=x" not in text, url
        found = markup(text)
        assert not [t for t, _ in found.tags if t == "img"] and not found.handlers, url
    page = api.get(f"/ui/jobs/{job.id}").text
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page  # shown, as text
    assert '<span class="a-f1">red</span>' in page  # the colour, as a class


def test_the_first_failing_step_is_open_with_its_lines(dispatcher, repo):
    job = failed_job(dispatcher, repo)
    page = app(dispatcher).get(f"/ui/jobs/{job.id}").text
    opened = re.findall(r'<details class="sec" id="([^"]+)"[^>]* open>', page)
    assert opened == ["step-1"]
    assert 'id="L3"' in page and 'id="L1"' not in page  # build's lines load when it is opened
    assert '<a class="n" href="#L3">3</a>' in page


def test_a_long_log_shows_its_tail_first_and_older_lines_on_demand(dispatcher, repo):
    lines = [f"line {n}" for n in range(3, 3 + 6000)]
    job = failed_job(dispatcher, repo, log=lines)
    api = app(dispatcher)
    page = api.get(f"/ui/jobs/{job.id}").text
    last = 3 + len(lines)  # the narwhal note after the step's lines
    assert f'id="L{last}"' in page and f'id="L{last - pages.TAIL + 1}"' in page
    assert f'id="L{last - pages.TAIL}"' not in page
    assert re.search(r'<button type="button" class="older">', page)  # not hidden
    older = api.get(f"/ui/jobs/{job.id}/lines?from=1003&to={last - pages.TAIL}").json["lines"]
    assert older[0] == [1003, "step", "line 1003"] and older[-1][0] == last - pages.TAIL
    assert len(api.get(f"/ui/jobs/{job.id}/lines?from=1&to=99999").json["lines"]) == pages.LINES_MAX
    assert api.get(f"/ui/jobs/{job.id}/lines?from=x", expect_errors=True).status_int == 400
    assert api.get("/ui/jobs/999/lines", expect_errors=True).status_int == 404


def test_ansi_colours_become_classes_and_other_escapes_vanish():
    assert ansi.runs("\x1b[1;31mbold red\x1b[0m plain") == [("a-b a-f1", "bold red"), ("", " plain")]
    assert ansi.runs("\x1b[38;5;10mhi\x1b[39m\x1b[48;5;200mx") == [("a-f10", "hi"), ("", "x")]
    assert ansi.runs("\x1b[38;2;1;2;3mrgb\x1b[94mblue") == [("", "rgb"), ("a-f12", "blue")]
    assert ansi.plain("\x1b]0;title\x07\x1b[2J\x1b[Hclear\x1b]8;;https://x\x1b\\link\x1b]8;;\x1b\\ \x9b2Jc1\x08\x07") \
        == "clearlink c1"
    assert ansi.runs("tab\there\r") == [("", "tab\there")]
    assert ansi.runs("\x1b[4munder\x1b[24m \x1b[3mit\x1b[23m \x1b[2mdim\x1b[22m") == [
        ("a-u", "under"), ("", " "), ("a-i", "it"), ("", " "), ("a-d", "dim")]


def test_the_script_and_the_server_share_the_ansi_rules():
    """app.js implements ansi.py's rules; the patterns are the same text."""
    script = (Path(web.__file__).parent / "static" / "app.js").read_text()
    assert ansi.ESCAPE.pattern.replace("[ -/]", "[ -\\/]") in script
    assert ansi.CONTROL.pattern in script


# --- sign-in, sessions and forms ------------------------------------------------------------------


def test_signing_in_exchanges_the_token_for_a_strict_http_only_cookie(dispatcher):
    api = app(dispatcher, token=TOKEN)
    form = api.get("/ui/signin").forms[0]
    form["token"] = "wrong"
    assert form.submit(expect_errors=True).status_int == 401
    form = api.get("/ui/signin").forms[0]
    form["token"] = TOKEN
    r = form.submit()
    cookie = next(v for k, v in r.headerlist if k == "Set-Cookie" and v.startswith(COOKIE))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    assert TOKEN not in cookie
    page = api.get("/ui/").text
    assert "Sign out" in page


def test_the_cookie_is_secure_behind_https(dispatcher):
    api = app(dispatcher, token=TOKEN)
    https = {"wsgi.url_scheme": "https"}
    form = api.get("/ui/signin", extra_environ=https).forms[0]
    form["token"] = TOKEN
    r = form.submit(extra_environ=https)
    cookie = next(v for k, v in r.headerlist if k == "Set-Cookie" and v.startswith(COOKIE))
    assert "; Secure" in cookie
    proxied = api.get("/ui/signin", headers={"X-Forwarded-Proto": "https"})  # a TLS proxy in front
    assert "; Secure" in proxied.headers["Set-Cookie"]


def test_actions_are_shown_only_to_a_signed_in_user(dispatcher, repo):
    (job, _), = dispatcher.store.create_jobs(*repo, "main", ["ci"])
    api = app(dispatcher, token=TOKEN)
    assert "Cancel job" not in api.get(f"/ui/jobs/{job.id}").text
    assert "Drain" not in api.get("/ui/runners/local").text
    session(api)
    assert "Cancel job" in api.get(f"/ui/jobs/{job.id}").text
    assert "Drain" in api.get("/ui/runners/local").text


def test_a_form_without_its_csrf_token_is_refused(dispatcher, repo, tmp_path):
    (job, _), = dispatcher.store.create_jobs(*repo, "main", ["ci"])
    api = app(dispatcher, token=TOKEN)
    session(api)
    url = f"/ui/jobs/{job.id}/cancel"
    for body in ("", "csrf=", "csrf=0123", "other=1"):
        r = api.post(url, body, headers=FORM, expect_errors=True)
        assert r.status_int == 403 and "CSRF" in r.text, body
    assert dispatcher.store.get_job(job.id).status is JobStatus.QUEUED
    with Store(str(tmp_path / "other.db")) as elsewhere:  # another store's (or session's) token
        other = Sessions(elsewhere).csrf_token("x")
    assert api.post(url, f"csrf={other}", headers=FORM, expect_errors=True).status_int == 403
    form = api.get(f"/ui/jobs/{job.id}").forms[1]  # [0] signs out
    assert form.action == url
    r = form.submit()
    assert r.status_int == 303 and dispatcher.store.get_job(job.id).status is JobStatus.CANCELLED


def test_forms_need_a_session_a_form_body_and_the_same_site(dispatcher, repo):
    (job, _), = dispatcher.store.create_jobs(*repo, "main", ["ci"])
    api = app(dispatcher, token=TOKEN)
    url = f"/ui/jobs/{job.id}/cancel"
    assert api.post(url, "csrf=x", headers=FORM, expect_errors=True).status_int == 401  # not signed in
    session(api)
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', api.get(f"/ui/jobs/{job.id}").text).group(1)
    r = api.post(url, f"csrf={csrf}", headers={**FORM, "Origin": "http://evil.example"}, expect_errors=True)
    assert r.status_int == 403
    r = api.post(url, json.dumps({"csrf": csrf}), headers={"Content-Type": "application/json"}, expect_errors=True)
    assert r.status_int == 415
    r = api.post(url, f"csrf={csrf}", headers={**FORM, "Host": "evil.example"}, expect_errors=True)
    assert r.status_int == 421
    assert dispatcher.store.get_job(job.id).status is JobStatus.QUEUED
    # The cookie never stands in for the token on the JSON API's changes.
    assert api.post(f"/jobs/{job.id}/cancel", expect_errors=True).status_int == 401


def test_the_sign_in_form_needs_its_own_csrf_token(dispatcher):
    api = app(dispatcher, token=TOKEN)
    api.get("/ui/signin")
    r = api.post("/ui/signin", f"token={TOKEN}&csrf=nope", headers=FORM, expect_errors=True)
    assert r.status_int == 403 and COOKIE not in api.cookies


def test_drain_resume_retry_and_sign_out_from_the_pages(dispatcher, repo):
    job = failed_job(dispatcher, repo)
    api = app(dispatcher, token=TOKEN)
    session(api)
    api.get("/ui/runners/local").forms[1].submit()
    assert dispatcher.runners()[0]["draining"] is True
    api.get("/ui/runners/local").forms[1].submit()
    assert dispatcher.runners()[0]["draining"] is False
    retry = api.get(f"/ui/jobs/{job.id}").forms[1]
    assert retry.action.endswith("/retry")
    retry.submit()
    assert dispatcher.store.get_job(job.id).status is JobStatus.QUEUED
    api.get("/ui/").forms[0].submit()  # sign out
    assert "Sign in" in api.get("/ui/").text


def test_without_a_token_signing_in_asks_for_nothing(dispatcher):
    api = app(dispatcher)
    form = api.get("/ui/signin").forms[0]
    assert "token" not in form.fields
    session(api, token=None)
    assert "Sign out" in api.get("/ui/").text


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/ui/", "/ui/\\evil", "/jobs/1",
                                    "/ui//evil.example", "/ui/\r\nX: y"])
def test_sign_in_never_redirects_away(target):
    assert pages.safe_next(target) == "/ui/"


def test_read_token_puts_pages_behind_sign_in(dispatcher, repo):
    job = failed_job(dispatcher, repo)
    api = app(dispatcher, token=TOKEN, read_token=True)
    r = api.get(f"/ui/jobs/{job.id}", expect_errors=True)
    assert r.status_int == 303 and "/ui/signin?next=%2Fui%2Fjobs%2F" in r.headers["Location"]
    assert api.get("/ui/static/app.css").status_int == 200
    assert api.get("/badge/ci.svg", expect_errors=True).status_int == 401
    assert api.get("/badge/ci.svg", headers={"Authorization": f"Bearer {TOKEN}"}).status_int == 200
    assert api.get(f"/jobs/{job.id}/log", expect_errors=True).status_int == 401
    session(api)
    assert api.get(f"/ui/jobs/{job.id}").status_int == 200
    assert api.get("/badge/ci.svg").status_int == 200
    # A signed-in browser may read the API (EventSource sends no Authorization header).
    assert api.get(f"/jobs/{job.id}/log").text.startswith("building")
    assert api.get("/secrets", expect_errors=True).status_int == 401  # but not the private reads


# --- the other pages' pieces ----------------------------------------------------------------------


def test_badge_shows_the_latest_result_escaped(dispatcher, repo):
    failed_job(dispatcher, repo)
    api = app(dispatcher)
    r = api.get("/badge/ci.svg?branch=main")
    assert r.content_type == "image/svg+xml" and ">failed<" in r.text and r.headers["Cache-Control"] == "no-cache"
    assert ">unknown<" in api.get("/badge/ci.svg?branch=other").text
    assert "<script" not in api.get("/badge/%3Cscript%3E.svg").text
    assert api.get("/badge/ci.png", expect_errors=True).status_int == 404


def test_repository_page_filters_and_charts(dispatcher, repo):
    job = failed_job(dispatcher, repo)
    api = app(dispatcher)
    page = api.get(f"/ui/repo?repo={repo[0]}").text
    assert "Pass rate 0% (0 of 1 passed)" in page and 'class="bar bar-failed"' in page
    assert f'href="/ui/jobs/{job.id}"' in page
    assert "No job matches." in api.get(f"/ui/repo?repo={repo[0]}&status=passed").text
    assert api.get("/ui/repo?repo=/nowhere", expect_errors=True).status_int == 404
    assert api.get(f"/ui/repo?repo={repo[0]}&limit=0", expect_errors=True).status_int == 400


def test_chart_bars_rise_for_passes_and_hang_for_failures():
    jobs = [Job(id=i, pipeline="ci", repo="r", commit="a" * 40, branch="main", status=status,
                started_at=0.0, finished_at=float(took))
            for i, (status, took) in enumerate([(JobStatus.PASSED, 10), (JobStatus.FAILED, 5)], 1)]
    chart = render.chart(jobs, width=100, height=100)
    up, down = chart.bars
    assert up.up and up.y + up.height == chart.axis and up.height == pytest.approx(46)
    assert not down.up and down.y == chart.axis and down.height == pytest.approx(23)
    assert chart.pass_rate == 50 and chart.median == 10


def test_overview_lists_latest_per_branch_runners_and_why_the_queue_waits(dispatcher, repo):
    path, sha = repo
    dispatcher.store.create_jobs(path, sha, "main", ["ci"])
    dispatcher.store.create_jobs(path, "b" * 40, "feature", ["ci"])
    page = app(dispatcher).get("/ui/").text
    assert page.count('data-job="') == 4  # two latest rows, two queue rows
    assert "not checked yet" in page  # why they wait: the runner's health is unknown
    assert 'href="/ui/runners/local"' in page


def test_unknown_things_are_html_404s(dispatcher):
    api = app(dispatcher)
    for url in ["/ui/jobs/999", "/ui/jobs/abc", "/ui/runners/nobody"]:
        r = api.get(url, expect_errors=True)
        assert r.status_int == 404 and r.content_type == "text/html", url


# --- the event log -----------------------------------------------------------------------------------


def test_every_state_change_is_an_event_in_order(dispatcher, repo):
    start = dispatcher.events.latest()
    job = failed_job(dispatcher, repo)
    dispatcher.store.retry_job(job.id)
    batch = dispatcher.events.since(start)
    kinds = [(e.kind, e.data.get("status")) for e in batch.events]
    assert kinds == [("job.queued", "queued"), ("job.started", "running"),
                     ("job.step", "running"), ("job.step", "passed"), ("job.step", "running"),
                     ("job.step", "failed"), ("job.finished", "failed"), ("job.queued", "queued")]
    assert [e.data["line"] for e in batch.events if e.kind == "job.step"] == [1, 3, 3, 5]
    assert dispatcher.events.step_lines(job.id, 1) == {0: (1, 2), 1: (3, 4)}
    assert batch.last == batch.events[-1].id and dispatcher.events.since(batch.last).events == []


def test_a_resume_point_the_log_does_not_hold_is_a_reset(dispatcher, repo):
    failed_job(dispatcher, repo)
    last = dispatcher.events.latest()
    assert dispatcher.events.since(last + 5).reset
    assert dispatcher.events.since(None) == Batch([], last)


def test_runner_changes_are_events_once(dispatcher):
    watch = RunnerWatch(dispatcher.events, dispatcher.runners, dispatcher.wait_change, dispatcher.change_seen)
    first = watch.check()
    assert len(first) == 1 and watch.check() == []
    dispatcher.drain("local", True)
    changed = watch.check()
    events = dispatcher.events.for_runner("local")
    assert len(changed) == 1 and events[0].data["draining"] is True and events[0].data["state"] == "unknown"
    again = RunnerWatch(dispatcher.events, dispatcher.runners, dispatcher.wait_change, dispatcher.change_seen)
    assert again.check() == []  # a restart does not repeat what the log says already


def test_the_event_stream_frames(dispatcher, repo):
    failed_job(dispatcher, repo)
    stream = api_events.stream(dispatcher, None)
    opening = next(stream).decode()
    last = dispatcher.events.latest()
    assert opening == f'retry: 1000\n\nid: {last}\nevent: ready\ndata: {{"last": {last}}}\n\n'
    resumed = api_events.stream(dispatcher, 0)
    assert next(resumed) == api_events.RETRY
    body = next(resumed).decode()
    assert body.startswith("id: 1\nevent: job.queued\ndata: {") and body.count("\n\n") == last
    for block in body.strip().split("\n\n"):
        data = json.loads(block.split("\ndata: ", 1)[1])
        assert "\n" not in block.split("\ndata: ", 1)[1] and data["id"] == 1
    gone = api_events.stream(dispatcher, last + 10)
    assert b"event: reset" in next(gone)


def test_the_front_server_streams_events_itself(dispatcher):
    from narwhal.api.front import EVENTS, FrontServer, parse_head

    front = FrontServer(dispatcher, ("127.0.0.1", 1))
    try:
        def asks(head: bytes) -> tuple[int, int | None] | None:
            req = parse_head(head + b"\r\n\r\n")
            assert req is not None
            return front._follow_request(req)

        assert asks(b"GET /events HTTP/1.1") == (EVENTS, None)
        assert asks(b"GET /events HTTP/1.1\r\nLast-Event-ID: 42") == (EVENTS, 42)
        assert asks(b"GET /events?after=7 HTTP/1.1") == (EVENTS, 7)
        assert asks(b"GET /events?after=x HTTP/1.1") is None  # cheroot answers the 400
        assert asks(b"POST /events HTTP/1.1") is None
        assert asks(b"GET /jobs/3/log?follow=1 HTTP/1.1") == (3, 0)
    finally:
        front.loop.close()


# --- steps side by side: the timeline and each step's own lines -------------------------------

GRAPH = """\
repo: "*"
image: narwhal-test/busybox:latest
steps:
  - {name: build, run: "true", depends_on: []}
  - {name: lint, run: "true", depends_on: []}
  - {name: test, run: "true", depends_on: [build]}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def graph_job(d: Dispatcher, repo: tuple[str, str], tmp_path: Path, finish: bool = True) -> Job:
    """build and lint side by side, their lines interleaved as the runner writes them; lint fails
    while build runs on; then test."""
    (tmp_path / "config" / "pipelines" / "graph.yaml").write_text(GRAPH)
    d.reload(load_config(tmp_path / "config"))
    clock = Clock()
    s = d.store
    s.clock = clock
    path, sha = repo
    (job, _), = s.create_jobs(path, sha, "main", ["graph"], Origin(event="push", key="graph"))
    s.start_job(job.id, "local", 1)
    s.plan_steps(job.id, 1, ["build", "lint", "test"])
    s.start_step(job.id, 1, 0, "build")
    s.append_log(job.id, 1, ["step build started"], "narwhal")  # 1
    clock.now += 1
    s.start_step(job.id, 1, 1, "lint")
    s.append_log(job.id, 1, ["step lint started"], "narwhal")  # 2
    s.append_log(job.id, 1, ["build | compiling", "lint | checking", "build | linking"])  # 3-5
    clock.now += 2
    s.append_log(job.id, 1, ["lint | bad style"])  # 6
    s.append_log(job.id, 1, ["step lint: exit 1 (2.0s)"], "narwhal")  # 7
    s.finish_step(job.id, 1, 1, StepStatus.FAILED, 1)
    clock.now += 3
    s.append_log(job.id, 1, ["build | done"])  # 8
    s.append_log(job.id, 1, ["step build: exit 0 (6.0s)"], "narwhal")  # 9
    s.finish_step(job.id, 1, 0, StepStatus.PASSED, 0)
    s.finish_step(job.id, 1, 2, StepStatus.SKIPPED, None, None, "an earlier step failed")
    if finish:
        clock.now += 1
        s.finish_job(job.id, 1, JobStatus.FAILED, "exit 1 in step lint")
    got = s.get_job(job.id)
    assert got is not None
    return got


def bars(page: str) -> dict[str, tuple[float, float]]:
    """Step name -> (x, x + width) of its timeline bar, in percent."""
    out = {}
    for row in re.findall(r"<tr>(.*?)</tr>", page, re.S):
        name = re.search(r'href="#step-\d+">([^<]+)</a>', row)
        rect = re.search(r'<rect class="tl-bar[^"]*" x="([\d.]+)%" y="2" width="([\d.]+)%"', row)
        if name and rect:
            x, width = float(rect.group(1)), float(rect.group(2))
            out[name.group(1)] = (x, x + width)
    return out


def test_steps_side_by_side_show_overlapping_bars_and_their_offsets_in_text(dispatcher, repo, tmp_path):
    job = graph_job(dispatcher, repo, tmp_path)
    page = app(dispatcher).get(f"/ui/jobs/{job.id}").text
    found = bars(page)
    assert set(found) == {"build", "lint"}  # test never started: no bar
    (b0, b1), (l0, l1) = found["build"], found["lint"]
    assert b0 == 0 and l0 < b1 and l0 > b0  # lint started while build ran
    assert l1 < b1 <= 100
    # The same in text, for a screen reader: when each started after the job did, and how long.
    rows = {m.group(1): m.group(2) for m in re.finditer(r'href="#step-\d+">([^<]+)</a></td>(.*?)</tr>', page, re.S)}
    assert "<td>+0.0s</td><td>6.0s</td>" in rows["build"] and "<td>+1.0s</td><td>2.0s</td>" in rows["lint"]
    assert "✗" in rows["lint"] and "failed" in rows["lint"]  # not colour alone
    assert 'aria-hidden="true"' in re.search(r"<svg class=\"tl\"[^>]*>", page).group(0)
    parsed = markup(page)
    assert not parsed.styles and not parsed.handlers and not parsed.inline_scripts


def test_steps_side_by_side_each_show_their_own_lines_and_the_failing_one_opens(dispatcher, repo, tmp_path):
    job = graph_job(dispatcher, repo, tmp_path)
    api = app(dispatcher)
    page = api.get(f"/ui/jobs/{job.id}").text
    opened = re.findall(r'<details class="sec" id="([^"]+)"[^>]* open>', page)
    assert opened == ["step-1"]  # lint: the first failing step, though build's lines came later
    assert 'data-owned="1"' in page
    shown = re.search(r'id="step-1".*?</details>', page, re.S).group(0)
    assert re.findall(r'id="L(\d+)"', shown) == ["2", "4", "6", "7"]  # lint's own, none of build's
    own = api.get(f"/ui/jobs/{job.id}/lines?from=1&to=9&step=0").json
    assert [n for n, _, _ in own["lines"]] == [1, 3, 5, 8, 9] and own["next"] == 10
    everything = api.get(f"/ui/jobs/{job.id}/lines?from=1&to=9").json
    assert len(everything["lines"]) == 9 and "next" not in everything


def test_a_running_job_has_a_live_timeline(dispatcher, repo, tmp_path):
    job = graph_job(dispatcher, repo, tmp_path, finish=False)
    dispatcher.store.start_step(job.id, 1, 2, "test")
    page = app(dispatcher).get(f"/ui/jobs/{job.id}").text
    table = re.search(r'<table class="steps" id="steps"[^>]*>', page).group(0)
    assert 'data-running="1"' in table and "data-total=" in table  # the script stretches the bars
    assert re.search(r'<svg class="tl"[^>]*data-end=""', page)  # the running step's has no end yet
# --- artifacts on the job page ------------------------------------------------------------


def keep_artifacts(d: Dispatcher, job_id: int, files: dict[str, bytes], expire: float | None = None) -> None:
    import io

    col = d.artifact_store.collection(job_id, 1, expire)
    for path, data in files.items():
        col.put(path, len(data), io.BytesIO(data).read)
    col.commit()


def test_job_page_links_its_artifacts_escaped_with_sizes(dispatcher, repo):
    job = failed_job(dispatcher, repo)
    hostile = "dist/" + HOSTILE.replace("/", "_") + ".whl"
    keep_artifacts(dispatcher, job.id, {"report.xml": b"<r/>", hostile: b"x" * 2500, "dir/a b.txt": b"1"})
    page = app(dispatcher).get(f"/ui/jobs/{job.id}").text
    assert 'id="h-artifacts"' in page
    assert f'<a href="/jobs/{job.id}/artifacts/report.xml" download>report.xml</a>' in page
    assert f'href="/jobs/{job.id}/artifacts/dir/a%20b.txt"' in page
    assert "2.5 kB" in page and "4 B" in page
    assert "<script>window.pwned" not in page and "&lt;script&gt;window.pwned=1&lt;" in page
    # and the link works, as a download
    r = app(dispatcher).get(f"/jobs/{job.id}/artifacts/report.xml")
    assert r.body == b"<r/>" and r.headers["Content-Disposition"].startswith("attachment;")


def test_job_page_without_artifacts_has_no_section(dispatcher, repo):
    job = failed_job(dispatcher, repo)
    assert 'id="h-artifacts"' not in app(dispatcher).get(f"/ui/jobs/{job.id}").text


def test_expired_artifacts_are_listed_without_a_link(dispatcher, repo):
    job = failed_job(dispatcher, repo)
    keep_artifacts(dispatcher, job.id, {"old.log": b"o"}, expire=0.001)
    import time

    time.sleep(0.01)
    page = app(dispatcher).get(f"/ui/jobs/{job.id}").text
    assert "old.log" in page and "expired" in page and f"/jobs/{job.id}/artifacts/old.log" not in page
