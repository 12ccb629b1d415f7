"""Encoding of the JSON-lines frames between the kernel and a plugin worker.

One frame is one JSON object on one line (UTF-8, ``\\n``-terminated). Stdlib
``json`` is the fallback so the worker needs no third-party package; orjson is
used when importable because this runs twice per call on each side.
The frames themselves are described in :mod:`mcp_zero.sandbox.worker`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any


def _stdlib_line(frame: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(frame, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:  # a NaN, an infinity or a cycle: not JSON (the stdlib writes NaN)
        raise TypeError(str(exc)) from None
    try:
        return (text + "\n").encode()
    except UnicodeEncodeError as exc:  # a lone surrogate: what orjson says of it
        raise TypeError(f"str is not valid UTF-8: {exc.reason}") from None


#: ``encode(frame)``: ``frame`` as one line; raises ``TypeError`` when it is not
#: JSON-serializable. ``decode(line)``: the value of one line; raises ``ValueError`` when
#: it is not JSON. With orjson they are its own functions, with no Python call around them.
encode: Callable[[dict[str, Any]], bytes]
decode: Callable[[bytes], Any]
try:
    import orjson

    encode = functools.partial(orjson.dumps, option=orjson.OPT_APPEND_NEWLINE)
    decode = orjson.loads
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    encode = _stdlib_line
    decode = json.loads


#: The largest frame a worker may send (one result with its content blocks, as JSON). The
#: worker answers a larger result with an error; a worker that sends one anyway is killed by
#: the kernel, as a crash would be, before the kernel holds it all.
MAX_FRAME_BYTES = 32 * 1024 * 1024
#: The largest notification (log, progress, resource update) a worker may send, as JSON: a
#: larger one is refused in the plugin's handler, and dropped by the kernel if sent anyway.
MAX_NOTIFICATION_BYTES = 1024 * 1024
#: Strings adding up to more than this many characters are encoded with the stdlib (below):
#: orjson reserves up to six bytes a character, and a worker short of memory must not be
#: crashed by that reservation (a million emoji was 4 MB of it: found by review).
LARGE_FRAME_CHARS = 1 << 16


class FrameTooLarge(ValueError):
    """A frame is over the size it may have; the message says by how much."""

    def __init__(self, size: str, limit: int) -> None:
        super().__init__(f"is {size} as JSON; it may be at most {limit >> 20} MiB")


def _string_chars(value: Any, limit: int) -> int:
    """The characters of the strings in ``value``, counted until they are over ``limit``."""
    total = 0
    pending = [value]
    pop, extend = pending.pop, pending.extend
    while pending:
        item = pop()
        kind = type(item)  # exact types first: this runs on every result
        if kind is str:
            total += len(item)
            if total > limit:
                return total
        elif kind is dict:
            extend(item.values())
        elif kind is list:
            extend(item)
        elif kind is int or kind is float or kind is bool or item is None:
            continue
        elif isinstance(item, str):
            total += len(item)
            if total > limit:
                return total
        elif isinstance(item, dict):
            extend(item.values())
        elif isinstance(item, list | tuple):
            extend(item)
    return total


def encode_frame(frame: dict[str, Any], limit: int = MAX_FRAME_BYTES) -> bytes:
    """:func:`encode` for every frame a worker sends, which may be large, under its
    address-space limit. Raises ``TypeError`` when ``frame`` is not JSON, ``MemoryError``
    when there is no room to encode it, :class:`FrameTooLarge` when it is over ``limit``
    bytes as JSON (strings over ``limit`` characters are refused before they are encoded).

    orjson reserves several times a string's length before writing it, and when that
    reservation fails under RLIMIT_AS it crashes the process (SIGSEGV) instead of raising
    MemoryError: a tool returning 20 MB of text, or logging it, killed a 256 MB worker. A
    frame with more than ``LARGE_FRAME_CHARS`` of strings is encoded by the stdlib, which
    raises MemoryError.
    """
    chars = _string_chars(frame, max(limit, LARGE_FRAME_CHARS))
    if chars <= LARGE_FRAME_CHARS:
        data = encode(frame)
    elif chars > limit:
        raise FrameTooLarge(f"over {_string_chars(frame, sys.maxsize) / 2**20:.1f} MiB", limit)
    elif _deeper_than(frame, MAX_DEPTH):  # (orjson refuses those; the stdlib would not)
        raise TypeError(f"it nests deeper than {MAX_DEPTH} levels")
    else:
        data = _stdlib_line(frame)
    if len(data) > limit:
        raise FrameTooLarge(f"{len(data) / 2**20:.1f} MiB", limit)
    return data


#: How deep a frame may nest: what orjson, which the kernel answers clients with, encodes.
MAX_DEPTH = 250


def _deeper_than(value: Any, limit: int) -> bool:
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list | tuple):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return False


class LineSplitter:
    """Cuts a byte stream into frames: ``feed`` returns the complete non-empty lines so far
    and keeps a trailing partial line for the next chunk.

    With a ``limit`` (bytes), a line longer than it is never assembled: ``feed`` returns the
    lines before it, sets ``overflowed`` and from then on returns nothing, so a peer that
    never sends a newline cannot make the reader hold more than ``limit`` bytes.

    A line there is no memory to assemble (MemoryError) is skipped, the lines after it are
    not: its first 64 bytes and its size are added to ``lost`` for the reader to deal with.
    """

    __slots__ = ("_limit", "_parts", "_pending", "lost", "overflowed")

    def __init__(self, limit: int = 0) -> None:
        self._limit = limit  # 0: none
        self._parts: list[bytes] = []
        self._pending = 0
        self.overflowed = False
        self.lost: list[tuple[bytes, int]] = []

    def feed(self, data: bytes) -> list[bytes]:
        if self.overflowed:
            return []
        if b"\n" not in data:
            self._parts.append(data)
            self._pending += len(data)
            if self._limit and self._pending > self._limit:
                self._overflow()
            return []
        chunk = data
        try:
            if self._parts:
                self._parts.append(data)
                data = b"".join(self._parts)
                self._parts = []
            lines = data.split(b"\n")
        except MemoryError:
            return self._lose(self._parts[0] if self._parts else data, chunk)
        rest = lines.pop()
        self._pending = len(rest)
        if self._limit and len(data) > self._limit:  # only then can one line be too long
            for i, line in enumerate(lines):
                if len(line) > self._limit:
                    self._overflow()
                    return [line for line in lines[:i] if line]
            if len(rest) > self._limit:
                self._overflow()
                return [line for line in lines if line]
        if rest:
            self._parts.append(rest)
        return [line for line in lines if line] if b"" in lines else lines

    def _lose(self, head: bytes, chunk: bytes) -> list[bytes]:
        """No memory to assemble the line ending in ``chunk``: skip it, go on after it."""
        end = chunk.index(b"\n")
        self.lost.append((head[:64], self._pending + end))
        self._parts = []
        self._pending = 0
        return self.feed(chunk[end + 1 :]) if end + 1 < len(chunk) else []

    def _overflow(self) -> None:
        self.overflowed = True
        self._parts = []
        self._pending = 0


__all__ = [
    "LARGE_FRAME_CHARS",
    "MAX_FRAME_BYTES",
    "MAX_NOTIFICATION_BYTES",
    "FrameTooLarge",
    "LineSplitter",
    "decode",
    "encode",
    "encode_frame",
]
