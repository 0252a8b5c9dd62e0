"""A job's artifacts: the collector's tar stream, read safely into a ``Receiver``.

At the end of a job the collector (``docker.collect_artifacts``: the pipeline's image, no
network, the workspace read-only) writes a tar of the matching files to its stdout. That
stream comes back over the runner's one SSH connection (``Transport.stream_bytes``) and
is parsed here, in a worker thread, with ``tarfile`` in stream mode (``r|``: uncompressed,
no seeking), while the next chunks are still arriving.

The collector runs the user's image, so its ``tar`` may say anything: every member is
judged here. Only regular files are stored. Names are normalised (``./a//b`` is
``a/b``); an absolute name, a ``..`` component, a name that is not UTF-8 or has control
characters is refused. A symbolic or hard link is refused when it points out of the
workspace; one that points inside comes back as the file it names when that file is
collected too. Devices, FIFOs and the like are skipped. Each refusal is a note in the
job's log naming the path (never file contents). Headers of their own (GNU long names,
PAX) are bounded, so no member makes the parser hold more than ``MAX_META`` bytes.

The ``Receiver`` (the dispatcher's artifact store) hashes and writes each file as it
streams, and refuses a file that would go over the job's cap or the store's quota:
then collecting stops with a note, and what came in before is kept.
"""

from __future__ import annotations

import asyncio
import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from narwhal.execution.transport import Transport
from narwhal.text import printable

MAX_FILES = 10_000  # members stored per job; then collecting stops
MAX_MEMBERS = 50_000  # members of any kind read (tarfile keeps each one's header in memory)
MAX_PATH = 1024  # characters of one stored path
MAX_META = 1024 * 1024  # bytes of one GNU long-name or PAX header
MAX_NOTES = 20  # refusal notes per job; the rest are counted
TAR_BUFSIZE = 1024 * 1024  # what tarfile reads from the stream at a time
FEED_DEPTH = 8  # chunks queued between the connection and the parsing thread
FEED_CHUNK = 1024 * 1024  # what the connection's reads are gathered into before the thread gets them
TAR_SLACK = 1024 * 1024  # tar headers and padding allowed above the byte cap


class Full(Exception):  # noqa: N818 - a stop condition, not a failure of narwhal's
    """The receiver can take no more (``why``: the job's cap or the store's quota)."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


class Receiver(Protocol):
    """Where collected files go. Called from the parsing thread, never the event loop."""

    def put(self, path: str, size: int, read: Callable[[int], bytes]) -> str:
        """Store ``size`` bytes read with ``read`` as ``path``; its sha256 (hex). Raises ``Full``
        (before reading anything) when ``size`` would go over the job's cap or the store's quota."""

    def alias(self, path: str, target: str) -> bool:
        """``path`` is the same file as the stored ``target``; False if ``target`` was not stored."""

    def commit(self) -> None:
        """Keep what was stored: it becomes the job's artifacts."""

    def abort(self) -> None:
        """Keep nothing (the job was cancelled while collecting)."""


@dataclass
class Collected:
    """What a collection brought: files and bytes stored, notes for the job's log."""

    files: int = 0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)
    refused: int = 0
    stopped: str | None = None  # why collecting stopped early, if it did

    def note(self, text: str) -> None:
        self.refused += 1
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)
        elif len(self.notes) == MAX_NOTES:
            self.notes.append("artifacts: more refusals not shown")


class StreamTooLarge(Exception):  # noqa: N818 - a stop condition
    """The collector sent more than the cap allows (headers included)."""


class _ParserDone(Exception):  # noqa: N818 - the parser stopped reading: so does the connection
    pass


def member_path(name: str) -> str | None:
    """A tar member's name as a stored path (``./a//b/`` -> ``a/b``), or None when it may not be one."""
    if not name or name.startswith("/") or len(name) > MAX_PATH:
        return None
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return None
    try:
        name.encode("utf-8")  # tarfile keeps undecodable bytes as surrogates
    except UnicodeEncodeError:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def link_target(path: str, linkname: str, symbolic: bool) -> str | None:
    """Where a link at ``path`` points, as a stored path; None when that is out of the workspace.

    A symbolic link's target is relative to the link's directory; a hard link names a
    member of the archive (relative to the workspace)."""
    if not linkname or linkname.startswith("/") or "\x00" in linkname:
        return None
    joined = posixpath.join(posixpath.dirname(path), linkname) if symbolic else linkname
    normal = posixpath.normpath(joined)
    if normal.startswith("../") or normal in ("..", "."):
        return None
    return member_path(normal)


class _BoundedInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized GNU long-name and PAX headers before tarfile reads them
    into memory (tarfile would read any size it is told)."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                         tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) and self.size > MAX_META:
            raise tarfile.ReadError(f"a header of {self.size} bytes (at most {MAX_META})")
        return cast(tarfile.TarInfo, super()._proc_member(tar))  # type: ignore[misc]


