"""Turn ``sqlite3`` errors into :class:`~mcp_zero.errors.StorageError` a user can act on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mcp_zero.errors import StorageError

# Primary result codes (https://sqlite.org/rescode.html); extended codes keep them in the low byte.
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26

# Fallback when an error carries no code (raised by hand, or by an older sqlite3 module).
_BY_MESSAGE = {
    "database or disk is full": _SQLITE_FULL,
    "database is locked": _SQLITE_BUSY,
    "attempt to write a readonly database": _SQLITE_READONLY,
    "disk i/o error": _SQLITE_IOERR,
    "unable to open database file": _SQLITE_CANTOPEN,
    "file is not a database": _SQLITE_NOTADB,
    "database disk image is malformed": _SQLITE_CORRUPT,
}

_ADVICE = {
    _SQLITE_FULL: "database or disk is full at {path}: free space and retry",
    _SQLITE_BUSY: (
        "database is locked at {path}: another process held it too long; "
        "stop it or retry (is another mcp0 writing to this data dir?)"
    ),
    _SQLITE_LOCKED: "database table is locked at {path}: retry",
    _SQLITE_READONLY: ("database at {path} is read-only: make the file and its directory writable"),
    _SQLITE_IOERR: "disk I/O error at {path}: check the disk (dmesg) and retry",
    _SQLITE_CANTOPEN: (
        "cannot open database at {path}: check that the directory exists and is writable"
    ),
    _SQLITE_NOTADB: "{path} is not an SQLite database: point the data dir elsewhere",
    _SQLITE_CORRUPT: (
        "database at {path} is corrupt: restore it from a backup or export what is readable"
    ),
}


def storage_error(exc: sqlite3.Error, path: Path | str, doing: str) -> StorageError:
    """A :class:`StorageError` for ``exc`` raised while ``doing`` something to ``path``.

    The message names the file and the next step; ``data`` keeps the SQLite
    error name and the original text for logs.
    """
    code = _primary_code(exc)
    text = str(exc)
    template = _ADVICE.get(code) if code is not None else None
    message = (
        template.format(path=path) if template is not None else f"{doing} failed at {path}: {text}"
    )
    data = {"path": str(path), "while": doing, "sqlite": text}
    name = getattr(exc, "sqlite_errorname", None)
    if name:
        data["sqlite_error"] = name
    return StorageError(message, data=data)


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    lowered = str(exc).lower()
    for fragment, by_message in _BY_MESSAGE.items():
        if fragment in lowered:
            return by_message
    return None
