"""The audit log: every action's outcome, hash-chained, group-committed, verifiable."""

from __future__ import annotations

from mcp_zero.audit.chain import (
    GENESIS,
    ChainBroken,
    ChainReport,
    canonical,
    chain_hash,
    verify_chain,
    verify_store,
)
from mcp_zero.audit.log import AuditLog, AuditStats

__all__ = [
    "GENESIS",
    "AuditLog",
    "AuditStats",
    "ChainBroken",
    "ChainReport",
    "canonical",
    "chain_hash",
    "verify_chain",
    "verify_store",
]
