"""A pipeline's ``clone:``: a workspace with a real ``.git`` and submodules, made on the dispatcher.

Without ``clone:`` a job's source is ``git archive`` of the commit (``Mirror.archive``),
and nothing here runs. With it, ``Workspaces.prepare`` makes one tar file per (repository,
commit, options) under ``STATE_DIR/workspaces`` and the job streams that file to the first
step's stdin exactly as it would stream the archive (``docker.CHECKOUT``): the runner
never talks to a git server.

``git: true`` builds, in a temporary directory and only from the mirror:

- ``git init`` (no templates: no hooks, no sample files), then one ``git fetch`` from the
  mirror (``file://``) of the commit and of the tags whose commits are in its history
  (so ``git describe`` finds them), with ``--depth`` when the pipeline asks for one;
- ``git checkout --detach COMMIT``: the files as a clone would have them (with
  ``.gitattributes``' eol and ident rules, without ``export-ignore``/``export-subst``) and
  an index, so ``git status`` and ``git describe --dirty`` see a clean tree;
- a ``config`` written from scratch: ``remote.origin.url`` is the repository's canonical
  URL (which never holds credentials: ``narwhal.config.repository``), nothing else.

Only ``HEAD``, ``config``, ``index``, ``shallow``, ``packed-refs``, ``objects/`` and
``refs/`` of that ``.git`` go into the tar: no ``FETCH_HEAD`` or reflog (which would name
the mirror's path), no hooks. git runs with the system and global config ignored, so the
dispatcher user's own git settings change nothing.

``submodules: true`` reads ``.gitmodules`` and the gitlinks at the commit
(``narwhal.execution.submodules`` decides which may be fetched), resolves each
submodule's commit in its own mirror (fetching with that repository's credentials,
``Mirror.resolve``), and puts its files at its path (with ``git: true``, with its own
``.git`` directory inside it). A refused one is a note in the job's log.

Bounds: the tar stops at ``clone_max_bytes`` (the job errs: ``source: ...``), every git
call at ``timeout`` seconds, the cache at ``keep_bytes`` (least recently used first).
Every entry of the tar is owned by root (0/0), as ``git archive``'s are, so the step's
user (root in most images) owns the workspace and git's ``safe.directory`` check passes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import IO, cast

from narwhal.config.pipeline import Clone
from narwhal.config.settings import Settings
from narwhal.errors import SourceError
from narwhal.execution import submodules as submodules_mod
from narwhal.execution.docker import WORKSPACE
from narwhal.execution.source import CHUNK, Mirror, validate_commit, validate_repo
from narwhal.job import COMMIT_RE
from narwhal.text import printable

log = logging.getLogger(__name__)

GIT_DIR_KEPT = ("HEAD", "config", "index", "shallow", "packed-refs", "objects", "refs")
MAX_TAGS = 10_000  # tags of the commit's history shipped at most (the newest by tagger date first)
MAX_LISTING = 64 * 1024 * 1024  # bytes of a git listing (ls-tree, for-each-ref) read at most
NOTES_SUFFIX = ".notes"
PREPARE_WORKERS = 2  # workspaces built at once


def step_defaults(clone: Clone | None) -> dict[str, str]:
    """Environment a step of a ``clone: {git: true}`` pipeline starts with (its pipeline's and its
    own ``env:`` win): git's ``safe.directory`` for the workspace, as command-scope config
    (``GIT_CONFIG_COUNT``; git honours it there, not in the repository's own config), so a step
    whose user is not the workspace's owner (a later step's image with another ``USER``) is not
    refused as "dubious ownership"; and no pager."""
    if clone is None or not clone.git:
        return {}
    return {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory", "GIT_CONFIG_VALUE_0": WORKSPACE,
            "GIT_PAGER": "cat"}


class Prepared:
    """A workspace tar ready to stream, and what its making has to say (refused submodules).

    The file is opened when it is prepared and read through that descriptor, so a cache
    eviction that unlinks it meanwhile (another job's) takes nothing from this job. The
    descriptor is closed when the object goes."""

    def __init__(self, path: Path, notes: tuple[str, ...]):
        self.path = path
        self.notes = notes
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        weakref.finalize(self, os.close, self.fd)

    def __repr__(self) -> str:
        return f"<Prepared {self.path.name} {self.size} bytes>"

    def stream(self) -> AsyncIterator[bytes]:
        """The whole tar, from its first byte, each time it is called."""
        return _read_fd(self, self.fd, self.size)


async def _read_fd(owner: Prepared, fd: int, size: int) -> AsyncIterator[bytes]:
    """``size`` bytes of ``fd`` from offset 0 (pread: callers never share a file position);
    ``owner`` is held so its descriptor stays open while this runs."""
    offset = 0
    while offset < size:
        chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK * 4, size - offset), offset)
        if not chunk:
            raise SourceError("the prepared workspace ended early")
        offset += len(chunk)
        yield chunk
    del owner


class Workspaces:
    """Prepared workspace tars under ``STATE_DIR/workspaces``, one per (repo, commit, clone options)."""

    def __init__(self, mirror: Mirror, directory: str | os.PathLike, settings: Callable[[], Settings]):
        self.mirror = mirror
        self.dir = Path(directory)
        self.settings = settings  # read at each build: a reload applies to the next one
        # Builds run here, PREPARE_WORKERS at once: a burst of clone: jobs neither takes the
        # event loop's default threads (mirror reads) nor every core of the dispatcher.
        self._pool = concurrent.futures.ThreadPoolExecutor(PREPARE_WORKERS, thread_name_prefix="narwhal-clone")
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("tmp-*"):  # a dispatcher killed mid-build
            shutil.rmtree(stale, ignore_errors=True)

    async def prepare_async(self, repo: str, commit: str, clone: Clone, fetch_hosts: Iterable[str]) -> Prepared:
        """``prepare`` on the workspaces' own threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(self.prepare, repo, commit, clone,
                                                                        tuple(fetch_hosts)))

    def close(self) -> None:
        """No more builds; those running finish on their threads (each git call is bounded)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def max_bytes(self) -> int:
        return self.settings().clone_max_bytes

    @property
    def keep_bytes(self) -> int:
        return self.settings().clone_cache

    @property
    def timeout(self) -> float:
        return self.settings().fetch_timeout

    def key(self, repo: str, commit: str, clone: Clone, fetch_hosts: tuple[str, ...] = ()) -> str:
        """The cache's name of a workspace; the hosts count where they decide (submodules)."""
        hosts = sorted(fetch_hosts) if clone.submodules else []
        spec = json.dumps([repo, commit, clone.git, clone.submodules, clone.depth, hosts])
        return hashlib.sha256(spec.encode()).hexdigest()

    def prepare(self, repo: str, commit: str, clone: Clone, fetch_hosts: Iterable[str]) -> Prepared:
        """The workspace tar of ``commit`` as ``clone`` asks (made now, or from the cache).
        Synchronous (call it on a thread); SourceError when it cannot be made."""
        repo = validate_repo(repo)
        validate_commit(commit)
        fetch_hosts = tuple(fetch_hosts)
        key = self.key(repo, commit, clone, fetch_hosts)
        path = self.dir / f"{key}.tar"
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            prepared = None
            for _ in range(2):  # another job's eviction may take the file between the look and the open
                if not path.exists():
                    self._build(repo, commit, clone, fetch_hosts, path)
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used: evicted last
                try:
                    prepared = Prepared(path, self._notes(path))
                    break
                except FileNotFoundError:
                    continue
            if prepared is None:
                raise SourceError(f"the workspace of {commit} was evicted while it was being prepared")
        self._evict(keep=path)
        return prepared

    @staticmethod
    def _notes(path: Path) -> tuple[str, ...]:
        try:
            return tuple(str(n) for n in json.loads(path.with_name(path.name + NOTES_SUFFIX).read_text()))
        except (OSError, ValueError, TypeError):
            return ()

    # --- building ----------------------------------------------------------------------

    def _build(self, repo: str, commit: str, clone: Clone, fetch_hosts: tuple[str, ...], path: Path) -> None:
        self.mirror.resolve(repo, commit)
        tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=self.dir))
        budget = _Budget(self.max_bytes)  # bytes all the checkouts of this build may write
        try:
            notes: list[str] = []
            out_path = tmp / "workspace.tar"
            with _BoundedFile(out_path, self.max_bytes) as raw, \
                    tarfile.open(fileobj=cast(IO[bytes], raw), mode="w|", format=tarfile.PAX_FORMAT) as tar:
                mirror_path = self.mirror.path_for(repo)
                if clone.git:
                    tree = tmp / "root"
                    self._git_checkout(mirror_path, repo, commit, clone.depth, tree, budget)
                    _add_tree(tar, tree, "")
                else:
                    self._copy_archive(tar, mirror_path, commit, "")
                if clone.submodules:
                    notes += self._submodules(tar, tmp, repo, commit, clone, fetch_hosts, budget)
            path.with_name(path.name + NOTES_SUFFIX).write_text(json.dumps(notes))
            os.replace(out_path, path)
        except _TooBig:
            raise SourceError(f"the workspace of {commit} with clone: is larger than clone_max_bytes "
                              f"({self.max_bytes} bytes)") from None
        except (OSError, tarfile.TarError) as exc:
            raise SourceError(f"cannot prepare the workspace of {commit}: {exc}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _git_checkout(self, mirror_path: Path, repo: str, commit: str, depth: int | None, tree: Path,
                      budget: _Budget) -> None:
        """``tree`` becomes a checkout of ``commit`` with a ``.git`` made from the mirror only."""
        timeout = self.timeout
        # The checkout is written to the dispatcher's disk before the tar is: a tree of blobs
        # that compress well (gigabytes of zeros are kilobytes in git) is refused first.
        budget.spend(_tree_bytes(mirror_path, commit, timeout))
        tree.mkdir(parents=True)
        git_dir = tree / ".git"
        _run(["init", "--quiet", "--template=", str(tree)], timeout)
        source = mirror_path.resolve().as_uri()
        fetch = ["-C", str(tree), "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules"]
        deepen = [f"--depth={depth}"] if depth is not None else []
        _run([*fetch, *deepen, "--", source, f"+{commit}:refs/narwhal/commit"], timeout)
        # Tags whose commits are in the shipped history: what `git describe` looks for.
        tags = _tags_in_history(mirror_path, commit, timeout)
        if depth is not None and tags:
            have = set(_lines(_run(["-C", str(tree), "rev-list", "refs/narwhal/commit"], timeout, MAX_LISTING)))
            tags = [(ref, target) for ref, target in tags if target in have]
        if tags:  # without --depth: their commits are here, so only the tag objects come
            refspecs = "".join(f"+{ref}:{ref}\n" for ref, _ in tags)
            _run([*fetch, "--stdin", "--", source], timeout, stdin=refspecs.encode())
        _run(["-C", str(tree), "checkout", "--quiet", "--detach", commit], timeout)
        _run(["-C", str(tree), "update-ref", "-d", "refs/narwhal/commit"], timeout)
        shutil.rmtree(git_dir / "refs" / "narwhal", ignore_errors=True)
        # The config from scratch: what a clone of the public URL would hold, nothing of ours.
        config = git_dir / "config"
        config.unlink()
        for key, value in (("core.repositoryformatversion", "0"), ("core.filemode", "true"),
                           ("core.bare", "false"), ("core.logallrefupdates", "true"),
                           ("remote.origin.url", repo),
                           ("remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*")):
            _run(["config", "--file", str(config), key, value], timeout)
        for name in os.listdir(git_dir):
            if name not in GIT_DIR_KEPT:
                target = git_dir / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()

    def _copy_archive(self, tar: tarfile.TarFile, mirror_path: Path, commit: str, prefix: str) -> None:
        """``git archive`` of ``commit`` into ``tar``, its names under ``prefix``."""
        with tempfile.TemporaryFile() as err:  # a file: a chatty stderr cannot stall the stdout pipe
            proc = subprocess.Popen(["git", "--git-dir", str(mirror_path), "archive", "--format=tar", commit],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    env=git_env(), start_new_session=True)
            timer = threading.Timer(self.timeout, _kill_group, (proc,))
            timer.daemon = True
            timer.start()
            try:
                assert proc.stdout is not None
                with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
                    for member in archive:
                        member.name = prefix + member.name
                        data = archive.extractfile(member) if member.isfile() else None
                        tar.addfile(member, data)
                proc.stdout.close()
                proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:
                    _kill_group(proc)
                    proc.wait()
            if proc.returncode != 0:
                err.seek(0)
                said = err.read(4096).decode("utf-8", "replace")
                log.debug("git archive of %s: %s", commit, said)
                raise SourceError(f"git archive of {commit} failed (exit {proc.returncode})")

    def _submodules(self, tar: tarfile.TarFile, tmp: Path, repo: str, commit: str, clone: Clone,
                    fetch_hosts: tuple[str, ...], budget: _Budget) -> list[str]:
        """Each submodule the commit records (those ``submodules.select`` allows) into ``tar``;
        the notes on those left out."""
        mirror_path = self.mirror.path_for(repo)
        code, listing = _read(["--git-dir", str(mirror_path), "config", "--no-includes", "--blob", f"{commit}:.gitmodules",
                               "--null", "--list"], self.timeout, submodules_mod.MAX_GITMODULES_BYTES)
        if code != 0:
            return []  # no .gitmodules (or one git cannot read): nothing to ship
        gitmodules = submodules_mod.parse_gitmodules(listing)
        _, tree = _read(["--git-dir", str(mirror_path), "ls-tree", "-r", "-z", "--full-tree", commit],
                        self.timeout, MAX_LISTING)
        chosen, refused = submodules_mod.select(gitmodules, submodules_mod.parse_gitlinks(tree), repo, fetch_hosts)
        notes = [r.note() for r in refused]
        for i, sub in enumerate(chosen):
            try:
                self.mirror.resolve(sub.url, sub.commit)
                sub_mirror = self.mirror.path_for(sub.url)
                if clone.git:
                    tree_dir = tmp / f"sub{i}"
                    self._git_checkout(sub_mirror, sub.url, sub.commit, clone.depth, tree_dir, budget)
                    _add_tree(tar, tree_dir, sub.path + "/")
                else:
                    self._copy_archive(tar, sub_mirror, sub.commit, sub.path + "/")
                if _has_gitmodules(sub_mirror, sub.commit, self.timeout):
                    notes.append(f"submodule {printable(sub.name, 100)!r}: its own submodules are not shipped "
                                 "(one level only)")
                notes.append(f"submodule {printable(sub.name, 100)!r} at {sub.path}: {sub.commit[:12]}")
            except SourceError as exc:
                notes.append(f"submodule {printable(sub.name, 100)!r} not shipped: {exc}")
        return notes

    # --- the cache ---------------------------------------------------------------------

    def _evict(self, keep: Path) -> None:
        """Least recently used tars go until the rest fit in ``keep_bytes`` (``keep`` stays)."""
        entries = []
        for tar_path in self.dir.glob("*.tar"):
            with contextlib.suppress(OSError):
                st = tar_path.stat()
                entries.append((st.st_mtime, st.st_size, tar_path))
        total = sum(size for _, size, _ in entries)
        for _, size, tar_path in sorted(entries, key=lambda e: e[0]):
            if total <= self.keep_bytes:
                break
            if tar_path == keep:
                continue
            with contextlib.suppress(OSError):
                tar_path.unlink()
                tar_path.with_name(tar_path.name + NOTES_SUFFIX).unlink(missing_ok=True)
                total -= size


