"""When a pipeline or a step runs: the ``when:`` mappings and the decisions.

``when.event`` lists the events a pipeline runs for; ``when.paths`` lists globs over the
files a commit changed, relative to the repository root. A pipeline without ``when`` runs
for every event. The decision (:func:`decide`) is pure: the dispatcher supplies the event
and the changed files it knows of.

A step's ``when`` (:class:`StepWhen`) takes the same keys, and ``branch`` (globs over the
job's branch, as ``branches:`` matches a pipeline's) and ``status`` (``success``: run while
nothing has failed, the default; ``failure``: run once something has). The runner decides
it (:func:`decide_step`) when the step's dependencies are done.

Changed paths filter only ``push`` and ``pull_request`` events, and only when the list of
changed files is known and not empty, as Woodpecker CI does:

- the list is unknown (``None``) for the first push of a branch, a tag, or a commit whose
  parent is not at hand: nothing can be said about what changed, so the pipeline runs;
- an empty list is an empty commit, usually made to start a build: it runs;
- ``tag``, ``cron``, ``manual`` and ``api`` runs are asked for as such, not caused by a
  change, so paths do not filter them.

Path globs: ``*`` and ``?`` stay inside one path segment, ``**`` crosses ``/``, and a
``**/`` at the start of a segment also matches no directory at all (``**/*.py`` matches
``setup.py`` and ``src/app/main.py``; ``*.md`` only the top-level ones). ``[...]`` is a
character class (``[!...]`` negated) that never matches ``/``. Matching is a simulation of
the pattern's automaton, never backtracking, so it costs at most (pattern length x path
length) steps whatever the file names a pusher chose.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from narwhal.config.yamlfile import show_value
from narwhal.job import EVENTS

PATH_FILTERED_EVENTS = ("push", "pull_request")
MAX_PATTERN = 512  # characters in one path glob
MAX_PATTERNS = 100  # globs in when.paths
SHOWN_PATTERNS = 5  # globs named in a decision's reason
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# --- globs ------------------------------------------------------------------------------

# Token kinds of a compiled glob.
_CHAR, _ONE, _CLASS, _STAR, _ANY, _DIRS = range(6)


@dataclass(frozen=True)
class _Token:
    kind: int
    char: str = ""  # _CHAR: the character
    ranges: tuple[tuple[str, str], ...] = ()  # _CLASS: (first, last) character ranges
    negate: bool = False  # _CLASS: matches the characters outside the ranges

    def admits(self, ch: str) -> bool:
        """Whether the character class admits ``ch`` (never '/')."""
        return ch != "/" and any(lo <= ch <= hi for lo, hi in self.ranges) != self.negate


@functools.lru_cache(maxsize=1024)
def _tokens(pattern: str) -> tuple[_Token, ...]:
    """The glob as tokens; ValueError for a character class with a backwards range (``[z-a]``)."""
    out: list[_Token] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            j = i
            while j < n and pattern[j] == "*":
                j += 1
            if j - i == 1:
                out.append(_Token(_STAR))
            elif (i == 0 or pattern[i - 1] == "/") and j < n and pattern[j] == "/":
                out.append(_Token(_DIRS))  # "**/": no directory, or any run of them
                j += 1
            else:
                out.append(_Token(_ANY))
            i = j
            continue
        if c == "?":
            out.append(_Token(_ONE))
        elif c == "[":
            start = i + 1
            if start < n and pattern[start] in "!^":
                start += 1
            if start < n and pattern[start] == "]":  # a ']' first is a member, as in fnmatch
                start += 1
            end = pattern.find("]", start)
            if end >= 0:
                out.append(_character_class(pattern[i + 1:end]))
                i = end + 1
                continue
            out.append(_Token(_CHAR, char=c))  # an unclosed '[' is itself
        else:
            out.append(_Token(_CHAR, char=c))
        i += 1
    return tuple(out)


def _character_class(body: str) -> _Token:
    """``[abc]``, ``[a-z0-9_]``, ``[!...]`` or ``[^...]``; a ']' first, or a '-' first or last, is itself."""
    negate = body[:1] in ("!", "^")
    chars = body[1:] if negate else body
    ranges = []
    k = 0
    while k < len(chars):
        if k + 2 < len(chars) and chars[k + 1] == "-":
            lo, hi = chars[k], chars[k + 2]
            if lo > hi:
                raise ValueError(f"bad character class [{body}]: range {lo}-{hi} is backwards")
            ranges.append((lo, hi))
            k += 3
        else:
            ranges.append((chars[k], chars[k]))
            k += 1
    return _Token(_CLASS, ranges=tuple(ranges), negate=negate)


def _closure(tokens: tuple[_Token, ...], states: set[int]) -> set[int]:
    """Add the states reachable without reading a character: past any star, which may match nothing.

    A state is a token's index; ``~i`` (negative) is the state inside the ``**/`` at ``i``
    once it has read a character: it needs a '/' before it may end.
    """
    todo = list(states)
    while todo:
        i = todo.pop()
        if 0 <= i < len(tokens) and tokens[i].kind in (_STAR, _ANY, _DIRS) and i + 1 not in states:
            states.add(i + 1)
            todo.append(i + 1)
    return states


@dataclass(frozen=True)
class _Glob:
    """A glob split into its literal head and tail and the tokens between them."""

    head: str
    tail: str
    middle: tuple[_Token, ...]


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> _Glob:
    tokens = _tokens(pattern)
    first = 0
    while first < len(tokens) and tokens[first].kind == _CHAR:
        first += 1
    last = len(tokens)
    while last > first and tokens[last - 1].kind == _CHAR:
        last -= 1
    return _Glob("".join(t.char for t in tokens[:first]), "".join(t.char for t in tokens[last:]), tokens[first:last])


def path_matches(pattern: str, path: str) -> bool:
    """Whether ``path`` (relative, '/'-separated, as git names it) matches the glob ``pattern``.

    ``*`` and ``?`` stay inside one segment, ``**`` crosses ``/``, ``**/`` at a segment's
    start also matches no directory. ValueError for a pattern with a bad character class
    (``[z-a]``); :class:`When` refuses those.
    """
    glob = _compile(pattern)
    head, tail = len(glob.head), len(glob.tail)
    if len(path) < head + tail or not path.startswith(glob.head) or not path.endswith(glob.tail):
        return False  # most files are told apart here, without running the automaton
    if glob.middle == (_Token(_ANY),):
        return True
    return _run(glob.middle, path[head:len(path) - tail])


def _run(tokens: tuple[_Token, ...], text: str) -> bool:
    """Simulate the tokens' automaton on ``text``: every state at once, so no backtracking."""
    end = len(tokens)
    states = _closure(tokens, {0})
    for ch in text:
        following: set[int] = set()
        for i in states:
            if i < 0:  # inside a _DIRS: it is left only just after a '/'
                following.add(i)
                if ch == "/":
                    following.add(~i + 1)
                continue
            if i == end:
                continue
            token = tokens[i]
            kind = token.kind
            if kind == _CHAR:
                if token.char == ch:
                    following.add(i + 1)
            elif kind == _ONE:
                if ch != "/":
                    following.add(i + 1)
            elif kind == _CLASS:
                if token.admits(ch):
                    following.add(i + 1)
            elif kind == _STAR:
                if ch != "/":
                    following.add(i)
            elif kind == _ANY:
                following.add(i)
            else:  # _DIRS: nothing (the closure), or any characters up to and with a '/'
                following.add(~i)
                if ch == "/":
                    following.add(i + 1)
        if not following:
            return False
        states = _closure(tokens, following)
    return end in states


