"""The REST API's handlers and the one table that maps (method, path) to them.

Each handler reads its input with ``narwhal.api.request``, asks the dispatcher
(``dispatcher()``: the one ``make_app`` stored in the app's config) and returns a
dict that Bottle sends as JSON. Errors are raised, never returned: ``app.guard``
turns them into ``{"error": ...}`` responses.
"""

from __future__ import annotations

import mimetypes
import posixpath
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import bottle

from narwhal.api import events, logs, request
from narwhal.api.openapi import document
from narwhal.dispatch.dispatcher import Resolving
from narwhal.errors import BadRequest, NarwhalError, NotFound

DISPATCHER = "narwhal.dispatcher"
MAX_BODY = "narwhal.max_body"
RELOAD = "narwhal.reload"
TOKEN = "narwhal.token"
READER = "narwhal.reader"  # GET /health: whether the client may read the details (check_boundary)
STREAMS = "narwhal.streams"  # log streams from a worker thread: only in process (tests, tools)


def setting(key: str) -> Any:
    """A value ``make_app`` stored for the app serving this request."""
    return bottle.request.app.config.get(key)


def dispatcher() -> Any:
    return setting(DISPATCHER)


def body() -> dict:
    return request.json_body(setting(MAX_BODY))


def job_url(job_id: int) -> str:
    """The job's address: absolute under ``settings.public_url`` when it is set, else the path."""
    base = dispatcher().config.settings.public_url
    return f"{base}/jobs/{job_id}" if base else f"/jobs/{job_id}"


# --- commits -------------------------------------------------------------------------------


def post_commit() -> dict:
    data = body()
    request.only_keys(data, {"repo", "commit", "branch"}, required={"repo"})
    if "commit" not in data:
        if "branch" not in data:
            raise BadRequest("missing field(s): commit (or a branch, to build its head)")
        return post_head(data)
    commit = {"repo": data["repo"], "commit": data["commit"], "branch": data.get("branch")}
    try:
        created = dispatcher().submit(data["repo"], data["commit"], data.get("branch"))
    except Resolving as exc:  # a slow fetch: the jobs follow when it ends (POST again to see them)
        bottle.response.status = 202
        return {"commit": {**commit, "repo": exc.repo}, "jobs": [], "status": "resolving", "detail": str(exc)}
    # ``created``: whether this submission made the job (False: it existed already, from an
    # earlier submission of the same commit), so a client can tell new jobs from old ones.
    jobs = [{"id": j.id, "pipeline": j.pipeline, "status": j.status.value, "reason": j.reason,
             "created": new, "url": job_url(j.id)} for j, new in created]
    bottle.response.status = 202 if any(new for _, new in created) else 200
    # The canonical form of the repository, never the credentials or spelling sent.
    return {"commit": {**commit, "repo": created[0][0].repo}, "jobs": jobs}


def post_head(data: dict) -> dict:
    """POST /commit without a commit: build the head of ``branch`` (a branch or tag), the commit
    it names on the server now; the answer shows that commit (null while it is being fetched)."""
    branch = data.get("branch")
    try:
        commit, created = dispatcher().submit_head(data["repo"], branch)
    except Resolving as exc:  # a slow fetch: the jobs follow when the head is known
        bottle.response.status = 202
        return {"commit": {"repo": exc.repo, "commit": None, "branch": branch}, "jobs": [],
                "status": "resolving", "detail": str(exc)}
    jobs = [{"id": j.id, "pipeline": j.pipeline, "status": j.status.value, "url": job_url(j.id)}
            for j, _ in created]
    bottle.response.status = 202 if any(new for _, new in created) else 200
    return {"commit": {"repo": created[0][0].repo, "commit": commit, "branch": branch}, "jobs": jobs}


def get_commits() -> dict:
    q = bottle.request.query
    return {"commits": dispatcher().commits(request.text(q, "repo"), request.limit(q, 20))}


# --- jobs ----------------------------------------------------------------------------------


def get_jobs() -> dict:
    q = bottle.request.query
    if request.flag(q, "latest"):  # the newest job of each (repository, branch, pipeline)
        if request.text(q, "status") is not None:
            raise BadRequest("latest and status exclude each other")
        jobs = dispatcher().latest_jobs(request.text(q, "repo"), request.limit(q, 50))
    else:
        jobs = dispatcher().jobs(request.text(q, "status"), request.text(q, "repo"), request.limit(q, 50))
    for j in jobs:
        j["url"] = job_url(j["id"])
    return {"jobs": jobs}


