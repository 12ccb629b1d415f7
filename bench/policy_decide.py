"""µs per PolicyEngine.decide(), against raw cedarpy re-parsing the policies per call.

Run: .venv/bin/python bench/policy_decide.py [iterations]

Rows:
  baseline       cedarpy.is_authorized(request, policy_text, entities_json): policies and
                 entities parsed on every call (what a naive integration does)
  pre-parsed     cedarpy.is_authorized with a pre-parsed PolicySet and Entities handle
  decide cached  engine.decide() in steady state (same agent/tool seen before)
  decide eval    engine.decide() with the decision cache off (cache_size=0): Cedar runs each call
  decide cold    engine.decide() for a principal never seen: entities built, Cedar runs
Same run, same machine: compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial

import cedarpy

from mcp_zero.kernel.action import Action, Principal, Verb
from mcp_zero.policy import DEFAULT_POLICIES, PolicyEngine
from mcp_zero.policy.request import context_json, entities_json, target_of

# 4 default policies + 16 more: about the 20-policy set NOTES.md measured.
EXTRA = "\n".join(
    f'@id("agent-{i}-tool")\n@reason("agent-{i} may use tool-{i}")\n'
    f'permit (principal == Agent::"agent-{i}", action == Action::"call_tool", '
    f'resource == Tool::"tool-{i}");\n'
    if i % 2
    else f'@id("no-secret-{i}")\n@reason("no secrets into tool-{i}")\n'
    f'forbid (principal, action == Action::"call_tool", resource == Tool::"tool-{i}") '
    'when { context.labels.contains("secret") };\n'
    for i in range(16)
)
SOURCES = {"default.cedar": DEFAULT_POLICIES, "extra.cedar": EXTRA}
POLICY_TEXT = DEFAULT_POLICIES + "\n" + EXTRA

ALICE = Principal("alice", frozenset({"notes", "mail"}))
BOB = Principal("bob")
ALLOWED = Action(ALICE, Verb.CALL_TOOL, "notes_add", plugin="notes", context={"transport": "http"})
DENIED = Action(BOB, Verb.CALL_TOOL, "notes_add", plugin="notes", context={"transport": "http"})


def per_call_us(fn: Callable[[], object], iterations: int, repeats: int = 5) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        runs.append((time.perf_counter() - start) / iterations * 1e6)
    return statistics.median(runs)


def raw_request(action: Action) -> tuple[dict[str, object], str]:
    rtype, rid, parent = target_of(action.verb, action.resource, action.plugin)
    request: dict[str, object] = {
        "principal": {"type": "Agent", "id": action.principal.agent},
        "action": {"type": "Action", "id": action.verb.value},
        "resource": {"type": rtype, "id": rid},
        "context": json.loads(context_json("http", action.principal.anonymous, (), action.plugin)),
    }
    return request, entities_json(action.principal, rtype, rid, parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("iterations", type=int, nargs="?", default=2000, help="per measurement")
    iterations = parser.parse_args().iterations
    cached = PolicyEngine.from_sources(SOURCES)
    uncached = PolicyEngine.from_sources(SOURCES, cache_size=0)
    policy_set = cedarpy.PolicySet.from_str(POLICY_TEXT)
    print(f"{len(cached.policies)} policies, {iterations} iterations x 5, median µs per call\n")
    print(
        f"{'':10} {'baseline':>9} {'pre-parsed':>11} {'cached':>8} {'eval':>8} {'cold':>8}"
        f"   baseline/cached  baseline/eval"
    )
    for label, action in (("allowed", ALLOWED), ("denied", DENIED)):
        request, ents = raw_request(action)
        # Sanity: every path gives the same answer.
        raw = cedarpy.is_authorized(request, POLICY_TEXT, ents)
        assert raw.allowed == cached.decide(action).allowed == uncached.decide(action).allowed
        handle = cedarpy.Entities.from_json_str(ents)
        baseline = per_call_us(
            partial(cedarpy.is_authorized, request, POLICY_TEXT, ents), iterations
        )
        preparsed = per_call_us(
            partial(cedarpy.is_authorized, request, policy_set, handle), iterations
        )
        hot = per_call_us(partial(cached.decide, action), iterations)
        evaluated = per_call_us(partial(uncached.decide, action), iterations)
        counter = iter(range(10**9))

        def cold(a: Action = action, counter: Iterator[int] = counter) -> object:
            p = Principal(f"{a.principal.agent}-{next(counter)}", a.principal.plugins)
            return cached.decide(Action(p, a.verb, a.resource, a.plugin, context=a.context))

        first = per_call_us(cold, iterations)
        print(
            f"{label:10} {baseline:9.1f} {preparsed:11.1f} {hot:8.2f} {evaluated:8.1f} "
            f"{first:8.1f}   {baseline / hot:15.0f}x {baseline / evaluated:13.1f}x"
        )


if __name__ == "__main__":
    main()
