"""The dispatcher's artifact store: files jobs kept, content-addressed, with a quota and expiry.

A directory under the state directory::

    STATE_DIR/artifacts/objects/ab/cdef...   one file per distinct content, named by its sha256
    STATE_DIR/artifacts/tmp/                 files being received (renamed into objects/ when whole)

Which job kept which file under which path, and until when, is in the store
(``Store.add_artifacts``; rows, not files, are the manifest): a download looks its path
up there and opens the object by its hash, so no requested path is ever joined onto a
directory. Identical files (the same wheel built twice) are one object.

``Collection`` is the ``narwhal.execution.artifacts.Receiver`` of one job attempt: it hashes
while it writes to a temp file, then renames into ``objects/``; it refuses a file that
would take the job over ``artifacts_job_cap`` or the store over ``artifacts_quota``
(counted in distinct objects, as on disk, plus what is being received). ``sweep`` (run
by the scheduler every ``SWEEP_INTERVAL``) removes the objects no unexpired artifact
names, forgets rows long expired, and temp files a crash left.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from narwhal.config.settings import Settings
from narwhal.dispatch.store import ARTIFACT_ROWS_KEPT, Store
from narwhal.execution.artifacts import Full

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
SWEEP_INTERVAL = 300.0  # seconds between two sweeps
TMP_MAX_AGE = 24 * 3600.0  # a temp file this old is a crash's leftover
SHA256_RE = re.compile(r"[0-9a-f]{64}")


class ArtifactStore:
    """Objects on disk, rows in the store; thread-safe (collections run in worker threads)."""

    def __init__(self, root: Path, store: Store, settings: Callable[[], Settings],
                 clock: Callable[[], float] = time.time):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._used = sum(size for _, size in self._walk())  # bytes of the objects on disk
        self._reserved = 0  # bytes of files being received
        self._pending: dict[str, int] = {}  # objects collections hold but have not recorded yet

    @property
    def used(self) -> int:
        return self._used

    def path_of(self, sha256: str) -> Path:
        """The object's file; only ever from a hash the store recorded (64 hex digits)."""
        if not SHA256_RE.fullmatch(sha256):
            raise ValueError("not a sha256")
        return self.objects / sha256[:2] / sha256[2:]

    def collection(self, job_id: int, attempt: int, expire: float | None, node: str | None = None) -> Collection:
        """Where one attempt's files go; ``node``: the cluster node running it (its rows are written
        only while it holds the attempt)."""
        settings = self.settings()
        keep = settings.artifacts_expire if expire is None else expire
        return Collection(self, job_id, attempt, self.clock() + keep, settings.artifacts_job_cap, node)

    # --- used by Collection (any thread) ---

    def _reserve(self, size: int) -> None:
        quota = self.settings().artifacts_quota
        with self._lock:
            if self._used + self._reserved + size > quota:
                raise Full(f"the artifact store's quota ({quota} bytes, {self._used} used) is reached")
            self._reserved += size

    def _settle(self, tmp: str, sha: str, size: int) -> None:
        """A whole file: into objects/ (or dropped, when that content is there already)."""
        dest = self.path_of(sha)
        with self._lock:
            self._reserved -= size
            self._pending[sha] = self._pending.get(sha, 0) + 1
            if dest.exists():
                os.unlink(tmp)
                return
            dest.parent.mkdir(exist_ok=True)
            os.replace(tmp, dest)
            self._used += size

    def _release(self, shas: list[str], reserved: int = 0) -> None:
        with self._lock:
            self._reserved -= reserved
            for sha in shas:
                left = self._pending.get(sha, 0) - 1
                if left > 0:
                    self._pending[sha] = left
                else:
                    self._pending.pop(sha, None)

    # --- housekeeping ---

    def sweep(self) -> tuple[int, int]:
        """Remove objects no unexpired artifact names and rows expired long ago; (rows, objects)."""
        now = self.clock()
        rows = self.store.prune_artifacts(now - ARTIFACT_ROWS_KEPT)
        removed = 0
        with self._lock:  # no collection settles or records meanwhile
            live = self.store.live_artifact_objects(now) | set(self._pending)
            for path, size in self._walk():
                if path.parent.name + path.name not in live:
                    try:
                        path.unlink()
                    except FileNotFoundError:
                        continue
                    self._used -= size
                    removed += 1
        for leftover in self.tmp.iterdir():
            try:
                if now - leftover.stat().st_mtime > TMP_MAX_AGE:
                    leftover.unlink()
            except OSError:
                continue
        if rows or removed:
            log.info("artifacts: swept %d expired rows, %d objects", rows, removed)
        return rows, removed

    def _walk(self) -> list[tuple[Path, int]]:
        out = []
        for sub in self.objects.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.is_file(follow_symlinks=False):
                    out.append((Path(entry.path), entry.stat(follow_symlinks=False).st_size))
        return out


class Collection:
    """One attempt's files on their way in (a ``narwhal.execution.artifacts.Receiver``)."""

    def __init__(self, artifacts: ArtifactStore, job_id: int, attempt: int, expires_at: float, cap: int,
                 node: str | None = None):
        self.artifacts = artifacts
        self.job_id = job_id
        self.attempt = attempt
        self.node = node
        self.expires_at = expires_at
        self.cap = cap
        self.files: dict[str, tuple[str, int]] = {}  # path -> (sha256, size)
        self.bytes = 0
        self._held: list[str] = []  # objects settled and not yet recorded
        self.done = False

    def put(self, path: str, size: int, read: Callable[[int], bytes]) -> str:
        if self.bytes + size > self.cap:
            raise Full(f"{path} ({size} bytes) would take the job over its cap of {self.cap} bytes")
        self.artifacts._reserve(size)
        tmp = None
        digest = hashlib.sha256()
        try:
            fd, tmp = tempfile.mkstemp(dir=self.artifacts.tmp, prefix=f"{self.job_id}-")
            with os.fdopen(fd, "wb") as out:
                left = size
                while left:
                    data = read(min(CHUNK, left))
                    if not data:
                        raise EOFError("the file ended early")
                    digest.update(data)
                    out.write(data)
                    left -= len(data)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            self.artifacts._settle(tmp, sha, size)
        except BaseException:
            self.artifacts._release([], size)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        self._held.append(sha)
        self.files[path] = (sha, size)
        self.bytes += size
        return sha

    def alias(self, path: str, target: str) -> bool:
        if target not in self.files:
            return False
        self.files[path] = self.files[target]
        return True

    def commit(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.artifacts.store.add_artifacts(self.job_id, self.attempt,
                                               [(p, sha, size) for p, (sha, size) in sorted(self.files.items())],
                                               self.expires_at, node=self.node)
        finally:
            self.artifacts._release(self._held)

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.artifacts._release(self._held)  # the next sweep removes what nothing names
