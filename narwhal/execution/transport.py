"""How narwhal runs a command on a runner: one interface, two ways (SSH or local).

Everything above this module (docker argv, the job runner, health checks) is
written once against ``Transport``; ``SSHTransport`` (ssh.py) sends the argv to
the runner user's ``/bin/sh`` over one held connection, ``LocalTransport``
runs the very same argv as a local subprocess.

Contract shared by both:

* ``run`` collects stdout and stderr separately and returns a ``Result``.
* ``stream`` merges stderr into stdout, hands each decoded line to ``on_line``
  in order (a partial last line is flushed), and returns the exit status.
  ``stdin`` (an async iterator of bytes) is fed and then closed (EOF).
  A ``masker`` (narwhal.masking) masks secrets in the byte stream before it is split
  into lines, so a value split across reads or lines is still found. ``pace``, when given,
  is awaited after each read's lines are handed on: nothing more is read meanwhile, so a
  consumer that falls behind slows the command down (the pipe or SSH window fills).
* ``stream_bytes`` hands stdout, raw and unsplit, to an awaited ``on_chunk`` in pieces
  of at most ``BYTES_CHUNK`` (awaiting it is the back-pressure: nothing more is read
  meanwhile); stderr is read beside it and its first ``STDERR_KEEP`` bytes returned.
  An exception from ``on_chunk`` kills the command and propagates.
* An exit by signal N is reported as ``128 + N``, as a shell would.
* A ``timeout`` that expires kills the command and raises ``TimeoutError``;
  the caller decides what that means.
* Connection problems raise ``RunnerUnreachable`` / ``HostKeyMismatch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from narwhal.config.inventory import Runner
from narwhal.config.settings import DEFAULT_SETTINGS as _CONFIG
from narwhal.config.settings import Settings
from narwhal.masking import Masker

LineCallback = Callable[[str], None]
ChunkCallback = Callable[[bytes], Awaitable[None]]
BYTES_CHUNK = 1024 * 1024  # largest piece stream_bytes hands on; memory per stream is a few of these
STDERR_KEEP = 64 * 1024  # stderr of stream_bytes kept to explain a failure; the rest is read and dropped
LinesCallback = Callable[[list[str]], None]
Pace = Callable[[], Awaitable[None]]  # awaited between reads of a stream: the consumer's back-pressure

# Settings the transports read (scheduler/config may pass a dict or an object). The ones
# a user can set are declared once, in config.Settings; the rest are the transports' own.
DEFAULT_SETTINGS: dict[str, float | int] = {
    "connect_timeout": _CONFIG.connect_timeout,
    "command_timeout": 120.0,  # default for run(): narwhal's own commands are short
    "keepalive_interval": _CONFIG.keepalive_interval,
    "keepalive_count_max": _CONFIG.keepalive_count_max,
    "max_line": _CONFIG.max_line,
    "reconnect_attempts": 3,  # connection attempts before RunnerUnreachable
    "reconnect_backoff": 0.5,  # first back-off delay in seconds, doubled each attempt
}


# What a transport takes its timeouts from: the dispatcher's Settings, a mapping of
# overrides (tests, the bench), or None for the defaults above.
TransportSettings = Settings | Mapping[str, float] | None


def setting(settings: TransportSettings, name: str) -> float:
    """One transport setting from Settings, a mapping or nothing (then the default)."""
    if settings is None:
        return DEFAULT_SETTINGS[name]
    if isinstance(settings, Mapping):
        return settings.get(name, DEFAULT_SETTINGS[name])
    return getattr(settings, name, DEFAULT_SETTINGS[name])


@dataclass
class Result:
    """What a finished command left behind."""

    argv: list[str]
    exit_status: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def output(self) -> str:
        """stdout then stderr, decoded for messages and error classification."""
        return (self.stdout + self.stderr).decode("utf-8", errors="replace")


class LineSplitter:
    """Turns a byte stream into lines; keeps order, flushes the tail; memory bounded by ``max_line``.

    Lines go to ``on_lines`` a chunk's worth at a time (the fast path: one call and one
    decode per read, not per line), or else one by one to ``on_line``.

    A line longer than ``max_line`` bytes is handed on as soon as it passes the limit:
    its first ``max_line`` bytes (never half a UTF-8 character) and a visible marker.
    The rest of that line, up to the next newline, is dropped as it arrives, so the
    unfinished line held here never exceeds ``max_line`` bytes whatever a step prints.
    """

    def __init__(self, on_line: LineCallback | None = None, on_lines: LinesCallback | None = None,
                 max_line: int | None = None, masker: Masker | None = None):
        if (on_line is None) == (on_lines is None):
            raise TypeError("give exactly one of on_line and on_lines")
        if on_lines is None:
            assert on_line is not None
            one = on_line

            def each(lines: list[str]) -> None:
                for line in lines:
                    one(line)

            on_lines = each
        self._on_lines: LinesCallback = on_lines
        self.max_line = _CONFIG.max_line if max_line is None else max_line
        if self.max_line < 1:
            raise ValueError(f"max_line must be >= 1, got {self.max_line}")
        self._partial = bytearray()  # the unfinished line: at most max_line bytes
        self._dropping = False  # the unfinished line was cut: drop bytes until a newline
        self._masker = masker if masker else None  # before lines and cuts: nothing unmasked is seen

    @staticmethod
    def limit(settings: TransportSettings) -> int:
        """``max_line`` from the transports' settings (Settings, a mapping or None)."""
        return int(setting(settings, "max_line"))

    def feed(self, data: bytes) -> None:
        if self._masker is not None:
            data = self._masker.feed(data)
        self._split(data)

    def _split(self, data: bytes) -> None:
        if not data:
            return
        last = data.rfind(b"\n")
        if last < 0:
            self._hold(data)
            return
        lines: list[str] = []
        start = 0
        if self._dropping or self._partial:
            first = data.find(b"\n")
            if not self._dropping:  # finish the held line with this chunk's first piece
                room = self.max_line - len(self._partial)
                line = self._partial + data[:min(first, room + 1)]
                lines.append(self._cut(line) if first > room else line.decode("utf-8", errors="replace"))
            self._partial.clear()
            self._dropping = False
            start = first + 1
        if start <= last:
            body = data[start:last]
            if len(body) <= self.max_line:
                # One decode for the whole chunk: cheaper than one per line, same result
                # (a UTF-8 sequence never contains the byte 0x0a).
                lines.extend(body.decode("utf-8", errors="replace").split("\n"))
            else:  # a chunk larger than the limit may hold a line that is too long
                lines.extend(self._cut(piece) if len(piece) > self.max_line
                             else piece.decode("utf-8", errors="replace") for piece in body.split(b"\n"))
        self._hold(data[last + 1:])
        if lines:
            self._on_lines(lines)

    def flush(self) -> None:
        if self._masker is not None:
            self._split(self._masker.flush())
        self._dropping = False
        if self._partial:
            line = self._partial.decode("utf-8", errors="replace")
            self._partial.clear()
            self._on_lines([line])

    def _hold(self, data: bytes) -> None:
        """Keep the start of an unfinished line; past max_line, hand on the cut line."""
        if self._dropping or not data:
            return
        room = self.max_line - len(self._partial)
        if len(data) <= room:
            self._partial += data
            return
        line = self._partial + data[:room + 1]  # one byte past the limit, to see where to cut
        self._partial.clear()
        self._dropping = True
        self._on_lines([self._cut(line)])

    def _cut(self, line: bytes | bytearray) -> str:
        """The first max_line bytes of a too-long line, ending on a character, and the marker."""
        end = self.max_line
        while end > 0 and end > self.max_line - 4 and line[end] & 0xC0 == 0x80:
            end -= 1  # line[end] continues a UTF-8 character: cut before that character
        return (line[:end].decode("utf-8", errors="replace")
                + f"… [narwhal: line cut at {self.max_line} bytes]")


