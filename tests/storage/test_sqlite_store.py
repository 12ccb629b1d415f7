"""SqliteStore against real SQLite files."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from full_disk import on_a_full_disk
from mcp_zero.audit import GENESIS, ChainBroken, canonical, chain_hash, verify_store
from mcp_zero.errors import AgentNotFound, Conflict, StorageError
from mcp_zero.storage import (
    AgentRecord,
    AuditEntry,
    PluginRecord,
    SnapshotRecord,
    SqliteStore,
)
from mcp_zero.storage.base import StoreBusy
from mcp_zero.storage.migrations import MIGRATIONS, SCHEMA_VERSION
from mcp_zero.storage.sqlite import WAL_KEPT_BYTES, holds_no_store


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "nested" / "mcp0.db"


@pytest.fixture
def store(db: Path) -> SqliteStore:
    s = SqliteStore(db)
    yield s
    s.close()


def _entry(seq: int, body: bytes = b"{}") -> AuditEntry:
    return AuditEntry(seq=seq, ts=float(seq), body=body, prev_hash="0" * 64, hash=f"{seq:064x}")


def test_creates_private_file_and_parents_in_wal_mode(db: Path, store: SqliteStore) -> None:
    assert db.is_file()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        raw.close()


def test_agent_crud(store: SqliteStore) -> None:
    alice = AgentRecord(name="alice", token_hash="h1", plugins=["fs"], state={"n": 1}, created_at=5)
    store.create_agent(alice)
    store.create_agent(AgentRecord(name="bob", token_hash="h2"))

    assert store.get_agent("alice") == alice
    assert store.get_agent("nobody") is None
    assert store.agent_by_token_hash("h2") == AgentRecord(name="bob", token_hash="h2")
    assert store.agent_by_token_hash("nope") is None
    assert [a.name for a in store.list_agents()] == ["alice", "bob"]

    def change(agent: AgentRecord) -> None:
        assert agent == alice  # as stored
        agent.plugins.append("web")
        agent.state = {"n": 2, "ü": [1, None]}
        agent.status = "terminated"
        agent.token_hash = "h3"  # a token reissued (a first start that died before showing it)
        agent.created_at = 99  # not written: the creation time stays

    written = store.change_agent("alice", change)
    got = store.get_agent("alice")
    assert got is not None
    assert (got.token_hash, got.plugins, got.state, got.status, got.created_at) == (
        "h3",
        ["fs", "web"],
        {"n": 2, "ü": [1, None]},
        "terminated",
        5,
    )
    assert (written.plugins, written.state, written.status) == (got.plugins, got.state, got.status)


def test_create_existing_agent_is_a_conflict(store: SqliteStore) -> None:
    store.create_agent(AgentRecord(name="alice", token_hash="h1"))
    with pytest.raises(Conflict, match="alice"):
        store.create_agent(AgentRecord(name="alice", token_hash="other"))
    assert store.get_agent("alice") == AgentRecord(name="alice", token_hash="h1")


def test_changing_a_missing_agent_raises_agent_not_found(store: SqliteStore) -> None:
    with pytest.raises(AgentNotFound, match="ghost"):
        store.change_agent("ghost", lambda agent: None)


def test_an_agent_change_that_raises_cancels_the_update(store: SqliteStore) -> None:
    store.create_agent(AgentRecord(name="alice", token_hash="h", status="terminated"))
    seen: list[str] = []

    def refuse(stored: AgentRecord) -> None:
        seen.append(stored.status)
        stored.plugins.append("fs")
        raise Conflict("no")

    with pytest.raises(Conflict):
        store.change_agent("alice", refuse)
    assert seen == ["terminated"]
    assert store.get_agent("alice") == AgentRecord(
        name="alice", token_hash="h", status="terminated"
    )


def test_token_hash_lookup_uses_the_index(db: Path, store: SqliteStore) -> None:
    raw = sqlite3.connect(db)
    try:
        plan = raw.execute(
            "EXPLAIN QUERY PLAN SELECT name FROM agents WHERE token_hash = ? LIMIT 1", ("x",)
        ).fetchall()
    finally:
        raw.close()
    assert any("USING INDEX agents_token_hash" in row[-1] for row in plan), plan


def test_plugins_put_replace_delete_bump_the_version(db: Path, store: SqliteStore) -> None:
    v0 = store.plugins_version()
    fs = PluginRecord(name="fs", version="1.0", manifest={"tools": [{"name": "read"}]}, path="/p")
    assert store.put_plugin(fs) is None
    assert store.get_plugin("fs") == fs
    v1 = store.plugins_version()
    assert v1 > v0

    fs2 = PluginRecord(name="fs", version="2.0", manifest={}, path="/p2", installed_at=3)
    assert store.put_plugin(fs2) == fs  # what it replaced
    assert store.list_plugins() == [fs2]
    v2 = store.plugins_version()
    assert v2 > v1

    # Another store on the same file (a CLI install) sees the same counter move.
    other = SqliteStore(db)
    try:
        other.put_plugin(PluginRecord(name="web", version="1", manifest={}, path="/w"))
        assert store.plugins_version() > v2
        assert [p.name for p in store.list_plugins()] == ["fs", "web"]
    finally:
        other.close()

    v3 = store.plugins_version()
    assert store.delete_plugin("fs") == []
    assert store.get_plugin("fs") is None
    v4 = store.plugins_version()
    assert v4 > v3
    assert store.delete_plugin("fs") is None
    assert store.plugins_version() == v4


def test_a_plugin_check_that_raises_cancels_the_write(store: SqliteStore) -> None:
    seen: list[list[str]] = []
    store.put_plugin(PluginRecord(name="fs", version="1", manifest={}, path="/p"))

    def refuse(installed: list[PluginRecord]) -> None:
        seen.append([p.name for p in installed])
        raise Conflict("no")

    version = store.plugins_version()
    with pytest.raises(Conflict):
        store.put_plugin(
            PluginRecord(name="web", version="1", manifest={}, path="/w"), check=refuse
        )
    assert seen == [["fs"]]
    assert [p.name for p in store.list_plugins()] == ["fs"]
    assert store.plugins_version() == version


def test_snapshots_are_immutable(store: SqliteStore) -> None:
    first = SnapshotRecord(id="s1", agent="alice", data={"plugins": ["fs"]}, created_at=1)
    second = SnapshotRecord(id="s2", agent="alice", data={"state": {}}, created_at=2)
    store.put_snapshot(second)
    store.put_snapshot(first)
    store.put_snapshot(SnapshotRecord(id="s3", agent="bob", data={}, created_at=0))
    assert store.get_snapshot("s1") == first
    assert store.get_snapshot("nope") is None
    assert store.list_snapshots("alice") == [first, second]
    with pytest.raises(Conflict, match="s1"):
        store.put_snapshot(SnapshotRecord(id="s1", agent="alice", data={"x": 1}))
    assert store.get_snapshot("s1") == first


def test_reopen_keeps_data_and_does_not_migrate_again(db: Path) -> None:
    with SqliteStore(db) as first:
        first.create_agent(AgentRecord(name="alice", token_hash="h"))
        first.put_plugin(PluginRecord(name="fs", version="1", manifest={}, path="/p"))
        version = first.plugins_version()
    for _ in range(2):
        with SqliteStore(db) as again:
            assert again.get_agent("alice") == AgentRecord(name="alice", token_hash="h")
            assert again.plugins_version() == version
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        raw.close()


def test_plugins_of_the_first_schema_get_an_empty_digest(db: Path) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    raw = sqlite3.connect(db, isolation_level=None)
    try:
        for statement in MIGRATIONS[0]:
            raw.execute(statement)
        raw.execute("PRAGMA user_version = 1")
        raw.execute("INSERT INTO plugins VALUES ('fs', '1', '{}', '/p', 2.0)")
    finally:
        raw.close()
    with SqliteStore(db) as store:
        fs = PluginRecord(name="fs", version="1", manifest={}, path="/p", installed_at=2.0)
        assert store.get_plugin("fs") == fs
        assert fs.digest == ""
        web = PluginRecord(name="web", version="1", manifest={}, path="/w", digest="ab")
        store.put_plugin(web)
        assert store.get_plugin("web") == web


def test_the_first_start_is_pending_in_a_new_database_until_it_is_finished(db: Path) -> None:
    with SqliteStore(db) as store:
        assert not store.first_start_done()
        store.finish_first_start()
        assert store.first_start_done()
    with SqliteStore(db) as again:
        assert again.first_start_done()


@pytest.mark.parametrize(
    ("holding", "done"),
    [
        ("INSERT INTO agents VALUES ('ada', 'h', '[]', '{}', 'active', 1.0)", True),
        ("INSERT INTO plugins VALUES ('fs', '1', '{}', '/p', 2.0, '')", True),
        ("INSERT INTO audit VALUES (1, 1.0, x'7b7d', '', 'h')", True),
        (None, False),  # nothing yet: an earlier release's first start that died midway
    ],
)
def test_a_database_of_an_earlier_release_has_had_its_first_start_if_it_holds_anything(
    db: Path, holding: str | None, done: bool
) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    raw = sqlite3.connect(db, isolation_level=None)
    try:
        for statement in MIGRATIONS[0] + MIGRATIONS[1]:
            raw.execute(statement)
        raw.execute("PRAGMA user_version = 2")
        if holding is not None:
            raw.execute(holding)
    finally:
        raw.close()
    with SqliteStore(db) as store:
        assert store.first_start_done() is done


def test_database_from_a_newer_release_is_refused(db: Path) -> None:
    SqliteStore(db).close()
    raw = sqlite3.connect(db)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StorageError, match="upgrade mcp-zero"):
        SqliteStore(db)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="not an SQLite database"):
        SqliteStore(path)


def test_audit_rows_round_trip_in_seq_order(store: SqliteStore) -> None:
    assert store.audit_head() is None
    entries = [_entry(seq, body=b'{"n":%d}' % seq) for seq in range(1, 8)]
    store.append_audit_batch(entries[:3])
    store.append_audit_batch(entries[3:])
    store.append_audit_batch([])
    assert store.audit_head() == entries[-1]
    assert store.read_audit() == entries
    assert store.read_audit(after_seq=2, limit=3) == entries[2:5]
    assert store.read_audit(after_seq=7) == []


def test_a_corrupt_database_is_said_so_with_what_to_do(db: Path) -> None:
    # the message advised to "export what is readable", with no command to do it (found by
    # a bug hunt): it names sqlite3's .dump, which reads what it can of a damaged file
    with SqliteStore(db) as store:
        store.append_audit_batch([_entry(seq, body=b'{"n":%d}' % seq) for seq in range(1, 500)])
        store.checkpoint()
    with contextlib.closing(sqlite3.connect(db)) as raw:
        (root,) = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = 'audit'").fetchone()
        (page_size,) = raw.execute("PRAGMA page_size").fetchone()
    with db.open("r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xff" * page_size)
    with SqliteStore(db) as store, pytest.raises(StorageError) as failed:
        store.read_audit()
    assert str(failed.value).endswith(
        f"database at {db} is corrupt: restore it from a backup (docs/operations.md), or save "
        f"what is readable with: sqlite3 {db} .dump > readable.sql"
    ), failed.value


def test_audit_table_refuses_update_and_delete(db: Path, store: SqliteStore) -> None:
    store.append_audit_batch([_entry(1), _entry(2)])
    raw = sqlite3.connect(db)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("UPDATE audit SET body = x'00' WHERE seq = 1")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("DELETE FROM audit WHERE seq = 2")
        raw.rollback()
    finally:
        raw.close()
    assert store.read_audit() == [_entry(1), _entry(2)]


def append_chain(store: SqliteStore, count: int) -> None:
    """Append ``count`` entries chained as the audit log chains them."""
    prev = GENESIS
    for seq in range(1, count + 1):
        body = canonical({"n": seq, "ts": float(seq)})
        entry = AuditEntry(seq, float(seq), body, prev, chain_hash(prev, body))
        store.append_audit_batch([entry])
        prev = entry.hash


def test_a_checkpoint_puts_the_store_into_mcp0_db_so_a_copy_of_it_alone_holds_it(
    db: Path, store: SqliteStore, tmp_path: Path
) -> None:
    # Until the WAL reached ~4 MB, mcp0.db was one page without tables: a backup that left
    # out mcp0.db-wal held nothing of the store (found by review)
    append_chain(store, 3)
    copy = tmp_path / "copy.db"
    copy.write_bytes(db.read_bytes())
    assert holds_no_store(copy)  # (what SQLite left it as)
    store.checkpoint()
    copy.write_bytes(db.read_bytes())  # the main file alone, as the WAL is left out
    assert not holds_no_store(copy)
    with SqliteStore(copy, read_only=True) as copied:
        assert [e.seq for e in copied.read_audit()] == [1, 2, 3]
        verify_store(copied)


def test_a_wal_grown_while_a_reader_held_it_is_cut_back_once_it_is_reused(
    db: Path, store: SqliteStore
) -> None:
    # While a read is open (VACUUM INTO of a backup, the sqlite3 check of the log) the WAL
    # cannot start over, and grows by all that is written; it kept that size on disk for
    # as long as the server ran, outside db_max_mb (found by a bug hunt)
    wal = db.with_name(db.name + "-wal")
    append_chain(store, 1)
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM audit").fetchone()  # (holds its snapshot)
        head = append_chain_after(store, 2000, pad="x" * 4000)
        assert wal.stat().st_size > 2 * WAL_KEPT_BYTES
        reader.execute("COMMIT")
    finally:
        reader.close()
    store.checkpoint()  # (as a server does every minute)
    assert append_chain_after(store, 1).seq == head.seq + 1  # the WAL starts over
    assert wal.stat().st_size <= WAL_KEPT_BYTES
    verify_store(store)


def append_chain_after(store: SqliteStore, count: int, pad: str = "") -> AuditEntry:
    """Append ``count`` entries (one commit each) chained after the store's head; the last."""
    prev = store.audit_head()
    assert prev is not None
    for seq in range(prev.seq + 1, prev.seq + 1 + count):
        body = canonical({"n": seq, "pad": pad, "ts": float(seq)})
        entry = AuditEntry(seq, float(seq), body, prev.hash, chain_hash(prev.hash, body))
        store.append_audit_batch([entry])
        prev = entry
    return prev