class Feed:
    """Bytes from the event loop to the parsing thread: a queue of a few chunks (bounded)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = FEED_DEPTH):
        self.loop = loop
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(depth)
        self._buf = memoryview(b"")
        self._eof = False

    # --- the thread's side: a file object for tarfile ---

    def read(self, size: int = -1) -> bytes:
        while not self._buf and not self._eof:
            chunk = asyncio.run_coroutine_threadsafe(self.queue.get(), self.loop).result()
            if chunk is None:
                self._eof = True
            else:
                self._buf = memoryview(chunk)
        if size < 0 or size >= len(self._buf):
            out, self._buf = bytes(self._buf), memoryview(b"")
            return out
        out, self._buf = bytes(self._buf[:size]), self._buf[size:]
        return out

    # --- the loop's side ---

    def end(self) -> None:
        """No more chunks: drop what is queued (the parser may have stopped) and mark the end."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


def parse(source: Feed, receiver: Receiver) -> Collected:
    """(worker thread) Read the tar stream from ``source`` into ``receiver``, member by member."""
    out = Collected()
    seen: set[str] = set()
    links: list[tuple[str, str, str]] = []  # (path, target, kind): resolved once every file is in
    try:
        with tarfile.open(None, "r|", fileobj=cast(Any, source), bufsize=TAR_BUFSIZE,
                          tarinfo=_BoundedInfo) as tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    out.stopped = f"more than {MAX_MEMBERS} entries in the collector's tar stream"
                    break
                if not _take(tar, member, receiver, out, seen, links):
                    break
    except tarfile.ReadError as exc:
        if str(exc) != "empty file" or out.files:
            out.stopped = f"the collector's tar stream is not valid ({printable(str(exc), 200)})"
    except tarfile.TarError as exc:
        out.stopped = f"the collector's tar stream is not valid ({printable(str(exc), 200)})"
    except EOFError:
        out.stopped = "the collector's tar stream ended early"
    except Full as full:
        out.stopped = full.why
    for path, target, kind in links:
        if out.stopped is None and receiver.alias(path, target):
            out.files += 1
        else:
            out.note(f"artifacts: skipped {printable(path, 300)}: a {kind} to {printable(target, 300)}, "
                     "which was not collected")
    return out


def _take(tar: tarfile.TarFile, member: tarfile.TarInfo, receiver: Receiver, out: Collected,
          seen: set[str], links: list[tuple[str, str, str]]) -> bool:
    """One member; False to stop reading."""
    path = member_path(member.name)
    shown = printable(member.name, 300)
    if path is None:
        out.note(f"artifacts: refused {shown}: not a path inside the workspace")
        return True
    if member.isdir() or path in seen:
        return True
    if member.issym() or member.islnk():
        kind = "symbolic link" if member.issym() else "hard link"
        target = link_target(path, member.linkname, member.issym())
        if target is None:
            out.note(f"artifacts: refused {shown}: a {kind} that points out of the workspace")
        else:
            seen.add(path)
            links.append((path, target, kind))
        return True
    if not member.isreg():
        out.note(f"artifacts: skipped {shown}: not a regular file")
        return True
    if len(seen) >= MAX_FILES:
        out.stopped = f"more than {MAX_FILES} files"
        return False
    reader = tar.extractfile(member)
    assert reader is not None  # a regular file
    receiver.put(path, member.size, reader.read)
    seen.add(path)
    out.files += 1
    out.bytes += member.size
    return True


async def collect(transport: Transport, argv: list[str], receiver: Receiver, *, cap: int,
                  timeout: float) -> tuple[Collected, int, bytes]:
    """Run the collector ``argv`` and parse its stdout into ``receiver`` as it arrives.

    Returns what was collected, the collector's exit status (-1 when narwhal stopped it)
    and the start of its stderr. More than ``cap`` bytes (plus tar's own overhead) stops it.
    """
    loop = asyncio.get_running_loop()
    feed = Feed(loop)
    parser = asyncio.ensure_future(asyncio.to_thread(parse, feed, receiver))
    received = 0
    gathered = bytearray()  # SSH packets are 32 KiB: the thread gets them a megabyte at a time

    async def hand_on(data: bytes) -> None:
        put = asyncio.ensure_future(feed.queue.put(data))
        done, _ = await asyncio.wait({put, parser}, return_when=asyncio.FIRST_COMPLETED)
        if put not in done:
            put.cancel()
            raise _ParserDone()

    async def on_chunk(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)
        if received > cap + TAR_SLACK:
            raise StreamTooLarge()
        gathered.extend(chunk)
        if len(gathered) >= FEED_CHUNK:
            data = bytes(gathered)
            gathered.clear()
            await hand_on(data)

    code, errors, stop = -1, b"", None
    try:
        code, errors = await transport.stream_bytes(argv, on_chunk, timeout=timeout)
        if gathered:
            await hand_on(bytes(gathered))
        # The whole stream is queued: let the parser finish it, then mark the end.
        put = asyncio.ensure_future(feed.queue.put(None))
        await asyncio.wait({put, parser}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
    except (_ParserDone, StreamTooLarge, TimeoutError) as exc:
        stop = exc
    finally:
        if not parser.done():
            if stop is not None or code == -1:
                feed.end()  # stopped early (or cancelled): what is queued is not wanted
            await asyncio.wait({parser})
    result = parser.result()
    if isinstance(stop, StreamTooLarge):  # the cause; the parser saw only the stream cut short
        result.stopped = f"the collector sent more than {cap} bytes"
    elif isinstance(stop, TimeoutError):
        result.stopped = f"collecting took longer than {timeout:g}s"
    return result, code, errors
