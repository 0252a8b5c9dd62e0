"""Commit statuses: a job's state shown on the commit, in the forge the commit came from.

``status_request(...)`` is pure: it builds the one HTTP request each forge documents for
creating a commit status, with narwhal's job state in the forge's own words:

* GitHub: ``POST {url}/repos/{owner}/{repo}/statuses/{sha}``, ``Authorization: Bearer``,
  states error | failure | pending | success, ``description`` at most 140 characters;
* Gitea and Forgejo: ``POST {url}/api/v1/repos/{owner}/{repo}/statuses/{sha}``,
  ``Authorization: token``, states pending | success | error | failure | warning;
* GitLab: ``POST {url}/api/v4/projects/{url-encoded path}/statuses/{sha}``, ``PRIVATE-TOKEN``,
  states pending | running | success | failed | canceled, the context sent as ``name``.

``owner``/``repo`` come from the repository's clone URL (https, ssh or scp-like); anything
that does not reduce to a clean owner/repo (GitLab: group/.../project) is refused.

``send(request, timeout)`` makes the call and never raises: a ``DeliveryResult`` says whether
it worked and whether trying again later may help (5xx, 429, no connection, a timeout).
Redirects are not followed (a token header would go with them), the answer is read only up to
``MAX_RESPONSE`` bytes, and no message, error or repr ever holds the token.
"""

from __future__ import annotations

import json as jsonlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from narwhal import __version__
from narwhal.config.forges import Forge
from narwhal.job import COMMIT_RE, JobStatus
from narwhal.masking import Masker
from narwhal.text import printable

# narwhal's job state -> the forge's state name.
FORGE_STATES: dict[str, dict[str, str]] = {
    "github": {"queued": "pending", "running": "pending", "passed": "success",
               "failed": "failure", "error": "error", "cancelled": "error", "skipped": "success"},
    "gitea": {"queued": "pending", "running": "pending", "passed": "success",
              "failed": "failure", "error": "error", "cancelled": "warning", "skipped": "success"},
    "gitlab": {"queued": "pending", "running": "running", "passed": "success",
               "failed": "failed", "error": "failed", "cancelled": "canceled", "skipped": "skipped"},
}
FORGE_STATES["forgejo"] = FORGE_STATES["gitea"]
# Every state each forge's API accepts (what the stand-in forge checks too).
ACCEPTED_STATES: dict[str, frozenset[str]] = {
    "github": frozenset({"error", "failure", "pending", "success"}),
    "gitea": frozenset({"pending", "success", "error", "failure", "warning"}),
    "forgejo": frozenset({"pending", "success", "error", "failure", "warning"}),
    "gitlab": frozenset({"pending", "running", "success", "failed", "canceled", "skipped"}),
}
MAX_DESCRIPTION = 140  # GitHub's limit; the others take it too
MAX_CONTEXT = 255
MAX_TARGET_URL = 2048
MAX_REPO_URL = 2048
MAX_GITLAB_DEPTH = 21  # 20 levels of groups, then the project
MAX_RESPONSE = 64 * 1024  # bytes of an answer read; the rest is dropped
GITHUB_API_VERSION = "2022-11-28"
USER_AGENT = f"narwhal/{__version__}"
SECRET_HEADERS = ("authorization", "private-token")

_SEGMENT_RE = re.compile(r"[A-Za-z0-9_.-]{1,255}")
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,4096}")  # visible ASCII: nothing a header could be split on
_SCP_RE = re.compile(r"(?:[^@/:]+@)?(?P<host>[^@/:]+):(?P<path>.+)", re.DOTALL)
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\%?#]")


class StatusError(ValueError):
    """A status that cannot be asked for: a bad state, commit, context or repository URL."""


@dataclass(frozen=True)
class StatusRequest:
    """One HTTP request to a forge; ``headers`` hold the token, so the repr masks them."""

    method: str
    url: str
    headers: dict[str, str] = field(repr=False)
    json: dict[str, Any]

    def __repr__(self) -> str:
        shown = {k: ("***" if k.lower() in SECRET_HEADERS else v) for k, v in self.headers.items()}
        return f"StatusRequest(method={self.method!r}, url={self.url!r}, headers={shown!r}, json={self.json!r})"


