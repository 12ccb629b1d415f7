"""A small HTTP/1.1 server for one ASGI application, on httptools and asyncio.

`mcp0 serve` uses it instead of uvicorn: measured here at a paced 1,000
requests/s, uvicorn spent 11-13% of a core answering a constant body and this
server 5-6%, the difference being uvicorn's per-request machinery that MCP-ZERO
does not need (proxy headers, access log, flow-control objects, timers per
request). What it does: keep-alive, pipelined requests answered in order (reading
stops while one waits behind another, so a client cannot queue them without end),
request bodies capped at ``max_body_bytes`` (the app answers 413 past it),
``Content-Length`` or chunked responses (server-sent events stream chunked; to an
HTTP/1.0 client unchunked, the connection closing at their end),
``http.disconnect`` for the app when the client goes, flow control for streams
(past 4 MiB unread a send waits for the client to read; one that reads nothing for
30 s is dropped), an idle keep-alive timeout,
a deadline for receiving a whole request (408 after 30 s from its first byte or
5 s without one, so a client that trickles bytes cannot hold a connection), a
size limit on the request head and on trailers, counted as they arrive (431),
and 400 for what does not parse or repeats a field that must come once. TLS with
an ``ssl.SSLContext`` (connections accepted here and counted from their accept);
no HTTP/2, no WebSocket (an Upgrade is answered as HTTP/1.1): put a proxy in
front for those.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import re
import resource
import socket
import ssl
import struct
import termios
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, NoReturn, cast
from urllib.parse import unquote_to_bytes

import httptools

from mcp_zero.errors import SHUTTING_DOWN
from mcp_zero.rpc.asgi import Receive, Scope, Send
from mcp_zero.sandbox.proctree import STOP_SIGNALS

App = Callable[[Scope, Receive, Send], Coroutine[Any, Any, None]]
log = logging.getLogger("mcp_zero.wire")
_LAST_WORDS_S = 1.0  # for requests cut off at shutdown to send their error answer

MAX_HEADER_BYTES = 64 * 1024  # the request head: request line and header fields
#: Fields a request may carry once: a second copy (or a differing one) would let one reader
#: see one value and another the other (RFC 9112 3.2 for Host). Content-Length: llhttp.
SINGLE_FIELDS = frozenset(
    (
        b"authorization",
        b"content-type",
        b"host",
        b"last-event-id",
        b"mcp-protocol-version",
        b"mcp-session-id",
        b"origin",
    )
)
KEEPALIVE_S = 5.0
REQUEST_READ_S = 30.0  # from a request's first byte to its last
TLS_HANDSHAKE_S = 10.0  # from a TLS connection's accept to its handshake's end
#: Bytes a streaming response may have waiting for its client. Past this the app's next
#: send waits until the client has read most of it (flow control: a stream goes at its
#: client's pace, and the server holds no more than this for it).
MAX_STREAM_BACKLOG = 4 * 1024 * 1024
# Open files a server keeps for itself beside its connections (plugin workers' pipes, the
# store, policy files, TLS, logs): past max_connections a new connection is closed at
# once, so that a flood of them (a client trickling a byte a second on each) cannot take
# the descriptors a worker restart, a commit or a policy reload needs.
FD_RESERVE = 256
MIN_CONNECTIONS = 16


def default_max_connections() -> int:
    """Connections at most, from this process's open-files limit (soft) less FD_RESERVE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(soft - FD_RESERVE, MIN_CONNECTIONS)


def raise_open_files_limit() -> int:
    """Raise this process's soft open-files limit to its hard one (Linux's default soft
    1,024 is a select() era limit; an epoll server holds one per connection) and return the
    soft limit now. Plugin workers set their own (isolation.apply_rlimits)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


#: A client that reads nothing of its backlog for this long is dropped (an SSE client
#: resumes with Last-Event-ID): a waiting send is not held for ever.
STREAM_STALL_S = 30.0
#: Answers written whole and left unread, all connections together, past which the
#: connections that have left theirs unread longest are dropped: each holds its answer in
#: the server's memory until its client reads it or STREAM_STALL_S pass, and an agent that
#: opens many connections and reads none would otherwise take the server's memory
#: (ten unread 25 MiB answers held 250 MB: found by a bug hunt).
MAX_UNREAD_BYTES = 256 * 1024 * 1024
_REASONS = {
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    406: b"Not Acceptable",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    415: b"Unsupported Media Type",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


_ASGI = {"version": "3.0", "spec_version": "2.3"}  # the same in every scope
# Header names as sent, lower-cased: clients send the same few on every request, so one
# object each instead of a new one per header per request (bounded: names are the client's).
_LOWERED: dict[bytes, bytes] = {}
_LOWERED_MAX = 256
_date_cache: list[Any] = [0, b""]


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: float) -> str:
    """``seconds`` (since the epoch) as HTTP writes a date (RFC 9110 5.6.7, IMF-fixdate):
    English names whatever the locale (email.utils would cost the server the email package
    and calendar, about 0.6 MiB, for this)."""
    t = time.gmtime(seconds)
    return (
        f"{_WEEKDAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def _date() -> bytes:
    """The Date header HTTP/1.1 asks for, formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = b"date: %s\r\n" % http_date(now).encode()
    value: bytes = _date_cache[1]
    return value


