"""Turn what plugin handlers return into MCP result objects (runs inside the worker).

Stdlib only: the worker imports it. Every function raises ``TypeError`` when a
handler returned something it cannot express, with a message for the author.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import enum
import json
import math
from typing import Any

from mcp_zero.plugin import Content, ToolResult
from mcp_zero.uri import normal_uri

JSON = dict[str, Any]
_MAX_COMPLETIONS = 100  # the MCP spec caps completion values per response
_CONTENTS_STRINGS = ("uri", "mimeType", "text", "blob")  # (a blob's is its base64)
# What each content block type must and may hold as strings (MCP ContentBlock): a block
# missing one, or with a number there, made the official client refuse the whole response.
_BLOCK_STRINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text": (("text",), ()),
    "image": (("data", "mimeType"), ()),
    "audio": (("data", "mimeType"), ()),
    "resource": ((), ()),
    "resource_link": (("uri", "name"), ("title", "description", "mimeType")),
}
_ROLES = ("user", "assistant")
_PROMPT_KEYS = ("description", "messages", "_meta")  # (MCP GetPromptResult's)


def _block(item: Any, where: str) -> JSON:
    """``item`` (a str or a content block) as an MCP content block; ``TypeError`` naming
    ``where`` for anything a client would refuse."""
    if isinstance(item, str):
        return {"type": "text", "text": item}
    if not isinstance(item, dict):
        raise TypeError(
            f"a content list may hold only str and content blocks, not {type(item).__name__}"
        )
    # (what the official SDK's model_dump writes for a field not set: MCP's schema has no
    # null there, and leaving it out says the same; refused, such blocks failed: by review)
    block = _without_nulls(item)
    for key in ("annotations", "resource"):
        if isinstance(block.get(key), dict):
            block[key] = _without_nulls(block[key])
    item = block
    kind = item.get("type")
    if kind not in _BLOCK_STRINGS:
        raise TypeError(
            f"{where} is not a content block: its type must be one of "
            f"{', '.join(_BLOCK_STRINGS)}, not {kind!r}"
        )
    required, optional = _BLOCK_STRINGS[kind]
    for key in required:
        if key not in item:
            raise TypeError(f"{where} has no {key!r}, which its type {kind!r} needs")
    _require_strings(item, required + optional, where)
    if kind == "resource":
        _embedded(item.get("resource"), f"{where}.resource")
    elif kind == "resource_link":
        if "size" in item and type(item["size"]) is not int:
            raise TypeError(f"{where}.size must be an int, not {type(item['size']).__name__}")
        if "icons" in item:
            _icons(item["icons"], f"{where}.icons")
    if "annotations" in item:
        _annotations(item["annotations"], f"{where}.annotations")
    _require_meta(item, where)
    return block


def _require_meta(d: JSON, where: str) -> None:
    if "_meta" in d and not isinstance(d["_meta"], dict):
        raise TypeError(f"{where}._meta must be a dict, not {type(d['_meta']).__name__}")


def _icons(icons: Any, where: str) -> None:
    """Refuse ``icons`` unless it is a list of MCP Icon objects (a ``src`` and strings)."""
    if not isinstance(icons, list):
        raise TypeError(f"{where} must be a list of icons, not {type(icons).__name__}")
    for i, icon in enumerate(icons):
        if not isinstance(icon, dict) or "src" not in icon:
            raise TypeError(f"{where}[{i}] must be an icon: a dict with a 'src'")
        _require_strings(icon, ("src", "mimeType", "theme"), f"{where}[{i}]")
        sizes = icon.get("sizes", [])
        if not isinstance(sizes, list) or not all(isinstance(size, str) for size in sizes):
            raise TypeError(f"{where}[{i}].sizes must be a list of str")


def _without_nulls(d: JSON) -> JSON:
    """A copy of ``d`` without its keys whose value is None."""
    return {key: value for key, value in d.items() if value is not None}


def _require_strings(d: JSON, keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if key in d and not isinstance(d[key], str):
            raise TypeError(f"{where}.{key} must be a str, not {type(d[key]).__name__}")


def _embedded(resource: Any, where: str) -> None:
    if not isinstance(resource, dict):
        raise TypeError(f"{where} must be a contents dict, not {type(resource).__name__}")
    if ("text" in resource) == ("blob" in resource):
        raise TypeError(f"{where} needs exactly one of 'text' or 'blob'")
    if "uri" not in resource:
        raise TypeError(f"{where} has no 'uri'")
    _require_strings(resource, _CONTENTS_STRINGS, where)
    _require_meta(resource, where)


def _annotations(annotations: Any, where: str) -> None:
    if not isinstance(annotations, dict):
        raise TypeError(f"{where} must be a dict, not {type(annotations).__name__}")
    audience = annotations.get("audience", [])
    if not isinstance(audience, list) or any(role not in _ROLES for role in audience):
        raise TypeError(f"{where}.audience must be a list of 'user' and 'assistant'")
    priority = annotations.get("priority", 0)
    # (a NaN is left to _require_finite, which says what JSON makes of it)
    if type(priority) not in (int, float) or (math.isfinite(priority) and not 0 <= priority <= 1):
        raise TypeError(f"{where}.priority must be a number from 0 to 1, not {priority!r}")
    if not isinstance(annotations.get("lastModified", ""), str):
        raise TypeError(f"{where}.lastModified must be a str (ISO 8601)")


def _dumps(value: Any, where: str = "the result", default: Any = str) -> str:
    try:
        return json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), default=default, allow_nan=False
        )
    except ValueError:  # a NaN or an infinity: Python writes them, JSON has no such numbers
        _require_finite(value, where)
        raise


def _json_and_value(value: Any, where: str) -> tuple[str, Any]:
    """The JSON text of ``value`` and the value that text is, which is ``value`` unless it
    held values JSON has no type for (see :func:`_plain`): the frame's encoder, left to
    write those its own way, sent a text block other than the structured content (a
    datetime with a space in one and a "T" in the other: found by review)."""
    converted = False

    def plain(item: Any) -> Any:
        nonlocal converted
        converted = True
        return _plain(item)

    text = _dumps(value, where, plain)
    return text, json.loads(text) if converted else value


def _plain(item: Any) -> Any:
    """A value JSON has no type for as JSON writes it: a date or time in ISO 8601, a
    dataclass as the object of its fields, an enum member as its value, anything else as
    its ``str``."""
    if isinstance(item, datetime.date | datetime.time):
        return item.isoformat()
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
    if isinstance(item, enum.Enum):
        return item.value
    return str(item)


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
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            item = _plain(item)  # (as it is written: the NaN in it had no place named)
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
        out: JSON = {"content": [_block(value, "content[0]")]}
        _require_finite(out["content"], "content")
        return out
    if isinstance(value, dict):
        text, structured = _json_and_value(value, "structuredContent")
        return {"content": [{"type": "text", "text": text}], "structuredContent": structured}
    if isinstance(value, ToolResult):
        out = {"content": _blocks(value.content)}
        _require_finite(out["content"], "content")
        if value.structured is not None:
            if not isinstance(value.structured, dict):  # (a list was sent: found by review)
                raise TypeError(
                    "structuredContent must be a dict (MCP sends a JSON object), "
                    f"not {type(value.structured).__name__}"
                )
            # (as a dict's is: unconverted, the frame's encoder wrote it its own way)
            _, out["structuredContent"] = _json_and_value(value.structured, "structuredContent")
        if value.is_error:
            out["isError"] = True
        return out
    if isinstance(value, list | tuple):
        out = {"content": _blocks(value)}
        _require_finite(out["content"], "content")
        return out
    if isinstance(value, int | float | bool):
        return {"content": [{"type": "text", "text": _dumps(value)}]}
    raise TypeError(f"a tool cannot return {type(value).__name__}; return str, dict or content")


def _blocks(items: Any) -> list[JSON]:
    return [_block(item, f"content[{i}]") for i, item in enumerate(items)]


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
        for key in _CONTENTS_STRINGS:  # (a "text" of 5 was passed on: found by review)
            if key in item and not isinstance(item[key], str):
                raise TypeError(
                    f"a contents dict's {key!r} must be a str, not {type(item[key]).__name__}"
                )
        # (a handler's own were sent as they were: another plugin's URI for this one's
        # contents, text/html for a resource listed as text/plain: found by review)
        if "uri" in item and normal_uri(item["uri"]) != normal_uri(uri):
            raise TypeError(f"a contents dict's 'uri' is {item['uri']!r}, not the {uri!r} read")
        if mime_type and item.get("mimeType", mime_type) != mime_type:
            raise TypeError(
                f"a contents dict's 'mimeType' is {item['mimeType']!r}, "
                f"but the resource's is {mime_type!r}"
            )
        _require_meta(item, "a contents dict")
        out = {**item, "uri": uri}
        if mime_type:
            out["mimeType"] = mime_type
        return out
    raise TypeError(
        f"a resource handler returns str, bytes or a contents dict, not {type(item).__name__}"
    )


def resource_result(uri: str, value: Any, mime_type: str | None) -> JSON:
    """A ``ReadResourceResult`` for a resource handler's return value."""
    items = value if isinstance(value, list) else [value]
    return {"contents": [_contents(uri, item, mime_type) for item in items]}


