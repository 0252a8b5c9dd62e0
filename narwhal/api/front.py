"""The front server: narwhal's listening port, on one asyncio loop.

cheroot gives every request a worker thread for as long as it lasts, so 64 clients
that follow a log (or send their headers slowly) used to hold all 64 threads and take
``/health`` down. The front reads each request head itself (at most ``HEAD_LIMIT``
bytes within the ``http_timeout`` setting) and then either

* serves ``GET /jobs/ID/log`` as Server-Sent Events from the loop (``logs.follow``):
  a follower costs a coroutine and a socket, not a thread; or
* passes the request, body already read, to the WSGI app on cheroot at a loopback port
  only the front uses, one request per connection (``Connection: close``), and copies
  the answer back. A cheroot thread is thus only held while the app works.

Followers are capped in total and per client address (503 past the cap); a follower
that stops reading is dropped after ``follower_write_timeout``. The caps are read from
the dispatcher's settings at each request, so a reload applies to new followers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import re
import resource
import threading
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

from narwhal.api import events, logs
from narwhal.config.settings import HOOKS_PREFIX
from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.dispatch.events import Batch

log = logging.getLogger(__name__)

HEAD_LIMIT = 64 * 1024  # request line + headers
BODY_TIMEOUT = 30.0  # seconds to send a body of at most max_body bytes
CHUNK = 65536
STOP_TIMEOUT = 10.0  # seconds stop() waits for connections to close unless told less
READ_THREADS = 4  # log reads off the loop; followers at the same place share one read
FEED_INTERVAL = 0.05  # at most this often followers are woken by changes
PEER_HEADER = b"x-narwhal-peer"  # the client address, set for the app (a client's own is dropped)
HOP_HEADERS = {b"connection", b"keep-alive", b"proxy-connection", b"expect", PEER_HEADER}
LOG_PATH = re.compile(rb"/jobs/([0-9]{1,18})/log")
EVENTS_PATH = b"/events"
EVENTS = -1  # the "job id" of a follow request for GET /events
ID_DIGITS = 18


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: each follower holds a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


class Request:
    """A parsed request head: method, target, version and headers (names lowercased)."""

    def __init__(self, raw: bytes, method: bytes, target: bytes, version: bytes,
                 headers: list[tuple[bytes, bytes]]):
        self.raw = raw
        self.method, self.target, self.version = method, target, version
        self.headers = headers
        path, _, query = target.partition(b"?")
        self.path = unquote_to_bytes(path)
        self.query = parse_qsl(query.decode("latin-1"), keep_blank_values=True)

    def header(self, name: bytes) -> bytes:
        return b", ".join(v for k, v in self.headers if k == name)

    def environ(self) -> dict:
        """A WSGI environ of the head (no body): enough for the app's boundary checks."""
        environ = {"REQUEST_METHOD": self.method.decode("latin-1"),
                   "PATH_INFO": self.path.decode("latin-1"),
                   "QUERY_STRING": self.target.partition(b"?")[2].decode("latin-1"),
                   "SERVER_PROTOCOL": self.version.decode("latin-1")}
        for name, _ in self.headers:
            key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
            environ.setdefault(key, self.header(name).decode("latin-1"))
        return environ

    def query_value(self, name: str) -> str | None:
        found = [v for k, v in self.query if k == name]
        return found[-1] if found else None  # what Bottle's query.get answers

    @property
    def content_length(self) -> int | None:
        raw = self.header(b"content-length")
        if not raw:
            return 0
        return int(raw) if raw.isdigit() and len(raw) <= ID_DIGITS else None


def parse_head(raw: bytes) -> Request | None:
    """None for anything unusual: the front answers such a request 400 itself."""
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[:1] in (b" ", b"\t") or name != name.strip():
            return None
        headers.append((name.lower().replace(b"_", b"-"), value.strip()))
    return Request(raw, parts[0], parts[1], parts[2], headers)


