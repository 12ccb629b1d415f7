"""The official MCP Python client (``mcp``) against the in-process server: tools listed and
called through the governed path, and server-to-client requests (sampling, elicitation) relayed
from a plugin to the client and the client's answer back to the plugin."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
import orjson
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from rpc_live import (
    CONFORMANCE_DIR,
    FAULTY_DIR,
    NOTES_DIR,
    Env,
    served_agent,
)

from mcp_zero.errors import MISSING_CLIENT_CAPABILITY

pytestmark = pytest.mark.anyio
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    data = tmp_path_factory.mktemp("official-client") / "data"
    async with served_agent(data, "sdk", [NOTES_DIR, FAULTY_DIR, CONFORMANCE_DIR]) as served:
        yield served


def text_of(result: types.CallToolResult) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, types.TextContent))


@asynccontextmanager
async def connect(env: Env, mode: str = "legacy", **callbacks: Any) -> AsyncIterator[Client]:
    """The official client, connected as the test agent (``callbacks``: sampling etc.)."""
    async with httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {env.token}"}, timeout=TIMEOUT_S
    ) as http:
        with anyio.fail_after(TIMEOUT_S):
            async with Client(
                streamable_http_client(env.live.url, http_client=http), mode=mode, **callbacks
            ) as connected:
                yield connected


# "legacy": the initialize handshake; "auto": server/discover, which finds 2026-07-28 here;
# "2026-07-28": that revision pinned (no discover).
@pytest.fixture(params=["legacy", "auto", "2026-07-28"])
async def client(env: Env, request: pytest.FixtureRequest) -> AsyncIterator[Client]:
    async with connect(env, request.param) as connected:
        yield connected


@pytest.mark.parametrize(("mode", "version"), [("legacy", "2025-11-25"), ("auto", "2026-07-28")])
async def test_the_client_negotiates_the_newest_version_of_its_mode(
    env: Env, mode: str, version: str
) -> None:
    async with connect(env, mode) as connected:
        assert connected.protocol_version == version
        assert connected.server_info is not None
        assert connected.server_info.name == "mcp-zero"


async def test_listen_brings_the_change_of_a_subscribed_resource(env: Env) -> None:
    async with connect(env, "2026-07-28") as connected:
        with anyio.fail_after(TIMEOUT_S):
            async with connected.listen(
                tools_list_changed=True, resource_subscriptions=["faulty://counter"]
            ) as subscription:
                assert subscription.honored.tools_list_changed is True
                assert subscription.honored.resource_subscriptions == ["faulty://counter"]
                bumped = await connected.call_tool("faulty_bump", {})
                assert not bumped.is_error, text_of(bumped)
                async for event in subscription:
                    assert getattr(event, "uri", None) == "faulty://counter", event
                    break


async def test_lists_tools_and_adds_then_finds_a_note(client: Client) -> None:
    with anyio.fail_after(TIMEOUT_S):
        tools = await client.list_tools()
        names = {tool.name for tool in tools.tools}
        assert {"notes_add", "notes_search", "faulty_echo", "test_sampling"} <= names
        added = await client.call_tool(
            "notes_add", {"text": "official client note", "tags": ["sdk"]}
        )
        assert not added.is_error, text_of(added)
        assert added.structured_content is not None
        note = added.structured_content["note"]
        found = await client.call_tool("notes_search", {"query": "official"})
        assert found.structured_content is not None
        assert note["id"] in [n["id"] for n in found.structured_content["notes"]]


async def test_a_tool_error_reaches_the_client_as_is_error(client: Client) -> None:
    with anyio.fail_after(TIMEOUT_S):
        result = await client.call_tool("faulty_raise", {})
    assert result.is_error
    assert "raised on purpose" in text_of(result)


async def test_progress_reaches_the_clients_callback(client: Client) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    with anyio.fail_after(TIMEOUT_S):
        result = await client.call_tool(
            "faulty_progress", {"steps": 3}, progress_callback=on_progress
        )
    assert text_of(result) == "done 3 steps"
    assert seen == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_sampling_is_relayed_to_the_client_and_back(env: Env, mode: str) -> None:
    asked: list[types.CreateMessageRequestParams] = []

    async def sample(
        context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        asked.append(params)
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="forty-two"),
            model="test-model",
            stop_reason="endTurn",
        )

    store = env.live.runtime.store
    head = store.audit_head()
    after = head.seq if head is not None else 0
    async with connect(env, mode, sampling_callback=sample) as connected:
        result = await connected.call_tool("test_sampling", {"prompt": "what is six by seven?"})
    assert not result.is_error, text_of(result)
    assert text_of(result) == "LLM response: forty-two"
    assert len(asked) == 1
    message = asked[0].messages[0]
    assert isinstance(message.content, types.TextContent)
    assert message.content.text == "what is six by seven?"
    # the call went through the governed path: one allowed audit record for it
    records = [orjson.loads(e.body) for e in store.read_audit(after, 1000)]
    sampled = [r for r in records if r.get("resource") == "test_sampling"]
    assert len(sampled) == 1
    assert sampled[0]["outcome"] == "allowed"
    assert sampled[0]["agent"] == "sdk"


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_elicitation_is_relayed_to_the_client_and_back(env: Env, mode: str) -> None:
    async def elicit(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        assert isinstance(params, types.ElicitRequestFormParams)
        assert params.message == "who are you?"
        return types.ElicitResult(
            action="accept", content={"username": "ada", "email": "ada@example.org"}
        )

    async with connect(env, mode, elicitation_callback=elicit) as connected:
        result = await connected.call_tool("test_elicitation", {"message": "who are you?"})
    assert not result.is_error, text_of(result)
    assert "action=accept" in text_of(result)
    assert '"username":"ada"' in text_of(result)


async def test_sampling_without_the_capability_is_a_tool_error_on_a_session(env: Env) -> None:
    async with connect(env, "legacy") as connected:
        result = await connected.call_tool("test_sampling", {"prompt": "anyone there?"})
    assert result.is_error
    assert "Sampling is not available" in text_of(result)


@pytest.mark.parametrize("mode", ["auto", "2026-07-28"])
async def test_sampling_without_the_capability_is_missing_client_capability(
    env: Env, mode: str
) -> None:
    async with connect(env, mode) as connected:
        with pytest.raises(MCPError) as info:
            await connected.call_tool("test_sampling", {"prompt": "anyone there?"})
    assert info.value.error.code == MISSING_CLIENT_CAPABILITY
    assert info.value.error.data["requiredCapabilities"] == {"sampling": {}}


@pytest.mark.parametrize(
    ("prompt", "arguments", "named"),
    [
        ("test_simple_prompt", {"extra": "x"}, "'extra' (its arguments: none)"),
        (
            "test_prompt_with_arguments",
            {"arg1": "a", "arg2": "b", "arg3": "c"},
            "'arg3' (its arguments: arg1, arg2)",
        ),
    ],
)
async def test_a_prompt_argument_the_prompt_does_not_take_is_32602_naming_it(
    client: Client, prompt: str, arguments: dict[str, str], named: str
) -> None:
    with anyio.fail_after(TIMEOUT_S), pytest.raises(MCPError) as refused:
        await client.get_prompt(prompt, arguments)
    assert refused.value.code == -32602
    assert (
        refused.value.message
        == f"prompt {prompt!r} has no argument {named}; prompts/list shows them"
    )
    assert "TypeError" not in refused.value.message
    # the declared ones still work
    declared = {k: v for k, v in arguments.items() if k in ("arg1", "arg2")}
    with anyio.fail_after(TIMEOUT_S):
        assert (await client.get_prompt(prompt, declared)).messages
