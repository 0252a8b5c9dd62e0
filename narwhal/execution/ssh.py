"""SSH transport: one held asyncssh connection per runner, many channels on it.

The only module that imports asyncssh. Host keys are checked against the
runner's own known_hosts file and fail closed; the user's ``~/.ssh/config`` and
ssh-agent are never consulted, so a runner behaves the same for every user.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shlex
import socket
from collections.abc import AsyncIterator

import asyncssh

from narwhal.config.inventory import Runner
from narwhal.errors import HostKeyMismatch, RunnerUnreachable
from narwhal.execution.transport import (
    BYTES_CHUNK,
    ChunkCallback,
    LineCallback,
    LinesCallback,
    LineSplitter,
    Pace,
    Result,
    Transport,
    TransportSettings,
    exit_code_of,
    feed_stdin,
    keep_head,
    setting,
)
from narwhal.masking import Masker

# asyncssh logs every command it runs (docker argv with `--env NAME=VALUE`) at INFO:
# keep it to warnings, whatever level narwhal itself logs at.
asyncssh.set_log_level(logging.WARNING)

CHANNEL_OPEN_ATTEMPTS = 5  # a busy server (MaxSessions) refuses channels for a while
# The receive window of a bulk channel (stream_bytes): asyncssh's default (2 MiB) is one
# round trip's worth on a fast link; a larger one keeps the runner's sshd sending while
# narwhal hashes and writes. Memory per stream stays bounded by it.
BULK_WINDOW = 8 * 1024 * 1024
# Ciphers in asyncssh's own list, AES-GCM first: with AES-NI it is the fastest (measured on
# this test bed: 624 MB/s against 434 for chacha20-poly1305, for the artifacts' bulk stream) and
# costs both ends about a third less CPU per byte of step output (bench/fleet.py); the rest stay
# as asyncssh orders them, for other CPUs and servers.
ENCRYPTION_ALGS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                   "aes256-ctr", "aes192-ctr", "aes128-ctr"]


def known_hosts_path(runner: Runner) -> str:
    """The runner's known_hosts file, ``~`` expanded."""
    return str(runner.known_hosts_path)


