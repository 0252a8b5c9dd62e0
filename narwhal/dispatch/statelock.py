"""One dispatcher per state directory: an exclusive ``flock`` on ``STATE_DIR/narwhal.lock``.

A second ``narwhal serve`` on the same state directory would run its start-up recovery
against the first one's jobs; the lock stops it before it opens the store. The kernel
drops the lock when the holder exits, however it exits, so a crash leaves nothing stale.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from narwhal.errors import NarwhalError

LOCK_FILE = "narwhal.lock"


class StateDirLocked(NarwhalError):
    """Another process holds the state directory's lock."""

    http_status = 409


class StateLock:
    """The held lock; ``release`` (or the process ending) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def lock_state_dir(state_dir: Path) -> StateLock:
    """Take the state directory's lock and write our PID into it, or raise StateDirLocked."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f"pid {holder}" if holder.isdigit() else "a process that is still starting"
        raise StateDirLocked(f"state directory {state_dir} is in use by another narwhal serve ({who}); "
                             "stop that one first or pass a different --state") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(path, fd)


def lock_holder(state_dir: Path) -> int | None:
    """The PID written in the lock file (None if there is none); for messages and tests."""
    try:
        text = (state_dir / LOCK_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
