"""Repository identity: one canonical spelling per repository, and globs over it.

Every place that names a repository (pipeline matching, the mirror's directory, the
store's (repo, commit, pipeline) key, the API's answers and the logs) uses the
canonical form made here, so ten spellings of one repository are one repository,
and a spelling cannot sneak past a pipeline's glob.

The rules:

- URLs (``http``, ``https``, ``ssh``; ``git+ssh``/``ssh+git`` become ``ssh``): scheme
  and host lowercased, default ports dropped (http 80, https 443, ssh 22), the path
  percent-decoded once and re-encoded in one way, a trailing ``/`` dropped. Dot
  segments (``.``, ``..``, also encoded as ``%2e``), an encoded ``/`` (``%2F``), a
  ``%`` still encoded after decoding (double encoding), control characters, queries
  and fragments are refused, never resolved.
- Credentials: http(s) URLs must carry none (a user or password is refused: configure
  credentials on the dispatcher); ssh URLs may name a user (``git@``), never a password.
- scp-like ``user@host:path`` becomes ``ssh://user@host/path`` when PATH is absolute
  and ``ssh://user@host/~/path`` when it is relative (scp's paths are relative to the
  home directory, ssh:// paths are not: the two are different repositories in general).
- Local paths must be absolute; they and ``file://`` URLs become ``os.path.realpath``.
- A ``.git`` suffix is significant: ``org/app`` and ``org/app.git`` are two
  repositories (git servers usually serve both, but nothing here can know that).

Pure: no I/O except ``realpath`` for local paths.
"""

from __future__ import annotations

import functools
import os
import re
from urllib.parse import quote, unquote, urlsplit

from narwhal.errors import BadRequest

MAX_LENGTH = 2048
DEFAULT_PORTS = {"http": 80, "https": 443, "ssh": 22}
SCHEME_ALIASES = {"git+ssh": "ssh", "ssh+git": "ssh"}
REMOTE_SCHEMES = ("http", "https", "ssh")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOST_RE = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?|\[[0-9a-f:.]+\]")
_USER_RE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,63}")  # no leading "-": never an ssh option
_SCP_RE = re.compile(r"(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:]+):(?P<path>.*)", re.DOTALL)
# Characters left as they are when the path is re-encoded (RFC 3986 pchar, minus '%').
_PATH_SAFE = "/:@!$&'()*+,;=~-._"
GLOB_CHARS = "*?["


class RepositoryError(BadRequest):
    """A repository spelling narwhal refuses (a 400 when it comes from a client)."""


def _refuse(repo: str, why: str) -> RepositoryError:
    shown = repo if len(repo) <= 200 else repo[:200] + "..."
    return RepositoryError(f"invalid repository {_mask(shown)!r}: {why}")


def _mask(text: str) -> str:
    """Never echo credentials back: any ``user:secret@`` (or ``token@``) shows as ``***@``."""
    return re.sub(r"(://)[^/]*@", r"\1***@", text)


def canonical_repo(repo: str) -> str:
    """The one spelling of ``repo``; RepositoryError when it is not a spelling narwhal accepts."""
    if not isinstance(repo, str) or not repo.strip():
        raise RepositoryError("invalid repository: empty")
    if len(repo) > MAX_LENGTH:
        raise RepositoryError(f"invalid repository: longer than {MAX_LENGTH} characters")
    if repo.startswith("-"):
        raise _refuse(repo, "must not start with '-'")
    if _CONTROL.search(repo):
        raise _refuse(repo, "contains control characters")
    if repo != repo.strip():
        raise _refuse(repo, "leading or trailing spaces")
    if re.match(r"[A-Za-z0-9+.-]*::", repo):  # git remote helpers such as ext:: can run commands
        raise _refuse(repo, "remote helpers are not allowed")
    if "://" in repo:
        return _canonical_url(repo)
    if not repo.startswith("/") and _SCP_RE.fullmatch(repo):
        return _canonical_scp(repo)
    if not repo.startswith("/"):
        raise _refuse(repo, "a local path must be absolute")
    return _canonical_path(repo, repo)


def is_local(canonical: str) -> bool:
    """Whether a canonical repository is a path on the dispatcher's own host."""
    return canonical.startswith("/")


def host_of(canonical: str) -> str | None:
    """``host`` or ``host:port`` of a canonical URL (no user); None for a local path."""
    if is_local(canonical):
        return None
    netloc = canonical.split("://", 1)[1].split("/", 1)[0]
    return netloc.rsplit("@", 1)[-1]


