"""A pipeline's ``cache:``: directories kept on the runner between jobs, and their key language.

::

    cache:
      - key: "pip-{{ hash 'requirements.txt' }}"
        paths: [.cache/pip]

A key is a tiny, strict language, never a general template engine: literal text (letters,
digits, ``.``, ``_``, ``-``; a matrix ``${PY}`` is substituted before this reads it) and
directives in ``{{ }}``:

* ``{{ hash 'PATH' ['PATH' ...] }}``: 16 hex digits of a SHA-256 over those files (a
  directory: every file under it) as the submitted commit has them, computed on the
  dispatcher from its git mirror (``Mirror.tree_entries``); a path the commit does not
  have hashes as a fixed "missing" marker, so the key is stable;
* ``{{ branch }}``: the job's branch, made safe (other characters become ``-``); empty when
  the job has none.

Anything else is a ``file:line`` error. The rendered key is bounded (``MAX_KEY``); the
runner's Docker volume is named from a hash of (repository, key), never from the text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from narwhal.config.yamlfile import show_value

MAX_CACHES = 8  # caches of one pipeline
MAX_PATHS = 16  # paths of one cache, and paths one `hash` names
MAX_PATH = 255  # characters of one path
MAX_TEMPLATE = 512  # characters of a key as written
MAX_KEY = 128  # characters of a rendered key; longer ones end in a hash of the whole
HASH_DIGITS = 16
MISSING = "missing"  # what a path the commit lacks contributes to a hash
LITERAL_RE = re.compile(r"[A-Za-z0-9._-]+")
_DIRECTIVE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
# A word: quoted (no quote inside), or bare; then whitespace or the end. Anything else
# (an unclosed quote, quotes touching a word) is the last alternative.
_TOKEN = re.compile(r"""\s*(?:'([^']*)'(?=\s|$)|"([^"]*)"(?=\s|$)|([^\s'"]+)(?=\s|$)|(\S+))""")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class KeyTemplateError(ValueError):
    """A key template that does not parse; the message says what is wrong."""


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Hash:
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Branch:
    pass


Part = Text | Hash | Branch


def check_path(value: Any) -> str:
    """A path relative to the workspace (or the repository): no ``..``, no absolute path, no
    control characters, no empty or ``.`` component; a trailing ``/`` is dropped."""
    if not isinstance(value, str):
        raise ValueError(f"expected a relative path, got {show_value(value)}")
    path = value[:-1] if value.endswith("/") and len(value) > 1 else value
    if not path or len(path) > MAX_PATH:
        raise ValueError(f"expected a relative path of 1-{MAX_PATH} characters, got {show_value(value)}")
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        raise ValueError(f"path contains a control character: {show_value(value)}")
    if path.startswith("/"):
        raise ValueError(f"expected a path relative to the workspace, got the absolute path {show_value(value)}")
    parts = path.split("/")
    if ".." in parts:
        raise ValueError(f"a path may not leave the workspace with '..': {show_value(value)}")
    if any(p in ("", ".") for p in parts):
        raise ValueError(f"expected a plain relative path (no empty or '.' parts), got {show_value(value)}")
    if path.startswith("-"):
        raise ValueError(f"a path may not start with '-': {show_value(value)}")
    return path


def parse_key(template: str) -> tuple[Part, ...]:
    """The parts of a key template; KeyTemplateError saying what is wrong when it is not one."""
    if not isinstance(template, str) or not template:
        raise KeyTemplateError(f"expected a cache key such as \"pip-{{{{ hash 'requirements.txt' }}}}\", got {show_value(template)}")
    if len(template) > MAX_TEMPLATE:
        raise KeyTemplateError(f"a cache key is at most {MAX_TEMPLATE} characters")
    parts: list[Part] = []
    at = 0
    for match in _DIRECTIVE.finditer(template):
        _literal(template[at:match.start()], parts)
        parts.append(_directive(match.group(1)))
        at = match.end()
    _literal(template[at:], parts)
    return tuple(parts)


def _literal(text: str, parts: list[Part]) -> None:
    if not text:
        return
    if "{{" in text or "}}" in text:
        raise KeyTemplateError("unbalanced '{{' or '}}' in the cache key")
    if not LITERAL_RE.fullmatch(text):
        bad = _UNSAFE.search(text)
        shown = bad.group(0)[:10] if bad else text[:10]
        extra = " (matrix variables are written ${NAME} and must be declared in matrix:)" if "$" in text else ""
        raise KeyTemplateError(f"a cache key holds letters, digits, '.', '_', '-' and {{{{ directives }}}}, "
                        f"not {shown!r}{extra}")
    parts.append(Text(text))


def _tokens(body: str) -> list[tuple[str, str]]:
    """(kind, text) of a directive's words: ``bare`` or ``quoted`` ('...' or "...", no escapes),
    separated by whitespace."""
    tokens: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(body):
        single, double, bare, broken = match.groups()
        if broken is not None:
            raise KeyTemplateError(f"unclosed or touching quotes in {{{{{body}}}}}: "
                                   "write each path in its own quotes, separated by spaces")
        if bare is not None:
            tokens.append(("bare", bare))
        else:
            tokens.append(("quoted", single if single is not None else double))
    return tokens


