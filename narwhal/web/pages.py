"""The dashboard's pages, its forms and its badge: handlers, their guard, and the route table.

Pages live under ``/ui/`` (``/`` redirects there), badges under ``/badge/``; both are mounted
into the API's Bottle app by ``mount``, with their own guard in place of the API's:

* the same Host check (421) and, for every POST, the same cross-site check (403) as the API
  (``narwhal.api.app``);
* a POST must be a form (``application/x-www-form-urlencoded``, else 415) and carry the CSRF
  token of the session (sign-in: of its ``narwhal_login`` cookie), else 403;
* with ``settings.read_token``, a page needs a signed-in session (else a redirect to the
  sign-in page) and a badge the session or the token (else 401); assets and the sign-in page
  are open;
* every answer carries a strict Content-Security-Policy (no inline script or style, nothing
  from elsewhere) and ``X-Content-Type-Options``, ``Referrer-Policy`` and framing refusals.
"""

from __future__ import annotations

import hmac
import logging
import mimetypes
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import bottle

from narwhal.api import app as api_app
from narwhal.api import request, routes
from narwhal.api.request import Forbidden, UnsupportedMediaType
from narwhal.api.session import (
    COOKIE,
    CSRF_FIELD,
    LIFETIME,
    LOGIN_COOKIE,
    LOGIN_LIFETIME,
    Sessions,
    cookie_value,
    set_cookie_header,
)
from narwhal.dispatch import views
from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.errors import NarwhalError, NotFound, Unauthorized
from narwhal.job import Job, JobStatus, StepStatus
from narwhal.web import owner, render
from narwhal.web.render import PREFIX

log = logging.getLogger(__name__)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
BADGE_PREFIX = "/badge/"
OPEN_PATHS = (f"{PREFIX}/static/", f"{PREFIX}/signin")  # readable without a session under read_token
TAIL = 1000  # log lines a page shows at first per open step (older ones on demand)
LINES_MAX = 5000  # log lines one /lines request answers
QUEUE_SHOWN = 50  # queued jobs the overview lists, with why each waits
FAILED_STEPS = {StepStatus.FAILED, StepStatus.ERROR, StepStatus.CANCELLED}


class Refused(Forbidden):
    """A form without its CSRF token (or with another session's)."""


# --- who is asking -------------------------------------------------------------------------


@dataclass
class Viewer:
    signed_in: bool
    csrf: str
    here: str


def sessions() -> Sessions:
    return routes.setting(api_app.SESSIONS)


def dispatcher() -> Dispatcher:
    return routes.setting(routes.DISPATCHER)


def session_id() -> str | None:
    return cookie_value(request.header("Cookie"), COOKIE)


def viewer() -> Viewer:
    sid = session_id()
    store = sessions()
    signed = store.valid(sid)
    here = bottle.request.path + (f"?{bottle.request.query_string}" if bottle.request.query_string else "")
    return Viewer(signed, store.csrf_token(sid) if signed and sid else "", here)


def secure() -> bool:
    """Served over HTTPS (directly, or behind a proxy that says so): cookies get Secure."""
    return (bottle.request.urlparts.scheme == "https"
            or request.header("X-Forwarded-Proto").strip().lower() == "https")


# --- the guard -------------------------------------------------------------------------------


