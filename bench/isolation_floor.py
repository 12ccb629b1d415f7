"""The isolation floor of bench/governed_calls.py: HTTP in front of a worker process, nothing else.

mcp0 answers a tool call from a separate worker process. This server does the
least such a design can do: a raw httptools protocol on uvloop (no ASGI, no
framework) that reads each POST, sends the call's arguments to one worker
process as a JSON line on its stdin, and answers with the worker's reply. The
worker (this file with ``--worker``, on uvloop too) echoes the arguments back.
There is no MCP, no session, no authentication, no policy, no audit: paced at
the rate the MCP servers are paced at, its CPU (server plus worker) is what an
HTTP front and a process boundary cost on this machine before any governance.
Answers every call with the echo tool's result, whatever the tool asked for.

Run: python bench/isolation_floor.py --port 8768  (answers POST on any path)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
from typing import Any, cast

import httptools
import orjson
import uvloop

_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
_NOT_ALLOWED = b"HTTP/1.1 405 Method Not Allowed\r\nallow: POST\r\ncontent-length: 0\r\n\r\n"


class _Worker(asyncio.SubprocessProtocol):
    """The server's side of the worker's pipes: one JSON line per call each way."""

    def __init__(self) -> None:
        self.transport: asyncio.SubprocessTransport | None = None
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.SubprocessTransport, transport)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            reply = orjson.loads(line)
            future = self.waiting.pop(reply["id"], None)
            if future is not None and not future.done():
                future.set_result(reply)

    def call(self, arguments: Any) -> asyncio.Future[dict[str, Any]]:
        assert self.transport is not None
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[call_id] = future
        stdin = cast(asyncio.WriteTransport, self.transport.get_pipe_transport(0))
        stdin.write(orjson.dumps({"id": call_id, "arguments": arguments}) + b"\n")
        return future


class _Connection(asyncio.Protocol):
    """One client connection; requests are answered in order (wrk sends one at a time)."""

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        if self.parser.get_method() != b"POST":
            assert self.transport is not None
            self.transport.write(_NOT_ALLOWED)
            return
        asyncio.get_running_loop().create_task(self._answer(body))

    async def _answer(self, body: bytes) -> None:
        request = orjson.loads(body)
        params = request.get("params") or {}
        reply = await self.worker.call(params.get("arguments") or {})
        text = str(reply["arguments"].get("text", ""))
        result = {"content": [{"type": "text", "text": text}], "isError": False}
        out = orjson.dumps({"jsonrpc": "2.0", "id": request.get("id"), "result": result})
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_HEAD % len(out) + out)


async def _serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    _, worker = await loop.subprocess_exec(
        _Worker,
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    server = await loop.create_server(lambda: _Connection(worker), host, port)
    async with server:
        await server.serve_forever()


class _Echo(asyncio.Protocol):
    """The worker: each line from the server goes back as it came."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self._done = done
        self._buffer = b""

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            call = orjson.loads(line)
            os.write(1, orjson.dumps({"id": call["id"], "arguments": call["arguments"]}) + b"\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(None)


async def _work() -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    stdin = os.fdopen(0, "rb", buffering=0)
    await loop.connect_read_pipe(lambda: _Echo(done), stdin)
    await done  # the server closed our stdin: it is gone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        uvloop.run(_work())
    elif args.port is None:
        parser.error("--port is required")
    else:
        uvloop.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
