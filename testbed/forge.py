"""A stand-in forge: a real HTTP server on 127.0.0.1 that takes commit statuses the way
GitHub, Gitea/Forgejo and GitLab document them, and records the ones it accepted.

It implements the three "create a commit status" endpoints, each with its own rules, written
here from the forges' documentation (not borrowed from ``narwhal.forge``, so a mistake there
is not repeated here):

* GitHub ``POST /repos/{owner}/{repo}/statuses/{sha}``: ``Authorization: Bearer TOKEN`` (401),
  a ``User-Agent`` (403 without), ``state`` one of error|failure|pending|success, optional
  ``target_url``, ``description`` (at most 140 characters) and ``context``;
* Gitea/Forgejo ``POST /api/v1/repos/{owner}/{repo}/statuses/{sha}``: ``Authorization: token
  TOKEN``, ``state`` one of pending|success|error|failure|warning, optional ``target_url``,
  ``description``, ``context``;
* GitLab ``POST /api/v4/projects/{id or url-encoded path}/statuses/{sha}``: ``PRIVATE-TOKEN``,
  ``state`` one of pending|running|success|failed|canceled, optional ``name`` (or ``context``),
  ``target_url``, ``description``, ``ref``, ``coverage``, ``pipeline_id``.

A body field of the wrong type or an unknown one, a state another forge uses, or a commit that
is not 40 hex digits is a 422; a token that does not match is a 401. ``down()`` takes the forge
off the network (connections refused, or with ``refuse=False`` every request answered 503)
and ``up()`` brings it back on the same port; ``answer_next(code)`` makes the next requests
fail with CODE (a 429 or a 500, say). Accepted statuses are kept in order in ``statuses``;
every request, accepted or not, in ``seen``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

KINDS = ("github", "gitea", "forgejo", "gitlab")
MAX_BODY = 64 * 1024
_SHA = re.compile(r"[0-9a-fA-F]{40}")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_ROUTES = [
    ("github", re.compile(r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/statuses/(?P<sha>[^/]+)")),
    ("gitea", re.compile(r"/api/v1/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/statuses/(?P<sha>[^/]+)")),
    ("gitlab", re.compile(r"/api/v4/projects/(?P<project>[^/]+)/statuses/(?P<sha>[^/]+)")),
]
_STATES = {
    "github": {"error", "failure", "pending", "success"},
    "gitea": {"pending", "success", "error", "failure", "warning"},
    "gitlab": {"pending", "running", "success", "failed", "canceled"},
}
_FIELDS = {  # optional fields besides state, and the types each may take
    "github": {"target_url": (str, type(None)), "description": (str, type(None)), "context": (str,)},
    "gitea": {"target_url": (str,), "description": (str,), "context": (str,)},
    "gitlab": {"name": (str,), "context": (str,), "target_url": (str,), "description": (str,), "ref": (str,),
               "coverage": (int, float), "pipeline_id": (int,)},
}


@dataclass(frozen=True)
class RecordedStatus:
    """One commit status the stand-in accepted."""

    kind: str  # github | gitea | forgejo | gitlab
    path: str  # the request path as sent (GitLab's project path still encoded)
    sha: str
    state: str  # in the forge's words
    context: str  # GitLab's name
    description: str | None
    target_url: str | None
    time: float


@dataclass(frozen=True)
class Seen:
    """One request the stand-in answered (accepted or not)."""

    method: str
    path: str
    status: int


class StandInForge:
    """A forge on 127.0.0.1 that answers the commit-status calls of KINDS for TOKEN."""

    def __init__(self, token: str, kinds: str | tuple[str, ...] = KINDS, host: str = "127.0.0.1"):
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"unknown forge kinds {sorted(unknown)}; expected some of {', '.join(KINDS)}")
        self.token = token
        self.kinds = kinds
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._statuses: list[RecordedStatus] = []
        self._seen: list[Seen] = []
        self._unavailable = False
        self._forced: list[int] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # the token stays out
        return f"StandInForge(kinds={self.kinds!r}, url={self.url!r}, running={self.running})"

    # --- life ---------------------------------------------------------------------------

    def start(self) -> StandInForge:
        if self._server is None:
            self._serve()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> StandInForge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def down(self, refuse: bool = True) -> None:
        """An outage: connections refused (the port closed), or with ``refuse=False`` a 503 for all."""
        if refuse:
            self.stop()
        else:
            self._unavailable = True

    def up(self) -> None:
        """Back from an outage, on the same port."""
        self._unavailable = False
        if self._server is None:
            self._serve()

    def answer_next(self, status: int, count: int = 1) -> None:
        """The next COUNT requests get STATUS (with a JSON message) whatever they ask."""
        with self._lock:
            self._forced += [status] * count

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        """The API base to configure as the forge's ``url``."""
        return f"http://{self.host}:{self.port}"

    @property
    def statuses(self) -> list[RecordedStatus]:
        with self._lock:
            return list(self._statuses)

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[RecordedStatus]:
        """The accepted statuses once there are COUNT of them (TimeoutError after TIMEOUT)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.statuses
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise TimeoutError(f"{len(self.statuses)} statuses after {timeout}s, expected {count}")

    def _serve(self) -> None:
        forge = self

        class Handler(_Handler):
            stand_in = forge

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"stand-in-forge-{self.port}", daemon=True)
        self._thread.start()

    # --- answering ------------------------------------------------------------------------

    def _answer(self, method: str, path: str, headers: Any, body: bytes | None) -> tuple[int, dict]:
        with self._lock:
            forced = self._forced.pop(0) if self._forced else None
        if forced is not None:
            return forced, {"message": f"stand-in answers {forced}"}
        if self._unavailable:
            return 503, {"message": "Service Unavailable"}
        route = next(((kind, m) for kind, pattern in _ROUTES if (m := pattern.fullmatch(path.split("?", 1)[0]))), None)
        if route is None:
            return 404, {"message": "Not Found"}
        kind, match = route
        if kind == "gitea":
            kind = "gitea" if "gitea" in self.kinds else "forgejo"
        if kind not in self.kinds:
            return 404, {"message": "Not Found"}
        if method != "POST":
            return 405, {"message": "Method Not Allowed"}
        rules = "gitea" if kind == "forgejo" else kind
        if not self._authorized(rules, headers):
            return 401, {"message": "Bad credentials" if rules == "github" else "401 Unauthorized"}
        if rules == "github" and not headers.get("User-Agent"):
            return 403, {"message": "Request forbidden by administrative rules. "
                                    "Please make sure your request has a User-Agent header"}
        if body is None:
            return 411, {"message": "Length Required"}
        try:
            data = json.loads(body)
        except ValueError:
            return 400, {"message": "Problems parsing JSON"}
        problem = self._problem(rules, match, data)
        if problem:
            return 422, {"message": "Validation Failed", "errors": [problem]}
        name = data.get("name", data.get("context")) if rules == "gitlab" else data.get("context")
        record = RecordedStatus(kind, path, match.group("sha").lower(), data["state"], name or "default",
                                data.get("description"), data.get("target_url"), time.time())
        with self._lock:
            self._statuses.append(record)
            number = len(self._statuses)
        answer = {"id": number, "state": record.state, "description": record.description,
                  "target_url": record.target_url, "sha": record.sha,
                  ("name" if rules == "gitlab" else "context"): record.context}
        return 201, answer

    def _authorized(self, rules: str, headers: Any) -> bool:
        if rules == "gitlab":
            return headers.get("PRIVATE-TOKEN") == self.token
        scheme = "Bearer" if rules == "github" else "token"
        return headers.get("Authorization") == f"{scheme} {self.token}"

    @staticmethod
    def _problem(rules: str, match: re.Match[str], data: Any) -> str | None:
        if not _SHA.fullmatch(match.group("sha")):
            return "sha must be 40 hex digits"
        if rules == "gitlab":
            project = unquote(match.group("project"))
            if not (project.isdigit() or (project.count("/") >= 1 and all(_NAME.fullmatch(p) for p in project.split("/")))):
                return "project must be an id or a url-encoded namespace/project path"
        elif not (_NAME.fullmatch(match.group("owner")) and _NAME.fullmatch(match.group("repo"))):
            return "owner and repo must be plain names"
        if not isinstance(data, dict):
            return "the body must be a JSON object"
        if data.get("state") not in _STATES[rules]:
            return f"state must be one of {', '.join(sorted(_STATES[rules]))}"
        allowed = _FIELDS[rules]
        for key, value in data.items():
            if key == "state":
                continue
            if key not in allowed:
                return f"unknown field {key!r}"
            if isinstance(value, bool) or not isinstance(value, allowed[key]):
                return f"{key} has the wrong type"
        if rules == "github" and isinstance(data.get("description"), str) and len(data["description"]) > 140:
            return "description is too long (maximum is 140 characters)"
        return None


class _Handler(BaseHTTPRequestHandler):
    stand_in: StandInForge
    server_version = "stand-in-forge"

    def do_POST(self) -> None:
        self._handle("POST")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def _handle(self, method: str) -> None:
        length = self.headers.get("Content-Length")
        body: bytes | None = None
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                size = -1
            if not 0 <= size <= MAX_BODY:
                self._send(413, {"message": "body too large"}, method)
                return
            body = self.rfile.read(size)
        status, answer = self.stand_in._answer(method, self.path, self.headers, body)
        self._send(status, answer, method)

    def _send(self, status: int, answer: dict, method: str) -> None:
        with self.stand_in._lock:
            self.stand_in._seen.append(Seen(method, self.path, status))
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 503:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read ``seen`` instead