def forwarded_head(req: Request, peer: str) -> bytes:
    """The head for cheroot: one request per connection, the client's address attached."""
    lines = [b" ".join((req.method, req.target, req.version))]
    for line in req.raw[:-4].split(b"\r\n")[1:]:
        name = line.partition(b":")[0].strip().lower().replace(b"_", b"-")
        if name not in HOP_HEADERS:
            lines.append(line)
    lines += [b"Connection: close", b"X-Narwhal-Peer: " + peer.encode()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def simple_response(status: str, body: dict, extra: tuple[str, ...] = ()) -> bytes:
    data = (json.dumps(body) + "\n").encode()
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json", "Cache-Control: no-store",
            f"Content-Length: {len(data)}", f"Date: {formatdate(usegmt=True)}", "Server: narwhal",
            "Connection: close", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


class LogFeed:
    """``logs.LogSource`` over the dispatcher: reads in a small thread pool (shared by the
    followers that ask the same thing at once), changes from one watching thread."""

    def __init__(self, dispatcher: Dispatcher, loop: asyncio.AbstractEventLoop):
        self.dispatcher = dispatcher
        self.loop = loop
        self.pool = concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="narwhal-logread")
        self.version = dispatcher.change_seen()
        self._changed: asyncio.Future[None] = loop.create_future()
        self._reads: dict[tuple, asyncio.Future[Any]] = {}
        self._stopped = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="narwhal-logfeed", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        seen = self.version
        last = 0.0
        while not self._stopped.is_set():
            try:
                changed = self.dispatcher.wait_change(seen, timeout=1.0)
            except Exception:  # noqa: BLE001 - a stopping scheduler; keep the loop alive
                changed = False
                time.sleep(0.1)
            if not changed:
                continue
            pause = FEED_INTERVAL - (time.monotonic() - last)
            if pause > 0:  # bursts of changes wake the followers once
                time.sleep(pause)
            seen = self.dispatcher.change_seen()
            last = time.monotonic()
            with contextlib.suppress(RuntimeError):  # the loop closed
                self.loop.call_soon_threadsafe(self._bump, seen)

    def _bump(self, version: int) -> None:
        self.version = version
        changed, self._changed = self._changed, self.loop.create_future()
        changed.set_result(None)

    def change_seen(self) -> int:
        return self.version

    async def wait_change(self, seen: int, timeout: float) -> bool:
        if self.version != seen:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._changed), timeout)
        except TimeoutError:
            return False
        return True

    async def _shared(self, key: tuple, call: Callable[[], Any]) -> Any:
        key = (*key, self.version)  # a read that started after this version was seen serves all
        future = self._reads.get(key)
        if future is None:
            future = self._reads[key] = asyncio.ensure_future(self.loop.run_in_executor(self.pool, call))
            future.add_done_callback(lambda _: self._reads.pop(key, None))
        return await asyncio.shield(future)

    async def log(self, job_id: int, after: int, limit: int) -> logs.Blocks:
        return await self._shared(("log", job_id, after, limit),
                                  lambda: self.dispatcher.log(job_id, after=after, limit=limit))

    async def job_end(self, job_id: int) -> dict | None:
        return await self._shared(("end", job_id), lambda: self.dispatcher.job_end(job_id))

    async def job_exists(self, job_id: int) -> bool:
        return await self._shared(("exists", job_id), lambda: self.dispatcher.job_exists(job_id))

    async def events(self, after: int | None) -> Batch:
        return await self._shared(("events", after), lambda: self.dispatcher.events.since(after))

    def close(self) -> None:
        self._stopped.set()
        self.pool.shutdown(wait=False, cancel_futures=True)


