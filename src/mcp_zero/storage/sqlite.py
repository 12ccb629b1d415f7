"""The embedded SQLite backend of the :class:`~mcp_zero.storage.base.Store` protocol.

One file in WAL mode, two connections:

- the *main* connection serves reads and the rare administrative writes
  (agents, plugins, snapshots), serialised by a lock;
- the *audit* connection is used only by :meth:`SqliteStore.append_audit_batch`
  (the audit log's group commits), under its own lock, so an audit fsync never
  holds the lock that reads take. WAL lets those reads proceed while an audit
  batch commits.

Both connections run ``synchronous=FULL`` (a commit is on disk when it returns).
The main connection has a busy timeout, so administrative writes wait for other
writers rather than fail; the audit connection waits only when asked to
(``append_audit_batch(wait=True)``): the audit log commits on the event loop, and
tells a busy store (:class:`~mcp_zero.storage.base.StoreBusy`) to retry later
rather than hold the loop while another process writes. Every ``sqlite3`` error
leaves as :class:`~mcp_zero.errors.StorageError` naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from operator import attrgetter
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from mcp_zero.errors import AgentNotFound, Conflict, StorageError
from mcp_zero.storage.base import (
    AgentRecord,
    AuditEntry,
    PluginRecord,
    SnapshotRecord,
    StoreBusy,
)
from mcp_zero.storage.migrations import (
    SCHEMA_VERSION,
    NotOurs,
    SchemaTooNew,
    check_ours,
    migrate,
)
from mcp_zero.storage.sqlite_errors import storage_error

T = TypeVar("T")

# Every statement is a literal, prepared once and cached by the sqlite3 module.
_INSERT_AGENT = (
    "INSERT INTO agents (name, token_hash, plugins, state, status, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_AGENT_BY_NAME = (
    "SELECT name, token_hash, plugins, state, status, created_at FROM agents WHERE name = ?"
)
_AGENT_BY_CREDENTIAL = (
    "SELECT name, token_hash, plugins, state, status, created_at "
    "FROM agents "
    "WHERE token_hash = ? LIMIT 1"
)
_AGENTS_AFTER = (
    "SELECT name, token_hash, plugins, state, status, created_at FROM agents WHERE name > ? "
    "ORDER BY name LIMIT ?"
)
_PUT_PLUGIN = (
    "INSERT OR REPLACE INTO plugins (name, version, manifest, path, installed_at, digest) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_PLUGIN_BY_NAME = (
    "SELECT name, version, manifest, path, installed_at, digest FROM plugins WHERE name = ?"
)
_ALL_PLUGINS = (
    "SELECT name, version, manifest, path, installed_at, digest FROM plugins ORDER BY name"
)
_INSERT_SNAPSHOT = "INSERT INTO snapshots (id, agent, data, created_at) VALUES (?, ?, ?, ?)"
_SNAPSHOT_BY_ID = "SELECT id, agent, data, created_at FROM snapshots WHERE id = ?"
_SNAPSHOTS_OF_AGENT = (
    "SELECT id, agent, data, created_at FROM snapshots WHERE agent = ? ORDER BY created_at, id"
)
_INSERT_AUDIT = "INSERT INTO audit (seq, ts, body, prev_hash, hash) VALUES (?, ?, ?, ?, ?)"
# A row as written or as a hand edit left it: the body and the hashes as bytes whatever they
# hold (a number as its text, TEXT as it is even if not UTF-8, which sqlite3 fails to decode,
# NULL as none), and so is a ts that is not a number: verification reports the row instead of
# the read failing. Only rows whose seq is an integer are in the chain: one of another type
# (a table re-created without its types) is counted by audit_rows_outside.
_AUDIT_ROW = (
    "SELECT seq, CASE typeof(ts) WHEN 'real' THEN ts ELSE CAST(ts AS BLOB) END,"
    " coalesce(CAST(body AS BLOB), X''), coalesce(CAST(prev_hash AS BLOB), X''),"
    " coalesce(CAST(hash AS BLOB), X'') FROM audit WHERE typeof(seq) = 'integer'"
)
_AUDIT_AFTER = _AUDIT_ROW + " AND seq > ? ORDER BY seq LIMIT ?"
_AUDIT_HEAD = _AUDIT_ROW + " ORDER BY seq DESC LIMIT 1"
_SQLITE_BUSY = 5  # the primary result code of a lock another connection holds
#: What the WAL is cut back to when it starts over: above what it grows to between SQLite's
#: own checkpoints (~4 MB), so only one grown while a read held it back is cut.
WAL_KEPT_BYTES = 8 << 20


class SqliteStore:
    """A :class:`~mcp_zero.storage.base.Store` in one SQLite file at ``path``.

    Creates the file (mode 0600: it holds token hashes) and its parent
    directories if missing, and migrates the schema to the current version.
    ``busy_timeout`` is how long, in seconds, a write waits for another writer.
    ``max_size_bytes`` caps the database file (for small devices); past it,
    writes fail with ``StorageError`` (saying so: not a full disk).

    ``read_only`` opens an existing store for reading only (commands that only
    read): nothing is created, migrated or switched to WAL, and a data dir that is
    readable but not writable will do; a store that needs migrating is refused.

    Raises :class:`~mcp_zero.errors.StorageError` if the file cannot be created,
    opened or migrated, holds another program's database, or was written by a
    newer release.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 5.0,
        max_size_bytes: int | None = None,
        read_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._max_size_bytes = max_size_bytes
        # reentrant: a change made with its audit record (append_audit_with) runs the
        # store's own writes inside one transaction, on this thread
        self._lock = threading.RLock()
        self._in_transaction = False
        self._audit_lock = threading.Lock()
        self._closed = False
        if read_only:
            self._conn = self._audit_conn = self._connect_read_only()
            self._audit_cursor = self._conn.cursor()
            return
        self._create_file()
        self._conn = self._connect()
        try:
            self._migrate()
            self._audit_conn = self._connect()
            # set up, it waits for no lock: append_audit_batch waits only when asked to
            self._audit_conn.execute("PRAGMA busy_timeout = 0")
            # One cursor for every batch: conn.execute makes a cursor per statement.
            self._audit_cursor = self._audit_conn.cursor()
        except BaseException:
            self._conn.close()
            raise

    @property
    def busy_timeout(self) -> float:
        """How long, in seconds, a write waits for another writer's lock."""
        return self._busy_timeout

    # lifecycle

    def close(self) -> None:
        """Close both connections; idempotent. Later calls raise ``StorageError``."""
        with self._lock, self._audit_lock:
            if self._closed:
                return
            self._closed = True
            self._audit_conn.close()
            self._conn.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # agents

    def create_agent(self, agent: AgentRecord) -> None:
        """Insert ``agent``; raises :class:`~mcp_zero.errors.Conflict` if the name is taken."""
        with self._transaction("create agent") as conn:
            try:
                conn.execute(
                    _INSERT_AGENT,
                    (
                        agent.name,
                        agent.token_hash,
                        _dumps(agent.plugins),
                        _dumps(agent.state),
                        agent.status,
                        agent.created_at,
                    ),
                )
            except sqlite3.IntegrityError:
                raise Conflict(
                    f"agent {agent.name!r} already exists: choose another name",
                    data={"agent": agent.name},
                ) from None

    def get_agent(self, name: str) -> AgentRecord | None:
        rows = self._query(
            "read agent",
            _AGENT_BY_NAME,
            (name,),
        )
        return _agent(rows[0]) if rows else None

    def agent_by_token_hash(self, token_hash: str) -> AgentRecord | None:
        """The agent whose token hashes to ``token_hash`` (indexed lookup), or None."""
        rows = self._query(
            "authenticate agent",
            _AGENT_BY_CREDENTIAL,
            (token_hash,),
        )
        return _agent(rows[0]) if rows else None

    def list_agents(self, after: str = "", limit: int | None = None) -> list[AgentRecord]:
        """The agents named after ``after``, by name; at most ``limit`` (None: all)."""
        rows = self._query(
            "list agents",
            _AGENTS_AFTER,
            (after, -1 if limit is None else limit),  # (a negative LIMIT: none)
        )
        return [_agent(row) for row in rows]

    def change_agent(self, name: str, change: Callable[[AgentRecord], None]) -> AgentRecord:
        """Apply ``change`` to agent ``name`` as stored, and store its plugins, state,
        status and token hash as ``change`` left them; returns the agent written.

        All in one write transaction: ``change`` sees the agent, and what it reads through
        this store, as they are when the write is made (another writer — a plugin removed
        by another process — waits, or has committed before), so nothing it checked and
        nothing it did not change is overwritten by a stale copy. An exception it raises
        cancels the write. Raises :class:`~mcp_zero.errors.AgentNotFound` if there is no
        such agent.
        """
        with self._transaction("update agent") as conn:
            row = conn.execute(_AGENT_BY_NAME, (name,)).fetchone()
            if row is None:
                raise AgentNotFound(
                    f"agent {name!r} does not exist: list agents with `mcp0 agent list`",
                    data={"agent": name},
                )
            agent = _agent(row)
            change(agent)
            conn.execute(
                "UPDATE agents SET plugins = ?, state = ?, status = ?, token_hash = ? "
                "WHERE name = ?",
                (_dumps(agent.plugins), _dumps(agent.state), agent.status, agent.token_hash, name),
            )
            return agent

    # plugins

    def put_plugin(
        self,
        plugin: PluginRecord,
        *,
        check: Callable[[list[PluginRecord]], None] | None = None,
    ) -> PluginRecord | None:
        """Insert or replace ``plugin`` and bump :meth:`plugins_version`; returns the record
        it replaced, if any.

        ``check`` is called with the installed plugins inside the write transaction, so
        what it sees is still true when ``plugin`` is written (another process installing
        at the same time waits); an exception it raises cancels the write.
        """
        with self._transaction("install plugin") as conn:
            installed = [_plugin(row) for row in conn.execute(_ALL_PLUGINS).fetchall()]
            if check is not None:
                check(installed)
            conn.execute(
                _PUT_PLUGIN,
                (
                    plugin.name,
                    plugin.version,
                    _dumps(plugin.manifest),
                    plugin.path,
                    plugin.installed_at,
                    plugin.digest,
                ),
            )
            _bump_plugins_version(conn)
            return next((p for p in installed if p.name == plugin.name), None)

    def get_plugin(self, name: str) -> PluginRecord | None:
        rows = self._query(
            "read plugin",
            _PLUGIN_BY_NAME,
            (name,),
        )
        return _plugin(rows[0]) if rows else None

    def list_plugins(self) -> list[PluginRecord]:
        rows = self._query(
            "list plugins",
            _ALL_PLUGINS,
        )
        return [_plugin(row) for row in rows]

    def set_plugin_digest(self, name: str, path: str, digest: str) -> bool:
        """Record ``digest`` for plugin ``name``'s copy at ``path`` if it has none (installed
        before digests were kept); False when that record is gone, replaced or has one."""
        with self._transaction("record plugin digest") as conn:
            updated = conn.execute(
                "UPDATE plugins SET digest = ? WHERE name = ? AND path = ? AND digest = ''",
                (digest, name, path),
            )
            return updated.rowcount == 1

    def delete_plugin(self, name: str) -> list[str] | None:
        """Delete plugin ``name`` and detach it from every agent, in one transaction.

        Returns the agents it was detached from, or None if there was no such plugin
        (otherwise :meth:`plugins_version` moves). A plugin installed later under the
        same name is not attached to anyone.
        """
        with self._transaction("remove plugin") as conn:
            if conn.execute("DELETE FROM plugins WHERE name = ?", (name,)).rowcount == 0:
                return None
            _bump_plugins_version(conn)
            detached = []
            for agent, plugins_json in conn.execute("SELECT name, plugins FROM agents").fetchall():
                plugins = json.loads(plugins_json)
                if name in plugins:
                    kept = [p for p in plugins if p != name]
                    conn.execute(
                        "UPDATE agents SET plugins = ? WHERE name = ?", (_dumps(kept), agent)
                    )
                    detached.append(agent)
            return detached

    def plugins_version(self) -> int:
        """A counter bumped by every plugin put/delete, from any process using this file."""
        rows = self._query(
            "read plugins version", "SELECT value FROM meta WHERE key = 'plugins_version'"
        )
        return int(rows[0][0])

    def first_start_done(self) -> bool:
        """Whether the data dir's first start (examples installed or declined, the default
        agent made) finished; False for a new database until :meth:`finish_first_start`."""
        rows = self._query(
            "read first start", "SELECT value FROM meta WHERE key = 'first_start_done'"
        )
        return bool(rows[0][0])

    def finish_first_start(self) -> None:
        """Record that the data dir's first start finished (from any process)."""
        with self._transaction("record first start") as conn:
            conn.execute("UPDATE meta SET value = 1 WHERE key = 'first_start_done'")

    def recorded(self, name: str) -> str | None:
        """The digest of ``name`` (a governing file) as the audit log last recorded it."""
        rows = self._query("read recorded", "SELECT digest FROM recorded WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    def set_recorded(self, name: str, digest: str) -> None:
        """Keep ``digest`` as what the log records of ``name``: in the transaction of that
        record (``append_audit_with``)."""
        with self._transaction("keep what was recorded") as conn:
            conn.execute(
                "INSERT INTO recorded (name, digest) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET digest = excluded.digest",
                (name, digest),
            )

    # snapshots

    def put_snapshot(self, snapshot: SnapshotRecord) -> None:
        """Store ``snapshot``; snapshots are immutable, so a taken id raises ``Conflict``."""
        with self._transaction("save snapshot") as conn:
            try:
                conn.execute(
                    _INSERT_SNAPSHOT,
                    (snapshot.id, snapshot.agent, _dumps(snapshot.data), snapshot.created_at),
                )
            except sqlite3.IntegrityError:
                raise Conflict(
                    f"snapshot {snapshot.id!r} already exists: snapshots are immutable",
                    data={"snapshot": snapshot.id},
                ) from None

    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        rows = self._query(
            "read snapshot",
            _SNAPSHOT_BY_ID,
            (snapshot_id,),
        )
        return _snapshot(rows[0]) if rows else None

    def list_snapshots(self, agent: str) -> list[SnapshotRecord]:
        """Agent ``agent``'s snapshots, oldest first."""
        rows = self._query(
            "list snapshots",
            _SNAPSHOTS_OF_AGENT,
            (agent,),
        )
        return [_snapshot(row) for row in rows]

    # audit

    def append_audit_batch(self, entries: list[AuditEntry], *, wait: bool = True) -> None:
        """Insert ``entries`` in one transaction; return once it is durable (fsynced).

        All or nothing: on error nothing of the batch is stored. While another
        connection holds the write lock, waits up to :attr:`busy_timeout` for it, or
        with ``wait=False`` raises :class:`~mcp_zero.storage.base.StoreBusy` at once.
        Raises ``StorageError``, also when a ``seq`` is already stored (another
        process is appending to the same log).
        """
        if not entries:
            return
        with self._audit_lock:
            self._check_open()
            cursor = self._audit_cursor
            try:
                if wait:  # (the rare caller off the loop: the CLI, close)
                    cursor.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000):d}")
                try:
                    cursor.execute("BEGIN IMMEDIATE")
                finally:
                    if wait:
                        cursor.execute("PRAGMA busy_timeout = 0")
                try:
                    cursor.executemany(_INSERT_AUDIT, map(_audit_row, entries))
                    cursor.execute("COMMIT")
                except BaseException:
                    if self._audit_conn.in_transaction:
                        cursor.execute("ROLLBACK")
                    raise
            except sqlite3.IntegrityError as exc:
                if exc.sqlite_errorname in _TAKEN_SEQ:
                    raise _collision(entries, self.path, exc) from exc
                # another constraint (a trigger added to the table): its own words, not
                # "only one process may append" (found by review)
                raise self._storage_error(exc, "append audit entries") from exc
            except sqlite3.Error as exc:
                error = self._storage_error(exc, "append audit entries")
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF == _SQLITE_BUSY:
                    raise StoreBusy(error.message, data=error.data) from exc
                raise error from exc

    def checkpoint(self) -> None:
        """Copy what the WAL holds into the database file, as far as no reader holds it back
        (a PASSIVE checkpoint: it waits for nobody). SQLite does so itself only at ~4 MB of
        WAL: until then ``mcp0.db`` is one page without tables, and a backup that left out
        ``mcp0.db-wal`` held nothing. On a connection of its own, to hold neither the reads'
        lock nor the audit commits'. Raises ``StorageError``."""
        self._check_open()
        try:
            conn = sqlite3.connect(self.path, timeout=0, isolation_level=None)
            with contextlib.closing(conn):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            raise self._storage_error(exc, "checkpoint the WAL") from exc

    def short_of_room(self, min_bytes: int) -> str | None:
        """Why ``min_bytes`` more cannot be written, saying what to do: too little free on
        the filesystem, or, under a size limit, in the database; None when they can be
        (or that cannot be told: a commit will tell)."""
        try:
            fs = os.statvfs(self.path.parent)
        except OSError:
            return None
        if fs.f_bavail * fs.f_frsize < min_bytes:
            return (
                f"the disk holding {self.path} is nearly full (less than {min_bytes >> 10} KiB "
                "free): free space"
            )
        if self._max_size_bytes is None:
            return None
        with self._audit_lock:
            self._check_open()
            try:
                pages, free, size = (
                    int(self._audit_conn.execute(f"PRAGMA {pragma}").fetchone()[0])
                    for pragma in ("page_count", "freelist_count", "page_size")
                )
            except sqlite3.Error:
                return None
        if self._max_size_bytes - (pages - free) * size >= min_bytes:
            return None
        return (
            f"the database at {self.path} is nearly full (less than {min_bytes >> 10} KiB left "
            f"under its size limit, db_max_mb ({self._max_size_bytes / 2**20:g} MiB)): raise "
            "db_max_mb and restart"
        )

    def write_blocked(self) -> str | None:
        """Why the audit log cannot be written now without waiting: another connection holds
        the write lock (asked by taking it and letting go at once, nothing written); None
        when it can."""
        with self._audit_lock:
            self._check_open()
            cursor = self._audit_cursor
            try:
                cursor.execute("BEGIN IMMEDIATE")  # (the connection waits for no lock)
                cursor.execute("ROLLBACK")
            except sqlite3.Error as exc:
                if self._audit_conn.in_transaction:
                    cursor.execute("ROLLBACK")
                return self._storage_error(exc, "write the audit log").message
        return None

    def read_audit(self, after_seq: int = 0, limit: int = 1000) -> list[AuditEntry]:
        """Up to ``limit`` audit entries with ``seq > after_seq``, in seq order."""
        rows = self._query(
            "read audit log",
            _AUDIT_AFTER,
            (after_seq, limit),
        )
        return [_audit(row) for row in rows]

    def audit_head(self) -> AuditEntry | None:
        """The audit entry with the highest seq, or None for an empty log."""
        rows = self._query(
            "read audit head",
            _AUDIT_HEAD,
        )
        return _audit(rows[0]) if rows else None

    def lowest_audit_seq(self) -> int | None:
        """The lowest seq in the audit table, or None for an empty log. The chain starts at
        1: a row below (added by hand) is outside it, where reading from seq 0 finds none."""
        rows = self._query(
            "read audit log", "SELECT min(seq) FROM audit WHERE typeof(seq) = 'integer'"
        )
        lowest: int | None = rows[0][0]
        return lowest

    def audit_rows_outside(self) -> int:
        """Audit rows whose seq is no integer (NULL, text, a number with a fraction: a
        table re-created without its types, by hand), which no reading of the chain meets."""
        rows = self._query(
            "read audit log", "SELECT count(*) FROM audit WHERE typeof(seq) != 'integer'"
        )
        count: int = rows[0][0]
        return count

    def audit_rows_upto(self, seq: int) -> int:
        """Audit rows whose seq is an integer up to ``seq``: as many as the chain has up to
        there, unless a row is stored twice (a table re-created without its primary key)."""
        rows = self._query(
            "read audit log",
            "SELECT count(*) FROM audit WHERE typeof(seq) = 'integer' AND seq <= ?",
            (seq,),
        )
        count: int = rows[0][0]
        return count

    # internals

    def _create_file(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Create it ourselves so it is 0600; SQLite gives -wal/-shm the same mode.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        except OSError as exc:
            doing = "open" if self.path.exists() else "create"
            raise StorageError(
                f"cannot {doing} database at {self.path}: {exc.strerror};"
                f" check the permissions of {'it' if doing == 'open' else 'the data directory'}"
                " (the server writes to it) and that its file system is writable",
                data={"path": str(self.path)},
            ) from exc

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # guarded by our locks
            )
        except sqlite3.Error as exc:
            raise self._storage_error(exc, "open database") from exc
        try:
            check_ours(conn)  # before WAL: another program's file is left as it is
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(
                    f"cannot use WAL mode at {self.path} (got {mode!r}):"
                    " put the data dir on a local filesystem",
                    data={"path": str(self.path)},
                )
            conn.execute("PRAGMA synchronous = FULL")
            # A WAL grown while a read held it (a backup's VACUUM INTO) kept its size on disk,
            # outside db_max_mb, for as long as the server ran (found by a bug hunt)
            conn.execute(f"PRAGMA journal_size_limit = {WAL_KEPT_BYTES:d}")
            if self._max_size_bytes is not None:
                page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
                pages = max(1, self._max_size_bytes // page_size)
                conn.execute(f"PRAGMA max_page_count = {pages:d}")
        except sqlite3.Error as exc:
            conn.close()
            raise self._storage_error(exc, "open database") from exc
        except NotOurs:
            conn.close()
            raise self._not_ours() from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        uri = f"file:{urllib.parse.quote(str(self.path.absolute()))}?mode=ro"
        try:
            try:
                conn, version = _open_checked(uri, self._busy_timeout)
            except sqlite3.OperationalError:
                # A WAL database read where its -shm cannot be made (a directory we may
                # not write): with no -wal left, the file alone is the whole store.
                wal = self.path.with_name(self.path.name + "-wal")
                if wal.exists() and wal.stat().st_size > 0:
                    raise
                conn, version = _open_checked(uri + "&immutable=1", self._busy_timeout)
        except sqlite3.Error as exc:
            raise self._storage_error(exc, "open database for reading") from exc
        except NotOurs:
            raise self._not_ours() from None
        except OSError as exc:
            raise StorageError(
                f"cannot read database at {self.path}: {exc.strerror or exc}",
                data={"path": str(self.path)},
            ) from exc
        if version != SCHEMA_VERSION:
            conn.close()
            if version > SCHEMA_VERSION:
                raise self._too_new(version)
            raise StorageError(
                f"database at {self.path} "
                + ("is not set up yet" if version == 0 else "was written by an older release")
                + ": 'mcp0 serve' (or any command that changes the data dir) sets it up;"
                " reading commands change nothing",
                data={"path": str(self.path), "found": version, "supported": SCHEMA_VERSION},
            )
        return conn

    def _storage_error(self, exc: sqlite3.Error, doing: str) -> StorageError:
        return storage_error(exc, self.path, doing, size_limit=self._max_size_bytes)

    def _not_ours(self) -> StorageError:
        return StorageError(
            f"{self.path} is not an MCP-ZERO store (it holds another program's tables);"
            " it was left as it is: give a data dir of its own (--data-dir)",
            data={"path": str(self.path)},
        )

    def _too_new(self, found: int) -> StorageError:
        return StorageError(
            f"database at {self.path} has schema version {found}, newer than this"
            f" release understands ({SCHEMA_VERSION}): upgrade mcp-zero",
            data={"path": str(self.path), "found": found, "supported": SCHEMA_VERSION},
        )

    def _migrate(self) -> None:
        try:
            migrate(self._conn)
        except SchemaTooNew as exc:
            raise self._too_new(exc.found) from exc
        except NotOurs:
            raise self._not_ours() from None
        except sqlite3.Error as exc:
            raise self._storage_error(exc, "migrate database schema") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(
                f"store at {self.path} is closed: open a new SqliteStore",
                data={"path": str(self.path)},
            )

    def _query(self, doing: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            self._check_open()
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._storage_error(exc, doing) from exc

    @contextmanager
    def _transaction(self, doing: str) -> Iterator[sqlite3.Connection]:
        """A write transaction on the main connection, committed when the block ends; inside
        another (on this thread), part of that one."""
        with self._lock:
            self._check_open()
            if self._in_transaction:
                yield self._conn
                return
        conn = self._begin(doing)
        try:
            self._in_transaction = True
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._in_transaction = False
        except sqlite3.Error as exc:
            raise self._storage_error(exc, doing) from exc
        finally:
            self._lock.release()

    def _begin(self, doing: str) -> sqlite3.Connection:
        """``BEGIN IMMEDIATE`` on the main connection; returns holding ``_lock``. While
        another connection (another process) holds the write lock, waits for it up to
        :attr:`busy_timeout` without holding ``_lock``: the connection's other users (the
        server's reads, on its loop) go on meanwhile. Raises ``StorageError``."""
        deadline = time.monotonic() + self._busy_timeout
        delay = 0.001
        while True:
            self._lock.acquire()
            try:
                self._check_open()
                conn = self._conn
                conn.execute("PRAGMA busy_timeout = 0")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                finally:
                    conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000):d}")
                return conn
            except BaseException as exc:
                if not self._closed and self._conn.in_transaction:  # (begun, then interrupted)
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                self._lock.release()
                if not isinstance(exc, sqlite3.Error):
                    raise
                busy = getattr(exc, "sqlite_errorcode", 0) & 0xFF == _SQLITE_BUSY
                if not busy or time.monotonic() >= deadline:
                    raise self._storage_error(exc, doing) from exc
            time.sleep(max(min(delay, deadline - time.monotonic()), 0))  # waiting: write lock
            delay = min(delay * 2, 0.05)

    def append_audit_with(
        self, change: Callable[[], T], entries_for: Callable[[T], list[AuditEntry]]
    ) -> T:
        """Run ``change`` (writes through this store) and append the audit entries
        ``entries_for`` makes of its result, in one transaction: when this returns both are
        durable; when it raises, neither was written. Raises what ``change`` raises, and
        ``StorageError`` as :meth:`append_audit_batch`."""
        with self._transaction("change and audit it") as conn:
            result = change()
            entries = entries_for(result)
            try:
                conn.executemany(_INSERT_AUDIT, [_audit_row(e) for e in entries])
            except sqlite3.IntegrityError as exc:
                raise _collision(entries, self.path, exc) from exc
        return result


