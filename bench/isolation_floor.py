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

With ``--audit DIR`` it also writes each call's record durably before it
answers, as mcp0's audit log does and with its defaults: one row per call
(sequence number, time, the call as JSON, the SHA-256 chain hash) appended to
a SQLite table in WAL mode with ``synchronous=FULL``, group-committed on the
event loop 5 ms after a batch's first row or at 32 rows. Still no MCP and no
governance: its CPU is the least a design that isolates plugins *and* keeps a
durable audit can spend here.

Run: python bench/isolation_floor.py --port 8768 [--audit DIR]  (answers POST on any path)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import os
import sqlite3
import sys
import time
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


class _Audit:
    """mcp0's group commit in a few lines: rows gather for ``window`` seconds after a batch's
    first (or until ``max_batch``), then one transaction and one fsync; then their callers go on."""

    def __init__(self, directory: str, window: float = 0.005, max_batch: int = 32) -> None:
        os.makedirs(directory, exist_ok=True)
        self._db = sqlite3.connect(os.path.join(directory, "audit.db"), isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS audit"
            " (seq INTEGER PRIMARY KEY, ts REAL, body BLOB, prev TEXT, hash TEXT)"
        )
        self._window, self._max_batch = window, max_batch
        self._seq, self._prev = 0, "0" * 64
        self._batch: list[tuple[bytes, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None

    def append(self, body: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._batch.append((body, future))
        if len(self._batch) >= self._max_batch:
            self._commit()
        elif self._timer is None:
            self._timer = loop.call_later(self._window, self._commit)
        return future

    def _commit(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._batch = self._batch, []
        rows = []
        for body, _ in batch:
            self._seq += 1
            digest = hashlib.sha256(bytes.fromhex(self._prev) + body).hexdigest()
            rows.append((self._seq, time.time(), body, self._prev, digest))
            self._prev = digest
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany("INSERT INTO audit VALUES (?, ?, ?, ?, ?)", rows)
        self._db.execute("COMMIT")
        for _, future in batch:
            if not future.done():
                future.set_result(None)


class _Connection(asyncio.Protocol):
    """One client connection; requests are answered in order (wrk sends one at a time)."""

    def __init__(self, worker: _Worker, audit: _Audit | None) -> None:
        self.worker = worker
        self.audit = audit
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
        if self.audit is not None:
            await self.audit.append(orjson.dumps({"request": request, "result": result}))
        out = orjson.dumps({"jsonrpc": "2.0", "id": request.get("id"), "result": result})
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_HEAD % len(out) + out)


async def _serve(host: str, port: int, audit_dir: str | None) -> None:
    loop = asyncio.get_running_loop()
    _, worker = await loop.subprocess_exec(
        _Worker,
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    audit = _Audit(audit_dir) if audit_dir else None
    server = await loop.create_server(lambda: _Connection(worker, audit), host, port)
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
    parser.add_argument("--audit", metavar="DIR", help="write each call's record durably first")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        uvloop.run(_work())
    elif args.port is None:
        parser.error("--port is required")
    else:
        uvloop.run(_serve(args.host, args.port, args.audit))


if __name__ == "__main__":
    main()