# --- git -------------------------------------------------------------------------------


def git_env() -> dict[str, str]:
    """git's environment here: no system or global config (the dispatcher user's settings, hooks
    paths, URL rewrites change nothing), no prompts, no pager."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
                "GIT_PAGER": "cat", "GIT_ADVICE": "0"})
    return env


BASE_CONFIG = ("-c", "protocol.ext.allow=never", "-c", "protocol.file.allow=always", "-c", "core.hooksPath=/dev/null",
               "-c", "core.logAllRefUpdates=false", "-c", "advice.detachedHead=false", "-c", "core.fsmonitor=false",
               "-c", "gc.auto=0", "-c", "maintenance.auto=false", "-c", "fetch.unpackLimit=1")


def _run(args: list[str], timeout: float, limit: int = 1 << 20, stdin: bytes | None = None) -> bytes:
    code, out = _read(args, timeout, limit, stdin)
    if code != 0:
        raise SourceError(f"git {args[2] if args[:1] == ['-C'] else args[0]} failed while preparing the workspace")
    return out


def _read(args: list[str], timeout: float, limit: int, stdin: bytes | None = None) -> tuple[int, bytes]:
    """(exit status, stdout) of ``git ARGS``; SourceError past ``timeout`` or ``limit`` bytes.
    stderr is logged (debug), never shown: it may name the dispatcher's paths."""
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(["git", *BASE_CONFIG, *args], stdin=subprocess.PIPE if stdin is not None
                                else subprocess.DEVNULL, stdout=out, stderr=err, env=git_env(),
                                start_new_session=True)
        try:
            proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            raise SourceError(f"git did not finish within {timeout:g}s while preparing the workspace") from None
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        err.seek(0)
        said = err.read(4096).decode("utf-8", "replace").strip()
        if proc.returncode != 0 and said:
            log.debug("git %s: %s", " ".join(args[:3]), said)
        if out.tell() > limit:
            raise SourceError(f"git printed more than {limit} bytes while preparing the workspace")
        out.seek(0)
        return proc.returncode, out.read()


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _lines(data: bytes) -> list[str]:
    return [line for line in data.decode("utf-8", "replace").splitlines() if line]