def holds_no_store(path: Path) -> bool:
    """Whether ``path`` holds no store: no file, an empty one, or a database without tables
    and without a ``-wal`` beside it. The last is what a first start killed as it began
    leaves, and a copy of a running server's ``mcp0.db`` alone: until its WAL is
    checkpointed, the store is in ``mcp0.db-wal`` and the main file one page without tables.
    A file SQLite cannot read holds one, as far as this says (opening it tells what it is)."""
    try:
        if path.stat().st_size == 0:
            return True
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            return False
    except FileNotFoundError:
        return True
    except OSError:
        return False
    # immutable: read as it is, without making the -shm (or -wal) a WAL database needs
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro&immutable=1"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            tables: int = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.Error:
        return False
    return tables == 0


def _open_checked(uri: str, timeout: float) -> tuple[sqlite3.Connection, int]:
    """A read-only connection to ``uri`` and its store's version (see ``check_ours``)."""
    conn = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)
    try:
        conn.isolation_level = None
        return conn, check_ours(conn)
    except BaseException:
        conn.close()
        raise


# An entry's row, in _INSERT_AUDIT's order (attrgetter: a C function, not a Python one per row)
_audit_row: Callable[[AuditEntry], tuple[int, float, bytes, str, str]] = attrgetter(
    "seq", "ts", "body", "prev_hash", "hash"
)


