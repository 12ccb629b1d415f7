"""JSON-RPC 2.0 framing: decode one message, classify it, build responses.

MCP since 2025-06-18 sends one message per POST or line (no batches), so a
JSON array is an invalid request here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from mcp_zero.errors import (
    INVALID_REQUEST,
    PARSE_ERROR,
    InvalidRequest,
    McpZeroError,
    ParseError,
)

JSON = dict[str, Any]
RequestId = str | int
#: The longest string id a message may carry: ids are echoed in answers and kept in the
#: audit log (an append-only log must not take a client's megabytes as an id).
MAX_ID_LENGTH = 256


@dataclass(frozen=True, slots=True)
class Request:
    id: RequestId
    method: str
    params: JSON


@dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: JSON


@dataclass(frozen=True, slots=True)
class Response:
    """A client's answer to a request we sent it (``error`` is set on failure)."""

    id: RequestId
    result: JSON | None
    error: JSON | None
    # What is wrong with an answer whose result or error is not an object: it is refused
    # (400), and fails the question it answers at once rather than leave it waiting.
    problem: str | None = None


Message = Request | Notification | Response


def decode(body: bytes | str) -> Message:
    """Parse one JSON-RPC message. Raises ParseError or InvalidRequest (with the id if known)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ParseError(f"the message is not valid JSON: {exc}") from exc
    return classify(obj)


def classify(obj: Any) -> Message:
    """Turn a decoded JSON value into a message, validating the envelope."""
    if isinstance(obj, list):
        raise InvalidRequest("JSON-RPC batches are not supported by MCP 2025-06-18 and later")
    if not isinstance(obj, dict):
        raise InvalidRequest("a JSON-RPC message must be a JSON object")
    msg_id = obj.get("id")
    if obj.get("jsonrpc") != "2.0":
        raise InvalidRequest('"jsonrpc" must be "2.0"', data=_id_data(msg_id))
    if msg_id is not None and (isinstance(msg_id, bool) or not isinstance(msg_id, str | int)):
        if isinstance(msg_id, float):  # also what an integer past 64 bits is parsed as
            raise InvalidRequest(
                f'"id" must be a string or an integer of at most 64 bits, not {msg_id!r}'
            )
        raise InvalidRequest('"id" must be a string or an integer')
    if isinstance(msg_id, str) and len(msg_id) > MAX_ID_LENGTH:
        raise InvalidRequest(
            f'"id" is a string of {len(msg_id)} characters; an id may have at most {MAX_ID_LENGTH}'
        )
    method = obj.get("method")
    if method is None:
        if msg_id is None:
            raise InvalidRequest(
                "a message needs a method, or an id with exactly one of result and error"
            )
        if ("result" in obj) == ("error" in obj):  # an answer, but none: it fails its question
            return Response(msg_id, None, None, "an answer needs exactly one of result and error")
        result, error = obj.get("result"), obj.get("error")
        if result is not None and not isinstance(result, dict):
            return Response(msg_id, None, None, '"result" must be an object')
        if error is not None and not isinstance(error, dict):
            return Response(msg_id, None, None, '"error" must be an object')
        return Response(msg_id, result, error)
    if not isinstance(method, str) or not method:
        raise InvalidRequest('"method" must be a non-empty string', data=_id_data(msg_id))
    if msg_id is None and "id" in obj:
        # MCP: a request's id is a string or an integer, never null; a notification has none.
        raise InvalidRequest('"id" must not be null: send a string or an integer, or no id')
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidRequest('"params" must be an object', data=_id_data(msg_id))
    if msg_id is None:
        return Notification(method, params)
    return Request(msg_id, method, params)


def _id_data(msg_id: Any) -> JSON | None:
    ok = msg_id is not None and not isinstance(msg_id, bool) and isinstance(msg_id, str | int)
    return {"id": msg_id} if ok else None


def result_message(msg_id: RequestId, result: JSON) -> JSON:
    return {"jsonrpc": "2.0", "id": msg_id, "result": result}


def error_message(
    msg_id: RequestId | None, rpc_code: int, code: str, message: str, data: JSON | None = None
) -> JSON:
    """An error response; its ``data`` carries ``code``, the stable name of the error (as
    :class:`McpZeroError`'s), whatever else it carries."""
    error: JSON = {"code": rpc_code, "message": message, "data": {**(data or {}), "code": code}}
    return {"jsonrpc": "2.0", "id": msg_id, "error": error}


def error_from_exception(msg_id: RequestId | None, exc: McpZeroError) -> JSON:
    data = dict(exc.data) if exc.data else {}
    data.pop("id", None)
    return error_message(msg_id, exc.rpc_code, exc.code, exc.message, data)


def error_id(exc: McpZeroError) -> RequestId | None:
    """The request id an envelope error belongs to, when it could be read."""
    if exc.data and isinstance(exc.data.get("id"), str | int):
        value: RequestId = exc.data["id"]
        return value
    return None


def encode(message: JSON) -> bytes:
    return orjson.dumps(message)


__all__ = [
    "INVALID_REQUEST",
    "MAX_ID_LENGTH",
    "PARSE_ERROR",
    "Message",
    "Notification",
    "Request",
    "Response",
    "classify",
    "decode",
    "encode",
    "error_from_exception",
    "error_id",
    "error_message",
    "result_message",
]