def _tags_in_history(mirror_path: Path, commit: str, timeout: float) -> list[tuple[str, str]]:
    """(ref, peeled commit) of the mirror's tags whose commit is ``commit`` or behind it."""
    out = _run(["--git-dir", str(mirror_path), "for-each-ref", f"--merged={commit}", "--sort=-creatordate",
                f"--count={MAX_TAGS}", "--format=%(refname) %(objectname) %(*objectname)", "refs/tags"],
               timeout, MAX_LISTING)
    tags = []
    for line in _lines(out):
        parts = line.split(" ")
        if len(parts) != 3 or not parts[0].startswith("refs/tags/"):
            continue
        ref, oid, peeled = parts
        target = peeled or oid
        if COMMIT_RE.fullmatch(target):
            tags.append((ref, target))
    return tags


def _tree_bytes(mirror_path: Path, commit: str, timeout: float) -> int:
    """The bytes of every file in ``commit``'s tree, as stored (``git ls-tree -r -l``)."""
    out = _run(["--git-dir", str(mirror_path), "ls-tree", "-r", "-l", "-z", "--full-tree", commit],
               timeout, MAX_LISTING)
    total = 0
    for entry in out.split(b"\0"):
        fields = entry.partition(b"\t")[0].split()
        if len(fields) == 4 and fields[1] == b"blob" and fields[3].isdigit():
            total += int(fields[3])
    return total


