"""The ASGI plumbing the HTTP endpoints share: types, headers, plain responses, bodies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from mcp_zero.errors import McpZeroError, PayloadTooLarge

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def headers_of(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by name (ASGI gives them lower-cased), the last of a repeated
    one; made once per request."""
    headers: dict[bytes, bytes] | None = scope.get("mcp0.headers")
    if headers is None:
        headers = scope["mcp0.headers"] = dict(scope["headers"])
    return headers


def list_field(scope: Scope, name: bytes) -> bytes | None:
    """A list-valued header (``Accept``) whole: sent on several lines, its values joined
    with commas, as RFC 9110 5.3 reads them (the headers' dict keeps only the last)."""
    headers = headers_of(scope)
    value = headers.get(name)
    if value is not None and len(headers) != len(scope["headers"]):  # (a field came twice)
        value = b", ".join(v for n, v in scope["headers"] if n == name)
    return value


def header(scope: Scope, name: bytes) -> str | None:
    headers: dict[bytes, bytes] | None = scope.get("mcp0.headers")
    if headers is None:  # (headers_of, without a call more for each header read)
        headers = scope["mcp0.headers"] = dict(scope["headers"])
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


def accepts(accept: str | None, media: str) -> bool:
    """Whether a request with this ``Accept`` value takes ``media`` (RFC 9110 §12.5.1).

    The most specific matching range decides (``text/event-stream`` over ``text/*`` over
    ``*/*``), and its ``q=0`` refuses; a request without the header takes anything.
    """
    if accept is None:
        return True
    family = media.split("/", 1)[0] + "/*"
    rank, quality = -1, 0.0
    for item in accept.split(","):
        range_, _, params = item.partition(";")
        range_ = range_.strip().lower()
        this = 2 if range_ == media else 1 if range_ == family else 0 if range_ == "*/*" else -1
        if this > rank:
            rank, quality = this, _quality(params)
    return rank >= 0 and quality > 0


def _quality(params: str) -> float:
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value.strip())
            except ValueError:
                return 1.0  # unreadable weight: as if none was given
    return 1.0


def media_type(value: str) -> str:
    """The ``type/subtype`` of a Content-Type value, lower-cased, without parameters."""
    return value.split(";", 1)[0].strip().lower()


def hostname(value: str) -> str:
    """The host part of a Host header or an origin's authority, without the port."""
    if value.startswith("["):
        end = value.find("]") + 1
        rest = value[end:]
        if end and (not rest or (rest[0] == ":" and rest[1:].isdigit())):
            return value[:end]
        return value  # not "[v6]" or "[v6]:port": no host we know (never loopback)
    if value.count(":") == 1:
        name, port = value.split(":")
        return name if port.isdigit() else value  # ("localhost:1.evil.com" is no loopback)
    return value


async def respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": headers if headers is not None else JSON_HEADERS,
        }
    )
    await send({"type": "http.response.body", "body": body})


async def respond_json(
    send: Send, status: int, obj: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    await respond(send, status, orjson.dumps(obj), JSON_HEADERS + (extra or []))


async def read_body(receive: Receive, limit: int) -> tuple[bytes, McpZeroError | None]:
    """The request body, or the PayloadTooLarge error once it passes ``limit`` bytes
    (the rest is read and dropped, so the connection stays usable)."""
    message = await receive()
    if message["type"] != "http.disconnect" and not message.get("more_body"):
        body: bytes = message.get("body", b"")  # the whole body in one message, as usual
        return (body, None) if len(body) <= limit else (b"", _too_large(len(body), limit))
    chunks: list[bytes] = []
    size = 0
    while message["type"] != "http.disconnect":
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit and chunk:
            chunks.append(chunk)
        if not message.get("more_body"):
            break
        message = await receive()
    if size > limit:
        return b"", _too_large(size, limit)
    return b"".join(chunks), None


def _too_large(size: int, limit: int) -> PayloadTooLarge:
    # (not its size: the server stops reading a body one byte past the limit)
    return PayloadTooLarge(
        f"request body is over the limit of {limit} bytes (setting max_body_bytes)"
    )
