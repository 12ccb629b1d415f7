"""The baseline of bench/governed_calls.py: the official MCP SDK serving the same tool, ungoverned.

`MCPServer` (the SDK's FastMCP) in stateless streamable HTTP with JSON responses,
under uvicorn (uvloop + httptools when installed, as mcp0 uses), exposing
`notes_add` with the same name, arguments, behaviour and result as the bundled
`notes` example plugin: the note goes into SQLite (WAL, FTS5-indexed) through the
plugin's own storage code; and `echo`, as bench/plugins/echo: its text (a string
of at most 10,000 characters) comes back as one text content block.

Run: python bench/plain_server.py --port 8766 --data-dir /tmp/notes  (serves http://127.0.0.1:8766/mcp)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from pydantic import Field

import mcp_zero

# The bundled plugin, imported as its worker imports it (its directory on sys.path).
sys.path.insert(0, str(Path(mcp_zero.__file__).parent / "examples" / "plugins" / "notes"))
import notes_plugin

server: MCPServer[Any] = MCPServer("plain-notes")
DATA_DIR = Path(".")
AGENT = "bench"


@server.tool()
async def notes_add(text: str, tags: list[str] | None = None) -> dict[str, Any]:
    """Save a note for the calling agent. Returns the new note with its id."""
    # The plugin's own storage code: the same tables, FTS5 index, pragmas and insert.
    # async def, as the plugin's handler: the short insert runs on the event loop, on one
    # connection, instead of a thread pool where connections contend for the write lock.
    return notes_plugin.add_note(notes_plugin.connect(DATA_DIR), AGENT, text, tags)


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
