"""The answer of the policy engine for one action."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# What a default deny (no permit matched) is counted under in place of a forbid's @id; no
# policy may take the name.
DEFAULT_DENY = "default-deny"


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """Whether an action is allowed, and which policies decided it, and why.

    ``policies`` holds policy ids: for an allow, the permits that matched; for
    an explicit deny, the forbids that matched; for a default deny (no permit
    matched), the permits that cover the action but whose conditions did not
    hold (empty when no permit covers it at all). ``reasons`` holds one
    sentence per entry of ``policies`` (the policy's ``@reason``), or, for a
    default deny, the one sentence that explains it. ``errors`` holds Cedar's
    evaluation errors (a policy that errors is skipped). ``message`` is the
    sentence shown to the user. ``redact`` (an allow's obligation) holds the labels whose
    detectors' matches are redacted from the action's result: those the ``@redact``
    annotations of ``policies`` name, sorted. ``audit_before`` (an allow's obligation too):
    one of ``policies`` carries ``@audit("before")``, so the action is recorded, durably,
    before it runs, as well as when it ends. ``policies_sha256`` names the policy set that
    made it (``PolicyEngine.digest``, as its ``load_policies`` record has it): the records of
    the decision carry it, so the log proves which set decided, whatever was loaded since.
    ``denied_by`` (a denial's) holds the forbids that denied it: those that matched, or that
    failed to evaluate and might have; empty for a default deny, where ``policies`` names
    permits that did not match and so denied nothing.
    """

    allowed: bool
    policies: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    message: str = ""
    redact: tuple[str, ...] = ()
    audit_before: bool = False
    policies_sha256: str = ""
    denied_by: tuple[str, ...] = ()

    def joined(self, other: PolicyDecision) -> PolicyDecision:
        """This decision and ``other``, on the same action under another name of its target
        (a URI, and the template it is read by): a denial if this one is, or if a forbid
        denied ``other`` (not for want of a permit: a permit on the URI alone allows it);
        else an allow bound by the obligations of both (``other``'s permits named too)."""
        if not self.allowed:
            return self
        if not other.allowed:
            return other if other.denied_by else self
        added = [
            (policy, reason)
            for policy, reason in zip(other.policies, other.reasons, strict=True)
            if policy not in self.policies
        ]
        return replace(
            self,
            policies=self.policies + tuple(policy for policy, _ in added),
            reasons=self.reasons + tuple(reason for _, reason in added),
            errors=self.errors + tuple(e for e in other.errors if e not in self.errors),
            message=self.message + "".join(f', policy "{policy}"' for policy, _ in added),
            redact=tuple(sorted({*self.redact, *other.redact})),
            audit_before=self.audit_before or other.audit_before,
        )

    def to_data(self) -> dict[str, Any]:
        """The decision as JSON-ready ``data`` for errors and audit records."""
        data: dict[str, Any] = {"policies": list(self.policies), "reasons": list(self.reasons)}
        if self.errors:
            data["errors"] = list(self.errors)
        return data
