"""A job's log over HTTP: the whole text at once, or Server-Sent Events as it grows.

Both read through the dispatcher only (``log``, ``change_seen``, ``wait_change``,
``job_end``); the generators run after the handler returned, so they take the
dispatcher as an argument rather than reading it from the request.

``events`` (a thread per stream) serves the WSGI app in-process; ``follow`` yields
the same bytes from an asyncio loop, so the front server (``narwhal.api.front``)
holds thousands of followers without a thread each. Both share the framing below.

Each run of lines carries its kind (``narwhal.job.LogKind``). In text, narwhal's lines
read ``[narwhal] TEXT`` and a step line that would look like one reads ``[step] ...``
(``narwhal.text.log_text_line``). As events, a step line is ``id: N`` + ``data: LINE``
(a default "message" event, its text unchanged) and narwhal's is the same with
``event: narwhal`` first: only narwhal writes that event type.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.job import LogKind
from narwhal.text import log_text_line

Blocks = list[tuple[int, list[str], LogKind]]  # (first line number, lines, their kind) runs

SSE_KEEPALIVE = 15.0  # seconds between comments on an idle event stream
LOG_PAGE = 5000  # lines read at a time
RETRY = b"retry: 1000\n\n"
KEEPALIVE = b": keepalive\n\n"


def plain_log(dispatcher: Dispatcher, job_id: int) -> Iterator[bytes]:
    after = 0
    while True:
        blocks = dispatcher.log(job_id, after=after, limit=LOG_PAGE)
        if not blocks:
            return
        yield "".join("\n".join([log_text_line(text, kind) for text in lines]) + "\n"
                      for _, lines, kind in blocks).encode("utf-8", "replace")
        first, lines, _ = blocks[-1]
        after = first + len(lines) - 1


def line_events(blocks: Blocks) -> tuple[bytes, int]:
    """One event per log line (id = line number), and the last line number sent."""
    parts: list[str] = []
    for first, lines, kind in blocks:
        head = "event: narwhal\nid: " if kind is LogKind.NARWHAL else "id: "
        parts.extend([f"{head}{n}\ndata: {text}\n\n" for n, text in enumerate(lines, start=first)])
    payload = "".join(parts)
    first, lines, _ = blocks[-1]
    # A bare CR would end an SSE line early; log lines never hold "\n".
    return payload.replace("\r", "").encode("utf-8", "replace"), first + len(lines) - 1


def end_event(end: dict) -> bytes:
    return f"event: end\ndata: {json.dumps(end)}\n\n".encode()


def events(dispatcher: Dispatcher, job_id: int, after: int) -> Iterator[bytes]:
    """Server-Sent Events: one event per log line (id = line number), then ``end``."""
    yield RETRY
    idle = 0.0
    while True:
        seen = dispatcher.change_seen()
        blocks = dispatcher.log(job_id, after=after, limit=LOG_PAGE)
        if blocks:
            idle = 0.0
            payload, after = line_events(blocks)
            yield payload
            continue
        end = dispatcher.job_end(job_id)
        if end is not None:
            if dispatcher.log(job_id, after=after, limit=1):
                continue  # lines written just before the end
            yield end_event(end)
            return
        if not dispatcher.wait_change(seen, timeout=1.0):
            idle += 1.0
            if idle >= SSE_KEEPALIVE:
                idle = 0.0
                yield KEEPALIVE


class LogSource(Protocol):
    """What ``follow`` reads from: the dispatcher's log calls, awaitable (``front.LogFeed``)."""

    def change_seen(self) -> int: ...
    async def log(self, job_id: int, after: int, limit: int) -> Blocks: ...
    async def job_end(self, job_id: int) -> dict | None: ...
    async def wait_change(self, seen: int, timeout: float) -> bool: ...


async def follow(source: LogSource, job_id: int, after: int) -> AsyncIterator[bytes]:
    """``events`` for an asyncio loop: the same bytes, no thread held while waiting."""
    yield RETRY
    idle = 0.0
    while True:
        seen = source.change_seen()
        blocks = await source.log(job_id, after, LOG_PAGE)
        if blocks:
            idle = 0.0
            payload, after = line_events(blocks)
            yield payload
            continue
        end = await source.job_end(job_id)
        if end is not None:
            if await source.log(job_id, after, 1):
                continue  # lines written just before the end
            yield end_event(end)
            return
        if not await source.wait_change(seen, 1.0):
            idle += 1.0
            if idle >= SSE_KEEPALIVE:
                idle = 0.0
                yield KEEPALIVE
