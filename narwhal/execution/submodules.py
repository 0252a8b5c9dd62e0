"""Submodules as a commit records them, and which of them narwhal will fetch.

Everything here reads what a repository's author wrote (``.gitmodules`` at the commit,
its gitlinks), so everything here is hostile input. Pure: the git calls that produce
the text are ``narwhal.execution.clone``'s.

The rules, each refusal with a reason the job's log shows:

- A submodule is shipped only where the commit's tree has a gitlink (mode 160000) at the
  ``path`` its ``.gitmodules`` entry names: a path that is absolute, has ``.``/``..``
  segments or a ``.git`` segment is refused before it is compared, so nothing outside
  the workspace (or inside ``.git``) can be named.
- Its ``url`` passes the same checks as a repository's (``narwhal.config.repository``:
  no ``ext::`` or other remote helpers, no option-like ``-...``, no credentials, no
  control characters), must be remote (a local path or ``file://`` on the dispatcher is
  refused), and its host must be one the dispatcher fetches from (``fetch_hosts``, as for
  a submission). A relative URL (``./x``, ``../x``) is resolved against the superproject's
  URL first, as git does.
- At most ``MAX_SUBMODULES`` are shipped; nested submodules are not (one level only).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from narwhal.config.repository import RepositoryError, canonical_repo, glob_match, host_of, is_local
from narwhal.job import COMMIT_RE
from narwhal.text import printable

MAX_SUBMODULES = 32
MAX_GITMODULES_BYTES = 256 * 1024
MAX_URL = 2048
GITLINK_MODE = "160000"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Submodule:
    """One submodule narwhal ships: where, from which repository, at which commit."""

    name: str
    path: str
    url: str  # canonical
    commit: str


@dataclass(frozen=True)
class Refused:
    """A submodule left out, and why (for the job's log)."""

    name: str
    why: str

    def note(self) -> str:
        return f"submodule {printable(self.name, 100)!r} not shipped: {self.why}"


def parse_gitmodules(listing: bytes) -> dict[str, dict[str, str]]:
    """``git config --blob COMMIT:.gitmodules --null --list`` output -> {name: {key: value}}.

    Each entry is ``KEY\\nVALUE\\0``; only ``submodule.NAME.KEY`` keys count (NAME may hold dots:
    the key is what follows the last one). Later values win, as in git."""
    modules: dict[str, dict[str, str]] = {}
    for entry in listing.split(b"\0"):
        if not entry:
            continue
        key, _, value = entry.decode("utf-8", "replace").partition("\n")
        if not key.startswith("submodule."):
            continue
        name, dot, field = key[len("submodule."):].rpartition(".")
        if not dot or not name:
            continue
        modules.setdefault(name, {})[field] = value
    return modules


def parse_gitlinks(listing: bytes) -> dict[str, str]:
    """``git ls-tree -r -z COMMIT`` output -> {path: commit} of the gitlinks (mode 160000)."""
    links: dict[str, str] = {}
    for entry in listing.split(b"\0"):
        head, tab, path = entry.partition(b"\t")
        parts = head.split()
        if not tab or len(parts) != 3 or parts[0].decode("ascii", "replace") != GITLINK_MODE:
            continue
        oid = parts[2].decode("ascii", "replace")
        if COMMIT_RE.fullmatch(oid):
            links[path.decode("utf-8", "replace")] = oid
    return links


def path_problem(path: str) -> str | None:
    """Why a submodule ``path`` may not be used as a place in the workspace; None if it may."""
    if not path or len(path) > 4096:
        return "empty or too long path"
    if _CONTROL.search(path) or "\\" in path:
        return "path with control characters or '\\'"
    if path.startswith("/"):
        return f"path {printable(path, 100)!r} is absolute: it would leave the workspace"
    segments = path.split("/")
    if any(s in ("", ".", "..") for s in segments):
        return f"path {printable(path, 100)!r} has empty, '.' or '..' segments: it could leave the workspace"
    if any(s.lower().rstrip(". ") == ".git" for s in segments):
        return f"path {printable(path, 100)!r} names a .git directory"
    return None


def resolve_url(url: str, superproject: str) -> str:
    """A submodule URL as git reads it: ``./x`` and ``../x`` are relative to the superproject's
    URL (each ``..`` drops one path segment of it), anything else is itself."""
    if not url.startswith(("./", "../")):
        return url
    base = superproject.rstrip("/")
    rest = url
    while True:
        if rest.startswith("./"):
            rest = rest[2:]
        elif rest.startswith("../"):
            rest = rest[3:]
            head, slash, _ = base.rpartition("/")
            remote = "://" in base
            if not slash or (remote and not ("://" in head and head.split("://", 1)[1])):
                raise RepositoryError(f"relative URL {url!r} climbs above the superproject's host")
            base = head
        else:
            break
    return f"{base}/{rest}" if rest else base


def url_problem(url: str, superproject: str, fetch_hosts: Iterable[str]) -> tuple[str | None, str | None]:
    """(canonical URL, None) when narwhal may fetch submodule ``url``; (None, why) when not."""
    if not url:
        return None, "no url"
    if len(url) > MAX_URL or _CONTROL.search(url):
        return None, "url too long or with control characters"
    if url.startswith("-"):
        return None, "url starts with '-' (it would read as an option)"
    try:
        canonical = canonical_repo(resolve_url(url, superproject))
    except RepositoryError as exc:
        return None, f"url refused: {exc}"
    if is_local(canonical):
        return None, "url is a path on the dispatcher (local paths and file:// are not fetched for submodules)"
    host = host_of(canonical) or ""
    if not any(glob_match(allowed, host) for allowed in fetch_hosts):
        return None, (f"the dispatcher does not fetch from host {host!r} "
                      "(settings.fetch_hosts, or a pipeline's repo pattern naming it)")
    return canonical, None


def select(gitmodules: dict[str, dict[str, str]], gitlinks: dict[str, str], superproject: str,
           fetch_hosts: Iterable[str]) -> tuple[list[Submodule], list[Refused]]:
    """The submodules to ship and those refused, in ``.gitmodules`` order; at most MAX_SUBMODULES."""
    hosts = tuple(fetch_hosts)
    chosen: list[Submodule] = []
    refused: list[Refused] = []
    used: set[str] = set()
    for name, entry in gitmodules.items():
        path = entry.get("path", "")
        why = path_problem(path)
        if why is None and path not in gitlinks:
            why = f"no gitlink at {printable(path, 100)!r} in the commit"
        if why is None and path in used:
            why = f"path {printable(path, 100)!r} is already another submodule's"
        canonical = None
        if why is None:
            canonical, why = url_problem(entry.get("url", ""), superproject, hosts)
        if why is None and len(chosen) >= MAX_SUBMODULES:
            why = f"more than {MAX_SUBMODULES} submodules"
        if why is not None or canonical is None:
            refused.append(Refused(name, why or "refused"))
            continue
        used.add(path)
        chosen.append(Submodule(name, path, canonical, gitlinks[path]))
    named = {entry.get("path") for entry in gitmodules.values()}
    for path in gitlinks:
        if path not in named:
            refused.append(Refused(path, "a gitlink without a .gitmodules entry (no url)"))
    return chosen, refused
