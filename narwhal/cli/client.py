"""The HTTP client the CLI uses to talk to a dispatcher.

It turns transport trouble into ``DispatcherUnreachable`` and 4xx/5xx answers into
``ApiError`` (carrying the status and the server's JSON body), so ``cli.py`` can map
both to one line and an exit status without ever showing a traceback.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Iterator
from typing import Any

import requests

from narwhal.config.settings import DEFAULT_LISTEN
from narwhal.errors import NarwhalError

DEFAULT_URL = f"http://{DEFAULT_LISTEN}"
STREAM_READ_TIMEOUT = 60.0  # the server sends a keepalive comment every 15 s on an idle stream
RECONNECT_DELAY = 1.0
SUBMIT_TIMEOUT = 300.0  # POST /commit fetches the repository into the dispatcher's mirror
RECONNECT_TIMEOUT = 30.0  # give up following a log after this long without a connection


class ApiError(NarwhalError):
    """The dispatcher answered with an error status; ``body`` is its JSON error object."""

    def __init__(self, status: int, body: dict, method: str = "", path: str = ""):
        self.status = status
        self.body = body
        self.method = method
        self.path = path
        super().__init__(str(body.get("error") or f"HTTP {status}"))

    @property
    def problems(self) -> list[str]:
        """The ``problems`` list of a config error, as readable lines."""
        out = []
        for p in self.body.get("problems") or []:
            if isinstance(p, dict):
                where = p.get("file") or ""
                if p.get("line"):
                    where += f":{p['line']}"
                path = f"{p['path']}: " if p.get("path") else ""
                out.append(f"{where}: {path}{p.get('message', '')}" if where else f"{path}{p.get('message', '')}")
            else:
                out.append(str(p))
        return out


class DispatcherUnreachable(NarwhalError):
    """No HTTP answer at all: nothing listens at the URL, or the network is in the way."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach the dispatcher at {url} ({reason}); start one with: narwhal serve")


def describe_connection_error(exc: BaseException) -> str:
    """A few words for why a connection failed ("connection refused", "timed out")."""
    if isinstance(exc, (requests.Timeout, TimeoutError)):
        return "timed out"
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError) or getattr(current, "errno", None) == errno.ECONNREFUSED:
            return "connection refused"
        if isinstance(current, ConnectionResetError):
            return "connection reset"
        text = str(current)
        if "Name or service not known" in text or "nodename nor servname" in text or "NameResolution" in text:
            return "host name not found"
        if "Connection refused" in text:
            return "connection refused"
        current = current.__cause__ or current.__context__ or (current.args[0] if current.args
                                                               and isinstance(current.args[0], BaseException)
                                                               else None)
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                        requests.exceptions.InvalidSchema)):
        return "not a valid http:// URL"
    return type(exc).__name__


