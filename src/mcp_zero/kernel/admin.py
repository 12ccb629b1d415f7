"""Actions of the admin (the admin API's and the CLI's caller): decided by policy, audited.

Agent management and plugin installs are actions like a tool call: Cedar sees the
principal ``Agent::"admin"`` with ``admin == true`` and the caller's transport
(``"admin"`` for the API, ``"cli"`` for ``mcp0``), and the outcome is audited.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mcp_zero.errors import PolicyDenied
from mcp_zero.kernel.action import Action, Outcome, Principal, Verb
from mcp_zero.policy.store import PolicyStore

JSON = dict[str, Any]
ADMIN = Principal("admin", admin=True)
# Audited, never decided: the policy files changed on disk and the server loaded them (or
# could not). Not a Cedar action, so not a Verb: nobody asks the server to edit the files.
LOAD_POLICIES = "load_policies"
# Audited, never decided, the same way: the admin token file changed (rotated, or emptied).
CHANGE_ADMIN_TOKEN = "change_admin_token"  # noqa: S105 - a verb, not a secret


def admin_event(verb: Verb | str, resource: str, via: str, outcome: Outcome, detail: JSON) -> JSON:
    """The audit event of an admin action (or of ``LOAD_POLICIES``, ``CHANGE_ADMIN_TOKEN``)."""
    return {
        "agent": ADMIN.agent,
        "anonymous": False,
        "verb": str(verb),
        "resource": resource,
        "transport": via,
        "outcome": outcome.value,
        **detail,
    }


def admin_denial(
    policy: PolicyStore | None,
    verb: Verb,
    resource: str,
    via: str,
    plugin: str | None = None,
    *,
    count: Callable[[Sequence[str]], None] | None = None,
) -> tuple[JSON, PolicyDenied] | None:
    """None when policy lets the admin do this here; else the denial's audit event (naming
    the ``plugin`` the action concerns, if any) and error (the caller appends the one, then
    raises the other), counted by ``count`` (Metrics.count_denials)."""
    if policy is None:
        return None
    decision = policy.decide(Action(ADMIN, verb, resource, plugin, context={"transport": via}))
    if decision.allowed:
        return None
    if count is not None:
        count(decision.policies)
    data = decision.to_data()
    detail = {"code": PolicyDenied.code, **data}
    if plugin is not None:
        detail["plugin"] = plugin
    event = admin_event(verb, resource, via, Outcome.DENIED, detail)
    return event, PolicyDenied(decision.message, data=data)
