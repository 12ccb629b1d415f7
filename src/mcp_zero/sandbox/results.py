"""Turn what plugin handlers return into MCP result objects (runs inside the worker).

Stdlib only: the worker imports it. Every function raises ``TypeError`` when a
handler returned something it cannot express, with a message for the author.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

from mcp_zero.plugin import Content, ToolResult

JSON = dict[str, Any]
_BLOCK_TYPES = frozenset({"text", "image", "audio", "resource", "resource_link"})
_MAX_COMPLETIONS = 100  # the MCP spec caps completion values per response
_CONTENTS_STRINGS = ("uri", "mimeType", "text", "blob")  # (a blob's is its base64)


def _block(item: Any) -> JSON:
    if isinstance(item, str):
        return {"type": "text", "text": item}
    if isinstance(item, dict) and item.get("type") in _BLOCK_TYPES:
        return dict(item)
    raise TypeError(
        f"a content list may hold only str and content blocks, not {type(item).__name__}"
    )


def _dumps(value: Any, where: str = "the result") -> str:
    try:
        return json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), default=str, allow_nan=False
        )
    except ValueError:  # a NaN or an infinity: Python writes them, JSON has no such numbers
        _require_finite(value, where)
        raise


def _require_finite(value: Any, where: str) -> None:
    """Raise ``TypeError`` naming the first NaN or infinity in ``value`` (found at ``where``)."""
    pending = [(value, where)]
    seen: set[int] = set()  # a container holding itself is walked once
    while pending:
        item, path = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise TypeError(
                f"{path} is {item}, which JSON cannot express (it has no NaN or Infinity); "
                "return None or a string there instead"
            )
        if isinstance(item, dict | list | tuple):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, dict):
            pending.extend((v, f"{path}.{k}") for k, v in reversed(item.items()))
        elif isinstance(item, list | tuple):
            pending.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(item))))


def tool_result(value: Any) -> JSON:
    """A ``CallToolResult`` for a tool's return value (see :mod:`mcp_zero.plugin`).

    Raises ``TypeError`` also for a float NaN or infinity anywhere in it, naming where.
    """
    if isinstance(value, str):
        return {"content": [{"type": "text", "text": value}]}
    if value is None:
        return {"content": []}
    if isinstance(value, Content):
        _require_finite(value, "content[0]")
        return {"content": [dict(value)]}
    if isinstance(value, dict):
        return {
            "content": [{"type": "text", "text": _dumps(value, "structuredContent")}],
            "structuredContent": value,
        }
    if isinstance(value, ToolResult):
        out: JSON = {"content": [_block(b) for b in value.content]}
        _require_finite(out["content"], "content")
        if value.structured is not None:
            _require_finite(value.structured, "structuredContent")
            out["structuredContent"] = value.structured
        if value.is_error:
            out["isError"] = True
        return out
    if isinstance(value, list | tuple):
        out = {"content": [_block(b) for b in value]}
        _require_finite(out["content"], "content")
        return out
    if isinstance(value, int | float | bool):
        return {"content": [{"type": "text", "text": _dumps(value)}]}
    raise TypeError(f"a tool cannot return {type(value).__name__}; return str, dict or content")


def error_result(message: str) -> JSON:
    """A ``CallToolResult`` with ``isError: true``."""
    return {"content": [{"type": "text", "text": message}], "isError": True}


def _contents(uri: str, item: Any, mime_type: str | None) -> JSON:
    if isinstance(item, str):
        return {"uri": uri, "mimeType": mime_type or "text/plain", "text": item}
    if isinstance(item, bytes | bytearray | memoryview):
        return {
            "uri": uri,
            "mimeType": mime_type or "application/octet-stream",
            "blob": base64.b64encode(bytes(item)).decode("ascii"),
        }
    if isinstance(item, dict) and ("text" in item or "blob" in item):
        out = {"uri": uri, **item}
        if mime_type and "mimeType" not in out:
            out["mimeType"] = mime_type
        for key in _CONTENTS_STRINGS:  # (a "text" of 5 was passed on: found by review)
            if key in out and not isinstance(out[key], str):
                raise TypeError(
                    f"a contents dict's {key!r} must be a str, not {type(out[key]).__name__}"
                )
        return out
    raise TypeError(
        f"a resource handler returns str, bytes or a contents dict, not {type(item).__name__}"
    )


def resource_result(uri: str, value: Any, mime_type: str | None) -> JSON:
    """A ``ReadResourceResult`` for a resource handler's return value."""
    items = value if isinstance(value, list) else [value]
    return {"contents": [_contents(uri, item, mime_type) for item in items]}


def _prompt_message(item: Any) -> JSON:
    if isinstance(item, dict) and "role" in item and "content" in item:
        return {"role": item["role"], "content": _block(item["content"])}
    return {"role": "user", "content": _block(item)}


def prompt_result(value: Any) -> JSON:
    """A ``GetPromptResult`` for a prompt handler's return value."""
    if isinstance(value, dict) and "messages" in value:
        out = dict(value)
        out["messages"] = [_prompt_message(m) for m in value["messages"]]
        return out
    items = value if isinstance(value, list) else [value]
    return {"messages": [_prompt_message(m) for m in items]}


def completion_result(value: Any) -> JSON:
    """A ``CompleteResult`` for a completion handler's return value."""
    if value is None:
        value = []
    if isinstance(value, dict):
        values = [str(v) for v in value.get("values", [])]
        completion: JSON = {"values": values[:_MAX_COMPLETIONS]}
        if "total" in value:
            completion["total"] = int(value["total"])
        completion["hasMore"] = bool(value.get("hasMore", len(values) > _MAX_COMPLETIONS))
        return {"completion": completion}
    if isinstance(value, list | tuple):
        values = [str(v) for v in value]
        return {
            "completion": {
                "values": values[:_MAX_COMPLETIONS],
                "total": len(values),
                "hasMore": len(values) > _MAX_COMPLETIONS,
            }
        }
    raise TypeError(f"a completion handler returns a list of str, not {type(value).__name__}")
