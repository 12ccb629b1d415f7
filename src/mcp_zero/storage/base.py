"""The ``Store`` protocol every backend implements, and the records it keeps.

SQLite (embedded, the default) implements it now; PostgreSQL later. Every
method is synchronous and thread-safe: reads and the rare administrative writes
take microseconds on SQLite. The hot write — the audit record of every action —
arrives in batches from ``mcp_zero.audit.AuditLog`` (group commit, one batch
at a time); ``append_audit_batch`` returns only once the batch is durable
(fsynced). The store keeps audit rows as given: the chain is the audit log's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from mcp_zero.errors import StorageError

T = TypeVar("T")


class StoreBusy(StorageError):
    """Another writer (a CLI command, another process's connection) holds the store's write
    lock: ``append_audit_batch(..., wait=False)`` did not wait for it. Retry later."""


@dataclass(slots=True)
class AgentRecord:
    name: str
    token_hash: str
    plugins: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # free-form, persisted by snapshots
    status: str = "active"  # "active" | "terminated"
    created_at: float = 0.0


@dataclass(slots=True)
class PluginRecord:
    name: str
    version: str
    manifest: dict[str, Any]  # the manifest as installed (JSON)
    path: str  # installed plugin directory
    installed_at: float = 0.0
    digest: str = ""  # sha256 of the installed files ('' for copies installed before it was kept)


@dataclass(slots=True)
class SnapshotRecord:
    id: str
    agent: str
    data: dict[str, Any]  # the AgentRecord's name, plugins, state, status
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A record as stored: ``seq`` from 1, gap-free; ``hash`` chains to ``prev_hash``."""

    seq: int
    ts: float
    body: bytes  # canonical JSON of the event
    prev_hash: str  # hex SHA-256
    hash: str  # hex SHA-256


class Store(Protocol):
    # agents
    def create_agent(self, agent: AgentRecord) -> None: ...  # Conflict if the name is taken
    def get_agent(self, name: str) -> AgentRecord | None: ...
    def agent_by_token_hash(self, token_hash: str) -> AgentRecord | None: ...
    # by name, after ``after``; at most ``limit`` (None: all)
    def list_agents(self, after: str = "", limit: int | None = None) -> list[AgentRecord]: ...
    # change(stored agent) in a write transaction, then its plugins, state, status and
    # token hash written; AgentNotFound if missing
    def change_agent(self, name: str, change: Callable[[AgentRecord], None]) -> AgentRecord: ...

    # plugins
    # insert or replace; check(installed plugins) runs in the same write transaction
    def put_plugin(
        self,
        plugin: PluginRecord,
        *,
        check: Callable[[list[PluginRecord]], None] | None = None,
    ) -> PluginRecord | None: ...  # the record it replaced
    def get_plugin(self, name: str) -> PluginRecord | None: ...
    def list_plugins(self) -> list[PluginRecord]: ...
    # fills in the digest of a copy recorded without one; False if it had one or is gone
    def set_plugin_digest(self, name: str, path: str, digest: str) -> bool: ...
    def delete_plugin(self, name: str) -> list[str] | None: ...  # detached agents; None: no such
    def plugins_version(self) -> int: ...  # changes whenever the plugin set changes

    # the data dir's first start (examples, default agent): done once, then never again
    def first_start_done(self) -> bool: ...
    def finish_first_start(self) -> None: ...

    # what the audit log last recorded of a file that governs the server (policies, admin
    # token): its digest, written in the transaction of that record (append_audit_with)
    def recorded(self, name: str) -> str | None: ...
    def set_recorded(self, name: str, digest: str) -> None: ...

    # snapshots
    def put_snapshot(self, snapshot: SnapshotRecord) -> None: ...  # Conflict if the id is taken
    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None: ...
    def list_snapshots(self, agent: str) -> list[SnapshotRecord]: ...  # oldest first

    # how long, in seconds, a write waits for another writer's lock before it fails
    @property
    def busy_timeout(self) -> float: ...

    # audit: append-only; rows arrive in seq order, durable when the call returns; with
    # wait=False, StoreBusy at once (nothing written) while another writer holds the lock
    def append_audit_batch(self, entries: list[AuditEntry], *, wait: bool = True) -> None: ...
    # ``change`` (writes through this store) and the entries made of its result in one
    # transaction, or neither
    def append_audit_with(
        self, change: Callable[[], T], entries_for: Callable[[T], list[AuditEntry]]
    ) -> T: ...
    def read_audit(self, after_seq: int = 0, limit: int = 1000) -> list[AuditEntry]: ...
    # why min_bytes more cannot be written (a message saying what to do), None if they can
    def short_of_room(self, min_bytes: int) -> str | None: ...
    # why the audit log cannot be written now without waiting (another process holds the
    # write lock, a message saying what to do), None if it can
    def write_blocked(self) -> str | None: ...
    def audit_head(self) -> AuditEntry | None: ...
    # the lowest seq stored, None for an empty log: below 1, a row outside the chain
    def lowest_audit_seq(self) -> int | None: ...
    # rows whose seq is not an integer (a table re-created by hand): outside the chain too
    def audit_rows_outside(self) -> int: ...
    # integer-seq rows up to a seq: the chain's count there, unless one is stored twice
    def audit_rows_upto(self, seq: int) -> int: ...

    def close(self) -> None: ...
