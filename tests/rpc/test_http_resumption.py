"""Resuming SSE streams with GET and ``Last-Event-ID``: one connection carries a stream at a
time, and a message goes out on one connection only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import pytest
from rpc_live import (
    CALL_TIMEOUT_S,
    CHATTY_DIR,
    CONFORMANCE_DIR,
    FAULTY_DIR,
    Env,
    McpHttp,
    SseEvent,
    served_agent,
    sse_events,
)

from mcp_zero.config import Settings
from mcp_zero.rpc.streams import MAX_TOTAL_BUFFERED_BYTES

pytestmark = pytest.mark.anyio
JSON = dict[str, Any]


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    data = tmp_path_factory.mktemp("http-resumption") / "data"
    async with served_agent(data, "resumer", [CONFORMANCE_DIR, FAULTY_DIR]) as served:
        yield served


def resuming(client: McpHttp, last_event_id: str) -> dict[str, str]:
    return client.headers(Accept="text/event-stream", **{"Last-Event-ID": last_event_id})


async def rest(events: AsyncIterator[SseEvent]) -> list[JSON]:
    """The messages left on a stream, until its response ends."""
    return [event.message async for event in events if event.data]


SAMPLING_ANSWER = {
    "role": "assistant",
    "content": {"type": "text", "text": "hi"},
    "model": "test-model",
    "stopReason": "endTurn",
}


async def test_a_second_resume_takes_the_stream_over_and_each_message_goes_out_once(
    env: Env,
) -> None:
    client = env.live.client(env.token)
    await client.initialize(capabilities={"sampling": {}})
    # the call waits for the client's answer to its sampling request: nothing moves until then
    call = {
        "jsonrpc": "2.0",
        "id": "s1",
        "method": "tools/call",
        "params": {"name": "test_sampling", "arguments": {"prompt": "say hi"}},
    }
    async with httpx2.AsyncClient(verify=False, timeout=CALL_TIMEOUT_S) as http:
        with anyio.fail_after(CALL_TIMEOUT_S):
            async with http.stream(
                "POST", env.live.url, content=orjson.dumps(call), headers=client.headers()
            ) as original:
                first = sse_events(original)
                priming = await anext(first)
                ask = await anext(first)
                assert ask.message["method"] == "sampling/createMessage"
                assert priming.id is not None
                assert ask.id is not None
                async with http.stream(
                    "GET", env.live.url, headers=resuming(client, priming.id)
                ) as one:
                    assert one.status_code == 200
                    resumed_one = sse_events(one)
                    assert (await anext(resumed_one)).message == ask.message  # replayed
                    # the POST's own connection was ended cleanly when the resume took over
                    assert await rest(first) == []
                    async with http.stream(
                        "GET", env.live.url, headers=resuming(client, ask.id)
                    ) as two:
                        assert two.status_code == 200
                        # ... and so was the first resume's, when the second took over
                        assert await rest(resumed_one) == []
                        answer = {"jsonrpc": "2.0", "id": ask.message["id"]}
                        answered = await client.post({**answer, "result": SAMPLING_ANSWER})
                        assert answered.status_code == 202
                        # the result goes out once: on the connection that carries the stream
                        result = await rest(sse_events(two))
    assert [m["id"] for m in result] == ["s1"]
    assert result[0]["result"]["content"][0]["text"] == "LLM response: hi"


async def bumped(client: McpHttp) -> None:
    """faulty_bump: subscribers of faulty://counter get notifications/resources/updated."""
    reply = await client.call("faulty_bump")
    assert "bumped to" in reply["result"]["content"][0]["text"]


