"""tools/list, resources/list and prompts/list as a client pages through them over HTTP:
cursors good only for the list they came from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from rpc_live import (
    CONFORMANCE_DIR,
    FAULTY_DIR,
    NOTES_DIR,
    LiveServer,
    McpHttp,
    error_of,
    make_runtime,
    serve,
)

pytestmark = pytest.mark.anyio
JSON = dict[str, Any]


@dataclass
class Env:
    live: LiveServer


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    runtime = make_runtime(tmp_path_factory.mktemp("http-lists") / "data", page_size=2)
    for plugin in (CONFORMANCE_DIR, FAULTY_DIR, NOTES_DIR):
        runtime.plugins.install(plugin)
    async with serve(runtime) as live:
        yield Env(live)


async def agent_session(env: Env, name: str, plugins: list[str]) -> McpHttp:
    spawned = await env.live.runtime.agents.spawn(name, plugins)
    client = env.live.client(spawned.token)
    await client.initialize()
    return client


async def every_page(client: McpHttp, method: str, key: str) -> list[str]:
    names: list[str] = []
    params: JSON = {}
    for _ in range(50):
        page = (await client.request(method, params))["result"]
        names += [item.get("name") or item["uri"] for item in page[key]]
        if "nextCursor" not in page:
            return names
        params = {"cursor": page["nextCursor"]}
    raise AssertionError(f"{method} did not end")


async def test_a_cursor_is_good_only_for_the_list_method_that_made_it(env: Env) -> None:
    client = await agent_session(env, "pager", ["conformance"])
    cursor = (await client.request("tools/list"))["result"]["nextCursor"]
    for other in ("prompts/list", "resources/list"):
        error = error_of(await client.request(other, {"cursor": cursor}))
        assert error["code"] == -32602
        assert "'tools/list'" in error["message"]
        assert error["message"].endswith(f"pass a nextCursor that {other} sent")
    # and the list it came from takes it
    assert (await client.request("tools/list", {"cursor": cursor}))["result"]["tools"]


async def test_a_cursor_from_before_the_list_changed_is_refused_as_stale(env: Env) -> None:
    client = await agent_session(env, "watcher", ["faulty"])
    before = await every_page(client, "tools/list", "tools")
    cursor = (await client.request("tools/list"))["result"]["nextCursor"]
    await env.live.runtime.agents.attach("watcher", "notes")  # its tools list grows
    error = error_of(await client.request("tools/list", {"cursor": cursor}))
    assert error["code"] == -32602
    assert error["message"].startswith("cursor is stale: the list changed since it was made")
    assert error["data"]["stale"] is True
    # listed again from the start, it pages through the new list
    after = await every_page(client, "tools/list", "tools")
    assert set(after) - set(before) == {"notes_add", "notes_search", "notes_list", "notes_delete"}
    assert len(after) == len(set(after))


async def test_a_cursor_stays_good_while_its_list_does_not_change(env: Env) -> None:
    client = await agent_session(env, "steady", ["faulty"])
    cursor = (await client.request("tools/list"))["result"]["nextCursor"]
    # another agent's attachment changes nothing this agent sees
    await env.live.runtime.agents.spawn("bystander", [])
    await env.live.runtime.agents.attach("bystander", "notes")
    assert (await client.request("tools/list", {"cursor": cursor}))["result"]["tools"]