def exit_code_of(returncode: int | None) -> int:
    """Shell convention: a negative return code (killed by signal N) becomes 128 + N."""
    if returncode is None:
        return -1
    return 128 - returncode if returncode < 0 else returncode


class Transport:
    """Runs argv lists on one runner. Subclasses: ``LocalTransport``, ``ssh.SSHTransport``."""

    name: str = "?"
    address: str = "?"

    async def run(self, argv: list[str], *, input: bytes | None = None,
                  timeout: float | None = None) -> Result:
        raise NotImplementedError

    async def stream(self, argv: list[str], *, stdin: AsyncIterator[bytes] | None = None,
                     on_line: LineCallback | None = None, on_lines: LinesCallback | None = None,
                     timeout: float | None = None, masker: Masker | None = None, pace: Pace | None = None) -> int:
        """Run ``argv`` with stdout and stderr merged, handing its lines to ``on_line`` one
        by one or to ``on_lines`` in batches, secrets masked, awaiting ``pace`` after each
        read; returns the exit status."""
        raise NotImplementedError

    async def stream_bytes(self, argv: list[str], on_chunk: ChunkCallback, *,
                           timeout: float | None = None) -> tuple[int, bytes]:
        """Run ``argv``; hand its stdout as raw bytes to ``on_chunk`` (awaited, in pieces of at most
        ``BYTES_CHUNK``); return the exit status and the first ``STDERR_KEEP`` bytes of stderr."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release the connection; the transport may be used again afterwards."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.address})>"


class LocalTransport(Transport):
    """Runs commands on this machine: the ``local`` runner, and the same code path as SSH."""

    def __init__(self, name: str = "local", settings: TransportSettings = None):
        self.name = name
        self.address = "local"
        self._command_timeout = float(setting(settings, "command_timeout"))
        self._max_line = LineSplitter.limit(settings)

    async def run(self, argv: list[str], *, input: bytes | None = None,
                  timeout: float | None = None) -> Result:
        timeout = self._command_timeout if timeout is None else timeout
        proc = await _spawn(argv, stdin=asyncio.subprocess.PIPE if input is not None
                            else asyncio.subprocess.DEVNULL,
                            stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        except BaseException:
            await _kill(proc)
            raise
        return Result(list(argv), exit_code_of(proc.returncode), out, err)

    async def stream(self, argv: list[str], *, stdin: AsyncIterator[bytes] | None = None,
                     on_line: LineCallback | None = None, on_lines: LinesCallback | None = None,
                     timeout: float | None = None, masker: Masker | None = None, pace: Pace | None = None) -> int:
        splitter = LineSplitter(on_line, on_lines, max_line=self._max_line, masker=masker)
        proc = await _spawn(argv, stdin=asyncio.subprocess.PIPE if stdin is not None
                            else asyncio.subprocess.DEVNULL,
                            stderr=asyncio.subprocess.STDOUT)
        try:
            async with asyncio.timeout(timeout):
                return await self._pump(proc, stdin, splitter, pace)
        except BaseException:
            await _kill(proc)
            raise

    async def stream_bytes(self, argv: list[str], on_chunk: ChunkCallback, *,
                           timeout: float | None = None) -> tuple[int, bytes]:
        proc = await _spawn(argv, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                            limit=BYTES_CHUNK)
        try:
            async with asyncio.timeout(timeout):
                assert proc.stdout is not None and proc.stderr is not None
                errors = asyncio.ensure_future(keep_head(proc.stderr.read))
                try:
                    while chunk := await proc.stdout.read(BYTES_CHUNK):
                        await on_chunk(chunk)
                    await proc.wait()
                    return exit_code_of(proc.returncode), await errors
                finally:
                    errors.cancel()
        except BaseException:
            await _kill(proc)
            raise

    async def _pump(self, proc: asyncio.subprocess.Process,
                    stdin: AsyncIterator[bytes] | None, splitter: LineSplitter, pace: Pace | None) -> int:
        feeder = None
        if stdin is not None:
            assert proc.stdin is not None
            feeder = asyncio.create_task(feed_stdin(proc.stdin, stdin, proc.stdin.close))
        try:
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(65536):
                splitter.feed(chunk)
                if pace is not None:
                    await pace()
            splitter.flush()
            await proc.wait()
            if feeder is not None:
                await feeder  # re-raises a failure of the stdin source (e.g. SourceError)
        finally:
            if feeder is not None and not feeder.done():
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeder
        return exit_code_of(proc.returncode)


class ByteWriter(Protocol):
    """A process's stdin: asyncio's StreamWriter or asyncssh's SSHWriter."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


