"""Reading a request: the JSON body, query parameters and path ids, checked.

Every problem raises a NarwhalError (400, 404, 413, 415) that ``app.guard`` turns
into a JSON error; nothing here lets bad input through as a 500.
"""

from __future__ import annotations

import json
from typing import Any

import bottle

from narwhal.errors import BadRequest, NotFound, PayloadTooLarge

MAX_LIMIT = 1000
MAX_TEXT = 2048
MAX_ID_DIGITS = 18  # fits SQLite's 64-bit integer


class UnsupportedMediaType(BadRequest):
    """A body sent as something other than JSON (e.g. a browser's text/plain form post)."""

    http_status = 415


def json_body(max_body: int) -> dict:
    """The request body as a JSON object, at most ``max_body`` bytes."""
    kind = bottle.request.content_type.split(";")[0].strip().lower()
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise UnsupportedMediaType(f"expected Content-Type: application/json, got {kind[:100]!r}")
    length = bottle.request.content_length
    if length > max_body:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {max_body}")
    raw = bottle.request.body.read(max_body + 1)
    if len(raw) > max_body:
        raise PayloadTooLarge(f"request body exceeds {max_body} bytes")
    if not raw.strip():
        raise BadRequest("expected a JSON object in the request body, got nothing")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest(f"expected a JSON object, got {type(data).__name__}")
    return data


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