def test_holds_no_store_looks_at_the_wal_and_makes_nothing_beside_the_file(
    db: Path, store: SqliteStore, tmp_path: Path
) -> None:
    assert holds_no_store(tmp_path / "missing.db")
    (tmp_path / "empty.db").write_bytes(b"")
    assert holds_no_store(tmp_path / "empty.db")
    assert not holds_no_store(db)  # one page without tables, and the store in its -wal
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "mcp0.db").write_bytes(db.read_bytes())
    assert holds_no_store(lone / "mcp0.db")
    assert [p.name for p in lone.iterdir()] == ["mcp0.db"]  # no -shm, no -wal made


@pytest.mark.parametrize(
    "edit",
    [
        "body = 1.5",
        "body = 1125899906842624",  # (bytes() of it: a petabyte)
        "body = CAST(X'FF' AS TEXT)",  # text that is not UTF-8, which sqlite3 fails to decode
        "hash = CAST(X'FF' AS TEXT)",
        "prev_hash = CAST(X'FF' AS TEXT)",
        "ts = CAST(X'FF' AS TEXT)",
    ],
)
def test_an_audit_row_edited_to_hold_anything_is_read_and_fails_verification(
    db: Path, store: SqliteStore, edit: str
) -> None:
    # a number in the body was given to bytes(): TypeError, or MemoryError for an integer;
    # text that is not UTF-8 failed the read of the whole page
    append_chain(store, 3)
    with contextlib.closing(sqlite3.connect(db)) as raw, raw:
        raw.execute("DROP TRIGGER audit_no_update")
        raw.execute(f"UPDATE audit SET {edit} WHERE seq = 3")
    read = store.read_audit()
    assert [entry.seq for entry in read] == [1, 2, 3]
    assert store.audit_head() == read[-1]
    with pytest.raises(ChainBroken) as caught:
        verify_store(store)
    assert caught.value.seq == 3