def check_path_pattern(value: str) -> str:
    """A glob over paths relative to the repository root, as git lists changed files."""
    if not value:
        raise ValueError("expected a path glob such as 'src/**' or '**/*.py', got an empty string")
    if len(value) > MAX_PATTERN:
        raise ValueError(f"path glob longer than {MAX_PATTERN} characters")
    if _CONTROL.search(value):
        raise ValueError(f"path glob {show_value(value)} contains control characters")
    if value.startswith("/"):
        raise ValueError(f"path glob {show_value(value)} is absolute; paths are relative to the repository root "
                         f"(write {show_value(value.lstrip('/') or '**')})")
    if value.startswith("!"):
        raise ValueError(f"path glob {show_value(value)}: negation ('!') is not supported")
    segments = value.split("/")
    if any(s in (".", "..") for s in segments):
        raise ValueError(f"path glob {show_value(value)}: '.' and '..' segments are not allowed "
                         "(paths are relative to the repository root)")
    if "" in segments:
        hint = f" (for everything under it: {value.rstrip('/')}/**)" if value.endswith("/") else ""
        raise ValueError(f"path glob {show_value(value)} has an empty segment{hint}")
    try:
        _compile(value)
    except ValueError as e:
        raise ValueError(f"path glob {show_value(value)}: {e}") from None
    return value