def guard(callback: Callable) -> Callable:
    """The pages' plugin (instead of the API's ``guard``): boundary, sign-in, CSRF, errors as HTML."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for name, value in SECURITY_HEADERS.items():
            bottle.response.set_header(name, value)
        try:
            check()
            return callback(*args, **kwargs)
        except bottle.HTTPResponse as exc:
            for name, value in SECURITY_HEADERS.items():
                exc.set_header(name, value)
            raise
        except NarwhalError as exc:
            status = exc.http_status if exc.http_status < 500 else 503
            return error_page(status, str(exc))
        except Exception:  # noqa: BLE001 - a bug is a 500 page without details, logged here
            log.exception("%s %s failed", bottle.request.method, bottle.request.path)
            return error_page(500, "internal error; see the dispatcher's log")
    return wrapper


def check() -> None:
    boundary: api_app.Boundary = routes.setting(api_app.BOUNDARY)
    token: str | None = routes.setting(routes.TOKEN)
    host = api_app.check_host(boundary)
    path = bottle.request.path
    if bottle.request.method == "POST":
        api_app.check_same_site(boundary, host)
        kind = bottle.request.content_type.split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise UnsupportedMediaType(f"a form needs Content-Type: application/x-www-form-urlencoded, got {kind!r}")
        return  # each form handler checks its CSRF token (sign-in has none of a session yet)
    if not (token and boundary.read_token) or path.startswith(OPEN_PATHS):
        return
    if sessions().valid(session_id()):
        return
    if path.startswith(BADGE_PREFIX):
        api_app.check_token(token)
        return
    raise bottle.HTTPResponse(status=303, headers={
        "Location": f"{PREFIX}/signin?{urlencode({'next': viewer().here})}", "Cache-Control": "no-store"})


def require_csrf() -> None:
    sid = session_id()
    if not sessions().valid(sid):
        raise Unauthorized("sign in first: this action needs a signed-in session")
    if not sessions().check_csrf(sid, bottle.request.forms.get(CSRF_FIELD)):
        raise Refused("form refused: its CSRF token is missing or wrong (reload the page and try again)")


TITLES = {400: "Bad request", 401: "Sign in first", 403: "Refused", 404: "Not found", 405: "Not allowed",
          409: "Conflict", 415: "Not a form", 421: "Wrong host name", 422: "Cannot be done", 500: "Internal error",
          503: "Unavailable"}


def error_page(status: int, message: str) -> bottle.HTTPResponse:
    body = render.page("error.html", page_name="error", viewer=Viewer(False, "", bottle.request.path),
                       status_code=status, title=TITLES.get(status, "Error"), message=message)
    return bottle.HTTPResponse(body=body, status=status, headers={
        "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store", **SECURITY_HEADERS})


def html(template: str, **context: Any) -> str:
    bottle.response.content_type = "text/html; charset=utf-8"
    bottle.response.set_header("Cache-Control", "no-store")
    bottle.response.set_header("Vary", "Cookie")
    return render.page(template, viewer=viewer(), now=time.time(), **context)


def back(url: str) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(status=303, headers={"Location": url, "Cache-Control": "no-store",
                                                    **SECURITY_HEADERS})


# --- pages -----------------------------------------------------------------------------------


def root() -> Any:
    return back(f"{PREFIX}/")


def overview() -> str:
    d = dispatcher()
    latest = views.latest_per_branch(d.store)
    groups: dict[str, list[Job]] = {}
    for job in latest:
        groups.setdefault(job.repo, []).append(job)
    queued = d.store.queued_jobs()
    queue = [{"job": j, "waiting": d.scheduler.waiting_reasons(j)} for j in queued[:QUEUE_SHOWN]]
    return html("overview.html", page_name="overview", groups=list(groups.items()),
                steps=views.running_steps(d.store), runners=d.runners(), queue=queue, queue_total=len(queued))


def repo_page() -> str:
    q = bottle.request.query
    repo = request.text(q, "repo")
    if not repo:
        raise NotFound("which repository? (/ui/repo?repo=URL)")
    d = dispatcher()
    filters = {name: (request.text(q, name) or None) for name in ("branch", "pipeline", "status")}
    if filters["status"] is not None and filters["status"] not in {s.value for s in JobStatus}:
        filters["status"] = None
    limit = request.limit(q, 50)
    before = q.get("before")
    before_id = int(before) if before and before.isascii() and before.isdigit() and len(before) < 19 else None
    jobs = views.history(d.store, repo, limit=limit, before=before_id, **filters)
    if not jobs and before_id is None and not any(filters.values()) and repo not in views.repos(d.store):
        raise NotFound(f"no jobs for repository {repo!r}")
    branches, pipelines = views.choices(d.store, repo)
    more = None
    if len(jobs) == limit:
        more = render.repo_url(repo, **filters, limit=limit, before=jobs[-1].id)
    chart = render.chart(views.finished(d.store, repo, branch=filters["branch"], pipeline=filters["pipeline"],
                                        limit=limit))
    return html("repo.html", page_name="repo", repo=repo, jobs=jobs, filters=filters, limit=limit,
                branches=branches, pipelines=pipelines, statuses=[s.value for s in JobStatus], more=more,
                chart=chart, steps=views.running_steps(d.store))


@dataclass
class Section:
    idx: int
    name: str
    status: str
    first: int | None
    last: int | None
    duration: float | None = None
    open: bool = False
    lines: list[tuple[int, str, str]] | None = None
    lo: int | None = None
    hi: int | None = None
    older: bool = False
    owned: bool = False  # steps side by side: the section shows the lines that are its own (narwhal.web.owner)

    @property
    def anchor(self) -> str:
        return f"step-{self.idx}" if self.idx >= 0 else ("log-before" if self.idx == -1 else "log-after")


def ranges(d: Dispatcher, job: Job) -> list[owner.Range]:
    marks = d.events.step_lines(job.id, job.attempt)
    return [owner.Range(s.idx, s.name, *marks.get(s.idx, (None, None))) for s in job.steps]


def side_by_side(d: Dispatcher, job: Job, spans: list[owner.Range]) -> bool:
    """Whether the job's steps may overlap: its pipeline has a graph (each output line then
    says whose it is), or, for a pipeline since removed, their lines overlapped."""
    pipeline = d.config.pipeline(job.pipeline)
    if pipeline is not None:
        return pipeline.is_graph
    known = sorted((r.first, r.last) for r in spans if r.first is not None)
    return any(last is None or last >= nxt for (_, last), (nxt, _) in zip(known, known[1:], strict=False))


def sections(d: Dispatcher, job: Job, total: int) -> list[Section]:
    """The log cut at the steps: lines before the first step, each step's, lines after the last."""
    spans = ranges(d, job)
    if side_by_side(d, job, spans):
        return owned_sections(d, job, total, spans)
    marks = {r.idx: (r.first, r.last) for r in spans}
    out: list[Section] = []
    steps = job.steps
    firsts = [marks.get(s.idx, (None, None))[0] for s in steps]
    known = [f for f in firsts if f is not None]
    start = min(known) if known else None
    if not known:
        out.append(Section(-1, "Log" if total else "No output yet", "running" if not job.is_final else "pending",
                           1 if total else None, None if not job.is_final else total or None))
    elif start and start > 1:
        before = "Earlier attempts and set-up" if job.attempt > 1 else "Before the steps"
        out.append(Section(-1, before, "pending", 1, start - 1))
    last_end = 0
    for i, step in enumerate(steps):
        first, last = marks.get(step.idx, (None, None))
        if first is not None and last is None:
            later = [f for f in firsts[i + 1:] if f is not None]
            last = later[0] - 1 if later else (total if job.is_final else None)
        if last is not None:
            last_end = max(last_end, last)
        out.append(Section(step.idx, step.name, step.status.value, first, last, step.to_dict()["duration"]))
    if known and job.is_final and total > last_end:
        out.append(Section(-2, "After the steps", "pending", last_end + 1, total))
    for sec in out:
        if sec.first is not None and sec.last is not None and sec.last < sec.first:
            sec.first = sec.last = None  # a step that wrote nothing
    chosen = to_open(out)
    if chosen is not None:
        chosen.open = True
        load_tail(d, job.id, chosen, total)
    return out


