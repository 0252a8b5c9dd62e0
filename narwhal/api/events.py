"""``GET /events``: the dispatcher's event log (``narwhal.dispatch.events``) as Server-Sent Events.

Each event is ``id: N`` + ``event: KIND`` + ``data: JSON`` (one line). The stream opens with
``event: ready`` (``data: {"last": N}``, ``id: N``) so a client holds a resume point before
anything happens. ``Last-Event-ID`` (or ``?after=N``) resumes after N; a point the log no
longer holds (pruned, or from another store) gets ``event: reset`` first: reload your view.
Without either the stream starts at the present.

``stream`` (a thread per client) serves the WSGI app in-process; ``follow`` yields the same
bytes from the front server's asyncio loop, like ``narwhal.api.logs``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.dispatch.events import Batch, event_json

RETRY = b"retry: 1000\n\n"
KEEPALIVE = b": keepalive\n\n"
SSE_KEEPALIVE = 15.0


def frame(batch: Batch) -> bytes:
    parts = [f"id: {e.id}\nevent: {e.kind}\ndata: {event_json(e)}\n\n" for e in batch.events]
    return "".join(parts).encode("utf-8", "replace")


def opening(batch: Batch, resumed: bool) -> bytes:
    kind = "reset" if batch.reset else "ready"
    head = RETRY + f"id: {batch.last}\nevent: {kind}\ndata: {json.dumps({'last': batch.last})}\n\n".encode()
    return head if batch.reset or not resumed else RETRY


def stream(dispatcher: Dispatcher, after: int | None) -> Iterator[bytes]:
    """Events after ``after`` (None: from now), then each new one, until the client leaves."""
    events = dispatcher.events
    first = events.since(after, limit=1)
    yield opening(first, after is not None)
    position = first.last if after is None or first.reset else after
    idle = 0.0
    while True:
        seen = dispatcher.change_seen()
        batch = events.since(position)
        if batch.reset:
            yield opening(batch, True)
            position = batch.last
            continue
        if batch.events:
            idle = 0.0
            position = batch.last
            yield frame(batch)
            continue
        if not dispatcher.wait_change(seen, timeout=1.0):
            idle += 1.0
            if idle >= SSE_KEEPALIVE:
                idle = 0.0
                yield KEEPALIVE


class EventSource(Protocol):
    """What ``follow`` reads from (``front.LogFeed``): the event log, awaitable."""

    def change_seen(self) -> int: ...
    async def events(self, after: int | None) -> Batch: ...
    async def wait_change(self, seen: int, timeout: float) -> bool: ...


async def follow(source: EventSource, after: int | None) -> AsyncIterator[bytes]:
    """``stream`` for an asyncio loop: the same bytes, no thread held while waiting."""
    first = await source.events(after)
    yield opening(first, after is not None)
    position = first.last if after is None or first.reset else after
    idle = 0.0
    while True:
        seen = source.change_seen()
        batch = await source.events(position)
        if batch.reset:
            yield opening(batch, True)
            position = batch.last
            continue
        if batch.events:
            idle = 0.0
            position = batch.last
            yield frame(batch)
            continue
        if not await source.wait_change(seen, 1.0):
            idle += 1.0
            if idle >= SSE_KEEPALIVE:
                idle = 0.0
                yield KEEPALIVE
