"""tools/list, resources/list and prompts/list as a client sees them over HTTP: cursors good
only for the list they came from, and list_changed notices on the session's GET stream for
the lists that changed, to the sessions that see them, whoever changed them (the admin API,
the CLI in another process)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import pytest
from rpc_live import (
    CALL_TIMEOUT_S,
    CONFORMANCE_DIR,
    FAULTY_DIR,
    NOTES_DIR,
    LiveServer,
    McpHttp,
    SseEvent,
    error_of,
    make_runtime,
    serve,
    sse_events,
)

from mcp_zero.rpc.list_changes import YIELD_AFTER_S
from mcp_zero.security.tokens import hash_token, new_token
from mcp_zero.storage.base import AgentRecord

pytestmark = pytest.mark.anyio
JSON = dict[str, Any]
MCP0 = str(Path(sys.executable).parent / "mcp0")


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


# The conformance plugin's items one agent may not use, each forbidden alone.
PICKY_FORBIDS = """
@id("picky-no-simple-text")
forbid (principal == Agent::"picky", action == Action::"call_tool",
        resource == Tool::"test_simple_text");
@id("picky-no-static-text")
forbid (principal == Agent::"picky", action == Action::"read_resource",
        resource == Resource::"test://static-text");
@id("picky-no-one-template-uri")
forbid (principal == Agent::"picky", action == Action::"read_resource",
        resource == Resource::"test://template/1/data");
@id("picky-no-simple-prompt")
forbid (principal == Agent::"picky", action == Action::"get_prompt",
        resource == Prompt::"test_simple_prompt");
"""
ALL_LISTS = [
    ("tools/list", "tools", "name"),
    ("resources/list", "resources", "uri"),
    ("resources/templates/list", "resourceTemplates", "uriTemplate"),
    ("prompts/list", "prompts", "name"),
]


async def legacy_list(client: McpHttp, method: str, key: str, field: str) -> list[str]:
    """Every item of the list as the client's session gets it, page by page."""
    names: list[str] = []
    params: JSON = {}
    for _ in range(50):
        page = (await client.request(method, params))["result"]
        names += [item[field] for item in page[key]]
        if "nextCursor" not in page:
            return names
        params = {"cursor": page["nextCursor"]}
    raise AssertionError(f"{method} did not end")


async def modern_list(env: Env, token: str, method: str, key: str, field: str) -> list[str]:
    """Every item of the list as MCP 2026-07-28 requests (no session) get it."""
    names: list[str] = []
    params: JSON = {}
    envelope = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": method,
    }
    async with httpx2.AsyncClient(timeout=CALL_TIMEOUT_S) as http:
        for _ in range(50):
            body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params}}
            body["params"]["_meta"] = envelope
            page = (await http.post(env.live.url, json=body, headers=headers)).json()["result"]
            names += [item[field] for item in page[key]]
            if "nextCursor" not in page:
                return names
            params = {"cursor": page["nextCursor"]}
    raise AssertionError(f"{method} did not end")


async def test_lists_leave_out_what_policy_forbids_the_agent_to_use(env: Env) -> None:
    # Only list_tools on the whole plugin counted: a tool, resource or prompt the agent may
    # never use was listed all the same (found by review)
    picky = await agent_session(env, "picky", ["conformance"])
    token = picky.token
    assert token is not None
    free = await agent_session(env, "unbound", ["conformance"])
    rules = env.live.runtime.settings.policy_dir / "picky.cedar"
    rules.write_text(PICKY_FORBIDS)
    env.live.runtime.policy.reload()
    try:
        hidden = {"test_simple_text", "test://static-text", "test_simple_prompt"}
        for method, key, field in ALL_LISTS:
            everything = await legacy_list(free, method, key, field)  # (pages of 2)
            legacy = await legacy_list(picky, method, key, field)
            modern = await modern_list(env, token, method, key, field)
            assert legacy == modern == [item for item in everything if item not in hidden]
        # one URI of a template forbidden leaves the template, whose other URIs it may read
        templates = await legacy_list(picky, *ALL_LISTS[2])
        assert templates == ["test://template/{id}/data"]
        refused = await picky.call("test_simple_text")
        assert error_of(refused)["code"] == -32003
    finally:
        rules.unlink()
        env.live.runtime.policy.reload()
    assert "test_simple_text" in await every_page(picky, "tools/list", "tools")