# The table re-created without its types and constraints: anyone who can edit the file can
LOOSE_AUDIT = """
CREATE TABLE audit_loose (seq, ts, body, prev_hash, hash);
INSERT INTO audit_loose SELECT seq, ts, body, prev_hash, hash FROM audit;
DROP TABLE audit;
ALTER TABLE audit_loose RENAME TO audit;
"""


@pytest.mark.parametrize(
    ("edit", "read_seqs"),
    [
        ("body = NULL", [1, 2, 3]),
        ("hash = NULL", [1, 2, 3]),
        ("prev_hash = NULL", [1, 2, 3]),
        ("seq = 'x' || char(27) || '[2Kok: 3 records'", [1, 2]),  # (text sorts last)
        ("seq = 3.5", [1, 2]),
        ("seq = NULL", [1, 2]),
    ],
)
def test_an_audit_table_re_created_without_types_is_read_and_fails_verification(
    db: Path, store: SqliteStore, edit: str, read_seqs: list[int]
) -> None:
    # NULL hashes and bodies were AttributeError/TypeError tracebacks in verify, list and the
    # server's start; a text seq became the head (text sorts after numbers) and crashed them,
    # and was printed raw: a terminal showed the line it held (found by review)
    append_chain(store, 3)
    with contextlib.closing(sqlite3.connect(db)) as raw, raw:
        raw.executescript(LOOSE_AUDIT)
        raw.execute(f"UPDATE audit SET {edit} WHERE seq = 3")
    read = store.read_audit()
    assert [entry.seq for entry in read] == read_seqs
    assert store.audit_head() == read[-1]
    with pytest.raises(ChainBroken) as caught:
        verify_store(store)
    assert caught.value.seq == 3


