"""Browser sessions: the API token exchanged for a cookie, and the CSRF token of each form.

Signing in (``narwhal.web``) checks the API token once and answers a cookie holding a random
session id (``HttpOnly; SameSite=Strict; Path=/``, ``Secure`` when the request came over
HTTPS). The dispatcher keeps sessions in memory (a restart signs everyone out), at most
``MAX_SESSIONS``, each for ``LIFETIME`` seconds. Only a hash of the id is kept, and every
comparison is constant-time.

A session lets a browser *read* where ``settings.read_token`` asks for the token (the
pages, ``GET /events``, a job's log: ``EventSource`` cannot send an Authorization header).
It never authorises a JSON API change: those keep needing ``Authorization: Bearer``. The
pages' own forms change things with the session plus the form's CSRF token, derived from
the session (``csrf_token``). Before signing in, the sign-in form's CSRF token is bound to
a short-lived ``narwhal_login`` cookie the same way (``login_csrf``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie

COOKIE = "narwhal_session"
LOGIN_COOKIE = "narwhal_login"
CSRF_FIELD = "csrf"
LIFETIME = 12 * 3600.0  # seconds a session lasts from sign-in
LOGIN_LIFETIME = 3600.0  # seconds a sign-in form stays valid
MAX_SESSIONS = 1000  # the oldest is dropped past this


@dataclass
class Session:
    key: bytes  # sha256 of the id
    created: float
    expires: float


class Sessions:
    """The dispatcher's signed-in browsers. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time, lifetime: float = LIFETIME):
        self.clock = clock
        self.lifetime = lifetime
        self._secret = secrets.token_bytes(32)  # CSRF derivation; new with every process
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        self._lock = threading.Lock()

    def create(self) -> str:
        """A new session; the id goes into the cookie and nowhere else."""
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        key = _hash(sid)
        with self._lock:
            self._sessions[key] = Session(key, now, now + self.lifetime)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return sid

    def valid(self, sid: str | None) -> bool:
        if not sid or len(sid) > 100:
            return False
        key = _hash(sid)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return False
            if session.expires <= self.clock():
                del self._sessions[key]
                return False
        return True

    def end(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._sessions.pop(_hash(sid), None)

    def csrf_token(self, sid: str) -> str:
        """The CSRF token of every form of this session."""
        return hmac.new(self._secret, b"csrf:" + _hash(sid), hashlib.sha256).hexdigest()

    def check_csrf(self, sid: str | None, given: str | None) -> bool:
        if not sid or not given or not self.valid(sid):
            return False
        return hmac.compare_digest(self.csrf_token(sid).encode(), given.encode("utf-8", "replace"))

    # --- the sign-in form, before there is a session ---------------------------------------

    def login_nonce(self) -> str:
        """A value for the ``narwhal_login`` cookie: its time, and a random part."""
        return f"{int(self.clock())}.{secrets.token_urlsafe(16)}"

    def login_csrf(self, nonce: str) -> str:
        return hmac.new(self._secret, b"login:" + nonce.encode(), hashlib.sha256).hexdigest()

    def check_login_csrf(self, nonce: str | None, given: str | None) -> bool:
        if not nonce or not given or len(nonce) > 100:
            return False
        issued, _, _ = nonce.partition(".")
        if not issued.isdigit() or self.clock() - int(issued) > LOGIN_LIFETIME:
            return False
        return hmac.compare_digest(self.login_csrf(nonce).encode(), given.encode("utf-8", "replace"))


def _hash(sid: str) -> bytes:
    return hashlib.sha256(sid.encode("utf-8", "replace")).digest()


def cookie_value(header: str, name: str) -> str | None:
    """One cookie's value from a ``Cookie`` header; None when absent or unparsable."""
    if not header or name not in header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def set_cookie_header(name: str, value: str, *, max_age: int, secure: bool, path: str = "/") -> str:
    """A ``Set-Cookie`` value: HttpOnly and SameSite=Strict always, Secure over HTTPS."""
    parts = [f"{name}={value}", f"Path={path}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)