async def test_the_list_check_decides_no_item_of_the_lists(env: Env) -> None:
    # The check (every second, and on every change) decided each item of each list for the
    # agent of every session: after a policy reload, 40 agents with 400 tools each held the
    # event loop for 2 s (found by review). It decides which plugins each agent may list.
    for n in range(4):
        await agent_session(env, f"checked-{n}", ["conformance", "faulty", "notes"])
    app = env.live.app
    principals = {session.principal for session in app.sessions.values()}
    plugins = len(env.live.runtime.plugins.manifests)
    policy = env.live.runtime.policy
    policy.reload()  # every version to work out again, by an engine that has decided nothing
    engine = policy.engine
    await app.list_changes.check()
    assert 0 < engine.requests_decided <= len(principals) * plugins
    # a list asked for decides its items
    client = await agent_session(env, "checked-lister", ["conformance"])
    before = engine.requests_decided
    tools = await every_page(client, "tools/list", "tools")
    assert policy.engine is engine
    assert engine.requests_decided - before >= len(tools) > plugins


async def test_a_check_lets_the_server_work_between_sessions(env: Env) -> None:
    # After a reload it worked out every agent's view in one go: with 3,000 sessions the
    # server answered nothing for 63 s (found by review)
    for n in range(4):
        await agent_session(env, f"patient-{n}", ["faulty"])
    checks = env.live.app.list_changes
    checks.yield_after_s = 0.0  # (the budget: other work runs after every session)
    env.live.runtime.policy.reload()  # every view to work out again
    turns = 0
    checked = asyncio.create_task(checks.check())
    try:
        while not checked.done():
            turns += 1
            await asyncio.sleep(0)
        await checked
        # asked for while one runs, a check waits for one that began after it was asked
        again = [asyncio.create_task(checks.check()) for _ in range(3)]
        await asyncio.gather(*again)
    finally:
        checks.yield_after_s = YIELD_AFTER_S
    assert turns >= len(env.live.app.sessions) >= 4


async def test_a_policy_reload_tells_the_sessions_that_their_lists_may_have_changed(
    env: Env,
) -> None:
    client = await agent_session(env, "reloaded", ["faulty"])
    rules = env.live.runtime.settings.policy_dir / "reloaded.cedar"
    try:
        with anyio.fail_after(CALL_TIMEOUT_S):
            async with listening(env, client) as heard:
                rules.write_text(
                    '@id("reloaded-no-echo")\nforbid (principal == Agent::"reloaded", '
                    'action == Action::"call_tool", resource == Tool::"faulty_echo");\n'
                )
                env.live.runtime.policy.reload()
                assert await next_method(heard) == "notifications/tools/list_changed"
        assert "faulty_echo" not in await every_page(client, "tools/list", "tools")
    finally:
        rules.unlink()
        env.live.runtime.policy.reload()


# -- list_changed -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def listening(env: Env, client: McpHttp) -> AsyncIterator[AsyncIterator[SseEvent]]:
    """The events of the client's GET stream after the priming one. The session subscribes
    to faulty://counter first: faulty_bump then sends a notice that marks a point in it."""
    assert "result" in await client.request("resources/subscribe", {"uri": "faulty://counter"})
    async with (
        httpx2.AsyncClient(verify=False, timeout=CALL_TIMEOUT_S) as http,
        http.stream("GET", env.live.url, headers=client.headers(Accept="text/event-stream")) as got,
    ):
        events = sse_events(got)
        assert (await anext(events)).data == ""
        yield events


async def next_method(events: AsyncIterator[SseEvent]) -> str:
    method: str = (await anext(events)).message["method"]
    return method


async def bump(client: McpHttp) -> None:
    assert "bumped to" in (await client.call("faulty_bump"))["result"]["content"][0]["text"]


async def mcp0(env: Env, *args: str) -> None:
    data_dir = str(env.live.runtime.settings.data_dir)
    await anyio.run_process([MCP0, *args, "--data-dir", data_dir])


async def attach(env: Env, via: str, agent: str, plugin: str) -> None:
    if via == "cli":  # another process, which writes the store
        await mcp0(env, "agent", "attach", agent, plugin)
        return
    async with httpx2.AsyncClient(verify=False, timeout=CALL_TIMEOUT_S) as http:
        response = await http.post(
            f"{env.live.base}/api/v1/agents/{agent}/plugins",
            json={"plugin": plugin},
            headers={"Authorization": f"Bearer {env.live.runtime.admin_token()}"},
        )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("via", ["admin-api", "cli"])
