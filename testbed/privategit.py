"""A git server over smart HTTP on a loopback address: ``git http-backend`` behind a small
HTTP server that wants credentials, as a private repository on a forge does.

``PrivateGitServer(root, authorization=...)`` serves the bare repositories under ROOT at
``http://HOST:PORT/NAME`` and answers 401 (with ``WWW-Authenticate: Basic``) to every
request whose ``Authorization`` header is not exactly AUTHORIZATION. It records every
request it gets (method, path, the ``Authorization`` header as sent) in ``seen``, so a
test can tell which server a credential reached. Faults a test can ask for:

* ``hold()``: each request waits before it is answered until ``release()`` (``holding``
  is set while one waits), so a test can look at the machine while git waits;
* ``redirect_to(base)``: every request is answered ``302`` to the same path under BASE;
* ``remote_error(make)``: the ref advertisement is a smart-HTTP ``ERR`` packet whose text
  is ``make(headers)``, which git prints as ``remote error: TEXT`` (a hostile server that
  echoes what it was sent).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    authorization: str | None
    status: int


class PrivateGitServer:
    """Bare repositories under ROOT over smart HTTP on HOST, for AUTHORIZATION only (None: for anyone)."""

    def __init__(self, root: str, authorization: str | None, host: str = "127.0.0.1"):
        self.root = root
        self.authorization = authorization
        self.host = host
        self.port = 0
        self.holding = threading.Event()
        self._release = threading.Event()
        self._release.set()
        self._redirect: str | None = None
        self._error: Callable[[Any], str] | None = None
        self._lock = threading.Lock()
        self._seen: list[SeenRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # the credential stays out
        return f"PrivateGitServer(root={self.root!r}, url={self.url!r})"

    def start(self) -> PrivateGitServer:
        server_self = self

        class Handler(_Handler):
            git_server = server_self

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"git-http-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> PrivateGitServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def repo_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    @property
    def seen(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._seen)

    def hold(self) -> None:
        """From now on each request waits for ``release()`` before it is answered."""
        self.holding.clear()
        self._release.clear()

    def release(self) -> None:
        self._release.set()

    def redirect_to(self, base: str | None) -> None:
        """Answer every request with a 302 to the same path under BASE (None: serve again)."""
        self._redirect = base.rstrip("/") if base else None

    def remote_error(self, make: Callable[[Any], str] | None) -> None:
        """Answer the ref advertisement with an ``ERR`` packet of ``make(request headers)``."""
        self._error = make

    # --- answering ----------------------------------------------------------------------

    def _record(self, method: str, path: str, headers: Any, status: int) -> None:
        with self._lock:
            self._seen.append(SeenRequest(method, path, headers.get("Authorization"), status))

    def _wait(self) -> None:
        if not self._release.is_set():
            self.holding.set()
            self._release.wait(120)

    def _cgi(self, method: str, target: str, headers: Any, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        parts = urlsplit(target)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": self.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": self.root,
            "PATH_INFO": parts.path,
            "QUERY_STRING": parts.query,
            "REQUEST_METHOD": method,
            "REMOTE_ADDR": "127.0.0.1",
            "REMOTE_USER": "narwhal-test",
            "CONTENT_LENGTH": str(len(body)),
        }
        for header, name in (("Content-Type", "CONTENT_TYPE"), ("Content-Encoding", "HTTP_CONTENT_ENCODING"),
                             ("Git-Protocol", "GIT_PROTOCOL")):
            if headers.get(header):
                env[name] = headers[header]
        proc = subprocess.run([HTTP_BACKEND], input=body, capture_output=True, env=env, timeout=120)
        head, sep, payload = proc.stdout.partition(b"\r\n\r\n")
        if not sep:
            head, _, payload = proc.stdout.partition(b"\n\n")
        status = 200
        answer_headers = []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                answer_headers.append((name, value.strip()))
        return status, answer_headers, payload


def pkt_line(text: str) -> bytes:
    data = text.encode()
    return f"{len(data) + 4:04x}".encode() + data


class _Handler(BaseHTTPRequestHandler):
    git_server: PrivateGitServer
    server_version = "narwhal-test-git"

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
                if len(out) > MAX_BODY:
                    raise ValueError("body too large")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length)

    def _handle(self, method: str) -> None:
        server = self.git_server
        body = self._body()
        server._wait()
        if server._redirect is not None:
            self._send(method, 302, [("Location", server._redirect + self.path)], b"")
            return
        if server.authorization is not None and self.headers.get("Authorization") != server.authorization:
            self._send(method, 401, [("WWW-Authenticate", 'Basic realm="narwhal-test"'),
                                     ("Content-Type", "text/plain")], b"authentication required\n")
            return
        make = server._error
        if make is not None and self.path.split("?", 1)[0].endswith("/info/refs"):
            service = "git-upload-pack"
            data = pkt_line(f"# service={service}\n") + b"0000" + pkt_line(f"ERR {make(self.headers)}\n")
            self._send(method, 200, [("Content-Type", f"application/x-{service}-advertisement")], data)
            return
        status, headers, payload = server._cgi(method, self.path, self.headers, body)
        self._send(method, status, headers, payload)

    def _send(self, method: str, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
        self.git_server._record(method, self.path, self.headers, status)
        self.send_response(status)
        for name, value in headers:
            if name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read ``seen``
