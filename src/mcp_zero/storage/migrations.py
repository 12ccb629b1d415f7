"""The SQLite schema, as an ordered list of migration steps.

``PRAGMA user_version`` holds how many steps a database has applied. Each step
runs in its own ``BEGIN IMMEDIATE`` transaction together with the bump of
``user_version``, so a crash mid-migration leaves the previous version intact,
and two processes opening the same new file do not both apply a step. Steps are
append-only: never edit a released step, add a new one.
"""

from __future__ import annotations

import sqlite3

# Each step is a tuple of single SQL statements (no executescript: it would
# commit behind our back and break the one-transaction-per-step guarantee).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: agents, plugins, snapshots, the append-only audit table.
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO meta (key, value) VALUES ('plugins_version', 0)",
        """CREATE TABLE agents (
            name TEXT PRIMARY KEY,
            token_hash TEXT NOT NULL,
            plugins TEXT NOT NULL,
            state TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX agents_token_hash ON agents (token_hash)",
        """CREATE TABLE plugins (
            name TEXT PRIMARY KEY,
            version TEXT NOT NULL,
            manifest TEXT NOT NULL,
            path TEXT NOT NULL,
            installed_at REAL NOT NULL
        )""",
        """CREATE TABLE snapshots (
            id TEXT PRIMARY KEY,
            agent TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX snapshots_agent ON snapshots (agent, created_at)",
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            body BLOB NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )""",
        # Append-only is enforced by the database, not by convention.
        """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
           BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END""",
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
           BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END""",
    ),
    # 2: which copy of a plugin is installed (sha256 of its files), so that a snapshot can
    # tell it from another plugin installed later under the same name; '' before this step.
    ("ALTER TABLE plugins ADD COLUMN digest TEXT NOT NULL DEFAULT ''",),
    # 3: whether the data dir's first start finished (examples installed or declined, the
    # default agent made): 0 in a new database, so a first start that died after creating it
    # is finished by the next. A database already holding something was set up by an
    # earlier release.
    (
        """INSERT INTO meta (key, value) SELECT 'first_start_done',
           EXISTS (SELECT 1 FROM agents) OR EXISTS (SELECT 1 FROM plugins)
           OR EXISTS (SELECT 1 FROM audit)""",
    ),
    # 4: the digest of what governs a server from files in the data dir (the policy set,
    # the admin token) as the log last recorded it, written with that record: a server
    # starting on files changed while none ran records them before it serves.
    ("CREATE TABLE recorded (name TEXT PRIMARY KEY, digest TEXT NOT NULL)",),
)

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The database was written by a newer release (its ``user_version`` is ahead of ours)."""

    def __init__(self, found: int) -> None:
        super().__init__(f"schema version {found} > {SCHEMA_VERSION}")
        self.found = found


class NotOurs(Exception):
    """The database holds another program's tables: it is no MCP-ZERO store."""


def check_ours(conn: sqlite3.Connection) -> int:
    """The version of ``conn``'s database if it is an MCP-ZERO store or empty (0: a new
    file). Raises :class:`NotOurs` for a database that holds anything else: the first step
    creates its tables together with the version bump, so a version-0 database with tables,
    or a versioned one without our ``meta`` table, was written by another program."""
    version = user_version(conn)
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    if (version == 0 and names) or (version > 0 and "meta" not in names):
        raise NotOurs
    return version


def user_version(conn: sqlite3.Connection) -> int:
    """The number of migration steps ``conn``'s database has applied."""
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(conn: sqlite3.Connection) -> int:
    """Apply every step the database lacks; return the resulting version.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Raises
    :class:`NotOurs` for another program's database, :class:`SchemaTooNew` if the
    database is ahead of this code, and lets
    ``sqlite3.Error`` through (the store turns it into ``StorageError``).
    """
    version = check_ours(conn)
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(version)
    while version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = user_version(conn)
            if version < SCHEMA_VERSION:
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                version += 1
                # PRAGMA takes no parameters; version is our own int.
                conn.execute(f"PRAGMA user_version = {version:d}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return version