def _canonical_url(repo: str) -> str:
    scheme, _, rest = repo.partition("://")
    scheme = SCHEME_ALIASES.get(scheme.lower(), scheme.lower())
    if scheme == "file":
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        if not rest.startswith("/"):
            raise _refuse(repo, "a file:// URL must name an absolute path on this host")
        return _canonical_path(repo, _decode_path(repo, rest))
    if scheme not in REMOTE_SCHEMES:
        raise _refuse(repo, f"unsupported scheme {scheme!r} (use a path, file://, https:// or ssh://)")
    if "?" in rest or "#" in rest:
        raise _refuse(repo, "queries and fragments are not allowed")
    netloc, slash, path = rest.partition("/")
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port
    except ValueError:
        raise _refuse(repo, "bad port") from None
    user = _user(repo, scheme, parts.username, parts.password)
    host = (parts.hostname or "").lower()
    if "[" in netloc:
        host = f"[{host}]"
    if not _HOST_RE.fullmatch(host):
        raise _refuse(repo, "bad host name")
    if port is not None and port != DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    path = _decode_path(repo, "/" + path if slash else "")
    if path in ("", "/"):
        raise _refuse(repo, "no repository path")
    return f"{scheme}://{user}{host}{_encode_path(path)}"


def _user(repo: str, scheme: str, user: str | None, password: str | None) -> str:
    if user is None and password is None:
        return ""
    if scheme != "ssh":
        raise RepositoryError("credentials in repository URLs are not accepted; configure them on the dispatcher")
    if password is not None:
        raise RepositoryError("passwords in repository URLs are not accepted; configure ssh keys on the dispatcher")
    user = unquote(user or "")
    if not _USER_RE.fullmatch(user):
        raise _refuse(repo, "bad user name")
    return user + "@"


def _scp_to_url(user: str | None, host: str, path: str) -> str:
    """scp's ``host:path`` is relative to the home directory unless PATH is absolute."""
    if not path.startswith(("/", "~")):
        path = "~/" + path
    return f"ssh://{user + '@' if user else ''}{host}/{path.lstrip('/')}"


def _canonical_scp(repo: str) -> str:
    match = _SCP_RE.fullmatch(repo)
    assert match is not None
    if not match.group("path"):
        raise _refuse(repo, "no repository path")
    return _canonical_url(_scp_to_url(match.group("user"), match.group("host"), match.group("path")))


def _decode_path(repo: str, path: str) -> str:
    """Percent-decode once; refuse what decoding could hide (dot segments, '/', '%')."""
    segments = path.split("/")
    decoded = []
    for raw in segments:
        try:
            segment = unquote(raw, errors="strict") if "%" in raw else raw
        except UnicodeDecodeError:
            raise _refuse(repo, "percent-encoding that is not UTF-8") from None
        if "/" in segment:
            raise _refuse(repo, "an encoded '/' (%2F) is not allowed")
        if "%" in segment and "%" in raw:
            raise _refuse(repo, "double percent-encoding is not allowed")
        if segment in (".", ".."):
            raise _refuse(repo, "'.' and '..' path segments are not allowed")
        if "\\" in segment:  # some servers and proxies read it as '/': 'a\\..\\b' would be '../b'
            raise _refuse(repo, "'\\' is not allowed in a repository path")
        if _CONTROL.search(segment) and "%" in raw:
            raise _refuse(repo, "encoded control characters are not allowed")
        decoded.append(segment)
    out = "/".join(decoded)
    while out.endswith("/") and len(out) > 1:
        out = out[:-1]
    return out


def _encode_path(path: str) -> str:
    return quote(path, safe=_PATH_SAFE)


def _canonical_path(repo: str, path: str) -> str:
    if any(s in (".", "..") for s in path.split("/")):
        raise _refuse(repo, "'.' and '..' path segments are not allowed")
    return os.path.realpath(path)


def under_root(canonical: str, roots: tuple[str, ...] | list[str]) -> bool:
    """Whether a canonical local path lies in (or is) one of ``roots`` (compared by realpath)."""
    for root in roots:
        real = os.path.realpath(root)
        if canonical == real or canonical.startswith(real.rstrip("/") + "/"):
            return True
    return False


MAX_GIT_ENTRIES = 200_000  # files looked at in a local repository's objects/ and refs/