async def test_the_get_stream_is_resumed_after_the_last_event_then_goes_on_live(
    env: Env,
) -> None:
    client = env.live.client(env.token)
    await client.initialize()
    assert "result" in await client.request("resources/subscribe", {"uri": "faulty://counter"})
    get = client.headers(Accept="text/event-stream")
    async with httpx2.AsyncClient(verify=False, timeout=CALL_TIMEOUT_S) as http:
        with anyio.fail_after(CALL_TIMEOUT_S):
            async with http.stream("GET", env.live.url, headers=get) as response:
                events = sse_events(response)
                assert (await anext(events)).data == ""  # priming
                await bumped(client)
                seen = await anext(events)
            assert seen.id is not None
            # the connection is gone: what the session is told meanwhile is kept for it
            await bumped(client)
            await bumped(client)
            async with http.stream("GET", env.live.url, headers=resuming(client, seen.id)) as again:
                assert again.status_code == 200
                resumed = sse_events(again)
                missed = [await anext(resumed), await anext(resumed)]
                await bumped(client)  # live again
                live = await anext(resumed)
                # a plain GET is refused while the resumed one carries the stream
                second = await http.get(env.live.url, headers=get)
                assert second.status_code == 409
    for event in [seen, *missed, live]:
        assert event.message["method"] == "notifications/resources/updated"
    stream, first = seen.id.rsplit("-", 1)
    assert [e.id for e in [*missed, live]] == [f"{stream}-{int(first) + n}" for n in (1, 2, 3)]


async def test_deleting_the_session_ends_its_get_stream(env: Env) -> None:
    client = env.live.client(env.token)
    await client.initialize()
    async with httpx2.AsyncClient(verify=False, timeout=CALL_TIMEOUT_S) as http:
        with anyio.fail_after(CALL_TIMEOUT_S):
            headers = client.headers(Accept="text/event-stream")
            async with http.stream("GET", env.live.url, headers=headers) as response:
                events = sse_events(response)
                assert (await anext(events)).data == ""
                deleted = await http.delete(env.live.url, headers=client.headers())
                assert deleted.status_code == 204
                assert await rest(events) == []  # ended, cleanly


async def logged_call(
    http: httpx2.AsyncClient, client: McpHttp, n: int, size: int
) -> list[SseEvent]:
    """chatty_logs: ``n`` log messages of ``size`` bytes, then the answer, on an SSE stream;
    its events, read to the end (the stream is finished)."""
    call = {
        "jsonrpc": "2.0",
        "id": client.next_id(),
        "method": "tools/call",
        "params": {"name": "chatty_logs", "arguments": {"n": n, "size": size}},
    }
    async with http.stream(
        "POST", client.live.url, content=orjson.dumps(call), headers=client.headers()
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [event async for event in sse_events(response)]
    assert events[-1].message["result"]["content"][0]["text"] == f"logged {n}"
    return events


async def test_a_finished_stream_whose_events_the_buffer_cap_took_is_gone(
    tmp_path: Path,
) -> None:
    # 64 MiB by default, so this answer (architecture.md: "a finished stream with none of
    # its events left is gone, 404 as after its minute") had no HTTP test; sse_buffer_bytes
    # makes the cap small.
    assert Settings().sse_buffer_bytes == MAX_TOTAL_BUFFERED_BYTES
    cap = 100_000
    data = tmp_path / "data"
    async with served_agent(data, "capped", [CHATTY_DIR], sse_buffer_bytes=cap) as env:
        client = env.live.client(env.token)
        await client.initialize()
        async with httpx2.AsyncClient(verify=False, timeout=CALL_TIMEOUT_S) as http:
            with anyio.fail_after(CALL_TIMEOUT_S):
                first = await logged_call(http, client, 2, 1000)
                priming = first[0].id
                assert priming is not None
                # finished, and kept: a resume replays what it sent
                async with http.stream(
                    "GET", env.live.url, headers=resuming(client, priming)
                ) as again:
                    assert again.status_code == 200
                    replayed = await rest(sse_events(again))
                assert replayed == [event.message for event in first[1:]]
                # a second call's events fill the cap: the finished stream's go first
                await logged_call(http, client, 5, cap // 4)
                gone = await http.get(env.live.url, headers=resuming(client, priming))
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == -32001
    assert "no stream to resume" in gone.json()["error"]["message"]