def _directive(body: str) -> Part:
    tokens = _tokens(body)
    if not tokens or tokens[0][0] != "bare":
        raise KeyTemplateError(f"empty or unknown directive {{{{{body}}}}}: write {{{{ hash 'PATH' }}}} or {{{{ branch }}}}")
    name, args = tokens[0][1], tokens[1:]
    if name == "branch":
        if args:
            raise KeyTemplateError("{{ branch }} takes no arguments")
        return Branch()
    if name != "hash":
        raise KeyTemplateError(f"unknown directive {name[:20]!r}: a cache key knows {{{{ hash 'PATH' ... }}}} "
                               "and {{ branch }}")
    if not args:
        raise KeyTemplateError("{{ hash }} needs at least one quoted path: {{ hash 'requirements.txt' }}")
    if len(args) > MAX_PATHS:
        raise KeyTemplateError(f"{{{{ hash }}}} takes at most {MAX_PATHS} paths")
    paths = []
    for kind, text in args:
        if kind != "quoted":
            raise KeyTemplateError(f"{{{{ hash }}}} takes quoted paths, got {text[:40]!r}: "
                                   f"write {{{{ hash '{text[:40]}' }}}}")
        try:
            paths.append(check_path(text))
        except ValueError as e:
            raise KeyTemplateError(f"{{{{ hash }}}}: {e}") from None
    return Hash(tuple(paths))


def hashed_paths(template: str) -> list[str]:
    """Every path the key's ``hash`` directives name, once each, in order."""
    out: list[str] = []
    for part in parse_key(template):
        if isinstance(part, Hash):
            out += [p for p in part.paths if p not in out]
    return out


def digest(paths: Sequence[str], entries: Iterable[tuple[str, str]]) -> str:
    """HASH_DIGITS hex digits over ``paths`` as ``entries`` (``(path, "mode type oid")`` of every
    file at or under them, as ``git ls-tree -r`` lists them) have them; a path with no entry
    contributes MISSING."""
    listed = sorted(entries)
    h = hashlib.sha256()
    for path in paths:
        mine = [(p, what) for p, what in listed if p == path or p.startswith(path + "/")]
        h.update(path.encode("utf-8", "surrogateescape") + b"\0")
        if not mine:
            h.update(MISSING.encode() + b"\n")
        for p, what in mine:
            h.update(what.encode("ascii", "replace") + b"\t" + p.encode("utf-8", "surrogateescape") + b"\n")
        h.update(b"\0")
    return h.hexdigest()[:HASH_DIGITS]


def render(template: str, *, branch: str | None,
           entries: Callable[[list[str]], Iterable[tuple[str, str]]]) -> str:
    """The key of one job: ``entries(paths)`` gives the commit's files at or under ``paths``
    (called once, only when the key hashes something)."""
    parts = parse_key(template)
    wanted = hashed_paths(template)
    listed = list(entries(wanted)) if wanted else []
    out = []
    for part in parts:
        if isinstance(part, Text):
            out.append(part.text)
        elif isinstance(part, Branch):
            out.append(safe_text(branch or ""))
        else:
            out.append(digest(part.paths, listed))
    return bound_key("".join(out))


def safe_text(text: str) -> str:
    """``text`` with every run of characters a key may not hold made one ``-``."""
    return _UNSAFE.sub("-", text)


def bound_key(key: str) -> str:
    """A rendered key: never empty, at most MAX_KEY characters (a longer one keeps its start and
    ends with a hash of the whole, so two long keys stay apart)."""
    key = safe_text(key) or "-"
    if len(key) <= MAX_KEY:
        return key
    tail = hashlib.sha256(key.encode()).hexdigest()[:HASH_DIGITS]
    return key[:MAX_KEY - HASH_DIGITS - 1] + "-" + tail


def _check_key(value: str) -> str:
    try:
        parse_key(value)
    except KeyTemplateError as e:
        raise ValueError(str(e)) from None
    return value


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


CachePath = Annotated[str, AfterValidator(check_path)]


class Cache(BaseModel):
    """Directories of the workspace kept on the runner under a key: restored before the first
    step when the key has been saved, saved after a passing job."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: Annotated[str, AfterValidator(_check_key)]
    paths: Annotated[list[CachePath], BeforeValidator(_as_list), Field(min_length=1, max_length=MAX_PATHS)]
    # on_miss: saved only when the restore found nothing under the key (a key that names its
    # inputs, such as a lock file's hash, means the same content); always: after every
    # passing job (a cache that grows, such as ccache); never: restore only.
    save: Literal["on_miss", "always", "never"] = "on_miss"


def overlaps(a: str, b: str) -> bool:
    """Whether one path is the other or inside it."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def cache_problems(caches: Any) -> list[tuple[tuple, str]]:
    """(path, message) for paths that overlap (within a cache or across caches: which restore
    would win?) and for two caches with one key. ``caches`` is the raw list; items not well
    formed are left to the model."""
    if not isinstance(caches, list):
        return []
    problems: list[tuple[tuple, str]] = []
    seen_paths: list[tuple[str, int]] = []
    keys: dict[str, int] = {}
    for i, cache in enumerate(caches):
        if not isinstance(cache, dict):
            continue
        key = cache.get("key")
        if isinstance(key, str):
            if key in keys:
                problems.append((("cache", i, "key"), f"the same key as cache {keys[key] + 1}: one cache per key"))
            keys.setdefault(key, i)
        paths = _as_list(cache.get("paths"))
        if not isinstance(paths, list):
            continue
        for j, path in enumerate(paths):
            try:
                path = check_path(path)
            except ValueError:
                continue
            other = next(((p, c) for p, c in seen_paths if overlaps(p, path)), None)
            if other is not None:
                where = "this cache" if other[1] == i else f"cache {other[1] + 1}"
                problems.append((("cache", i, "paths", j), f"{path!r} overlaps {other[0]!r} of {where}"))
            seen_paths.append((path, i))
    return problems