def to_open(out: list[Section]) -> Section | None:
    """The section open at first: the first failing step; else a running one; else the last with lines."""
    failing = next((s for s in out if s.idx >= 0 and s.status in {v.value for v in FAILED_STEPS}), None)
    running = next((s for s in out if s.status == "running"), None)
    with_lines = [s for s in out if s.first is not None]
    return failing or running or (with_lines[-1] if with_lines else None)


def owned_sections(d: Dispatcher, job: Job, total: int, spans: list[owner.Range]) -> list[Section]:
    """Sections of steps that ran side by side: each step's range of lines overlaps others',
    and shows only the lines that are its own."""
    out: list[Section] = []
    firsts = [r.first for r in spans if r.first is not None]
    if not firsts:
        out.append(Section(-1, "Log" if total else "No output yet", "running" if not job.is_final else "pending",
                           1 if total else None, None if not job.is_final else total or None))
    elif min(firsts) > 1:
        before = "Earlier attempts and set-up" if job.attempt > 1 else "Before the steps"
        out.append(Section(-1, before, "pending", 1, min(firsts) - 1))
    by_idx = {r.idx: r for r in spans}
    for step in job.steps:
        r = by_idx[step.idx]
        last = r.last if r.last is not None or r.first is None or not job.is_final else total
        out.append(Section(step.idx, step.name, step.status.value, r.first, last, step.to_dict()["duration"],
                           owned=True))
    ends = [s.last for s in out if s.idx >= 0 and s.first is not None and s.last is not None]
    if firsts and job.is_final and ends and total > max(ends):
        out.append(Section(-2, "After the steps", "pending", max(ends) + 1, total))
    chosen = to_open(out)
    if chosen is not None:
        chosen.open = True
        if chosen.owned:
            load_owned_tail(d, job.id, chosen, total, spans)
        else:
            load_tail(d, job.id, chosen, total)
    return out


