"""SSE event streams: numbering, buffering and resumption."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any

import anyio
import pytest

from mcp_zero.rpc import streams
from mcp_zero.rpc.streams import EventStream, FinishedStreams, parse_event_id

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
    await stream.close()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await stream.attach(1, send)  # events 2 and 3 are gone: 3, 4, 5 are kept
    assert _ids(sent[:-1]) == [3, 4, 5]
    assert sent[-1] == {"type": "http.response.body", "body": b""}  # closed: the end follows
    sent.clear()
    with anyio.fail_after(5):
        await stream.attach(4, send)
    assert _ids(sent[:-1]) == [5]


async def test_a_connection_catches_up_then_gets_live_events_until_the_stream_closes() -> None:
    stream = EventStream()
    await stream.push({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        conn = await stream.attach(0, send)
        await stream.push({"jsonrpc": "2.0", "id": 1, "result": {}})
        assert not conn.ended.is_set()
        await stream.close()
    assert conn.ended.is_set()
    assert _ids(sent[:-1]) == [1, 2]
    assert sent[-1]["body"] == b""


async def test_a_resume_takes_the_stream_over_and_ends_the_connection_before() -> None:
    first: list[dict[str, Any]] = []
    second: list[dict[str, Any]] = []

    async def send_first(message: dict[str, Any]) -> None:
        first.append(message)

    async def send_second(message: dict[str, Any]) -> None:
        second.append(message)

    stream = EventStream(send_first)
    with anyio.fail_after(5):
        await stream.push({"jsonrpc": "2.0", "method": "notifications/progress"})
        conn = await stream.attach(1, send_second)
        await stream.push({"jsonrpc": "2.0", "id": 1, "result": {}})
        await stream.close()
    assert _ids(first[:-1]) == [1]
    assert first[-1]["body"] == b""  # ended cleanly when the resume took over
    assert _ids(second[:-1]) == [2]  # only the second has what came after
    assert conn.ended.is_set()


def test_parse_event_id_rejects_garbage() -> None:
    assert parse_event_id("abc-7") == ("abc", 7)
    assert parse_event_id("abc") is None
    assert parse_event_id("abc-x") is None


def _padded(i: int, size: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": "notifications/message",
        "params": {"i": i, "pad": "x" * size},
    }


async def test_a_stream_keeps_at_most_its_byte_bound_of_events_the_newest_first() -> None:
    stream = EventStream(keep_bytes=100_000)
    for i in range(100):  # 1 MB pushed, ten times the bound
        await stream.push(_padded(i, 10_000))
    await stream.close()
    assert sum(map(len, stream.events)) <= 100_000
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await stream.attach(0, send)  # from the start: the replay begins at the oldest kept
    ids = _ids(sent[:-1])
    assert ids == list(range(101 - len(ids), 101))  # the newest, in order, numbered as pushed
    assert 5 <= len(ids) <= 10


async def test_an_event_over_the_bound_is_still_kept_when_it_is_the_newest() -> None:
    stream = EventStream(keep_bytes=1_000)
    await stream.push(_padded(0, 10))
    await stream.push(_padded(1, 5_000))  # the response may be larger than the bound
    assert len(stream.events) == 1
    assert b'"i":1' in stream.events[0]


def _held(kept: list[EventStream]) -> int:
    return sum(len(event) for stream in kept for event in stream.events)


async def _live_bytes() -> int:
    """What live streams hold, once the finished streams of other tests (which give way
    first) hold nothing: a push past a total bound of 0 drops it all."""
    await EventStream(keep_total=0).push(_padded(0, 1))
    return streams.buffered_bytes()


async def test_all_streams_together_keep_at_most_the_total_bound() -> None:
    before = await _live_bytes()
    kept = [EventStream(keep_total=before + 300_000) for _ in range(10)]
    for stream in kept:
        for i in range(10):  # 100 KB each, a million bytes in all
            await stream.push(_padded(i, 10_000))
            # the newest events count too: the bound holds after every push
            assert streams.buffered_bytes() <= before + 300_000
    assert 290_000 <= _held(kept) <= 300_000
    assert [len(stream.events) for stream in kept[-5:]] == [0, 0, 0, 0, 0]
    others = streams.buffered_bytes() - _held(kept)
    del stream
    kept.clear()  # streams that are gone no longer count
    assert streams.buffered_bytes() == others


async def test_finished_streams_with_large_answers_stay_under_the_total_bound() -> None:
    before = await _live_bytes()
    bound = before + 300_000
    finished: list[EventStream] = []
    for i in range(30):  # 30 calls answered with 100 KB each after a log message: 3 MB
        stream = EventStream(keep_total=bound)
        await stream.push(_padded(i, 100))
        await stream.push({"jsonrpc": "2.0", "id": i, "result": {"pad": "x" * 100_000}})
        await stream.close()
        finished.append(stream)
        assert streams.buffered_bytes() <= bound
    # the first finished went first: the newest keep their answers, whole
    assert [stream.spent for stream in finished[-2:]] == [False, False]
    assert all(stream.spent for stream in finished[:-3])
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await finished[-1].attach(1, send)  # the client had the log message: the answer
    assert _ids(sent[:-1]) == [2]
    assert b'"id":29' in sent[0]["body"]
    assert sent[-1] == {"type": "http.response.body", "body": b""}


async def test_past_the_total_bound_finished_streams_give_way_before_live_ones() -> None:
    bound = await _live_bytes() + 300_000
    live, done, pushing = (EventStream(keep_total=bound) for _ in range(3))
    await live.push(_padded(0, 150_000))
    await done.push(_padded(1, 100_000))
    await done.close()
    await pushing.push(_padded(2, 100_000))  # 350 KB: the finished stream's event goes
    assert streams.buffered_bytes() <= bound
    assert done.spent
    assert len(live.events) == 1
    assert len(pushing.events) == 1


async def test_a_finished_stream_keeps_little_besides_its_events() -> None:
    # Kept a minute for a resume, a finished stream of two small events held ~2.1 KB
    # besides them (its deque's block of 64 slots, a weakref.finalize, a timer of its own):
    # ~0.4 MiB/s at a steady load of SSE answers. A resume needs its events, its id and count.
    count = 2_000
    kept: dict[str, Any] = {}
    finished = FinishedStreams()
    await _live_bytes()  # (other tests' finished streams hold nothing: none go meanwhile)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            stream = EventStream()
            kept[stream.id] = stream
            await stream.push(_padded(i, 10))
            await stream.push({"jsonrpc": "2.0", "id": i, "result": {}})
            await stream.close()
            finished.keep(kept, stream.id)
        del stream
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    events = sum(len(event) for stream in kept.values() for event in stream.events)
    assert len(kept) == count
    assert all(len(stream.events) == 2 for stream in kept.values())
    per_stream = (held - events) / count
    assert per_stream < 1024, f"a finished stream holds {per_stream:.0f} bytes besides events"


async def test_finished_streams_go_from_their_session_when_their_time_is_up() -> None:
    kept: dict[str, Any] = {}
    finished = FinishedStreams(keep_s=0.05)
    for _ in range(3):
        stream = EventStream()
        kept[stream.id] = stream
        await stream.push(_padded(0, 10))
        await stream.close()
        finished.keep(kept, stream.id)
    assert len(kept) == 3
    with anyio.fail_after(5):
        while kept:
            await asyncio.sleep(0.01)
    # a stream finished later is kept and goes in turn, its timer armed anew
    stream = EventStream()
    kept[stream.id] = stream
    finished.keep(kept, stream.id)
    assert stream.id in kept
    with anyio.fail_after(5):
        while kept:
            await asyncio.sleep(0.01)


async def test_a_finished_stream_takes_no_more_events() -> None:
    stream = EventStream()
    await stream.push(_padded(0, 10))
    await stream.close()
    await stream.push(_padded(1, 10))  # (e.g. a notice to a session that just ended)
    assert (stream.count, len(stream.events)) == (1, 1)