def _has_gitmodules(mirror_path: Path, commit: str, timeout: float) -> bool:
    code, _ = _read(["--git-dir", str(mirror_path), "cat-file", "-e", f"{commit}:.gitmodules"], timeout, 4096)
    return code == 0


# --- the tar ---------------------------------------------------------------------------


class _TooBig(Exception):
    pass


class _Budget:
    """Bytes one build may still write to the dispatcher's disk in checkouts."""

    def __init__(self, left: int):
        self.left = left

    def spend(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise _TooBig()


class _BoundedFile:
    """A file that refuses to grow past ``limit`` bytes (``_TooBig``)."""

    def __init__(self, path: Path, limit: int):
        self.f: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed in __exit__
        self.limit = limit
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise _TooBig()
        return self.f.write(data)

    def tell(self) -> int:
        return self.size

    def __enter__(self) -> _BoundedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = int(info.mtime)
    return info


def _add_tree(tar: tarfile.TarFile, root: Path, prefix: str) -> None:
    """Every file, directory and symlink under ``root`` (never following a link), as root's,
    under ``prefix``; of ``.git`` only what GIT_DIR_KEPT names."""
    for base, dirs, files in os.walk(root):
        rel = os.path.relpath(base, root)
        rel = "" if rel == "." else rel + "/"
        if rel == "":
            dirs[:] = sorted(dirs)
        if rel == ".git/":
            dirs[:] = [d for d in sorted(dirs) if d in GIT_DIR_KEPT]
            files = [f for f in files if f in GIT_DIR_KEPT]
        for name in [*sorted(dirs), *sorted(files)]:
            full = os.path.join(base, name)
            info = _root_owned(tar.gettarinfo(full, arcname=prefix + rel + name))
            if info.isreg():
                with open(full, "rb") as f:
                    tar.addfile(info, f)
            elif info.isdir() or info.issym():
                tar.addfile(info)

