"""A git server for tests: bare repositories served read-only over git's dumb HTTP protocol."""

from __future__ import annotations

import functools
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from narwhal.cli.gitrepo import make_git_repo


class GitHttpServer:
    """Bare repositories under ROOT, served on 127.0.0.1 (a free port) until ``stop``."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                server.requests.append(self.path)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> GitHttpServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> GitHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, name: str, work: Path, files: dict[str, str]) -> str:
        """A bare ROOT/NAME made from a fresh repository at WORK; returns its commit."""
        path, commit = make_git_repo(str(work), files)
        bare = self.root / name
        subprocess.run(["git", "clone", "--quiet", "--bare", path, str(bare)], check=True, capture_output=True)
        self.publish(name)
        return commit

    def publish(self, name: str) -> None:
        """After a push into ROOT/NAME: what dumb-HTTP clients read must be rewritten."""
        subprocess.run(["git", "--git-dir", str(self.root / name), "update-server-info"], check=True,
                       capture_output=True)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"
