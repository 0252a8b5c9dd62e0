"""Where a job's source comes from: a bare git mirror per repository on the dispatcher.

Runners never talk to git servers: the dispatcher keeps a ``git clone --mirror``
per repository, resolves the exact commit in it, and streams ``git archive`` of
that commit over the runner's channel. Every git call is an argv list (never a
shell) with ``--`` before user-given positionals; branch and tag names reach git only
as full ref names (``refs/heads/NAME``), after ``narwhal.job.is_ref_name``. A clone or
fetch of a repository with a credential (``credentials(repo)``, narwhal.config.credentials) gets it through
``narwhal.execution.gitauth``: in its environment or a short-lived key file, never on
argv or in the mirror, and with git's error output masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from narwhal.config.credentials import GitCredential
from narwhal.config.repository import RepositoryError, canonical_repo
from narwhal.config.settings import DEFAULT_SETTINGS
from narwhal.errors import SourceError
from narwhal.execution.gitauth import GitAuth, sweep_key_dirs
from narwhal.job import COMMIT_RE, is_ref_name
from narwhal.text import printable

GIT_TIMEOUT = DEFAULT_SETTINGS.fetch_timeout  # seconds for one clone or fetch
# A git server that accepts and then stalls: curl gives up after LOW_SPEED_TIME seconds
# below LOW_SPEED_LIMIT bytes/s; ssh after SSH_CONNECT_TIMEOUT seconds without a connection.
LOW_SPEED_LIMIT = 1000
LOW_SPEED_TIME = 30
SSH_CONNECT_TIMEOUT = 30
CHUNK = 65536
KNOWN_COMMITS = 10_000  # (repo, commit) pairs remembered as present
LOCAL_TIMEOUT = 60.0  # seconds for a git call that reads only the mirror (rev-parse, diff)
MAX_CHANGED = 10_000  # paths changed_files lists; more is "unknown" (None)
MAX_CHANGED_BYTES = 16 * 1024 * 1024  # bytes of `git diff --name-only -z` read at most
MAX_TREE_BYTES = 16 * 1024 * 1024  # bytes of `git ls-tree -r` a cache key's hash reads at most
ZERO_COMMIT = "0" * 40  # what forges send as "before" for a new branch
log = logging.getLogger(__name__)


def validate_commit(commit: str) -> str:
    """A job names one exact commit: 40 lowercase hex digits, nothing else."""
    if not isinstance(commit, str) or not COMMIT_RE.fullmatch(commit):
        raise SourceError(f"invalid commit {commit!r}: expected a 40-hex commit id")
    return commit


def validate_ref_name(name: str) -> str:
    """A branch or tag name narwhal passes to git (``narwhal.job.is_ref_name``)."""
    if not is_ref_name(name):
        raise SourceError(f"invalid branch or tag {name!r}: expected a git branch or tag name "
                          "(letters, digits, . _ / + -; no leading '-', no '..')")
    return name


def validate_repo(repo: str) -> str:
    """The canonical form of ``repo`` (narwhal.config.repository): nothing git could run."""
    try:
        return canonical_repo(repo)
    except RepositoryError as e:
        raise SourceError(str(e)) from None


class Mirror:
    """Bare mirrors under ``cache_dir``, one per repository (directory = sha256 of its canonical form)."""

    def __init__(self, cache_dir: str | os.PathLike, timeout: float = GIT_TIMEOUT,
                 credentials: Callable[[str], GitCredential | None] | None = None):
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout  # for one clone or fetch
        # What git fetches a canonical repository with, asked at each clone or fetch (a reload
        # or a rotated secret applies to the next one).
        self.credentials: Callable[[str], GitCredential | None] = credentials or (lambda repo: None)
        sweep_key_dirs()  # deploy keys a killed dispatcher left behind
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._known: dict[tuple[str, str], None] = {}  # insertion-ordered: oldest dropped first
        self._checkers: dict[Path, _CommitChecker] = {}
        self._locks_guard = threading.Lock()

    def path_for(self, repo: str) -> Path:
        canonical = validate_repo(repo)
        return self.cache_dir / hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def _lock(self, repo: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(repo, threading.Lock())

    def present(self, repo: str, commit: str) -> bool:
        """Is ``commit`` in the mirror already? Never touches the network."""
        validate_repo(repo)
        validate_commit(commit)
        if (repo, commit) in self._known:
            return True
        path = self.path_for(repo)
        if (path / "HEAD").exists() and self._has_commit(path, commit):
            self._remember(repo, commit)
            return True
        return False

    def resolve(self, repo: str, commit: str) -> str:
        """Make sure ``commit`` is a commit in the mirror of ``repo`` (fetching if needed).

        Synchronous and thread-safe: the API thread calls it directly, the
        scheduler through ``asyncio.to_thread``.
        """
        repo = validate_repo(repo)
        validate_commit(commit)
        if (repo, commit) in self._known:
            return commit
        path = self.path_for(repo)
        # Reading needs no lock (git reads while another process fetches); only a clone
        # or fetch is serialised per repository.
        if (path / "HEAD").exists() and self._has_commit(path, commit):
            self._remember(repo, commit)
            return commit
        with self._lock(repo):
            if not (path / "HEAD").exists():
                self._clone(repo, path)
            elif self._has_commit(path, commit):
                return commit
            else:
                self._fetch(repo, path)
            if not self._has_commit(path, commit):
                raise SourceError(f"commit {commit} not found in {repo}")
        self._remember(repo, commit)
        return commit

    def head(self, repo: str, name: str) -> str:
        """The commit branch ``name`` points to on the server now (else tag ``name``, peeled).

        Always fetches first (or clones), under the repository's lock and within
        ``timeout``: the mirror's own idea of a head may be old. Branches win over a tag
        of the same name. SourceError when the fetch fails, no such branch or tag
        exists, or the tag does not point to a commit. Synchronous and thread-safe; the
        dispatcher calls it through ``Fetches`` so that it takes a fetch slot like any fetch.
        """
        repo = validate_repo(repo)
        validate_ref_name(name)
        path = self.path_for(repo)
        with self._lock(repo):
            if not (path / "HEAD").exists():
                self._clone(repo, path)
            else:
                self._fetch(repo, path)
            commit = _peeled(path, name, repo)
        self._remember(repo, commit)
        return commit

    def contains(self, repo: str, name: str, commit: str) -> bool:
        """Whether ``commit`` is branch ``name``'s head or behind it, as the server has it: the
        mirror first, and when it says no, again after one fetch (its idea of the branch may be
        old). A tag of that name does not count (tags are not under a branch's protection).
        False when it cannot tell. Synchronous."""
        repo = validate_repo(repo)
        validate_ref_name(name)
        validate_commit(commit)
        path = self.path_for(repo)
        if (path / "HEAD").exists() and _reaches(path, name, commit, repo):
            return True
        try:
            self.head(repo, name)  # fetches (or clones)
        except SourceError:
            return False
        return _reaches(path, name, commit, repo)

    def describe(self, repo: str, commit: str) -> tuple[str | None, str | None]:
        """The commit's author name and subject line, as the mirror has them (None, None when
        it cannot tell). Reads the mirror only; never fetches."""
        repo = validate_repo(repo)
        validate_commit(commit)
        path = self.path_for(repo)
        if not (path / "HEAD").exists():
            return None, None
        try:
            code, out = _git_read(["--git-dir", str(path), "show", "-s", "--no-show-signature",
                                   "--format=%an%x00%s", commit, "--"],
                                  f"git show {commit}", LOCAL_TIMEOUT, 64 * 1024)
        except SourceError:
            return None, None
        if code != 0:
            return None, None
        author, _, subject = out.decode("utf-8", "replace").rstrip("\n").partition("\x00")
        return (printable(author, 100) or None), (printable(subject, 200) or None)

    def changed_files(self, repo: str, commit: str, base_branch: str | None,
                      before: str | None = None) -> list[str] | None:
        """The files ``commit`` changes, as git names them, or None when that is unknown.

        A push: ``before..commit``, when ``before`` is a commit in the mirror (not a new
        branch's zeros). Else a pull request: from the merge base of ``refs/heads/BASE``
        (the mirror's, as of its last fetch) and ``commit``. Renames count as both paths.
        Reads the mirror only, never fetching: call it once ``commit`` is there. More than
        ``MAX_CHANGED`` paths, a git failure or a diff slower than ``LOCAL_TIMEOUT`` are
        unknown too (None), so a ``when.paths`` condition never skips on a partial list.
        """
        repo = validate_repo(repo)
        validate_commit(commit)
        if before is not None:
            validate_commit(before)
        if base_branch is not None:
            validate_ref_name(base_branch)
        path = self.path_for(repo)
        if not (path / "HEAD").exists() or not self._has_commit(path, commit):
            return None
        try:
            start = None
            if before is not None and before != ZERO_COMMIT and self._has_commit(path, before):
                start = before
            elif base_branch is not None:
                start = _merge_base(path, f"refs/heads/{base_branch}", commit)
            if start is None:
                return None
            code, out = _git_read(["--git-dir", str(path), "diff", "--name-only", "-z", "--no-renames",
                                   "--no-ext-diff", "--no-textconv", start, commit, "--"],
                                  f"git diff of {commit} in {repo}", LOCAL_TIMEOUT, MAX_CHANGED_BYTES)
        except SourceError as exc:  # too slow or too much: unknown
            log.warning("changed files of %s in %s: %s", commit, repo, exc)
            return None
        if code != 0:
            return None
        paths = [p.decode("utf-8", "replace") for p in out.split(b"\0") if p]
        return paths if len(paths) <= MAX_CHANGED else None

    def tree_entries(self, repo: str, commit: str, paths: list[str]) -> list[tuple[str, str]]:
        """(path, "mode type oid") of every file at or under ``paths`` in ``commit``, as
        ``git ls-tree -r`` lists them (literal paths, never pathspec magic): what a cache key's
        ``hash`` is made of. Reads the mirror only; call it once ``commit`` is there. A path
        the commit lacks has no entry. SourceError when git fails or lists more than
        MAX_TREE_BYTES."""
        repo = validate_repo(repo)
        validate_commit(commit)
        if not paths:
            return []
        code, out = _git_read(["--literal-pathspecs", "--git-dir", str(self.path_for(repo)), "ls-tree", "-r", "-z",
                               "--full-tree", commit, "--", *paths],
                              f"git ls-tree of {commit} in {repo}", LOCAL_TIMEOUT, MAX_TREE_BYTES)
        if code != 0:
            raise SourceError(f"cannot list the files of {commit} in {repo} (git exit {code})")
        entries = []
        for record in out.split(b"\0"):
            what, tab, path = record.partition(b"\t")
            if tab:
                entries.append((path.decode("utf-8", "surrogateescape"), what.decode("ascii", "replace")))
        return entries

    def _remember(self, repo: str, commit: str) -> None:
        """A commit once in a mirror stays there (fetch never drops objects): skip the next look."""
        with self._locks_guard:
            self._known[(repo, commit)] = None
            while len(self._known) > KNOWN_COMMITS:
                self._known.pop(next(iter(self._known)))

    async def archive(self, repo: str, commit: str) -> AsyncIterator[bytes]:
        """Stream ``git archive --format=tar COMMIT`` of the mirror, in chunks."""
        repo = validate_repo(repo)
        await asyncio.to_thread(self.resolve, repo, commit)
        proc = await asyncio.create_subprocess_exec(
            "git", "--git-dir", str(self.path_for(repo)), "archive", "--format=tar", commit,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=_git_env())
        finished = False
        try:
            assert proc.stdout is not None and proc.stderr is not None
            while chunk := await proc.stdout.read(CHUNK):
                yield chunk
            err = await proc.stderr.read()
            if await proc.wait() != 0:
                raise SourceError(f"git archive of {commit} from {repo} failed: "
                                  f"{err.decode('utf-8', 'replace').strip()}")
            finished = True
        finally:
            if not finished and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    await proc.wait()

    # --- git -----------------------------------------------------------------------

    def _clone(self, repo: str, path: Path) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", suffix=".tmp", dir=self.cache_dir))
        try:
            _git(["clone", "--mirror", "--quiet", "--", repo, str(tmp)], f"cannot clone {repo}", self.timeout,
                 GitAuth(self.credentials(repo), repo))
            os.replace(tmp, path)  # atomic: a half clone is never taken for a mirror
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _fetch(self, repo: str, path: Path) -> None:
        _git(["--git-dir", str(path), "fetch", "--prune", "--quiet", "origin"],
             f"cannot fetch {repo}", self.timeout, GitAuth(self.credentials(repo), repo))
        with self._locks_guard:
            checker = self._checkers.pop(path, None)
        if checker is not None:  # start afresh on the new packs
            checker.close()

    def _has_commit(self, path: Path, commit: str) -> bool:
        with self._locks_guard:
            checker = self._checkers.get(path)
            if checker is None:
                checker = self._checkers[path] = _CommitChecker(path)
        return checker.has_commit(commit)

    def close(self) -> None:
        with self._locks_guard:
            checkers, self._checkers = list(self._checkers.values()), {}
        for checker in checkers:
            checker.close()


class _CommitChecker:
    """One long-lived ``git cat-file --batch-check`` per mirror: a commit check costs a
    pipe round trip instead of a process start. git looks for new packs when an object
    is missing, so commits fetched after it started are found too."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None

    def has_commit(self, commit: str) -> bool:
        validate_commit(commit)  # one line on the pipe: no newline can get in
        with self.lock:
            for _ in range(2):  # a dead checker is started again once
                try:
                    proc = self._process()
                    assert proc.stdin is not None and proc.stdout is not None  # both PIPE
                    proc.stdin.write(f"{commit}^{{commit}}\n".encode())
                    proc.stdin.flush()
                    answer = proc.stdout.readline().decode("utf-8", "replace").split()
                except (BrokenPipeError, OSError):
                    answer = []
                if answer:
                    return answer[0] == commit and answer[1:2] == ["commit"]
                self.close_locked()
            return False

    def _process(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                ["git", "--git-dir", str(self.path), "cat-file", "--batch-check"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=_git_env())
        return self.proc

    def close(self) -> None:
        with self.lock:
            self.close_locked()

    def close_locked(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _git_env() -> dict[str, str]:
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"  # never wait for a password nobody will type
    env.setdefault("GIT_SSH_COMMAND", f"ssh -o BatchMode=yes -o ConnectTimeout={SSH_CONNECT_TIMEOUT}")
    return env


def _peeled(path: Path, name: str, repo: str) -> str:
    """The commit ``refs/heads/NAME`` (else ``refs/tags/NAME``) names in the mirror at ``path``.

    Exact ref names only: for-each-ref lists both candidates (and, as patterns match by
    prefix, refs under them, which are dropped), so git never guesses at a name.
    """
    heads, tags = f"refs/heads/{name}", f"refs/tags/{name}"
    code, out = _git_read(["--git-dir", str(path), "for-each-ref", "--format=%(refname) %(objectname)",
                           heads, tags], f"cannot read the refs of {repo}", LOCAL_TIMEOUT, 1 << 20)
    found = dict(line.split(" ", 1) for line in out.decode("utf-8", "replace").splitlines() if " " in line)
    ref = heads if heads in found else tags if tags in found else None
    if code != 0 or ref is None:
        raise SourceError(f"no branch or tag {name!r} in {repo}")
    oid = found[ref]
    if not COMMIT_RE.fullmatch(oid):
        raise SourceError(f"{ref} in {repo} names {oid!r}, not an object id")
    code, out = _git_read(["--git-dir", str(path), "rev-parse", "--verify", "--quiet", "--end-of-options",
                           f"{oid}^{{commit}}"], f"cannot read {ref} of {repo}", LOCAL_TIMEOUT, 4096)
    commit = out.decode("ascii", "replace").strip()
    if code != 0 or not COMMIT_RE.fullmatch(commit):
        raise SourceError(f"{ref} in {repo} does not point to a commit")
    return commit


def _reaches(path: Path, name: str, commit: str, repo: str) -> bool:
    """Whether branch ``name`` (exactly ``refs/heads/NAME``) in the mirror at ``path`` is
    ``commit`` or after it."""
    ref = f"refs/heads/{name}"
    try:
        code, out = _git_read(["--git-dir", str(path), "for-each-ref", "--format=%(refname) %(objectname)", ref],
                              f"cannot read the refs of {repo}", LOCAL_TIMEOUT, 1 << 20)
        tip = next((line.split(" ", 1)[1] for line in out.decode("utf-8", "replace").splitlines()
                    if line.split(" ", 1)[0] == ref), None)
        if code != 0 or tip is None or not COMMIT_RE.fullmatch(tip):
            return False
        code, _ = _git_read(["--git-dir", str(path), "merge-base", "--is-ancestor", commit, tip],
                            f"git merge-base --is-ancestor {commit} {tip}", LOCAL_TIMEOUT, 4096)
    except SourceError:
        return False
    return code == 0


def _merge_base(path: Path, ref: str, commit: str) -> str | None:
    """The best common ancestor of the exact ``ref`` and ``commit``; None when either is missing."""
    code, out = _git_read(["--git-dir", str(path), "for-each-ref", "--format=%(refname) %(objectname)", ref],
                          f"cannot read {ref}", LOCAL_TIMEOUT, 1 << 20)
    oid = next((line.split(" ", 1)[1] for line in out.decode("utf-8", "replace").splitlines()
                if line.split(" ", 1)[0] == ref), None)
    if code != 0 or oid is None or not COMMIT_RE.fullmatch(oid):
        return None
    code, out = _git_read(["--git-dir", str(path), "merge-base", oid, commit],
                          f"git merge-base {ref} {commit}", LOCAL_TIMEOUT, 4096)
    base = out.decode("ascii", "replace").strip()
    return base if code == 0 and COMMIT_RE.fullmatch(base) else None


def _git_read(args: list[str], what: str, timeout: float, limit: int) -> tuple[int, bytes]:
    """Run git and return (exit status, stdout). SourceError past ``timeout`` seconds or
    ``limit`` bytes of output; the process group is killed either way."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(["git", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                env=_git_env(), start_new_session=True)
        late = threading.Event()

        def stop() -> None:
            late.set()
            _kill_group(proc)

        timer = threading.Timer(timeout, stop)
        timer.daemon = True
        timer.start()
        chunks: list[bytes] = []
        size = 0
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    _kill_group(proc)
                    break
                chunks.append(chunk)
        finally:
            timer.cancel()
            if proc.stdout is not None:
                proc.stdout.close()
            if size > limit or late.is_set():
                _kill_group(proc)
            code = proc.wait()
    if late.is_set():
        raise SourceError(f"{what}: git did not finish within {timeout:g}s")
    if size > limit:
        raise SourceError(f"{what}: more than {limit} bytes of output")
    return code, b"".join(chunks)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _git(args: list[str], what: str, timeout: float = GIT_TIMEOUT, auth: GitAuth | None = None) -> None:
    """Run git; past ``timeout`` the whole process group goes (git's helpers hold the pipes).

    AUTH (a credential for the repository) adds to git's environment for this one command
    (its key file is gone when this returns, however it returns) and masks git's output."""
    argv = ["git", "-c", "protocol.ext.allow=never", "-c", f"http.lowSpeedLimit={LOW_SPEED_LIMIT}",
            "-c", f"http.lowSpeedTime={LOW_SPEED_TIME}", *args]
    auth = auth or GitAuth(None, "")
    with auth:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=auth.env(_git_env()), start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise SourceError(f"{what}: git did not finish within {timeout:g}s") from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if proc.returncode != 0:
        raise SourceError(f"{what}: {auth.failure(err, proc.returncode)}")  # masked