def local_repository_problem(canonical: str, roots: tuple[str, ...] | list[str]) -> str | None:
    """Why the local repository at ``canonical`` could read outside ``roots``; None if it cannot.

    A repository under a root can still point elsewhere: a ``.git`` file naming another git
    directory, ``objects/info/alternates``, a linked worktree's ``commondir``, or symlinks
    in its object store. git follows all of them, so each is refused here, as are files
    that are neither regular files nor directories (a FIFO would stall the clone).
    """
    dot_git = os.path.join(canonical, ".git")
    if os.path.isfile(dot_git):
        try:
            with open(dot_git, encoding="utf-8", errors="replace") as f:
                first = f.readline(4096).strip()
        except OSError:
            return "its .git file cannot be read"
        if not first.startswith("gitdir:"):
            return "its .git file does not name a git directory"
        git_dir = os.path.realpath(os.path.join(canonical, first[len("gitdir:"):].strip()))
    elif os.path.isdir(dot_git):
        git_dir = os.path.realpath(dot_git)
    else:
        git_dir = canonical  # a bare repository
    if not under_root(git_dir, roots):
        return "its git directory is outside the allowed local roots"
    for name in ("commondir", "objects/info/alternates", "objects/info/http-alternates"):
        if os.path.lexists(os.path.join(git_dir, name)):
            return f"it uses {name}, which points git at other repositories"
    seen = 0
    for top in ("objects", "refs"):
        for base, dirs, files in os.walk(os.path.join(git_dir, top)):
            for name in dirs + files:
                seen += 1
                if seen > MAX_GIT_ENTRIES:
                    return f"its objects/ and refs/ hold more than {MAX_GIT_ENTRIES} files (run git gc)"
                path = os.path.join(base, name)
                if os.path.islink(path):
                    return f"it holds a symbolic link in {top}/"
                if name in files and not os.path.isfile(path):
                    return f"it holds a file in {top}/ that is not a regular file"
    return None


# --- globs ------------------------------------------------------------------------------


def canonical_pattern(pattern: str) -> str:
    """A pipeline's repository glob in the canonical spelling, so matching is canonical vs canonical.

    Scheme and host are lowercased and default ports dropped; a local path's leading
    directories (those without glob characters) go through realpath. ``*`` alone stays.
    """
    if pattern in ("*", "**"):
        return pattern
    if "://" in pattern:
        scheme, _, rest = pattern.partition("://")
        scheme = SCHEME_ALIASES.get(scheme.lower(), scheme.lower())
        if scheme == "file":
            return canonical_pattern(rest[len("localhost"):] if rest.startswith("localhost/") else rest)
        netloc, _, path = rest.partition("/")
        userinfo, at, hostport = netloc.rpartition("@")
        if at and (scheme != "ssh" or ":" in userinfo):
            raise RepositoryError(f"repository pattern {_mask(pattern)!r}: credentials are not accepted "
                                  "(http(s) takes none, ssh only a user name)")
        hostport = hostport.lower()
        default = DEFAULT_PORTS.get(scheme)
        if default is not None and hostport.endswith(f":{default}"):
            hostport = hostport[: -len(f":{default}")]
        if any(s in (".", "..") for s in path.split("/")):
            raise RepositoryError(f"repository pattern {pattern!r}: '.' and '..' path segments are not allowed")
        path = path.rstrip("/")
        return f"{scheme}://{userinfo}{at}{hostport}" + (f"/{path}" if path else "")
    match = _SCP_RE.fullmatch(pattern)
    if match and not pattern.startswith("/") and match.group("path"):
        return canonical_pattern(_scp_to_url(match.group("user"), match.group("host"), match.group("path")))
    if pattern.startswith("/"):
        segments = pattern.rstrip("/").split("/")
        fixed = 0
        while fixed < len(segments) and not any(c in segments[fixed] for c in GLOB_CHARS):
            fixed += 1
        head = "/".join(segments[:fixed]) or "/"
        real = os.path.realpath(head)
        return "/".join([real.rstrip("/"), *segments[fixed:]]) if fixed < len(segments) else real
    return pattern


def pattern_host(pattern: str) -> str | None:
    """The host (``host[:port]``) a canonical URL pattern names, if it names one without globs."""
    if "://" not in pattern:
        return None
    netloc = pattern.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    if not netloc or any(c in netloc for c in GLOB_CHARS):
        return None
    return netloc


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    """``*`` and ``?`` stay within one path segment, ``**`` crosses ``/``, ``[...]`` is a class."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern.startswith(("[!", "[^"), i) else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = body.replace("\\", "\\\\").replace("^", "\\^")
                out.append(f"(?!/)[{'^' if negate else ''}{body}]")
                i = end + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def glob_match(pattern: str, text: str) -> bool:
    """Whether ``text`` matches the glob; a pattern that is just ``*`` (or ``**``) matches anything."""
    if pattern in ("*", "**"):
        return True
    return _compile(pattern).fullmatch(text) is not None
