"""``narwhal serve``: the Bottle app on cheroot (a threaded production WSGI server)
beside the scheduler thread, with signals for a clean stop (SIGTERM/SIGINT) and a
config reload (SIGHUP)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bottle
from cheroot import wsgi

from narwhal.api.app import Boundary, admission, make_app
from narwhal.api.front import FrontServer
from narwhal.config.loader import Config, load_config
from narwhal.config.settings import DEFAULT_LISTEN
from narwhal.config.watch import Snapshot, changes, secret_files, snapshot
from narwhal.deadline import Stop, reserve
from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.dispatch.statelock import StateDirLocked, lock_state_dir
from narwhal.dispatch.store import StoreInUse
from narwhal.errors import ConfigError, NarwhalError
from narwhal.masking import LogMasking

log = logging.getLogger(__name__)

SERVER_THREADS = 64  # requests in the app at once (log streams are the front's: no thread each)
BACKEND = ("127.0.0.1", 0)  # cheroot listens here; only the front server talks to it
BACKLOG = 256  # pending connections the kernel queues for us (cheroot's default of 5 drops bursts)
HTTP_STOP_TIMEOUT = 2  # seconds cheroot waits for its request threads at most (less when the grace is short)
WATCH_INTERVAL = 1.0  # seconds between looks at the config directory (a change is taken once it holds still)


class UsageError(NarwhalError):
    """A bad command-line value for serve."""


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen: expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | None) -> str | None:
    """The API token from --token-file, else $NARWHAL_TOKEN (None if neither is given).

    A blank token is refused rather than taken as "no token": it would leave the API open
    on loopback, or lock every change out elsewhere."""
    if token_file:
        try:
            text = Path(token_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise UsageError(f"--token-file: cannot read {token_file}: {reason}") from None
        return check_token(text, f"--token-file {token_file}")
    if "NARWHAL_TOKEN" in os.environ:
        return check_token(os.environ["NARWHAL_TOKEN"], "NARWHAL_TOKEN")
    return None


def check_token(token: str, source: str) -> str:
    """A usable token: surrounding whitespace dropped; not blank; visible ASCII (it travels in a header)."""
    token = token.strip()
    if not token:
        raise UsageError(f"{source}: the API token is empty or only whitespace")
    if not all("!" <= c <= "~" or c == " " for c in token):
        raise UsageError(f"{source}: the API token must be printable ASCII")
    return token


class Server:
    """The dispatcher process: HTTP server + scheduler, started and stopped together."""

    def __init__(self, config_dir: str, state_dir: str | None = None, listen: str = DEFAULT_LISTEN,
                 token: str | None = None, grace: float | None = None, watch: bool = True,
                 pages: Callable[[bottle.Bottle], None] | None = None):
        self.config_dir = config_dir
        self.watch = watch
        self.host, self.port = parse_listen(listen)
        if token is not None:
            token = check_token(token, "the API token")
        if not is_loopback(self.host) and not token:
            raise UsageError(f"listening on {self.host} (not loopback) needs an API token: "
                             "set NARWHAL_TOKEN or pass --token-file")
        seen = snapshot(config_dir)  # before reading: a change made while loading is seen later
        config = load_config(config_dir)
        self._seen: Snapshot = {**seen, **snapshot(config_dir, secret_files(config))}
        # Before anything logs a thing: the dispatcher's own log masks every secret too.
        self.masking = LogMasking(config.secret_values())
        self.masking.install()
        settings = config.settings
        if settings.read_token and not token:
            raise UsageError("settings.read_token is true but no API token is set: "
                             "set NARWHAL_TOKEN or pass --token-file")
        self.grace = grace if grace is not None else settings.stop_grace
        state = Path(state_dir) if state_dir else Path(config_dir) / ".narwhal"
        try:  # before the store is opened: start-up recovery must not run on another's jobs
            self.state_lock = lock_state_dir(state)
        except StateDirLocked as exc:
            raise UsageError(str(exc)) from None
        try:
            self.dispatcher = Dispatcher(config, state)
        except StoreInUse as exc:
            self.state_lock.release()
            raise UsageError(str(exc)) from None
        boundary = Boundary(listen_host=self.host, public_names=settings.public_names,
                            read_token=settings.read_token)
        self.stopping = threading.Event()  # set: every request is answered 503 "shutting down"
        app = make_app(self.dispatcher, token=token, max_body=settings.max_body,
                       reload=self.api_reload, boundary=boundary, stopping=self.stopping, pages=pages)
        # Only the front server talks to cheroot (on a loopback port); the front reads each
        # request head within settings.http_timeout, so a slow client never holds a thread.
        self.httpd = wsgi.Server(BACKEND, app, numthreads=SERVER_THREADS,
                                 server_name="narwhal", timeout=max(1, math.ceil(settings.http_timeout)),
                                 shutdown_timeout=HTTP_STOP_TIMEOUT,
                                 request_queue_size=BACKLOG)
        self.front = FrontServer(self.dispatcher, BACKEND, admission(app))
        self._done = threading.Event()
        self._stop: Stop | None = None  # set by shutdown(): its deadlines bound the whole stop
        self._reload_lock = threading.Lock()

    def reload(self, why: str = "") -> dict:
        """Load the config again; a bad one raises ConfigError and the old one stays.

        ``why`` is what prompted it, for the log (the files that changed, ``SIGHUP``, the API).
        Returns what ``POST /reload`` answers: what is loaded now."""
        with self._reload_lock:
            seen = snapshot(self.config_dir)
            try:
                config = load_config(self.config_dir)
            except ConfigError:
                self._seen = {**seen, **snapshot(self.config_dir, secret_files(self.dispatcher.config))}
                raise
            self.masking.add(config.secret_values())
            self.dispatcher.reload(config)
            self._seen = {**seen, **snapshot(self.config_dir, secret_files(config))}
        log.info("configuration reloaded%s: %s", f" ({why})" if why else "", loaded(config))
        for warning in config.warnings:
            log.warning("config: %s", warning)
        return {"reloaded": True, "runners": [r.name for r in config.runners],
                "pipelines": [p.name for p in config.pipelines], "warnings": [str(w) for w in config.warnings]}

    def api_reload(self) -> dict:
        """``POST /reload`` (``narwhal reload``): a refusal is logged here and answered 422."""
        try:
            return self.reload("asked over the API")
        except ConfigError as exc:
            log.error("reload refused; keeping the running configuration:\n%s", exc)
            raise

    def watch_config(self) -> None:
        """Reload by itself when the config directory's files change (thread; ends with the server).

        A change is taken once two looks in a row agree (an editor's save has ended); a bad
        one is logged once with every problem, and the running configuration stays."""
        pending: Snapshot | None = None
        while not self._done.wait(WATCH_INTERVAL):
            try:
                now = snapshot(self.config_dir, secret_files(self.dispatcher.config))
                if now == self._seen:
                    pending = None
                    continue
                if now != pending:
                    pending = now
                    continue
                pending = None
                what = changes(self._seen, now)
                try:
                    self.reload(what)
                except ConfigError as exc:
                    log.error("config change refused (%s); keeping the running configuration:\n%s", what, exc)
            except Exception:  # noqa: BLE001 - the watch must outlive a surprise
                log.exception("watching %s failed", self.config_dir)

    def run(self) -> None:
        if self.port and not port_free(self.host, self.port):  # before any runner is contacted
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        self.dispatcher.start()
        self.httpd.prepare()
        thread = threading.Thread(target=self.httpd.serve, name="narwhal-http", daemon=True)
        thread.start()
        self.start_front()
        if self.watch:
            threading.Thread(target=self.watch_config, name="narwhal-watch", daemon=True).start()
        log.info("narwhal listening on http://%s:%d (%s; store: %s %s)", self.host, self.port,
                 loaded(self.dispatcher.config), self.dispatcher.store.kind, self.dispatcher.store.path)
        for warning in self.dispatcher.config.warnings:  # as a reload says them
            log.warning("config: %s", warning)
        print(f"narwhal: listening on http://{self.host}:{self.port}", flush=True)
        self._done.wait()
        self.stop(thread)

    def stop(self, http: threading.Thread) -> None:
        """Answer "shutting down" (503) from now on, never from a store being closed; let
        running jobs finish for most of the grace, then stop their steps at once and re-queue
        them for the next start; then close the port and the store. One ``Stop`` bounds every
        wait: the process is gone by the grace."""
        stop = self._stop or Stop.within(self.grace)
        self.stopping.set()
        self.dispatcher.stop_jobs(stop)
        self.front.stop(stop.end.left())
        self.httpd.shutdown_timeout = min(HTTP_STOP_TIMEOUT, stop.end.left())
        self.httpd.stop()
        http.join(timeout=stop.end.left())
        self.dispatcher.stop(stop)
        self.state_lock.release()
        log.info("narwhal stopped (%.1fs after it was asked to; grace %gs)", stop.elapsed(), stop.grace)

    def start_front(self) -> None:
        """The public port: the front server in front of cheroot's loopback one."""
        self.front.backend = (BACKEND[0], self.httpd.bind_addr[1])
        try:
            self.port = self.front.start(self.host, self.port)
        except OSError:
            self.httpd.stop()
            self.dispatcher.stop(0)
            raise

    def shutdown(self) -> None:
        if self._stop is None:  # the grace runs from the first request to stop
            self._stop = Stop.within(self.grace)
        self._done.set()

    def install_signals(self) -> None:
        def on_term(signum: int, frame: Any) -> None:
            if self._done.is_set():
                return
            self.shutdown()
            assert self._stop is not None
            log.info("%s: stopping (grace %gs): running jobs get up to %gs to finish, then their steps are "
                     "stopped and the jobs re-queued for the next start", signal.Signals(signum).name,
                     self.grace, self._stop.grace - reserve(self._stop.grace))

        def on_hup(signum: int, frame: Any) -> None:
            threading.Thread(target=self._reload_logged, daemon=True).start()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)

    def _reload_logged(self) -> None:
        try:
            self.reload("SIGHUP")
        except ConfigError as exc:
            log.error("reload refused; keeping the running configuration:\n%s", exc)


