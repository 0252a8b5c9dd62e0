"""The dispatcher's artifact store: files jobs kept, content-addressed, with a quota and expiry.

A directory, ``settings.artifacts_dir`` (by default ``STATE_DIR/artifacts``)::

    ARTIFACTS_DIR/objects/ab/cdef...   one file per distinct content, named by its sha256
    ARTIFACTS_DIR/tmp/                 files being received (renamed into objects/ when whole)

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

The nodes of a cluster (``settings.cluster``) share one database, and must share one
artifacts directory too (NFS or similar), or a download through a node other than the one
that ran the job finds no object (``ArtifactElsewhere``: 503, saying so). Several writers
on one directory are safe:

* a file is written under a unique temp name in ``tmp/`` (the same file system as
  ``objects/``), fsynced, then renamed into place atomically (and the directory fsynced):
  a reader sees a whole object or none. Two nodes storing the same content at once both
  succeed: the content is the name, so either rename leaves the same bytes.
* an object that is there already is not written again: its modification time is moved to
  now, which is what keeps it from a sweep until the store names it.
* a sweep removes only objects that no unexpired row in the database names (every node's
  jobs) *and* that nobody stored or stored again for ``grace`` seconds (on a cluster an hour
  plus ``artifacts_timeout``: a collection records its rows when it ends, and one running on
  another node is not in this node's ``_pending``; a lone dispatcher's is 0). It moves each one out
  of ``objects/`` first and looks at it again: one stored again meanwhile goes back. So an
  object another node is still writing (in its ``tmp/``, or renamed in and not yet
  recorded) or that another job names stays. The clocks of the nodes and of the file server
  must agree to well within ``grace`` (NTP).
* ``artifacts_quota`` is checked against what this node counted: the objects it found at its
  last sweep (every node's) plus what it stored since.
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
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from narwhal.config.settings import Settings
from narwhal.dispatch.store import ARTIFACT_ROWS_KEPT, Store
from narwhal.errors import NarwhalError
from narwhal.execution.artifacts import Full

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
SWEEP_INTERVAL = 300.0  # seconds between two sweeps
TMP_MAX_AGE = 24 * 3600.0  # a temp file this old is a crash's leftover
GRACE = 3600.0  # on a cluster, an object stored within this (plus artifacts_timeout) is never swept
SHA256_RE = re.compile(r"[0-9a-f]{64}")


class ArtifactElsewhere(NarwhalError):
    """The store lists an artifact whose object is not in this node's artifacts directory: the
    node that collected it keeps it in a directory of its own (a cluster without a shared
    ``artifacts_dir``)."""

    http_status = 503


class ArtifactStore:
    """Objects on disk, rows in the store; thread-safe (collections run in worker threads)."""

    def __init__(self, root: Path, store: Store, settings: Callable[[], Settings],
                 clock: Callable[[], float] = time.time, grace: float | None = None):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.settings = settings
        self.clock = clock
        self._grace = grace  # None: GRACE + artifacts_timeout
        self._lock = threading.Lock()
        self._used = sum(size for _, size, _ in self._walk())  # bytes of the objects on disk
        self._reserved = 0  # bytes of files being received
        self._pending: dict[str, int] = {}  # objects collections hold but have not recorded yet

    @property
    def grace(self) -> float:
        """Seconds an object stored (or stored again) is spared by sweeps, whatever the rows say:
        on a cluster, for the collections of other nodes, which this one cannot see (its own
        are in ``_pending``); a lone dispatcher sees every collection, and needs none."""
        if self._grace is not None:
            return self._grace
        settings = self.settings()
        return GRACE + settings.artifacts_timeout if settings.cluster else 0.0

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
            if _touch(dest):  # there already (maybe another node's): now young again, sweeps spare it
                os.unlink(tmp)
                return
            dest.parent.mkdir(exist_ok=True)
            os.replace(tmp, dest)  # atomic: another node renaming the same content in leaves the same bytes
            _sync_dir(dest.parent)
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
        """Remove objects no unexpired artifact names (of any node) and none stored within
        ``grace``, and rows expired long ago; (rows, objects)."""
        now = self.clock()
        rows = self.store.prune_artifacts(now - ARTIFACT_ROWS_KEPT)
        cutoff = now - self.grace
        removed = 0
        with self._lock:  # no collection of this node settles or records meanwhile
            found = self._walk()
            # The rows are read after the walk: an object stored before the walk and recorded
            # since is named; one stored after it is young.
            live = self.store.live_artifact_objects(now) | set(self._pending)
            used = sum(size for _, size, _ in found)
            for path, size, mtime in found:
                if mtime < cutoff and path.parent.name + path.name not in live:
                    outcome = self._remove(path, cutoff)
                    if outcome != "kept":
                        used -= size
                    if outcome == "removed":
                        removed += 1
            self._used = used  # recounted: other nodes' objects on a shared directory count too
        for leftover in self.tmp.iterdir():
            try:
                if now - leftover.stat().st_mtime > TMP_MAX_AGE:
                    leftover.unlink()
            except OSError:
                continue
        if rows or removed:
            log.info("artifacts: swept %d expired rows, %d objects", rows, removed)
        return rows, removed

    def _remove(self, path: Path, cutoff: float) -> Literal["removed", "kept", "gone"]:
        """Take an object out, unless it was stored again since ``cutoff``: moved aside first,
        then looked at again, so a node that stored it meanwhile (its time moved on, or a new
        file renamed in) keeps it. ``removed``; ``kept``; or ``gone``: another sweep took it."""
        aside = self.tmp / f"swept-{uuid.uuid4().hex}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return "gone"
        try:
            if os.stat(aside).st_mtime < cutoff:
                return "removed"
            try:  # stored again meanwhile: back, unless a fresh copy is in place already
                os.link(aside, path)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                os.replace(aside, path)
            return "kept"
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside)

    def _walk(self) -> list[tuple[Path, int, float]]:
        """(file, size, modification time) of every object; one gone meanwhile is left out."""
        out = []
        for sub in self.objects.iterdir():
            if not sub.is_dir():
                continue
            with contextlib.suppress(FileNotFoundError), os.scandir(sub) as entries:
                for entry in entries:
                    try:
                        if entry.is_file(follow_symlinks=False):
                            info = entry.stat(follow_symlinks=False)
                            out.append((Path(entry.path), info.st_size, info.st_mtime))
                    except FileNotFoundError:
                        continue
        return out


def _touch(path: Path) -> bool:
    """Move a file's modification time to now; False if it is not there (or not ours to touch:
    then a fresh copy is renamed over it)."""
    try:
        os.utime(path)
    except OSError:
        return False
    return True


def _sync_dir(path: Path) -> None:
    """Make a rename into ``path`` durable (a crash after it keeps the name)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
