"""Webhooks from forges: check the signature, then say what the delivery asks narwhal to build.

Two pure steps, as gidgethub does it. ``verify(kind, secret, headers, body)`` checks a
delivery against the hook's secret over the raw body before a byte of it is parsed:

* GitHub: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>``;
* Gitea and Forgejo: ``X-Gitea-Signature`` / ``X-Forgejo-Signature``, the same HMAC as bare
  hex (Forgejo sends both; every one present must match, so a good one cannot rescue a bad one);
* GitLab: ``X-Gitlab-Token`` is the secret itself (GitLab signs nothing).

Only then, ``parse(kind, headers, body)`` reads the event header and the JSON body into one
small value: ``Ping`` (GitHub checks the hook), ``Ignored(reason)`` (a closed pull request, a
deleted branch, an issue event) or a ``Trigger``: which commit of which repository to build,
and why. A delivery that cannot be read raises ``BadPayload`` (a 400 at the API) with a short
message that names the field and never quotes the payload.

The body is signed but its text is not narwhal's: branch names, titles and commit messages are
whatever a contributor wrote, so every field is type-checked, refs are checked as git checks
them, commits are 40 hex digits, repository URLs take narwhal's one spelling
(``narwhal.config.repository``) and free text is cut short and made inert (``narwhal.text``).
Headers are not signed at all: they only choose how the body is read, and the body must then
fit (GitLab's ``object_kind`` must agree with its event header).

``changed`` lists the paths a push touched, but only when the payload provably lists every
commit of the push: never for a new branch, a forced push, a tag, a pull request or a list the
forge cut short (GitLab sends at most 20 commits, Gitea a few, GitHub 2048). ``None`` means
unknown; a consumer that filters on paths must then build.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from narwhal.config.repository import RepositoryError, canonical_repo
from narwhal.errors import BadRequest
from narwhal.job import COMMIT_RE
from narwhal.jsonnesting import nested_deeper_than
from narwhal.text import printable

KINDS = ("github", "gitea", "forgejo", "gitlab")
MAX_PAYLOAD = 8 * 1024 * 1024  # bytes; a push listing thousands of commits fits
MAX_DEPTH = 64  # JSON nesting; forge payloads need about 8
MAX_REF = 255
MAX_AUTHOR = 100
MAX_SUBJECT = 200
MAX_DELIVERY = 128
MAX_PATH = 4096
MAX_PATHS = 10_000  # distinct changed paths; more and ``changed`` is None
MAX_NUMBER = 2**31 - 1  # pull and merge request numbers
GITHUB_MAX_COMMITS = 2048  # GitHub lists at most this many commits in a push
ZERO = "0" * 40
PR_ACTIONS = ("opened", "reopened", "synchronize", "synchronized")  # GitHub says synchronize, Gitea synchronized
MR_ACTIONS = ("open", "reopen", "update")

SIGNATURE_HEADERS = {
    "github": ("X-Hub-Signature-256",),
    "gitea": ("X-Gitea-Signature", "X-Forgejo-Signature"),
    "forgejo": ("X-Forgejo-Signature", "X-Gitea-Signature"),
    "gitlab": ("X-Gitlab-Token",),
}
EVENT_HEADERS = {
    "github": ("X-GitHub-Event",),
    "gitea": ("X-Gitea-Event", "X-Forgejo-Event"),
    "forgejo": ("X-Forgejo-Event", "X-Gitea-Event"),
    "gitlab": ("X-Gitlab-Event",),
}
# GitLab's Idempotency-Key stays the same when a delivery is retried; its event UUID is older.
DELIVERY_HEADERS = {
    "github": ("X-GitHub-Delivery",),
    "gitea": ("X-Gitea-Delivery", "X-Forgejo-Delivery"),
    "forgejo": ("X-Forgejo-Delivery", "X-Gitea-Delivery"),
    "gitlab": ("Idempotency-Key", "X-Gitlab-Event-UUID"),
}
GITLAB_EVENTS = {"Push Hook": "push", "Tag Push Hook": "tag_push", "Merge Request Hook": "merge_request"}

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_DELIVERY_RE = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_DELIVERY}}}")
_WORD_RE = re.compile(r"[A-Za-z0-9 _.-]{1,40}")
# What git check-ref-format refuses anywhere in a ref (and a leading '-' in a component, which
# would read as an option wherever a branch name reaches a command line).
_REF_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")


class BadPayload(BadRequest, ValueError):
    """A delivery narwhal cannot read: not JSON, or a field missing or malformed.

    The message names the field, never its value: the payload is the sender's text."""


