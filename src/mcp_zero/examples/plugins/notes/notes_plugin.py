"""Example plugin: per-agent notes with ranked full-text search.

Notes live in one SQLite database in the plugin's private data directory, with
an FTS5 index ranked by BM25. Every query is scoped to ``ctx.agent``, so an
agent sees, finds and deletes only its own notes.

A new note is not indexed in its own transaction. It goes on a pending list
(``notes_pending``) with the note, and the list is indexed in one transaction
when it is long (``INDEX_BATCH``) or before a search reads the index, as
PostgreSQL's GIN indexes do with ``fastupdate``. FTS5 writes a new index segment
for every transaction that touches it: indexing each note as it was inserted
wrote ~8 pages and cost ~135 µs of CPU per note here; with the pending list an
insert writes 3 pages and costs ~75 µs. A search always sees every note added
before it, and the list is as durable as the notes.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mcp_zero.plugin import Context, Plugin, ToolError

plugin = Plugin("notes")

INDEX_BATCH = 256
"""Index the pending notes once this many wait, so a search never has many to index."""

_SCHEMA_VERSION = 1
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
CREATE TABLE IF NOT EXISTS notes_pending (id INTEGER PRIMARY KEY);
-- Version 0 indexed each note as it was inserted; its notes are all in the index.
DROP TRIGGER IF EXISTS notes_ai;
DROP TRIGGER IF EXISTS notes_ad;
CREATE TRIGGER notes_ad AFTER DELETE ON notes BEGIN
    INSERT INTO notes_fts(notes_fts, rowid, text, tags)
    SELECT 'delete', old.id, old.text, old.tags
    WHERE NOT EXISTS (SELECT 1 FROM notes_pending WHERE id = old.id);
    DELETE FROM notes_pending WHERE id = old.id;
END;
"""


class NotesDB:
    """One connection to the notes database; it indexes the pending notes once
    ``index_batch`` of its own inserts wait."""

    def __init__(self, path: Path, index_batch: int = INDEX_BATCH) -> None:
        conn = sqlite3.connect(path, timeout=5.0)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        if conn.execute("PRAGMA user_version").fetchone()[0] < _SCHEMA_VERSION:
            # Idempotent, so a worker that loses the race to migrate just repeats it.
            try:
                conn.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {_SCHEMA_VERSION}; COMMIT;"
                )
            except sqlite3.Error:
                conn.rollback()
                conn.close()
                raise
        self.conn = conn
        self.index_batch = index_batch
        # Notes added since this connection last indexed (or found waiting when it opened).
        self.pending: int = conn.execute("SELECT count(*) FROM notes_pending").fetchone()[0]

    def index_pending(self) -> None:
        """Index every pending note in one transaction (one FTS5 segment).

        The table decides, not ``pending``: another worker of the plugin may have
        added notes through its own connection.
        """
        self.pending = 0
        if not self.conn.execute("SELECT EXISTS (SELECT 1 FROM notes_pending)").fetchone()[0]:
            return
        with self.conn:
            self.conn.execute(
                "INSERT INTO notes_fts(rowid, text, tags)"
                " SELECT n.id, n.text, n.tags FROM notes_pending p JOIN notes n ON n.id = p.id"
            )
            self.conn.execute("DELETE FROM notes_pending")


_local = threading.local()


def connect(data_dir: Path) -> NotesDB:
    """This thread's notes database in ``data_dir`` (created, or migrated, on first use)."""
    # The handlers are ``async def``: they run on the worker's event loop, one at a time,
    # because each is a short SQLite statement — a thread hop per call would cost more
    # than the query. So this is one connection; it stays per-thread should a handler
    # ever become a plain ``def`` (which the worker runs in its thread pool).
    db: NotesDB | None = getattr(_local, "db", None)
    if db is None:
        db = _local.db = NotesDB(data_dir / "notes.db")
    return db


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


def add_note(db: NotesDB, agent: str, text: str, tags: list[str] | None) -> dict[str, Any]:
    """Insert a note of ``agent`` (pending for the index); return the ``notes_add`` result."""
    clean = sorted({t.strip() for t in tags or [] if t.strip()})
    stored = f" {' '.join(clean)} " if clean else ""
    created = datetime.now(UTC).isoformat(timespec="seconds")
    with db.conn:
        cur = db.conn.execute(
            "INSERT INTO notes(agent, text, tags, created) VALUES (?, ?, ?, ?)",
            (agent, text, stored, created),
        )
        db.conn.execute("INSERT INTO notes_pending(id) VALUES (?)", (cur.lastrowid,))
    db.pending += 1
    if db.pending >= db.index_batch:
        db.index_pending()
    return {"note": {"id": cur.lastrowid, "text": text, "tags": clean, "created": created}}


@plugin.tool("notes_add")
async def notes_add(ctx: Context, text: str, tags: list[str] | None = None) -> dict[str, Any]:
    return add_note(connect(ctx.data_dir), ctx.agent, text, tags)


@plugin.tool("notes_search")
async def notes_search(
    ctx: Context, query: str, tag: str | None = None, limit: int = 10
) -> dict[str, Any]:
    pattern = _tag_pattern(tag)
    db = connect(ctx.data_dir)
    db.index_pending()
    try:
        rows = db.conn.execute(
            "SELECT n.id, n.text, n.tags, n.created, bm25(notes_fts) AS score"
            " FROM notes_fts JOIN notes n ON n.id = notes_fts.rowid"
            " WHERE notes_fts MATCH ? AND n.agent = ? AND (? IS NULL OR n.tags LIKE ?)"
            " ORDER BY score LIMIT ?",
            (query, ctx.agent, pattern, pattern, limit),
        ).fetchall()
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
        .conn.execute(
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
    db = connect(ctx.data_dir)
    with db.conn:
        # The trigger also takes the note off the pending list, if it is on it.
        cur = db.conn.execute("DELETE FROM notes WHERE id = ? AND agent = ?", (id, ctx.agent))
    if cur.rowcount == 0:
        raise ToolError(f"you have no note with id {id}")
    return {"deleted": id}