def load_owned_tail(d: Dispatcher, job_id: int, sec: Section, total: int, spans: list[owner.Range]) -> None:
    """A step's last TAIL lines of its own, read back from its range's end a window at a time."""
    sec.lines = []
    if sec.first is None:
        return
    end = sec.last if sec.last is not None else total
    hi = end
    while hi >= sec.first and len(sec.lines) < TAIL:
        lo = max(sec.first, hi - LINES_MAX + 1)
        sec.lines = own_lines(read_lines(d, job_id, lo, hi), sec.idx, spans) + sec.lines
        hi = lo - 1
    scanned = hi + 1
    if len(sec.lines) > TAIL:
        sec.lines = sec.lines[-TAIL:]
        scanned = sec.lines[0][0]
    sec.lo, sec.hi = (scanned, end) if end >= sec.first else (None, None)
    sec.older = scanned > sec.first


def own_lines(lines: list[tuple[int, str, str]], idx: int, spans: list[owner.Range]) -> list[tuple[int, str, str]]:
    return [line for line in lines if owner.owner(*line, spans) == idx]


def load_tail(d: Dispatcher, job_id: int, sec: Section, total: int) -> None:
    if sec.first is None:
        sec.lines = []
        return
    end = sec.last if sec.last is not None else total
    if end < sec.first:
        sec.lines = []
        return
    lo = max(sec.first, end - TAIL + 1)
    sec.lines = read_lines(d, job_id, lo, end)
    sec.lo, sec.hi = (lo, end) if sec.lines else (None, None)
    sec.older = lo > sec.first


def read_lines(d: Dispatcher, job_id: int, first: int, last: int) -> list[tuple[int, str, str]]:
    out: list[tuple[int, str, str]] = []
    for start, lines, kind in d.log(job_id, after=first - 1, limit=min(LINES_MAX, last - first + 1)):
        out.extend((n, kind.value, text) for n, text in enumerate(lines, start=start))
    return out


ARTIFACTS_SHOWN = 500  # the rest: GET /jobs/ID/artifacts


def job_page(job_id: str) -> str:
    d = dispatcher()
    jid = request.job_id(job_id)
    job = d.store.get_job(jid)
    if job is None:
        raise NotFound(f"no job {jid}")
    total = d.store.log_line_count(jid)
    forge = d.config.forge_for(job.repo)
    waiting = d.scheduler.waiting_reasons(job) if job.is_queued else []
    files = [{**a, "url": None if a["expired"] else f"/jobs/{jid}/artifacts/{quote(a['path'], safe='/')}"}
             for a in d.artifacts(jid)[:ARTIFACTS_SHOWN]]
    return html("job.html", page_name="job", job=job, total=total, sections=sections(d, job, total),
                waiting=waiting, forge_kind=forge.kind if forge is not None else None, artifacts=files)


