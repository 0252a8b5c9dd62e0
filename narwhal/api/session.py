"""Browser sessions: the API token exchanged for a cookie, and the CSRF token of each form.

Signing in (``narwhal.web``) checks the API token once and answers a cookie holding a random
session id (``HttpOnly; SameSite=Strict; Path=/``, ``Secure`` when the request came over
HTTPS). Sessions live in the store (``Store.add_session``: only the id's SHA-256, never the
id), so every dispatcher on one database knows them (a cluster behind a load balancer: signed
in at one node is signed in at all, signed out at one is signed out at all) and a restart
keeps them. At most ``MAX_SESSIONS`` (signing in drops the oldest past that, and the expired),
each for ``LIFETIME`` seconds from sign-in. A check is one read of the store; only signing in
and out write. A session is found by the hash of its id, so a lookup's timing tells nothing of
an id; tokens are compared in constant time.

A session lets a browser *read* where ``settings.read_token`` asks for the token (the
pages, ``GET /events``, a job's log: ``EventSource`` cannot send an Authorization header).
It never authorises a JSON API change: those keep needing ``Authorization: Bearer``. The
pages' own forms change things with the session plus the form's CSRF token, an HMAC of the
session's hash under a key the store keeps (``Store.session_secret``: made once, the same on
every node, so a form rendered by one node is accepted by another). Before signing in, the
sign-in form's CSRF token is bound to a short-lived ``narwhal_login`` cookie the same way
(``login_csrf``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie

from narwhal.dispatch.store import Store

COOKIE = "narwhal_session"
LOGIN_COOKIE = "narwhal_login"
CSRF_FIELD = "csrf"
LIFETIME = 12 * 3600.0  # seconds a session lasts from sign-in
LOGIN_LIFETIME = 3600.0  # seconds a sign-in form stays valid
MAX_SESSIONS = 1000  # the oldest is dropped past this
MAX_ID = 100  # longest session id or nonce looked at (ours are 43 characters)


class Sessions:
    """The signed-in browsers of every dispatcher on the store. Thread-safe.

    ``store`` is the store, or a function giving it (the API's app asks its dispatcher only
    when a session is first used)."""

    def __init__(self, store: Store | Callable[[], Store], clock: Callable[[], float] = time.time,
                 lifetime: float = LIFETIME):
        self._store = store
        self.clock = clock
        self.lifetime = lifetime
        self._secret: bytes | None = None  # the store's CSRF key, read once
        self._lock = threading.Lock()

    @property
    def store(self) -> Store:
        return self._store if isinstance(self._store, Store) else self._store()

    def create(self) -> str:
        """A new session; the id goes into the cookie and nowhere else (the store keeps its hash)."""
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        self.store.add_session(_key(sid), now, now + self.lifetime, MAX_SESSIONS)
        return sid

    def valid(self, sid: str | None) -> bool:
        if not sid or len(sid) > MAX_ID:
            return False
        return self.store.session_alive(_key(sid), self.clock())

    def end(self, sid: str | None) -> None:
        if sid and len(sid) <= MAX_ID:
            self.store.end_session(_key(sid))

    def csrf_token(self, sid: str) -> str:
        """The CSRF token of every form of this session (the same on every node)."""
        return hmac.new(self._secret_key(), b"csrf:" + _hash(sid), hashlib.sha256).hexdigest()

    def check_csrf(self, sid: str | None, given: str | None) -> bool:
        if not sid or not given or not self.valid(sid):
            return False
        return hmac.compare_digest(self.csrf_token(sid).encode(), given.encode("utf-8", "replace"))

    def _secret_key(self) -> bytes:
        with self._lock:
            if self._secret is None:
                self._secret = bytes.fromhex(self.store.session_secret())
            return self._secret

    # --- the sign-in form, before there is a session ---------------------------------------

    def login_nonce(self) -> str:
        """A value for the ``narwhal_login`` cookie: its time, and a random part."""
        return f"{int(self.clock())}.{secrets.token_urlsafe(16)}"

    def login_csrf(self, nonce: str) -> str:
        return hmac.new(self._secret_key(), b"login:" + nonce.encode(), hashlib.sha256).hexdigest()

    def check_login_csrf(self, nonce: str | None, given: str | None) -> bool:
        if not nonce or not given or len(nonce) > MAX_ID:
            return False
        issued, _, _ = nonce.partition(".")
        if not (issued.isascii() and issued.isdigit()) or self.clock() - int(issued) > LOGIN_LIFETIME:
            return False
        return hmac.compare_digest(self.login_csrf(nonce).encode(), given.encode("utf-8", "replace"))


def _key(sid: str) -> str:
    """What the store keeps of a session id: its SHA-256, in hex."""
    return _hash(sid).hex()


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
