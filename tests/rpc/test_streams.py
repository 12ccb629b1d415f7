"""SSE event streams: numbering, buffering and resumption."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from mcp_zero.rpc.streams import EventStream, parse_event_id

pytestmark = pytest.mark.anyio


def _ids(sent: list[dict[str, Any]]) -> list[int]:
    out = []
    for message in sent:
        line = message["body"].split(b"\n", 1)[0].decode()
        parsed = parse_event_id(line.removeprefix("id: "))
        assert parsed is not None
        out.append(parsed[1])
    return out


async def test_ids_keep_counting_past_the_buffer_and_resume_from_the_oldest_kept() -> None:
    stream = EventStream(keep=3)
    for i in range(5):
        await stream.push({"jsonrpc": "2.0", "method": "notifications/message", "params": {"i": i}})
    stream.close()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await stream.replay(1, send)  # events 2 and 3 are gone: 3, 4, 5 are kept
    assert _ids(sent) == [3, 4, 5]
    sent.clear()
    with anyio.fail_after(5):
        await stream.replay(4, send)
    assert _ids(sent) == [5]


async def test_replay_follows_live_events_until_the_stream_closes() -> None:
    stream = EventStream()
    await stream.push({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.replay, 0, send)
            await anyio.wait_all_tasks_blocked()
            await stream.push({"jsonrpc": "2.0", "id": 1, "result": {}})
            stream.close()
    assert _ids(sent) == [1, 2]


def test_parse_event_id_rejects_garbage() -> None:
    assert parse_event_id("abc-7") == ("abc", 7)
    assert parse_event_id("abc") is None
    assert parse_event_id("abc-x") is None
