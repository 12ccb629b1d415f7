"""Server-sent event streams of streamable HTTP, with resumption after a dropped connection.

Every SSE stream gets an id; each event's id is ``<stream>-<n>``. Events are kept
(up to a bound) until the stream ends, so a client whose connection dropped can
reconnect with ``GET`` and ``Last-Event-ID`` and receive what it missed, then the
rest live — the response to a long tool call is not lost with the connection.
"""

from __future__ import annotations

import asyncio
import secrets
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
    """One SSE stream: buffered events plus, while a connection is attached, live delivery."""

    __slots__ = ("_changed", "closed", "events", "id", "send")

    def __init__(self, send: Send | None = None) -> None:
        self.id = secrets.token_hex(8)
        self.events: list[bytes] = []
        self.send = send  # the attached connection's ASGI send, or None while detached
        self.closed = False
        self._changed = asyncio.Event()

    def priming(self) -> bytes:
        """The first event: an id and empty data, so the client can resume from the start."""
        return f"id: {self.id}-0\nretry: {RETRY_MS}\ndata: \n\n".encode()

    async def push(self, message: dict[str, Any]) -> None:
        """Append a JSON-RPC message and deliver it if a connection is attached."""
        n = len(self.events) + 1
        chunk = sse_event(f"{self.id}-{n}", orjson.dumps(message))
        if len(self.events) < MAX_BUFFERED_EVENTS:
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
        """Send events after number ``after`` on ``send``, then follow until the stream ends."""
        sent = after
        while True:
            self._changed.clear()
            for chunk in self.events[sent:]:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += 1
            if self.closed and sent >= len(self.events):
                return
            if sent >= len(self.events):
                await self._changed.wait()


def parse_event_id(value: str) -> tuple[str, int] | None:
    stream, _, number = value.rpartition("-")
    if not stream or not number.isdigit():
        return None
    return stream, int(number)