def _prompt_message(item: Any, where: str) -> JSON:
    if isinstance(item, dict) and "role" in item and "content" in item:
        if item["role"] not in _ROLES:  # (a "system" one was sent: found by review)
            raise TypeError(f"{where}.role must be 'user' or 'assistant', not {item['role']!r}")
        return {"role": item["role"], "content": _block(item["content"], f"{where}.content")}
    return {"role": "user", "content": _block(item, where)}


def prompt_result(value: Any) -> JSON:
    """A ``GetPromptResult`` for a prompt handler's return value.

    Raises ``TypeError`` also for a float NaN or infinity anywhere in it, naming where.
    """
    if isinstance(value, dict) and "messages" in value:
        unknown = [key for key in value if key not in _PROMPT_KEYS]
        if unknown:
            raise TypeError(
                f"a prompt result holds only {', '.join(_PROMPT_KEYS)}, not {unknown[0]!r}"
            )
        if not isinstance(value["messages"], list | tuple):  # ("hi" was "h" and "i")
            raise TypeError(f"messages must be a list, not {type(value['messages']).__name__}")
        _require_strings(value, ("description",), "the prompt result")
        _require_meta(value, "the prompt result")
        out = dict(value)
        out["messages"] = _messages(value["messages"])
    else:
        out = {"messages": _messages(value if isinstance(value, list) else [value])}
    _require_finite(out["messages"], "messages")
    return out


def _messages(items: list[Any] | tuple[Any, ...]) -> list[JSON]:
    return [_prompt_message(item, f"messages[{i}]") for i, item in enumerate(items)]


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
