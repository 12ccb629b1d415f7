"""Encoding of the JSON-lines frames between the kernel and a plugin worker.

One frame is one JSON object on one line (UTF-8, ``\\n``-terminated). Stdlib
``json`` is the fallback so the worker needs no third-party package; orjson is
used when importable because this runs twice per call on each side.
The frames themselves are described in :mod:`mcp_zero.sandbox.worker`.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson

    def encode(frame: dict[str, Any]) -> bytes:
        """``frame`` as one line; raises ``TypeError`` when it is not JSON-serializable."""
        return orjson.dumps(frame, option=orjson.OPT_APPEND_NEWLINE)

    def decode(line: bytes) -> Any:
        """The value of one line; raises ``ValueError`` when it is not JSON."""
        return orjson.loads(line)

except ImportError:  # pragma: no cover - exercised only where orjson is absent

    def encode(frame: dict[str, Any]) -> bytes:
        """``frame`` as one line; raises ``TypeError`` when it is not JSON-serializable."""
        return (json.dumps(frame, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    def decode(line: bytes) -> Any:
        """The value of one line; raises ``ValueError`` when it is not JSON."""
        return json.loads(line)


class LineSplitter:
    """Cuts a byte stream into frames: ``feed`` returns the complete non-empty lines so far
    and keeps a trailing partial line for the next chunk."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def feed(self, data: bytes) -> list[bytes]:
        if b"\n" not in data:
            self._parts.append(data)
            return []
        if self._parts:
            self._parts.append(data)
            data = b"".join(self._parts)
            self._parts = []
        *lines, rest = data.split(b"\n")
        if rest:
            self._parts.append(rest)
        return [line for line in lines if line]


__all__ = ["LineSplitter", "decode", "encode"]