def test_audit_batch_is_all_or_nothing(store: SqliteStore) -> None:
    store.append_audit_batch([_entry(1)])
    with pytest.raises(StorageError, match="only one process may append"):
        store.append_audit_batch([_entry(2), _entry(3), _entry(1)])
    assert [e.seq for e in store.read_audit()] == [1]


ON_A_FULL_DISK = """
import json, os, sys
from mcp_zero.errors import StorageError
from mcp_zero.storage import PluginRecord, SqliteStore

disk = sys.argv[1]


def fill():
    filler = os.open(os.path.join(disk, "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(filler, bytes(4096))
    except OSError:
        pass
    finally:
        os.close(filler)


def refusal(act):
    try:
        act()
    except StorageError as exc:
        return f"{exc.message} [{exc.data['sqlite_error']}]"
    return None


seen = {}
# a store closed cleanly (its -wal and -shm files removed), to be opened on the full disk
SqliteStore(os.path.join(disk, "open.db")).close()
# a write under a size limit still far off
writing = SqliteStore(os.path.join(disk, "write.db"), max_size_bytes=64 << 20)
fill()
seen["open.db"] = refusal(lambda: SqliteStore(os.path.join(disk, "open.db")))
big = PluginRecord(name="p", version="1", manifest={"x": "y" * 70_000}, path="/")
seen["write.db"] = refusal(lambda: writing.put_plugin(big))
seen["room"] = writing.short_of_room(64 << 10)
print(json.dumps(seen))
"""