@dataclass(frozen=True)
class DeliveryResult:
    """What became of one request: ``retryable`` when trying again later may work."""

    ok: bool
    status_code: int | None
    retryable: bool
    error: str | None = None


def forge_state(kind: str, state: str) -> str:
    """narwhal's job state (queued, running, passed, failed, error, cancelled) in KIND's words."""
    if kind not in FORGE_STATES:
        raise StatusError(f"unknown forge kind {kind!r}")
    try:
        return FORGE_STATES[kind][JobStatus(state).value]
    except ValueError:
        raise StatusError(f"unknown job state {printable(state, 40)!r}; expected one of "
                          f"{', '.join(s.value for s in JobStatus)}") from None


def status_request(forge: Forge, repo_url: str, sha: str, state: str, context: str,
                   description: str, target_url: str | None, token: str) -> StatusRequest:
    """The documented request that sets commit SHA of REPO_URL to STATE on FORGE."""
    if not isinstance(sha, str) or not COMMIT_RE.fullmatch(sha.lower()):
        raise StatusError("the commit must be 40 hex digits")
    sha = sha.lower()
    forge_value = forge_state(forge.kind, state)
    context = _context(context)
    path = repo_path(forge, repo_url)
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise StatusError("the token is empty or holds characters an HTTP header cannot carry")
    body: dict[str, Any] = {"state": forge_value}
    body["name" if forge.kind == "gitlab" else "context"] = context
    text = printable(description, MAX_DESCRIPTION).strip() if isinstance(description, str) else ""
    if text:
        body["description"] = text
    if target_url is not None:
        body["target_url"] = _target_url(target_url)
    headers = {"User-Agent": USER_AGENT}
    if forge.kind == "github":
        url = f"{forge.api_base}/repos/{quote(path[0], safe='')}/{quote(path[1], safe='')}/statuses/{sha}"
        headers |= {"Accept": "application/vnd.github+json", "Authorization": f"Bearer {token}",
                    "X-GitHub-Api-Version": GITHUB_API_VERSION}
    elif forge.kind == "gitlab":
        url = f"{forge.api_base}/projects/{quote('/'.join(path), safe='')}/statuses/{sha}"
        headers |= {"Accept": "application/json", "PRIVATE-TOKEN": token}
    else:
        url = f"{forge.api_base}/repos/{quote(path[0], safe='')}/{quote(path[1], safe='')}/statuses/{sha}"
        headers |= {"Accept": "application/json", "Authorization": f"token {token}"}
    return StatusRequest("POST", url, headers, body)


def _context(context: Any) -> str:
    if (not isinstance(context, str) or not context.strip() or len(context) > MAX_CONTEXT
            or printable(context) != context):
        raise StatusError(f"the status context must be 1 to {MAX_CONTEXT} printable characters")
    return context


def _target_url(value: Any) -> str:
    if (not isinstance(value, str) or len(value) > MAX_TARGET_URL or not value.isascii()
            or re.search(r"[\x00-\x20\x7f]", value) or not value.lower().startswith(("http://", "https://"))):
        raise StatusError("target_url must be an http(s) URL without spaces or control characters")
    return value


