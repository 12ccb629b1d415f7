"""The floor of bench/governed_calls.py: the least an HTTP server costs on this machine.

A bare ASGI app that answers every POST with one constant JSON-RPC result, under
uvicorn with uvloop + httptools and no access log. Paced at the rate the MCP
servers are paced at, its CPU is the HTTP stack's and the kernel's share (sockets,
loopback) of theirs: no MCP, no JSON parsing, no governance.

Run: python bench/floor_server.py --port 8767  (answers POST on any path)
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

Message = MutableMapping[str, Any]

BODY = (
    b'{"jsonrpc":"2.0","id":1,"result":'
    b'{"content":[{"type":"text","text":"benchmark note"}],"isError":false}}'
)
_OK = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))],
}
_OK_BODY = {"type": "http.response.body", "body": BODY}
_NOT_ALLOWED = {"type": "http.response.start", "status": 405, "headers": [(b"allow", b"POST")]}
_EMPTY = {"type": "http.response.body", "body": b""}


async def app(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Reads the whole request body (a server must), then sends the constant answer."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = bool((await receive()).get("more_body", False))
    if scope["method"] != "POST":
        await send(_NOT_ALLOWED)
        await send(_EMPTY)
        return
    await send(_OK)
    await send(_OK_BODY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