class Client:
    """Thin JSON-over-HTTP client for one dispatcher."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 10):
        self.url = url.rstrip("/")
        self.token = token or None
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # a proxy from the environment must not intercept loopback calls

    def headers(self) -> dict[str, str]:
        h = {"Accept": "application/json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def request(self, method: str, path: str, *, params: dict | None = None, body: Any = None,
                timeout: float | None = None) -> Any:
        """One call; the parsed JSON answer, or ApiError / DispatcherUnreachable."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self.session.request(
                method, self.url + path, params=params, headers=self.headers(),
                timeout=timeout or self.timeout,
                **({"json": body} if body is not None else {}),
            )
        except requests.RequestException as exc:
            raise DispatcherUnreachable(self.url, describe_connection_error(exc)) from None
        return self._parse(response, method, path)

    def _parse(self, response: requests.Response, method: str, path: str) -> Any:
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 400:
            if not isinstance(data, dict):
                text = response.text.strip().splitlines()
                data = {"error": f"HTTP {response.status_code}" + (f": {text[0][:200]}" if text else "")}
            raise ApiError(response.status_code, data, method, path)
        if data is None:
            raise ApiError(response.status_code, {"error": f"expected JSON from {method} {path}, got "
                                                  f"{response.headers.get('Content-Type', 'nothing')}"},
                           method, path)
        return data

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """POST; ``timeout`` for calls that may take long (a submission fetches the repository)."""
        return self.request("POST", path, body=body, timeout=timeout)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def log_text(self, job_id: int) -> str:
        """A job's whole log so far, as plain text."""
        return self.log_bytes(job_id).decode("utf-8", errors="replace")

    def log_bytes(self, job_id: int) -> bytes:
        """A job's whole log so far, exactly as the dispatcher sends it (``logs --raw``)."""
        path = f"/jobs/{job_id}/log"
        try:
            response = self.session.get(self.url + path, headers={**self.headers(), "Accept": "text/plain"},
                                        timeout=self.timeout)
        except requests.RequestException as exc:
            raise DispatcherUnreachable(self.url, describe_connection_error(exc)) from None
        if response.status_code >= 400:
            self._parse(response, "GET", path)
        return response.content

    def download(self, path: str, chunk: int = 1024 * 1024) -> Iterator[bytes]:
        """A file's bytes as they come (an artifact); ApiError for an error answer."""
        try:
            response = self.session.get(self.url + path, headers={**self.headers(), "Accept": "*/*"},
                                        timeout=self.timeout, stream=True)
        except requests.RequestException as exc:
            raise DispatcherUnreachable(self.url, describe_connection_error(exc)) from None
        with response:
            if response.status_code >= 400:
                self._parse(response, "GET", path)
            try:
                yield from response.iter_content(chunk)
            except requests.RequestException as exc:
                raise DispatcherUnreachable(self.url, describe_connection_error(exc)) from None

    def log_times(self, job_id: int, after: int = 0) -> list[dict]:
        """When the lines numbered above ``after`` were written: ``{"first", "lines", "at"}`` per run."""
        return self.get(f"/jobs/{job_id}/log/times", after=after)["times"]

    def follow_log(self, job_id: int, after: int = 0) -> Iterator[tuple[int, str, str] | dict]:
        """Yield ``(lineno, text, kind)`` for each log line as it arrives, then the end event's dict.

        ``kind`` is "narwhal" for narwhal's own lines (``event: narwhal``), else "step".

        A dropped connection is resumed with ``Last-Event-ID`` so no line is lost or
        repeated; after RECONNECT_TIMEOUT without a connection it raises DispatcherUnreachable.
        """
        path = f"/jobs/{job_id}/log"
        last = after
        down_since: float | None = None
        connected = False
        while True:
            headers = {**self.headers(), "Accept": "text/event-stream", "Last-Event-ID": str(last)}
            try:
                with self.session.get(self.url + path, headers=headers, stream=True,
                                      timeout=(self.timeout, STREAM_READ_TIMEOUT)) as response:
                    if response.status_code >= 400:
                        self._parse(response, "GET", path)
                    down_since, connected = None, True
                    for event in _sse_events(response):
                        if event.get("event") == "end":
                            yield _end_data(event.get("data", ""), job_id)
                            return
                        if "data" in event:
                            try:
                                last = int(event.get("id", last + 1))
                            except ValueError:
                                last += 1
                            kind = "narwhal" if event.get("event") == "narwhal" else "step"
                            yield last, event["data"], kind
            except requests.RequestException as exc:
                now = time.monotonic()
                down_since = down_since or now
                if not connected or now - down_since >= RECONNECT_TIMEOUT:
                    raise DispatcherUnreachable(self.url, describe_connection_error(exc)) from None
            # The stream ended without an end event (server restart, proxy): resume after a pause.
            time.sleep(RECONNECT_DELAY)

    def close(self) -> None:
        self.session.close()


def _end_data(raw: str, job_id: int) -> dict:
    try:
        data = json.loads(raw)
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    data.setdefault("id", job_id)
    data.setdefault("status", "unknown")
    data.setdefault("reason", None)
    return data


def _sse_events(response: requests.Response) -> Iterator[dict]:
    """Parse Server-Sent Events as they arrive (iter_content yields each chunk when it comes)."""
    event: dict = {}
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if line == "":
                if "data" in event or "event" in event:
                    yield event
                event = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if key == "data" and "data" in event:
                    event["data"] += "\n" + value
                elif key in ("id", "event", "data"):
                    event[key] = value
