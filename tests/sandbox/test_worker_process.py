"""What the kernel's side of a worker makes of the frames a plugin writes to its protocol pipe
itself: a plugin is untrusted code, and may write anything there."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sandbox_support import RecordingBridge

from mcp_zero.errors import PluginFailure
from mcp_zero.sandbox.frames import MAX_READ_DEPTH
from mcp_zero.sandbox.manifest import load_manifest
from mcp_zero.sandbox.process import ProcessRuntime
from mcp_zero.sandbox.worker_process import MAX_CLIENT_REQUESTS, MAX_OPEN_CLIENT_REQUESTS
from plugin_builders import asking_plugin, forging_plugin

pytestmark = pytest.mark.anyio
JSON = dict[str, Any]


@contextlib.asynccontextmanager
async def started(tmp_path: Path, directory: Path) -> AsyncIterator[ProcessRuntime]:
    runtime = ProcessRuntime(load_manifest(directory), directory, tmp_path / "data")
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.close()


@pytest.fixture
async def forger(tmp_path: Path) -> AsyncIterator[ProcessRuntime]:
    async with started(tmp_path, forging_plugin(tmp_path / "forger")) as runtime:
        yield runtime


@pytest.fixture
async def asker(tmp_path: Path) -> AsyncIterator[ProcessRuntime]:
    async with started(tmp_path, asking_plugin(tmp_path / "asker")) as runtime:
        yield runtime


async def call(
    runtime: ProcessRuntime, tool: str, bridge: RecordingBridge | None = None, **arguments: Any
) -> dict[str, Any]:
    with anyio.fail_after(20):
        return await runtime.call_tool(
            tool, arguments, agent="a", bridge=bridge or RecordingBridge(), timeout=15
        )


async def test_a_result_nested_as_deep_as_an_answer_can_carry_is_passed_on(forger):
    # the frame nests MAX_READ_DEPTH levels: its three, and the nested lists'
    depth = MAX_READ_DEPTH - 3
    result = await call(forger, "deep", depth=depth)
    nested = result["structuredContent"]["x"]
    for _ in range(depth - 1):
        [nested] = nested
    assert nested == []


async def test_a_result_nested_deeper_than_an_answer_can_carry_is_the_plugins_failure(
    forger, caplog
):
    # orjson parsed it (1,024 levels) but could not write the client's answer (254): an HTTP
    # 500, a cut stream or no answer over stdio, while the call was recorded as allowed
    pid = forger.pids[0]
    for depth in (MAX_READ_DEPTH - 2, 1000):
        with pytest.raises(PluginFailure, match="its result nests deeper than 253 levels"):
            await call(forger, "deep", depth=depth)
    assert "answered tool 'deep' with a frame nested deeper than 254 levels" in caplog.text
    assert forger.pids == [pid]  # (a refused answer, not a broken protocol)
    assert (await call(forger, "deep", depth=1))["structuredContent"] == {"x": []}


ROOTS = {"roots/list": {"roots": []}}


class HeldClient(RecordingBridge):
    """A client that answers requests only once ``answer`` is set."""

    def __init__(self) -> None:
        super().__init__(ROOTS)
        self.answer = asyncio.Event()
        self.waiting = 0

    async def request(self, method: str, params: JSON, key: str | None = None) -> JSON:
        self.waiting += 1
        await self.answer.wait()
        return await super().request(method, params, key)


async def test_a_call_has_so_many_requests_to_its_client_open_at_once_at_most(asker, caplog):
    client = HeldClient()
    asking = asyncio.ensure_future(
        call(asker, "ask_at_once", client, n=MAX_OPEN_CLIENT_REQUESTS + 4)
    )
    with anyio.fail_after(10):
        while client.events.count(("log", ("info", "refused", None))) < 4:
            await asyncio.sleep(0.01)
    assert client.waiting == MAX_OPEN_CLIENT_REQUESTS
    client.answer.set()
    tally = (await asking)["structuredContent"]
    assert tally["answered"] == MAX_OPEN_CLIENT_REQUESTS
    assert tally["refused"] == [
        f"tool 'ask_at_once' has {MAX_OPEN_CLIENT_REQUESTS} requests to its client open, the "
        "most a call may have at once: await their answers before asking more"
    ]
    assert caplog.text.count("refused, not relayed") == 1


async def test_a_call_makes_so_many_requests_of_its_client_at_most(asker, caplog):
    # Each relayed request is audited: one call wrote 20,000 request frames, and left as
    # many records, in 4 s (found by review)
    client = RecordingBridge(ROOTS)
    tally = await call(asker, "ask_in_turn", client, n=MAX_CLIENT_REQUESTS + 5)
    assert tally["structuredContent"] == {
        "answered": MAX_CLIENT_REQUESTS,
        "refused": [
            f"tool 'ask_in_turn' has made {MAX_CLIENT_REQUESTS} requests of its client, the "
            "most a call may make"
        ],
    }
    assert len(client.events) == MAX_CLIENT_REQUESTS  # (the others never reached it)
    assert caplog.text.count("refused, not relayed") == 1  # (once a call, not a request)
    # the next call may make its own
    assert (await call(asker, "ask_in_turn", client, n=1))["structuredContent"]["answered"] == 1