async def test_attaching_a_plugin_tells_the_agents_sessions_which_lists_changed(
    env: Env, via: str
) -> None:
    gains = await agent_session(env, f"gains-{via}", ["faulty"])
    keeps = await agent_session(env, f"keeps-{via}", ["faulty"])
    with anyio.fail_after(CALL_TIMEOUT_S):
        async with listening(env, gains) as heard, listening(env, keeps) as other_heard:
            await attach(env, via, f"gains-{via}", "notes")  # notes adds tools only
            assert await next_method(heard) == "notifications/tools/list_changed"
            await bump(gains)
            # nothing came before the resource notice: no resources or prompts list_changed
            # to the agent, and nothing at all to the other agent's session
            assert await next_method(heard) == "notifications/resources/updated"
            assert await next_method(other_heard) == "notifications/resources/updated"
    assert "notes_add" in await every_page(gains, "tools/list", "tools")


async def test_a_changed_plugin_is_told_only_to_sessions_that_see_it_and_only_what_changed(
    env: Env, tmp_path: Path
) -> None:
    sees = await agent_session(env, "sees-notes", ["notes", "faulty"])
    blind = await agent_session(env, "blind-to-notes", ["faulty"])
    changed = tmp_path / "notes"
    shutil.copytree(NOTES_DIR, changed)
    manifest = orjson.loads((changed / "plugin.json").read_bytes())
    manifest["tools"][0]["description"] += " (now with a better description)"
    (changed / "plugin.json").write_bytes(orjson.dumps(manifest))
    with anyio.fail_after(CALL_TIMEOUT_S):
        async with listening(env, sees) as heard, listening(env, blind) as other_heard:
            await mcp0(env, "plugin", "install", "--replace", str(changed))
            assert await next_method(heard) == "notifications/tools/list_changed"
            await bump(sees)
            assert await next_method(heard) == "notifications/resources/updated"
            assert await next_method(other_heard) == "notifications/resources/updated"


async def test_a_plugin_tells_subscribers_of_a_change_after_its_call_returned(env: Env) -> None:
    # An update from a background job of the plugin, once the call that started it had
    # returned, was dropped as a frame for no call (found by review)
    client = await agent_session(env, "background", ["faulty"])
    with anyio.fail_after(CALL_TIMEOUT_S):
        async with listening(env, client) as heard:
            started = await client.call("faulty_bump_later", {"seconds": 0.05})
            assert started["result"]["content"][0]["text"] == "bumping in 0.05 s"
            # (the call's records are written: the call has returned before the job runs)
            update = (await anext(heard)).message
    # the job announced notes://not-ours first: not the plugin's, it reached no one
    assert update == {
        "jsonrpc": "2.0",
        "method": "notifications/resources/updated",
        "params": {"uri": "faulty://counter"},
    }


async def test_an_update_is_decided_for_the_transport_its_subscriber_reads_over(
    env: Env,
) -> None:
    # As it was sent, an update was decided with no transport ("unknown"): a policy that
    # forbids reads over HTTP let the HTTP subscribers hear of every change still, and one
    # that permits them only over a transport told its subscribers of none (found by a hunt)
    cut = await agent_session(env, "cut-off-http", ["faulty"])
    keeps = await agent_session(env, "reads-on-http", ["faulty"])
    rules = env.live.runtime.settings.policy_dir / "no-http-reads.cedar"
    try:
        with anyio.fail_after(CALL_TIMEOUT_S):
            async with listening(env, cut) as heard, listening(env, keeps) as other_heard:
                rules.write_text(
                    '@id("no-http-reads")\nforbid (principal == Agent::"cut-off-http", '
                    'action == Action::"read_resource", resource) '
                    'when { context.transport == "http" };\n'
                )
                env.live.runtime.policy.reload()
                read = await cut.request("resources/read", {"uri": "faulty://counter"})
                assert error_of(read)["data"]["policies"] == ["no-http-reads"]
                await bump(keeps)
                assert await next_method(other_heard) == "notifications/resources/updated"
                told: list[str] = []
                with anyio.move_on_after(0.5):  # (the update went to both in one turn)
                    async for event in heard:
                        told.append(event.message["method"])
        assert "notifications/resources/updated" not in told
    finally:
        rules.unlink()
        env.live.runtime.policy.reload()


async def test_terminating_an_agent_ends_its_sessions_and_their_streams(env: Env) -> None:
    doomed = await agent_session(env, "terminated-one", ["faulty"])
    bystander = await agent_session(env, "onlooker", ["faulty"])
    with anyio.fail_after(CALL_TIMEOUT_S):
        async with listening(env, doomed) as heard:
            await env.live.runtime.agents.terminate("terminated-one")
            await bump(bystander)  # a resource update the ended session must not hear
            rest = [event async for event in heard]  # the stream ends
    assert [e.message["method"] for e in rest if e.data] == []
    assert doomed.session_id not in env.live.app.sessions


