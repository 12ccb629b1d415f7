"""The HTTP/1.1 server under `mcp0 serve`, spoken to over raw sockets: keep-alive,
pipelining, chunked bodies both ways, limits, malformed input, disconnects, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import ssl
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import anyio
import pytest

from certificates import self_signed_certificate
from mcp_zero.rpc.wire import (
    FD_RESERVE,
    MAX_HEADER_BYTES,
    HttpServer,
    default_max_connections,
    http_date,
    raise_open_files_limit,
)

pytestmark = pytest.mark.anyio
LIMIT = 64
TIMEOUT_S = 10.0
FLOOD_BYTES = 32 << 20  # eight times what the server holds unsent for a stream
BIG_BYTES = 64 << 10
HUGE_BYTES = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    "seconds",
    # the epoch; a leap day; each weekday and month of a year; a second before a new year
    [0, 951_782_400, *range(1_700_000_000, 1_731_622_400, 781_207), 1_735_689_599.9],
)
def test_the_date_header_is_written_as_http_writes_dates(seconds: float) -> None:
    assert http_date(seconds) == formatdate(seconds, usegmt=True)


class EchoApp:
    """Echoes the body; /stream sends three chunks; /wait-disconnect reports the disconnect;
    /firehose streams until sending fails, /flood FLOOD_BYTES; /end-then-linger answers, then
    runs on."""

    def __init__(self) -> None:
        self.disconnected = asyncio.Event()
        self.scopes: list[dict[str, Any]] = []
        self.streamed = 0  # bytes /firehose (or /flood) got sent
        self.farewell: dict[str, Any] = {}  # the disconnect message /firehose heard
        self.lingering = asyncio.Event()  # /end-then-linger returns once this is set
        self.holding = asyncio.Event()  # /hold ends its stream once this is set

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        message = await receive()
        body = message["body"]
        if scope["path"] == "/stream":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            for i in range(3):
                await send(
                    {"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True}
                )
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["path"] == "/wait-disconnect":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"hello", "more_body": True})
            assert (await receive())["type"] == "http.disconnect"
            self.disconnected.set()
            return
        if scope["path"] in ("/firehose", "/flood"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            chunk = b"x" * (64 << 10)
            # /flood, and /firehose?wait, send as a resume's replay does: waiting for the
            # client to read; /firehose sends as a live stream does: never waiting
            wait = scope["path"] == "/flood" or scope["query_string"] == b"wait"
            message = {"type": "http.response.body", "body": chunk, "more_body": True}
            if wait:
                message["mcp0.wait"] = True
            try:
                while scope["path"] == "/firehose" or self.streamed < FLOOD_BYTES:
                    await send(message)
                    self.streamed += len(chunk)
                    await asyncio.sleep(0)  # let the transport write what the client takes
            except ConnectionResetError:
                self.farewell = await receive()
                self.disconnected.set()
                return
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["path"] == "/end-then-linger":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ended"})
            await self.lingering.wait()  # like a call whose SSE stream ended early
            return
        if scope["path"] == "/hold":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"held", "more_body": True})
            await self.holding.wait()  # like an open event stream
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["path"] == "/crash":
            raise RuntimeError("the app broke")
        if scope["path"] in ("/big", "/huge", "/sized"):  # one whole answer of BIG_BYTES,
            # HUGE_BYTES, or as many bytes as the query says
            size = BIG_BYTES if scope["path"] == "/big" else HUGE_BYTES
            if scope["path"] == "/sized":
                size = int(scope["query_string"])
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"b" * size})
            return
        status = 413 if len(body) > LIMIT else 200
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send(
            {
                "type": "http.response.body",
                "body": b"%s %s" % (scope["method"].encode(), body[:LIMIT]),
            }
        )


@contextlib.asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[HttpServer, EchoApp, asyncio.Task[None]]]:
    """An EchoApp served on a free port; stopped on exit unless the body already stopped it."""
    app = EchoApp()
    server = HttpServer(app, "127.0.0.1", 0, max_body_bytes=LIMIT, **options)
    task = asyncio.create_task(server.run())
    with anyio.fail_after(TIMEOUT_S):
        while server._server is None:
            await asyncio.sleep(0.01)
    try:
        yield server, app, task
    finally:
        server.stop()
        with anyio.fail_after(TIMEOUT_S):
            await task


@pytest.fixture
async def served() -> AsyncIterator[tuple[HttpServer, EchoApp]]:
    async with serving() as (server, app, _):
        yield server, app


@contextlib.asynccontextmanager
async def connect(
    server: HttpServer,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    with anyio.fail_after(TIMEOUT_S):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int((await reader.readline()).strip(), 16)
                if size == 0:
                    await reader.readline()
                    break
                body += await reader.readexactly(size)
                await reader.readline()
        else:
            body = await reader.read()
    return status, headers, body


async def read_closing_response(reader: asyncio.StreamReader, status: int) -> bytes:
    """A response with ``status`` after which the server closes the connection; its body."""
    got, headers, body = await read_response(reader)
    assert got == status
    assert headers["connection"] == "close"
    with anyio.fail_after(TIMEOUT_S):
        assert await reader.read() == b""  # the server closed it
    return body


async def read_refusal(reader: asyncio.StreamReader, status: int) -> bytes:
    """As :func:`read_closing_response`, for a refusal while the client was still sending: the
    close may come as a reset (unread bytes at the server), after the answer."""
    got, headers, body = await read_response(reader)
    assert got == status
    assert headers["connection"] == "close"
    with anyio.fail_after(TIMEOUT_S), contextlib.suppress(ConnectionResetError):
        assert await reader.read() == b""
    return body


async def test_keep_alive_serves_several_requests_on_one_connection(served: Any) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        for i in range(3):
            body = b"ping %d" % i
            writer.write(
                b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            status, headers, answer = await read_response(reader)
            assert (status, answer) == (200, b"POST " + body)
            assert "date" in headers


async def test_past_max_connections_a_new_connection_is_closed_and_the_open_ones_served() -> None:
    # 1,100 connections trickling a byte a second took every descriptor of a server with
    # the default `ulimit -n` 1024: /healthz, new calls, worker restarts and policy reloads
    # all failed (found by review)
    async with serving(max_connections=3) as (server, _, _task):
        async with contextlib.AsyncExitStack() as stack:
            held = [await stack.enter_async_context(connect(server)) for _ in range(3)]
            with anyio.fail_after(TIMEOUT_S):
                while len(server.connections) < 3:
                    await asyncio.sleep(0.01)
            async with connect(server) as (reader, _):
                with anyio.fail_after(TIMEOUT_S):
                    assert await reader.read() == b""  # closed at once
            assert server.refused_connections == 1
            reader, writer = held[0]
            writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
            assert (await read_response(reader))[0] == 200
        with anyio.fail_after(TIMEOUT_S):
            while server.connections:
                await asyncio.sleep(0.01)
        async with connect(server) as (reader, writer):  # room again
            writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
            assert (await read_response(reader))[0] == 200


def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The server's and a client's context for a self-signed certificate of 127.0.0.1."""
    cert, key = self_signed_certificate(tmp_path)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    return server_side, ssl.create_default_context(cafile=str(cert))


