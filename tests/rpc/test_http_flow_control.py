"""Flow control of event streams: a client that reads gets every message of a call however
much the call sends, and only one that stops reading is dropped; the call then goes on."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import orjson
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from rpc_live import (
    CHATTY_DIR,
    FAULTY_DIR,
    Env,
    LiveServer,
    McpHttp,
    make_runtime,
    parse_sse_text,
    serve,
    served_agent,
)

from mcp_zero.rpc import streams

pytestmark = pytest.mark.anyio
TIMEOUT_S = 60.0
STALL_S = 0.5
# 16 MB of log messages: four times what the server may hold unsent for one stream
FLOOD = {"n": 2000, "size": 8000}


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    data = tmp_path_factory.mktemp("flow-control") / "data"
    async with served_agent(data, "chatter", [CHATTY_DIR]) as served:
        yield served


@pytest.fixture(scope="module")
async def stalling(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    """The same, where a client that reads nothing for STALL_S is dropped."""
    data = tmp_path_factory.mktemp("flow-control-stall") / "data"
    options = {"stream_stall_s": STALL_S}
    async with served_agent(data, "chatter", [CHATTY_DIR], options) as served:
        yield served


def outcomes(live: LiveServer, request_id: str) -> list[str]:
    """The audited outcomes of the tools/call with this JSON-RPC id."""
    found = []
    for entry in live.runtime.store.read_audit(0, 1_000_000):
        record = orjson.loads(entry.body)
        if record.get("request_id") == request_id:
            found.append(record["outcome"])
    return found


async def audited(live: LiveServer, request_id: str) -> list[str]:
    """The call's audited outcomes, once there are any (bounded wait)."""
    with anyio.fail_after(TIMEOUT_S):
        while not (found := outcomes(live, request_id)):
            await asyncio.sleep(0.05)
    return found


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_client_that_reads_gets_the_result_of_a_flood_and_its_messages_in_order(
    env: Env, mode: str
) -> None:
    got: list[int] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        got.append(params.data["i"])

    async with httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {env.token}"}, timeout=TIMEOUT_S
    ) as http:
        with anyio.fail_after(TIMEOUT_S):
            async with Client(
                streamable_http_client(env.live.url, http_client=http),
                mode=mode,
                logging_callback=on_log,
                log_level=None if mode == "legacy" else "info",
            ) as client:
                result = await client.call_tool("chatty_logs", FLOOD)
    assert not result.is_error
    assert isinstance(result.content[0], types.TextContent)
    assert result.content[0].text == "logged 2000"
    # those sent while the client had over 4 MiB unread were skipped (the call's relay
    # does not wait for a client); what came, came in order
    assert got
    assert got == sorted(set(got))


def _post_and_stop_reading(
    live: LiveServer, token: str, message: dict[str, Any], **headers: str
) -> socket.socket:
    """A POST on a socket with a small receive buffer that is then never read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", live.port))
    body = orjson.dumps(message)
    head = (
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        "Accept: application/json, text/event-stream\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


async def test_a_2026_client_that_stops_reading_is_dropped_and_the_call_goes_on(
    stalling: Env,
) -> None:
    env = stalling
    message = {
        "jsonrpc": "2.0",
        "id": "stalled-2026",
        "method": "tools/call",
        "params": {
            "name": "chatty_logs",
            "arguments": FLOOD,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "stalled", "version": "0"},
                "io.modelcontextprotocol/logLevel": "info",
            },
        },
    }
    sock = _post_and_stop_reading(
        env.live,
        env.token,
        message,
        **{
            "MCP-Protocol-Version": "2026-07-28",
            "Mcp-Method": "tools/call",
            "Mcp-Name": "chatty_logs",
        },
    )
    try:
        # the server drops the connection it could not write to; that is no cancellation
        assert await audited(env.live, "stalled-2026") == ["allowed"]
    finally:
        sock.close()


async def _flood_unread(env: Env, request_id: str) -> tuple[McpHttp, socket.socket]:
    """A session whose client asks for log messages, then calls the flooding tool and reads
    nothing of the answer: the session's client and the socket that carries that call."""
    client = env.live.client(env.token)
    await client.initialize()
    assert client.session_id is not None
    await client.post(
        {"jsonrpc": "2.0", "id": 0, "method": "logging/setLevel", "params": {"level": "info"}}
    )
    message = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": "chatty_logs", "arguments": FLOOD},
    }
    sock = _post_and_stop_reading(
        env.live, env.token, message, **{"Mcp-Session-Id": client.session_id}
    )
    return client, sock


async def test_a_resumable_stream_whose_client_stops_reading_keeps_the_result(
    stalling: Env,
) -> None:
    env = stalling
    client, sock = await _flood_unread(env, "stalled-2025")
    try:
        assert await audited(env.live, "stalled-2025") == ["allowed"]
        # what the client's connection took before it was dropped, up to the first event id
        with anyio.fail_after(TIMEOUT_S):
            received = await asyncio.to_thread(sock.recv, 4096)
        first = received.split(b"\nid: ", 1)[1].split(b"\n", 1)[0].decode()
    finally:
        sock.close()
    # the resume replays what was kept (megabytes) at the pace of a client with a small window
    with anyio.fail_after(TIMEOUT_S):
        resumed = await asyncio.to_thread(
            _get_whole,
            env.live,
            {**client.headers(), "Accept": "text/event-stream", "Last-Event-ID": first},
        )
    assert resumed.startswith(b"HTTP/1.1 200")
    body = _dechunked(resumed.split(b"\r\n\r\n", 1)[1])
    events = [e for e in parse_sse_text(body.decode()) if e.data]
    assert len(events) > 100
    assert events[-1].message["id"] == "stalled-2025"
    assert events[-1].message["result"]["content"][0]["text"] == "logged 2000"


