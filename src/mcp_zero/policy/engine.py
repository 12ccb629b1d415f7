"""The policy engine: Cedar decisions for actions, with the reasons behind them."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cedarpy

from mcp_zero.errors import PolicyDenied
from mcp_zero.kernel.action import Action, Principal, Verb
from mcp_zero.policy.decision import PolicyDecision
from mcp_zero.policy.loader import CompiledPolicies, PolicyInfo, compile_sources, read_policy_dir
from mcp_zero.policy.request import (
    AGENT,
    PLUGIN_VERBS,
    Uid,
    batch_entities_json,
    context_json,
    describe,
    entities_json,
    target_of,
)
from mcp_zero.policy.schema import load_schema

DEFAULT_CACHE_SIZE = 4096
# Decisions and entities about a longer resource id (a client's URI: up to 8,192 characters)
# are not cached: the caches hold a few hundred bytes an entry, not the client's kilobytes.
MAX_CACHED_RESOURCE_LENGTH = 256
_NO_LABELS: frozenset[str] = frozenset()
# Cedar's error for reading an attribute of an agent other than the one acting (the target of
# an admin action), known by its id alone: it said that an agent that exists "does not
# exist" (found by review).
_TARGET_AGENT_UNKNOWN = re.compile(r'entity `(Agent::"(?:[^"\\]|\\.)*")` does not exist')
log = logging.getLogger(__name__)
_ACTIONS = {verb: {"type": "Action", "id": verb.value} for verb in Verb}


class PolicyEngine:
    """Decides actions against one immutable, pre-parsed Cedar policy set.

    The policy set and schema are parsed once, at load. Per call the engine
    reuses the Cedar entities built for the same principal and target, and
    remembers decisions: a Cedar decision is a pure function of the policy set,
    the entities and the request, and the key below determines all three, so a
    remembered decision is exactly what Cedar would answer again. A reload
    builds a new engine, so nothing cached outlives its policy set. Caches are
    bounded (oldest entries go first). Not thread-safe; use it from one event
    loop.
    """

    def __init__(self, compiled: CompiledPolicies, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._compiled = compiled
        self._policy_set = compiled.policy_set
        self._infos = compiled.infos
        self._by_cedar_id = compiled.by_cedar_id
        self._digest = compiled.digest
        # Whether a policy can use the labels of an action's arguments: one reads them, or
        # carries an obligation (whose records show them). Else detectors need not run.
        self.uses_labels = any(info.reads_labels or info.redact for info in self._infos.values())
        self._cache_size = cache_size
        self._decisions: dict[tuple[Any, ...], PolicyDecision] = {}
        self._entities: dict[tuple[Any, ...], cedarpy.Entities] = {}
        self._contexts: dict[tuple[Any, ...], str] = {}
        #: how many requests this engine has asked Cedar to decide (its caches' misses)
        self.requests_decided = 0

    @classmethod
    def load(cls, policy_dir: Path, *, cache_size: int = DEFAULT_CACHE_SIZE) -> PolicyEngine:
        """Read, parse and validate every ``*.cedar`` file in ``policy_dir``.

        A directory with no policy file gives an engine that denies everything.
        Raises PolicyError naming the file (and line) when a file cannot be
        read, parsed or validated, or when the directory does not exist.
        """
        return cls.from_sources(read_policy_dir(policy_dir), cache_size=cache_size)

    @classmethod
    def from_sources(
        cls, sources: Mapping[str, str], *, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> PolicyEngine:
        """Build an engine from Cedar texts keyed by file name.

        Raises PolicyError as ``load`` does.
        """
        return cls(compile_sources(sources, load_schema()), cache_size=cache_size)

    @property
    def policies(self) -> Mapping[str, PolicyInfo]:
        """Every loaded policy by id."""
        return self._infos

    @property
    def sources(self) -> Mapping[str, str]:
        """The Cedar text of every loaded file, by file name."""
        return self._compiled.sources

    @property
    def digest(self) -> str:
        """sha256 (hex) of the loaded files: names the policy set in audit records (each of
        its decisions carries it, as ``policies_sha256``)."""
        return self._digest

    def decide(self, action: Action) -> PolicyDecision:
        """Decide ``action``. Never raises for a well-formed action.

        Cedar sees ``action.context["transport"]`` (default "unknown") and
        ``action.context["labels"]`` (an iterable of strings, or one string); a
        completion's ``action.context["ref"]`` ("prompt" or "resource") types its target;
        other context keys and the arguments are not part of the request.
        """
        context = action.context
        labels = context.get("labels")
        principal = action.principal
        # The principal's fields rather than the principal: its dataclass __hash__ is a
        # Python call on every decision (the same key, as equal principals are equal fields).
        key = (
            principal.agent,
            principal.plugins,
            principal.anonymous,
            principal.admin,
            action.verb,
            action.resource,
            action.plugin,
            context.get("transport", "unknown"),
            _NO_LABELS if not labels else _label_set(labels),
            context.get("ref"),
        )
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._evaluate(action, key)
            if self._cache_size > 0 and len(action.resource) <= MAX_CACHED_RESOURCE_LENGTH:
                _remember(self._decisions, key, decision, self._cache_size)
        return decision

    def allowed_each(
        self, principal: Principal, verb: Verb, targets: Sequence[tuple[str, str]], transport: str
    ) -> list[bool]:
        """Whether ``decide`` would allow ``verb`` on each of ``targets`` (resource, plugin),
        without labels, over ``transport``: the items of a list, decided in one Cedar batch
        (a third of the time one by one) and not remembered, so that a list of hundreds
        does not push the calls' decisions out of the cache. A target Cedar reports an
        error for (a forbid that fails to evaluate denies) is left to ``decide``."""
        allowed = [False] * len(targets)
        batched: list[int] = []  # (the index of each request's target)
        alone: list[int] = []
        requests: list[dict[str, Any]] = []
        uids: dict[Uid, Uid | None] = {}  # each target's (type, id): its parent plugin
        contexts: dict[str, str] = {}
        agent, action = {"type": AGENT, "id": principal.agent}, _ACTIONS[verb]
        for index, (resource, plugin) in enumerate(targets):
            rtype, rid, parent = target_of(verb, resource, plugin)
            if (rtype, rid) in uids:  # (one entity per uid: a template of two plugins)
                alone.append(index)
                continue
            uids[(rtype, rid)] = parent
            context = contexts.get(plugin)
            if context is None:
                context = contexts[plugin] = context_json(
                    transport, principal.anonymous, _NO_LABELS, plugin
                )
            target = {"type": rtype, "id": rid}
            requests.append(
                {"principal": agent, "action": action, "resource": target, "context": context}
            )
            batched.append(index)
        if requests:
            needed = batch_entities_json(principal, [(t, i, p) for (t, i), p in uids.items()])
            entities = cedarpy.Entities.from_json_str(needed)
            results = cedarpy.is_authorized_batch(requests, self._policy_set, entities)
            self.requests_decided += len(requests)
            for index, result in zip(batched, results, strict=True):
                if result.diagnostics.errors:
                    alone.append(index)
                else:
                    allowed[index] = result.allowed
        for index in alone:
            resource, plugin = targets[index]
            one = Action(principal, verb, resource, plugin, {}, {"transport": transport})
            allowed[index] = self.decide(one).allowed
        return allowed

    def require(self, action: Action) -> PolicyDecision:
        """Decide ``action`` and return the decision when it is allowed.

        Raises PolicyDenied with ``data={"policies": [...], "reasons": [...]}``
        (and ``errors`` when Cedar reported some) when it is denied.
        """
        decision = self.decide(action)
        if not decision.allowed:
            raise PolicyDenied(decision.message, data=decision.to_data())
        return decision

    def _evaluate(self, action: Action, key: tuple[Any, ...]) -> PolicyDecision:
        principal = action.principal
        verb = action.verb
        rtype, rid, parent = target_of(verb, action.resource, action.plugin, key[-1])
        request = {
            "principal": {"type": AGENT, "id": principal.agent},
            "action": _ACTIONS[verb],
            "resource": {"type": rtype, "id": rid},
            "context": self._context(key, principal, action.plugin),
        }
        entities = self._entities_for(principal, rtype, rid, parent)
        result = cedarpy.is_authorized(request, self._policy_set, entities)
        self.requests_decided += 1
        diagnostics = result.diagnostics
        by_cedar_id = self._by_cedar_id
        matched = tuple(by_cedar_id[pid].id for pid in diagnostics.reasons)
        # (each policy that failed to evaluate, with Cedar's error)
        failed = [self._failure(error) for error in diagnostics.errors]
        errors = tuple(text for _, _, text in failed)
        if errors:  # (once per decision cached)
            log.warning(
                "policies failed to evaluate for %s: %s",
                describe(principal.agent, verb, rid),
                "; ".join(errors),
            )
        unknown = [(info, what) for info, what, _ in failed if info and info.effect == "forbid"]
        if result.allowed and unknown:
            # Cedar skips a policy that fails to evaluate: a forbid would not forbid. Here
            # it does, as it might have: the action is denied until the policy is fixed
            sentence = "; ".join(
                f'policy "{info.id}" may forbid {describe(principal.agent, verb, rid)} but '
                f"could not be evaluated ({error}): denied until it is fixed"
                for info, error in unknown
            )
            ids = tuple(info.id for info, _ in unknown)
            return PolicyDecision(
                False,
                ids,
                (sentence,) * len(ids),
                errors,
                sentence,
                policies_sha256=self._digest,
                denied_by=ids,
            )
        if result.allowed:
            reasons = tuple(self._reason(pid, "permits it") for pid in matched)
            # and the obligations of a permit that failed to evaluate: it might have matched
            infos = [info for pid in matched if (info := self._infos.get(pid)) is not None]
            infos += [info for info, _, _ in failed if info is not None]
            redact = sorted({label for info in infos for label in info.redact})
            before = any(info.audit_before for info in infos)
            message = "allowed by " + _ids(matched)
            return PolicyDecision(
                True,
                matched,
                reasons,
                errors,
                message,
                tuple(redact),
                before,
                policies_sha256=self._digest,
            )
        if matched:
            reasons = tuple(self._reason(pid, "forbids it") for pid in matched)
            sentence = "; ".join(
                f'policy "{pid}" forbids {describe(principal.agent, verb, rid)}: {reason}'
                for pid, reason in zip(matched, reasons, strict=True)
            )
            return PolicyDecision(
                False,
                matched,
                reasons,
                errors,
                sentence,
                policies_sha256=self._digest,
                denied_by=matched,
            )
        return self._default_deny(action, rtype, rid, parent, errors)

    def _failure(self, error: Any) -> tuple[PolicyInfo | None, str, str]:
        """The policy a Cedar evaluation error is about (None if it names none of ours),
        what went wrong, and the error's text for people, naming the policy by its @id."""
        if isinstance(error, dict):  # (cedarpy has given either form)
            cedar_id = str(error.get("policy_id") or error.get("policyId") or "")
            what = str(error.get("error") or error.get("message") or error)
        else:
            cedar_id, what = _failed_id(str(error))
        info = self._by_cedar_id.get(cedar_id)
        if info is None:
            return None, str(error), str(error)
        what = _TARGET_AGENT_UNKNOWN.sub(
            r"it reads an attribute of \1: an agent other than the one acting is known by its "
            "id alone",
            what,
        )
        return info, what, f'policy "{info.id}": {what}'

    def _default_deny(
        self, action: Action, rtype: str, rid: str, parent: Uid | None, errors: tuple[str, ...]
    ) -> PolicyDecision:
        agent = action.principal.agent
        verb = action.verb.value
        covering = [
            info
            for info in self._infos.values()
            if info.effect == "permit" and info.covers(agent, verb, rtype, rid, parent)
        ]
        # Name the permits written for this verb; permits for every action
        # (e.g. admin-all) only when nothing more specific exists.
        specific = [info for info in covering if info.verbs is not None]
        candidates = specific or covering
        if candidates:
            why = "; ".join(
                f'policy "{info.id}" {info.reason or "did not match"}' for info in candidates
            )
        else:
            why = f"no permit policy covers {verb}"
        if action.verb in PLUGIN_VERBS:
            attached = ", ".join(sorted(action.principal.plugins)) or "none"
            why += f" (attached: {attached})"
        if errors:
            why += " (policies that failed to evaluate: " + "; ".join(errors) + ")"
        sentence = f"no policy permits {describe(agent, action.verb, rid)}: {why}"
        ids = tuple(info.id for info in candidates)
        return PolicyDecision(
            False, ids, (sentence,), errors, sentence, policies_sha256=self._digest
        )

    def _reason(self, policy_id: str, fallback: str) -> str:
        info = self._infos.get(policy_id)
        if info is not None and info.reason:
            return info.reason
        return f'policy "{policy_id}" {fallback}'

    def _context(self, key: tuple[Any, ...], principal: Principal, plugin: str | None) -> str:
        transport, labels = key[7], key[8]
        ckey = (transport, principal.anonymous, labels, plugin)
        text = self._contexts.get(ckey)
        if text is None:
            text = context_json(transport, principal.anonymous, labels, plugin)
            _remember(self._contexts, ckey, text, max(self._cache_size, 64))
        return text

    def _entities_for(
        self, principal: Principal, rtype: str, rid: str, parent: Uid | None
    ) -> cedarpy.Entities:
        ekey = (principal, rtype, rid, parent)
        entities = self._entities.get(ekey)
        if entities is None:
            # Not re-validated against the schema here (it costs a third of a cold
            # decision); tests check that what entities_json builds conforms.
            entities = cedarpy.Entities.from_json_str(entities_json(principal, rtype, rid, parent))
            if len(rid) <= MAX_CACHED_RESOURCE_LENGTH:
                _remember(self._entities, ekey, entities, max(self._cache_size, 64))
        return entities


def _remember(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    if len(cache) >= limit:
        # Dicts keep insertion order: drop the oldest entry.
        del cache[next(iter(cache))]
    cache[key] = value


def _label_set(labels: Any) -> frozenset[str]:
    # A lone string is one label, not a set of characters.
    return frozenset((labels,)) if isinstance(labels, str) else frozenset(labels)


def _ids(policy_ids: tuple[str, ...]) -> str:
    return ", ".join(f'policy "{pid}"' for pid in policy_ids)


def _failed_id(error: str) -> tuple[str, str]:
    """The Cedar id of the policy an evaluation error names ("error while evaluating policy
    `ID`: what"), and what; or "" and the error."""
    head, tick, rest = error.partition("policy `")
    cedar_id, tick2, what = rest.partition("`")
    if tick and tick2 and "evaluating" in head:
        return cedar_id, what.removeprefix(":").strip()
    return "", error