def repo_path(forge: Forge, repo_url: str) -> list[str]:
    """The repository's path on FORGE from its clone URL: [owner, repo], or GitLab's
    [group, ..., project]. StatusError when the URL gives no such clean path."""
    if not isinstance(repo_url, str) or not repo_url or len(repo_url) > MAX_REPO_URL or not repo_url.isascii():
        raise StatusError("the repository URL is empty, too long or not ASCII")
    if _BAD_URL_CHARS.search(repo_url):
        raise StatusError("the repository URL holds spaces, control characters, '\\', '%', '?' or '#'")
    if "://" in repo_url:
        try:
            parts = urlsplit(repo_url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise StatusError("the repository URL is not a URL") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https", "ssh", "git", "git+ssh", "ssh+git"):
            raise StatusError("the repository URL must be http(s), ssh or scp-like (user@host:path)")
        if parts.password is not None or (parts.username is not None and scheme in ("http", "https")):
            raise StatusError("the repository URL must not carry credentials")
        host, path = (parts.hostname or "").lower(), parts.path
    else:
        match = _SCP_RE.fullmatch(repo_url)
        if not match:
            raise StatusError("the repository URL must be http(s), ssh or scp-like (user@host:path)")
        host, path = match.group("host").lower(), match.group("path")
    base = urlsplit(forge.url)
    prefix = base.path.rstrip("/")
    if prefix and host == (base.hostname or "").lower() and path.startswith(prefix + "/"):
        path = path[len(prefix):]  # a forge served under a sub-path: https://example.com/gitea/owner/repo
    path = path[1:] if path.startswith("/") else path
    path = path[:-1] if path.endswith("/") else path
    if path.endswith(".git"):
        path = path[:-len(".git")]
    segments = path.split("/")
    if any(s in (".", "..") or not _SEGMENT_RE.fullmatch(s) for s in segments):
        raise StatusError("the repository path must be plain names (letters, digits, '.', '_', '-'), "
                          "without '.' or '..'")
    if forge.kind == "gitlab":
        if not 2 <= len(segments) <= MAX_GITLAB_DEPTH:
            raise StatusError("a GitLab repository path is group/.../project")
    elif len(segments) != 2:
        raise StatusError(f"a {forge.kind} repository path is owner/repo")
    return segments


# --- sending ------------------------------------------------------------------------


def send(request: StatusRequest, timeout: float = 10.0,
         session: requests.Session | None = None) -> DeliveryResult:
    """Make REQUEST; never raises. Retryable: 5xx, 429, no connection, a timeout."""
    hide = _hider(request.headers)
    http: Any = session if session is not None else requests
    try:
        response = http.request(request.method, request.url, headers=request.headers, json=request.json,
                                timeout=(timeout, timeout), allow_redirects=False, stream=True)
    except requests.Timeout:
        return DeliveryResult(False, None, True, "timed out")
    except requests.exceptions.SSLError:
        return DeliveryResult(False, None, True, "TLS failed (the forge's certificate or protocol)")
    except requests.ConnectionError:
        return DeliveryResult(False, None, True, "could not connect")
    except Exception as exc:  # noqa: BLE001 - the type only: a library's text may quote a header
        return DeliveryResult(False, None, False, f"request failed ({type(exc).__name__})")
    try:
        code = int(response.status_code)
        try:
            answer = _read(response)
        except Exception:  # noqa: BLE001 - the status line is what counts; the body is a detail
            answer = b""
    finally:
        response.close()
    if 200 <= code < 300:
        return DeliveryResult(True, code, False)
    retryable = code == 429 or code >= 500
    error = f"HTTP {code}"
    if 300 <= code < 400:
        error += ": redirected, not followed (is the forge's url right?)"
    detail = _detail(answer, hide)
    if detail:
        error += f": {detail}"
    return DeliveryResult(False, code, retryable, hide(error))


def _hider(headers: dict[str, str]) -> Callable[[str], str]:
    """What makes a forge's answer safe to keep: the credential headers' values, and the token
    alone without its scheme ('Bearer ', 'token '), in every spelling, become ``***``."""
    values = [v for k, v in headers.items() if k.lower() in SECRET_HEADERS]
    values += [v.split(" ", 1)[1] for v in values if " " in v]
    masker = Masker([("token", v) for v in values if v])
    marker = "[masked:token]"
    return lambda text: masker.mask_text(text).replace(marker, "***")


def _read(response: requests.Response) -> bytes:
    data = b""
    for chunk in response.iter_content(8192):
        data += chunk
        if len(data) >= MAX_RESPONSE:
            return data[:MAX_RESPONSE]
    return data


def _detail(answer: bytes, hide: Callable[[str], str]) -> str:
    """The forge's own short reason (``message``/``error`` of a JSON answer), inert and short;
    the token hidden before it is cut, so no piece of it is left at the cut."""
    try:
        data = jsonlib.loads(answer)
    except (ValueError, RecursionError):
        return ""
    if isinstance(data, dict):
        for key in ("message", "error"):
            if isinstance(data.get(key), str):
                return printable(hide(data[key]), 200)
    return ""