def job_lines(job_id: str) -> dict:
    """Log lines ``from``..``to`` (at most LINES_MAX) as ``[[n, kind, text], ...]``: the page's
    script inserts them as text nodes."""
    d = dispatcher()
    jid = request.job_id(job_id)
    if not d.job_exists(jid):
        raise NotFound(f"no job {jid}")
    q = bottle.request.query
    first, last = _number(q.get("from"), 1), _number(q.get("to"), 0)
    bottle.response.set_header("Cache-Control", "no-store")
    if last < first:
        return {"lines": []}
    end = min(last, first + LINES_MAX - 1)
    lines = read_lines(d, jid, first, end)
    if q.get("step") is None:
        return {"lines": [list(line) for line in lines]}
    # A step's own lines (steps side by side): ``next`` is where the next window starts.
    job = d.store.get_job(jid)
    assert job is not None
    idx = _number(q.get("step"), 0)
    return {"lines": [list(line) for line in own_lines(lines, idx, ranges(d, job))], "next": end + 1}


def _number(raw: str | None, default: int) -> int:
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= request.MAX_ID_DIGITS):
        raise request.BadRequest(f"expected a line number, got {raw[:40]!r}")
    return int(raw)


def runner_page(name: str) -> str:
    d = dispatcher()
    runner = d.scheduler.runner(name)
    if runner is None:
        raise NotFound(f"no runner {name!r}")
    return html("runner.html", page_name="runner", runner=runner, jobs=views.runner_jobs(d.store, name),
                history=d.events.for_runner(name))


# --- forms -------------------------------------------------------------------------------------


def signin_page() -> str:
    store = sessions()
    nonce = store.login_nonce()
    bottle.response.set_header("Set-Cookie", set_cookie_header(LOGIN_COOKIE, nonce, max_age=int(LOGIN_LIFETIME),
                                                               secure=secure(), path=f"{PREFIX}/signin"))
    nxt = safe_next(bottle.request.query.get("next"))
    return html("signin.html", page_name="signin", login_csrf=store.login_csrf(nonce), next=nxt,
                token_required=routes.setting(routes.TOKEN) is not None, error=None)


def signin() -> Any:
    store = sessions()
    forms = bottle.request.forms
    nonce = cookie_value(request.header("Cookie"), LOGIN_COOKIE)
    if not store.check_login_csrf(nonce, forms.get(CSRF_FIELD)):
        raise Refused("sign-in form refused: its CSRF token is missing, wrong or expired (reload the page)")
    token: str | None = routes.setting(routes.TOKEN)
    given = forms.getunicode("token") or ""
    if token is not None and not hmac.compare_digest(given.strip().encode(), token.encode()):
        bottle.response.status = 401
        fresh = store.login_nonce()
        bottle.response.set_header("Set-Cookie", set_cookie_header(
            LOGIN_COOKIE, fresh, max_age=int(LOGIN_LIFETIME), secure=secure(), path=f"{PREFIX}/signin"))
        return html("signin.html", page_name="signin", login_csrf=store.login_csrf(fresh),
                    next=safe_next(forms.getunicode("next")), token_required=True, error="Wrong token.")
    store.end(session_id())  # a new id at every sign-in: no fixation
    sid = store.create()
    response = back(safe_next(forms.getunicode("next")))
    response.add_header("Set-Cookie", set_cookie_header(COOKIE, sid, max_age=int(LIFETIME), secure=secure()))
    response.add_header("Set-Cookie", set_cookie_header(LOGIN_COOKIE, "", max_age=0, secure=secure(),
                                                        path=f"{PREFIX}/signin"))
    return response


def signout() -> Any:
    require_csrf()
    sessions().end(session_id())
    response = back(f"{PREFIX}/")
    response.add_header("Set-Cookie", set_cookie_header(COOKIE, "", max_age=0, secure=secure()))
    return response


