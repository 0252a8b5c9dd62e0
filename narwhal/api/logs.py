"""A job's log over HTTP: the whole text at once, or Server-Sent Events as it grows.

Both read through the dispatcher only (``log``, ``change_seen``, ``wait_change``,
``job_end``); the generators run after the handler returned, so they take the
dispatcher as an argument rather than reading it from the request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

SSE_KEEPALIVE = 15.0  # seconds between comments on an idle event stream
LOG_PAGE = 5000  # lines read at a time


def plain_log(dispatcher: Any, job_id: int) -> Iterator[bytes]:
    after = 0
    while True:
        blocks = dispatcher.log(job_id, after=after, limit=LOG_PAGE)
        if not blocks:
            return
        yield "".join("\n".join(lines) + "\n" for _, lines in blocks).encode("utf-8", "replace")
        first, lines = blocks[-1]
        after = first + len(lines) - 1


def events(dispatcher: Any, job_id: int, after: int) -> Iterator[bytes]:
    """Server-Sent Events: one event per log line (id = line number), then ``end``."""
    yield b"retry: 1000\n\n"
    idle = 0.0
    while True:
        seen = dispatcher.change_seen()
        blocks = dispatcher.log(job_id, after=after, limit=LOG_PAGE)
        if blocks:
            idle = 0.0
            payload = "".join([f"id: {n}\ndata: {text}\n\n"
                               for first, lines in blocks for n, text in enumerate(lines, start=first)])
            first, lines = blocks[-1]
            after = first + len(lines) - 1
            # A bare CR would end an SSE line early; log lines never hold "\n".
            yield payload.replace("\r", "").encode("utf-8", "replace")
            continue
        end = dispatcher.job_end(job_id)
        if end is not None:
            if dispatcher.log(job_id, after=after, limit=1):
                continue  # lines written just before the end
            yield f"event: end\ndata: {json.dumps(end)}\n\n".encode()
            return
        if not dispatcher.wait_change(seen, timeout=1.0):
            idle += 1.0
            if idle >= SSE_KEEPALIVE:
                idle = 0.0
                yield b": keepalive\n\n"