# An entry's seq already stored: another process appended it
_TAKEN_SEQ = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})


def _collision(entries: list[AuditEntry], path: Path, exc: sqlite3.Error) -> StorageError:
    return StorageError(
        f"audit entries {entries[0].seq}..{entries[-1].seq} collide with entries"
        f" already in {path}: only one process may append to an audit log;"
        " restart the appender so it continues from the stored head",
        data={"path": str(path), "sqlite": str(exc)},
    )


def _bump_plugins_version(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'plugins_version'")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _agent(row: Any) -> AgentRecord:
    name, token_hash, plugins, state, status, created_at = row
    return AgentRecord(
        name=name,
        token_hash=token_hash,
        plugins=json.loads(plugins),
        state=json.loads(state),
        status=status,
        created_at=created_at,
    )


def _plugin(row: Any) -> PluginRecord:
    name, version, manifest, path, installed_at, digest = row
    return PluginRecord(
        name=name,
        version=version,
        manifest=json.loads(manifest),
        path=path,
        installed_at=installed_at,
        digest=digest,
    )


def _snapshot(row: Any) -> SnapshotRecord:
    snapshot_id, agent, data, created_at = row
    return SnapshotRecord(id=snapshot_id, agent=agent, data=json.loads(data), created_at=created_at)


def _audit(row: Any) -> AuditEntry:
    seq, ts, body, prev_hash, entry_hash = row
    # (a hash that is not UTF-8 is no hex digest either: replaced, it still is none)
    return AuditEntry(
        seq=seq,
        ts=ts,
        body=body,
        prev_hash=prev_hash.decode(errors="replace"),
        hash=entry_hash.decode(errors="replace"),
    )
