"""Encoding of the JSON-lines frames between the kernel and a plugin worker.

One frame is one JSON object on one line (UTF-8, ``\\n``-terminated). Stdlib
``json`` is the fallback so the worker needs no third-party package; orjson is
used when importable because this runs twice per call on each side.
The frames themselves are described in :mod:`mcp_zero.sandbox.worker`.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import json
import re
import sys
import uuid
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
    else:
        data = _stdlib_line(_as_orjson_writes(frame))
    if len(data) > limit:
        raise FrameTooLarge(f"{len(data) / 2**20:.1f} MiB", limit)
    return data


#: How deep a frame may nest: what orjson, which the kernel answers clients with, encodes.
MAX_DEPTH = 250
#: How deep a frame the kernel reads may nest: what orjson writes (its parser reads 1,024).
#: What a frame carries one level down (a result, a request's params) goes to the client one
#: level down too, so it may nest 253 levels, as arguments may (``MAX_ARGUMENT_DEPTH``).
MAX_READ_DEPTH = 254


def _as_orjson_writes(value: Any, depth: int = 1) -> Any:
    """``value`` for the stdlib to write as orjson writes it: what orjson writes its own way
    (dates and times, UUIDs, dataclasses, enums) replaced by what it writes; ``TypeError``,
    with orjson's message, for what orjson refuses. The same value was refused or written
    differently once its frame was large (an int past 64 bits read back as a float, a
    datetime refused: found by review). A NaN is left to the stdlib, which refuses it."""
    if isinstance(value, str) or value is None or type(value) is bool or type(value) is float:
        return value
    if isinstance(value, enum.Enum):  # (before int: an IntEnum is one)
        return _as_orjson_writes(value.value, depth)
    if isinstance(value, int):
        if not -(1 << 63) <= value < 1 << 64:
            raise TypeError("Integer exceeds 64-bit range")
        return value
    if isinstance(value, dict | list) or type(value) is tuple:
        if depth > MAX_DEPTH:  # (orjson refuses those; the stdlib would not)
            raise TypeError(f"it nests deeper than {MAX_DEPTH} levels")
        if not isinstance(value, dict):
            return [_as_orjson_writes(item, depth + 1) for item in value]
        copy = {}
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError("Dict key must be str")
            copy[key] = _as_orjson_writes(item, depth + 1)
        return copy
    kind = type(value)
    if kind is datetime.datetime:
        return _datetime(value)
    if kind is datetime.date:
        return value.isoformat()
    if kind is datetime.time:
        if value.tzinfo is not None:
            raise TypeError("datetime.time must not have tzinfo set")
        return value.isoformat()
    if kind is uuid.UUID:
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = (
            vars(value)  # (orjson's: a field with only a class default is not written)
            if hasattr(value, "__dict__")
            else {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        )
        public = {name: item for name, item in fields.items() if not name.startswith("_")}
        return _as_orjson_writes(public, depth)
    raise TypeError(f"Type is not JSON serializable: {kind.__name__}")


def _datetime(value: datetime.datetime) -> str:
    """``value`` in ISO 8601 as orjson writes it: an offset rounded to the minute."""
    text = value.replace(tzinfo=None).isoformat()
    offset = value.utcoffset()
    if offset is None:
        return text
    seconds = int(offset.total_seconds())
    hours, rest = divmod(abs(seconds), 3600)
    return f"{text}{'-' if seconds < 0 else '+'}{hours:02}:{(rest + 30) // 60:02}"


# What parsing a frame makes a value of, outside strings: an array or object begun, a member
# after another, an object's member's value
_STRUCTURE = b"[{,:"
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(_STRUCTURE)))
_NOT_STRUCTURE_OR_QUOTE = bytes(sorted(set(range(256)) - set(_STRUCTURE + b'"')))
_ESCAPED = re.compile(rb'\\[\\"]')  # (an escaped quote ends no string)
_STRING = re.compile(rb'"[^"]*"')


def frame_values(line: bytes, limit: int) -> int:
    """How many values (arrays, objects, their members) parsing ``line`` would make, about:
    its ``[``, ``{``, ``,`` and ``:``, those in strings too unless that is over ``limit``.
    Passes in C over the bytes, the second kind only for a frame over ``limit`` that way
    (text holding many commas): a frame of long strings counts few, whatever their size."""
    counted = len(line.translate(None, _NOT_STRUCTURE))
    if counted <= limit:
        return counted
    if b"\\" in line:
        line = _ESCAPED.sub(b"", line)
    return len(_STRING.sub(b"", line.translate(None, _NOT_STRUCTURE_OR_QUOTE)))


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

    @property
    def pending(self) -> int:
        """Bytes of a line begun and not ended yet."""
        return self._pending

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
    "MAX_READ_DEPTH",
    "FrameTooLarge",
    "LineSplitter",
    "decode",
    "encode",
    "encode_frame",
    "frame_values",
]
