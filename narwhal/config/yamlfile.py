"""Safe, bounded YAML loading that remembers where every value came from.

Config files are written by people and sometimes by attackers (a pipeline file in a
repository, a body posted to the API), so loading must be cheap to refuse:

* files over ``MAX_BYTES`` are refused before the parser sees them;
* the document is built from the parser's *event stream* by our own composer, which
  never expands aliases: an alias costs the node count of what it points to, so a
  billion-laughs file is refused after a few hundred events, not after expansion;
* nesting deeper than ``MAX_DEPTH`` is refused while parsing (libyaml is quadratic in
  flow nesting, and its own composer recurses in C and can crash the process);
  when libyaml's own nesting limit fires first (it reads ahead), the answer is still ours;
* only plain mappings, sequences and scalars (str, int, float, bool, null) come out;
  timestamps stay strings and any other tag is an error;
* duplicate keys in a mapping are errors.

The result keeps a line map so that validation errors can say ``inventory.yaml:14``.
Pydantic validation errors are turned into the same :class:`~narwhal.errors.Problem`
records here, because locating them needs the line map.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from narwhal.errors import ConfigError, Problem

MAX_BYTES = 512 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 64

try:  # libyaml's parser when available: fast, and identical events
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Loader = yaml.SafeLoader

_TAG = "tag:yaml.org,2002:"
_MAP_TAGS = {None, "!", _TAG + "map"}
_SEQ_TAGS = {None, "!", _TAG + "seq"}
_resolver = yaml.resolver.Resolver()
_constructor = yaml.constructor.SafeConstructor()
_SCALARS = {
    _TAG + "str": lambda node: node.value,
    _TAG + "null": lambda node: None,
    _TAG + "bool": _constructor.construct_yaml_bool,
    _TAG + "int": _constructor.construct_yaml_int,
    _TAG + "float": _constructor.construct_yaml_float,
    _TAG + "timestamp": lambda node: node.value,  # dates in configs are just text to us
    _TAG + "value": lambda node: node.value,
}


@dataclass
class Document:
    """A loaded YAML document: plain Python ``data`` plus the line of each node."""

    data: Any
    filename: str
    lines: dict[tuple, int] = field(default_factory=dict)

    def line_of(self, path: Iterable) -> int | None:
        """1-based line of the node at ``path``, else of its nearest recorded parent."""
        path = tuple(path)
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]


def load_yaml(path: str | os.PathLike, name: str | None = None) -> Document:
    """Read and parse one YAML file; ``name`` is how messages refer to it."""
    name = name if name is not None else str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise _error(name, None, "file not found") from None
    except IsADirectoryError:
        raise _error(name, None, "is a directory, expected a YAML file") from None
    except OSError as e:
        raise _error(name, None, f"cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        raise _error(name, None, f"file too large (more than {MAX_BYTES // 1024} KiB)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _error(name, line, "not valid UTF-8 text") from None
    return parse_yaml(text, name)


def parse_yaml(
    text: str,
    filename: str = "<string>",
    *,
    max_bytes: int = MAX_BYTES,
    max_nodes: int = MAX_NODES,
    max_depth: int = MAX_DEPTH,
) -> Document:
    """Parse YAML text into a :class:`Document`, refusing anything over the bounds."""
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise _error(filename, None, f"file too large (more than {max_bytes // 1024} KiB)")
    composer = _Composer(filename, max_nodes, max_depth)
    try:
        for event in yaml.parse(text, Loader=_Loader):
            composer.feed(event)
    except yaml.MarkedYAMLError as e:
        ours = _refused_before_we_could(text, composer, e)
        if ours is not None:
            raise ours from None
        mark = e.problem_mark or e.context_mark
        message = e.problem or e.context or "invalid YAML"
        if e.context and e.problem:
            message = f"{e.problem} ({e.context})"
        raise _error(filename, mark.line + 1 if mark else None, f"invalid YAML: {message}") from None
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1 if isinstance(e.position, int) else None
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise _error(filename, line, f"invalid YAML: unacceptable character {char}") from None
    except yaml.YAMLError as e:
        raise _error(filename, None, "invalid YAML: " + " ".join(str(e).split())) from None
    if composer.problems:
        raise ConfigError(sorted(composer.problems, key=line_order))
    return Document(composer.root, filename, composer.lines)


def _refused_before_we_could(text: str, composer: _Composer, error: yaml.MarkedYAMLError) -> ConfigError | None:
    """Our own refusal when libyaml stopped on deep nesting before we saw it, else None.

    libyaml's scanner reads up to 1024 characters ahead while a simple key may still be
    pending, and in such a run (``[[[[...``) it opens flow collections before the parser
    hands us a single event. libyaml 0.2.5 and later refuse more than 1000 levels there,
    in their own words, so our limit never got its turn. When the text libyaml read past
    our last event holds enough ``[``/``{`` to exceed our limit, the pure-Python parser,
    whose events arrive before any such limit, re-reads up to the error, and what our
    composer refuses there (too deep, or a mapping as a key in ``{{{...``) is the answer.
    This does not depend on libyaml's message or its limit, and costs a re-read only for
    a document that is invalid and full of brackets where it failed.
    """
    mark = error.problem_mark
    if mark is None or composer.loader is yaml.SafeLoader:
        return None
    end = min(len(text), mark.index + 1)
    window = text[composer.position:end]
    if len(composer.stack) + window.count("[") + window.count("{") <= composer.max_depth:
        return None
    again = _Composer(composer.filename, composer.max_nodes, composer.max_depth, loader=yaml.SafeLoader)
    try:
        for event in yaml.parse(text[:end], Loader=yaml.SafeLoader):
            again.feed(event)
    except ConfigError as e:
        return e
    except yaml.YAMLError:
        return None
    return None


def format_path(path: Iterable) -> str:
    """Render a document path the way people read it: ``runners[0].port``."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            text = part if isinstance(part, str) else show_value(part)
            out += f".{text}" if out else text
    return out


def _error(filename: str, line: int | None, message: str) -> ConfigError:
    return ConfigError([Problem(filename, line, "", message)])


def line_order(problem: Problem) -> int:
    """Sort key: problems read top to bottom; ties keep the order they were found in."""
    return problem.line or 0


# --- composing from events ---------------------------------------------------------


class _Merge:
    """Sentinel for the ``<<`` merge key."""


@dataclass
class _Anchored:
    value: Any
    size: int  # nodes visited to build it, aliases inside included
    height: int  # 0 for scalars, 1 + deepest child for collections


@dataclass
class _Frame:
    kind: str  # "map" or "seq"
    path: tuple
    anchor: str | None
    start_count: int
    items: Any
    height: int = 1
    key: Any = None
    has_key: bool = False
    key_line: int = 0
    merges: list = field(default_factory=list)
    key_lines: dict = field(default_factory=dict)


class _Composer:
    """Builds plain data from parser events with explicit stacks and budgets."""

    def __init__(self, filename: str, max_nodes: int, max_depth: int, loader: type | None = None):
        self.filename = filename
        self.loader = loader or _Loader  # whose events these are
        self.position = 0  # text index just after the last event received
        self.max_nodes = max_nodes
        self.max_depth = max_depth
        self.count = 0
        self.stack: list[_Frame] = []
        self.anchors: dict[str, _Anchored] = {}
        self.lines: dict[tuple, int] = {}
        self.problems: list[Problem] = []
        self.root: Any = None
        self.documents = 0

    # events ---------------------------------------------------------------------
    def feed(self, event: yaml.Event) -> None:
        mark = getattr(event, "start_mark", None)
        line = mark.line + 1 if mark is not None else None
        end_mark = getattr(event, "end_mark", None)
        if end_mark is not None:
            self.position = end_mark.index
        if isinstance(event, yaml.DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                self._fail(line, "expected a single YAML document, found more than one")
        elif isinstance(event, yaml.ScalarEvent):
            self._spend(1, line)
            value = self._scalar(event, line)
            if event.anchor:
                self.anchors[event.anchor] = _Anchored(value, 1, 0)
            self._attach(value, line, 0)
        elif isinstance(event, yaml.AliasEvent):
            self._alias(event, line)
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            self._open(event, line)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            self._close()

    def _open(self, event: yaml.CollectionStartEvent, line: int | None) -> None:
        is_map = isinstance(event, yaml.MappingStartEvent)
        if event.tag not in (_MAP_TAGS if is_map else _SEQ_TAGS):
            self._fail(line, f"unsupported YAML tag {event.tag!r}")
        if len(self.stack) + 1 > self.max_depth:
            self._fail(line, f"YAML nested too deeply (more than {self.max_depth} levels)")
        parent = self.stack[-1] if self.stack else None
        if parent is not None and parent.kind == "map" and not parent.has_key:
            self._fail(line, "mapping keys must be plain values, not mappings or lists")
        self._spend(1, line)
        path = self._child_path(parent)
        if line is not None and (parent is None or parent.kind == "seq"):
            self.lines.setdefault(path, line)
        frame = _Frame(
            kind="map" if is_map else "seq",
            path=path,
            anchor=event.anchor,
            start_count=self.count - 1,
            items={} if is_map else [],
        )
        self.stack.append(frame)

    def _close(self) -> None:
        frame = self.stack.pop()
        value = frame.items
        if frame.kind == "map" and frame.merges:
            merged: dict = {}
            for source in frame.merges:
                for k, v in source.items():
                    merged.setdefault(k, v)
            merged.update(frame.items)
            value = merged
        if frame.anchor:
            self.anchors[frame.anchor] = _Anchored(value, self.count - frame.start_count, frame.height)
        self._attach(value, None, frame.height)

    def _alias(self, event: yaml.AliasEvent, line: int | None) -> None:
        target = self.anchors.get(event.anchor or "")
        if target is None:
            if any(f.anchor == event.anchor for f in self.stack):
                self._fail(line, f"recursive alias *{event.anchor}")
            self._fail(line, f"unknown alias *{event.anchor}")
        if len(self.stack) + target.height > self.max_depth:
            self._fail(line, f"YAML nested too deeply (more than {self.max_depth} levels)")
        self._spend(target.size, line)
        if self.stack and self.stack[-1].kind == "map" and not self.stack[-1].has_key and target.height:
            self._fail(line, "mapping keys must be plain values, not mappings or lists")
        self._attach(target.value, line, target.height)

    # building -------------------------------------------------------------------
    def _attach(self, value: Any, line: int | None, height: int) -> None:
        if not self.stack:
            self.root = value
            self.lines.setdefault((), line or 1)
            return
        frame = self.stack[-1]
        frame.height = max(frame.height, height + 1)
        if frame.kind == "seq":
            if line is not None:
                self.lines.setdefault(frame.path + (len(frame.items),), line)
            frame.items.append(value)
            return
        if not frame.has_key:
            frame.key, frame.key_line, frame.has_key = value, line or 0, True
            return
        key, key_line = frame.key, frame.key_line
        frame.has_key = False
        if key is _Merge:
            self._merge(frame, value, key_line)
            return
        if key in frame.key_lines:
            self.problems.append(
                Problem(
                    self.filename,
                    key_line or None,
                    format_path(frame.path + (key,)),
                    f"duplicate key (first at line {frame.key_lines[key]})",
                )
            )
            return
        frame.key_lines[key] = key_line
        if key_line:
            self.lines.setdefault(frame.path + (key,), key_line)
        frame.items[key] = value

    def _merge(self, frame: _Frame, value: Any, line: int) -> None:
        sources = value if isinstance(value, list) else [value]
        if not all(isinstance(s, dict) for s in sources):
            self._fail(line, "'<<' merges a mapping or a list of mappings")
        frame.merges.extend(sources)

    def _child_path(self, parent: _Frame | None) -> tuple:
        if parent is None:
            return ()
        if parent.kind == "seq":
            return parent.path + (len(parent.items),)
        key = parent.key if parent.has_key else None
        path = parent.path + (key,)
        self.lines.setdefault(path, parent.key_line or 0)
        return path

    def _scalar(self, event: yaml.ScalarEvent, line: int | None) -> Any:
        tag = event.tag
        if tag is None or tag == "!":
            tag = _resolver.resolve(yaml.ScalarNode, event.value, event.implicit)
        frame = self.stack[-1] if self.stack else None
        if tag == _TAG + "merge":
            if frame is not None and frame.kind == "map" and not frame.has_key:
                return _Merge
            return event.value
        build = _SCALARS.get(tag)
        if build is None:
            self._fail(line, f"unsupported YAML tag {tag!r}")
        node = yaml.ScalarNode(tag, event.value, style=event.style)  # errors name the line themselves
        try:
            value = build(node)
        except (ValueError, yaml.YAMLError):
            self._fail(line, f"{event.value!r} is not a valid {tag.rsplit(':', 1)[-1]}")
        return value

    def _spend(self, nodes: int, line: int | None) -> None:
        self.count += nodes
        if self.count > self.max_nodes:
            self._fail(line, "YAML too large after alias expansion")

    def _fail(self, line: int | None, message: str) -> typing.NoReturn:
        raise _error(self.filename, line, message)


# --- validation errors -------------------------------------------------------------

_TYPE_MESSAGES = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "invalid_key": "expected a string key",
}


def validation_problems(
    error: ValidationError,
    model: type[BaseModel],
    filename: str,
    document: Document | None = None,
    base: tuple = (),
    ignore: Iterable[str] = (),
) -> list[Problem]:
    """Turn a pydantic error into located, human :class:`Problem` records.

    ``base`` is where the validated data sits in the document (and in messages);
    ``model`` is the class that was validated, used to list allowed keys. Errors of a
    type in ``ignore`` are left out (the caller reports those better located).
    """
    problems = []
    ignored = set(ignore)
    for err in error.errors(include_url=False):
        if err["type"] in ignored:
            continue
        loc = tuple(p for p in err["loc"] if p != "[key]")
        path = base + loc
        line = document.line_of(path) if document is not None else None
        problems.append(Problem(filename, line, format_path(path), describe_error(err, model)))
    return problems


def describe_error(err: Mapping[str, Any], model: type[BaseModel] | None = None) -> str:
    """Say what was expected and what was found, in a few words."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = f", got {show_value(err.get('input'))}"
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        owner = model_at(model, err["loc"][:-1]) if model else None
        allowed = ", ".join(owner.model_fields) if owner else ""
        return f"unknown key (allowed: {allowed})" if allowed else "unknown key"
    if kind in _TYPE_MESSAGES:
        return _TYPE_MESSAGES[kind] + got
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '').replace(' or ', ', ')}{got}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        return f"expected a number {bounds[kind]} {limit}{got}"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return f"expected at least {n} item{'s' if n != 1 else ''}"
    if kind == "too_long":
        return f"expected at most {ctx.get('max_length')} items"
    if kind == "string_too_short":
        return f"expected a non-empty string{got}"
    return f"{err['msg']}{got}"


def matching(pattern: re.Pattern[str], expected: str, max_length: int | None = None) -> Callable[[str], str]:
    """A validator: the whole value matches ``pattern`` (and fits ``max_length``), else
    ValueError "expected EXPECTED, got VALUE"."""
    def check(value: str) -> str:
        if not pattern.fullmatch(value) or (max_length is not None and len(value) > max_length):
            raise ValueError(f"expected {expected}, got {show_value(value)}")
        return value
    return check


def show_value(value: Any) -> str:
    """A short YAML-ish rendering of a bad value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def model_at(model: type[BaseModel] | None, loc: Iterable) -> type[BaseModel] | None:
    """The model class that validates the value at ``loc`` inside ``model``."""
    tp: Any = model
    for part in loc:
        tp = _unwrap_optional(tp)
        if isinstance(part, str) and _is_model(tp) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        elif isinstance(part, int) and typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif isinstance(part, str) and typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = _unwrap_optional(tp)
    return tp if _is_model(tp) else None


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap_optional(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap_optional(args[0])
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def duplicate_names(items: Any, section: str, kind: str, filename: str, document: Document) -> list[Problem]:
    """A problem for each item of the list ``section`` whose ``name`` an earlier item has."""
    if not isinstance(items, list):
        return []
    first: dict[str, int] = {}
    problems = []
    for i, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            continue
        if name not in first:
            first[name] = i
            continue
        path = (section, i, "name")
        where = document.line_of((section, first[name], "name"))
        problems.append(Problem(filename, document.line_of(path), format_path(path),
                                f"duplicate {kind} name {name!r}" + (f" (first at line {where})" if where else "")))
    return problems
