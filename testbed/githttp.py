"""A git server over plain HTTP on 127.0.0.1: bare repositories served as static files (git's
"dumb" HTTP protocol), as any web server could serve them.

``publish(source, name)`` makes ``ROOT/NAME`` a bare copy of a working repository (all its
branches and tags) and runs ``git update-server-info``, which writes the ``info/refs`` and
``objects/info/packs`` files a dumb client reads; call it again after new commits. git's
smart-protocol probe (``info/refs?service=git-upload-pack``) gets the same static file, so
the client falls back to the dumb protocol by itself. Every request is kept in ``seen``.
"""

from __future__ import annotations

import os
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from narwhal.cli.gitrepo import GIT_ENV


class GitHttpServer:
    """Serves the bare repositories under ``root`` at ``http://127.0.0.1:PORT/NAME``."""

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = 0
        self.seen: list[str] = []  # request paths, in order
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base(self) -> str:  # the server's URL, for repository globs: f"{base}/org/*"
        return self.url

    def url_for(self, name: str) -> str:
        return f"{self.url}/{name}"

    def start(self) -> GitHttpServer:
        if self._server is not None:
            return self
        server_self = self
        directory = str(self.root)

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any):
                super().__init__(*args, directory=directory, **kwargs)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server_self.seen.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
                pass

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="git-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> GitHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def publish(self, source: str | os.PathLike, name: str) -> str:
        """Copy every branch and tag of the repository at ``source`` to ``ROOT/NAME`` (bare,
        made on first use) and refresh its dumb-protocol files; returns its URL."""
        bare = self.root / name
        env = {**os.environ, **GIT_ENV}
        if not (bare / "HEAD").exists():
            subprocess.run(["git", "init", "-q", "--bare", str(bare)], env=env, check=True, capture_output=True)
        subprocess.run(["git", "-C", str(source), "push", "-q", "--force", str(bare), "refs/heads/*:refs/heads/*",
                        "refs/tags/*:refs/tags/*"], env=env, check=True, capture_output=True)
        head = subprocess.run(["git", "-C", str(source), "symbolic-ref", "-q", "HEAD"], env=env,
                              capture_output=True, text=True).stdout.strip()
        if head:  # the bare HEAD names the source's branch, as a clone's would
            subprocess.run(["git", "-C", str(bare), "symbolic-ref", "HEAD", head], env=env, check=True,
                           capture_output=True)
        subprocess.run(["git", "-C", str(bare), "update-server-info"], env=env, check=True, capture_output=True)
        return self.url_for(name)

    def add(self, name: str, work: str | os.PathLike, files: dict[str, str]) -> str:
        """A fresh repository at WORK with FILES in one commit, published as ROOT/NAME; its commit."""
        from narwhal.cli.gitrepo import make_git_repo

        path, commit = make_git_repo(str(work), files)
        self.publish(path, name)
        return commit