class FrontServer:
    """The asyncio listener in its own thread: ``start`` binds, ``stop`` closes everything."""

    def __init__(self, dispatcher: Dispatcher, backend: tuple[str, int],
                 admit: Callable[[dict], tuple[int, dict] | None] = lambda environ: None):
        self.dispatcher = dispatcher
        self.backend = backend
        self.admit = admit  # the app's Host/token rules, for the streams served here
        self.followers: dict[str, int] = {}  # client address -> open log streams
        self.loop = asyncio.new_event_loop()
        self.feed: LogFeed | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def follower_count(self) -> int:
        return sum(self.followers.values())

    def settings(self) -> Any:
        return self.dispatcher.config.settings

    # --- life cycle --------------------------------------------------------------------

    def start(self, host: str, port: int, backlog: int = 1024) -> int:
        """Listen on HOST:PORT (0: any free port) and return the port; OSError if taken."""
        raise_fd_limit()
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()

        async def listen() -> None:
            self.feed = LogFeed(self.dispatcher, self.loop)
            self._server = await asyncio.start_server(self._accepted, host, port, backlog=backlog,
                                                      limit=HEAD_LIMIT, reuse_address=True)
            ready.set_result(self._server.sockets[0].getsockname()[1])

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(listen())
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                ready.set_exception(exc)
                return
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="narwhal-front", daemon=True)
        self._thread.start()
        return ready.result(timeout=30)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Close the port and every connection, waiting up to ``timeout`` seconds."""
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.loop.stop()

        if self._thread is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self.loop)
            self._thread.join(timeout=timeout)
        if self.feed is not None:
            self.feed.close()

    # --- a connection ------------------------------------------------------------------

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stopping: asyncio's stream callback would log a cancelled task as an error
        except Exception:  # noqa: BLE001 - one bad connection never stops the loop
            log.exception("front: connection failed")
        finally:
            self._tasks.discard(task)
            await self._close(writer)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Send what is buffered, then close; a client that reads nothing is cut off."""
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), self.settings().follower_write_timeout)
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - closing whatever happened
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("?",))[0]
        writer.transport.set_write_buffer_limits(high=CHUNK)
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.settings().http_timeout)
        except (asyncio.LimitOverrunError, ValueError):
            writer.write(simple_response("431 Request Header Fields Too Large",
                                         {"error": f"request head exceeds {HEAD_LIMIT} bytes"}))
            await self._drain(writer)
            return
        except asyncio.IncompleteReadError:
            return
        except TimeoutError:
            writer.write(simple_response("408 Request Timeout",
                                         {"error": f"request head not received within {self.settings().http_timeout:g}s"}))
            await self._drain(writer)
            return
        req = parse_head(raw)
        if req is None:  # never handed on as sent: cheroot would read it differently
            writer.write(simple_response("400 Bad Request", {"error": (
                "malformed request head: expected a request line and 'Name: value' header lines "
                "(no folded lines, no space before ':')")}))
            await self._drain(writer)
            return
        follow = self._follow_request(req)
        if follow is not None and await self._follow(reader, writer, peer, req, *follow):
            return
        await self._pass(reader, writer, req, peer)

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        await asyncio.wait_for(writer.drain(), self.settings().follower_write_timeout)

    # --- log followers -----------------------------------------------------------------

    def _follow_request(self, req: Request) -> tuple[int, int | None] | None:
        """(job id, resume after) for a log stream the front can serve, (EVENTS, resume after
        or None) for the event stream; None: cheroot's."""
        if req.method == b"GET" and req.path == EVENTS_PATH:
            raw = req.header(b"last-event-id").decode("latin-1") or req.query_value("after") or ""
            if not raw:
                return EVENTS, None
            if not (raw.isascii() and raw.isdigit() and len(raw) <= ID_DIGITS):
                return None  # cheroot answers the 400
            return EVENTS, int(raw)
        match = LOG_PATH.fullmatch(req.path)
        if req.method != b"GET" or match is None:
            return None
        following = (b"text/event-stream" in req.header(b"accept")
                     or req.query_value("follow") in ("1", "true"))
        if not following:
            return None
        raw = req.header(b"last-event-id").decode("latin-1") or req.query_value("after") or "0"
        if not (raw.isascii() and raw.isdigit() and len(raw) <= ID_DIGITS):
            return None  # cheroot answers the 400
        return int(match.group(1)), int(raw)

    async def _follow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str,
                      req: Request, job_id: int, after: int | None) -> bool:
        """Stream the log; False when the app should answer instead (e.g. no such job)."""
        assert self.feed is not None
        # off the loop: a session cookie is checked with a read of the store
        denied = await self.loop.run_in_executor(self.feed.pool, self.admit, req.environ())
        if denied is not None:
            status, body = denied
            writer.write(simple_response(f"{status} {HTTPStatus(status).phrase}", body))
            await self._drain(writer)
            return True
        settings = self.settings()
        if self.followers.get(peer, 0) >= settings.max_followers_per_client:
            refused = (f"too many log streams open from {peer} "
                       f"({settings.max_followers_per_client}); try again later")
        elif self.follower_count >= settings.max_followers:
            refused = f"too many log streams open ({settings.max_followers}); try again later"
        else:
            refused = ""
        if refused:
            writer.write(simple_response("503 Service Unavailable", {"error": refused}, ("Retry-After: 5",)))
            await self._drain(writer)
            return True
        self.followers[peer] = self.followers.get(peer, 0) + 1
        try:
            if job_id == EVENTS:
                await self._stream(reader, writer, req, events.follow(self.feed, after))
                return True
            if not await self.feed.job_exists(job_id):
                return False
            await self._stream(reader, writer, req, logs.follow(self.feed, job_id, after or 0))
            return True
        finally:
            self.followers[peer] -= 1
            if not self.followers[peer]:
                del self.followers[peer]

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: Request,
                      source: AsyncIterator[bytes]) -> None:
        chunked = req.version == b"HTTP/1.1"
        head = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream; charset=utf-8", "Cache-Control: no-cache",
                "X-Accel-Buffering: no", f"Date: {formatdate(usegmt=True)}", "Server: narwhal",
                "Connection: close"] + (["Transfer-Encoding: chunked"] if chunked else [])
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        gone = asyncio.ensure_future(_until_eof(reader))  # a follower that hangs up
        try:
            async for data in source:
                if gone.done():
                    return
                writer.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                await self._drain(writer)  # a follower that stops reading is dropped
            if chunked:
                writer.write(b"0\r\n\r\n")
            await self._drain(writer)
        finally:
            gone.cancel()

    # --- everything else: cheroot ------------------------------------------------------

    async def _pass(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: Request,
                    peer: str) -> None:
        """Read a small body here (so a slow sender holds no thread), then hand over."""
        # Only a body of a stated length is read here, within a deadline; one streamed on
        # (chunked) would hold a worker thread for as long as its sender likes.
        if req.header(b"transfer-encoding"):
            writer.write(simple_response("411 Length Required", {
                "error": "send the request body with a Content-Length (chunked bodies are not accepted)"}))
            await self._drain(writer)
            return
        length = req.content_length
        max_body = self._body_limit(req.path.decode("latin-1"))
        if length is not None and length > max_body:
            writer.write(simple_response("413 Payload Too Large", {
                "error": f"request body is {length} bytes; the limit is {max_body}"}))
            await self._drain(writer)
            await self._discard(reader, length)  # closing on unread bytes would reset the answer
            return
        if length is None:
            writer.write(simple_response("400 Bad Request", {
                "error": "Content-Length: expected one number of bytes"}))
            await self._drain(writer)
            return
        if length and b"100-continue" in req.header(b"expect").lower():
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = await asyncio.wait_for(reader.readexactly(length), BODY_TIMEOUT) if length else b""
        except TimeoutError:
            writer.write(simple_response("408 Request Timeout",
                                         {"error": f"request body not received within {BODY_TIMEOUT:g}s"}))
            await self._drain(writer)
            return
        await self._proxy(writer, forwarded_head(req, peer), body)

    def _body_limit(self, path: str) -> int:
        """The largest body for ``path``: a webhook's size only for a forge that is configured
        (a body is read whole before anyone checks who sent it)."""
        settings = self.settings()
        if path.startswith(HOOKS_PREFIX) and self.dispatcher.config.forge(path[len(HOOKS_PREFIX):]) is None:
            return int(settings.max_body)
        return int(settings.body_limit(path))

    async def _discard(self, reader: asyncio.StreamReader, length: int) -> None:
        """Read and drop up to ``length`` bytes within BODY_TIMEOUT."""
        async def drop() -> None:
            left = length
            while left > 0 and (data := await reader.read(min(CHUNK, left))):
                left -= len(data)

        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(drop(), BODY_TIMEOUT)

    async def _proxy(self, writer: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
        """One whole request (head and body, already read) to cheroot; its answer back."""
        back_reader, back_writer = await asyncio.open_connection(*self.backend, limit=CHUNK)
        try:
            back_writer.write(head + body)
            while data := await back_reader.read(CHUNK):
                writer.write(data)
                await self._drain(writer)
        finally:
            back_writer.transport.abort()


async def _until_eof(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(CHUNK):
            pass


__all__ = ["FrontServer", "LogFeed", "parse_head", "forwarded_head", "raise_fd_limit"]
