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

from mcp_zero.errors import PluginCrashed, PluginFailure
from mcp_zero.sandbox.frames import MAX_READ_DEPTH
from mcp_zero.sandbox.manifest import load_manifest
from mcp_zero.sandbox.process import ProcessRuntime
from mcp_zero.sandbox.worker_process import (
    MAX_CLIENT_REQUESTS,
    MAX_FRAME_VALUES,
    MAX_OPEN_CLIENT_REQUESTS,
)
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


async def test_an_answer_parsing_would_make_too_many_values_of_is_refused_unparsed(forger, caplog):
    # One 31 MiB answer of {} items took the server from 56 MB to 1.08 GB as it was parsed
    # (four at once, 1.9 GB: found by review)
    pid = forger.pids[0]
    n = MAX_FRAME_VALUES // 2 + 1  # (each item and the comma after it: two values)
    holds = rf"its answer holds [\d,]+ values \(.*\), over the {MAX_FRAME_VALUES:,} an answer"
    with pytest.raises(PluginFailure, match=holds):
        await call(forger, "many", n=n)
    assert "refused unparsed" in caplog.text
    assert forger.pids == [pid]
    assert len((await call(forger, "many", n=n - 10))["structuredContent"]["x"]) == n - 10


@pytest.mark.parametrize(
    ("tool", "mb", "kind"), [("text", 28, "text"), ("text", 2, "text"), ("blob", 20, "image")]
)
async def test_large_text_and_blobs_are_not_taken_for_many_values(forger, tool, mb, kind):
    # text this long holds millions of commas and colons, but in one string: one value
    [block] = (await call(forger, tool, mb=mb))["content"]
    assert block["type"] == kind
    assert len(block["text" if kind == "text" else "data"]) >= mb << 20


async def test_a_frame_for_no_call_is_dropped_unparsed(forger, caplog):
    # (parsed, a frame that is no JSON broke the protocol: the worker was killed)
    pid = forger.pids[0]
    assert (await call(forger, "strays", kind="not_json", mb=0, count=1))["content"]
    assert forger.pids == [pid]
    assert "broke the protocol" not in caplog.text


@pytest.mark.parametrize("kind", ["answer", "log"])
async def test_frames_for_no_call_or_over_their_size_are_counted_by_bytes(forger, caplog, kind):
    # A plugin thread writing 31 MiB frames for calls that do not exist held the server's
    # loop up to 1.8 s at a time, and was never killed: it sent few frames (found by review)
    with pytest.raises(PluginCrashed, match=r"8 MiB a second for no call"):
        await call(forger, "strays", kind=kind, mb=3, count=4)
    assert "for no call in flight or over their size" in caplog.text