class SSHTransport(Transport):
    """Runs argv on a runner as ``shlex.join(argv)`` through the runner user's ``/bin/sh``."""

    def __init__(self, runner: Runner, settings: TransportSettings = None):
        self.name = runner.name
        self.host = runner.host
        self.port = runner.port
        self.user = runner.user
        self.key = os.path.expanduser(runner.key) if runner.key else None
        self.known_hosts = known_hosts_path(runner)
        self.address = f"{self.host}:{self.port}"
        self._settings = settings
        self._command_timeout = float(setting(settings, "command_timeout"))
        self._max_line = LineSplitter.limit(settings)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._closed_watch: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None

    # --- connection ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None and not (self._closed_watch and self._closed_watch.done())

    async def connect(self) -> asyncssh.SSHClientConnection:
        """The held connection, (re)opened with bounded retries and back-off."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.connected:
                assert self._conn is not None
                return self._conn
            self._forget()
            attempts = max(1, int(setting(self._settings, "reconnect_attempts")))
            delay = float(setting(self._settings, "reconnect_backoff"))
            last: BaseException | None = None
            for attempt in range(attempts):
                if attempt:
                    await asyncio.sleep(delay)
                    delay *= 2
                try:
                    conn = await self._open()
                except (HostKeyMismatch, RunnerUnreachable):
                    raise
                except (TimeoutError, OSError, asyncssh.Error) as exc:
                    last = exc
                    continue
                self._conn = conn
                self._closed_watch = asyncio.ensure_future(conn.wait_closed())
                return conn
            raise RunnerUnreachable(f"runner {self.name} ({self.address}) unreachable: {_describe(last)}")

    async def _open(self) -> asyncssh.SSHClientConnection:
        known_hosts = self._read_known_hosts()
        client_keys = self._read_client_key()
        timeout = float(setting(self._settings, "connect_timeout"))
        try:
            return await asyncio.wait_for(asyncssh.connect(
                self.host, self.port,
                username=self.user,
                client_keys=client_keys,
                known_hosts=known_hosts,
                config=None,
                agent_path=None,
                x509_trusted_certs=None,
                encryption_algs=ENCRYPTION_ALGS,
                connect_timeout=timeout,
                login_timeout=timeout,
                keepalive_interval=float(setting(self._settings, "keepalive_interval")),
                keepalive_count_max=int(setting(self._settings, "keepalive_count_max")),
            ), timeout * 2)
        except asyncssh.HostKeyNotVerifiable:
            raise HostKeyMismatch(
                f"host key mismatch for {self.name} ({self.address}): the key it presented is "
                f"unknown or changed (not in {self.known_hosts}); refusing to connect") from None
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError):
            raise RunnerUnreachable(f"runner {self.name} ({self.address}): private key file "
                                    f"{self.key} is not valid") from None
        except asyncssh.PermissionDenied:
            raise RunnerUnreachable(
                f"runner {self.name} ({self.address}): permission denied for user "
                f"{self.user!r} with key {self.key or '(default keys)'}") from None
        except ValueError:  # asyncssh rejected an option or a file it read: its text may quote it
            raise RunnerUnreachable(f"runner {self.name} ({self.address}): the SSH client refused "
                                    "the connection settings") from None

    # asyncssh's own errors for these files quote the line they choke on: read them here,
    # so no error, health reason or log line carries a byte of a file.

    def _read_known_hosts(self) -> asyncssh.SSHKnownHosts:
        where = f"{self.name} ({self.address})"
        try:
            return asyncssh.read_known_hosts(self.known_hosts)
        except FileNotFoundError:
            raise HostKeyMismatch(
                f"cannot verify the host key of {where}: known_hosts file {self.known_hosts} "
                "not found; refusing to connect") from None
        except OSError:
            raise HostKeyMismatch(f"cannot verify the host key of {where}: cannot read known_hosts "
                                  f"file {self.known_hosts}; refusing to connect") from None
        except (ValueError, asyncssh.Error):  # KeyImportError, bad markers, hashes, lines
            raise HostKeyMismatch(f"cannot verify the host key of {where}: known_hosts file "
                                  f"{self.known_hosts} is not valid; refusing to connect") from None

    def _read_client_key(self) -> list[asyncssh.SSHKeyPair]:
        if not self.key:
            return []
        where = f"runner {self.name} ({self.address})"
        try:
            return list(asyncssh.load_keypairs([self.key]))
        except FileNotFoundError:
            raise RunnerUnreachable(f"{where}: client key {self.key} not found") from None
        except OSError:
            raise RunnerUnreachable(f"{where}: cannot read private key file {self.key}") from None
        except (ValueError, asyncssh.Error):  # KeyImportError, KeyEncryptionError
            raise RunnerUnreachable(f"{where}: private key file {self.key} is not valid "
                                    "(or needs a passphrase)") from None

    def _forget(self) -> None:
        if self._conn is not None:
            self._conn.abort()
        self._conn = None
        if self._closed_watch is not None and not self._closed_watch.done():
            self._closed_watch.cancel()
        self._closed_watch = None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if self._closed_watch is not None and not self._closed_watch.done():
            self._closed_watch.cancel()
        self._closed_watch = None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)

    async def _process(self, argv: list[str], *, merge: bool, bulk: bool = False) -> asyncssh.SSHClientProcess:
        """A new channel running argv; retried while the server refuses channels."""
        if not argv:
            raise ValueError("empty argv")
        command = shlex.join(argv)
        delay = 0.1
        for attempt in range(CHANNEL_OPEN_ATTEMPTS):
            conn = await self.connect()
            try:
                extra = {"window": BULK_WINDOW} if bulk else {}
                return await conn.create_process(
                    command, encoding=None,
                    stderr=asyncssh.STDOUT if merge else asyncssh.PIPE, **extra)
            except asyncssh.ChannelOpenError as exc:
                if attempt == CHANNEL_OPEN_ATTEMPTS - 1:
                    raise RunnerUnreachable(
                        f"runner {self.name} ({self.address}): cannot open a channel: {exc.reason}") from None
            except (OSError, asyncssh.Error) as exc:
                self._forget()
                if attempt == CHANNEL_OPEN_ATTEMPTS - 1:
                    raise self._lost(exc) from None
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _lost(self, exc: BaseException | None = None) -> RunnerUnreachable:
        detail = f": {_describe(exc)}" if exc is not None else ""
        return RunnerUnreachable(f"connection to runner {self.name} ({self.address}) lost{detail}")

    def _exit_code(self, proc: asyncssh.SSHClientProcess) -> int:
        code = proc.returncode
        if code is None:  # no exit-status and no exit-signal: the channel died with the link
            raise self._lost()
        return exit_code_of(code)

    # --- commands ------------------------------------------------------------------

    async def run(self, argv: list[str], *, input: bytes | None = None,
                  timeout: float | None = None) -> Result:
        timeout = self._command_timeout if timeout is None else timeout
        proc = await self._process(argv, merge=False)
        try:
            async with asyncio.timeout(timeout):
                if input:
                    proc.stdin.write(input)
                proc.stdin.write_eof()
                out, err = await asyncio.gather(proc.stdout.read(), proc.stderr.read())
                await proc.wait_closed()
            return Result(list(argv), self._exit_code(proc), out, err)
        except TimeoutError:
            raise  # our own timeout (TimeoutError is an OSError): the caller decides
        except (OSError, asyncssh.Error) as exc:
            raise self._lost(exc) from None
        finally:
            _abandon(proc)

    async def stream(self, argv: list[str], *, stdin: AsyncIterator[bytes] | None = None,
                     on_line: LineCallback | None = None, on_lines: LinesCallback | None = None,
                     timeout: float | None = None, masker: Masker | None = None, pace: Pace | None = None) -> int:
        splitter = LineSplitter(on_line, on_lines, max_line=self._max_line, masker=masker)
        proc = await self._process(argv, merge=True)
        feeder = None
        try:
            async with asyncio.timeout(timeout):
                if stdin is None:
                    proc.stdin.write_eof()
                else:
                    feeder = asyncio.create_task(feed_stdin(proc.stdin, stdin, proc.stdin.write_eof))
                while chunk := await proc.stdout.read(65536):
                    splitter.feed(chunk)
                    if pace is not None:
                        await pace()  # the consumer is behind: the channel's window fills, the runner waits
                splitter.flush()
                await proc.wait_closed()
                if feeder is not None:
                    await feeder
            return self._exit_code(proc)
        except TimeoutError:
            raise  # our own timeout (TimeoutError is an OSError): the caller decides
        except (OSError, asyncssh.Error) as exc:
            raise self._lost(exc) from None
        finally:
            if feeder is not None and not feeder.done():
                feeder.cancel()
                with contextlib.suppress(BaseException):
                    await feeder
            _abandon(proc)

    async def stream_bytes(self, argv: list[str], on_chunk: ChunkCallback, *,
                           timeout: float | None = None) -> tuple[int, bytes]:
        proc = await self._process(argv, merge=False, bulk=True)
        errors = None
        try:
            async with asyncio.timeout(timeout):
                proc.stdin.write_eof()
                # stderr shares the channel's window: read it beside stdout, or it could stall both.
                errors = asyncio.ensure_future(keep_head(proc.stderr.read))
                while chunk := await proc.stdout.read(BYTES_CHUNK):
                    await on_chunk(chunk)
                kept = await errors
                await proc.wait_closed()
            return self._exit_code(proc), kept
        except TimeoutError:
            raise  # our own timeout (TimeoutError is an OSError): the caller decides
        except (OSError, asyncssh.Error) as exc:
            raise self._lost(exc) from None
        finally:
            if errors is not None and not errors.done():
                errors.cancel()
            _abandon(proc)


def _abandon(proc: asyncssh.SSHClientProcess) -> None:
    """Close a channel we no longer read; ask the remote side to stop the command first."""
    if proc.returncode is None:
        with contextlib.suppress(Exception):
            proc.send_signal("KILL")  # the RFC 4254 name
    with contextlib.suppress(Exception):
        proc.close()


def _describe(exc: BaseException | None) -> str:
    """Why a connection failed, in narwhal's words (a library's text may quote what it read)."""
    if exc is None:
        return "no attempt made"
    if isinstance(exc, asyncssh.Error):
        return exc.reason or type(exc).__name__  # what the server or the protocol said
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return "host name not found"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower() if exc.errno in errno.errorcode else "network error"
    if isinstance(exc, OSError):
        return "network error"
    return type(exc).__name__
