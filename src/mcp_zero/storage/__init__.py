"""Where MCP-ZERO keeps agents, plugins, snapshots and the audit log: the ``Store`` protocol."""

from __future__ import annotations

from mcp_zero.storage.base import AgentRecord, AuditEntry, PluginRecord, SnapshotRecord, Store
from mcp_zero.storage.sqlite import SqliteStore

__all__ = [
    "AgentRecord",
    "AuditEntry",
    "PluginRecord",
    "SnapshotRecord",
    "SqliteStore",
    "Store",
]
