"""Actions of the admin (the admin API's and the CLI's caller): decided by policy, audited.

Agent management and plugin installs are actions like a tool call: Cedar sees the
principal ``Agent::"admin"`` with ``admin == true`` and the caller's transport
(``"admin"`` for the API, ``"cli"`` for ``mcp0``), and the outcome is audited.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class AdminDecision:
    """The policy's decision on an action of the admin, as the audit log is to tell it."""

    # what the action's ``allowed`` record says of it, as a tool call's does: the
    # ``policies`` that permitted it, the ``policies_sha256`` of their set, and
    # ``policy_errors`` when some failed to evaluate
    record: JSON
    # a denial's audit event (the caller appends it) and error (then raises it)
    denial: tuple[JSON, PolicyDenied] | None = None


def admin_decision(
    policy: PolicyStore | None,
    verb: Verb,
    resource: str,
    via: str,
    plugin: str | None = None,
    *,
    count: Callable[[Sequence[str]], None] | None = None,
) -> AdminDecision:
    """The policy's decision on whether the admin may do this here; a denial's event names
    the ``plugin`` the action concerns, if any, and is counted by ``count``
    (Metrics.count_denials)."""
    if policy is None:
        return AdminDecision({})
    decision = policy.decide(Action(ADMIN, verb, resource, plugin, context={"transport": via}))
    if decision.allowed:
        record: JSON = {
            "policies": list(decision.policies),
            "policies_sha256": decision.policies_sha256,
        }
        if decision.errors:
            record["policy_errors"] = list(decision.errors)
        return AdminDecision(record)
    if count is not None:
        count(decision.denied_by)
    data = decision.to_data()
    detail = {"code": PolicyDenied.code, **data, "policies_sha256": decision.policies_sha256}
    if plugin is not None:
        detail["plugin"] = plugin
    event = admin_event(verb, resource, via, Outcome.DENIED, detail)
    return AdminDecision({}, (event, PolicyDenied(decision.message, data=data)))


def decided_together(records: Sequence[JSON]) -> JSON:
    """What the record of an action that several decisions allowed says of them (a spawn's
    and its plugins' attaches): their ``policies`` and ``policy_errors``, each once, and the
    ``policies_sha256`` of the set that made them all. One set: the callers make them with
    no await between, so no reload comes between them."""
    together: JSON = {}
    for key in ("policies", "policy_errors"):
        values = list(dict.fromkeys(v for record in records for v in record.get(key, ())))
        if values:  # (an allow has a permit: no policies, no policy store)
            together[key] = values
    sets = {record["policies_sha256"] for record in records if "policies_sha256" in record}
    assert len(sets) <= 1, "decisions of one action made by different policy sets"
    if sets:
        together["policies_sha256"] = sets.pop()
    return together