@dataclass(frozen=True)
class Ping:
    """The forge checks that the hook answers (GitHub's ``ping``): build nothing, answer 200."""


@dataclass(frozen=True)
class Ignored:
    """A well-formed delivery that builds nothing, and why (safe to log and to answer)."""

    reason: str


@dataclass(frozen=True)
class Trigger:
    """A commit to build: what happened, on which repository, and what narwhal knows about it."""

    event: str  # push | tag | pull_request
    repo_url: str  # the BASE repository (the one pipelines match), canonical spelling
    commit: str  # 40 lowercase hex digits
    ref: str  # refs/heads/main, refs/tags/v1, refs/pull/7/head, refs/merge-requests/7/head
    branch: str | None = None  # the pushed branch; a pull request's target (base) branch; None for tags
    tag: str | None = None
    pr: int | None = None  # pull (merge) request number
    source_repo: str | None = None  # where a pull request's head lives (maybe a fork); None when unknown
    delivery: str | None = None  # the forge's delivery id, to drop repeats
    author: str | None = None  # the forge login that pushed or opened the pull request
    subject: str | None = None  # first line of the head commit's message, when the payload has it
    changed: tuple[str, ...] | None = None  # paths the push touched; None when unknown


Hook = Ping | Ignored | Trigger


# --- verification -------------------------------------------------------------------


def verify(kind: str, secret: bytes, headers: Any, body: bytes) -> bool:
    """Whether the delivery carries a valid proof of ``secret`` for ``body``.

    Constant-time comparisons; header names in any case; every signature header present
    (and every repeat of one) must match; a missing or malformed header, an empty secret or
    an unknown kind is False. Never raises.
    """
    if kind not in KINDS or not isinstance(secret, bytes) or not secret:
        return False
    if not isinstance(body, (bytes, bytearray)):
        return False
    if kind == "gitlab":
        tokens = header_values(headers, "X-Gitlab-Token")
        return bool(tokens) and all([hmac.compare_digest(_header_bytes(token), secret) for token in tokens])
    given = [value for name in SIGNATURE_HEADERS[kind] for value in header_values(headers, name)]
    if not given:
        return False
    if kind == "github":  # sha256=<hex>; anything else is malformed
        given = [value[len("sha256="):] if value.startswith("sha256=") else "" for value in given]
    expected = hmac.new(secret, bytes(body), hashlib.sha256).hexdigest().encode("ascii")
    return all([_hex_equal(value, expected) for value in given])  # a list: every one compared


def _hex_equal(value: str, expected: bytes) -> bool:
    if not _HEX64.fullmatch(value):
        hmac.compare_digest(expected, expected)  # keep the work the same either way
        return False
    return hmac.compare_digest(value.lower().encode("ascii"), expected)


def _header_bytes(value: str) -> bytes:
    """A header's text as the bytes that were sent (WSGI hands them over decoded as latin-1)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


def header_values(headers: Any, name: str) -> list[str]:
    """Every value of header NAME (any case) in a mapping or an iterable of pairs, surrounding
    blanks cut; a value that is not text counts as ''. [] when absent or unreadable."""
    wanted = name.lower()
    found: list[str] = []
    try:
        items = headers.items() if hasattr(headers, "items") else headers
        for item in items:
            key, value = item
            if isinstance(key, bytes):
                key = key.decode("latin-1")
            if not isinstance(key, str) or key.strip().lower() != wanted:
                continue
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            found.append(value.strip(" \t") if isinstance(value, str) else "")
    except (TypeError, ValueError, AttributeError):
        return []
    return found


def header(headers: Any, name: str) -> str | None:
    """Header NAME's one value; None when absent, or given more than once with different values."""
    values = header_values(headers, name)
    return values[0] if values and all(v == values[0] for v in values) else None


# --- parsing ------------------------------------------------------------------------