def _on_a_full_disk(tmp_path: Path) -> dict[str, str | None]:
    """What :data:`ON_A_FULL_DISK` saw on a real full disk (full_disk.on_a_full_disk)."""
    disk = tmp_path / "disk"
    seen: dict[str, str | None] = json.loads(on_a_full_disk(disk, ON_A_FULL_DISK, timeout=60))
    return {
        name: None if told is None else told.replace(str(disk), "DISK")
        for name, told in seen.items()
    }


def test_a_store_opened_on_a_full_disk_is_told_the_disk_is_full(tmp_path: Path) -> None:
    # opening a store needs room for its -shm file: SQLite's I/O error was told as "disk I/O
    # error: check the disk (dmesg)", and a restart on a full disk did not say why it failed
    # (found by review)
    seen = _on_a_full_disk(tmp_path)
    assert seen["open.db"] == (
        "disk is full at DISK/open.db: free space and retry [SQLITE_IOERR_SHMSIZE]"
    )


def test_a_full_disk_is_told_as_one_under_a_size_limit_too(tmp_path: Path) -> None:
    seen = _on_a_full_disk(tmp_path)
    assert seen["write.db"] == "disk is full at DISK/write.db: free space and retry [SQLITE_FULL]"
    assert seen["room"] == (
        "the disk holding DISK/write.db is nearly full (less than 64 KiB free): free space"
    )


