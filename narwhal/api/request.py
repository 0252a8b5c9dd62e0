"""Reading a request: the JSON body, query parameters and path ids, checked.

Every problem raises a NarwhalError (400, 404, 413, 415) that ``app.guard`` turns
into a JSON error; nothing here lets bad input through as a 500.
"""

from __future__ import annotations

import json
from typing import Any

import bottle

from narwhal.errors import BadRequest, NarwhalError, NotFound, PayloadTooLarge
from narwhal.jsonnesting import nested_deeper_than

MAX_LIMIT = 1000
MAX_TEXT = 2048
MAX_ID_DIGITS = 18  # fits SQLite's 64-bit integer
MAX_DEPTH = 32  # JSON nesting; our bodies need 2


class UnsupportedMediaType(BadRequest):
    """A body sent as something other than JSON (e.g. a browser's text/plain form post)."""

    http_status = 415


def has_body() -> bool:
    environ = bottle.request.environ
    return bottle.request.content_length > 0 or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()


def require_json() -> None:
    """A body must say it is JSON: a browser sends text/plain, forms or no type without a preflight."""
    kind = bottle.request.content_type.split(";")[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        got = repr(kind[:100]) if kind else "no Content-Type"
        raise UnsupportedMediaType(f"a request body needs Content-Type: application/json, got {got}")


class Forbidden(NarwhalError):
    """A change sent from another site (a web page the operator happens to have open)."""

    http_status = 403


class MisdirectedRequest(BadRequest):
    """A ``Host`` this dispatcher does not answer to (DNS rebinding)."""

    http_status = 421


def raw_body(max_body: int) -> bytes:
    """The request body as bytes, at most ``max_body`` (a webhook's signature covers these exact bytes)."""
    length = bottle.request.content_length
    if length > max_body:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {max_body}")
    raw = bottle.request.body.read(max_body + 1)
    if len(raw) > max_body:
        raise PayloadTooLarge(f"request body exceeds {max_body} bytes")
    return raw


def json_body(max_body: int) -> dict:
    """The request body as a JSON object, at most ``max_body`` bytes."""
    raw = raw_body(max_body)
    if not raw.strip():
        raise BadRequest("expected a JSON object in the request body, got nothing")
    require_json()
    check_depth(raw)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:  # check_depth stops this first; kept so it can never be a 500
        raise BadRequest(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise BadRequest(f"expected a JSON object, got {type(data).__name__}")
    return data


def check_depth(raw: bytes, limit: int | None = None) -> None:
    """Refuse JSON nested deeper than ``limit`` before parsing it: the parser recurses per level."""
    limit = MAX_DEPTH if limit is None else limit
    if nested_deeper_than(raw, limit):
        raise BadRequest(f"JSON nested deeper than {limit} levels")


def only_keys(data: dict, allowed: set[str], required: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(data))
    if missing:
        raise BadRequest(f"missing field(s): {', '.join(missing)}")


def text(query: Any, name: str) -> str | None:
    """An optional query parameter as UTF-8 text of at most ``MAX_TEXT`` characters."""
    value = query.getunicode(name) if name in query else None
    if value is None:
        if name in query:
            raise BadRequest(f"{name}: expected UTF-8 text")
        return None
    if len(value) > MAX_TEXT:
        raise BadRequest(f"{name}: at most {MAX_TEXT} characters")
    return value


def flag(query: Any, name: str) -> bool:
    """A yes/no query parameter: ``1``/``true`` or ``0``/``false`` (absent: no)."""
    raw = query.get(name)
    if raw is None or raw in ("", "0", "false"):
        return False
    if raw in ("1", "true"):
        return True
    raise BadRequest(f"{name}: expected 1, true, 0 or false, got {raw[:40]!r}")


def limit(query: Any, default: int) -> int:
    raw = query.get("limit")
    if raw is None or raw == "":
        return default
    digits = raw.removeprefix("-")
    if not _is_number(digits):
        raise BadRequest(f"limit: expected an integer from 1 to {MAX_LIMIT}, got {raw[:40]!r}")
    if len(digits) > MAX_ID_DIGITS or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"limit: expected an integer from 1 to {MAX_LIMIT}, got {raw[:40]}")
    return int(raw)


def job_id(raw: str) -> int:
    """A job id from the path; anything else is a job that does not exist (404)."""
    if not _is_number(raw) or len(raw) > MAX_ID_DIGITS:
        raise NotFound(f"no job {raw[:40]!r}: job ids are positive integers")
    return int(raw)


def header(name: str) -> str:
    """A request header as text ('' when absent); bytes that are not UTF-8 are a 400, not a 500."""
    raw = bottle.request.environ.get("HTTP_" + name.upper().replace("-", "_"), "")
    try:
        return raw.encode("latin-1").decode("utf-8")  # how WSGI hands over the header's bytes
    except UnicodeError:
        raise BadRequest(f"{name}: expected UTF-8 text") from None


def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host``-style ``name[:port]`` (``[v6]:port`` for IPv6) as (lowercase name, port); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or rest and not rest.startswith(":"):
            return None
        name, port = f"[{name}]", rest[1:] if rest else None
    else:
        if value.count(":") > 1:
            return None
        name, sep, port_text = value.partition(":")
        port = port_text if sep else None
    if port is not None and not (port.isascii() and port.isdigit() and len(port) <= 5):
        return None
    name = name.rstrip(".")
    if not name or not all(c.isascii() and (c.isalnum() or c in ".-_[]:") for c in name):
        return None
    return name, int(port) if port is not None else None


def header_bytes(name: str) -> bytes:
    """A request header's bytes as sent (for comparing secrets without decoding them)."""
    return bottle.request.environ.get("HTTP_" + name.upper().replace("-", "_"), "").encode("latin-1", "replace")


def last_event_id(req: Any) -> int:
    """Where a log stream resumes: ``Last-Event-ID`` (or ``after=``), a line number >= 0."""
    raw = header("Last-Event-ID") or req.query.get("after") or "0"
    if raw.startswith("-") and _is_number(raw[1:]):
        raise BadRequest("Last-Event-ID: expected a line number >= 0")
    if not _is_number(raw) or len(raw) > MAX_ID_DIGITS:
        raise BadRequest(f"Last-Event-ID: expected a line number, got {raw[:40]!r}")
    return int(raw)


def _is_number(raw: str) -> bool:
    """ASCII digits only: str.isdigit also accepts '²' and '٣', which int() then refuses or reads."""
    return raw.isascii() and raw.isdigit()
