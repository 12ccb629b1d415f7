"""How sqlite3 errors read once they are StorageErrors."""

from __future__ import annotations

import sqlite3

import pytest

from mcp_zero.storage.sqlite_errors import storage_error


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (
            sqlite3.OperationalError("database or disk is full"),
            "database or disk is full at /d/x.db: free space and retry",
        ),
        (
            sqlite3.OperationalError("attempt to write a readonly database"),
            "database at /d/x.db is read-only: make the file and its directory writable",
        ),
        (
            sqlite3.OperationalError("disk I/O error"),
            "disk I/O error at /d/x.db: check the disk (dmesg) and retry",
        ),
        (
            sqlite3.OperationalError("no such table: nope"),
            "read agent failed at /d/x.db: no such table: nope",
        ),
    ],
)
def test_message_names_the_file_and_the_next_step(raised: sqlite3.Error, expected: str) -> None:
    error = storage_error(raised, "/d/x.db", "read agent")
    assert error.message == expected
    assert error.code == "storage"
    assert error.data is not None
    assert error.data["sqlite"] == str(raised)
