"""The REST API: a Bottle app that turns HTTP into Dispatcher calls and back.

The only place that turns a NarwhalError into an HTTP response (``error_response``).
Every error body is ``{"error": "...", ...}`` with a 4xx status; bad input never
becomes a 500.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import bottle

from narwhal.api.openapi import document
from narwhal.errors import (
    BadRequest,
    NarwhalError,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
)

log = logging.getLogger(__name__)

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
MAX_LIMIT = 1000
SSE_KEEPALIVE = 15.0  # seconds between comments on an idle event stream
LOG_PAGE = 5000  # lines read from the store at a time


def error_response(status: int, body: dict) -> bottle.HTTPResponse:
    """The one JSON error helper: every error leaves through here."""
    return bottle.HTTPResponse(
        body=json.dumps(body) + "\n", status=status,
        headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


def make_app(dispatcher: Any, *, token: str | None = None, max_body: int = 1024 * 1024,
             reload: Callable[[], None] | None = None) -> bottle.Bottle:
    """Build the Bottle app for ``dispatcher``; ``token`` guards mutating calls."""
    app = bottle.Bottle(catchall=True, autojson=True)
    app.config["narwhal.dispatch.dispatcher"] = dispatcher

    def guard(callback: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                if token and bottle.request.method in MUTATING:
                    _check_token(token)
                return callback(*args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except NarwhalError as exc:
                return error_response(exc.http_status if exc.http_status < 500 else 503, exc.to_dict())
            except Exception:  # noqa: BLE001 - a bug is a 500 with a JSON body, logged here
                log.exception("%s %s failed", bottle.request.method, bottle.request.path)
                return error_response(500, {"error": "internal error; see the dispatcher's log"})
        return wrapper

    app.install(guard)

    def body() -> dict:
        return _json_body(max_body)

    # --- commits -------------------------------------------------------------------------

    @app.post("/commit")
    def post_commit() -> Any:
        data = body()
        _only_keys(data, {"repo", "commit", "branch"}, required={"repo", "commit"})
        created = dispatcher.submit(data["repo"], data["commit"], data.get("branch"))
        jobs = [{"id": j.id, "pipeline": j.pipeline, "status": j.status.value, "url": _job_url(j.id)}
                for j, _ in created]
        bottle.response.status = 202 if any(new for _, new in created) else 200
        return {"commit": {"repo": data["repo"], "commit": data["commit"], "branch": data.get("branch")},
                "jobs": jobs}

    @app.get("/commit")
    def get_commits() -> Any:
        q = bottle.request.query
        return {"commits": dispatcher.commits(_text(q, "repo"), _limit(q, 20))}

    # --- jobs ----------------------------------------------------------------------------

    @app.get("/jobs")
    def get_jobs() -> Any:
        q = bottle.request.query
        jobs = dispatcher.jobs(_text(q, "status"), _text(q, "repo"), _limit(q, 50))
        for j in jobs:
            j["url"] = _job_url(j["id"])
        return {"jobs": jobs}

    @app.get("/jobs/<job_id>")
    def get_job(job_id: str) -> Any:
        data = dispatcher.job(_job_id(job_id))
        data["url"] = _job_url(data["id"])
        return data

    @app.post("/jobs/<job_id>/cancel")
    def cancel_job(job_id: str) -> Any:
        return dispatcher.cancel(_job_id(job_id))

    @app.post("/jobs/<job_id>/retry")
    def retry_job(job_id: str) -> Any:
        bottle.response.status = 202
        return dispatcher.retry(_job_id(job_id))

    @app.get("/jobs/<job_id>/log")
    def get_log(job_id: str) -> Any:
        jid = _job_id(job_id)
        dispatcher.job(jid)  # 404 before any streaming starts
        req = bottle.request
        follow = "text/event-stream" in req.headers.get("Accept", "") or req.query.get("follow") in ("1", "true")
        if not follow:
            bottle.response.content_type = "text/plain; charset=utf-8"
            return _plain_log(dispatcher, jid)
        after = _last_event_id(req)
        bottle.response.content_type = "text/event-stream; charset=utf-8"
        bottle.response.set_header("Cache-Control", "no-cache")
        bottle.response.set_header("X-Accel-Buffering", "no")
        return _events(dispatcher, jid, after)

    # --- runners -------------------------------------------------------------------------

    @app.get("/runner")
    def get_runners() -> Any:
        return {"runners": dispatcher.runners()}

    @app.post("/runner")
    def post_runner() -> Any:
        runner = dispatcher.add_runner(body())
        bottle.response.status = 201
        return runner

    @app.delete("/runner/<name>")
    def delete_runner(name: str) -> Any:
        dispatcher.remove_runner(name)
        return {"removed": name}

    @app.post("/runner/<name>/drain")
    def drain_runner(name: str) -> Any:
        return dispatcher.drain(name, True)

    @app.post("/runner/<name>/resume")
    def resume_runner(name: str) -> Any:
        return dispatcher.drain(name, False)

    # --- the rest ------------------------------------------------------------------------

    @app.get("/stats")
    def get_stats() -> Any:
        return dispatcher.stats()

    @app.get("/health")
    def get_health() -> Any:
        return dispatcher.health()

    @app.post("/reload")
    def post_reload() -> Any:
        if reload is None:
            raise NotFound("reloading is not enabled on this dispatcher")
        reload()
        return {"reloaded": True}

    @app.get("/openapi.json")
    def get_openapi() -> Any:
        return document()

    for code in (400, 404, 405, 413, 500):
        app.error(code)(_bottle_error)
    return app


def _bottle_error(err: bottle.HTTPError) -> str:
    """Errors Bottle raises itself (unknown route, wrong method): JSON like ours."""
    bottle.response.content_type = "application/json"
    messages = {404: f"no such endpoint: {bottle.request.method} {bottle.request.path}",
                405: f"method {bottle.request.method} not allowed on {bottle.request.path}",
                413: "request body too large"}
    message = messages.get(err.status_code) or (err.body if isinstance(err.body, str) and err.body
                                                else "request failed")
    if err.status_code >= 500:
        message = "internal error; see the dispatcher's log"
    return json.dumps({"error": message}) + "\n"


# --- request helpers -----------------------------------------------------------------------


def _check_token(token: str) -> None:
    header = bottle.request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("missing or wrong API token: send 'Authorization: Bearer TOKEN'")


def _json_body(max_body: int) -> dict:
    length = bottle.request.content_length
    if length > max_body:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {max_body}")
    raw = bottle.request.body.read(max_body + 1)
    if len(raw) > max_body:
        raise PayloadTooLarge(f"request body exceeds {max_body} bytes")
    if not raw.strip():
        raise BadRequest("expected a JSON object in the request body, got nothing")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"expected a JSON object, got {type(data).__name__}")
    return data


def _only_keys(data: dict, allowed: set[str], required: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(data))
    if missing:
        raise BadRequest(f"missing field(s): {', '.join(missing)}")


def _text(query: Any, name: str) -> str | None:
    value = query.getunicode(name) if name in query else None
    if value is None:
        if name in query:
            raise BadRequest(f"{name}: expected UTF-8 text")
        return None
    if len(value) > 2048:
        raise BadRequest(f"{name}: at most 2048 characters")
    return value


def _limit(query: Any, default: int) -> int:
    raw = query.get("limit")
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"limit: expected an integer from 1 to {MAX_LIMIT}, got {raw!r}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise BadRequest(f"limit: expected an integer from 1 to {MAX_LIMIT}, got {value}")
    return value


def _job_id(raw: str) -> int:
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound(f"no job {raw!r}: job ids are positive integers")
    return int(raw)


def _job_url(job_id: int) -> str:
    return f"/jobs/{job_id}"


def _last_event_id(req: Any) -> int:
    raw = req.headers.get("Last-Event-ID") or req.query.get("after") or "0"
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"Last-Event-ID: expected a line number, got {raw!r}") from None
    if value < 0:
        raise BadRequest("Last-Event-ID: expected a line number >= 0")
    return value


# --- logs --------------------------------------------------------------------------------


def _plain_log(dispatcher: Any, job_id: int) -> Iterator[bytes]:
    after = 0
    while True:
        blocks = dispatcher.store.read_log_blocks(job_id, after=after, limit=LOG_PAGE)
        if not blocks:
            return
        yield "".join("\n".join(lines) + "\n" for _, lines in blocks).encode("utf-8", "replace")
        first, lines = blocks[-1]
        after = first + len(lines) - 1


def _events(dispatcher: Any, job_id: int, after: int) -> Iterator[bytes]:
    """Server-Sent Events: one event per log line (id = line number), then ``end``."""
    store, scheduler = dispatcher.store, dispatcher.scheduler
    yield b"retry: 1000\n\n"
    idle = 0.0
    while True:
        seen = scheduler.version
        blocks = store.read_log_blocks(job_id, after=after, limit=LOG_PAGE)
        if blocks:
            idle = 0.0
            payload = "".join([f"id: {n}\ndata: {text}\n\n"
                               for first, lines in blocks for n, text in enumerate(lines, start=first)])
            first, lines = blocks[-1]
            after = first + len(lines) - 1
            # A bare CR would end an SSE line early; log lines never hold "\n".
            yield payload.replace("\r", "").encode("utf-8", "replace")
            continue
        job = store.get_job(job_id)
        if job is None or job.is_final:
            if store.read_log(job_id, after=after, limit=1):
                continue  # lines written just before the end
            end = {"status": job.status.value if job else "unknown", "reason": job.reason if job else None,
                   "id": job_id}
            yield f"event: end\ndata: {json.dumps(end)}\n\n".encode()
            return
        if not scheduler.wait_change(seen, timeout=1.0):
            idle += 1.0
            if idle >= SSE_KEEPALIVE:
                idle = 0.0
                yield b": keepalive\n\n"