def parse(kind: str, headers: Any, body: bytes) -> Hook:
    """What a verified delivery asks for: Ping, Ignored(reason) or Trigger.

    Call it only after ``verify`` said True. Raises BadPayload for a delivery it cannot read
    (and ValueError for an unknown ``kind``, which is narwhal's own mistake).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown forge kind {kind!r}; expected one of {', '.join(KINDS)}")
    event = _first_header(headers, EVENT_HEADERS[kind])
    if event is None:
        raise BadPayload(f"no {EVENT_HEADERS[kind][0]} header: not a {kind} webhook delivery")
    delivery = _delivery(_first_header(headers, DELIVERY_HEADERS[kind]))
    if kind == "github":
        return _github(event, _load(body), delivery)
    if kind == "gitlab":
        return _gitlab(event, body, delivery)
    return _gitea(event, body, delivery)


def _first_header(headers: Any, names: tuple[str, ...]) -> str | None:
    for name in names:
        value = header(headers, name)
        if value:
            return value
    return None


def _delivery(value: str | None) -> str | None:
    return value if value is not None and _DELIVERY_RE.fullmatch(value) else None


def _github(event: str, data: dict, delivery: str | None) -> Hook:
    if event == "ping":
        return Ping()
    if event == "push":
        return _push("github", data, delivery)
    if event == "pull_request":
        return _pull_request("github", data, delivery)
    return Ignored(f"{_word(event)} events do not build")


def _gitea(event: str, body: bytes, delivery: str | None) -> Hook:
    if event == "push":
        return _push("gitea", _load(body), delivery)
    if event == "pull_request":
        return _pull_request("gitea", _load(body), delivery)
    if event in ("create", "delete"):
        return Ignored(f"{event} events do not build (a push that adds commits does)")
    return Ignored(f"{_word(event)} events do not build")


def _gitlab(event: str, body: bytes, delivery: str | None) -> Hook:
    kind = GITLAB_EVENTS.get(event)
    if kind is None:
        return Ignored(f"{_word(event)} events do not build")
    data = _load(body)
    if data.get("object_kind") != kind:
        raise BadPayload(f"object_kind does not match the {event} header")
    if kind == "merge_request":
        return _merge_request(data, delivery)
    return _push("gitlab", data, delivery)


# --- push ---------------------------------------------------------------------------


def _push(kind: str, data: dict, delivery: str | None) -> Hook:
    ref = _ref(data.get("ref"), "ref")
    if ref.startswith("refs/heads/"):
        what, name = "branch", ref[len("refs/heads/"):]
    elif ref.startswith("refs/tags/"):
        what, name = "tag", ref[len("refs/tags/"):]
    else:
        return Ignored("pushes to refs other than branches and tags do not build")
    after = data.get("after")
    if after == ZERO or (kind == "github" and data.get("deleted") is True):
        return Ignored(f"{what} deleted")
    commit = _sha(after, "after")
    commits = data.get("commits")
    commits = commits if isinstance(commits, list) else []
    head = _head_commit(data, commit, commits)
    if what == "tag":
        commit = _tag_commit(kind, data, head) or commit
    if kind == "gitlab":
        repo = _repo(_get(data, "project", "git_http_url") or _get(data, "repository", "git_http_url"),
                     "project.git_http_url")
        author = _text(data.get("user_username") or data.get("user_name"), MAX_AUTHOR)  # tag pushes: name only
    else:
        repo = _repo(_get(data, "repository", "clone_url"), "repository.clone_url")
        pusher = data.get("pusher")
        login = _get(pusher, "name") if kind == "github" else _get(pusher, "login") or _get(pusher, "username")
        author = _text(login or _get(data, "sender", "login"), MAX_AUTHOR)
    subject = _subject(head)
    changed = _changed(commits) if what == "branch" and _lists_every_commit(kind, data, commits) else None
    return Trigger("push" if what == "branch" else "tag", repo, commit, ref,
                   branch=name if what == "branch" else None, tag=name if what == "tag" else None,
                   delivery=delivery, author=author, subject=subject, changed=changed)


def _head_commit(data: dict, after: str, commits: list) -> dict | None:
    """The pushed head's commit record: GitHub's and Gitea's head_commit, else the listed one."""
    head = data.get("head_commit")
    if isinstance(head, dict):
        return head
    for item in commits:
        if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"].lower() == after:
            return item
    return None