@pytest.mark.parametrize("via", ["admin-api", "cli"])
async def test_rotating_a_token_ends_the_sessions_and_streams_opened_with_the_old_one(
    env: Env, via: str
) -> None:
    # They kept receiving notices (resource updates, list changes) until they closed: a
    # rotation for a leaked token left the leak's open streams listening (found by review)
    name = f"leaky-{via}"
    leaked = await agent_session(env, name, ["faulty"])
    bystander = await agent_session(env, f"onlooker-{via}", ["faulty"])
    with anyio.fail_after(CALL_TIMEOUT_S):
        async with listening(env, leaked) as heard, listening(env, bystander) as still_heard:
            if via == "cli":  # another process: seen within a few seconds (PRINCIPAL_TTL_S)
                await mcp0(env, "agent", "rotate-token", name)
            else:
                rotated = await env.live.runtime.agents.rotate_token(name)
            rest = [event async for event in heard]  # the stream ends
            await bump(bystander)  # another agent's session and stream go on
            assert await next_method(still_heard) == "notifications/resources/updated"
    assert [e.message["method"] for e in rest if e.data] == []
    assert leaked.session_id not in env.live.app.sessions
    assert bystander.session_id in env.live.app.sessions
    if via == "admin-api":  # the old session is gone for the new token too; a new one works
        owner = env.live.client(rotated.token)
        owner.session_id = leaked.session_id
        assert (await owner.post({"jsonrpc": "2.0", "id": 1, "method": "ping"})).status_code == 404
        owner.session_id = None
        await owner.initialize()
        assert "result" in await owner.request("ping")
        assert owner.session_id in env.live.app.sessions


async def test_a_rotation_by_another_process_ends_no_session_of_the_new_token(env: Env) -> None:
    # The check remembered the old token's hash for up to 2 s: a session the new token opened
    # at once was ended as the old token's, its running calls cut off (found by review)
    old = await agent_session(env, "swift", ["faulty"])
    await env.live.app.list_changes.check()  # (it remembers the agent with its token now)
    token = new_token()

    def rotate(agent: AgentRecord) -> None:
        agent.token_hash = hash_token(token)

    env.live.runtime.store.change_agent("swift", rotate)  # as `mcp0 agent rotate-token` does
    new = env.live.client(token)
    await new.initialize()
    await env.live.app.list_changes.check()
    assert new.session_id in env.live.app.sessions
    await env.live.app.list_changes.check()  # the old token's ends by the next check
    assert old.session_id not in env.live.app.sessions
    assert new.session_id in env.live.app.sessions
    assert "result" in await new.request("ping")


async def test_terminating_an_agent_stops_its_calls_that_have_no_session(env: Env) -> None:
    # A POST without Mcp-Session-Id, and the admin API's execute, ran on to their end after
    # the agent was terminated, and were audited as allowed after the termination's record
    # (found by review)
    token = (await env.live.runtime.agents.spawn("sessionless", ["faulty"])).token
    nap = {"name": "faulty_nap", "arguments": {"seconds": 5}}
    admin = env.live.runtime.admin_token()

    async def execute() -> httpx2.Response:
        async with httpx2.AsyncClient(timeout=CALL_TIMEOUT_S) as http:
            return await http.post(
                f"{env.live.base}/api/v1/agents/sessionless/execute",
                json={"tool": "faulty_nap", "arguments": {"seconds": 5}, "request_id": "ex1"},
                headers={"Authorization": f"Bearer {admin}"},
            )

    answers: dict[str, Any] = {}

    async def keep(name: str, call: Any) -> None:
        answers[name] = await call()

    with anyio.fail_after(4):  # well before the naps would end
        async with anyio.create_task_group() as group:
            group.start_soon(
                keep, "post", lambda: env.live.client(token).call("faulty_nap", nap["arguments"])
            )
            group.start_soon(keep, "execute", execute)
            await anyio.sleep(0.6)  # both napping
            await env.live.runtime.agents.terminate("sessionless")
    assert answers["post"]["error"]["code"] == -32001
    assert answers["execute"].status_code == 409
    assert "terminated" in answers["execute"].json()["error"]["message"]
    with anyio.fail_after(CALL_TIMEOUT_S):
        while True:
            bodies = [orjson.loads(e.body) for e in env.live.runtime.store.read_audit(0, 100_000)]
            naps = [
                (b["outcome"], b.get("code"))
                for b in bodies
                if b.get("agent") == "sessionless" and b.get("resource") == "faulty_nap"
            ]
            if len(naps) == 2:
                break
            await anyio.sleep(0.05)
    assert naps == [("error", "cancelled")] * 2