async def feed_stdin(writer: ByteWriter, source: AsyncIterator[bytes], eof: Callable[[], None]) -> None:
    """Copy ``source`` into a process's stdin, then send EOF (always, even on failure).

    A process that exits without reading all its input is not an error here:
    its exit status tells the story. A failing source re-raises after EOF, so the
    process is never left waiting for input that will not come.
    """
    try:
        async for chunk in source:
            writer.write(chunk)
            await writer.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        with contextlib.suppress(Exception):
            eof()
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def keep_head(read: Callable[[int], Awaitable[bytes]], keep: int = STDERR_KEEP) -> bytes:
    """Read a stream to its end; return its first ``keep`` bytes (the rest is dropped as it comes)."""
    head = bytearray()
    while data := await read(65536):
        if len(head) < keep:
            head += data[:keep - len(head)]
    return bytes(head)


async def _spawn(argv: list[str], *, stdin: int, stderr: int, limit: int = 65536) -> asyncio.subprocess.Process:
    """Start argv without a shell, in its own process group so a kill reaches children."""
    if not argv:
        raise ValueError("empty argv")
    return await asyncio.create_subprocess_exec(
        *argv, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        start_new_session=True, limit=limit)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 10)


def make_transport(runner: Runner, settings: TransportSettings = None) -> Transport:
    """The transport a runner's config asks for (``ssh`` unless it says ``local``)."""
    kind = runner.transport
    if kind == "local":
        return LocalTransport(runner.name, settings)
    if kind == "ssh":
        from narwhal.execution.ssh import (
            SSHTransport,  # asyncssh is only loaded when needed
        )

        return SSHTransport(runner, settings)
    raise ValueError(f"runner {runner.name}: unknown transport {kind!r}")
