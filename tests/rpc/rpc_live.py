"""Helpers of the MCP transport tests: a real Runtime on a data dir, served by our HTTP
server in the test's event loop, and a small raw MCP-over-HTTP client (httpx2) that shows
status codes, headers and SSE events as they are on the wire.

A module of its own (not conftest.py): test modules import it by this unique name."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import pytest

from mcp_zero.config import load_settings
from mcp_zero.rpc.http import HttpApp
from mcp_zero.rpc.wire import HttpServer
from mcp_zero.runtime import Runtime

TESTS_DIR = Path(__file__).parents[1]
FAULTY_DIR = TESTS_DIR / "plugins" / "faulty"
CONFORMANCE_DIR = TESTS_DIR / "plugins" / "conformance"
CHATTY_DIR = TESTS_DIR / "plugins" / "chatty"
NOTES_DIR = TESTS_DIR.parent / "src" / "mcp_zero" / "examples" / "plugins" / "notes"
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 20.0
JSON = dict[str, Any]


def make_runtime(data_dir: Path, **overrides: Any) -> Runtime:
    """A Runtime on ``data_dir`` with built-in defaults, ``overrides`` and no environment."""
    settings = load_settings(None, {"data_dir": data_dir, **overrides}, environ={})
    return Runtime(settings)


@dataclass
class LiveServer:
    """Our HTTP server running ``HttpApp(runtime)`` on 127.0.0.1 in this event loop."""

    runtime: Runtime
    app: HttpApp
    server: HttpServer
    task: asyncio.Task[None]
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def client(self, token: str | None = None) -> McpHttp:
        return McpHttp(self, token)


@contextlib.asynccontextmanager
async def serve(runtime: Runtime, grace: float = 5.0, **options: Any) -> AsyncIterator[LiveServer]:
    """Serve the runtime the way `mcp0 serve` does (HttpApp on our HTTP/1.1 server, port 0)
    until the block ends (or ``server.stop()``, giving requests ``grace`` seconds); startup
    starts the runtime and shutdown closes it. ``options`` go to the HttpServer."""
    app = HttpApp(runtime)
    server = HttpServer(
        app, "127.0.0.1", 0, max_body_bytes=runtime.settings.max_body_bytes, **options
    )
    started = asyncio.Event()

    async def on_start() -> None:
        await app.startup()
        await server.start()
        started.set()

    task = asyncio.create_task(server.run(on_start, app.shutdown, listen=False, grace=grace))
    with anyio.fail_after(START_TIMEOUT_S):
        while not started.is_set():
            if task.done():
                task.result()
                pytest.fail("the server exited before it started")
            await asyncio.sleep(0.01)
    try:
        yield LiveServer(runtime, app, server, task, server.port)
    finally:
        server.stop()
        with anyio.fail_after(START_TIMEOUT_S):
            await task


@dataclass
class Env:
    """A served runtime and the bearer token of its one agent."""

    live: LiveServer
    token: str


@contextlib.asynccontextmanager
async def served_agent(
    data_dir: Path,
    agent: str,
    plugins: list[Path],
    server: dict[str, Any] | None = None,
    **settings: Any,
) -> AsyncIterator[Env]:
    """A runtime on ``data_dir`` (with ``settings``) that has ``plugins`` installed and an
    agent named ``agent`` attached to all of them, served (HttpServer options ``server``)
    until the block ends."""
    runtime = make_runtime(data_dir, **settings)
    names = [runtime.plugins.install(plugin).manifest.name for plugin in plugins]
    spawned = await runtime.agents.spawn(agent, names)
    async with serve(runtime, **(server or {})) as live:
        yield Env(live, spawned.token)


@dataclass
class SseEvent:
    id: str | None
    data: str

    @property
    def message(self) -> JSON:
        value: JSON = orjson.loads(self.data)
        return value


async def sse_events(response: httpx2.Response) -> AsyncIterator[SseEvent]:
    """The events of an SSE response, as they arrive."""
    event_id: str | None = None
    data: list[str] = []
    seen_field = False
    async for line in response.aiter_lines():
        if line == "":
            if seen_field:
                yield SseEvent(event_id, "\n".join(data))
            event_id, data, seen_field = None, [], False
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        seen_field = True
        if name == "id":
            event_id = value
        elif name == "data":
            data.append(value)


@dataclass
class McpHttp:
    """Raw JSON-RPC over POST /mcp with one agent's bearer token."""

    live: LiveServer
    token: str | None
    session_id: str | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def headers(self, **extra: str) -> dict[str, str]:
        out = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        if self.token is not None:
            out["Authorization"] = f"Bearer {self.token}"
        if self.session_id is not None:
            out["Mcp-Session-Id"] = self.session_id
        out.update(extra)
        return out

    def next_id(self) -> int:
        return next(self._ids)

    async def post_raw(self, body: bytes, **headers: str) -> httpx2.Response:
        # verify=False: plain http to 127.0.0.1, and loading the CA bundle costs ~30 ms a client
        async with httpx2.AsyncClient(verify=False, timeout=CALL_TIMEOUT_S) as http:
            with anyio.fail_after(CALL_TIMEOUT_S):
                return await http.post(self.live.url, content=body, headers=self.headers(**headers))

    async def post(self, message: JSON, **headers: str) -> httpx2.Response:
        return await self.post_raw(orjson.dumps(message), **headers)

    async def request(self, method: str, params: JSON | None = None, **headers: str) -> JSON:
        """Send one request and return the JSON-RPC response (plain JSON or the SSE's last)."""
        message: JSON = {"jsonrpc": "2.0", "id": self.next_id(), "method": method}
        if params is not None:
            message["params"] = params
        response = await self.post(message, **headers)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            events = [e for e in parse_sse_text(response.text) if e.data]
            reply = events[-1].message
        else:
            reply = response.json()
        assert reply["id"] == message["id"], reply
        return reply

    async def call(self, tool: str, arguments: JSON | None = None) -> JSON:
        return await self.request("tools/call", {"name": tool, "arguments": arguments or {}})

    async def initialize(
        self, version: str = "2025-11-25", capabilities: JSON | None = None
    ) -> JSON:
        response = await self.post(
            {
                "jsonrpc": "2.0",
                "id": self.next_id(),
                "method": "initialize",
                "params": {
                    "protocolVersion": version,
                    "capabilities": capabilities or {},
                    "clientInfo": {"name": "tests", "version": "0"},
                },
            }
        )
        assert response.status_code == 200, response.text
        self.session_id = response.headers["mcp-session-id"]
        note = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert note.status_code == 202
        reply: JSON = response.json()
        return reply


def parse_sse_text(text: str) -> list[SseEvent]:
    """The events of a complete SSE body."""
    events: list[SseEvent] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        event_id, data = None, []
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                event_id = value
            elif name == "data":
                data.append(value)
        events.append(SseEvent(event_id, "\n".join(data)))
    return events


def error_of(reply: JSON) -> JSON:
    assert "error" in reply, f"expected an error, got {reply}"
    error: JSON = reply["error"]
    return error


def text_of(reply: JSON) -> str:
    assert "result" in reply, f"expected a result, got {reply}"
    return "\n".join(b.get("text", "") for b in reply["result"]["content"])
