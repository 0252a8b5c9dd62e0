"""The REST API's Bottle app: the route table mounted behind one guard.

The only place that turns a NarwhalError into an HTTP response (``error_response``).
Every error body is ``{"error": "...", ...}`` with a 4xx status; bad input never
becomes a 500. The handlers live in ``narwhal.api.routes``; what they need (the
dispatcher, the token, the body limit, the reload hook) sits in the app's config.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Callable
from typing import Any

import bottle

from narwhal.api import request, routes
from narwhal.errors import NarwhalError, Unauthorized

log = logging.getLogger(__name__)

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def make_app(dispatcher: Any, *, token: str | None = None, max_body: int = 1024 * 1024,
             reload: Callable[[], None] | None = None) -> bottle.Bottle:
    """Build the Bottle app for ``dispatcher``; ``token`` guards mutating calls."""
    app = bottle.Bottle(catchall=True, autojson=True)
    app.config.update({routes.DISPATCHER: dispatcher, routes.TOKEN: token, routes.MAX_BODY: max_body,
                       routes.RELOAD: reload})
    app.install(guard)
    for method, path, handler in routes.ROUTES:
        app.route(bottle_path(path), method, handler)
    for code in (400, 404, 405, 413, 500):
        app.error(code)(bottle_error)
    return app


def bottle_path(path: str) -> str:
    """``/jobs/{job_id}`` (OpenAPI) as ``/jobs/<job_id>`` (Bottle)."""
    return re.sub(r"\{(\w+)\}", r"<\1>", path)


def error_response(status: int, body: dict) -> bottle.HTTPResponse:
    """The one JSON error helper: every error leaves through here."""
    return bottle.HTTPResponse(
        body=json.dumps(body) + "\n", status=status,
        headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


def guard(callback: Callable) -> Callable:
    """A Bottle plugin around every handler: the token check, then errors as JSON."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            token = routes.setting(routes.TOKEN)
            if token and bottle.request.method in MUTATING:
                check_token(token)
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except NarwhalError as exc:
            return error_response(exc.http_status if exc.http_status < 500 else 503, exc.to_dict())
        except Exception:  # noqa: BLE001 - a bug is a 500 with a JSON body, logged here
            log.exception("%s %s failed", bottle.request.method, bottle.request.path)
            return error_response(500, {"error": "internal error; see the dispatcher's log"})
    return wrapper


def check_token(token: str) -> None:
    scheme, _, given = request.header_bytes("Authorization").partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), token.encode()):
        raise Unauthorized("missing or wrong API token: send 'Authorization: Bearer TOKEN'")


def bottle_error(err: bottle.HTTPError) -> str:
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
