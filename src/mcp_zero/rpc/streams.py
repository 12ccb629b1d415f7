"""Server-sent event streams of streamable HTTP, with resumption after a dropped connection.

Every SSE stream gets an id; each event's id is ``<stream>-<n>``. Events are kept
(up to a bound) until the stream ends, so a client whose connection dropped can
reconnect with ``GET`` and ``Last-Event-ID`` and receive what it missed, then the
rest live — the response to a long tool call is not lost with the connection.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

Send = Callable[[dict[str, Any]], Awaitable[None]]
RETRY_MS = 1000
MAX_BUFFERED_EVENTS = 10_000


def sse_event(event_id: str, data: bytes, *, retry: int | None = None) -> bytes:
    head = b"id: " + event_id.encode() + b"\n"
    if retry is not None:
        head += b"retry: " + str(retry).encode() + b"\n"
    return head + b"event: message\ndata: " + data + b"\n\n"


class EventStream:
    """One SSE stream: buffered events plus, while a connection is attached, live delivery.

    Event ``n`` (from 1) has id ``<stream>-<n>``. The newest MAX_BUFFERED_EVENTS are
    kept for resumption; numbering goes on past that, so ids never repeat.
    """

    __slots__ = ("_changed", "closed", "count", "events", "id", "send")

    def __init__(self, send: Send | None = None, *, keep: int = MAX_BUFFERED_EVENTS) -> None:
        self.id = secrets.token_hex(8)
        self.events: deque[bytes] = deque(maxlen=keep)
        self.count = 0  # events pushed so far; the buffer holds the last len(events)
        self.send = send  # the attached connection's ASGI send, or None while detached
        self.closed = False
        self._changed = asyncio.Event()

    def priming(self) -> bytes:
        """The first event: an id and empty data, so the client can resume from the start."""
        return f"id: {self.id}-0\nretry: {RETRY_MS}\ndata: \n\n".encode()

    async def push(self, message: dict[str, Any]) -> None:
        """Append a JSON-RPC message and deliver it if a connection is attached."""
        self.count += 1
        chunk = sse_event(f"{self.id}-{self.count}", orjson.dumps(message))
        self.events.append(chunk)
        await self._deliver(chunk)
        self._changed.set()

    async def _deliver(self, chunk: bytes) -> None:
        send = self.send
        if send is None:
            return
        try:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except OSError:
            self.send = None  # the client went away; keep buffering for a resume

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def replay(self, after: int, send: Send) -> None:
        """Send events after number ``after`` on ``send``, then follow until the stream ends.

        Events older than the buffer are gone; the replay starts at the oldest kept.
        """
        sent = after
        while True:
            self._changed.clear()
            while sent < self.count:
                oldest = self.count - len(self.events) + 1
                sent = max(sent, oldest - 1)
                chunk = self.events[sent - oldest + 1]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += 1
            if self.closed:
                return
            await self._changed.wait()


def parse_event_id(value: str) -> tuple[str, int] | None:
    stream, _, number = value.rpartition("-")
    if not stream or not number.isdigit():
        return None
    return stream, int(number)