def test_a_database_at_its_size_limit_says_so_not_that_the_disk_is_full(tmp_path: Path) -> None:
    # a cap reached was reported "database or disk is full: free space", the disk having
    # gigabytes free (found by review)
    path = tmp_path / "small.db"
    store = SqliteStore(path, max_size_bytes=64 * 1024)
    try:
        seq = 0
        failure: StorageError | None = None
        while failure is None:
            seq += 1
            try:
                store.append_audit_batch([_entry(seq, body=b"x" * 2000)])
            except StorageError as exc:
                failure = exc
        assert seq > 1
        assert failure.message == (
            f"database at {path} is full: it reached its size limit, db_max_mb (0.0625 MiB); "
            "raise db_max_mb and restart"
        )
        assert failure.data is not None
        assert failure.data["sqlite_error"] == "SQLITE_FULL"
        # Everything committed before the failure is still there, nothing after it.
        assert [e.seq for e in store.read_audit(limit=100_000)] == list(range(1, seq))
        # Admin writes fail the same way, reads keep working.
        with pytest.raises(StorageError, match="it reached its size limit"):
            store.put_plugin(
                PluginRecord(name="p", version="1", manifest={"x": "y" * 70_000}, path="/")
            )
        assert store.list_plugins() == []
    finally:
        store.close()


def test_write_waiting_on_another_writer_times_out_with_a_clear_error(db: Path) -> None:
    store = SqliteStore(db, busy_timeout=0.05)
    raw = sqlite3.connect(db, isolation_level=None)
    try:
        raw.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        store.get_agent("alice")  # WAL: reads are not blocked by a writer
        with pytest.raises(StorageError, match="database is locked"):
            store.create_agent(AgentRecord(name="alice", token_hash="h"))
        with pytest.raises(StorageError, match="database is locked"):
            store.append_audit_batch([_entry(1)])
        # (the audit log's way on its event loop: told at once, to retry later)
        with pytest.raises(StoreBusy, match="database is locked"):
            store.append_audit_batch([_entry(1)], wait=False)
        raw.execute("COMMIT")
        store.create_agent(AgentRecord(name="alice", token_hash="h"))
        store.append_audit_batch([_entry(1)])
    finally:
        raw.close()
        store.close()


def test_admin_and_audit_writes_from_threads_wait_for_each_other(store: SqliteStore) -> None:
    errors: list[BaseException] = []

    def admin() -> None:
        try:
            for i in range(150):
                store.create_agent(AgentRecord(name=f"a{i}", token_hash=f"h{i}"))
                store.put_plugin(PluginRecord(name=f"p{i % 5}", version="1", manifest={}, path="/"))
                assert store.get_agent(f"a{i}") is not None
        except BaseException as exc:
            errors.append(exc)

    def audit() -> None:
        try:
            for seq in range(1, 301):
                store.append_audit_batch([_entry(seq)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=admin), threading.Thread(target=audit)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert errors == []
    assert len(store.list_agents()) == 150
    assert [e.seq for e in store.read_audit(limit=1000)] == list(range(1, 301))


def test_closed_store_raises_storage_error(db: Path) -> None:
    store = SqliteStore(db)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        store.get_agent("alice")
    with pytest.raises(StorageError, match="closed"):
        store.append_audit_batch([_entry(1)])


def test_unwritable_location_raises_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match="cannot create database"):
        SqliteStore(blocker / "sub" / "mcp0.db")
    # one that exists and cannot be opened is not "created" (found by review)
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StorageError, match=r"cannot open database .*: Is a directory"):
        SqliteStore(tmp_path / "dir.db")
