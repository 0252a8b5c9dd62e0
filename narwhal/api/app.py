"""The REST API's Bottle app: the route table mounted behind one guard.

The only place that turns a NarwhalError into an HTTP response (``error_response``).
Every error body is ``{"error": "...", ...}`` with a 4xx status; bad input never
becomes a 500. The handlers live in ``narwhal.api.routes``; what they need (the
dispatcher, the token, the body limit, the reload hook) sits in the app's config.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import bottle

from narwhal.api import request, routes
from narwhal.api.session import COOKIE, Sessions, cookie_value
from narwhal.config.settings import DEFAULT_SETTINGS, HOOKS_PREFIX
from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.errors import BadRequest, NarwhalError, Unauthorized

log = logging.getLogger(__name__)

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
BOUNDARY = "narwhal.boundary"
SESSIONS = "narwhal.sessions"  # the browsers signed in (narwhal.api.session; pages in narwhal.web)
STOPPING = "narwhal.stopping"  # a threading.Event: set while narwhal serve shuts down


@dataclass(frozen=True)
class Boundary:
    """Who may talk to the API: the names it answers to, and whether reads need the token."""

    listen_host: str | None = None  # the address the server is bound to
    public_names: tuple[str, ...] = ()  # host or host:port, lowercase (settings.public_names)
    read_token: bool = False

    def answers_to(self, name: str, port: int | None) -> bool:
        """Loopback, the listen address (any address when bound to all) or a public name."""
        bare = name.strip("[]")
        listen = (self.listen_host or "").strip("[]").lower()
        if bare == "localhost" or bare == listen:
            return True
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            return self.is_public(name, port)
        # An address in Host cannot come from DNS rebinding (that sends the page's name).
        return address.is_loopback or _is_wildcard(listen) or self.is_public(name, port)

    def is_public(self, name: str, port: int | None) -> bool:
        for entry in self.public_names:
            allowed = request.split_host(entry)
            # No port in Host: the scheme's default, which a TLS proxy in front may have dropped.
            if allowed and allowed[0] == name and (allowed[1] is None or port is None or allowed[1] == port):
                return True
        return False


def _is_wildcard(listen: str) -> bool:
    try:
        return ipaddress.ip_address(listen).is_unspecified
    except ValueError:
        return False


def make_app(dispatcher: Dispatcher, *, token: str | None = None, max_body: int = DEFAULT_SETTINGS.max_body,
             reload: Callable[[], Any] | None = None, boundary: Boundary | None = None,
             streams: bool = False, pages: Callable[[bottle.Bottle], None] | None = None,
             stopping: threading.Event | None = None) -> bottle.Bottle:
    """Build the Bottle app for ``dispatcher``; ``token`` guards mutating calls (and reads with
    ``boundary.read_token``); ``boundary`` says which Host and Origin names are ours.

    Log streams hold a worker thread each, so the app answers them 503 unless ``streams``:
    behind ``narwhal serve`` the front server streams them from its loop instead. Once
    ``stopping`` is set, every request is answered 503 (the dispatcher is shutting down).

    ``pages`` mounts the web dashboard (``narwhal.web.mount``: the layer above this one)."""
    app = bottle.Bottle(catchall=True, autojson=True)
    app.config.update({routes.DISPATCHER: dispatcher, routes.TOKEN: token, routes.MAX_BODY: max_body,
                       routes.RELOAD: reload, BOUNDARY: boundary or Boundary(),
                       routes.STREAMS: streams, SESSIONS: Sessions(lambda: dispatcher.store), STOPPING: stopping or threading.Event()})
    app.install(guard)
    for method, path, handler in routes.ROUTES:
        app.route(bottle_path(path), method, handler)
    if pages is not None:
        pages(app)
    for code in (400, 404, 405, 413, 500):
        app.error(code)(bottle_error)
    return app


def bottle_path(path: str) -> str:
    """``/jobs/{job_id}`` (OpenAPI) as ``/jobs/<job_id>`` (Bottle); ``{path}`` takes slashes too
    (an artifact's path in the workspace)."""
    return re.sub(r"\{(\w+)\}", lambda m: "<path:path>" if m.group(1) == "path" else f"<{m.group(1)}>", path)


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
            check_stopping(routes.setting(STOPPING))
            check_boundary(routes.setting(BOUNDARY), routes.setting(routes.TOKEN), routes.setting(SESSIONS))
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except NarwhalError as exc:
            return error_response(exc.http_status if exc.http_status < 500 else 503, exc.to_dict())
        except Exception:  # noqa: BLE001 - a bug is a 500 with a JSON body, logged here
            log.exception("%s %s failed", bottle.request.method, bottle.request.path)
            return error_response(500, {"error": "internal error; see the dispatcher's log"})
    return wrapper


Admit = Callable[[dict], tuple[int, dict] | None]


def admission(app: bottle.Bottle) -> Admit:
    """The app's boundary check for a request the front server answers itself (log streams):
    given a WSGI environ, None to go ahead, or (status, error body). One rule set for both."""
    def admit(environ: dict) -> tuple[int, dict] | None:
        bottle.request.bind(environ)  # thread-local: the front's loop thread is no WSGI thread
        try:
            check_stopping(app.config[STOPPING])
            check_boundary(app.config[BOUNDARY], app.config[routes.TOKEN], app.config.get(SESSIONS))
        except NarwhalError as exc:
            return exc.http_status, exc.to_dict()
        return None
    return admit


class ShuttingDown(NarwhalError):
    """The dispatcher is stopping: nothing is read or changed any more (its store is closing)."""

    http_status = 503


def check_stopping(stopping: threading.Event) -> None:
    if stopping.is_set():
        raise ShuttingDown("the dispatcher is shutting down; try again once it is back")


# Reads that need the token like any change: what is configured about credentials.
PRIVATE_READS = frozenset({"/secrets"})


def check_boundary(boundary: Boundary, token: str | None, sessions: Sessions | None = None) -> None:
    """Before any handler: our Host; for changes, not cross-site; the token; a JSON body.

    Where reads need the token (``read_token``), a browser's session cookie will do instead
    (``EventSource`` sends no Authorization header); changes and private reads need the token."""
    host = check_host(boundary)
    mutating = bottle.request.method in MUTATING
    if mutating:
        check_same_site(boundary, host)
    path = bottle.request.path
    if path.startswith(HOOKS_PREFIX):
        return  # a forge's delivery: its signature is the proof, checked before anything is read
    private = path in PRIVATE_READS
    if path == "/health" and not mutating:  # a load balancer's probe: no token, but details only to a reader
        bottle.request.environ[routes.READER] = not (token and boundary.read_token) or signed_in(sessions) \
            or has_token(token)
        return
    if token and (mutating or private or boundary.read_token):
        if mutating or private or not signed_in(sessions):
            check_token(token)
    if mutating and request.has_body():
        request.require_json()


def check_host(boundary: Boundary) -> tuple[str, int | None] | None:
    """The request's Host as (name, port); a name that is not ours is a 421 (DNS rebinding)."""
    raw = request.header("Host")
    if not raw:
        return None  # HTTP/1.0 without Host: no browser sends that
    host = request.split_host(raw)
    if host is None:
        raise BadRequest(f"Host: expected NAME[:PORT], got {raw[:100]!r}")
    if not boundary.answers_to(*host):
        raise request.MisdirectedRequest(
            f"Host {raw[:100]!r} is not a name of this dispatcher (a DNS rebinding guard); "
            "to reach it under that name, add it to settings.public_names in inventory.yaml")
    return host


def check_same_site(boundary: Boundary, host: tuple[str, int | None] | None) -> None:
    """A change must come from this dispatcher's own origin or a public name, never another site."""
    if request.header("Sec-Fetch-Site").strip().lower() == "cross-site":
        raise request.Forbidden("cross-site request refused (Sec-Fetch-Site: cross-site)")
    origin = request.header("Origin").strip()
    if not origin:
        return  # not a browser, or a same-origin GET-like navigation
    parts = urlsplit(origin.lower()) if origin.isascii() else None
    default = {"http": 80, "https": 443}.get(parts.scheme) if parts else None
    sender = request.split_host(parts.netloc) if parts and default and not parts.path else None
    if sender is not None:
        sender_port = sender[1] or default
        if host is not None and sender[0] == host[0] and sender_port == (host[1] or default):
            return
        if boundary.is_public(sender[0], sender_port):
            return
    raise request.Forbidden(f"cross-site request refused: Origin {origin[:100]!r} is not this dispatcher; "
                            "to allow a web page there, add its host[:port] to settings.public_names")


def signed_in(sessions: Sessions | None) -> bool:
    """The request carries the cookie of a live session (a signed-in browser)."""
    return sessions is not None and sessions.valid(cookie_value(request.header("Cookie"), COOKIE))


def has_token(token: str) -> bool:
    scheme, _, given = request.header_bytes("Authorization").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token.encode())


def check_token(token: str) -> None:
    if not has_token(token):
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
