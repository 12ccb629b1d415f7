"""What the kernel's side of a worker makes of the frames a plugin writes to its protocol pipe
itself: a plugin is untrusted code, and may write anything there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sandbox_support import RecordingBridge

from mcp_zero.errors import PluginFailure
from mcp_zero.sandbox.frames import MAX_READ_DEPTH
from mcp_zero.sandbox.manifest import load_manifest
from mcp_zero.sandbox.process import ProcessRuntime
from plugin_builders import forging_plugin

pytestmark = pytest.mark.anyio


@pytest.fixture
async def forger(tmp_path: Path) -> Any:
    directory = forging_plugin(tmp_path / "forger")
    runtime = ProcessRuntime(load_manifest(directory), directory, tmp_path / "data")
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.close()


async def call(runtime: ProcessRuntime, tool: str, **arguments: Any) -> dict[str, Any]:
    return await runtime.call_tool(tool, arguments, agent="a", bridge=RecordingBridge(), timeout=10)


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