def get_job(job_id: str) -> dict:
    data = dispatcher().job(request.job_id(job_id))
    data["url"] = job_url(data["id"])
    return data


def cancel_job(job_id: str) -> dict:
    return dispatcher().cancel(request.job_id(job_id))


def retry_job(job_id: str) -> dict:
    bottle.response.status = 202
    return dispatcher().retry(request.job_id(job_id))


class StreamsElsewhere(NarwhalError):
    """A follow request that reached a worker thread: streams would hold one each."""

    http_status = 503


def get_log(job_id: str) -> Any:
    """The log as text, or as Server-Sent Events (Accept: text/event-stream or follow=1)."""
    jid = request.job_id(job_id)
    d = dispatcher()
    d.job(jid)  # 404 before any streaming starts
    req = bottle.request
    follow = "text/event-stream" in request.header("Accept") or req.query.get("follow") in ("1", "true")
    if not follow:
        bottle.response.content_type = "text/plain; charset=utf-8"
        return logs.plain_log(d, jid)
    after = request.last_event_id(req)
    if not setting(STREAMS):  # the front server streams logs itself; no worker thread may
        raise StreamsElsewhere("this log stream request is not one the server can follow "
                               "(use GET with Accept: text/event-stream or ?follow=1)")
    bottle.response.content_type = "text/event-stream; charset=utf-8"
    bottle.response.set_header("Cache-Control", "no-cache")
    bottle.response.set_header("X-Accel-Buffering", "no")
    return logs.events(d, jid, after)


# --- the event stream ----------------------------------------------------------------------


def get_events() -> Any:
    """Every job and runner change as Server-Sent Events (narwhal.api.events), resumable."""
    req = bottle.request
    after = request.last_event_id(req) if request.header("Last-Event-ID") or req.query.get("after") else None
    if not setting(STREAMS):  # the front server streams events itself; no worker thread may
        raise StreamsElsewhere("this event stream request is not one the server can follow (use GET /events)")
    bottle.response.content_type = "text/event-stream; charset=utf-8"
    bottle.response.set_header("Cache-Control", "no-cache")
    bottle.response.set_header("X-Accel-Buffering", "no")
    return events.stream(dispatcher(), after)


def get_log_times(job_id: str) -> dict:
    """When the log's lines were written, by runs of lines written together (``?after=N``)."""
    q = bottle.request.query
    after = q.get("after") or "0"
    if not (after.isascii() and after.isdigit() and len(after) <= 18):
        raise BadRequest(f"after: expected a line number, got {after[:40]!r}")
    return {"times": dispatcher().log_times(request.job_id(job_id), int(after))}


# --- artifacts -----------------------------------------------------------------------------

# A download is never shown in place: user content under the API's origin must not run there.
ARTIFACT_HEADERS = {"X-Content-Type-Options": "nosniff",
                    "Content-Security-Policy": "default-src 'none'; sandbox",
                    "Cache-Control": "private, max-age=0"}


def artifact_url(job_id: int, path: str) -> str:
    return f"{job_url(job_id)}/artifacts/{quote(path, safe='/')}"


def get_artifacts(job_id: str) -> dict:
    """The job's artifacts: path, size, sha256, when each expires and where to fetch it."""
    jid = request.job_id(job_id)
    rows = dispatcher().artifacts(jid)
    return {"job_id": jid, "artifacts": [{
        "path": row["path"], "size": row["size"], "sha256": row["sha256"],
        "expires": _iso(row["expires_at"]), "expires_at": row["expires_at"], "expired": row["expired"],
        "url": None if row["expired"] else artifact_url(jid, row["path"])} for row in rows]}


def get_artifact(job_id: str, path: str) -> Any:
    """One artifact's bytes (Range, If-None-Match, HEAD): found by the job's manifest, served from
    its content-addressed object; always as a download, never rendered in place."""
    jid = request.job_id(job_id)
    row, file = dispatcher().artifact(jid, path)
    kind, encoding = mimetypes.guess_type(row["path"], strict=False)
    if encoding is not None or kind is None:  # a .tar.gz is a gzip file to a client, not a tar
        kind = "application/gzip" if encoding == "gzip" else "application/octet-stream"
    answer = bottle.static_file(file.name, root=str(file.parent), mimetype=kind, etag=f'"{row["sha256"]}"',
                                headers={**ARTIFACT_HEADERS,
                                         "Content-Disposition": content_disposition(row["path"])})
    if isinstance(answer, bottle.HTTPError):  # a Range past the end (416); the object vanished (404)
        if answer.status_code == 416:
            raise RangeNotSatisfiable(f"Range: not within the artifact's {row['size']} bytes")
        raise NotFound(f"job {jid} has no artifact {path[:200]!r}")
    answer.set_header("X-Checksum-SHA256", row["sha256"])
    return answer


