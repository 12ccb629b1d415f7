"""Per-agent rate limits and concurrency quotas as a client over HTTP meets them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import pytest
from rpc_live import (
    CALL_TIMEOUT_S,
    FAULTY_DIR,
    LiveServer,
    McpHttp,
    error_of,
    make_runtime,
    serve,
    sse_events,
    text_of,
)

pytestmark = pytest.mark.anyio
JSON = dict[str, Any]


@pytest.fixture(scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveServer]:
    runtime = make_runtime(
        tmp_path_factory.mktemp("http-limits") / "data",
        rate_limit=0.5,
        rate_burst=3,
        max_concurrency=2,
    )
    runtime.plugins.install(FAULTY_DIR)
    async with serve(runtime) as live:
        yield live


async def test_calls_over_the_rate_limit_are_32004_with_retry_after(live: LiveServer) -> None:
    agent = await live.runtime.agents.spawn("rater", ["faulty"])
    client = live.client(agent.token)
    for n in range(3):  # the burst
        assert text_of(await client.call("faulty_echo", {"text": str(n)})) == str(n)
    reply = await client.call("faulty_echo", {"text": "one too many"})
    error = error_of(reply)
    assert error["code"] == -32004
    assert error["data"]["code"] == "rate_limited"
    assert 0 < error["data"]["retry_after"] <= 2.0
    # the limit is per agent: another agent is not affected
    other = await live.runtime.agents.spawn("rater2", ["faulty"])
    assert text_of(await live.client(other.token).call("faulty_echo", {"text": "x"})) == "x"
    # and the refused call is audited
    records = [e.body for e in live.runtime.store.read_audit(0, 10_000)]
    assert any(b'"rate_limited"' in body and b'"rater"' in body for body in records)


async def test_lists_and_subscriptions_count_against_the_rate_limit(live: LiveServer) -> None:
    agent = await live.runtime.agents.spawn("chatty", ["faulty"])
    client = live.client(agent.token)
    await client.initialize()
    for method in ("tools/list", "resources/list", "prompts/list"):  # the burst
        assert "result" in await client.request(method)
    refused = [
        error_of(await client.request("tools/list")),
        error_of(await client.request("resources/subscribe", {"uri": "faulty://counter"})),
        error_of(await stateless_listen(client, ["faulty://counter"])),
    ]
    for error in refused:  # as a governed call over the limit is answered
        assert error["code"] == -32004
        assert error["data"]["code"] == "rate_limited"
        assert 0 < error["data"]["retry_after"] <= 2.0
    # the refused subscriptions are audited as such
    records = [orjson.loads(e.body) for e in live.runtime.store.read_audit(0, 10_000)]
    assert sorted(
        r["method"]
        for r in records
        if r["agent"] == "chatty" and r.get("code") == "rate_limited" and "method" in r
    ) == ["resources/subscribe", "subscriptions/listen"]


async def test_a_subscription_refused_by_the_rate_limit_is_one_audit_record(
    live: LiveServer,
) -> None:
    # It was one record per URI named: 30 listens of 1,000 URIs each over the limit wrote
    # 28,000 records, and an agent could fill the audit log with refused requests.
    agent = await live.runtime.agents.spawn("flooder", ["faulty"])
    client = live.client(agent.token)
    await client.initialize()
    for _ in range(3):  # the burst
        assert "result" in await client.request("tools/list")
    uris = [f"faulty://counter/{n}" for n in range(500)]
    error = error_of(await stateless_listen(client, uris))
    assert error["data"]["code"] == "rate_limited"
    records = [orjson.loads(e.body) for e in live.runtime.store.read_audit(0, 100_000)]
    [record] = [r for r in records if r["agent"] == "flooder"]
    assert record["method"] == "subscriptions/listen"
    assert (record["outcome"], record["code"]) == ("error", "rate_limited")
    assert record["uri_count"] == 500
    assert record["resource"] == "faulty://counter/0"


async def stateless_listen(client: McpHttp, uris: list[str]) -> dict[str, Any]:
    """An MCP 2026-07-28 subscriptions/listen (no session) by the client's agent, answered
    at once (refused) as JSON."""
    version = "2026-07-28"
    body = {
        "jsonrpc": "2.0",
        "id": client.next_id(),
        "method": "subscriptions/listen",
        "params": {
            "notifications": {"resourceSubscriptions": uris},
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": version,
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "tests", "version": "0"},
            },
        },
    }
    sessionless = McpHttp(client.live, client.token)
    response = await sessionless.post(
        body, **{"MCP-Protocol-Version": version, "Mcp-Method": "subscriptions/listen"}
    )
    reply: dict[str, Any] = response.json()
    return reply


async def test_calls_over_the_agent_concurrency_are_32005(live: LiveServer) -> None:
    agent = await live.runtime.agents.spawn("busy", ["faulty"])
    client = live.client(agent.token)
    quotas = live.runtime.quotas
    async with anyio.create_task_group() as group:
        replies: list[dict[str, object]] = []

        async def nap() -> None:
            replies.append(await client.call("faulty_nap", {"seconds": 1.0}))

        group.start_soon(nap)
        group.start_soon(nap)
        with anyio.fail_after(10):
            while quotas.inflight("busy") < 2:  # both naps admitted and running
                await asyncio.sleep(0.01)
        reply = await client.call("faulty_echo", {"text": "third"})
        error = error_of(reply)
        assert error["code"] == -32005
        assert error["data"]["code"] == "quota_exceeded"
        assert error["data"]["scope"] == "agent"
        assert error["data"]["limit"] == 2
    assert [text_of(r) for r in replies] == ["napped 1.0", "napped 1.0"]
    assert quotas.inflight("busy") == 0


@pytest.fixture
async def few_sessions(tmp_path: Path) -> AsyncIterator[LiveServer]:
    runtime = make_runtime(tmp_path / "data", max_sessions=3, max_sessions_per_agent=2)
    runtime.plugins.install(FAULTY_DIR)
    async with serve(runtime) as live:
        yield live


async def test_an_agent_opening_too_many_sessions_loses_its_least_recent(
    few_sessions: LiveServer,
) -> None:
    live = few_sessions
    greedy = await live.runtime.agents.spawn("greedy", ["faulty"])
    first, second, third = (live.client(greedy.token) for _ in range(3))
    await first.initialize()
    await second.initialize()
    assert "result" in await first.request("ping")  # now `second` is the least recent
    await third.initialize()
    gone = await second.post({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert gone.status_code == 404
    for kept in (first, third):
        assert text_of(await kept.call("faulty_echo", {"text": "still here"})) == "still here"
    # the greedy agent holds 2 of the 3: another agent still gets the last one ...
    other = live.client((await live.runtime.agents.spawn("other", ["faulty"])).token)
    await other.initialize()
    # ... and past the server's limit an initialize is refused, not anyone's session dropped
    late = live.client((await live.runtime.agents.spawn("late", ["faulty"])).token)
    refused = await late.post(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {}},
        }
    )
    assert refused.status_code == 503
    assert refused.json()["error"]["message"] == "too many open sessions; retry later"
    assert "result" in await other.request("ping")


async def test_a_new_session_pushes_out_an_idle_one_never_one_running_a_call(
    few_sessions: LiveServer,
) -> None:
    # The least recently used session was dropped even while it ran calls, which were cut
    # off and whose answers were lost (found by review)
    live = few_sessions
    quotas = live.runtime.quotas
    token = (await live.runtime.agents.spawn("crowded", ["faulty"])).token
    first, second, third, fourth = (live.client(token) for _ in range(4))
    await first.initialize()
    await second.initialize()
    replies: dict[str, JSON] = {}

    async def nap(name: str, client: McpHttp) -> None:
        replies[name] = await client.call("faulty_nap", {"seconds": 0.5})

    async def running(count: int) -> None:
        with anyio.fail_after(10):
            while quotas.inflight("crowded") < count:
                await asyncio.sleep(0.01)

    async with anyio.create_task_group() as group:
        group.start_soon(nap, "first", first)
        await running(1)
        assert "result" in await second.request("ping")  # `first` is the least recent, busy
        await third.initialize()
        gone = await second.post({"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert gone.status_code == 404
        group.start_soon(nap, "third", third)
        await running(2)
        # every session of the agent runs a call: the new one is refused, none cut off
        refused = await fourth.post(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {}},
            }
        )
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["data"] == {"code": "too_many_sessions"}
        assert "max_sessions_per_agent" in error["message"]
        assert "mcp-session-id" not in refused.headers
    assert {name: text_of(reply) for name, reply in replies.items()} == {
        "first": "napped 0.5",
        "third": "napped 0.5",
    }


async def test_a_session_that_only_holds_its_get_stream_open_is_pushed_out_for_a_new_one(
    few_sessions: LiveServer,
) -> None:
    # A GET stream held open (keepalives keep an idle one open for ever) kept its session
    # from being pushed out: a client holding two locked its agent out of new sessions, the
    # agent's owner after a token rotation too (found by review)
    live = few_sessions
    token = (await live.runtime.agents.spawn("streamer", ["faulty"])).token
    calling, streaming, new = (live.client(token) for _ in range(3))
    await calling.initialize()
    await streaming.initialize()
    replies: list[JSON] = []

    async def nap() -> None:
        replies.append(await calling.call("faulty_nap", {"seconds": 0.5}))

    with anyio.fail_after(CALL_TIMEOUT_S):
        async with (
            httpx2.AsyncClient(verify=False, timeout=CALL_TIMEOUT_S) as http,
            http.stream(
                "GET", live.url, headers=streaming.headers(Accept="text/event-stream")
            ) as got,
            anyio.create_task_group() as group,
        ):
            held = sse_events(got)
            assert (await anext(held)).data == ""  # the stream is open
            group.start_soon(nap)
            while live.runtime.quotas.inflight("streamer") < 1:
                await asyncio.sleep(0.01)
            assert "result" in await streaming.request("ping")  # `calling` is the least recent
            await new.initialize()
            assert [event async for event in held] == []  # its stream ended with it
            gone = await streaming.post({"jsonrpc": "2.0", "id": 1, "method": "ping"})
            assert gone.status_code == 404
    assert [text_of(reply) for reply in replies] == ["napped 0.5"]
