"""How sqlite3 errors read once they are StorageErrors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

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


def test_a_full_database_under_a_size_limit_says_which_limit_was_reached(tmp_path: Path) -> None:
    # SQLite reports a size limit reached as it does a full disk: with room on the disk, it is
    # the limit
    full = sqlite3.OperationalError("database or disk is full")
    path = tmp_path / "x.db"
    assert storage_error(full, path, "write", size_limit=3 << 19).message == (
        f"database at {path} is full: it reached its size limit, db_max_mb (1.5 MiB); "
        "raise db_max_mb and restart"
    )
    # without a limit, or where the disk's room cannot be told, both are named
    assert storage_error(full, path, "write").message == (
        f"database or disk is full at {path}: free space and retry"
    )
    assert storage_error(full, "/nowhere/x.db", "write", size_limit=1 << 20).message == (
        "database or disk is full at /nowhere/x.db: free space, or raise db_max_mb (1 MiB)"
    )


def test_an_io_error_a_full_disk_can_give_is_an_io_error_beside_room(tmp_path: Path) -> None:
    # (on a full disk it is told as one: test_sqlite_store's full disk tests)
    grow_shm = sqlite3.OperationalError("disk I/O error")
    grow_shm.sqlite_errorcode = 10 | 19 << 8  # SQLITE_IOERR_SHMSIZE
    assert storage_error(grow_shm, tmp_path / "x.db", "open").message == (
        f"disk I/O error at {tmp_path / 'x.db'}: check the disk (dmesg) and retry"
    )