def safe_next(raw: str | None) -> str:
    """Where to go after signing in: one of our pages only (no open redirect)."""
    if not raw or not raw.startswith(f"{PREFIX}/") or "//" in raw or "\\" in raw or any(c < " " for c in raw):
        return f"{PREFIX}/"
    return raw


def cancel_form(job_id: str) -> Any:
    require_csrf()
    jid = request.job_id(job_id)
    dispatcher().cancel(jid)
    return back(render.job_url(jid))


def retry_form(job_id: str) -> Any:
    require_csrf()
    jid = request.job_id(job_id)
    dispatcher().retry(jid)
    return back(render.job_url(jid))


def drain_form(name: str) -> Any:
    require_csrf()
    dispatcher().drain(name, True)
    return back(render.runner_url(name))


def resume_form(name: str) -> Any:
    require_csrf()
    dispatcher().drain(name, False)
    return back(render.runner_url(name))


# --- assets and the badge ----------------------------------------------------------------------


def asset(name: str) -> Any:
    data = render.STATIC_FILES.get(name)
    if data is None:
        raise NotFound(f"no asset {name!r}")
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if kind.startswith("text/") or kind in ("application/javascript",):
        kind += "; charset=utf-8"
    versioned = bottle.request.query.get("v") == render.ASSET_VERSION
    return bottle.HTTPResponse(body=data, headers={
        "Content-Type": kind, **SECURITY_HEADERS,
        "Cache-Control": "public, max-age=31536000, immutable" if versioned else "no-cache"})


BADGE_COLOURS = {"passed": "#2f7d32", "failed": "#c62828", "error": "#b45309", "cancelled": "#57606a",
                 "unknown": "#57606a"}


def badge(name: str) -> Any:
    if not name.endswith(".svg"):
        raise NotFound("badges are /badge/PIPELINE.svg")
    pipeline = name[:-4]
    branch = request.text(bottle.request.query, "branch") or None
    job = views.latest_for_badge(dispatcher().store, pipeline, branch)
    value = job.status.value if job is not None else "unknown"
    label = pipeline[:40]
    body = render.page("badge.svg", label=label, value=value, colour=BADGE_COLOURS.get(value, "#57606a"),
                       left=render.text_width(label), right=render.text_width(value))
    return bottle.HTTPResponse(body=body, headers={"Content-Type": "image/svg+xml; charset=utf-8",
                                                   "Cache-Control": "no-cache", **SECURITY_HEADERS})


# --- the route table ----------------------------------------------------------------------------

ROUTES: list[tuple[str, str, Callable[..., Any]]] = [
    ("GET", "/", root),
    ("GET", f"{PREFIX}", root),
    ("GET", f"{PREFIX}/", overview),
    ("GET", f"{PREFIX}/repo", repo_page),
    ("GET", f"{PREFIX}/jobs/<job_id>", job_page),
    ("GET", f"{PREFIX}/jobs/<job_id>/lines", job_lines),
    ("POST", f"{PREFIX}/jobs/<job_id>/cancel", cancel_form),
    ("POST", f"{PREFIX}/jobs/<job_id>/retry", retry_form),
    ("GET", f"{PREFIX}/runners/<name>", runner_page),
    ("POST", f"{PREFIX}/runners/<name>/drain", drain_form),
    ("POST", f"{PREFIX}/runners/<name>/resume", resume_form),
    ("GET", f"{PREFIX}/signin", signin_page),
    ("POST", f"{PREFIX}/signin", signin),
    ("POST", f"{PREFIX}/signout", signout),
    ("GET", f"{PREFIX}/static/<name>", asset),
    ("GET", f"{BADGE_PREFIX}<name>", badge),
]


def mount(app: bottle.Bottle) -> None:
    """Add the pages to the API's app, each behind ``guard`` instead of the API's guard."""
    for method, path, handler in ROUTES:
        app.route(path, method, handler, skip=[api_app.guard], apply=[guard])


def job_page_url(job_id: int) -> str:
    """What a commit status should link to, relative to the dispatcher's public address."""
    return render.job_url(job_id)

