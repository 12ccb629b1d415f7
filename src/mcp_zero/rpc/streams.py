"""Server-sent event streams of streamable HTTP, with resumption after a dropped connection.

Every SSE stream gets an id; each event's id is ``<stream>-<n>``. Events are kept
(up to a bound) until the stream ends, so a client whose connection dropped can
reconnect with ``GET`` and ``Last-Event-ID`` and receive what it missed, then the
rest live — the response to a long tool call is not lost with the connection.

The channels here are where a request's messages go: ``PostChannel`` answers one
POST (plain JSON until the first notification turns it into a stream),
``NoticeChannel`` feeds a session's standalone GET stream, which is resumable too;
``ExchangeChannel`` answers one MCP 2026-07-28 POST (no session, no resumption).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import weakref
from collections import OrderedDict, deque
from typing import Any

import orjson

from mcp_zero.rpc.asgi import SSE_HEADERS, Send
from mcp_zero.rpc.session import JSON, Session

RETRY_MS = 1000
# The first MCP revision whose streams open with a priming event and may be closed by the
# server before their response (SEP-1699); revisions are dates, so they compare as strings.
PRIMED_FROM = "2025-11-25"
MAX_BUFFERED_EVENTS = 10_000
MAX_BUFFERED_NOTICES = 1_000  # a session's GET stream: kept while the session lives
#: Bytes of events a stream keeps for resumption: more than a dropped connection can have
#: had in flight (the server's MAX_STREAM_BACKLOG and the socket buffers), so a resume
#: rarely misses any; past it the oldest go, as past MAX_BUFFERED_EVENTS.
MAX_BUFFERED_BYTES = 8 * 1024 * 1024
#: Bytes all streams together keep, live and finished (a finished one is kept a minute),
#: newest events included: past it the oldest events of finished streams go first, then
#: the stream's own oldest. A part of the process's memory: see docs/architecture.md. The
#: default of the ``sse_buffer_bytes`` setting, which the HTTP app gives its streams.
MAX_TOTAL_BUFFERED_BYTES = 64 * 1024 * 1024
_total_buffered = [0]  # bytes held by the buffers of all streams
#: Finished streams that still hold events, the first finished first: what goes first past
#: the total bound (their clients most likely have their answers already).
_finished: OrderedDict[int, weakref.ref[EventStream]] = OrderedDict()  # (first in O(1))


def buffered_bytes() -> int:
    """Bytes of events all streams hold for resumption."""
    return _total_buffered[0]


def _drop_finished(limit: int) -> None:
    """Drop the oldest events of finished streams, the first finished first, until all
    streams hold at most ``limit`` bytes (or no finished stream holds any)."""
    while _finished:
        key = next(iter(_finished))
        stream = _finished[key]()
        if stream is not None:
            events, gone, size = stream.events, 0, 0
            assert isinstance(events, list)  # (finished)
            while gone < len(events) and _total_buffered[0] - size > limit:
                size += len(events[gone])
                gone += 1
            del events[:gone]  # (a finished stream's list: one cut, not one shift an event)
            stream._held -= size
            _total_buffered[0] -= size
            if events:
                return
        del _finished[key]


def sse_event(event_id: str, data: bytes, *, retry: int | None = None) -> bytes:
    head = b"id: " + event_id.encode() + b"\n"
    if retry is not None:
        head += b"retry: " + str(retry).encode() + b"\n"
    return head + b"event: message\ndata: " + data + b"\n\n"


#: Notifications a client that reads too slowly may miss live (rpc/wire.py).
LOSSY_METHODS = frozenset({"notifications/progress", "notifications/message"})


class Connection:
    """One HTTP response carrying an SSE stream: its ASGI send, and whether the stream is
    done with it (``ended``: the stream closed, or another connection took over)."""

    __slots__ = ("ended", "live", "send")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.live = False  # events go out on it as they are pushed (it has caught up)
        self.ended = asyncio.Event()


class EventStream:
    """One SSE stream: buffered events, and at most one connection that carries them.

    Event ``n`` (from 1) has id ``<stream>-<n>``. The newest MAX_BUFFERED_EVENTS (and no
    more than MAX_BUFFERED_BYTES of them, but always the newest one) are kept for
    resumption, while all streams together hold no more than ``keep_total`` (default
    MAX_TOTAL_BUFFERED_BYTES; past it even the newest may go); numbering goes on past
    that, so ids never repeat.
    A stream has one connection at a time (MCP: a message goes out on one stream only, and
    a stream is one connection): a client that resumes takes the stream over, and the connection it
    had before is ended — it resumes because it holds that one for lost, and the server
    may not have noticed yet.
    """

    __slots__ = (
        "__weakref__",
        "_held",
        "_keep_bytes",
        "_keep_total",
        "_owner",
        "closed",
        "count",
        "events",
        "id",
    )

    def __init__(
        self,
        send: Send | None = None,
        *,
        keep: int = MAX_BUFFERED_EVENTS,
        keep_bytes: int = MAX_BUFFERED_BYTES,
        keep_total: int = MAX_TOTAL_BUFFERED_BYTES,
    ) -> None:
        self.id = secrets.token_hex(8)
        # a deque while events come; once finished, a list of just its events (see close)
        self.events: deque[bytes] | list[bytes] = deque(maxlen=keep)
        self.count = 0  # events pushed so far; the buffer holds the last len(events)
        self._keep_bytes = keep_bytes
        self._keep_total = keep_total  # what all streams together may hold, as it sees it
        self._held = 0  # bytes in ``events``
        self.closed = False
        self._owner: Connection | None = None
        if send is not None:  # the response that opened the stream, with nothing to catch up
            self._owner = Connection(send)
            self._owner.live = True

    def __del__(self) -> None:
        # The stream is gone: its buffer no longer counts. (Not weakref.finalize: ~500 bytes
        # a stream, as much again as a finished stream's own state.)
        _total_buffered[0] -= self._held
        _finished.pop(id(self), None)

    @property
    def spent(self) -> bool:
        """Finished, and none of its events kept (the total bound took them): nothing of it
        can be resumed."""
        return self.closed and not self.events and self.count > 0

    @property
    def attached(self) -> bool:
        """Whether a connection carries the stream (or is catching up on it)."""
        return self._owner is not None

    def priming(self, protocol_version: str) -> bytes:
        """The first event: an id and empty data, so the client can resume from the start;
        only from MCP 2025-11-25 (SEP-1699), whose clients expect it: older ones fail to
        parse an event with empty data (nothing for them)."""
        if protocol_version < PRIMED_FROM:
            return b""
        return f"id: {self.id}-0\nretry: {RETRY_MS}\ndata: \n\n".encode()

    async def push(self, message: dict[str, Any], *, wait: bool = False) -> None:
        """Append a JSON-RPC message and deliver it on the stream's connection, if it has one.

        A client with too much unread (rpc/wire.py): a progress or log message is not sent
        live (it stays in the buffer for a resume); another one waits for the client if
        ``wait`` (a call's own response or request: its sender holds up no one else), else
        the connection is dropped (a notice sent to many sessions in turn). A finished
        stream takes nothing more: no connection will carry it."""
        if self.closed:
            return
        self.count += 1
        chunk = sse_event(f"{self.id}-{self.count}", orjson.dumps(message))
        self._keep(chunk)
        owner = self._owner
        if owner is not None and owner.live:
            body = {"type": "http.response.body", "body": chunk, "more_body": True}
            if message.get("method") in LOSSY_METHODS:
                body["mcp0.lossy"] = True
            elif wait:
                body["mcp0.wait"] = True
            try:
                await owner.send(body)
            except OSError:
                self.lost(owner)  # the client went away; keep buffering for a resume

    def _keep(self, chunk: bytes) -> None:
        """Buffer ``chunk``, dropping the oldest events past the bounds: past the stream's
        own, its oldest (never the newest); past the total, those of finished streams first,
        then its own (the newest too: it still goes out live)."""
        events = self.events
        assert isinstance(events, deque)  # (a finished stream's is a list: it takes no more)
        if len(events) == events.maxlen:  # the deque drops the oldest itself
            self._held -= len(events[0])
            _total_buffered[0] -= len(events[0])
        events.append(chunk)
        self._held += len(chunk)
        _total_buffered[0] += len(chunk)
        while len(events) > 1 and self._held > self._keep_bytes:
            size = len(events.popleft())
            self._held -= size
            _total_buffered[0] -= size
        if _total_buffered[0] > self._keep_total:
            _drop_finished(self._keep_total)
            while events and _total_buffered[0] > self._keep_total:
                size = len(events.popleft())
                self._held -= size
                _total_buffered[0] -= size

    async def attach(self, after: int, send: Send) -> Connection:
        """Make ``send`` the stream's connection: end the one before, send the events after
        number ``after``, then deliver live. If the stream has closed, the connection ends
        after the replay; ``ended`` is set when the stream is done with it.

        Events older than the buffer are gone; the replay starts at the oldest kept (with
        none kept, at what comes next).
        """
        conn = Connection(send)
        previous, self._owner = self._owner, conn
        if previous is not None:
            await self._end(previous)
        sent = min(after, self.count)
        while sent < self.count and self._owner is conn:
            base = self.count - len(self.events)  # the number of the event before the oldest
            sent = max(sent, base)
            if sent == self.count:  # the bounds took the rest while it replayed
                break
            try:
                body = self.events[sent - base]
                # the replay waits for the client to read (flow control): it holds up only
                # the request that resumes; live pushes never wait (see rpc/wire.py)
                await send(
                    {
                        "type": "http.response.body",
                        "body": body,
                        "more_body": True,
                        "mcp0.wait": True,
                    }
                )
            except OSError:
                self.lost(conn)
                return conn
            sent += 1
        if self._owner is conn:  # not taken over while it caught up
            if self.closed:
                await self._end(conn)
            else:
                conn.live = True  # caught up: what is pushed from now on goes out at once
        return conn

    async def detach(self) -> None:
        """End the current connection, keeping the stream for a resume (SEP-1699)."""
        if self._owner is not None:
            await self._end(self._owner)

    async def close(self) -> None:
        """No more events: end the connection once it has them all."""
        self.closed = True
        # Kept a minute for a resume, it keeps only what a resume needs: its events in a list
        # of their number (a deque holds blocks of 64 however few it has: 760 bytes for two).
        self.events = list(self.events)
        if self.events:  # what it keeps now goes first past the total bound
            _finished[id(self)] = weakref.ref(self)
        owner = self._owner
        if owner is not None and owner.live:
            await self._end(owner)
        # one still catching up ends when it has caught up

    def lost(self, conn: Connection) -> None:
        """The client of ``conn`` is gone: keep buffering for its resume."""
        if self._owner is conn:
            self._owner = None
        conn.live = False
        conn.ended.set()

    async def _end(self, conn: Connection) -> None:
        if self._owner is conn:
            self._owner = None
        if conn.ended.is_set():
            return
        conn.live = False
        conn.ended.set()
        with contextlib.suppress(OSError):
            await conn.send({"type": "http.response.body", "body": b""})


#: How long a finished stream is kept for a client that is about to resume it.
FINISHED_KEEP_S = 60.0


class FinishedStreams:
    """Finished streams kept for a resume, each ``keep_s`` (a minute) from when it finished,
    then dropped from its session: one queue and one timer for all (a timer each cost ~420
    bytes a stream, as much as the rest of a small finished stream)."""

    __slots__ = ("_keep_s", "_queue", "_timer")

    def __init__(self, keep_s: float = FINISHED_KEEP_S) -> None:
        self._keep_s = keep_s
        #: (when it goes, its session's streams, its id), in the order they finished
        self._queue: deque[tuple[float, dict[str, Any], str]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def keep(self, streams: dict[str, Any], stream_id: str) -> None:
        """Keep stream ``stream_id`` in ``streams`` (its session's) for ``keep_s``."""
        loop = asyncio.get_running_loop()
        self._queue.append((loop.time() + self._keep_s, streams, stream_id))
        if self._timer is None:
            self._timer = loop.call_at(self._queue[0][0], self._expire)

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while queue and queue[0][0] <= loop.time():
            _, streams, stream_id = queue.popleft()
            streams.pop(stream_id, None)
        self._timer = loop.call_at(queue[0][0], self._expire) if queue else None


def parse_event_id(value: str) -> tuple[str, int] | None:
    stream, _, number = value.rpartition("-")
    # (ASCII digits, as we write them: str.isdigit takes "²", and int() 4,300 digits at most)
    if not stream or not number.isascii() or not number.isdigit() or len(number) > 18:
        return None
    return stream, int(number)


class PostChannel:
    """Messages related to one POST: nothing is sent until the first one, which turns the
    response into an SSE stream; until then the result can still go out as plain JSON."""

    __slots__ = ("_asgi_send", "_keep_total", "session", "stream")

    def __init__(
        self, session: Session, asgi_send: Send, keep_total: int = MAX_TOTAL_BUFFERED_BYTES
    ) -> None:
        self.session = session
        self._asgi_send = asgi_send
        self._keep_total = keep_total  # the server's sse_buffer_bytes
        self.stream: EventStream | None = None

    async def _open(self) -> EventStream:
        stream = EventStream(self._asgi_send, keep_total=self._keep_total)
        self.session.streams[stream.id] = stream
        self.stream = stream
        await self._asgi_send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": SSE_HEADERS + session_header(self.session),
            }
        )
        primed = stream.priming(self.session.protocol_version)
        await self._asgi_send({"type": "http.response.body", "body": primed, "more_body": True})
        return stream

    async def send(self, message: JSON) -> None:
        stream = self.stream or await self._open()
        await stream.push(message, wait=True)  # this request's own stream

    async def close_stream(self) -> None:
        """End the client's connection now (SSE first, so there is an event id to resume
        from); what the call sends later is kept for the client's GET with Last-Event-ID.
        Before MCP 2025-11-25 the stream stays: a server "SHOULD NOT close the SSE stream
        before sending the JSON-RPC response", and those clients do not resume. Nor does a
        POST without a session: a resume (GET) names its session, and it has none."""
        if self.session.protocol_version < PRIMED_FROM or not session_header(self.session):
            return
        stream = self.stream or await self._open()
        await stream.detach()

    async def finish(self) -> None:
        """End the SSE stream (after the response was pushed), on whichever connection now
        carries it."""
        assert self.stream is not None
        await self.stream.close()


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
        lossy = message.get("method") in LOSSY_METHODS
        await self._write(b"event: message\ndata: " + orjson.dumps(message) + b"\n\n", lossy)

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

    async def _write(self, chunk: bytes, lossy: bool = False) -> None:
        if self.gone:
            return
        try:
            if not self.started:
                self.started = True
                await self._asgi_send(
                    {"type": "http.response.start", "status": 200, "headers": SSE_HEADERS}
                )
            # this request's own stream: a progress or log message is skipped while the
            # client has too much unread, anything else waits for it (rpc/wire.py)
            flow = "mcp0.lossy" if lossy else "mcp0.wait"
            await self._asgi_send(
                {"type": "http.response.body", "body": chunk, "more_body": True, flow: True}
            )
        except OSError:
            self.gone = True


class NoticeChannel:
    """Server-initiated messages of a session: onto its GET stream (kept for a resume while
    no connection carries it)."""

    __slots__ = ("_stream",)

    def __init__(self, stream: EventStream) -> None:
        self._stream = stream

    async def send(self, message: JSON) -> None:
        await self._stream.push(message)

    async def close_stream(self) -> None:
        return None


def session_header(session: Session | None) -> list[tuple[bytes, bytes]]:
    if session is None or session.id.startswith("ephemeral"):
        return []
    return [(b"mcp-session-id", session.id.encode())]