# The server runs on uvloop; its SSL layer is its own
TLS_LOOPS = pytest.mark.parametrize(
    "anyio_backend", [("asyncio", {}), ("asyncio", {"use_uvloop": True})], ids=["asyncio", "uvloop"]
)


@TLS_LOOPS
async def test_connections_in_their_tls_handshake_count_against_max_connections(
    tmp_path: Path,
) -> None:
    # With create_server(ssl=...), a connection was counted only once its handshake ended:
    # connections that never began one held descriptors past the limit (found by review)
    server_side, client_side = tls_contexts(tmp_path)
    async with serving(max_connections=2, tls=server_side) as (server, _, _task):
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(2):  # TCP only: no handshake, ever
                await stack.enter_async_context(connect(server))
            with anyio.fail_after(TIMEOUT_S):
                while server.open_connections < 2:
                    await asyncio.sleep(0.01)
            async with connect(server) as (reader, _):
                with anyio.fail_after(TIMEOUT_S):
                    assert await reader.read() == b""  # refused at once, before any TLS
            assert server.refused_connections == 1
        with anyio.fail_after(TIMEOUT_S):
            while server.open_connections:
                await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client_side, server_hostname="127.0.0.1"
        )
        try:  # and HTTPS is served as before
            writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
            status, _, answer = await read_response(reader)
            assert (status, answer) == (200, b"POST hi")
        finally:
            writer.close()


@TLS_LOOPS
async def test_a_request_sent_with_the_end_of_the_tls_handshake_is_answered(
    tmp_path: Path,
) -> None:
    # TLS 1.3: the client's last handshake message and its first request in one segment.
    # The server's SSL layer hands the request on before start_tls returns: it must be
    # answered over TLS (the first try at start_tls answered it in plain text, or not at all)
    server_side, client_side = tls_contexts(tmp_path)
    async with serving(tls=server_side) as (server, _, _task):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_side.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        try:
            with anyio.fail_after(TIMEOUT_S):
                while True:
                    try:
                        tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        writer.write(outgoing.read())
                        data = await reader.read(1 << 16)
                        assert data, "the server closed the connection in the handshake"
                        incoming.write(data)
                assert tls.version() == "TLSv1.3"
                tls.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
                writer.write(outgoing.read())  # Finished and the request together
                answer = b""
                while not answer.endswith(b"POST hi"):
                    data = await reader.read(1 << 16)
                    assert data, f"the connection closed after {answer!r}"
                    incoming.write(data)
                    with contextlib.suppress(ssl.SSLWantReadError):
                        while True:
                            answer += tls.read(1 << 16)
            assert answer.startswith(b"HTTP/1.1 200 ")
        finally:
            writer.close()


