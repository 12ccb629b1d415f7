"""Cedar policies: the schema, loading and validating policy files, and decisions.

engine = PolicyEngine.load(policy_dir)     # or PolicyStore(policy_dir) for hot reload
decision = engine.decide(action)           # PolicyDecision(allowed, policies, reasons, ...)
engine.require(action)                     # raises PolicyDenied with the reasons
"""

from __future__ import annotations

from mcp_zero.policy.decision import PolicyDecision
from mcp_zero.policy.defaults import DEFAULT_POLICIES, DEFAULT_POLICY_FILE, write_default_policies
from mcp_zero.policy.engine import PolicyEngine
from mcp_zero.policy.loader import PolicyInfo
from mcp_zero.policy.schema import load_schema, schema_text
from mcp_zero.policy.store import PolicyStore

__all__ = [
    "DEFAULT_POLICIES",
    "DEFAULT_POLICY_FILE",
    "PolicyDecision",
    "PolicyEngine",
    "PolicyInfo",
    "PolicyStore",
    "load_schema",
    "schema_text",
    "write_default_policies",
]