def loaded(config: Config) -> str:
    """``2 runners, 3 pipelines`` for the log."""
    n, m = len(config.runners), len(config.pipelines)
    return f"{n} runner{'s' * (n != 1)}, {m} pipeline{'s' * (m != 1)}"


def serve(config_dir: str, state_dir: str | None, listen: str, token_file: str | None, watch: bool = True,
          pages: Callable[[bottle.Bottle], None] | None = None) -> int:
    """``narwhal serve``; ``pages`` mounts the web dashboard (``narwhal.web.mount``, a layer above)."""
    server = Server(config_dir, state_dir, listen, read_token(token_file), watch=watch, pages=pages)
    server.install_signals()
    try:
        server.run()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"cannot listen on {server.host}:{server.port}: the port is in use (another "
                             "narwhal serve or another program; choose another with --listen HOST:PORT)") from None
        if exc.errno == errno.EACCES:
            raise UsageError(f"cannot listen on {server.host}:{server.port}: permission denied (ports below "
                             "1024 need root; choose another with --listen HOST:PORT)") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"cannot listen on {server.host}:{server.port}: no such address on this "
                             "machine") from None
        raise
    return 0


class ServeFailed(NarwhalError):
    """A ``narwhal serve`` child process exited or never answered."""


@dataclass
class ServeProcess:
    """``narwhal serve`` as a child process on a loopback port: the demo, the end-to-end
    tests and the benchmark all start the real dispatcher this way.

    ``prefix`` is an argv the command runs under (a test's ``ip netns exec NAME``: a dispatcher
    in a network namespace of its own); such a dispatcher listens on ``host``, an address of
    its namespace that this one reaches, and needs a token off loopback."""

    config_dir: Path
    state_dir: Path
    port: int
    log_path: Path
    token: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of ours (e.g. PYTHONPATH)
    cwd: Path | None = None
    args: tuple[str, ...] = ()  # more `narwhal serve` options (e.g. --log-level debug)
    proc: subprocess.Popen | None = None
    prefix: tuple[str, ...] = ()  # the argv `narwhal serve` runs under (it must exec the command)
    host: str = "127.0.0.1"  # the address it listens on (and the url's)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServeFailed("the dispatcher was not started")
        return self.proc.pid

    def start(self, timeout: float = 60) -> ServeProcess:
        """Start the dispatcher and wait until ``GET /health`` answers."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("NARWHAL_TOKEN", None)
        if self.token:
            env["NARWHAL_TOKEN"] = self.token
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "narwhal", "serve", "--config", str(self.config_dir),
                 "--state", str(self.state_dir), "--listen", f"{self.host}:{self.port}", *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=self.cwd, start_new_session=True,  # a Ctrl-C meant for the parent stays there
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServeFailed(f"the dispatcher exited with status {self.proc.returncode}:\n"
                                  f"{self.log_tail()}")
            if self.answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise ServeFailed(f"the dispatcher did not answer on {self.url} within {timeout:g}s:\n"
                          f"{self.log_tail()}")

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 5000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Signal the dispatcher (SIGTERM: a clean stop) and wait; kill it if it hangs."""
        if self.proc is None:
            return None
        self.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode


def port_free(address: str, port: int) -> bool:
    """Can a server bind ADDRESS:PORT now? (servers set SO_REUSEADDR, so TIME_WAIT does not count.)"""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


__all__ = ["Server", "ServeProcess", "ServeFailed", "serve", "parse_listen", "is_loopback", "read_token",
           "UsageError", "free_port"]
