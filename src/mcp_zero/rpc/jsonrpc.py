"""JSON-RPC 2.0 framing: decode one message, classify it, build responses.

MCP since 2025-06-18 sends one message per POST or line (no batches), so a
JSON array is an invalid request here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from mcp_zero.errors import (
    INVALID_REQUEST,
    PARSE_ERROR,
    InvalidParams,
    InvalidRequest,
    McpZeroError,
    ParseError,
)

JSON = dict[str, Any]
RequestId = str | int
#: The longest string id a message may carry: ids are echoed in answers and kept in the
#: audit log (an append-only log must not take a client's megabytes as an id).
MAX_ID_LENGTH = 256
# An integer past 64 bits is read by orjson as a float: a changed value (2**64 + 1 became
# 1.8446744073709552e19) where the sender meant an exact one. Each has 19 digits or more
# (-2**63 - 1 has 19), so only a body with such a run of digits, in a string too, is read
# again, exactly, to find one: the others cost a translate and a find (~0.3 µs a message).
WIDE_INTEGER = (
    "is an integer past 64 bits, which JSON between programs cannot carry exactly; send it as "
    "a string"
)
_AS_DIGITS = bytes(ord("0") if ord("0") <= i <= ord("9") else ord(" ") for i in range(256))
_LONG_RUN = b"0" * 19
_READ_EXACTLY = (-(2**63), 2**64 - 1)  # the integers orjson reads as integers
_MAX_SHOWN_PATH = 200


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


def decode(body: bytes) -> Message:
    """Parse one JSON-RPC message. Raises ParseError or InvalidRequest (with the id if known);
    InvalidParams for params holding an integer past 64 bits (an answer holding one is a
    Response with a problem)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ParseError(f"the message is not valid JSON: {exc}") from exc
    message = classify(obj)
    if isinstance(message, Response):
        if message.problem is not None:
            return message
        member = "result" if message.result is not None else "error"
        where = wide_integer(body, member)
        if where is None:
            return message
        problem = f'the value at {where} in "{member}" {WIDE_INTEGER}'
        return Response(message.id, None, None, problem)
    where = wide_integer(body, "params")
    if where is not None:
        data: JSON = {"path": where}
        if isinstance(message, Request):
            data["id"] = message.id
        raise InvalidParams(f"the value at {where} in params {WIDE_INTEGER}", data=data)
    return message


def wide_integer(body: bytes, member: str | None = None) -> str | None:
    """Where the JSON ``body`` holds an integer past 64 bits (a JSON pointer, cut short if
    long), looking only in its object's ``member`` if one is named (the pointer then relative
    to that); None where it holds none."""
    if body.translate(_AS_DIGITS).find(_LONG_RUN) < 0:
        return None
    # Read again by json's C scanner, calling back for each integer only: a body of digits
    # in strings (a client's, up to max_body_bytes) is not walked in Python to find none
    try:
        json.loads(body, parse_int=_exact_int)
        return None
    except _WideInteger:
        pass
    except (ValueError, RecursionError):
        return None  # (orjson read it: nested deeper than json reads, refused for that later)
    exact: Any = json.loads(body)
    if member is not None:
        exact = exact.get(member) if isinstance(exact, dict) else None
    low, high = _READ_EXACTLY
    stack: list[tuple[str, Any]] = [("", exact)]
    while stack:
        path, value = stack.pop()
        if type(value) is int and not low <= value <= high:
            return path if len(path) <= _MAX_SHOWN_PATH else path[:_MAX_SHOWN_PATH] + "…"
        if isinstance(value, dict):
            stack.extend((f"{path}/{_pointer_step(key)}", item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}/{index}", item) for index, item in enumerate(value))
    return None


class _WideInteger(Exception):
    """An integer past 64 bits, met while reading a body again (``_exact_int``)."""


def _exact_int(text: str) -> int:
    value = int(text)
    if not _READ_EXACTLY[0] <= value <= _READ_EXACTLY[1]:
        raise _WideInteger
    return value


def _pointer_step(key: str) -> str:
    """``key`` as a step of a JSON pointer (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


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
            if "result" in obj:
                return Response(msg_id, None, None, "an answer has a result or an error, not both")
            # (a request that lost its method, most likely: say what both would need)
            return Response(
                msg_id,
                None,
                None,
                'a message with an id needs a "method" (a request) or exactly one of "result" '
                'and "error" (an answer)',
            )
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
    """The id an error about the rest of the message answers with, if it is a valid one: an
    over-long string is not echoed (a 300,000-character id came back whole when "jsonrpc"
    was wrong too: found by review)."""
    if isinstance(msg_id, str):
        return {"id": msg_id} if len(msg_id) <= MAX_ID_LENGTH else None
    ok = isinstance(msg_id, int) and not isinstance(msg_id, bool)
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
    "WIDE_INTEGER",
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
    "wide_integer",
]