def _tag_commit(kind: str, data: dict, head: dict | None) -> str | None:
    """The commit a pushed tag points at (``after`` is the tag object for an annotated tag)."""
    candidate = data.get("checkout_sha") if kind == "gitlab" else _get(head, "id")
    if isinstance(candidate, str) and COMMIT_RE.fullmatch(candidate.lower()) and candidate != ZERO:
        return candidate.lower()
    return None


def _lists_every_commit(kind: str, data: dict, commits: list) -> bool:
    """Whether the payload's commits are the whole push (so their files are what changed)."""
    before = data.get("before")
    if not commits or not isinstance(before, str) or not COMMIT_RE.fullmatch(before.lower()) or before == ZERO:
        return False  # a new branch: its commits' files are not what it changes
    if kind == "github":
        return data.get("forced") is False and data.get("created") is False and len(commits) < GITHUB_MAX_COMMITS
    total = data.get("total_commits_count" if kind == "gitlab" else "total_commits")
    return isinstance(total, int) and not isinstance(total, bool) and total == len(commits)


def _changed(commits: list) -> tuple[str, ...] | None:
    paths: dict[str, None] = {}
    for item in commits:
        if not isinstance(item, dict):
            return None
        for key in ("added", "modified", "removed"):
            files = item.get(key)
            if not isinstance(files, list):
                return None
            for path in files:
                if not _is_path(path):
                    return None
                paths[path] = None
                if len(paths) > MAX_PATHS:
                    return None
    return tuple(sorted(paths))


def _is_path(path: Any) -> bool:
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH or "\x00" in path:
        return False
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
        return False
    return True


# --- pull and merge requests --------------------------------------------------------


def _pull_request(kind: str, data: dict, delivery: str | None) -> Hook:
    action = data.get("action")
    if action not in PR_ACTIONS:
        return Ignored(f"pull request {_word(action)}: only opened, reopened and new commits build")
    pr = data.get("pull_request")
    if not isinstance(pr, dict):
        raise BadPayload("pull_request is missing")
    number = _number(pr.get("number", data.get("number")), "pull_request.number")
    head, base = pr.get("head"), pr.get("base")
    if not isinstance(head, dict) or not isinstance(base, dict):
        raise BadPayload("pull_request.head or pull_request.base is missing")
    commit = _sha(head.get("sha"), "pull_request.head.sha")
    branch = _branch(base.get("ref"), "pull_request.base.ref")
    repo = _repo(_get(base, "repo", "clone_url") or _get(data, "repository", "clone_url"), "repository.clone_url")
    source = _optional_repo(_get(head, "repo", "clone_url"), "pull_request.head.repo.clone_url")
    if source is None and kind != "github":
        # Gitea may leave the repositories out and give their ids: the same id is the same repository.
        head_id, base_id = head.get("repo_id"), base.get("repo_id") or _get(data, "repository", "id")
        if isinstance(head_id, int) and not isinstance(head_id, bool) and head_id > 0 and head_id == base_id:
            source = repo
    user = pr.get("user")
    author = _text(_get(user, "login") or _get(user, "username"), MAX_AUTHOR)
    return Trigger("pull_request", repo, commit, f"refs/pull/{number}/head", branch=branch, pr=number,
                   source_repo=source, delivery=delivery, author=author)


def _merge_request(data: dict, delivery: str | None) -> Hook:
    attrs = data.get("object_attributes")
    if not isinstance(attrs, dict):
        raise BadPayload("object_attributes is missing")
    action = attrs.get("action")
    if action not in MR_ACTIONS:
        return Ignored(f"merge request {_word(action)}: only open, reopen and update with new commits build")
    oldrev = attrs.get("oldrev")
    if action == "update" and not (isinstance(oldrev, str) and COMMIT_RE.fullmatch(oldrev.lower())):
        return Ignored("merge request updated without new commits")
    number = _number(attrs.get("iid"), "object_attributes.iid")
    last = attrs.get("last_commit")
    commit = _sha(_get(last, "id"), "object_attributes.last_commit.id")
    branch = _branch(attrs.get("target_branch"), "object_attributes.target_branch")
    repo = _repo(_get(attrs, "target", "git_http_url") or _get(data, "project", "git_http_url"),
                 "object_attributes.target.git_http_url")
    source = _optional_repo(_get(attrs, "source", "git_http_url"), "object_attributes.source.git_http_url")
    author = _text(_get(data, "user", "username"), MAX_AUTHOR)
    return Trigger("pull_request", repo, commit, f"refs/merge-requests/{number}/head", branch=branch,
                   pr=number, source_repo=source, delivery=delivery, author=author, subject=_subject(last))


