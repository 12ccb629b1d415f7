"""Server-sent event streams of streamable HTTP, with resumption after a dropped connection.

Every SSE stream gets an id; each event's id is ``<stream>-<n>``. Events are kept
(up to a bound) until the stream ends, so a client whose connection dropped can
reconnect with ``GET`` and ``Last-Event-ID`` and receive what it missed, then the
rest live — the response to a long tool call is not lost with the connection.

The channels here are where a request's messages go: ``PostChannel`` answers one
POST (plain JSON until the first notification turns it into a stream),
``NoticeChannel`` feeds a session's standalone GET stream, ``ExchangeChannel`` answers
one MCP 2026-07-28 POST (no session, no resumption).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from typing import Any

import orjson

from mcp_zero.rpc.asgi import SSE_HEADERS, Send
from mcp_zero.rpc.session import JSON, Session

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


class PostChannel:
    """Messages related to one POST: nothing is sent until the first one, which turns the
    response into an SSE stream; until then the result can still go out as plain JSON."""

    __slots__ = ("_asgi_send", "session", "stream")

    def __init__(self, session: Session, asgi_send: Send) -> None:
        self.session = session
        self._asgi_send = asgi_send
        self.stream: EventStream | None = None

    async def send(self, message: JSON) -> None:
        stream = self.stream
        if stream is None:
            stream = EventStream(self._asgi_send)
            self.session.streams[stream.id] = stream
            self.stream = stream
            await self._asgi_send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": SSE_HEADERS + session_header(self.session),
                }
            )
            await self._asgi_send(
                {"type": "http.response.body", "body": stream.priming(), "more_body": True}
            )
        await stream.push(message)

    async def close_stream(self) -> None:
        """End the HTTP response now (SSE first, so there is an event id to resume from); what
        the call sends later is kept for the client's GET with Last-Event-ID."""
        if self.stream is None:
            self.stream = EventStream(self._asgi_send)
            self.session.streams[self.stream.id] = self.stream
            await self._asgi_send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": SSE_HEADERS + session_header(self.session),
                }
            )
            await self._asgi_send(
                {"type": "http.response.body", "body": self.stream.priming(), "more_body": True}
            )
        if self.stream.send is not None:
            self.stream.send = None
            with contextlib.suppress(OSError):
                await self._asgi_send({"type": "http.response.body", "body": b""})

    async def finish(self) -> None:
        """End the SSE stream (after the response was pushed)."""
        stream = self.stream
        assert stream is not None
        stream.close()
        if stream.send is not None:
            with contextlib.suppress(OSError):
                await self._asgi_send({"type": "http.response.body", "body": b""})


class ExchangeChannel:
    """Messages related to one MCP 2026-07-28 POST. That revision has no sessions and no
    resumption: the first message turns the answer into a plain SSE stream, and a client
    that drops the connection has cancelled the request."""

    __slots__ = ("_asgi_send", "gone", "started")

    def __init__(self, asgi_send: Send) -> None:
        self._asgi_send = asgi_send
        self.started = False
        self.gone = False

    async def send(self, message: JSON) -> None:
        await self._write(b"event: message\ndata: " + orjson.dumps(message) + b"\n\n")

    async def keepalive(self) -> None:
        """A comment, which clients ignore, so that proxies keep a quiet stream open."""
        await self._write(b": keepalive\n\n")

    async def close_stream(self) -> None:
        return None  # nothing to resume from in 2026-07-28: the stream stays open

    async def finish(self, response: JSON | None) -> None:
        """Send the response as the stream's last event and end the stream."""
        if response is not None:
            await self.send(response)
        if not self.gone:
            with contextlib.suppress(OSError):
                await self._asgi_send({"type": "http.response.body", "body": b""})

    async def _write(self, chunk: bytes) -> None:
        if self.gone:
            return
        try:
            if not self.started:
                self.started = True
                await self._asgi_send(
                    {"type": "http.response.start", "status": 200, "headers": SSE_HEADERS}
                )
            await self._asgi_send({"type": "http.response.body", "body": chunk, "more_body": True})
        except OSError:
            self.gone = True


class NoticeChannel:
    """Server-initiated messages of a session: onto its open GET stream."""

    __slots__ = ("_queue",)

    def __init__(self, queue: asyncio.Queue[JSON]) -> None:
        self._queue = queue

    async def send(self, message: JSON) -> None:
        self._queue.put_nowait(message)

    async def close_stream(self) -> None:
        return None


def session_header(session: Session | None) -> list[tuple[bytes, bytes]]:
    if session is None or session.id.startswith("ephemeral"):
        return []
    return [(b"mcp-session-id", session.id.encode())]
