"""Turn ``sqlite3`` errors into :class:`~mcp_zero.errors.StorageError` a user can act on."""

from __future__ import annotations

import os
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
# The I/O errors a full disk gives too (ENOSPC growing the -shm file, as opening a store
# does; writing, syncing or extending a file): restarting on a full disk said "disk I/O
# error: check the disk (dmesg)" (found by review). sqlite3 does not give the errno, so the
# room left on the file system tells.
_SQLITE_IOERR_WRITE = _SQLITE_IOERR | 3 << 8
_SQLITE_IOERR_FSYNC = _SQLITE_IOERR | 4 << 8
_SQLITE_IOERR_TRUNCATE = _SQLITE_IOERR | 6 << 8
_SQLITE_IOERR_SHMSIZE = _SQLITE_IOERR | 19 << 8
_OUT_OF_SPACE_IOERRS = frozenset(
    {_SQLITE_IOERR_WRITE, _SQLITE_IOERR_FSYNC, _SQLITE_IOERR_TRUNCATE, _SQLITE_IOERR_SHMSIZE}
)

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

# SQLite reports a full disk and a database at its max_page_count (db_max_mb) alike: a
# write that failed for want of disk took what room the file system had, so the room left
# tells them apart (a cap was reported as a full disk beside gigabytes free: found by review).
_DISK_FULL_BELOW = 1 << 20
_DISK_FULL = "disk is full at {path}: free space and retry"
_AT_SIZE_LIMIT = (
    "database at {path} is full: it reached its size limit, db_max_mb ({limit}); "
    "raise db_max_mb and restart"
)
_FULL_UNDER_LIMIT = "database or disk is full at {path}: free space, or raise db_max_mb ({limit})"

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
        "database at {path} is corrupt: restore it from a backup (docs/operations.md), or "
        "save what is readable with: sqlite3 {path} .dump > readable.sql"
    ),
}


def storage_error(
    exc: sqlite3.Error, path: Path | str, doing: str, *, size_limit: int | None = None
) -> StorageError:
    """A :class:`StorageError` for ``exc`` raised while ``doing`` something to ``path``, a
    database capped at ``size_limit`` bytes (db_max_mb) if given.

    The message names the file, the cause and the next step; ``data`` keeps the SQLite
    error name and the original text for logs.
    """
    code = _primary_code(exc)
    text = str(exc)
    template = _ADVICE.get(code) if code is not None else None
    if code == _SQLITE_FULL:
        message = _full(path, size_limit)
    elif getattr(exc, "sqlite_errorcode", None) in _OUT_OF_SPACE_IOERRS and _disk_full(path):
        message = _DISK_FULL.format(path=path)
    elif template is not None:
        message = template.format(path=path)
    else:
        message = f"{doing} failed at {path}: {text}"
    data = {"path": str(path), "while": doing, "sqlite": text}
    name = getattr(exc, "sqlite_errorname", None)
    if name:
        data["sqlite_error"] = name
    return StorageError(message, data=data)


def _full(path: Path | str, size_limit: int | None) -> str:
    """What SQLITE_FULL at ``path`` means: the disk is full, or the database reached
    ``size_limit``."""
    free = _free_bytes(path)
    if free is not None and free < _DISK_FULL_BELOW:
        return _DISK_FULL.format(path=path)
    if size_limit is None:  # (room here: the disk of SQLite's temporary files, maybe)
        return _ADVICE[_SQLITE_FULL].format(path=path)
    template = _AT_SIZE_LIMIT if free is not None else _FULL_UNDER_LIMIT
    return template.format(path=path, limit=f"{size_limit / 2**20:g} MiB")


def _disk_full(path: Path | str) -> bool:
    free = _free_bytes(path)
    return free is not None and free < _DISK_FULL_BELOW


def _free_bytes(path: Path | str) -> int | None:
    """The bytes free on the file system of ``path``'s directory; None if it cannot be told."""
    try:
        fs = os.statvfs(Path(path).parent)
    except OSError:
        return None
    return fs.f_bavail * fs.f_frsize


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    lowered = str(exc).lower()
    for fragment, by_message in _BY_MESSAGE.items():
        if fragment in lowered:
            return by_message
    return None
