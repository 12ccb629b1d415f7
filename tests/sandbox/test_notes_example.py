"""The bundled ``notes`` example plugin, end to end in a real worker."""

from __future__ import annotations

import sqlite3

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


# The pending list, in-process: the module's storage code without a worker around it.


@pytest.fixture
def notes_module(monkeypatch):
    monkeypatch.syspath_prepend(str(NOTES_DIR))
    import notes_plugin

    return notes_plugin


def _fts_matches_notes(db) -> None:
    # FTS5's own check of the index against its external content table (`rank` = 1).
    db.conn.execute("INSERT INTO notes_fts(notes_fts, rank) VALUES ('integrity-check', 1)")


def _search(db, query: str) -> list[int]:
    db.index_pending()
    sql = "SELECT rowid FROM notes_fts WHERE notes_fts MATCH ? ORDER BY rowid"
    return [r[0] for r in db.conn.execute(sql, (query,))]


@pytest.mark.parametrize("indexed_first", [False, True])
def test_a_deleted_note_leaves_the_index_whether_it_was_pending_or_not(
    notes_module, tmp_path, indexed_first
):
    db = notes_module.NotesDB(tmp_path / "notes.db")
    keep = notes_module.add_note(db, "a", "apples to keep", None)["note"]["id"]
    gone = notes_module.add_note(db, "a", "apples to drop", None)["note"]["id"]
    assert db.pending == 2
    if indexed_first:
        db.index_pending()
        assert db.pending == 0
    db.conn.execute("DELETE FROM notes WHERE id = ?", (gone,))
    db.conn.commit()
    assert _search(db, "apples") == [keep]
    _fts_matches_notes(db)


def test_a_full_pending_list_is_indexed_in_one_go(notes_module, tmp_path):
    db = notes_module.NotesDB(tmp_path / "notes.db", index_batch=5)
    for i in range(4):
        notes_module.add_note(db, "a", f"note {i}", None)
    assert db.pending == 4
    assert db.conn.execute("SELECT count(*) FROM notes_fts_docsize").fetchone()[0] == 0
    notes_module.add_note(db, "a", "note 4", None)
    assert db.pending == 0
    assert db.conn.execute("SELECT count(*) FROM notes_fts_docsize").fetchone()[0] == 5
    _fts_matches_notes(db)


def test_a_search_indexes_notes_another_worker_added(notes_module, tmp_path):
    # Two workers of the plugin: two connections, each with its own count.
    first = notes_module.NotesDB(tmp_path / "notes.db")
    second = notes_module.NotesDB(tmp_path / "notes.db")
    notes_module.add_note(first, "a", "plums from the first worker", None)
    assert second.pending == 0
    assert len(_search(second, "plums")) == 1
    _fts_matches_notes(second)


def test_pending_notes_survive_a_reopen(notes_module, tmp_path):
    db = notes_module.NotesDB(tmp_path / "notes.db")
    notes_module.add_note(db, "a", "written before the crash", None)
    db.conn.close()
    reopened = notes_module.NotesDB(tmp_path / "notes.db")
    assert reopened.pending == 1
    assert len(_search(reopened, "crash")) == 1


def test_a_database_of_the_first_schema_is_migrated_in_place(notes_module, tmp_path):
    # Version 0 (0.1.0 before the pending list): triggers indexed each note on insert.
    old = sqlite3.connect(tmp_path / "notes.db")
    old.executescript(
        """
        CREATE TABLE notes (id INTEGER PRIMARY KEY, agent TEXT NOT NULL, text TEXT NOT NULL,
                            tags TEXT NOT NULL DEFAULT '', created TEXT NOT NULL);
        CREATE INDEX notes_agent ON notes(agent, id);
        CREATE VIRTUAL TABLE notes_fts USING fts5(
            text, tags, content='notes', content_rowid='id', tokenize='porter unicode61');
        CREATE TRIGGER notes_ai AFTER INSERT ON notes BEGIN
            INSERT INTO notes_fts(rowid, text, tags) VALUES (new.id, new.text, new.tags);
        END;
        CREATE TRIGGER notes_ad AFTER DELETE ON notes BEGIN
            INSERT INTO notes_fts(notes_fts, rowid, text, tags)
            VALUES ('delete', old.id, old.text, old.tags);
        END;
        INSERT INTO notes(agent, text, created) VALUES ('a', 'old pears', 'x');
        INSERT INTO notes(agent, text, created) VALUES ('a', 'old figs', 'x');
        """
    )
    old.close()
    db = notes_module.NotesDB(tmp_path / "notes.db")
    assert db.conn.execute("PRAGMA user_version").fetchone()[0] == 1
    sql = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
    triggers = {r[0] for r in db.conn.execute(sql)}
    assert triggers == {"notes_ad"}
    assert db.pending == 0
    assert _search(db, "pears") == [1]
    db.conn.execute("DELETE FROM notes WHERE id = 1")
    db.conn.commit()
    assert _search(db, "pears OR figs") == [2]
    _fts_matches_notes(db)
