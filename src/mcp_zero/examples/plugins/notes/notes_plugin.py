"""Example plugin: per-agent notes with ranked full-text search.

Notes live in one SQLite database in the plugin's private data directory, with
an FTS5 index ranked by BM25. Every query is scoped to ``ctx.agent``, so an
agent sees, finds and deletes only its own notes.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mcp_zero.plugin import Context, Plugin, ToolError

plugin = Plugin("notes")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id      INTEGER PRIMARY KEY,
    agent   TEXT NOT NULL,
    text    TEXT NOT NULL,
    tags    TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS notes_agent ON notes(agent, id);
CREATE VIRTUAL TABLE IF NOT EXISTS notes_fts USING fts5(
    text, tags, content='notes', content_rowid='id', tokenize='porter unicode61'
);
CREATE TRIGGER IF NOT EXISTS notes_ai AFTER INSERT ON notes BEGIN
    INSERT INTO notes_fts(rowid, text, tags) VALUES (new.id, new.text, new.tags);
END;
CREATE TRIGGER IF NOT EXISTS notes_ad AFTER DELETE ON notes BEGIN
    INSERT INTO notes_fts(notes_fts, rowid, text, tags)
    VALUES ('delete', old.id, old.text, old.tags);
END;
"""

_local = threading.local()


def connect(data_dir: Path) -> sqlite3.Connection:
    """This thread's connection to the notes database in ``data_dir`` (created on first use)."""
    # The handlers are ``async def``: they run on the worker's event loop, one at a time,
    # because each is a short SQLite statement — a thread hop per call would cost more
    # than the query. So this is one connection; it stays per-thread should a handler
    # ever become a plain ``def`` (which the worker runs in its thread pool).
    conn: sqlite3.Connection | None = getattr(_local, "conn", None)
    if conn is None:
        conn = sqlite3.connect(data_dir / "notes.db", timeout=5.0)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        _local.conn = conn
    return conn


def _note(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "text": row["text"],
        "tags": row["tags"].split() if row["tags"] else [],
        "created": row["created"],
    }


def _tag_pattern(tag: str | None) -> str | None:
    # Tags are stored space-separated with a leading and trailing space for exact matching.
    return f"% {tag} %" if tag else None


def add_note(
    conn: sqlite3.Connection, agent: str, text: str, tags: list[str] | None
) -> dict[str, Any]:
    """Insert a note of ``agent`` (and index it); return the ``notes_add`` result."""
    clean = sorted({t.strip() for t in tags or [] if t.strip()})
    stored = f" {' '.join(clean)} " if clean else ""
    created = datetime.now(UTC).isoformat(timespec="seconds")
    with conn:
        cur = conn.execute(
            "INSERT INTO notes(agent, text, tags, created) VALUES (?, ?, ?, ?)",
            (agent, text, stored, created),
        )
    return {"note": {"id": cur.lastrowid, "text": text, "tags": clean, "created": created}}


@plugin.tool("notes_add")
async def notes_add(ctx: Context, text: str, tags: list[str] | None = None) -> dict[str, Any]:
    return add_note(connect(ctx.data_dir), ctx.agent, text, tags)


@plugin.tool("notes_search")
async def notes_search(
    ctx: Context, query: str, tag: str | None = None, limit: int = 10
) -> dict[str, Any]:
    pattern = _tag_pattern(tag)
    try:
        rows = (
            connect(ctx.data_dir)
            .execute(
                "SELECT n.id, n.text, n.tags, n.created, bm25(notes_fts) AS score"
                " FROM notes_fts JOIN notes n ON n.id = notes_fts.rowid"
                " WHERE notes_fts MATCH ? AND n.agent = ? AND (? IS NULL OR n.tags LIKE ?)"
                " ORDER BY score LIMIT ?",
                (query, ctx.agent, pattern, pattern, limit),
            )
            .fetchall()
        )
    except sqlite3.OperationalError as exc:
        raise ToolError(
            f"cannot search for {query!r}: {exc} (check the FTS5 query syntax)"
        ) from None
    # bm25() is lower-is-better; report a higher-is-better score.
    notes = [{**_note(r), "score": -r["score"]} for r in rows]
    return {"query": query, "count": len(notes), "notes": notes}


@plugin.tool("notes_list")
async def notes_list(ctx: Context, tag: str | None = None, limit: int = 20) -> dict[str, Any]:
    pattern = _tag_pattern(tag)
    rows = (
        connect(ctx.data_dir)
        .execute(
            "SELECT n.id, n.text, n.tags, n.created FROM notes n"
            " WHERE n.agent = ? AND (? IS NULL OR n.tags LIKE ?) ORDER BY n.id DESC LIMIT ?",
            (ctx.agent, pattern, pattern, limit),
        )
        .fetchall()
    )
    notes = [_note(r) for r in rows]
    return {"count": len(notes), "notes": notes}


@plugin.tool("notes_delete")
async def notes_delete(ctx: Context, id: int) -> dict[str, Any]:
    conn = connect(ctx.data_dir)
    with conn:
        cur = conn.execute("DELETE FROM notes WHERE id = ? AND agent = ?", (id, ctx.agent))
    if cur.rowcount == 0:
        raise ToolError(f"you have no note with id {id}")
    return {"deleted": id}