def check_branch(value: str) -> str:
    """A branch name or glob (``fnmatch``: ``*`` also crosses ``/``), as ``branches:`` lists them."""
    if not value or value.startswith("-") or any(c.isspace() or ord(c) < 32 for c in value) or len(value) > 255:
        raise ValueError(f"expected a branch name or glob without spaces (not starting with '-'), got {show_value(value)}")
    return value


def branch_matches(patterns: Sequence[str], branch: str) -> bool:
    return any(fnmatchcase(branch, pattern) for pattern in patterns)


def check_event(value: str) -> str:
    if value not in EVENTS:
        raise ValueError(f"unknown event {show_value(value)} (expected one of: {', '.join(EVENTS)})")
    return value


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Events = Annotated[list[Annotated[str, AfterValidator(check_event)]], BeforeValidator(_as_list), Field(min_length=1)]
PathGlobs = Annotated[
    list[Annotated[str, AfterValidator(check_path_pattern)]],
    BeforeValidator(_as_list),
    Field(min_length=1, max_length=MAX_PATTERNS),
]


class When(BaseModel):
    """A pipeline's ``when:``: the events it runs for and the paths whose change starts it.

    A field left out does not filter. A single string stands for a list of one.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    event: Events | None = None
    paths: PathGlobs | None = None


STEP_STATUSES = ("success", "failure")
Branches = Annotated[list[Annotated[str, AfterValidator(check_branch)]], BeforeValidator(_as_list), Field(min_length=1)]
Statuses = Annotated[list[Literal["success", "failure"]], BeforeValidator(_as_list), Field(min_length=1)]


class StepWhen(When):
    """A step's ``when:``: a pipeline's keys, plus the branch and what happened before it.

    ``status: [failure]`` runs a step only once something failed (reports, notifications);
    ``[success, failure]`` runs it either way. Without ``status`` a step runs while nothing
    has failed. A step whose ``allow_failure`` let it fail is no failure here.
    """

    branch: Branches | None = None
    status: Statuses | None = None


# --- the decision -----------------------------------------------------------------------


def _shown(items: Sequence[str]) -> str:
    head = ", ".join(items[:SHOWN_PATTERNS])
    more = len(items) - SHOWN_PATTERNS
    return f"[{head}, +{more} more]" if more > 0 else f"[{head}]"


def decide(when: When | None, event: str, changed: Sequence[str] | None) -> str | None:
    """None when the pipeline should run for ``event``, else a short reason why it does not.

    ``changed`` lists the files the commit changed (relative paths, as git names them),
    or None when that is unknown. Paths filter only ``push`` and ``pull_request``, and
    only a known, non-empty list: see the module's docstring.
    """
    if when is None:
        return None
    if when.event is not None and event not in when.event:
        return f"event {event} is not in when.event {_shown(when.event)}"
    if when.paths is None or event not in PATH_FILTERED_EVENTS or not changed:
        return None
    if any(path_matches(pattern, path) for path in changed for pattern in when.paths):
        return None
    files = f"{len(changed)} file{'s' if len(changed) != 1 else ''} changed"
    return f"no changed file matches when.paths {_shown(when.paths)} ({files})"


def decide_step(when: StepWhen | None, *, event: str, branch: str | None, changed: Sequence[str] | None,
                failed: str | None) -> str | None:
    """None when a step should run now, else a short reason why it does not.

    ``failed`` is the job's first failure so far (its reason), None while nothing failed.
    Branch, event and paths are decided first (as for a pipeline: a job without a branch
    matches no ``when.branch``), then the status.
    """
    if when is not None:
        if when.branch is not None:
            if branch is None:
                return f"the job has no branch; when.branch is {_shown(when.branch)}"
            if not branch_matches(when.branch, branch):
                return f"branch {branch} is not in when.branch {_shown(when.branch)}"
        why = decide(when, event, changed)
        if why is not None:
            return why
    wanted = when.status if when is not None and when.status is not None else ["success"]
    if failed is not None and "failure" not in wanted:
        return f"not run after a failure ({failed})"
    if failed is None and "success" not in wanted:
        return f"nothing failed (when.status {_shown(wanted)})"
    return None