class SlowTlsReader:
    """A TLS client over a socket with a small receive buffer, which takes its answer a
    little at a time: what it has not read stays with the server."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 10)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")

    async def _exchange(self) -> None:
        """Send what TLS has to send; take one piece (at most 8 KiB) from the socket."""
        loop = asyncio.get_running_loop()
        if pending := self.outgoing.read():
            await loop.sock_sendall(self.sock, pending)
        data = await loop.sock_recv(self.sock, 8 << 10)
        if not data:
            raise ConnectionResetError("the server closed the connection")
        self.incoming.write(data)

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                await self._exchange()

    async def send(self, data: bytes) -> None:
        self.tls.write(data)
        await asyncio.get_running_loop().sock_sendall(self.sock, self.outgoing.read())

    async def read(self, pause_s: float = 0.0) -> bytes:
        """At most 8 KiB of what the connection has for it (waiting for some), after
        ``pause_s``."""
        await asyncio.sleep(pause_s)
        while True:
            try:
                data = self.tls.read(8 << 10)
            except ssl.SSLWantReadError:
                await self._exchange()
                continue
            if not data:
                raise ConnectionResetError("the server ended the TLS session")
            return data


@TLS_LOOPS
async def test_a_slow_https_reader_of_a_large_answer_is_not_taken_for_idle(
    tmp_path: Path,
) -> None:
    # The keep-alive timeout closed a connection whose client was still reading a large
    # answer over TLS (the transport's buffer showed none of it: the layer under TLS held
    # it), and the TLS shutdown's timeout then cut the answer off (found by review). A
    # reader that pauses is dropped only after stream_stall_s, as a stream's is.
    server_side, client_side = tls_contexts(tmp_path)
    keepalive_s = 0.2
    options = {"tls": server_side, "keepalive_s": keepalive_s, "stream_stall_s": 5.0}
    async with serving(**options) as (server, _, _task):
        client = SlowTlsReader(server.port, client_side)
        try:
            with anyio.fail_after(TIMEOUT_S):
                await client.handshake()
                await client.send(b"GET /huge HTTP/1.1\r\nHost: h\r\n\r\n")
                answer, started = b"", asyncio.get_running_loop().time()
                while len(answer) < HUGE_BYTES:
                    answer += await client.read(pause_s=0.006)  # slowly
                    if len(answer) >= HUGE_BYTES // 2 > len(answer) - (8 << 10):
                        await asyncio.sleep(3 * keepalive_s)  # and with a pause
                # the read outlasted the keep-alive timeout
                assert asyncio.get_running_loop().time() - started > 2 * keepalive_s
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                while len(body) < HUGE_BYTES:
                    body += await client.read()
                assert body == b"b" * HUGE_BYTES
                # the connection was kept for the next request
                await client.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
                assert (await client.read()).endswith(b"POST hi")
        finally:
            client.sock.close()


@TLS_LOOPS
async def test_max_connections_holds_for_https_too(tmp_path: Path) -> None:
    server_side, client_side = tls_contexts(tmp_path)

    async def https() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client_side, server_hostname="127.0.0.1"
        )

    async def served(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
        with anyio.fail_after(TIMEOUT_S):
            return (await read_response(reader))[0] == 200

    async with serving(max_connections=1, tls=server_side) as (server, _, _task):
        first = await https()
        assert await served(*first)
        with pytest.raises((ConnectionError, ssl.SSLError)):  # closed before its handshake
            with anyio.fail_after(TIMEOUT_S):
                await https()
        assert server.refused_connections == 1
        first[1].close()
        with anyio.fail_after(TIMEOUT_S):
            while server.connections:
                await asyncio.sleep(0.01)
        third = await https()
        assert await served(*third)
        third[1].close()


def test_the_server_takes_the_open_files_its_hard_limit_allows() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        assert raise_open_files_limit() == hard
        assert default_max_connections() == (
            100_000 if hard == resource.RLIM_INFINITY else max(hard - FD_RESERVE, 16)
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_pipelined_requests_are_answered_in_order(served: Any) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(
            b"".join(
                b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n%d" % i for i in range(5)
            )
        )
        answers = [(await read_response(reader))[2] for _ in range(5)]
        assert answers == [b"POST %d" % i for i in range(5)]


async def test_the_next_request_is_served_once_the_response_ended_though_its_app_runs_on(
    served: Any,
) -> None:
    server, app = served
    async with connect(server) as (reader, writer):
        writer.write(b"GET /end-then-linger HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await read_response(reader))[2] == b"ended"
        writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nnext")
        assert (await read_response(reader))[2] == b"POST next"
    app.lingering.set()


async def test_a_bad_request_pipelined_behind_a_good_one_is_refused_after_its_answer(
    served: Any,
) -> None:
    # The 400 closed the connection at once, and the call before it ran with its answer lost
    # (found by review): it is answered, then the bad one is refused (RFC 9112 9.3.2)
    server, app = served
    good = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"
    for bad in (
        b"this is not HTTP\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: h\r\nHost: i\r\nContent-Length: 0\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: h\r\nX: " + b"y" * (MAX_HEADER_BYTES + 1) + b"\r\n\r\n",
    ):
        async with connect(server) as (reader, writer):
            writer.write(good + good + bad + good)
            for _ in range(2):
                assert (await read_response(reader))[::2] == (200, b"POST hi")
            status, headers, _ = await read_response(reader)
            assert status in (400, 431)
            assert headers["connection"] == "close"
            with anyio.fail_after(TIMEOUT_S):
                assert await reader.read() == b""  # and what came after it is not run
    assert len(app.scopes) == 6


async def test_what_follows_a_connection_close_request_is_not_run_and_its_answer_is_sent(
    served: Any,
) -> None:
    server, app = served
    for first in (
        b"POST /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
        b"POST /x HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi",  # (1.0: closes by default)
    ):
        async with connect(server) as (reader, writer):
            writer.write(first + b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
            status, headers, body = await read_response(reader)
            assert (status, body, headers["connection"]) == (200, b"POST hi", "close")
            with anyio.fail_after(TIMEOUT_S):
                assert await reader.read() == b""
    assert [scope["method"] for scope in app.scopes] == ["POST", "POST"]


async def test_pipelined_requests_wait_while_their_client_reads_no_answers() -> None:
    # Each answer of a client that never read was held: 20,000 pipelined requests took
    # 180 MB (found by review). The next request waits for the client to read.
    async with serving(max_stream_backlog=256 << 10) as (server, app, _task):
        count = 1000  # 64 MiB of answers
        async with connect(server) as (reader, writer):
            writer.write(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n" * count)
            with anyio.fail_after(TIMEOUT_S):
                while not any(conn.stalled_since for conn in server.connections):
                    await asyncio.sleep(0.01)
            (conn,) = server.connections
            assert conn.transport is not None
            assert conn.transport.get_write_buffer_size() <= (256 << 10) + BIG_BYTES
            assert len(app.scopes) < count / 4  # (the rest in the sockets' buffers)
            for _ in range(count):  # it reads: all are answered
                assert (await read_response(reader))[0] == 200
        assert len(app.scopes) == count


async def test_a_client_that_reads_no_answers_is_dropped_after_the_stall_limit() -> None:
    async with (
        serving(max_stream_backlog=64 << 10, stream_stall_s=0.5) as (server, _, _task),
        connect(server) as (_, writer),
    ):
        writer.write(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n" * 1000)
        with anyio.fail_after(TIMEOUT_S):
            while not any(conn.stalled_since for conn in server.connections):
                await asyncio.sleep(0.01)
        with anyio.fail_after(TIMEOUT_S):  # 0.5 s, seen by the reaper within 2.5 s
            while server.connections:
                await asyncio.sleep(0.05)


async def test_answers_left_unread_past_the_server_s_bound_drop_the_oldest_first() -> None:
    # Each whole answer a client leaves unread stays in the server's memory until the stall
    # limit: ten unread 25 MiB answers held 250 MB (found by a bug hunt). Past the bound for
    # all connections together, those that left theirs unread longest are dropped.
    size = 16 << 20
    async with serving(max_stream_backlog=64 << 10, max_unread_bytes=40 << 20) as (
        server,
        _,
        _task,
    ):
        clients = []
        try:
            for i in range(5):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (takes little)
                sock.connect(("127.0.0.1", server.port))
                sock.setblocking(False)
                reader, writer = await asyncio.open_connection(sock=sock)
                clients.append((reader, writer))
                writer.write(b"GET /sized?%d HTTP/1.1\r\nHost: h\r\n\r\n" % size)
                with anyio.fail_after(TIMEOUT_S):  # its answer written, unread
                    while len(server.stalled) + server.unread_drops < i + 1:
                        await asyncio.sleep(0.01)
            unread = sum(c.transport.get_write_buffer_size() for c in server.stalled if c.transport)
            assert unread <= 40 << 20
            assert server.unread_drops >= 2  # (five of ~16 MiB: at most two fit)
            # the first two were left unread longest: dropped, the last kept
            first_reader = clients[0][0]
            with anyio.fail_after(TIMEOUT_S), contextlib.suppress(ConnectionResetError):
                while await first_reader.read(1 << 20):
                    pass
            assert clients[-1][1].transport.get_extra_info("socket") is not None
            assert any(c.client is not None and not c.closed for c in server.stalled)
            async with connect(server) as (reader, writer):  # others are served
                writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
                assert (await read_response(reader))[0] == 200
        finally:
            for _, writer in clients:
                writer.close()


async def test_requests_pipelined_behind_a_long_response_are_not_read_ahead(
    served: Any,
) -> None:
    server, app = served
    count, size = 40, 1 << 20  # 40 MiB: far past what the socket buffers take
    async with connect(server) as (reader, writer):
        writer.write(b"GET /hold HTTP/1.1\r\nHost: h\r\n\r\n")
        with anyio.fail_after(TIMEOUT_S):
            await reader.readuntil(b"held")
        for i in range(count):
            body = b"%03d" % i + b"x" * (size - 3)
            writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size)
            writer.write(body)
        (conn,) = server.connections
        with anyio.fail_after(TIMEOUT_S):
            while not conn.queue:
                await asyncio.sleep(0.01)
        # The server stopped reading: the client cannot hand it the rest of its bytes.
        with anyio.move_on_after(0.5) as waited:
            await writer.drain()
        assert waited.cancelled_caught
        assert len(conn.queue) == 1
        assert writer.transport.get_write_buffer_size() > 0
        app.holding.set()
        with anyio.fail_after(TIMEOUT_S):
            await reader.readuntil(b"\r\n0\r\n\r\n")  # the end of the held stream
            await writer.drain()
        answers = [await read_response(reader) for _ in range(count)]
        # each body is over the limit: 413, echoing the start of the body in order
        assert [(s, a[5:8]) for s, _, a in answers] == [(413, b"%03d" % i) for i in range(count)]


async def test_a_chunked_request_body_is_joined(served: Any) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        assert (await read_response(reader))[2] == b"POST abcde"


async def test_a_streamed_response_is_chunked_and_arrives_whole(served: Any) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n")
        _, headers, body = await read_response(reader)
        assert headers["transfer-encoding"] == "chunked"
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_a_body_over_the_limit_is_cut_so_the_app_can_refuse_it(served: Any) -> None:
    server, _app = served
    async with connect(server) as (reader, writer):
        big = b"x" * (LIMIT * 100)
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
        )
        status, _, _ = await read_response(reader)
        assert status == 413


async def test_malformed_requests_and_huge_headers_are_refused(served: Any) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await read_closing_response(reader, 400)
    async with connect(server) as (reader, writer):
        writer.write(b"GET /x HTTP/1.1\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n")
        assert (await read_response(reader))[0] == 431


async def test_a_request_without_exactly_one_host_is_refused(served: Any) -> None:
    server, _ = served
    for head in (b"GET /x HTTP/1.1\r\n", b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n"):
        async with connect(server) as (reader, writer):
            writer.write(head + b"\r\n")
            assert b"Host" in await read_closing_response(reader, 400)
    async with connect(server) as (reader, writer):  # HTTP/1.0 had no Host
        writer.write(b"GET /x HTTP/1.0\r\n\r\n")
        assert (await read_response(reader))[0] == 200


async def test_an_absolute_form_target_gives_its_path_and_its_authority_as_host(
    served: Any,
) -> None:
    server, app = served
    async with connect(server) as (reader, writer):
        writer.write(b"GET HTTP://h:1/api/v1/audit?after=3 HTTP/1.1\r\nHost: other\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        writer.write(b"GET http://h:1 HTTP/1.1\r\nHost: h:1\r\n\r\n")
        assert (await read_response(reader))[0] == 200
    first, second = app.scopes[-2:]
    assert (first["path"], first["query_string"]) == ("/api/v1/audit", b"after=3")
    assert [v for k, v in first["headers"] if k == b"host"] == [b"h:1"]
    assert (second["path"], second["query_string"]) == ("/", b"")
    for target in (b"ftp://h/x", b"http://user@h/x"):
        async with connect(server) as (reader, writer):
            writer.write(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % target)
            assert b"target" in await read_closing_response(reader, 400), target


async def test_connection_close_is_honoured(served: Any) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        await read_closing_response(reader, 200)


async def test_the_app_hears_the_client_go(served: Any) -> None:
    server, app = served
    async with connect(server) as (reader, writer):
        writer.write(b"GET /wait-disconnect HTTP/1.1\r\nHost: h\r\n\r\n")
        with anyio.fail_after(TIMEOUT_S):
            await reader.readuntil(b"hello")
    # the client has closed its end
    with anyio.fail_after(TIMEOUT_S):
        await app.disconnected.wait()


async def test_an_app_failure_is_a_500_and_the_server_goes_on(served: Any) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(b"GET /crash HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await read_response(reader))[0] == 500
    async with connect(server) as (reader, writer):
        writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await read_response(reader))[0] == 200


async def test_the_scope_carries_path_query_and_lowercased_headers(served: Any) -> None:
    server, app = served
    async with connect(server) as (reader, writer):
        writer.write(b"GET /api/v1/audit?after=3 HTTP/1.1\r\nHost: h\r\nX-Thing: Yes\r\n\r\n")
        await read_response(reader)
        scope = app.scopes[-1]
        assert scope["path"] == "/api/v1/audit"
        assert scope["query_string"] == b"after=3"
        assert (b"x-thing", b"Yes") in scope["headers"]
        assert scope["client"][0] == "127.0.0.1"


async def test_the_scope_path_is_percent_decoded_as_asgi_says(served: Any) -> None:
    server, app = served
    async with connect(server) as (reader, writer):
        writer.write(b"GET /ab%20c/%C3%A4%3F?x=%2F HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await read_response(reader))[0] == 200
    scope = app.scopes[-1]
    assert scope["path"] == "/ab c/\u00e4?"
    assert scope["raw_path"] == b"/ab%20c/%C3%A4%3F"
    assert scope["query_string"] == b"x=%2F"


async def test_an_encoded_slash_or_unreserved_character_in_the_path_is_404(served: Any) -> None:
    # /api%2Fv1/agents was routed as /api/v1/agents, and /%61pi/v1/agents too, past a
    # proxy's rule for /api/v1/ that matches raw paths (found by reviews); no URI encodes
    # a letter, digit or -._~ (RFC 3986 2.3)
    server, app = served
    paths = [b"/api%2Fv1/agents", b"/mcp%2f", b"/%61pi/v1/agents", b"/api/v%31/agents"]
    paths += [b"/api/v1/%2E%2e/x", b"/m%43p", b"/x%5Fy", b"/x%7e", b"/x%2d", b"/%5A%7A"]
    for path in paths:
        async with connect(server) as (reader, writer):
            writer.write(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % path)
            assert b"encoded slash, letter" in await read_closing_response(reader, 404), path
    assert app.scopes == []


async def test_stopping_ends_a_waiting_stream_without_waiting_out_the_grace() -> None:
    async with serving() as (server, app, task), connect(server) as (reader, writer):
        writer.write(b"GET /wait-disconnect HTTP/1.1\r\nHost: h\r\n\r\n")
        with anyio.fail_after(TIMEOUT_S):
            await reader.readuntil(b"hello")
        server.stop()
        with anyio.fail_after(2):  # well under the 5 s grace
            await task
    assert app.disconnected.is_set()


# A live send is dropped at once past the backlog; one that may wait, after the stall time.
@pytest.mark.parametrize("target", [b"/firehose", b"/firehose?wait"])
async def test_a_stream_the_client_does_not_read_is_dropped(target: bytes) -> None:
    async with serving(stream_stall_s=0.5) as (server, app, _), connect(server) as (_, writer):
        writer.write(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % target)
        with anyio.fail_after(TIMEOUT_S):
            await app.disconnected.wait()  # the app heard it go, having sent a bounded amount
    # the socket buffers take a few MiB, the server holds at most MAX_STREAM_BACKLOG more
    assert app.streamed < 64 << 20
    # the app hears that the server dropped it (not that the client left)
    assert app.farewell["type"] == "http.disconnect"
    assert app.farewell["mcp0.dropped"] is True


async def test_a_stream_goes_at_the_pace_of_a_client_that_reads() -> None:
    async with serving(stream_stall_s=5.0) as (server, app, _), connect(server) as (reader, writer):
        writer.write(b"GET /flood HTTP/1.1\r\nHost: h\r\n\r\n")
        got = 0
        with anyio.fail_after(TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"transfer-encoding: chunked" in head
            tail = b""
            while not tail.endswith(b"\r\n0\r\n\r\n"):
                data = await reader.read(64 << 10)
                assert data, "the server dropped the stream"
                got += len(data)
                tail = (tail + data)[-16:]
                # a reader slower than the server writes: the stream waits for it
                await asyncio.sleep(0.001)
    assert got >= FLOOD_BYTES
    assert app.streamed == FLOOD_BYTES
    assert not app.disconnected.is_set()


async def test_a_request_trickling_in_past_the_deadline_is_408_and_closed() -> None:
    async with serving(request_read_s=0.5) as (server, app, _):
        async with connect(server) as (reader, writer):

            async def trickle() -> None:  # never silent for long, never finished in time
                for byte in b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n":
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.05)

            trickling = asyncio.create_task(trickle())
            body = await read_closing_response(reader, 408)
            trickling.cancel()
            assert body == b"the request did not arrive in time"
        assert app.scopes == []  # the app never saw the partial request
        # a request that arrives whole in time is served as before
        async with connect(server) as (reader, writer):
            writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok")
            assert (await read_response(reader))[:1] == (200,)


@pytest.mark.parametrize("expect", [b"100-continue", b"100-Continue"])  # any case (RFC 9110)
async def test_expect_100_continue_is_answered_before_the_body(served: Any, expect: bytes) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: %s\r\n\r\n" % expect
        )
        with anyio.fail_after(TIMEOUT_S):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"body")
        assert (await read_response(reader))[2] == b"POST body"


async def test_expect_100_continue_from_http_1_0_gets_no_100(served: Any) -> None:
    # HTTP/1.0 knows no 1xx: it took the 100 for the answer (RFC 9110 10.1.1, 15.2)
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(b"POST /x HTTP/1.0\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        await asyncio.sleep(0.1)  # (it would have been written by now)
        writer.write(b"body")
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"POST body")


async def test_expect_100_continue_is_answered_for_a_body_the_app_does_not_keep() -> None:
    # Neither 100 nor the final status came for it: the client waited (RFC 9110 10.1.1 asks
    # for one of them; found by review)
    async with served_by(VettingApp()) as server, connect(server) as (reader, writer):
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: h\r\nX-Key: no\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        with anyio.fail_after(TIMEOUT_S):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"body")  # parsed and dropped
        assert (await read_response(reader))[::2] == (200, b"POST ")


@pytest.mark.parametrize("version", [b"HTTP/0.9", b"HTTP/2.0"])
async def test_a_request_of_another_http_version_is_505(served: Any, version: bytes) -> None:
    # Answered as 1.1: chunked and kept alive, which such a client may not know (RFC 9112 6.1)
    server, app = served
    async with connect(server) as (reader, writer):
        writer.write(b"GET /x %s\r\nHost: h\r\n\r\n" % version)
        assert b"HTTP/1.1" in await read_closing_response(reader, 505)
    assert app.scopes == []


async def test_an_http_1_0_request_with_transfer_encoding_is_400(served: Any) -> None:
    # RFC 9112 6.1: its framing is faulty, a smuggling defence; it was decoded as chunked
    server, app = served
    async with connect(server) as (reader, writer):
        writer.write(
            b"POST /x HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\n\r\nGET /x HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        assert b"Transfer-Encoding" in await read_closing_response(reader, 400)
    assert app.scopes == []


async def test_an_http_1_0_client_that_asks_to_keep_alive_is_told_it_is(served: Any) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        for _ in range(2):
            writer.write(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, _ = await read_response(reader)
            assert (status, headers["connection"]) == (200, "keep-alive")


async def test_the_servers_own_refusals_carry_a_date_and_a_reason(served: Any) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n")
        with anyio.fail_after(TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 Not Implemented\r\n")
    assert b"\r\ndate: " in head


async def test_a_head_answer_has_no_body(served: Any) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\n")
        with anyio.fail_after(TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-length: 5" in head  # what a GET would carry ("HEAD ")
        writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")  # the connection is still in sync
        assert (await read_response(reader))[2] == b"GET "


async def test_100_continue_is_not_written_into_another_response(served: Any) -> None:
    server, app = served
    async with connect(server) as (reader, writer):
        writer.write(b"GET /hold HTTP/1.1\r\nHost: h\r\n\r\n")
        with anyio.fail_after(TIMEOUT_S):
            await reader.readuntil(b"held")
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        await asyncio.sleep(0.2)  # it would have been written by now
        app.holding.set()
        with anyio.fail_after(TIMEOUT_S):
            rest = await reader.readuntil(b"\r\n0\r\n\r\n")  # the end of the held stream
        assert b"100 Continue" not in rest
        writer.write(b"body")  # as a client does once its wait for 100 is over
        assert (await read_response(reader))[2] == b"POST body"


async def test_expect_100_continue_for_a_body_past_the_limit_is_413_at_once(
    served: Any,
) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 999999999\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        with anyio.fail_after(TIMEOUT_S):
            assert (await read_closing_response(reader, 413)).startswith(b"the request body")


async def test_an_upgrade_request_is_answered_as_http_1_1_and_the_connection_closed(
    served: Any,
) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(
            b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        )
        with anyio.fail_after(TIMEOUT_S):
            status, headers, body = await read_response(reader)
            assert (status, body) == (200, b"GET ")
            assert headers.get("connection") == "close"
            assert await reader.read() == b""  # closed after it


async def test_a_transfer_coding_other_than_chunked_is_501(served: Any) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
        )
        with anyio.fail_after(TIMEOUT_S):
            assert b"chunked" in await read_closing_response(reader, 501)


async def test_a_request_head_past_64_kib_is_431_while_it_arrives(served: Any) -> None:
    server, app = served
    starts = (
        (b"GET /", 414),  # a URL that never ends
        (b"GET /x HTTP/1.1\r\nHost: h\r\nX-Big: ", 431),  # a header value that never ends
    )
    for start, status in starts:
        async with connect(server) as (reader, writer):
            writer.write(start)
            for _ in range(4):  # 4 x 32 KiB, and no end: the server answers without one
                writer.write(b"a" * (32 << 10))
            assert b"64 KiB" in await read_refusal(reader, status)
    async with connect(server) as (reader, writer):  # trailer fields that never end
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Big: "
        )
        for _ in range(32):  # (what came with the body is counted from the next read on)
            writer.write(b"a" * (32 << 10))
        assert b"trailer fields" in await read_refusal(reader, 431)
    async with connect(server) as (reader, writer):  # a whole request, not a header in it
        writer.write(b"GET /x?%s HTTP/1.0\r\n\r\n" % (b"v" * (70 << 10)))
        assert b"64 KiB" in await read_closing_response(reader, 414)
    assert app.scopes == []
    async with connect(server) as (reader, writer):  # under the limit: served
        writer.write(b"GET /x?%s HTTP/1.1\r\nHost: h\r\n\r\n" % (b"v" * (60 << 10)))
        assert (await read_response(reader))[0] == 200


async def test_a_head_under_the_limit_is_served_after_requests_in_the_same_segment(
    served: Any,
) -> None:
    server, _ = served
    small = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n" * 2000  # 58 KiB before it
    big = b"GET /x?%s HTTP/1.1\r\nHost: h\r\n\r\n" % (b"v" * (60 << 10))
    async with connect(server) as (reader, writer):
        writer.write(small + big[:-10])  # its head unfinished at the end of what is read
        statuses = {(await read_response(reader))[0] for _ in range(2000)}
        writer.write(big[-10:])
        statuses.add((await read_response(reader))[0])
        assert statuses == {200}


async def test_a_request_head_behind_an_open_stream_has_the_same_deadline() -> None:
    async with serving(request_read_s=0.5) as (server, app, _):
        async with connect(server) as (reader, writer):
            writer.write(b"GET /hold HTTP/1.1\r\nHost: h\r\n\r\n")
            with anyio.fail_after(TIMEOUT_S):
                await reader.readuntil(b"held")

            async def trickle() -> None:  # never silent for long, never finished
                writer.write(b"GET /")
                for _ in range(200):
                    writer.write(b"a")
                    await asyncio.sleep(0.05)

            trickling = asyncio.create_task(trickle())
            with anyio.fail_after(TIMEOUT_S):
                rest = await reader.read()  # until the server closes the connection
            assert not trickling.done()  # cut off, not waited out
            trickling.cancel()
            assert b"0\r\n\r\n" not in rest  # the stream was cut with it
        app.holding.set()


async def test_trailer_fields_are_not_merged_into_the_headers(served: Any) -> None:
    server, app = served
    async with connect(server) as (reader, writer):
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nAuthorization: Bearer t\r\nHost: other\r\n\r\n"
        )
        assert (await read_response(reader))[:3:2] == (200, b"POST abc")
    names = [name for name, _ in app.scopes[-1]["headers"]]
    assert names == [b"host", b"transfer-encoding"]


async def test_a_field_that_must_come_once_and_comes_twice_is_400(served: Any) -> None:
    server, app = served
    for name in (b"Authorization", b"Mcp-Session-Id", b"MCP-Protocol-Version", b"Origin"):
        async with connect(server) as (reader, writer):
            writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\n%s: a\r\n%s: b\r\n\r\n" % (name, name))
            body = await read_closing_response(reader, 400)
            assert body == b"a request may carry only one %s header" % name.lower()
    assert app.scopes == []
    async with connect(server) as (reader, writer):  # a list-valued field may repeat
        writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\nAccept: a/b\r\nAccept: c/d\r\n\r\n")
        assert (await read_response(reader))[0] == 200


async def test_the_body_of_a_request_asking_for_an_upgrade_is_read(served: Any) -> None:
    server, _ = served
    upgrade = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AA\r\n"
    for framing, body in (
        (b"Content-Length: 9\r\n", b"some body"),
        (b"Transfer-Encoding: chunked\r\n", b"4\r\nsome\r\n5\r\n body\r\n0\r\n\r\n"),
    ):
        async with connect(server) as (reader, writer):
            writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\n" + upgrade + framing + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)  # the body in a later segment than the head, as may be
            writer.write(body + b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
            assert await read_closing_response(reader, 200) == b"POST some body"


async def test_an_http_1_0_client_gets_a_stream_unchunked_and_closed_at_its_end(
    served: Any,
) -> None:
    server, _ = served
    async with connect(server) as (reader, writer):
        writer.write(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        _, headers, body = await read_response(reader)  # read to the end of the connection
        assert "transfer-encoding" not in headers
        assert headers["connection"] == "close"
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


@contextlib.asynccontextmanager
async def served_by(app: Any) -> AsyncIterator[HttpServer]:
    """``app`` served on a free port, stopped on exit."""
    server = HttpServer(app, "127.0.0.1", 0, max_body_bytes=LIMIT)
    task = asyncio.create_task(server.run())
    try:
        with anyio.fail_after(TIMEOUT_S):
            while server._server is None:
                await asyncio.sleep(0.01)
        yield server
    finally:
        server.stop()
        with anyio.fail_after(TIMEOUT_S):
            await task


class VettingApp(EchoApp):
    """An EchoApp that keeps only the bodies of requests carrying ``X-Key: yes``."""

    def vet_body(self, scope: dict[str, Any]) -> bool:
        return (b"x-key", b"yes") in scope["headers"]


async def test_a_body_the_app_does_not_vet_is_parsed_and_dropped_not_held() -> None:
    # A client without a token had the server hold max_body_bytes per connection before the
    # app could refuse it from its headers (found by review): an app's vet_body decides, as
    # the head comes, whether the body is kept
    app = VettingApp()
    async with served_by(app) as server, connect(server) as (reader, writer):
        for key in (b"no", b"yes", b"no"):
            writer.write(
                b"POST /x HTTP/1.1\r\nHost: h\r\nX-Key: %s\r\nContent-Length: 5\r\n\r\nhello" % key
            )
            status, _, answer = await read_response(reader)
            assert status == 200
            assert answer == (b"POST hello" if key == b"yes" else b"POST ")
    assert [s.get("mcp0.body_withheld", False) for s in app.scopes] == [True, False, True]


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
async def test_port_0_on_several_addresses_is_one_port_on_all(tmp_path: Path, https: bool) -> None:
    # Each address was given a port of its own, and only the first one's was announced: a
    # client of localhost's other address found nothing there (found by review)
    server_side, client_side = tls_contexts(tmp_path)
    server = HttpServer(
        EchoApp(),
        ["127.0.0.1", "::1"],
        0,
        max_body_bytes=LIMIT,
        tls=server_side if https else None,
    )
    task = asyncio.create_task(server.run())
    try:
        with anyio.fail_after(TIMEOUT_S):
            while server._server is None:
                await asyncio.sleep(0.01)
        assert server._server is not None
        listening = {sock.getsockname()[:2] for sock in server._server.sockets}
        assert listening == {("127.0.0.1", server.port), ("::1", server.port)}
        tls = {"ssl": client_side, "server_hostname": "127.0.0.1"} if https else {}
        reader, writer = await asyncio.open_connection("::1", server.port, **tls)
        try:
            writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
            status, _, answer = await read_response(reader)
            assert (status, answer) == (200, b"POST hi")
        finally:
            writer.close()
    finally:
        server.stop()
        with anyio.fail_after(TIMEOUT_S):
            await task
