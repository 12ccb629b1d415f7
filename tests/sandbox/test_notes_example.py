"""The bundled ``notes`` example plugin, end to end in a real worker."""

from __future__ import annotations

import pytest
from sandbox_support import NOTES_DIR, RecordingBridge

pytestmark = pytest.mark.anyio


async def notes(rt, tool, agent, **args):
    result = await rt.call_tool(tool, args, agent=agent, bridge=RecordingBridge(), timeout=10)
    return result


async def test_agents_see_only_their_own_notes(make_runtime):
    rt = await make_runtime(NOTES_DIR)
    added = await notes(rt, "notes_add", "alice", text="buy oat milk", tags=["shopping"])
    note = added["structuredContent"]["note"]
    assert note["text"] == "buy oat milk"
    assert note["tags"] == ["shopping"]
    await notes(rt, "notes_add", "bob", text="bob's milk budget")

    alice = (await notes(rt, "notes_list", "alice"))["structuredContent"]
    assert [n["text"] for n in alice["notes"]] == ["buy oat milk"]
    found = (await notes(rt, "notes_search", "bob", query="milk"))["structuredContent"]
    assert [n["text"] for n in found["notes"]] == ["bob's milk budget"]

    stolen = await notes(rt, "notes_delete", "bob", id=note["id"])
    assert stolen["isError"] is True
    assert "no note with id" in stolen["content"][0]["text"]
    assert (await notes(rt, "notes_delete", "alice", id=note["id"]))["structuredContent"] == {
        "deleted": note["id"]
    }
    assert (await notes(rt, "notes_list", "alice"))["structuredContent"]["count"] == 0


async def test_search_ranks_better_matches_first_and_filters_tags(make_runtime):
    rt = await make_runtime(NOTES_DIR)
    texts = [
        ("the garden needs water", ["home"]),
        ("sqlite full text search: ranking with bm25, search operators, search prefixes", ["db"]),
        ("a note that mentions search once", ["db"]),
        ("unrelated grocery list", []),
    ]
    for text, tags in texts:
        await notes(rt, "notes_add", "carol", text=text, tags=tags)
    found = (await notes(rt, "notes_search", "carol", query="search"))["structuredContent"]
    assert [n["text"] for n in found["notes"]] == [texts[1][0], texts[2][0]]
    assert found["notes"][0]["score"] > found["notes"][1]["score"]

    tagged = await notes(rt, "notes_search", "carol", query="search OR garden", tag="home")
    assert [n["text"] for n in tagged["structuredContent"]["notes"]] == ["the garden needs water"]
    stemmed = (await notes(rt, "notes_search", "carol", query="ranks"))["structuredContent"]
    assert stemmed["count"] == 1  # porter stemming: "ranks" finds "ranking"
    limited = (await notes(rt, "notes_search", "carol", query="search", limit=1))[
        "structuredContent"
    ]
    assert limited["count"] == 1

    recent = (await notes(rt, "notes_list", "carol", limit=2))["structuredContent"]
    assert [n["text"] for n in recent["notes"]] == [texts[3][0], texts[2][0]]
    db_notes = (await notes(rt, "notes_list", "carol", tag="db"))["structuredContent"]
    assert db_notes["count"] == 2


async def test_bad_query_syntax_is_a_tool_error(make_runtime):
    rt = await make_runtime(NOTES_DIR)
    result = await notes(rt, "notes_search", "dave", query='"unbalanced')
    assert result["isError"] is True
    assert "FTS5 query syntax" in result["content"][0]["text"]


async def test_notes_survive_a_worker_restart(make_runtime):
    rt = await make_runtime(NOTES_DIR)
    await notes(rt, "notes_add", "erin", text="persistent thought")
    await rt.close()
    await rt.start()
    found = (await notes(rt, "notes_search", "erin", query="thought"))["structuredContent"]
    assert found["count"] == 1
