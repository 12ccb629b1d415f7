"""The baseline of bench/governed_calls.py: the official MCP SDK serving the same tool, ungoverned.

`MCPServer` (the SDK's FastMCP) in stateless streamable HTTP with JSON responses,
under uvicorn (uvloop + httptools when installed, as mcp0 uses), exposing
`notes_add` with the same name, arguments, behaviour and result as the bundled
`notes` example plugin: the note goes into SQLite (WAL, FTS5-indexed) the same way;
and `echo`, as bench/plugins/echo: its text (a string of at most 10,000 characters)
comes back as one text content block.

Run: python bench/plain_server.py --port 8766 --data-dir /tmp/notes  (serves http://127.0.0.1:8766/mcp)
"""

from __future__ import annotations

import argparse
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from pydantic import Field

server: MCPServer[Any] = MCPServer("plain-notes")
DATA_DIR = Path(".")
AGENT = "bench"

# The same tables, FTS5 index, triggers and pragmas as the notes plugin.
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
"""
_local = threading.local()


def _db() -> sqlite3.Connection:
    conn: sqlite3.Connection | None = getattr(_local, "conn", None)
    if conn is None:
        conn = sqlite3.connect(DATA_DIR / "notes.db", timeout=5.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        _local.conn = conn
    return conn


@server.tool()
async def notes_add(text: str, tags: list[str] | None = None) -> dict[str, Any]:
    """Save a note for the calling agent. Returns the new note with its id."""
    # async def, as the plugin's handler: the short insert runs on the event loop, on one
    # connection, instead of a thread pool where connections contend for the write lock.
    clean = sorted({t.strip() for t in tags or [] if t.strip()})
    stored = f" {' '.join(clean)} " if clean else ""
    created = datetime.now(UTC).isoformat(timespec="seconds")
    conn = _db()
    with conn:
        cur = conn.execute(
            "INSERT INTO notes(agent, text, tags, created) VALUES (?, ?, ?, ?)",
            (AGENT, text, stored, created),
        )
    return {"note": {"id": cur.lastrowid, "text": text, "tags": clean, "created": created}}


@server.tool(name="echo", description="Return the text it was given.", structured_output=False)
async def echo(text: Annotated[str, Field(max_length=10000)]) -> str:
    """The echo plugin's tool: an async handler, as the plugin's, returning its text."""
    return text


def main() -> None:
    global DATA_DIR
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True, help="where notes.db goes")
    args = parser.parse_args()
    DATA_DIR = args.data_dir
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    app = server.streamable_http_app(stateless_http=True, json_response=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