# --- fields -------------------------------------------------------------------------


def _load(body: Any) -> dict:
    """The body as a JSON object, bounded in size and depth."""
    if not isinstance(body, (bytes, bytearray)):
        raise BadPayload("the payload must be bytes")
    if len(body) > MAX_PAYLOAD:
        raise BadPayload(f"payload larger than {MAX_PAYLOAD // (1024 * 1024)} MiB")
    _check_depth(bytes(body))
    try:
        data = json.loads(bytes(body), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and huge integers are ValueErrors
        raise BadPayload("payload is not JSON (the hook's content type must be application/json)") from None
    if not isinstance(data, dict):
        raise BadPayload("payload is not a JSON object")
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_depth(raw: bytes) -> None:
    if nested_deeper_than(raw, MAX_DEPTH):
        raise BadPayload(f"payload nested deeper than {MAX_DEPTH} levels")


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _sha(value: Any, what: str) -> str:
    if not isinstance(value, str) or not COMMIT_RE.fullmatch(value.lower()) or value == ZERO:
        raise BadPayload(f"{what} is not a commit id (40 hex digits)")
    return value.lower()


def _ref(value: Any, what: str) -> str:
    if not isinstance(value, str) or not valid_ref(value):
        raise BadPayload(f"{what} is not a valid git ref")
    return value


def _branch(value: Any, what: str) -> str:
    if not isinstance(value, str) or not valid_ref("refs/heads/" + value):
        raise BadPayload(f"{what} is not a valid branch name")
    return value


def valid_ref(ref: str) -> bool:
    """A full ref (``refs/...``) git would accept, no longer than MAX_REF, with no control,
    format or unpaired surrogate character and no component starting with '-'."""
    if not ref.startswith("refs/") or len(ref) > MAX_REF or _REF_BAD.search(ref) or ref.endswith(("/", ".")):
        return False
    if any(not c.isascii() and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in ref):
        return False
    return all(part and not part.startswith((".", "-")) and not part.endswith(".lock") for part in ref.split("/"))


def _number(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_NUMBER:
        raise BadPayload(f"{what} is not a positive integer")
    return value


def _repo(value: Any, what: str) -> str:
    """A clone URL in narwhal's canonical spelling; only http(s) and ssh URLs."""
    if not isinstance(value, str) or not value:
        raise BadPayload(f"{what} is missing")
    if not value.lower().startswith(("http://", "https://", "ssh://")):
        raise BadPayload(f"{what} is not an http(s) or ssh URL")
    try:
        return canonical_repo(value)
    except RepositoryError:
        raise BadPayload(f"{what} is not a repository URL narwhal accepts") from None


def _optional_repo(value: Any, what: str) -> str | None:
    return None if value is None or value == "" else _repo(value, what)


def _text(value: Any, limit: int) -> str | None:
    """The first line of VALUE, inert and at most LIMIT characters; None when there is none."""
    if not isinstance(value, str):
        return None
    head = value[:limit * 4 + 64]  # enough for LIMIT characters once escape sequences are dropped
    lines = head.splitlines()
    line = lines[0] if lines else ""
    cut = len(value) > len(head) and len(line) == len(head)  # the first line goes on past what was read
    line = line.encode("utf-8", "replace").decode("utf-8").strip()  # lone surrogates become '?'
    text = printable(line, limit)
    if cut and not text.endswith("…"):
        text = text[:limit - 1] + "…"
    return text or None


def _subject(commit: Any) -> str | None:
    return _text(_get(commit, "title"), MAX_SUBJECT) or _text(_get(commit, "message"), MAX_SUBJECT)


def _word(value: Any) -> str:
    """An event or action name, shown only when it is a plain word."""
    if isinstance(value, str) and _WORD_RE.fullmatch(value):
        return repr(value)
    return "unknown"