_STATUS_LINES = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, reason) for status, reason in _REASONS.items()
}


def _plain(status: int, text: bytes) -> bytes:
    return b"HTTP/1.1 %d %s\r\n%scontent-type: text/plain\r\ncontent-length: %d\r\n" % (
        status,
        _REASONS.get(status, b""),
        _date(),
        len(text),
    ) + (b"connection: close\r\n\r\n" + text)


# A %-escape of "/" or of an unreserved character (RFC 3986 2.3), which no URI needs
_ENCODED_PLAIN = re.compile(rb"%(?:2[dDeEfF]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")


class _Request:
    """One parsed request waiting for (or being answered by) the app."""

    __slots__ = ("body", "headers", "http10", "keep_alive", "method", "scope", "target", "withheld")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.scope: Scope | None = None  # made when its head came, for the app's vet_body
        self.withheld = False  # its body is not kept: vet_body refused it
        self.target = b""
        self.method = "GET"
        self.keep_alive = True
        self.http10 = False


# struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a u64, since Linux 4.1
_TCPI_BYTES_ACKED = struct.Struct("=Q")
_TCPI_BYTES_ACKED_AT = 120


def _bytes_acked(transport: asyncio.BaseTransport | None) -> int:
    """Bytes the peer of a TCP connection has acknowledged; -1 when unknown."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return -1
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 128)
    except OSError:
        return -1
    if len(info) < _TCPI_BYTES_ACKED_AT + _TCPI_BYTES_ACKED.size:
        return -1
    return int(_TCPI_BYTES_ACKED.unpack_from(info, _TCPI_BYTES_ACKED_AT)[0])


def _unacked(transport: asyncio.BaseTransport) -> int:
    """Bytes in the socket's send queue the peer has not acknowledged (SIOCOUTQ)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        got = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int.from_bytes(got, "little", signed=True)


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and runs the app for each, in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.current = _Request()
        self.header_bytes = 0  # of the request line and header fields parsed so far
        self.head_fed = 0  # bytes fed to the parser for the field section being received
        self.in_head = False  # between a request's first byte and the end of its headers
        self.trailing = False  # after a chunk header, before its data: maybe trailer fields
        self.sections = 0  # field sections begun (a head, a chunk header and what follows)
        self.body_bytes = 0
        self.queue: deque[_Request] = deque()
        self.busy = False
        self.paused = False  # reading stopped while a request waits behind another
        self.closed = False
        self.gone = asyncio.Event()
        self.last_active = time.monotonic()
        self.reading_since = 0.0  # when the request being received began; 0 between requests
        self.client: tuple[str, int] | None = None
        self.deaf = False  # after an Upgrade request: nothing more is read
        # A refusal (400, 431...) of a request that came behind others: written once they
        # are answered (RFC 9112 9.3.2); nothing more is read meanwhile
        self.last_words: bytes | None = None
        self.write_paused = False  # writable, as a plain flag (checked after each answer)
        self.stalled_since = 0.0  # when an answer was left unread and reading stopped
        self.stalled_unsent = 0  # bytes unsent then (or at its last progress)
        self.acked = -1  # bytes the client had acknowledged at the last look (took_more)
        self.upgrade_body = False  # reading the body of an Upgrade request (not upgraded)
        self.writable = asyncio.Event()  # clear while the client has MAX_STREAM_BACKLOG unread
        self.writable.set()
        self.dropped = False  # we dropped it: its client did not read its stream
        self.skipped = 0  # lossy messages not sent while its client had too much unread

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = (str(peer[0]), int(peer[1])) if peer else None
        server = self.server
        if len(server.connections) >= server.max_connections:
            self.closed = True  # refused: its descriptor goes back at once
            self.transport.abort()
            server.refused_connection()
            return
        self.transport.set_write_buffer_limits(high=server.max_stream_backlog)
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gone.set()
        self.writable.set()  # a send waiting for the client hears it is gone
        self.server.connections.discard(self)
        self.server.stalled.discard(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.writable.clear()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.writable.set()
        if self.stalled_since:
            self.stalled_since = 0.0
            self.server.stalled.discard(self)
            self._go_on()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self.deaf or self.closed or self.last_words is not None:
            return
        # httptools holds a field until it ends: what it was fed for a head (or trailers)
        # counts against the limit, exactly when the section began before this data or at its
        # start; a head begun after another request in it, by what was parsed of it.
        continuing = self.in_head or self.trailing
        idle = not self.reading_since
        sections = self.sections
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # An Upgrade (h2c, WebSocket) we do not do (RFC 9110 7.8: answer as HTTP/1.1).
            # The parser goes no further than the head: read the body (if any) with another,
            # answer, and close after it.
            self.current.keep_alive = False
            if self.upgrade_body:
                self._read_upgrade_body(data[exc.args[0] :])
            else:
                self.deaf = True
            return
        except httptools.HttpParserError as exc:
            if not self.deaf:  # (bytes past an upgrade request's body are not ours to parse)
                self.refuse(400, f"malformed HTTP request: {exc}".encode())
            return
        if (self.in_head or self.trailing) and not self.closed:
            if continuing and sections == self.sections:
                self.head_fed += len(data)
            elif idle and self.in_head and sections + 1 == self.sections:
                self.head_fed = len(data)
            elif self.in_head:
                self.head_fed = self.header_bytes
            if self.head_fed > MAX_HEADER_BYTES and self.in_head:
                self.refuse(431, b"the request head (request line and headers) is over 64 KiB")
            elif self.head_fed > MAX_HEADER_BYTES:
                self.refuse(431, b"the request's trailer fields are over 64 KiB")

    def _read_upgrade_body(self, rest: bytes) -> None:
        """Parse the body of the Upgrade request ``self.current`` from ``rest`` on: a parser
        of its own, given the framing of the request's head, hands it to ``on_body``."""
        request = self.current
        if any(name == b"transfer-encoding" for name, _ in request.headers):
            framing = b"transfer-encoding: chunked"
        else:
            framing = b"content-length: %d" % self._declared_length(request)
        self.parser = httptools.HttpRequestParser(_UpgradeBody(self))
        self.data_received(b"POST / HTTP/1.1\r\n%s\r\n\r\n%s" % (framing, rest))

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.reading_since = time.monotonic()
        self.current = _Request()
        self.header_bytes = 0
        self.head_fed = 0
        self.in_head = True
        self.trailing = False
        self.sections += 1
        self.body_bytes = 0
        self.acked = -1  # (a keep-alive look after this request's answer starts afresh)

    def on_url(self, url: bytes) -> None:
        self.header_bytes += len(url)
        if self.header_bytes > MAX_HEADER_BYTES:
            self.refuse(414, b"the request target is over 64 KiB")
            return
        self.current.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a trailer field: not merged into the headers (RFC 9110 6.5.1)
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            self.refuse(431, b"the request head (request line and headers) is over 64 KiB")
            return
        lowered = _LOWERED.get(name)
        if lowered is None:
            lowered = name.lower()
            if len(_LOWERED) < _LOWERED_MAX:
                _LOWERED[name] = lowered
        # RFC 9110 5.5: whitespace around a field value is not part of it
        self.current.headers.append((lowered, value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.closed or self.last_words is not None:
            return
        request = self.current
        request.method = self.parser.get_method().decode("ascii", "replace")
        request.keep_alive = self.parser.should_keep_alive()
        version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":
            # (its answers would go chunked, or keep-alive, to a client that may not know)
            self.refuse(505, b"this server speaks HTTP/1.1 (and 1.0)")
            return
        request.http10 = version == "1.0"
        hosts = 0
        sized = False  # a Content-Length other than 0
        codings: bytes | None = None  # the Transfer-Encoding headers' values, joined
        expects = False
        once: set[bytes] = set()  # the fields that may come once, as they came
        twice: set[bytes] = set()
        for name, value in request.headers:  # (one pass for all the checks)
            if name in SINGLE_FIELDS:
                if name in once:
                    twice.add(name)
                once.add(name)
            if name == b"host":
                hosts += 1
            elif name == b"transfer-encoding":
                codings = value if codings is None else codings + b"," + value
            elif name == b"content-length":
                sized = value != b"0"
            elif name == b"expect" and value.lower() == b"100-continue":
                expects = True
        # RFC 9112 3.2: exactly one Host in HTTP/1.1 (at most one before), else 400.
        if hosts > 1 or (not hosts and not request.http10):
            self.refuse(400, b"a request needs one Host header (HTTP/1.0: at most one)")
            return
        if twice:
            self.refuse(400, b"a request may carry only one %s header" % b", ".join(sorted(twice)))
            return
        if request.target[:1] != b"/" and not self._origin_form(request):
            return
        if b"%" in request.target and _ENCODED_PLAIN.search(request.target.partition(b"?")[0]):
            # Routed on the decoded path, /api%2Fv1/agents reached /api/v1/agents, and
            # /%61pi/v1/agents too, past a proxy's rule for /api/v1/ that matches the raw
            # path (found by reviews). RFC 3986 2.3: a URI does not encode a letter, digit,
            # "-", ".", "_" or "~" (nor a "/" meant as one); an agent's name in UTF-8 is.
            self.refuse(
                404, b"an encoded slash, letter, digit or -._~ in the path names no resource here"
            )
            return
        if codings is not None and request.http10:
            # RFC 9112 6.1: its framing is faulty (a smuggling defence)
            self.refuse(400, b"an HTTP/1.0 request cannot carry Transfer-Encoding")
            return
        if codings is not None and codings.replace(b" ", b"").lower() != b"chunked":
            # httptools would take "gzip, chunked" as chunked and hand on gzip as the body
            self.refuse(501, b"only the chunked transfer coding is supported")
            return
        vet = self.server.vet_body
        if vet is not None and (sized or codings is not None):
            # whether its body is worth keeping, from its head: one without the credentials
            # it needs is answered from its headers, its body parsed and dropped (else a
            # client without a token has the server hold max_body_bytes per connection)
            scope = request.scope = self._scope(request)
            if not vet(scope):
                request.withheld = True
                scope["mcp0.body_withheld"] = True
        # curl and others wait (1 s) for this before sending a body over 1 KiB. Not while
        # another response is being written (it would land in the middle of it; the client
        # sends the body after its wait anyway), and not for a body past the limit.
        # HTTP/1.0 knows no 100 (RFC 9110 10.1.1, 15.2). One whose body is withheld gets it
        # too, the headers deciding nothing here (RFC 9110 10.1.1: 100 or the final status);
        # its body is parsed and dropped.
        if (
            expects
            and not request.http10
            and self.transport is not None
            and not self.busy
            and not self.queue
        ):
            if self._declared_length(request) > self.server.max_body_bytes:
                self.refuse(413, b"the request body is over the size limit")
            else:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _has_body(self) -> bool:
        headers = self.current.headers
        return self._declared_length(self.current) > 0 or any(
            name == b"transfer-encoding" for name, _ in headers
        )

    @staticmethod
    def _declared_length(request: _Request) -> int:
        for name, value in request.headers:
            if name == b"content-length" and value.isdigit():
                return int(value)
        return 0

    def _origin_form(self, request: _Request) -> bool:
        """An absolute-form target (``http://host/path``) becomes its path, and its authority
        the Host, as RFC 9112 3.2.2 has a server take it; False (refused) if it is neither
        that nor ``*``."""
        target = request.target
        if target == b"*":
            return True
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            url = None
        scheme = url.schema.lower() if url is not None and url.schema else b""
        if url is None or scheme not in (b"http", b"https") or not url.host or url.userinfo:
            self.refuse(400, b"the request target must be a path or an http(s) URL")
            return False
        authority = target.split(b"://", 1)[1].split(b"/", 1)[0].split(b"?", 1)[0]
        path = url.path or b"/"
        request.target = path + b"?" + url.query if url.query is not None else path
        request.headers = [h for h in request.headers if h[0] != b"host"]
        request.headers.append((b"host", authority))
        return True

    def on_chunk_header(self) -> None:
        self.trailing = True  # until data of the chunk comes (the last chunk has none)
        self.head_fed = 0
        self.sections += 1

    def on_chunk_complete(self) -> None:
        self.trailing = False

    def on_body(self, body: bytes) -> None:
        self.trailing = False
        self.body_bytes += len(body)
        # Keep one byte past the limit, so the app sees the body is too large and answers
        # 413; the rest is parsed and dropped, never held in memory.
        room = self.server.max_body_bytes + 1 - (self.body_bytes - len(body))
        if room > 0 and not self.current.withheld:
            self.current.body.append(body[:room])

    def on_message_complete(self) -> None:
        if self.closed or self.last_words is not None:
            return
        if not self.upgrade_body and self.parser.should_upgrade() and self._has_body():
            # llhttp ends an Upgrade request at its head, the rest being another protocol's;
            # not upgrading, we read its body as HTTP/1.1 (data_received goes on)
            self.upgrade_body = True
            return
        self.reading_since = 0.0
        self.trailing = False
        self.queue.append(self.current)
        if not self.busy and not self.stalled_since:
            self._next()
        else:
            # Behind a long response (an event stream, a slow call) a client could pipeline
            # requests without end: read no further until the queue drains.
            self._pause()

    # -- running the app ----------------------------------------------------------------------

    def _next(self) -> None:
        if self.closed or not self.queue:
            return
        request = self.queue.popleft()
        self.busy = True
        if self.queue:
            self._pause()  # pipelined requests wait their turn
        elif self.paused:
            self._resume()
        response = _Response(self, request)
        # The app's own coroutine is the task, and what follows it the task's callback: a
        # coroutine around it would be resumed again at each of its suspensions.
        app = self.server.app(
            request.scope or self._scope(request), response.receive, response.send
        )
        task = asyncio.get_running_loop().create_task(app)
        self.server.tasks.add(task)
        task.add_done_callback(response.app_returned)

    def release(self, response: _Response) -> None:
        """``response`` is complete, or its app returned: go on to the next request. An app
        may go on running after it ended its response (a call whose SSE stream it ended
        early, to be resumed elsewhere): the client may already be sending the next request
        on this connection, and it must not wait for that call."""
        if response.released:
            return
        response.released = True
        self.busy = False
        if not response.keep_alive or not response.request.keep_alive:
            self.close()  # (and what came after it is not answered: RFC 9112 9.6)
            return
        self.last_active = time.monotonic()
        if self.write_paused:
            # The client reads none of its answers (max_stream_backlog unsent): the next
            # request waits for it to read, else pipelined requests would have every answer
            # held here (found by review). resume_writing goes on; the reaper drops it.
            self.stalled_since = self.last_active
            self.stalled_unsent = self.transport.get_write_buffer_size() if self.transport else 0
            self.took_more()  # (where the client's progress is measured from)
            self._pause()
            self.server.stalled.add(self)
            self.server.bound_unread()
            return
        self._go_on()

    def _go_on(self) -> None:
        """After an answer: the next request, or the refusal that waited for it."""
        if self.queue:
            self._next()
        elif self.last_words is not None:
            self._write_and_close(self.last_words)
        elif self.paused:
            self._resume()

    def _pause(self) -> None:
        if self.transport is not None and not self.closed and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        """Read again, at most one request being buffered ahead of the one answered."""
        if self.transport is not None and not self.closed and self.paused:
            self.paused = False
            self.transport.resume_reading()
            if self.reading_since:  # begun before reading paused: its deadline starts now
                self.reading_since = time.monotonic()

    def _scope(self, request: _Request) -> Scope:
        raw_path, _, query = request.target.partition(b"?")
        # ASGI's path is the target's path with %-escapes and UTF-8 decoded
        path = (unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path).decode(
            "utf-8", "replace"
        )
        return {
            "type": "http",
            "asgi": _ASGI,
            "http_version": "1.1",
            "method": request.method,
            "scheme": self.server.scheme,
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": request.headers,
            "client": self.client,
            "server": self.server.address,
        }

    def refuse(self, status: int, text: bytes) -> None:
        """Answer ``status`` and close: at once, or, behind requests being answered, once
        they are (their answers were lost: found by review), reading nothing more."""
        if self.closed or self.last_words is not None:
            return
        if self.busy or self.queue:
            self.last_words = _plain(status, text)
            self.reading_since = 0.0
            self._pause()
            return
        self._write_and_close(_plain(status, text))

    def took_more(self) -> bool:
        """Whether the client has acknowledged bytes since the last look (TCP_INFO). The
        transport's buffer alone cannot tell: under TLS it does not count what the layer
        beneath holds, an answer's worth (a slow HTTPS reader of a large answer was cut off
        as idle: found by review)."""
        acked = _bytes_acked(self.transport)
        took, self.acked = acked != self.acked, acked
        return took and acked >= 0

    def taking_answer(self, now: float, stall_s: float) -> bool:
        """Whether a connection silent since its last answer is still taking the answer, and
        so is not idle: it acknowledged more since the last look (then it is active now), or
        some of the answer is unsent or unacknowledged and it took some less than
        ``stall_s`` ago. At the first look, only what is outstanding tells."""
        first = self.acked < 0
        if self.took_more() and not first:
            self.last_active = now
            return True
        transport = self.transport
        if transport is None or not (transport.get_write_buffer_size() or _unacked(transport)):
            return False  # all of it taken
        if first:
            self.last_active = now
            return True
        return now - self.last_active < stall_s

    def cut(self, status: int, text: bytes) -> None:
        """Answer ``status`` (unless a response is being written) and close, at once."""
        if self.transport is not None and not self.closed and not self.busy:
            self.transport.write(_plain(status, text))
        self.close()

    def _write_and_close(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection and whatever it still had to send."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()


class _UpgradeBody:
    """The parser protocol for the body of an Upgrade request that is not upgraded: the body
    goes to the request as any other, and nothing after it is read (the connection closes
    after the answer)."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    def on_chunk_header(self) -> None:
        self.conn.on_chunk_header()

    def on_chunk_complete(self) -> None:
        self.conn.on_chunk_complete()

    def on_body(self, body: bytes) -> None:
        self.conn.on_body(body)

    def on_message_complete(self) -> None:
        self.conn.deaf = True
        self.conn.on_message_complete()


class _Response:
    """The ASGI receive/send pair of one request."""

    __slots__ = (
        "chunked",
        "conn",
        "finished",
        "head",
        "keep_alive",
        "read",
        "released",
        "request",
        "sized",
        "started",
        "status",
    )

    def __init__(self, conn: _Connection, request: _Request) -> None:
        self.conn = conn
        self.request = request
        self.started = False
        self.finished = False
        self.chunked = False
        self.keep_alive = True
        self.read = False
        self.released = False  # the connection went on to its next request
        self.head: list[bytes] | None = None  # status line and headers, until the first body
        self.sized = False  # the app gave a content-length
        self.status = 0

    def app_returned(self, task: asyncio.Task[None]) -> None:
        """The app's task ended (its done callback): answer 500 if it failed before it
        began to, end the connection if it stopped mid-body, and go on to the next request."""
        conn = self.conn
        conn.server.tasks.discard(task)
        if task.cancelled():
            return
        failure = task.exception()
        if failure is not None:
            if not isinstance(failure, Exception):
                return  # (KeyboardInterrupt, SystemExit: the loop stops on them)
            if not conn.closed:
                target = self.request.target[:200]
                log.error("the application failed on %s", target, exc_info=failure)
        if not self.started and not conn.closed:
            self.write(_plain(500, b"internal server error"))
            self.keep_alive = False
        elif self.started and not self.finished:
            self.keep_alive = False  # the app stopped mid-body: the framing is broken
        if not self.released:
            conn.release(self)

    async def receive(self) -> dict[str, Any]:
        if not self.read:
            self.read = True
            chunks, self.request.body = self.request.body, []  # (a listen stream may last)
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.conn.gone.wait()  # after the body: only the disconnect is left to hear
        # Also heard when the server begins to stop (the connection still open): long-lived
        # handlers end then, others may finish within the grace period.
        # "mcp0.dropped": the server dropped it, its client having stopped reading; it did
        # not leave on its own
        return {
            "type": "http.disconnect",
            "mcp0.server_stopping": not self.conn.closed,
            "mcp0.dropped": self.conn.dropped,
        }

    def write(self, data: bytes) -> None:
        transport = self.conn.transport
        if transport is not None and not self.conn.closed:
            transport.write(data)

    async def send(self, message: dict[str, Any]) -> None:
        if self.conn.closed:
            raise ConnectionResetError("the client closed the connection")
        kind = message["type"]
        if kind == "http.response.start":
            self._start(message)
        elif kind == "http.response.body":
            more = bool(message.get("more_body"))
            if more and not self.conn.writable.is_set():
                if message.get("mcp0.lossy"):  # a progress or log message: skipped
                    self._skip_behind()
                    return
                if message.get("mcp0.wait"):  # its sender may wait for the client
                    await self._drain()
                else:
                    self._drop_behind()
            self._body(message.get("body", b""), more)
        else:
            raise RuntimeError(f"unknown ASGI message {kind!r}")

    def _skip_behind(self) -> None:
        """A lossy message (``mcp0.lossy``: a call's progress or log notification) finds
        MAX_STREAM_BACKLOG unread: it is not sent. Its sender is a call's notification
        relay, which holds the call's plugin slot and quota: waiting there would hold up
        other calls behind one client that reads slowly or not at all."""
        conn = self.conn
        if not conn.skipped:
            log.warning(
                "a stream to %s has over %d MiB unread: skipping its progress and log messages "
                "while it does",
                conn.client,
                conn.server.max_stream_backlog >> 20,
            )
        conn.skipped += 1

    def _drop_behind(self) -> NoReturn:
        """A send that may not wait finds MAX_STREAM_BACKLOG unread: drop the connection.
        Such a send is a notice sent to many sessions in turn (resource updates, list
        changes): waiting there would hold up every session behind one client that does not
        read. The events stay in their stream's buffer: the client resumes with
        Last-Event-ID, and that replay (``mcp0.wait``) goes at its pace."""
        conn = self.conn
        log.warning(
            "dropping a stream to %s: over %d MiB unread",
            conn.client,
            conn.server.max_stream_backlog >> 20,
        )
        conn.dropped = True
        conn.abort()
        raise ConnectionResetError("the client does not read its stream")

    async def _drain(self) -> None:
        """Wait until the client has read its backlog down (one wait: senders go out in the
        order they came); drop the connection if it reads none of it for ``stream_stall_s``.

        Raises ConnectionResetError if the connection is gone, or the response was ended
        meanwhile."""
        conn = self.conn
        transport = conn.transport
        assert transport is not None
        conn.took_more()  # (where the client's progress is measured from)
        while not conn.writable.is_set() and not conn.closed:
            unsent = transport.get_write_buffer_size()
            try:
                async with asyncio.timeout(conn.server.stream_stall_s):
                    await conn.writable.wait()
                break
            except TimeoutError:
                if transport.get_write_buffer_size() < unsent or conn.took_more():
                    continue  # a slow reader, but a reader
                log.warning(
                    "dropping a stream to %s: it read nothing of %d KiB in %g s",
                    conn.client,
                    unsent >> 10,
                    conn.server.stream_stall_s,
                )
                conn.dropped = True
                conn.abort()
        if conn.closed:
            raise ConnectionResetError("the client closed the connection")
        if self.finished:
            raise ConnectionResetError("the response was ended while this waited")

    def _start(self, message: dict[str, Any]) -> None:
        if self.started:
            raise RuntimeError("http.response.start sent twice")
        self.started = True
        status = int(message["status"])
        status_line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status
        lines = [status_line, _date()]
        length = False
        for name, value in message.get("headers", ()):
            lowered = name.lower()
            if lowered == b"content-length":
                length = True
            elif lowered == b"connection" and value.lower() == b"close":
                self.keep_alive = False
            lines += (name, b": ", value, b"\r\n")  # (joined with the rest: no copy each)
        self.head = lines
        self.sized = length
        self.status = status

    def _body(self, body: bytes, more: bool) -> None:
        if not self.started:
            raise RuntimeError("http.response.body before http.response.start")
        if self.finished:
            raise RuntimeError("http.response.body after the response ended")
        head = self.head
        if head is not None:  # first body message: the head goes out with it
            self.head = None
            if not self.sized and self.status not in (204, 304):
                if more:
                    self.chunked = True
                    if self.request.http10:  # no chunked coding for it (RFC 9112 6.1)
                        self.keep_alive = False  # the end of the connection ends the body
                    else:
                        head.append(b"transfer-encoding: chunked\r\n")
                else:
                    head.append(b"content-length: %d\r\n" % len(body))
            if not self.keep_alive or not self.request.keep_alive:
                head.append(b"connection: close\r\n")
            elif self.request.http10:  # (kept alive only when it asked, and told so)
                head.append(b"connection: keep-alive\r\n")
            head.append(b"\r\n")
        if self.request.method == "HEAD":
            # a HEAD answer has the headers of a GET and no body
            self.write(b"".join(head) if head is not None else b"")
        elif self.chunked:
            prefix = b"".join(head) if head is not None else b""
            if self.request.http10:
                self.write(prefix + body)
            else:
                chunk = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
                end = b"0\r\n\r\n" if not more else b""
                self.write(prefix + chunk + end)
        elif head is not None:
            head.append(body)  # the head and the body in one join, the body copied once
            self.write(b"".join(head))
        else:
            self.write(body)
        if not more:
            self.finished = True
            self.conn.release(self)


async def _listening_sockets(host: str | Sequence[str], port: int) -> list[socket.socket]:
    """Sockets listening on every address of ``host`` (a name, or several), on ``port``: with
    port 0, all on the port the first was given (each had a port of its own, and only the
    first was announced: found by review), a few tries when another process takes it."""
    loop = asyncio.get_running_loop()
    hosts = [host] if isinstance(host, str) else host
    infos = [
        info
        for name in hosts
        for info in await loop.getaddrinfo(
            name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    ]
    for attempt in range(_PORT_TRIES if port == 0 and len(infos) > 1 else 1):
        sockets: list[socket.socket] = []
        chosen = port
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], chosen, *address[2:]))
                chosen = sock.getsockname()[1]
                sock.listen(1024)
                sock.setblocking(False)
            return sockets
        except OSError as exc:
            for sock in sockets:
                sock.close()
            if exc.errno != errno.EADDRINUSE or port != 0 or attempt == _PORT_TRIES - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


_PORT_TRIES = 8  # (port 0 on several addresses: another process took the first one's port)


class _Servers:
    """asyncio Servers, one per listening socket, closed together (``create_server`` takes
    one socket)."""

    def __init__(self, servers: list[asyncio.base_events.Server]) -> None:
        self._servers = servers
        self.sockets = [sock for server in servers for sock in server.sockets]

    def close(self) -> None:
        for server in self._servers:
            server.close()

    async def wait_closed(self) -> None:
        for server in self._servers:
            await server.wait_closed()


class _TlsListener:
    """Accepts HTTPS connections. Each counts against ``max_connections`` from its accept,
    its TLS handshake included (with ``create_server(ssl=...)`` only once the handshake ended,
    so that connections that never end theirs took descriptors past the limit: found by
    review), and its handshake gets TLS_HANDSHAKE_S. (Not ``start_tls`` after a plain accept:
    uvloop starts reading at the accept, pause or not, and the client's hello went to the
    HTTP parser.)"""

    def __init__(self, server: HttpServer, tls: ssl.SSLContext, sockets: list[socket.socket]):
        self.server = server
        self.tls = tls
        self.sockets = sockets
        self.handshakes = 0  # under way
        self._failure_logged = -60.0
        self._tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        self._accepting = [loop.create_task(self._accept(sock)) for sock in sockets]

    @classmethod
    async def bind(cls, server: HttpServer, tls: ssl.SSLContext) -> _TlsListener:
        """Listen on every address of the server's hosts, as ``create_server`` does."""
        return cls(server, tls, await _listening_sockets(server.host, server.port))

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        server = self.server
        while True:
            try:
                sock, _ = await loop.sock_accept(listening)
            except OSError as exc:  # out of descriptors, or the like: the listener lives on
                now = time.monotonic()
                if now - self._failure_logged >= 60:  # (at most once a minute)
                    self._failure_logged = now
                    log.warning("accepting a connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if server.open_connections >= server.max_connections:
                sock.close()  # refused: its descriptor goes back at once
                server.refused_connection()
                continue
            self.handshakes += 1
            task = loop.create_task(self._handshake(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handshake(self, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: _Connection(self.server),
                sock,
                ssl=self.tls,
                ssl_handshake_timeout=TLS_HANDSHAKE_S,
            )
        except (OSError, TimeoutError) as exc:  # (ssl.SSLError is an OSError)
            log.debug("TLS handshake failed: %s", exc)
            sock.close()
        except asyncio.CancelledError:  # the server stops
            sock.close()
            raise
        finally:
            self.handshakes -= 1

    def close(self) -> None:
        """Stop accepting; connections in their handshake are dropped."""
        for task in (*self._accepting, *self._tasks):
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._accepting, *self._tasks, return_exceptions=True)


class HttpServer:
    """Serves ``app`` on ``host:port`` until :meth:`stop` (or SIGTERM/SIGINT in :meth:`run`);
    ``host`` may be several (each an address or a name: every address of each is listened on)."""

    def __init__(
        self,
        app: App,
        host: str | Sequence[str],
        port: int,
        *,
        max_body_bytes: int,
        request_read_s: float = REQUEST_READ_S,
        keepalive_s: float = KEEPALIVE_S,
        stream_stall_s: float = STREAM_STALL_S,
        max_stream_backlog: int = MAX_STREAM_BACKLOG,
        max_unread_bytes: int = MAX_UNREAD_BYTES,
        tls: ssl.SSLContext | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.app = app
        self.max_connections = (
            default_max_connections() if max_connections is None else max_connections
        )
        self.refused_connections = 0
        self._refusals_logged = 0.0
        # An app may judge from a request's head whether its body is to be kept (a callable
        # of the scope; False: the body is dropped, the scope marked "mcp0.body_withheld")
        self.vet_body: Callable[[Scope], bool] | None = getattr(app, "vet_body", None)
        self.host = host
        self.port = port
        # (ASGI's "server" of a request: the first host, when there are several)
        self.address = (host if isinstance(host, str) else host[0], port)
        self.max_body_bytes = max_body_bytes
        self.request_read_s = request_read_s
        self.keepalive_s = keepalive_s
        self.stream_stall_s = stream_stall_s
        self.max_stream_backlog = max_stream_backlog
        self.max_unread_bytes = max_unread_bytes
        # connections whose client left an answer unread (max_stream_backlog of it unsent)
        self.stalled: set[_Connection] = set()
        self.unread_drops = 0
        self._unread_logged = (0.0, 0)  # when a drop was last logged, and drops since
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: _Servers | _TlsListener | None = None
        self._stopping: asyncio.Event | None = None
        self._reaper: asyncio.Task[None] | None = None

    @property
    def open_connections(self) -> int:
        """Connections held: served, or in their TLS handshake."""
        listener = self._server
        handshakes = listener.handshakes if isinstance(listener, _TlsListener) else 0
        return len(self.connections) + handshakes

    def refused_connection(self) -> None:
        """A connection was refused for max_connections: counted, logged once a minute."""
        self.refused_connections += 1
        now = time.monotonic()
        if now - self._refusals_logged >= 60:
            self._refusals_logged = now
            log.warning(
                "refusing new connections: %d are open, the most this server keeps (its "
                "open-files limit less %d for itself; raise 'ulimit -n'); %d refused so far",
                self.open_connections,
                FD_RESERVE,
                self.refused_connections,
            )

    def bound_unread(self) -> None:
        """Past ``max_unread_bytes`` of answers left unread on all connections together,
        drop those that have left theirs unread longest until the rest fit (logged at most
        every 10 s, with how many were dropped meanwhile)."""
        unread = {
            conn: conn.transport.get_write_buffer_size()
            for conn in self.stalled
            if conn.transport is not None and not conn.closed
        }
        total = sum(unread.values())
        if total <= self.max_unread_bytes:
            return
        for conn in sorted(unread, key=lambda c: c.stalled_since):
            if total <= self.max_unread_bytes:
                break
            total -= unread[conn]
            self.unread_drops += 1
            now = time.monotonic()
            last, since = self._unread_logged
            if now - last < 10:
                self._unread_logged = (last, since + 1)
            else:
                self._unread_logged = (now, 0)
                more = f" ({since} more since the last such line)" if since else ""
                log.warning(
                    "dropping a connection from %s: its %d KiB of answers left unread for "
                    "%.1f s took the server's unread answers past %d MiB%s",
                    conn.client,
                    unread[conn] >> 10,
                    now - conn.stalled_since,
                    self.max_unread_bytes >> 20,
                    more,
                )
            conn.dropped = True
            conn.abort()
            self.stalled.discard(conn)

    async def start(self) -> None:
        """Listen; the actual port is in ``self.port`` afterwards (useful with port 0)."""
        loop = asyncio.get_running_loop()
        if self._stopping is None:
            self._stopping = asyncio.Event()
        if self.tls is None:
            self._server = _Servers(
                [
                    await loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024)
                    for sock in await _listening_sockets(self.host, self.port)
                ]
            )
        else:
            self._server = await _TlsListener.bind(self, self.tls)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        self.address = (self.address[0], self.port)
        self._reaper = loop.create_task(self._reap_idle())

    async def _reap_idle(self) -> None:
        assert self._stopping is not None
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self.keepalive_s, self.request_read_s) / 2):
                    await self._stopping.wait()
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.stalled_since and conn.transport is not None:
                    unsent = conn.transport.get_write_buffer_size()
                    if unsent < conn.stalled_unsent or conn.took_more():  # a slow reader
                        conn.stalled_since, conn.stalled_unsent = now, unsent
                    elif now - conn.stalled_since > self.stream_stall_s:
                        conn.abort()  # it read nothing of its answers for that long
                        continue
                if conn.paused:
                    continue  # what follows the request being answered is not read yet
                silent = conn.last_active < now - self.keepalive_s
                late = now - conn.reading_since > self.request_read_s
                if conn.reading_since and (silent or late):
                    # also behind a long response (an event stream): closed, as no 408 can
                    # be written into it
                    conn.cut(408, b"the request did not arrive in time")
                elif (
                    silent
                    and not conn.busy
                    and not conn.queue
                    and not conn.taking_answer(now, self.stream_stall_s)
                ):
                    conn.close()

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def wait_stopped(self, grace: float = 5.0) -> None:
        """After :meth:`stop`: stop accepting, close idle connections, let running requests
        finish for ``grace`` seconds, then cancel what still runs (with the message
        ``SHUTTING_DOWN``, so that a handler can still answer, for up to a second) and close
        what is left."""
        assert self._stopping is not None
        assert self._server is not None
        await self._stopping.wait()
        self._server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
            else:
                # Tell long-lived handlers (event streams) that their client is going, so
                # they end now instead of holding shutdown for the whole grace period.
                conn.gone.set()
        if self.tasks:
            log.info("stopping: %d request(s) in flight get up to %g s", len(self.tasks), grace)
            _, late = await asyncio.wait(set(self.tasks), timeout=grace)
            if late:
                log.warning(
                    "stopping: %d request(s) still running after %g s are cut off",
                    len(late),
                    grace,
                )
                for task in late:
                    task.cancel(SHUTTING_DOWN)
                await asyncio.wait(late, timeout=_LAST_WORDS_S)
        for conn in list(self.connections):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        await self._server.wait_closed()

    async def run(
        self,
        on_start: Callable[[], Awaitable[None]] | None = None,
        on_stop: Callable[[], Awaitable[None]] | None = None,
        *,
        listen: bool = True,
        grace: float = 5.0,
    ) -> None:
        """Serve until SIGTERM/SIGINT, then shut down gracefully (:meth:`wait_stopped` with
        ``grace``). ``on_start`` runs first; with ``listen=False`` it is ``on_start`` that
        calls :meth:`start`."""
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if on_start is not None:
            await on_start()
        if listen:
            await self.start()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.wait_stopped(grace)
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            if on_stop is not None:
                await on_stop()