def _get_whole(live: LiveServer, headers: dict[str, str]) -> bytes:
    """GET /mcp on a socket with a small receive buffer, read to the end of the stream."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(TIMEOUT_S)
        sock.connect(("127.0.0.1", live.port))
        head = f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        sock.sendall(head.encode() + b"\r\n")
        received = bytearray()
        while not received.endswith(b"\r\n0\r\n\r\n"):
            data = sock.recv(65536)
            assert data, "the server dropped the stream"
            received += data
        return bytes(received)


def _dechunked(body: bytes) -> bytes:
    out, rest = bytearray(), body
    while True:
        size, rest = rest.split(b"\r\n", 1)
        if int(size, 16) == 0:
            return bytes(out)
        out += rest[: int(size, 16)]
        rest = rest[int(size, 16) + 2 :]


async def test_a_client_that_does_not_read_holds_up_no_call_nor_its_own_slot(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    # (the default stall, 30 s, is longer than this test: the client is not dropped)
    client, sock = await _flood_unread(env, "waiting")
    try:
        with anyio.fail_after(TIMEOUT_S):
            while "skipping its progress and log messages" not in caplog.text:
                await asyncio.sleep(0.05)
        # its progress and log messages are skipped while the client reads nothing: the
        # call ends (audited, its plugin slot and quota given back) though its answer waits
        # for the client; other calls, of the same plugin too, go on meanwhile
        assert await audited(env.live, "waiting") == ["allowed"]
        reply = await client.call("chatty_progress", {"steps": 3})
        assert reply["result"]["content"][0]["text"] == "done 3"
        assert env.live.runtime.quotas.total_inflight == 0
    finally:
        sock.close()
    session = env.live.app.sessions[client.session_id]
    (stream,) = [s for s in session.streams.values() if s is not session.notices]
    assert stream.count == FLOOD["n"] + 1  # all kept for a resume, up to the byte bound


async def test_a_finished_stream_kept_for_resumption_holds_at_most_its_byte_bound(
    env: Env,
) -> None:
    client = env.live.client(env.token)
    await client.initialize()
    assert client.session_id is not None
    # 300 log messages of 40 KB: 12 MB (a progress token, copied into each progress
    # message, did this too before tokens were bounded to 256 characters)
    reply = await client.request(
        "tools/call", {"name": "chatty_logs", "arguments": {"n": 300, "size": 40_000}}
    )
    assert reply["result"]["content"][0]["text"] == "logged 300"
    session = env.live.app.sessions[client.session_id]
    (stream,) = session.streams.values()  # kept a minute for a client about to resume
    assert stream.count == 301
    assert sum(map(len, stream.events)) <= streams.MAX_BUFFERED_BYTES
    assert b'"result"' in stream.events[-1]  # the response is always kept


async def test_a_finished_stream_without_a_session_is_not_kept(env: Env) -> None:
    client = env.live.client(env.token)  # no session: nothing could resume its stream
    before = streams.buffered_bytes()
    reply = await client.request(
        "tools/call", {"name": "chatty_logs", "arguments": {"n": 20, "size": 100_000}}
    )
    assert reply["result"]["content"][0]["text"] == "logged 20"
    with anyio.fail_after(5):  # its handler returns after the answer's last byte
        while streams.buffered_bytes() > before:
            await asyncio.sleep(0.01)


async def test_a_session_that_does_not_read_its_get_stream_holds_up_no_other_session(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Resource updates go to each subscribed session in turn. One whose GET stream is not
    # read is dropped once far behind (it resumes from the stream's buffer); it does not
    # hold up the calls of another. A small backlog only reaches "far behind" sooner.
    runtime = make_runtime(tmp_path / "data", rate_limit=0)
    runtime.plugins.install(FAULTY_DIR)
    slow_agent = await runtime.agents.spawn("slow", ["faulty"])
    busy_agent = await runtime.agents.spawn("busy", ["faulty"])
    async with serve(runtime, max_stream_backlog=8 << 10) as live:
        slow = live.client(slow_agent.token)
        await slow.initialize()
        assert "result" in await slow.request("resources/subscribe", {"uri": "faulty://counter"})
        assert slow.session_id is not None
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": slow.session_id}
        sock = _get_and_stop_reading(live, slow_agent.token, headers)
        # its server side too sends into a small socket buffer (the kernel would grow it)
        port = sock.getsockname()[1]
        with anyio.fail_after(TIMEOUT_S):
            while not (
                ours := [c for c in live.server.connections if c.client and c.client[1] == port]
            ):
                await asyncio.sleep(0.01)
        ours[0].transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        busy = live.client(busy_agent.token)
        await busy.initialize()
        try:
            for i in range(400):  # each bumps the counter: one notice to slow's stream
                with anyio.fail_after(5):
                    reply = await busy.request("tools/call", {"name": "faulty_bump"})
                assert "result" in reply, (i, reply)
        finally:
            sock.close()
    assert "dropping a stream" in caplog.text  # slow's, once far behind


def _get_and_stop_reading(live: LiveServer, token: str, headers: dict[str, str]) -> socket.socket:
    """A GET on a socket with a small receive buffer that is then never read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", live.port))
    head = (
        f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\nAuthorization: Bearer {token}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    )
    sock.sendall(head.encode())
    return sock
