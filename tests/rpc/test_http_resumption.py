"""Resuming SSE streams with GET and ``Last-Event-ID``: one connection carries a stream at a
time, and a message goes out on one connection only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import orjson
import pytest
from rpc_live import (
    CALL_TIMEOUT_S,
    CONFORMANCE_DIR,
    FAULTY_DIR,
    LiveServer,
    McpHttp,
    SseEvent,
    make_runtime,
    serve,
    sse_events,
)

pytestmark = pytest.mark.anyio
JSON = dict[str, Any]


@dataclass
class Env:
    live: LiveServer
    token: str


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    runtime = make_runtime(tmp_path_factory.mktemp("http-resumption") / "data")
    runtime.plugins.install(CONFORMANCE_DIR)
    runtime.plugins.install(FAULTY_DIR)
    agent = await runtime.agents.spawn("resumer", ["conformance", "faulty"])
    async with serve(runtime) as live:
        yield Env(live, agent.token)


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