class RangeNotSatisfiable(NarwhalError):
    http_status = 416


def content_disposition(path: str) -> str:
    """``attachment`` with the file's base name: an ASCII fallback and the exact name (RFC 6266)."""
    name = posixpath.basename(path) or "artifact"
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;%' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- runners -------------------------------------------------------------------------------


def get_runners() -> dict:
    return {"runners": dispatcher().runners()}


def post_runner() -> dict:
    runner = dispatcher().add_runner(body())
    bottle.response.status = 201
    return runner


def delete_runner(name: str) -> dict:
    dispatcher().remove_runner(name)
    return {"removed": name}


def drain_runner(name: str) -> dict:
    return dispatcher().drain(name, True)


def resume_runner(name: str) -> dict:
    return dispatcher().drain(name, False)


# --- webhooks ------------------------------------------------------------------------------


def post_hook(forge: str) -> dict:
    """A forge's delivery: the signature first (401, nothing read), then JSON, then jobs."""
    d = dispatcher()
    raw = request.raw_body(d.config.settings.max_hook_body)
    headers = list(bottle.request.headers.items())
    verified = d.verify_hook(forge, headers, raw)
    request.require_json()
    status, answer = d.hook(verified, headers, raw)
    bottle.response.status = status
    return answer


# --- the rest ------------------------------------------------------------------------------


def get_stats() -> dict:
    return dispatcher().stats()


def get_secrets() -> dict:
    """Names, sources, scopes and users of the secrets; never a value (the token is required)."""
    return {"secrets": dispatcher().secrets()}


def get_forges() -> dict:
    """Forges and their commit-status deliveries; never a token."""
    return {"forges": dispatcher().forges()}


def get_nodes() -> dict:
    """The dispatchers on this store (``self``: the one answering), alive or recently gone."""
    return dispatcher().nodes()


def get_health() -> dict:
    """200 while the dispatcher can use its store; 503 with the same body (which node, and why)
    when it cannot, so a load balancer's check takes the node out. Never behind the token; but
    where reads need it (``read_token``), a client without it gets the status alone: the node's
    host and pid, the version and the store's address and error are for readers."""
    body = dispatcher().health()
    if body["status"] != "ok":
        bottle.response.status = 503
    if not bottle.request.environ.get(READER, True):
        return {"status": body["status"]}
    return body


def post_reload() -> dict:
    reload = setting(RELOAD)
    if reload is None:
        raise NotFound("reloading is not enabled on this dispatcher")
    answer = reload()  # what is loaded now (ConfigError: 422 with every problem)
    return answer if isinstance(answer, dict) else {"reloaded": True}


def get_openapi() -> dict:
    return document()


# Paths in OpenAPI spelling ({name}); make_app turns them into Bottle's (<name>).
ROUTES: list[tuple[str, str, Callable[..., Any]]] = [
    ("POST", "/commit", post_commit),
    ("GET", "/commit", get_commits),
    ("GET", "/jobs", get_jobs),
    ("GET", "/jobs/{job_id}", get_job),
    ("POST", "/jobs/{job_id}/cancel", cancel_job),
    ("POST", "/jobs/{job_id}/retry", retry_job),
    ("GET", "/jobs/{job_id}/log", get_log),
    ("GET", "/events", get_events),
    ("GET", "/jobs/{job_id}/log/times", get_log_times),
    ("GET", "/jobs/{job_id}/artifacts", get_artifacts),
    ("GET", "/jobs/{job_id}/artifacts/{path}", get_artifact),
    ("GET", "/runner", get_runners),
    ("POST", "/runner", post_runner),
    ("DELETE", "/runner/{name}", delete_runner),
    ("POST", "/runner/{name}/drain", drain_runner),
    ("POST", "/runner/{name}/resume", resume_runner),
    ("POST", "/hooks/{forge}", post_hook),
    ("GET", "/stats", get_stats),
    ("GET", "/secrets", get_secrets),
    ("GET", "/forges", get_forges),
    ("GET", "/nodes", get_nodes),
    ("GET", "/health", get_health),
    ("POST", "/reload", post_reload),
    ("GET", "/openapi.json", get_openapi),
]
